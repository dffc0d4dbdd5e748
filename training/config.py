"""The training parameters, in one place: every field of ``TrainingConfig`` carries its default, its help, its
bounds and the kind of flag that sets it. The command line (training/cli.py) and the service's job API
(app/control/jobs/schemas.py) are both derived from it; nothing restates a default or a bound.

Every default below is the recipe we expect to reach >= 95 % on one H100 fastest; ``RECIPES`` holds what
``--recipe cpu`` changes. docs/training.md gives the reasoning. The resolved configuration is
saved whole in RUN/config.json and in the model card.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from model.architecture_names import ARCHITECTURES, DEFAULT_ARCHITECTURE
from model.durable import write_atomically
from model.labels import INPUT_SIZE
from training.devices import DEVICE_NAMES, is_device_name
from training.layout import CONFIG_FILE

# --precision's choices; training/precision.py resolves auto. Here, with the other parameters' bounds, rather than
# there beside torch, so that the job API offers them without importing it.
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")

# Goyal et al. 2017 (arXiv:1706.02677): scale the learning rate linearly with the batch. 0.1 per 128 images is
# the classic CIFAR ResNet rate (He et al. 2015), which gives 0.4 at the default batch of 512.
LR_PER_128_IMAGES = 0.1

HOLDOUT_ENDS = ("last", "first")

# What --recipe changes from the defaults below (the GPU recipe). The CPU recipe is the one measured to give
# the most accuracy from about an hour on a 2-core CPU with native bf16 (docs/training.md, "The CPU recipe,
# and why"); its holdout is what the recipe was tuned on. Options given on the command line (or in a job)
# override a recipe's values.
RECIPES: dict[str, dict[str, Any]] = {
    "gpu": {},
    "cpu": {
        "arch": "fastcnn",
        "epochs": 28,
        "batch_size": 512,
        "lr": 0.5,
        "weight_decay": 1.3e-3,
        "norm_lr_scale": 64.0,
        "label_smoothing": 0.2,
        "warmup_epochs": 4.0,
        "holdout": 2500,
        "cutout": 8,
        "photo_augment": 0.3,
        "checkpoint_every": 2,
    },
}


@dataclass(frozen=True)
class Option:
    """How a field is set: its help (also the job API's description), its group on ``--help``, its bounds
    (``minimum``/``maximum`` inclusive, ``above``/``below`` exclusive), its choices, and for a boolean whether
    the flag is ``--x``/``--no-x`` (``on-off``) or ``--x`` alone (``flag``). ``job=False``: the service sets
    it for its jobs (where the data is, which device), so the job API does not offer it."""

    help: str
    group: Literal["run", "data", "recipe", "hardware"]
    minimum: float | None = None
    above: float | None = None
    maximum: float | None = None
    below: float | None = None
    choices: tuple[str, ...] | None = None
    switch: Literal["on-off", "flag"] | None = None
    check: Callable[[str], bool] | None = None  # a text option's syntax; ``check_hint`` says what is accepted
    check_hint: str = ""
    metavar: str | None = None
    job: bool = True


def option(default: Any = MISSING, /, **how: Any) -> Any:
    """A ``TrainingConfig`` field: its default and its ``Option``."""
    return field(default=default, metadata={"option": Option(**how)})


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides what a run computes; saved in RUN/config.json and in the model card."""

    data_dir: str = option(group="data", job=False, help="folder that holds cifar-10-batches-py (required, "
                           "except with --resume, which uses the run's)")
    recipe: Literal["gpu", "cpu"] = option(
        "gpu", group="recipe", choices=tuple(RECIPES),
        help="the set of defaults to start from: gpu (ResNet-50, about 2.5 min on an H100) or cpu (fastcnn, "
             "about an hour on 2 CPU cores with native bf16); the options below override it")
    download: bool = option(False, group="data", switch="flag", job=False,
                            help="fetch CIFAR-10 into --data-dir if absent (needs the internet)")
    skip_integrity_check: bool = option(
        False, group="data", switch="flag", job=False,
        help="skip torchvision's MD5 check of the batch files, for a copy of CIFAR-10 that is not byte-identical "
             "to torchvision's download (the same images and labels, pickled again); without it such a copy is "
             "refused as corrupt. The files are then read through an allow-list that refuses any pickle a "
             "CIFAR-10 batch could not be")
    train_limit: int | None = option(None, group="data", minimum=1, metavar="N",
                                     help="use only the first N training images (smoke runs; default: all)")
    test_limit: int | None = option(None, group="data", minimum=1, metavar="N",
                                    help="use only the first N test images (smoke runs; default: all)")
    holdout: int = option(0, group="data", minimum=0, metavar="N",
                          help="keep the last N training images (or the first: --holdout-from) out of training and "
                               "report accuracy on them as validation accuracy, for tuning without touching the "
                               "test set; the calibration and the out-of-distribution threshold are fitted on them")
    holdout_from: str = option("last", group="data", choices=HOLDOUT_ENDS,
                               help="which end of the training set --holdout takes (both are random samples of "
                                    "CIFAR-10): the one whose images are most like what the service will be "
                                    "sent, since the out-of-distribution threshold is set to keep most of them; "
                                    "in a copy whose first images are lossless and the rest recompressed, the first")
    arch: str = option(DEFAULT_ARCHITECTURE, group="recipe", choices=ARCHITECTURES, help="network")
    zero_init_residual: bool = option(True, group="recipe", switch="on-off",  # Goyal et al. 2017, 5.1
                                      help="start each residual block as the identity")
    epochs: int = option(35, group="recipe", minimum=1, maximum=10_000,  # ~136 s of ResNet-50 at ~100 TFLOP/s
                         help="training epochs")
    batch_size: int = option(512, group="recipe", minimum=2, maximum=65_536,
                             help="global batch, split evenly across GPUs")
    lr: float | None = option(None, group="recipe", above=0, maximum=100,  # None: LR_PER_128_IMAGES per 128
                              help="peak learning rate")
    momentum: float = option(0.9, group="recipe", minimum=0, below=1, help="Nesterov momentum")
    weight_decay: float = option(5e-4, group="recipe", minimum=0, maximum=1,
                                 help="L2 on conv and linear weights; BN parameters and biases get none")
    norm_lr_scale: float = option(1.0, group="recipe", above=0,
                                  help="multiple of the learning rate for BatchNorm parameters and biases")
    label_smoothing: float = option(0.1, group="recipe", minimum=0, below=1,  # Szegedy et al. 2016
                                    help="share of each target's probability spread evenly over all classes")
    warmup_epochs: float = option(2.0, group="recipe", minimum=0,
                                  help="linear warm-up length, may be fractional; at most --epochs")
    lr_decay: Literal["linear", "cosine"] = option("linear", group="recipe", choices=("linear", "cosine"),
                                                   help="shape of the decay from the peak to zero after warm-up")
    ema: bool = option(False, group="recipe", switch="on-off",  # decay-to-zero already averages the last weights
                       help="evaluate and save an exponential moving average of the weights")
    ema_decay: float = option(0.999, group="recipe", above=0, below=1, help="EMA decay per step")
    tta: bool = option(True, group="recipe", switch="on-off",
                       help="also report accuracy averaged over the image and its mirror")
    cutout: int = option(0, group="recipe", minimum=0, maximum=INPUT_SIZE, metavar="N",
                         help="zero a random NxN square of each training image (DeVries & Taylor 2017); 0 = off")
    photo_augment: float = option(0.0, group="recipe", minimum=0, maximum=1, metavar="P",
                                  help="make training images look like photo uploads: each is zoomed in or out "
                                       "with probability P, rescaled down and up with P, greyscale with P/3 "
                                       "(what a photo loses before the service fits it to 32 px); 0 = off")
    compile: bool = option(False, group="hardware", switch="flag",  # costs more than it saves at ~2.5 minutes
                           help="torch.compile the training step")
    precision: Literal["auto", "bf16", "fp32"] = option(
        "auto", group="hardware", choices=PRECISIONS,
        help="number format of the training step: bf16 autocast or float32; auto = bf16 on CUDA and on CPUs "
             "with native bf16 (AVX512-BF16, AMX), else fp32")
    device: str = option("auto", group="hardware", check=is_device_name, check_hint=DEVICE_NAMES, job=False,
                         help="auto, cpu, cuda or cuda:N; auto picks cuda when present (under torchrun, "
                              "cuda:LOCAL_RANK)")
    seed: int = option(0, group="recipe", minimum=0, maximum=2**63 - 1,
                       help="seeds the initial weights, the shuffle and the augmentation")
    deterministic: bool = option(False, group="hardware", switch="flag",
                                 help="deterministic kernels only, no cuDNN autotuning: slower, bit-reproducible")
    eval_every: int = option(0, group="run", minimum=0, metavar="N",
                             help="also evaluate test (and holdout) accuracy every N epochs; 0 = only after the "
                                  "last epoch, which is the only accuracy reported")
    checkpoint_every: int = option(10, group="run", minimum=1, metavar="N",
                                   help="write state.pt every N epochs, for --resume; always after the last")
    plots: bool = option(True, group="run", switch="on-off",
                         help="write loss/accuracy curves, a confusion matrix and a prediction grid as PNG")
    verify_backends: bool = option(True, group="run", switch="on-off",
                                   help="after the last epoch, measure every inference backend of this machine "
                                        "on the test set and write backends-<device>.json and "
                                        "calibration.safetensors into the checkpoint, as `python -m "
                                        "training.verify_backends` does; skipped with --test-limit, since a "
                                        "partial test set verifies nothing")
    weights_dtype: Literal["float32", "float16"] = option("float32", group="run", choices=("float32", "float16"),
                                                          help="dtype of the saved model.safetensors")

    def __post_init__(self) -> None:
        if self.lr is None:
            object.__setattr__(self, "lr", LR_PER_128_IMAGES * self.batch_size / 128)

    @property
    def peak_lr(self) -> float:
        assert self.lr is not None  # resolved in __post_init__
        return self.lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULTS = TrainingConfig(data_dir="")


def options() -> Iterator[tuple[str, Any, Option]]:
    """Every field as (name, default, Option), in declaration order; the default is ``MISSING`` for
    ``data_dir``, which has none."""
    for entry in fields(TrainingConfig):
        yield entry.name, entry.default, entry.metadata["option"]


def recipe_defaults(recipe: str) -> dict[str, Any]:
    """The default of every field under ``recipe``."""
    return {name: default for name, default, _ in options() if default is not MISSING} | RECIPES[recipe]


def flag(name: str) -> str:
    """The command-line spelling of a field: ``warmup_epochs`` -> ``--warmup-epochs``."""
    return "--" + name.replace("_", "-")


def problems(values: Mapping[str, Any], spell: Callable[[str], str] = flag) -> dict[str, str]:
    """What is wrong across fields that each hold an allowed value, by the field to blame; ``spell`` names
    fields in the message (``flag`` for the command line, the field's own name for the job API)."""
    found = {}
    epochs, warmup = values.get("epochs"), values.get("warmup_epochs")
    if epochs is not None and warmup is not None and warmup > epochs:
        found["warmup_epochs"] = (f"{spell('warmup_epochs')} {warmup:g} is longer than {spell('epochs')} "
                                  f"{epochs}; make it at most {epochs}")
    return found


def split_problem(batch_size: int, processes: int, spell: Callable[[str], str] = flag) -> str | None:
    """Why ``batch_size`` cannot be split evenly over ``processes`` (one per GPU under torchrun), or None."""
    if batch_size % processes:
        return (f"{spell('batch_size')} {batch_size} does not split evenly over {processes} processes (one per "
                f"GPU); make it a multiple of {processes}")
    return None


class ConfigError(ValueError):
    """RUN/config.json cannot be used; the message says why."""


def write_config(run_dir: Path, config: TrainingConfig, **provenance: Any) -> None:
    """RUN/config.json: the resolved configuration plus where it ran (git commit, torch version)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    write_atomically(path, json.dumps({"config": config.to_dict(), **provenance}, indent=2) + "\n")


def read_config(run_dir: Path) -> TrainingConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; --resume needs the --run-dir of an earlier run")
    try:
        stored = json.loads(path.read_text())["config"]
        return TrainingConfig(**stored)
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConfigError(f"{path} is not a configuration written by `python -m training`: {error}") from None
