"""Stage 6: logits -> the probabilities, OOD score and flag an answer reports, by the card's calibration."""

import numpy as np
import pytest
import torch

from app.classification.probabilities import assess_logits
from model.card import read_card
from tests.support.checkpoints import with_calibration

LOGITS = np.array([[4.0, 1.0, 0.0, -1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0],
                   [0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3]], dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


@pytest.fixture(scope="module")
def calibrated_card(tiny_checkpoint, tmp_path_factory):
    # logsumexp of the rows: ~4.07 and ~2.43; a threshold between them keeps the first row only.
    return read_card(with_calibration(tiny_checkpoint, tmp_path_factory.mktemp("c") / "ckpt", temperature=2.0,
                                      threshold=3.0))


@pytest.mark.parametrize("calibrated", [True, False])
def test_a_card_without_calibration_gives_the_raw_softmax_and_no_flag(tiny_checkpoint, calibrated):
    output = assess_logits(LOGITS, read_card(tiny_checkpoint), calibrated=calibrated)
    assert np.allclose(output.probabilities, softmax(LOGITS), atol=1e-6)
    assert output.ood_scores is None and output.in_distribution is None


def test_calibration_on_divides_the_logits_by_the_cards_temperature(calibrated_card):
    on = assess_logits(LOGITS, calibrated_card, calibrated=True)
    off = assess_logits(LOGITS, calibrated_card, calibrated=False)
    assert np.allclose(on.probabilities, softmax(LOGITS / 2.0), atol=1e-6)
    assert np.allclose(off.probabilities, softmax(LOGITS), atol=1e-6)
    # T = 2 > 1 flattens: the top class keeps its place and loses confidence.
    assert (on.probabilities.argmax(1) == off.probabilities.argmax(1)).all()
    assert on.probabilities[0].max() < off.probabilities[0].max()


def test_the_flag_is_the_cards_energy_rule_whatever_the_calibration_setting(calibrated_card):
    expected = torch.logsumexp(torch.from_numpy(LOGITS), dim=1).numpy()
    for calibrated in (True, False):
        output = assess_logits(LOGITS, calibrated_card, calibrated=calibrated)
        assert np.allclose(output.ood_scores, expected, atol=1e-5)
        assert output.in_distribution.tolist() == [True, False]
