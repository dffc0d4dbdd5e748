import torch
from torch import nn

from model.labels import CLASS_NAMES
from training.data import ImageSet
from training.evaluate import evaluate
from training.run import autocast_for


class _LeftOrRight(nn.Module):
    """Predicts class 0 when the left half of the image is brighter, class 1 otherwise: flip-sensitive."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        left, right = images[..., :16].mean((1, 2, 3)), images[..., 16:].mean((1, 2, 3))
        logits = torch.full((len(images), 10), -1.0)
        logits[:, 0], logits[:, 1] = left - right, right - left
        return logits


def _data() -> ImageSet:
    images = torch.zeros(30, 3, 32, 32, dtype=torch.uint8)
    images[:20, ..., :16] = 200          # bright on the left
    images[20:, ..., 16:] = 200          # bright on the right
    labels = torch.tensor([0] * 10 + [1] * 10 + [1] * 10)
    return ImageSet(images, labels)


def test_accuracy_and_per_class_accuracy_come_from_the_confusion_matrix():
    result = evaluate(_LeftOrRight(), _data(), tta=False, autocast=autocast_for(torch.device("cpu")))
    assert result.count == 30
    assert result.confusion[0, 0] == 10 and result.confusion[1, 0] == 10 and result.confusion[1, 1] == 10
    assert result.accuracy == round(20 / 30, 6)
    assert result.per_class_accuracy[CLASS_NAMES[0]] == 1.0
    assert result.per_class_accuracy[CLASS_NAMES[1]] == 0.5
    assert result.accuracy_tta is None


def test_flip_tta_averages_the_image_and_its_mirror():
    # The sum of a left/right-antisymmetric model's logits over an image and its mirror is a tie, which
    # argmax breaks towards class 0: TTA changes the answers, so it really ran on the mirrored images.
    result = evaluate(_LeftOrRight(), _data(), tta=True, autocast=autocast_for(torch.device("cpu")))
    assert result.accuracy == round(20 / 30, 6)
    assert result.confusion_tta[:, 0].sum() == 30
    assert result.accuracy_tta == round(10 / 30, 6)
