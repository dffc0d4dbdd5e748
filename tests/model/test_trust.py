import math

import pytest
import torch

from model.card import Calibration, OutOfDistributionRule
from model.features import GaussianStatistics
from model.trust import (
    MissingFeatures,
    assess,
    calibrated_probabilities,
    energy_score,
    in_distribution,
    max_softmax_score,
    ood_score,
)


def _calibration(score: str = "energy", temperature: float = 2.0, threshold: float = 1.0) -> Calibration:
    rule = OutOfDistributionRule(score=score, temperature=1.0, threshold=threshold, target_tpr=0.95,
                                 holdout_tpr=0.95, selection="test")
    return Calibration(temperature=temperature, fitted_on="test", holdout_images=10, test_images=10,
                       holdout_nll_before=1.0, holdout_nll_after=0.9, ood=rule)


def test_energy_is_temperature_times_logsumexp_of_the_scaled_logits():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    assert energy_score(logits).tolist() == pytest.approx([math.log(2), math.log(4)])
    # T log(e^(a/T) + e^(b/T)) with a = b = 0 and T = 2: 2 log 2.
    assert energy_score(logits, 2.0)[0].item() == pytest.approx(2 * math.log(2))


def test_energy_grows_with_the_logits_while_the_softmax_stays():
    # Adding a constant to every logit leaves the softmax (and so MSP) as it was, but raises the energy score
    # by exactly that constant: energy sees how strongly the network responds, MSP only the competition.
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert (energy_score(logits + 5) - energy_score(logits)).item() == pytest.approx(5)
    assert max_softmax_score(logits + 5).item() == pytest.approx(max_softmax_score(logits).item())


def test_msp_is_the_largest_probability_and_flattens_with_temperature():
    logits = torch.tensor([[math.log(3), 0.0]])
    assert max_softmax_score(logits).item() == pytest.approx(0.75)
    # softmax([log 3, 0] / 2) = [sqrt 3, 1] / (sqrt 3 + 1)
    assert max_softmax_score(logits, 2.0).item() == pytest.approx(math.sqrt(3) / (math.sqrt(3) + 1))
    assert ood_score(logits, "msp").item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="energy, msp"):
        ood_score(logits, "entropy")


def test_temperature_never_changes_the_predicted_class():
    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(0)) * 4
    for temperature in (0.3, 1.0, 2.5):
        assert torch.equal(calibrated_probabilities(logits, temperature).argmax(1), logits.argmax(1))


def test_the_threshold_itself_counts_as_in_distribution():
    assert in_distribution(torch.tensor([0.5, 1.0, 1.5]), 1.0).tolist() == [False, True, True]


def test_a_two_sided_rule_flags_both_tails():
    scores = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5])
    assert in_distribution(scores, 1.0, 2.0).tolist() == [False, True, True, True, False]
    logits = torch.tensor([[9.0, 0.0], [2.0, 0.0], [-5.0, -5.0]])  # energies 9.0, 2.13, -4.3
    rule = _calibration(threshold=0.0).ood.model_copy(update={"upper_threshold": 5.0})
    calibration = _calibration().model_copy(update={"ood": rule})
    assert assess(logits, calibration).in_distribution.tolist() == [False, True, False]


def test_assess_applies_the_cards_temperature_and_flags_by_its_rule():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    result = assess(logits, _calibration(temperature=2.0, threshold=2.0))
    assert torch.allclose(result.probabilities, torch.softmax(logits / 2, dim=1))
    # energy at T=1 (the rule's own temperature, not the calibration's): 4.04 and 1.13
    assert result.score.tolist() == pytest.approx(torch.logsumexp(logits, 1).tolist())
    assert result.in_distribution.tolist() == [True, False]
    raw = assess(logits, _calibration(temperature=2.0, threshold=2.0), calibrated=False)
    assert torch.allclose(raw.probabilities, torch.softmax(logits, dim=1))
    assert torch.equal(raw.in_distribution, result.in_distribution), "the flag does not depend on calibration"


def test_assess_without_calibration_is_the_raw_softmax_and_no_flag():
    logits = torch.tensor([[1.0, 2.0]])
    result = assess(logits, None)
    assert torch.allclose(result.probabilities, torch.softmax(logits, dim=1))
    assert result.score is None and result.in_distribution is None


def _feature_calibration(statistics: GaussianStatistics, threshold: float, energy_weight: float = 0.0) -> Calibration:
    from model.card import FeatureScore

    features = FeatureScore(part="stage1", transform="none", statistics_sha256="0" * 64, feature_centre=0.0,
                            feature_scale=1.0, energy_weight=energy_weight, energy_centre=0.0, energy_scale=1.0,
                            fitted_on="a test's images")
    rule = OutOfDistributionRule(score="features", temperature=1.0, threshold=threshold, target_tpr=0.95,
                                 holdout_tpr=0.95, selection="test", features=features)
    return Calibration(temperature=2.0, fitted_on="test", holdout_images=10, test_images=10,
                       holdout_nll_before=1.0, holdout_nll_after=0.9, ood=rule)


def test_a_feature_rule_flags_features_far_from_the_training_statistics_and_keeps_near_ones():
    generator = torch.Generator().manual_seed(0)
    stage1 = torch.randn(1000, 4, generator=generator)
    statistics = GaussianStatistics.fit(stage1)
    threshold = float(torch.sort(statistics.score(stage1)).values[50])  # keeps 95 % of them
    penultimate = torch.randn(6, 3, generator=generator)
    near = torch.cat([stage1[:3], penultimate[:3]], 1)
    far = torch.cat([stage1[:3] + 8.0, penultimate[3:]], 1)  # 8 standard deviations away in every direction
    logits = torch.zeros(3, 2)
    calibration = _feature_calibration(statistics, threshold)
    kept = assess(logits, calibration, features=near, statistics=statistics).in_distribution
    flagged = assess(logits, calibration, features=far, statistics=statistics).in_distribution
    assert kept is not None and flagged is not None
    assert not flagged.any(), "images far from every training image are flagged"
    assert int(kept.sum()) >= 2, "training-like features are kept (95 % of them pass the threshold)"


def test_a_feature_rule_adds_the_weighted_energy_and_only_reads_the_first_stage_columns():
    statistics = GaussianStatistics(mean=torch.zeros(2), precision=torch.eye(2))
    features = torch.tensor([[1.0, 1.0, 100.0], [1.0, 1.0, -100.0]])  # the penultimate column must not matter
    logits = torch.tensor([[0.0, 0.0], [5.0, 0.0]])
    plain = assess(logits, _feature_calibration(statistics, 0.0), features=features, statistics=statistics)
    assert plain.score is not None and plain.score.tolist() == pytest.approx([-2.0, -2.0])
    weighted = assess(logits, _feature_calibration(statistics, 0.0, energy_weight=2.0), features=features,
                      statistics=statistics)
    assert weighted.score is not None
    assert weighted.score.tolist() == pytest.approx((torch.tensor([-2.0, -2.0]) + 2 * energy_score(logits)).tolist())


def test_a_feature_rule_without_features_is_a_callers_bug_said_plainly():
    statistics = GaussianStatistics(mean=torch.zeros(2), precision=torch.eye(2))
    with pytest.raises(MissingFeatures, match="features="):
        assess(torch.zeros(1, 2), _feature_calibration(statistics, 0.0))


def test_a_logit_rule_card_written_before_features_still_loads_and_ignores_features():
    old = {"score": "energy", "temperature": 1.0, "threshold": 1.0, "upper_threshold": None, "target_tpr": 0.95,
           "holdout_tpr": 0.95, "test_tpr": 0.96, "selection": "energy@T=1", "candidates_auroc": {}}
    rule = OutOfDistributionRule.model_validate(old)
    assert rule.features is None
    calibration = _calibration().model_copy(update={"ood": rule})
    logits = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    assert assess(logits, calibration).in_distribution.tolist() == [True, False]
    with pytest.raises(ValueError, match="features"):
        OutOfDistributionRule.model_validate(old | {"score": "features"})
