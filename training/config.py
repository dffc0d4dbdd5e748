"""The training configuration: one frozen dataclass, the command line that fills it, and RUN/config.json.

Every default below is the recipe we expect to reach >= 95 % on one H100 fastest; the README's "Training" section
gives the reasoning. Validation happens here, at the boundary: a bad option exits with code 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, NoReturn, Sequence

from model.architectures import ARCHITECTURES, DEFAULT_ARCHITECTURE
from training.precision import PRECISIONS

CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
# Goyal et al. 2017 (arXiv:1706.02677): scale the learning rate linearly with the batch. 0.1 per 128 images is
# the classic CIFAR ResNet rate (He et al. 2015), which gives 0.4 at the default batch of 512.
LR_PER_128_IMAGES = 0.1


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides what a run computes; saved in RUN/config.json and in the model card."""

    data_dir: str
    recipe: Literal["gpu", "cpu"] = "gpu"  # whose defaults filled the fields below (RECIPES)
    download: bool = False
    skip_integrity_check: bool = False
    train_limit: int | None = None          # use only the first N training images (smoke runs)
    test_limit: int | None = None           # use only the first N test images (smoke runs)
    holdout: int = 0                        # last N training images kept out as a validation split
    arch: str = DEFAULT_ARCHITECTURE
    zero_init_residual: bool = True         # each block starts as the identity (Goyal et al. 2017, 5.1)
    epochs: int = 35                        # ~136 s of ResNet-50 at ~100 TFLOP/s: the README's FLOP budget
    batch_size: int = 512                   # global: split across GPUs under torchrun
    lr: float | None = None                 # peak; None resolves to LR_PER_128_IMAGES * batch_size / 128
    momentum: float = 0.9                   # Nesterov
    weight_decay: float = 5e-4              # conv and linear weights only, never BN or biases
    norm_lr_scale: float = 1.0              # multiple of the rate for BatchNorm shifts/scales and biases
    label_smoothing: float = 0.1            # Szegedy et al. 2016; also calms the high peak rate
    warmup_epochs: float = 2.0              # linear warm-up from ~0 to the peak rate
    lr_decay: Literal["linear", "cosine"] = "linear"  # to exactly zero at the last step
    ema: bool = False                       # decay-to-zero already averages the last weights
    ema_decay: float = 0.999                # per step
    tta: bool = True                        # also report accuracy with horizontal-flip TTA
    cutout: int = 0                         # side of the cut-out square in pixels; 0 = off
    compile: bool = False                   # costs more than it saves at a ~2.5-minute budget (README)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 on CUDA and on CPUs with native bf16
    device: str = "auto"                    # auto = cuda when available; under torchrun cuda:LOCAL_RANK
    seed: int = 0
    deterministic: bool = False             # deterministic kernels only, and no cuDNN autotuning
    eval_every: int = 0                     # evaluate every N epochs as well as at the end; 0 = end only
    checkpoint_every: int = 10              # write state.pt every N epochs (and always at the end)
    plots: bool = True
    verify_backends: bool = True            # measure the inference backends at the end (training.verify_backends)
    weights_dtype: Literal["float32", "float16"] = "float32"

    def __post_init__(self) -> None:
        if self.lr is None:
            object.__setattr__(self, "lr", LR_PER_128_IMAGES * self.batch_size / 128)

    @property
    def peak_lr(self) -> float:
        assert self.lr is not None  # resolved in __post_init__
        return self.lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Command:
    """What this process does: start a run, resume one, or evaluate a checkpoint."""

    config: TrainingConfig
    run_dir: Path | None
    resume: bool = False
    eval_only: bool = False
    weights: Path | None = None


# What --recipe changes from the defaults above (the GPU recipe). The CPU recipe is the one measured to give
# the most accuracy from about an hour on a 2-core CPU with native bf16 (README, "CPU recipe"); its holdout
# is what the recipe was tuned on. Options given on the command line override a recipe's values.
RECIPES: dict[str, dict[str, Any]] = {
    "gpu": {},
    "cpu": {
        "arch": "fastcnn",
        "epochs": 26,
        "batch_size": 512,
        "lr": 0.5,
        "weight_decay": 1.3e-3,
        "norm_lr_scale": 64.0,
        "label_smoothing": 0.2,
        "warmup_epochs": 4.0,
        "holdout": 2500,
        "cutout": 8,
        "checkpoint_every": 2,
    },
}


class ConfigError(ValueError):
    """RUN/config.json cannot be used; the message says why."""


DEFAULTS = TrainingConfig(data_dir="")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr, starting with ``error:``, and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def _number(kind: type, minimum: float, *, inclusive: bool = True, maximum: float | None = None):
    bound = f">= {minimum}" if inclusive else f"> {minimum}"
    if maximum is not None:
        bound += f" and < {maximum}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}") from None
        low_ok = value >= minimum if inclusive else value > minimum
        if not low_ok or (maximum is not None and value >= maximum):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def parse_device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    parser = OneLineErrorParser(
        prog="python -m training",
        description="Train a ResNet on CIFAR-10 (data on the GPU, bf16, SGD+Nesterov, warm-up then decay to "
                    "zero), or evaluate a checkpoint. Writes config.json, metrics.jsonl, state.pt, checkpoint/ "
                    "and PNG plots into --run-dir.",
        epilog="Examples:\n"
               "  python -m training --data-dir data --run-dir runs/r50\n"
               "  python -m training --resume --run-dir runs/r50\n"
               "  python -m training --eval-only --weights runs/r50/checkpoint --data-dir data\n"
               "  torchrun --standalone --nproc-per-node 8 -m training --data-dir data --run-dir runs/r50",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument("--run-dir", type=Path, help="directory for config.json, metrics.jsonl, state.pt, "
                     "checkpoint/ and plots (required, except with --eval-only)")
    run.add_argument("--resume", action="store_true", help="continue the stopped run in --run-dir with the "
                     "configuration stored in its config.json; options that differ from it are refused")
    run.add_argument("--eval-only", action="store_true", help="evaluate --weights on the test set and exit")
    run.add_argument("--weights", type=Path, help="checkpoint directory (model.safetensors + card.json) "
                     "for --eval-only")
    run.add_argument("--checkpoint-every", type=_number(int, 1), default=d.checkpoint_every, metavar="N",
                     help="write state.pt every N epochs, for --resume; always after the last (default %(default)s)")
    run.add_argument("--eval-every", type=_number(int, 0), default=d.eval_every, metavar="N",
                     help="also evaluate test (and holdout) accuracy every N epochs; 0 = only after the last "
                          "epoch, which is the only accuracy reported (default %(default)s)")
    run.add_argument("--plots", action=argparse.BooleanOptionalAction, default=d.plots,
                     help="write loss/accuracy curves, a confusion matrix and a prediction grid as PNG "
                          "(default: on)")
    run.add_argument("--verify-backends", action=argparse.BooleanOptionalAction, default=d.verify_backends,
                     help="after the last epoch, measure every inference backend of this machine on the test "
                          "set and write backends-<device>.json and calibration.safetensors into the "
                          "checkpoint, as `python -m training.verify_backends` does; skipped with "
                          "--test-limit, since a partial test set verifies nothing (default: on)")
    run.add_argument("--weights-dtype", choices=("float32", "float16"), default=d.weights_dtype,
                     help="dtype of the saved model.safetensors (default %(default)s)")

    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", help="folder that holds cifar-10-batches-py (required, except with "
                      "--resume, which uses the run's)")
    data.add_argument("--download", action="store_true", help="fetch CIFAR-10 into --data-dir if absent "
                      "(needs the internet)")
    data.add_argument("--skip-integrity-check", action="store_true",
                      help="skip torchvision's MD5 check of the batch files. Needed for rebuilt copies such "
                           "as ../shared/cifar10, whose pickles hold the same images and labels in different "
                           "bytes; without it they are refused as corrupt")
    data.add_argument("--train-limit", type=_number(int, 1), metavar="N",
                      help="use only the first N training images (smoke runs; default: all)")
    data.add_argument("--test-limit", type=_number(int, 1), metavar="N",
                      help="use only the first N test images (smoke runs; default: all)")
    data.add_argument("--holdout", type=_number(int, 0), default=d.holdout, metavar="N",
                      help="keep the last N training images out of training and report accuracy on them as "
                           "validation accuracy, for tuning without touching the test set (default %(default)s)")

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--recipe", choices=tuple(RECIPES), default=d.recipe,
                        help="the set of defaults to start from: gpu (ResNet-50, about 2.5 min on an H100) or "
                             "cpu (fastcnn, about an hour on 2 CPU cores with native bf16); the options below "
                             "override it (default %(default)s)")
    recipe.add_argument("--arch", choices=ARCHITECTURES, default=d.arch, help="network (default %(default)s)")
    recipe.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction,
                        default=d.zero_init_residual,
                        help="start each residual block as the identity (default: on)")
    recipe.add_argument("--epochs", type=_number(int, 1), default=d.epochs,
                        help="training epochs (default %(default)s)")
    recipe.add_argument("--batch-size", type=_number(int, 2), default=d.batch_size,
                        help="global batch, split evenly across GPUs (default %(default)s)")
    recipe.add_argument("--lr", type=_number(float, 0, inclusive=False),
                        help=f"peak learning rate (default: the recipe's; for gpu {LR_PER_128_IMAGES} per 128 "
                             f"images of --batch-size, i.e. {d.peak_lr:g} at {d.batch_size}; for cpu "
                             f"{RECIPES['cpu']['lr']:g})")
    recipe.add_argument("--momentum", type=_number(float, 0, maximum=1), default=d.momentum,
                        help="Nesterov momentum (default %(default)s)")
    recipe.add_argument("--weight-decay", type=_number(float, 0), default=d.weight_decay,
                        help="L2 on conv and linear weights; BN parameters and biases get none "
                             "(default %(default)s)")
    recipe.add_argument("--norm-lr-scale", type=_number(float, 0, inclusive=False), default=d.norm_lr_scale,
                        help="multiple of the learning rate for BatchNorm parameters and biases "
                             "(default %(default)s)")
    recipe.add_argument("--label-smoothing", type=_number(float, 0, maximum=1), default=d.label_smoothing,
                        help="share of each target's probability spread evenly over all classes "
                             "(default %(default)s)")
    recipe.add_argument("--warmup-epochs", type=_number(float, 0), default=d.warmup_epochs,
                        help="linear warm-up length, may be fractional (default %(default)s)")
    recipe.add_argument("--lr-decay", choices=("linear", "cosine"), default=d.lr_decay,
                        help="shape of the decay from the peak to zero after warm-up (default %(default)s)")
    recipe.add_argument("--ema", action=argparse.BooleanOptionalAction, default=d.ema,
                        help="evaluate and save an exponential moving average of the weights (default: off)")
    recipe.add_argument("--ema-decay", type=_number(float, 0, inclusive=False, maximum=1), default=d.ema_decay,
                        help="EMA decay per step (default %(default)s)")
    recipe.add_argument("--cutout", type=_number(int, 0), default=d.cutout, metavar="N",
                        help="zero a random NxN square of each training image (DeVries & Taylor 2017); "
                             "0 = off (default %(default)s)")
    recipe.add_argument("--tta", action=argparse.BooleanOptionalAction, default=d.tta,
                        help="also report accuracy averaged over the image and its mirror (default: on)")
    recipe.add_argument("--seed", type=int, default=d.seed,
                        help="seeds the initial weights, the shuffle and the augmentation (default %(default)s)")

    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--device", type=parse_device, default=d.device,
                          help="auto, cpu, cuda or cuda:N; auto picks cuda when present (default %(default)s)")
    hardware.add_argument("--compile", action="store_true", help="torch.compile the training step")
    hardware.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                          help="number format of the training step: bf16 autocast or float32; auto = bf16 on "
                               "CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), else fp32 "
                               "(default %(default)s)")
    hardware.add_argument("--deterministic", action="store_true",
                          help="deterministic kernels only, no cuDNN autotuning: slower, bit-reproducible")
    return parser


_CONFIG_FIELDS = tuple(f.name for f in fields(TrainingConfig))


def parse_command(argv: Sequence[str] | None = None) -> Command:
    parser = build_parser()
    # A first pass finds --recipe alone, so that its values become the defaults the second pass fills in
    # (and that --help shows).
    first_pass = OneLineErrorParser(prog=parser.prog, add_help=False)
    first_pass.add_argument("--recipe", choices=tuple(RECIPES), default=DEFAULTS.recipe)
    chosen, _ = first_pass.parse_known_args(argv)
    parser.set_defaults(**RECIPES[chosen.recipe])
    args = parser.parse_args(argv)
    if args.eval_only != (args.weights is not None):
        parser.error("--eval-only and --weights PATH go together: --eval-only --weights RUN/checkpoint")
    if args.weights is not None and not args.weights.exists():
        parser.error(f"--weights {args.weights} does not exist; give a checkpoint directory such as RUN/checkpoint")
    if args.run_dir is None and not args.eval_only:
        parser.error("--run-dir is required: the directory this run writes into (e.g. runs/r50)")
    if args.resume:
        config = _resumed_config(parser, args)
    else:
        if args.data_dir is None:
            parser.error("--data-dir is required: the folder that holds cifar-10-batches-py")
        if not args.eval_only and (args.run_dir / STATE_FILE).exists():
            parser.error(f"{args.run_dir} already holds a run; add --resume to continue it, "
                         "or choose another --run-dir")
        config = TrainingConfig(**{name: getattr(args, name) for name in _CONFIG_FIELDS})
    if config.warmup_epochs > config.epochs:
        parser.error(f"--warmup-epochs {config.warmup_epochs:g} is longer than --epochs {config.epochs}")
    if config.cutout > 32:
        parser.error(f"--cutout {config.cutout} is larger than the 32-pixel image")
    if not config.download and not Path(config.data_dir).is_dir():
        parser.error(f"--data-dir {config.data_dir} does not exist; point it at the folder that holds "
                     "cifar-10-batches-py, or add --download to fetch CIFAR-10 there")
    return Command(config=config, run_dir=args.run_dir, resume=args.resume, eval_only=args.eval_only,
                   weights=args.weights)


def _resumed_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TrainingConfig:
    try:
        config = read_config(args.run_dir)
    except ConfigError as error:
        parser.error(f"cannot resume: {error}")
    for name in _CONFIG_FIELDS:
        given, default = getattr(args, name), parser.get_default(name)
        if given != default and given != getattr(config, name):
            option = "--" + name.replace("_", "-")
            parser.error(f"{option} {given} differs from {getattr(config, name)} in "
                         f"{args.run_dir / CONFIG_FILE}: a resumed run keeps its configuration; drop the "
                         "option, or start a new --run-dir")
    return config


def write_config(run_dir: Path, config: TrainingConfig, **provenance: Any) -> None:
    """RUN/config.json: the resolved configuration plus where it ran (git commit, torch version)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"config": config.to_dict(), **provenance}, indent=2) + "\n")
    os.replace(temporary, path)


def read_config(run_dir: Path) -> TrainingConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; --resume needs the --run-dir of an earlier run")
    try:
        stored = json.loads(path.read_text())["config"]
        return TrainingConfig(**stored)
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConfigError(f"{path} is not a configuration written by `python -m training`: {error}") from None
