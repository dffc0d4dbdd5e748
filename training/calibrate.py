"""`python -m training.calibrate`: fit the temperature and the OOD rule of an existing checkpoint, after the fact.

    python -m training.calibrate --weights weights/fastcnn --data-dir data --skip-integrity-check
    python -m training.calibrate --weights runs/cpu/checkpoint --data-dir data --out-dir runs/cpu

The same fit a training run ends with (``training.trust``), on the same holdout split the checkpoint's card
describes: ``card.training``'s ``train_limit``, ``holdout`` and ``holdout_from`` pick the images (the last, or
first, ``holdout`` of the first ``train_limit`` training images), so the images the network never trained on are
the ones fitted on; the OOD rule's feature statistics (``training.ood_features``) are fitted on the other ones
and written as ``ood_features.safetensors`` next to the weights when a feature rule wins;
``--data-dir`` may name another copy of CIFAR-10. Only ``card.json`` is rewritten (atomically: a temporary
file, then a rename); the weights, and so their SHA-256 and the model version, stay as they are. With
``--out-dir`` the reliability diagram and a "calibration" metrics record are written there too.

Exit codes as ``python -m training``: 0 done, 2 usage error, 1 an expected failure, in one ``error:`` line.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from model.card import CheckpointError, ModelCard, checkpoint_files, file_sha256, write_card
from model.checkpoint import load_checkpoint
from training.cli import OneLineErrorParser
from training.data import DatasetError, load_cifar10
from training.devices import DEVICE_NAMES, parse_device_name
from training.distributed import DeviceError, resolve_device
from training.layout import METRICS_FILE, RELIABILITY_FILE
from training.metrics import MetricsLog
from training.plots import plot_reliability
from training.precision import resolve_precision
from training.provenance import git_commit
from training.run import evaluation_autocast
from training.trust import (
    calibration_line,
    calibration_record,
    fit_trust,
    holdout_description,
    write_ood_statistics,
)


class CalibrationError(RuntimeError):
    """The checkpoint cannot be calibrated as it is; the message says why and what to do."""


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m training.calibrate", description=__doc__.split("\n\n")[0],
                     epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True,
                        help="checkpoint directory (model.safetensors + card.json); its card.json is rewritten")
    parser.add_argument("--data-dir", type=Path, required=True, help="folder that holds cifar-10-batches-py")
    parser.add_argument("--skip-integrity-check", action="store_true",
                        help="skip torchvision's MD5 check, for a copy of CIFAR-10 that is not byte-identical to "
                             "torchvision's download (as in `python -m training`)")
    parser.add_argument("--test-limit", type=_positive, metavar="N",
                        help="report on only the first N test images (default: all; the fit never uses them)")
    parser.add_argument("--out-dir", type=Path, help="also write reliability.png and a metrics record here")
    parser.add_argument("--device", type=parse_device_name, default="auto", help=f"{DEVICE_NAMES} (default auto)")
    return parser


def _data_digests(provenance: str | None) -> dict[str, str]:
    """The batch files' SHA-256 prefixes a card's data_provenance names (only rebuilt copies have them)."""
    return dict(re.findall(r"(\w+_batch(?:_\d)?)=([0-9a-f]{12})", provenance or ""))


def calibrate_checkpoint(weights: Path, data_dir: Path, *, skip_integrity_check: bool = False,
                         test_limit: int | None = None, device: str = "auto",
                         out_dir: Path | None = None) -> ModelCard:
    """Fit and store ``weights``' calibration; returns the rewritten card."""
    target = resolve_device(device)
    checkpoint = load_checkpoint(weights, target)  # verifies the weights against the card's SHA-256
    card = checkpoint.card
    holdout, train_limit = card.training.get("holdout", 0), card.training.get("train_limit")
    if not holdout:
        raise CalibrationError(f"{weights}'s card.training has no holdout: it may have trained on every training "
                               "image, and the test set is never fitted on; retrain with --holdout N")
    data = load_cifar10(data_dir, skip_integrity_check=skip_integrity_check, train_limit=train_limit,
                        test_limit=test_limit, holdout=holdout, holdout_from=card.training.get("holdout_from", "last"))
    trained_on, ours = _data_digests(card.data_provenance), _data_digests(data.provenance)
    if trained_on and ours and trained_on != ours:
        print(f"warning: the batch files in {data_dir} are not the bytes {weights} was trained from "
              f"({card.data_provenance}); the holdout is the right one only if they hold the same images in "
              "the same order", file=sys.stderr)
    autocast = evaluation_autocast(target, resolve_precision("auto", target))
    assert data.holdout is not None  # holdout >= 1 was checked above
    fit = fit_trust(checkpoint.model, data.holdout, data.test, device=target, autocast=autocast,
                    git_commit=git_commit(), fitted_on=holdout_description(data.holdout_start, holdout),
                    train=data.train)
    weights_path, card_path = checkpoint_files(weights)
    if file_sha256(weights_path) != card.weights_sha256:
        raise CalibrationError(f"{weights_path} changed while it was being calibrated; run again")
    write_ood_statistics(fit, card_path.parent)  # before the card that names it
    calibrated = ModelCard.model_validate({**card.model_dump(), "calibration": fit.calibration.model_dump()})
    write_card(calibrated, card_path)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_reliability(fit.test_before, fit.test_after, fit.calibration.temperature, out_dir / RELIABILITY_FILE)
        log = MetricsLog(out_dir / METRICS_FILE)
        log.write("calibration", weights=str(weights), model_version=card.version, data_dir=str(data_dir),
                  **calibration_record(fit.calibration))
        log.close()
    return calibrated


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        card = calibrate_checkpoint(args.weights, args.data_dir, skip_integrity_check=args.skip_integrity_check,
                                    test_limit=args.test_limit, device=args.device, out_dir=args.out_dir)
    except (CalibrationError, CheckpointError, DatasetError, DeviceError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    assert card.calibration is not None  # calibrate_checkpoint always sets it
    print(f"{args.weights}: {card.version}, {card.calibration.fitted_on}")
    print(calibration_line(calibration_record(card.calibration)["calibration"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
