"""The names of the networks the project trains and serves, and the default one, without torch.

``--arch``, ``POST /train`` and a model card's ``architecture`` use these names; ``model/architectures.py`` maps
each to its builder (kept as its owner wrote it, so it lists them again: tests/model/test_architecture_names.py
checks that the two agree, in order). They stand apart from the builders, which import torch, so that the
training parameters (``training/config.py``) offer them to the job API of the control plane, which loads no
model and is restarted beside the serving process (``benchmarks/control_start.py``).
"""

ARCHITECTURES: tuple[str, ...] = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",  # ImageNet-width, CIFAR stem (model.resnet)
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",  # He et al.'s thin CIFAR ResNets (model.cifar_resnet)
    "fastcnn",  # the CPU recipe's network (model.fastcnn)
)
DEFAULT_ARCHITECTURE = "resnet50"
