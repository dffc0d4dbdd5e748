import pytest
import torch
from sklearn.metrics import roc_auc_score

from training.ood import (
    auroc,
    choose_rule,
    constant_colour,
    fpr_at_tpr,
    gaussian_noise,
    shuffled_pixels,
    synthetic_sets,
    tail_score,
    threshold_at_tpr,
    two_sided_thresholds,
    uniform_noise,
)


def test_the_threshold_keeps_95_percent_of_the_in_distribution_scores():
    scores = torch.arange(100.0)
    assert threshold_at_tpr(scores) == 5.0
    assert float((scores >= 5.0).double().mean()) == 0.95


@pytest.mark.parametrize("count", [1, 19, 20, 21, 333, 5000])
def test_the_threshold_is_the_largest_that_keeps_at_least_the_target(count):
    scores = torch.rand(count, generator=torch.Generator().manual_seed(count))
    threshold = threshold_at_tpr(scores)
    assert float((scores >= threshold).double().mean()) >= 0.95
    higher = scores[scores > threshold]
    if len(higher):
        assert float((scores >= higher.min()).double().mean()) < 0.95, "a larger threshold would do"


def test_two_sided_thresholds_drop_half_the_rest_in_each_tail():
    scores = torch.arange(100.0)
    low, high = two_sided_thresholds(scores)
    assert (low, high) == (2.0, 96.0)
    assert float(((scores >= low) & (scores <= high)).double().mean()) == 0.95


def test_the_tail_score_is_the_share_of_the_reference_as_far_out():
    reference = torch.arange(1.0, 11.0)  # 1 .. 10
    assert tail_score(reference, torch.tensor([0.0, 1.0, 5.0, 6.0, 10.0, 99.0])).tolist() == \
        pytest.approx([0.0, 0.1, 0.5, 0.5, 0.1, 0.0])


def test_tied_scores_are_all_kept_together():
    assert threshold_at_tpr(torch.ones(100)) == 1.0


def test_auroc_of_separated_reversed_and_equal_scores():
    inside, outside = torch.tensor([3.0, 4.0, 5.0]), torch.tensor([0.0, 1.0])
    assert auroc(inside, outside) == 1.0
    assert auroc(outside, inside) == 0.0
    assert auroc(torch.ones(4), torch.ones(3)) == 0.5
    assert auroc(torch.tensor([1.0, 3.0]), torch.tensor([2.0])) == 0.5


def test_auroc_agrees_with_scikit_learn_on_tied_scores():
    generator = torch.Generator().manual_seed(0)
    inside = torch.randint(0, 20, (500,), generator=generator).double() + 2
    outside = torch.randint(0, 20, (300,), generator=generator).double()
    expected = roc_auc_score([1] * 500 + [0] * 300, torch.cat([inside, outside]).numpy())
    assert auroc(inside, outside) == pytest.approx(expected, abs=1e-12)


def test_fpr_is_the_share_of_ood_images_the_95_percent_threshold_keeps():
    assert fpr_at_tpr(torch.arange(100.0), torch.tensor([4.0, 5.0, 6.0, 50.0])) == 0.75


def test_the_synthetic_sets_are_uint8_images_made_as_described():
    generator = torch.Generator().manual_seed(0)
    for make in (gaussian_noise, uniform_noise, constant_colour):
        images = make(8, generator)
        assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
    colours = constant_colour(5, generator)
    assert (colours == colours[:, :, :1, :1]).all(), "one colour per image"
    gaussian = gaussian_noise(200, generator).double()
    assert gaussian.mean().item() == pytest.approx(127.5, abs=1) and gaussian.std().item() == pytest.approx(63, abs=2)
    uniform = uniform_noise(200, generator)
    assert uniform.min() == 0 and uniform.max() == 255


def test_shuffled_pixels_keep_each_images_pixels_but_not_their_places():
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    shuffled = shuffled_pixels(images, torch.Generator().manual_seed(2))
    for original, permuted in zip(images, shuffled):
        pixels = lambda image: sorted(map(tuple, image.reshape(3, -1).T.tolist()))  # noqa: E731  RGB triples
        assert pixels(original) == pixels(permuted)
        assert not torch.equal(original, permuted)


def test_synthetic_sets_repeat_for_a_seed_and_differ_for_another():
    cifar = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    first, again, other = synthetic_sets(cifar, 10, 1), synthetic_sets(cifar, 10, 1), synthetic_sets(cifar, 10, 2)
    assert set(first) == {"gaussian_noise", "uniform_noise", "constant_colour", "shuffled_pixels"}
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not any(torch.equal(first[name], other[name]) for name in first)


def _peaked(count: int, offset: torch.Tensor) -> torch.Tensor:
    logits = torch.zeros(count, 10)
    logits[:, 0] = 4
    return logits + offset.view(-1, 1)


def test_the_rule_keeps_energy_when_only_the_size_of_the_logits_differs():
    generator = torch.Generator().manual_seed(0)
    # Same softmax for every image (MSP cannot tell them apart), but the OOD images' logits are 5 lower.
    holdout = _peaked(400, torch.randn(400, generator=generator) * 0.5 + 5)
    ood = {"weak": _peaked(300, torch.randn(300, generator=generator) * 0.5)}
    rule = choose_rule(holdout, ood, temperature=1.0)
    assert rule.score == "energy" and rule.temperature == 1.0 and rule.upper_threshold is None
    assert rule.candidates_auroc["energy@T=1"]["weak"] > 0.99
    assert rule.candidates_auroc["msp@T=1"]["weak"] == pytest.approx(0.5, abs=0.05)
    assert rule.holdout_tpr >= 0.95 and rule.target_tpr == 0.95


def test_the_rule_keeps_msp_when_only_the_shape_of_the_softmax_differs():
    generator = torch.Generator().manual_seed(0)
    holdout = _peaked(400, torch.randn(400, generator=generator) * 0.3)
    # Flat logits with the same log-sum-exp as the peaked ones: equal energy, but a max softmax of 0.1.
    level = torch.logsumexp(_peaked(1, torch.zeros(1)), 1) - torch.log(torch.tensor(10.0))
    ood = {"flat": torch.zeros(300, 10) + level + torch.randn(300, 1, generator=generator) * 0.3}
    rule = choose_rule(holdout, ood, temperature=2.0, test_logits=holdout[:100])
    assert rule.score == "msp"
    assert set(rule.candidates_auroc) == {f"{kind}@T={t}{side}" for kind in ("energy", "msp") for t in (1, 2)
                                          for side in ("", " two-sided")}
    assert rule.candidates_auroc[f"msp@T={rule.temperature:g}"]["flat"] == 1.0
    assert rule.test_tpr >= 0.95


def test_the_rule_goes_two_sided_when_ood_images_answer_too_strongly_as_well_as_too_weakly():
    generator = torch.Generator().manual_seed(0)
    holdout = _peaked(400, torch.randn(400, generator=generator) * 0.5 + 5)
    ood = {"strong": _peaked(300, torch.randn(300, generator=generator) * 0.5 + 10),
           "weak": _peaked(300, torch.randn(300, generator=generator) * 0.5)}
    rule = choose_rule(holdout, ood, temperature=1.0, test_logits=holdout)
    assert rule.score == "energy" and rule.upper_threshold is not None
    assert rule.candidates_auroc["energy@T=1"]["strong"] < 0.01, "one-sided, the strong ones pass"
    assert min(rule.candidates_auroc["energy@T=1 two-sided"].values()) > 0.99
    assert rule.threshold < 9 < rule.upper_threshold < 14
    assert rule.holdout_tpr >= 0.95 and rule.test_tpr == rule.holdout_tpr
