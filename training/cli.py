"""The command line of ``python -m training``, built from the parameters in training/config.py, and its
inverse (``command_line``) for a process that starts training (the service's job runner).

Validation happens here, at the boundary: a bad option exits with code 2 and one line, ``error: ...``.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

from training.config import (
    DEFAULTS,
    LR_PER_128_IMAGES,
    RECIPES,
    ConfigError,
    Option,
    TrainingConfig,
    flag,
    options,
    problems,
    read_config,
)
from training.layout import CONFIG_FILE, STATE_FILE

_GROUPS = ("run", "data", "recipe", "hardware")
_CONFIG_FIELDS = tuple(entry.name for entry in fields(TrainingConfig))


@dataclass(frozen=True)
class Command:
    """What this process does: start a run, resume one, or evaluate a checkpoint."""

    config: TrainingConfig
    run_dir: Path | None
    resume: bool = False
    eval_only: bool = False
    weights: Path | None = None


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr, starting with ``error:``, and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m training",
        description="Train a ResNet on CIFAR-10 (data on the GPU, bf16, SGD+Nesterov, warm-up then decay to "
                    "zero), or evaluate a checkpoint. Writes config.json, metrics.jsonl, state.pt, checkpoint/ "
                    "and PNG plots into --run-dir.",
        epilog="Examples:\n"
               "  python -m training --data-dir data --run-dir runs/r50\n"
               "  python -m training --recipe cpu --data-dir data --run-dir runs/cpu\n"
               "  python -m training --resume --run-dir runs/r50\n"
               "  python -m training --eval-only --weights runs/r50/checkpoint --data-dir data\n"
               "  torchrun --standalone --nproc-per-node 8 -m training --data-dir data --run-dir runs/r50",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups = {name: parser.add_argument_group(name) for name in _GROUPS}
    run = groups["run"]
    run.add_argument("--run-dir", type=Path, help="directory for config.json, metrics.jsonl, state.pt, "
                     "checkpoint/ and plots (required, except with --eval-only)")
    run.add_argument("--resume", action="store_true", help="continue the stopped run in --run-dir with the "
                     "configuration stored in its config.json; options that differ from it are refused")
    run.add_argument("--eval-only", action="store_true", help="evaluate --weights on the test set and exit")
    run.add_argument("--weights", type=Path, help="checkpoint directory (model.safetensors + card.json) "
                     "for --eval-only")
    hints = typing.get_type_hints(TrainingConfig)
    for name, default, how in options():
        groups[how.group].add_argument(flag(name), **_argument(name, default, how, hints[name]))
    return parser


def _argument(name: str, default: Any, how: Option, annotation: Any) -> dict[str, Any]:
    """add_argument's keywords for one field."""
    if how.switch == "on-off":
        return {"action": argparse.BooleanOptionalAction, "default": default,
                "help": f"{how.help} (default: {'on' if default else 'off'})"}
    if how.switch == "flag":
        return {"action": "store_true", "help": how.help}
    keywords: dict[str, Any] = {"default": None if default is MISSING else default, "metavar": how.metavar}
    if how.choices is not None:
        keywords["choices"] = how.choices
    else:
        keywords["type"] = _parse(_value_type(annotation), how)
    if default is MISSING:
        keywords["help"] = how.help
    elif name == "lr":  # its default depends on the recipe and on the batch size
        keywords["help"] = (f"{how.help} (default: the recipe's; for gpu {LR_PER_128_IMAGES} per 128 images of "
                            f"--batch-size, i.e. {DEFAULTS.peak_lr:g} at {DEFAULTS.batch_size}; for cpu "
                            f"{RECIPES['cpu']['lr']:g})")
    elif default is None:
        keywords["help"] = how.help
    else:
        keywords["help"] = f"{how.help} (default %(default)s)"
    return keywords


def _value_type(annotation: Any) -> type:
    """``int`` for ``int | None``, and so on."""
    if isinstance(annotation, types.UnionType):
        return next(arm for arm in typing.get_args(annotation) if arm is not type(None))
    return annotation


def _parse(kind: type, how: Option) -> Callable[[str], Any]:
    if how.check is not None:
        def checked(text: str) -> str:
            if not how.check or not how.check(text):
                raise argparse.ArgumentTypeError(f"must be {how.check_hint}, got {text!r}")
            return text

        return checked
    bounds = _bounds(how)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} {bounds}, got {text!r}") from None
        if not _within(value, how):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


def _bounds(how: Option) -> str:
    parts = [f">= {how.minimum}" if how.minimum is not None else "", f"> {how.above}" if how.above is not None else "",
             f"<= {how.maximum}" if how.maximum is not None else "", f"< {how.below}" if how.below is not None else ""]
    return " and ".join(part for part in parts if part) or "(any value)"


def _within(value: float, how: Option) -> bool:
    return ((how.minimum is None or value >= how.minimum) and (how.above is None or value > how.above)
            and (how.maximum is None or value <= how.maximum) and (how.below is None or value < how.below))


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
    for problem in problems(config.to_dict()).values():
        parser.error(problem)
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
            parser.error(f"{flag(name)} {given} differs from {getattr(config, name)} in "
                         f"{args.run_dir / CONFIG_FILE}: a resumed run keeps its configuration; drop the "
                         "option, or start a new --run-dir")
    return config


def command_line(values: Mapping[str, Any]) -> list[str]:
    """The options that make ``parse_command`` fill these fields with these values (a ``None`` is left to
    its default): the command line's inverse, for the service's job runner."""
    argv: list[str] = []
    for name, _, how in options():
        if name not in values:
            continue
        value = values[name]
        if how.switch == "on-off":
            argv.append(flag(name) if value else "--no-" + flag(name)[2:])
        elif how.switch == "flag":
            argv += [flag(name)] if value else []
        elif value is not None:
            argv += [flag(name), str(value)]
    return argv
