import torch

from model.card import Calibration, OutOfDistributionRule
from model.features import GaussianStatistics
from model.trust import assess
from training.ood import choose_rule
from training.ood_features import CANDIDATES, Outputs, choose_feature_rule

PENULTIMATE = 3


def _outputs(count: int, generator: torch.Generator, shift: float = 0.0, logits: torch.Tensor | None = None) -> Outputs:
    """Features whose first stage (4 columns, positive like a GELU's) is shifted by ``shift``; the same logits
    for every set unless given, so only the features can tell the sets apart."""
    stage1 = torch.rand(count, 4, generator=generator) + 1.0 + shift
    penultimate = torch.randn(count, PENULTIMATE, generator=generator)
    if logits is None:
        logits = torch.tensor([[2.0, 0.0]]).expand(count, 2).clone()
    return Outputs(logits, torch.cat([stage1, penultimate], 1))


def _logit_rule(holdout: Outputs, tuned_on: dict[str, Outputs]) -> OutOfDistributionRule:
    return choose_rule(holdout.logits, {name: out.logits for name, out in tuned_on.items()}, 1.0)


def test_features_win_where_the_logits_cannot_tell_and_the_fitted_rule_flags_the_synthetic_sets():
    generator = torch.Generator().manual_seed(0)
    train, holdout = _outputs(2000, generator), _outputs(400, generator)
    tuned_on = {"brighter": _outputs(300, generator, shift=3.0), "darker": _outputs(300, generator, shift=-0.9)}
    choice = choose_feature_rule(_logit_rule(holdout, tuned_on), train, holdout, tuned_on, PENULTIMATE,
                                 fitted_on="a test's images")
    rule = choice.rule
    assert rule.score == "features" and rule.features is not None and choice.statistics_bytes is not None
    assert rule.features.part == "stage1", "the penultimate columns carry no signal here"
    assert rule.holdout_tpr >= 0.95
    calibration = Calibration(temperature=1.0, fitted_on="test", holdout_images=400, test_images=0,
                              holdout_nll_before=1.0, holdout_nll_after=1.0, ood=rule)
    statistics = GaussianStatistics.from_bytes(choice.statistics_bytes)
    for name, outputs in tuned_on.items():
        flagged = ~assess(outputs.logits, calibration, features=outputs.features, statistics=statistics).in_distribution
        assert float(flagged.double().mean()) > 0.95, name
    assert set(rule.candidates_auroc) >= {candidate.name for candidate in CANDIDATES}


def test_the_logit_rule_stays_when_the_features_do_no_better():
    generator = torch.Generator().manual_seed(1)
    train, holdout = _outputs(1000, generator), _outputs(300, generator)
    # Same features as the training images, logits far lower: only the logits can tell.
    tuned_on = {"quiet": _outputs(200, generator, logits=torch.zeros(200, 2))}
    logit_rule = _logit_rule(holdout, tuned_on)
    choice = choose_feature_rule(logit_rule, train, holdout, tuned_on, PENULTIMATE, fitted_on="a test's images")
    assert choice.statistics_bytes is None and choice.rule.features is None
    assert choice.rule.score == logit_rule.score and choice.rule.threshold == logit_rule.threshold


def test_too_few_training_images_for_a_covariance_keep_the_logit_rule():
    generator = torch.Generator().manual_seed(2)
    train, holdout = _outputs(10, generator), _outputs(100, generator)  # 10 images: under 4 per dimension
    tuned_on = {"brighter": _outputs(100, generator, shift=3.0)}
    choice = choose_feature_rule(_logit_rule(holdout, tuned_on), train, holdout, tuned_on, PENULTIMATE,
                                 fitted_on="a test's images")
    assert choice.rule.features is None and choice.statistics_bytes is None
