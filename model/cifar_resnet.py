"""The CIFAR-10 ResNets of He et al. 2015 (arXiv:1512.03385, section 4.2): resnet20, 32, 44, 56 and 110.

A 3x3 stem of 16 channels, then three stages of n basic blocks each at 16, 32 and 64 channels on 32x32, 16x16
and 8x8 maps (6n + 2 weighted layers), global average pooling and a 10-way linear layer. These are much
thinner than the ImageNet-width family in ``model.resnet`` (0.27 M parameters for resnet20 against 11 M for
resnet18), which is what lets them train in minutes per epoch on a CPU.

Where a stage halves the resolution and doubles the width, the shortcut is the paper's option A: the input
subsampled with stride 2 and zero-padded to the new width. It has no parameters, so the counts match the
paper's Table 6 (0.27 M for resnet20, 0.85 M for resnet56, 1.7 M for resnet110).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.labels import NUM_CLASSES
from model.staged import StagedNetwork

STAGE_WIDTHS = (16, 32, 64)
DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}  # blocks per stage


class ZeroPadShortcut(nn.Module):
    """Option A: every other pixel in each direction, then zero channels appended up to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        # F.pad pads from the last dimension backwards: (W, W, H, H, C before, C after).
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class CifarBasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride) if changes_shape else nn.Identity()

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(StagedNetwork):
    def __init__(self, blocks_per_stage: int, num_classes: int = NUM_CLASSES,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        first = STAGE_WIDTHS[0]
        self.conv1 = nn.Conv2d(3, first, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(first)
        self.relu = nn.ReLU(inplace=True)
        in_channels, stages = first, []
        for index, width in enumerate(STAGE_WIDTHS):
            blocks = []
            for position in range(blocks_per_stage):
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(CifarBasicBlock(in_channels, width, stride))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            # As in model.resnet: each block starts as the identity (Goyal et al. 2017, section 5.1).
            for module in self.modules():
                if isinstance(module, CifarBasicBlock):
                    nn.init.zeros_(module.last_bn().weight)


    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def _rest(self, first: torch.Tensor) -> torch.Tensor:
        """From the first stage's output to the penultimate vector."""
        return torch.flatten(self.avgpool(self.layer3(self.layer2(first))), 1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)




def build_cifar_resnet(architecture: str, num_classes: int = NUM_CLASSES,
                       zero_init_residual: bool = False) -> CifarResNet:
    return CifarResNet(DEPTHS[architecture], num_classes=num_classes, zero_init_residual=zero_init_residual)
