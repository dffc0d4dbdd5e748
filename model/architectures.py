"""Every network the project trains and serves, by the name that ``--arch``, ``POST /train`` and a model
card's ``architecture`` use: the one place that maps a name to a builder."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from model.cifar_resnet import DEPTHS, build_cifar_resnet
from model.fastcnn import build_fastcnn
from model.labels import NUM_CLASSES
from model.resnet import BLOCKS, build_resnet

_BUILDERS: dict[str, Callable[[int, bool], nn.Module]] = {
    # ImageNet-width ResNets with the CIFAR stem (model.resnet): the GPU recipe's family.
    **{name: (lambda classes, zero, name=name: build_resnet(name, classes, zero)) for name in BLOCKS},
    # He et al.'s thin CIFAR ResNets (model.cifar_resnet).
    **{name: (lambda classes, zero, name=name: build_cifar_resnet(name, classes, zero)) for name in DEPTHS},
    # The CPU recipe's network (model.fastcnn).
    "fastcnn": lambda classes, zero: build_fastcnn(classes, zero),
}
ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)
DEFAULT_ARCHITECTURE = "resnet50"


def build_model(
    architecture: str = DEFAULT_ARCHITECTURE,
    num_classes: int = NUM_CLASSES,
    zero_init_residual: bool = False,
) -> nn.Module:
    if architecture not in _BUILDERS:
        raise ValueError(
            f"unknown architecture {architecture!r}; choose one of: {', '.join(ARCHITECTURES)}"
        )
    return _BUILDERS[architecture](num_classes, zero_init_residual)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
