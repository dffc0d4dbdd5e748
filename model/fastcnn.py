"""fastcnn: a small convolutional network that reaches high CIFAR-10 accuracy in few epochs.

The CIFAR ResNets of ``model.cifar_resnet`` spend most of a CPU's time on 16- and 32-channel convolutions,
which use wide SIMD units poorly; this network spends a similar budget on fewer, wider layers at lower
resolution and, per the measurements in the README's "CPU recipe" section, trains to a higher accuracy per
minute on the project's 2-core CPU. Its design follows the ideas of Page 2018 ("How to train your ResNet")
and Jordan 2024 (arXiv:2404.00498, "94 % on CIFAR-10 in 3.29 seconds on a single GPU"):

- the stem is a 2x2 convolution whose filters whiten the training set's 2x2 patches (the eigenvectors of
  their covariance, scaled by 1/sqrt(eigenvalue), with their negatives so that the GELU after it loses
  nothing); they are set once from the data (``initialize_from_data``) and never trained;
- three stages of conv3x3 -> max-pool 2x2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU at 64, 256
  and 256 channels. Pooling before the normalisation does that work on a quarter of the pixels;
- BatchNorm learns a shift but no scale: the next convolution absorbs any scale, and a scale fixed at one
  keeps each normalisation's multiplier positive, so it commutes with the max-pool before it and can be
  folded into the convolution for inference;
- each convolution starts with the identity on its first channels (Dirac initialisation), an implicit
  residual connection that makes the plain stack train as easily as a ResNet;
- global max-pooling, a linear layer without bias, and logits scaled by 1/9, which keeps the initial
  softmax near uniform.
"""

from __future__ import annotations

import torch
from torch import nn

from model.labels import NUM_CLASSES
from model.staged import StagedNetwork

STAGE_WIDTHS = (64, 256, 256)
WHITENING_KERNEL = 2
WHITENING_WIDTH = 2 * 3 * WHITENING_KERNEL**2  # every eigenvector of the 12-dimensional patch space, and its negative
LOGIT_SCALE = 1 / 9
# Keeps the whitening finite for directions with almost no variance (JPEG-smoothed images have some).
WHITENING_EPS = 5e-4


def shift_only_batchnorm(channels: int) -> nn.BatchNorm2d:
    """A BatchNorm2d whose scale stays at one (not trained); only the shift is learned. A plain BatchNorm2d
    rather than a subclass, so that torch.fx (int8 quantization) treats it as the leaf module it is."""
    norm = nn.BatchNorm2d(channels)
    norm.weight.requires_grad_(False)
    return norm


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(in_channels, out_channels)])
    return conv


class ConvStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = shift_only_batchnorm(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = shift_only_batchnorm(out_channels)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.bn1(self.pool(self.conv1(x))))
        return self.activation(self.bn2(self.conv2(x)))


class FastCNN(StagedNetwork):
    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, WHITENING_WIDTH, WHITENING_KERNEL, bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        self.activation = nn.GELU()
        stages, in_channels = [], WHITENING_WIDTH
        for width in STAGE_WIDTHS:
            stages.append(ConvStage(in_channels, width))
            in_channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes, bias=False)

    @torch.no_grad()
    def initialize_from_data(self, images: torch.Tensor) -> None:
        """Set the whitening filters from normalised training images (N x 3 x 32 x 32; a few thousand do)."""
        patches = images.float().unfold(2, WHITENING_KERNEL, 1).unfold(3, WHITENING_KERNEL, 1)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * WHITENING_KERNEL**2).double()
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors / torch.sqrt(eigenvalues + WHITENING_EPS)).T
        filters = filters.reshape(-1, 3, WHITENING_KERNEL, WHITENING_KERNEL)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))


    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.whiten(x))

    def _rest(self, first: torch.Tensor) -> torch.Tensor:
        """From the first stage's output to the penultimate vector."""
        return torch.flatten(self.pool(self.layer3(self.layer2(first))), 1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features) * LOGIT_SCALE




def build_fastcnn(num_classes: int = NUM_CLASSES, zero_init_residual: bool = False) -> FastCNN:
    """``zero_init_residual`` has no meaning here (no residual branches) and is accepted for a uniform API."""
    return FastCNN(num_classes=num_classes)
