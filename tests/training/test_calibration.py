import math

import pytest
import torch

from training.calibration import (
    TEMPERATURE_RANGE,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
)


def _with_confidence(confidences: list[float], correct: list[bool], classes: int = 10):
    """Probabilities whose largest entry is each given confidence, on class 0; labels right or wrong as told."""
    rows = []
    for confidence in confidences:
        rest = (1 - confidence) / (classes - 1)
        rows.append([confidence] + [rest] * (classes - 1))
    labels = torch.tensor([0 if right else 1 for right in correct])
    return torch.tensor(rows, dtype=torch.float64), labels


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_the_fit_recovers_the_temperature_the_labels_were_drawn_with(true_temperature):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 10, generator=generator, dtype=torch.float64) * 3
    labels = torch.multinomial(torch.softmax(logits / true_temperature, dim=1), 1, generator=generator).squeeze(1)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.04)
    nll = negative_log_likelihood(logits, labels, fitted)
    assert nll < negative_log_likelihood(logits, labels, fitted * 1.05)
    assert nll < negative_log_likelihood(logits, labels, fitted / 1.05)
    assert nll < negative_log_likelihood(logits, labels, 1.0)


def test_logits_that_are_always_right_by_far_fit_the_smallest_temperature():
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    assert fit_temperature(logits, torch.tensor([0, 1])) == TEMPERATURE_RANGE[0]


def test_nll_is_the_mean_negative_log_probability_of_the_label():
    logits = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert negative_log_likelihood(logits, torch.tensor([0, 1])) == pytest.approx(expected)
    # at T = 2 the first row is softmax([log 3 / 2, 0]) = [sqrt 3, 1] / (sqrt 3 + 1)
    expected_t2 = (-math.log(math.sqrt(3) / (math.sqrt(3) + 1)) - math.log(0.5)) / 2
    assert negative_log_likelihood(logits, torch.tensor([0, 1]), 2.0) == pytest.approx(expected_t2)


def test_ece_is_zero_when_confidence_matches_accuracy():
    probabilities, labels = _with_confidence([0.8] * 10, [True] * 8 + [False] * 2)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_is_the_gap_of_an_overconfident_network():
    probabilities, labels = _with_confidence([0.9] * 10, [True] * 5 + [False] * 5)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.4)


def test_ece_weights_each_bins_gap_by_its_share_of_the_images():
    # 4 images at 0.95 with 2 right: gap 0.45; 6 at 0.5 with 3 right: gap 0. ECE = 0.4 * 0.45.
    probabilities, labels = _with_confidence([0.95] * 4 + [0.5] * 6, [True, True, False, False] + [True] * 3 +
                                             [False] * 3)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.18)
    # The same images with 15 bins or 1 bin: one bin pools both groups, mean confidence 0.68, accuracy 0.5.
    assert expected_calibration_error(probabilities, labels, bins=1) == pytest.approx(0.18)
    probabilities, labels = _with_confidence([0.95] * 4 + [0.5] * 6, [False] * 4 + [True] * 6)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.4 * 0.95 + 0.6 * 0.5)
    assert expected_calibration_error(probabilities, labels, bins=1) == pytest.approx(abs(0.6 - 0.68))


def test_bins_are_right_closed_so_full_confidence_is_in_the_last():
    probabilities, labels = _with_confidence([1.0, 0.5, 0.1], [True, True, False])
    bins = reliability_bins(probabilities, labels)
    # 1.0 in (14/15, 1], 0.5 in (7/15, 8/15], 0.1 in (1/15, 2/15]
    assert torch.nonzero(bins.counts).flatten().tolist() == [1, 7, 14]
    assert bins.accuracy[14] == 1 and bins.accuracy[1] == 0
    assert bins.confidence[7] == pytest.approx(0.5)
    assert torch.isnan(bins.accuracy[0]), "an empty bin has no accuracy"
