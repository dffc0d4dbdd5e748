"""Fit what ``model.trust`` applies: the temperature and the OOD rule, on the holdout split only.

Used by the end of a training run (``training.run``) and, after the fact, by ``python -m training.calibrate``.
The test set is only reported on: the ECE and NLL before and after scaling, and the share of test images
the threshold keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.card import Calibration
from model.durable import write_atomically
from model.trust import calibrated_probabilities
from training.calibration import (
    ECE_BINS,
    ReliabilityBins,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
)
from training.data import ImageSet
from training.evaluate import logits_of
from training.ood import SELECTION_IMAGES, SELECTION_SEED, TARGET_TPR, choose_rule, synthetic_sets
from training.ood_features import FIT_IMAGES, choose_feature_rule, fit_subset, outputs_of

NO_HOLDOUT = ("no holdout split (--holdout 0): the temperature and the OOD threshold are fitted on held-out "
              "training images, never the test set, so this checkpoint has no calibration; train with "
              "--holdout N (the cpu recipe keeps 2500) to get one")


@dataclass(frozen=True)
class TrustFit:
    calibration: Calibration
    test_before: ReliabilityBins  # the test set's reliability bins, raw softmax
    test_after: ReliabilityBins   # and with the temperature
    ood_statistics: bytes | None = None  # the feature rule's statistics file; None for a logit rule


def fit_trust(model: nn.Module, holdout: ImageSet, test: ImageSet, *, device: torch.device,
              autocast: Callable[[], AbstractContextManager], fitted_on: str,
              git_commit: str | None = None, train: ImageSet | None = None) -> TrustFit:
    """With ``train`` (the images the network trained on), the OOD rule may read the network's features too
    (``training.ood_features``); without it, only the logits."""
    if train is None or not len(train):
        return _fit_trust(model, holdout, test, device=device, autocast=autocast, fitted_on=fitted_on,
                          git_commit=git_commit)
    chosen = fit_subset(len(train))
    fit_outputs = outputs_of(model, train.images[chosen.to(train.images.device)], device, autocast)
    holdout_outputs = outputs_of(model, holdout.images, device, autocast)
    test_outputs = outputs_of(model, test.images, device, autocast)
    count = min(SELECTION_IMAGES, len(holdout))
    sets = {name: outputs_of(model, images, device, autocast)
            for name, images in synthetic_sets(holdout.images, count, SELECTION_SEED).items()}
    fit = _fit_trust(model, holdout, test, device=device, autocast=autocast, fitted_on=fitted_on,
                     git_commit=git_commit, logits=(holdout_outputs.logits, test_outputs.logits,
                                                    {name: out.logits for name, out in sets.items()}))
    choice = choose_feature_rule(
        fit.calibration.ood, fit_outputs, holdout_outputs, sets, _penultimate_width(model),
        fitted_on=f"{len(chosen)} training images drawn with seed 0 of {len(train)} (at most {FIT_IMAGES})",
        test=test_outputs)
    calibration = fit.calibration.model_copy(update={"ood": choice.rule})
    return TrustFit(calibration, fit.test_before, fit.test_after, choice.statistics_bytes)


def write_ood_statistics(fit: TrustFit, directory: Path) -> None:
    """The feature rule's statistics file, in the checkpoint ``directory``; nothing for a logit rule."""
    rule = fit.calibration.ood.features
    if rule is not None and fit.ood_statistics is not None:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(directory / rule.statistics_file, fit.ood_statistics)


def _penultimate_width(model: nn.Module) -> int:
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no final linear layer named fc to read the feature width of")
    return fc.in_features


def _fit_trust(model: nn.Module, holdout: ImageSet, test: ImageSet, *, device: torch.device,
               autocast: Callable[[], AbstractContextManager], fitted_on: str, git_commit: str | None = None,
               logits: tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None = None) -> TrustFit:
    """The temperature and the logit rule; ``logits``: the holdout's, the test set's and the synthetic sets',
    when the caller computed them already."""
    # As many images per synthetic set as the holdout has, up to SELECTION_IMAGES: enough for an AUROC to a
    # few thousandths, and a small holdout (a smoke run's) stays quick.
    count = min(SELECTION_IMAGES, len(holdout))
    if logits is None:
        holdout_logits = logits_of(model, holdout.images, device, autocast)
        test_logits = logits_of(model, test.images, device, autocast)
        sets = synthetic_sets(holdout.images, count, SELECTION_SEED)
        ood_logits = {name: logits_of(model, images, device, autocast) for name, images in sets.items()}
    else:
        holdout_logits, test_logits, ood_logits = logits
    holdout_labels, test_labels = holdout.labels.cpu(), test.labels.cpu()
    temperature = fit_temperature(holdout_logits, holdout_labels)
    rule = choose_rule(holdout_logits, ood_logits, temperature, test_logits,
                       sets_description=f"{count} images each, seed {SELECTION_SEED}; shuffled pixels of the "
                                        f"holdout's first {count}")
    before = reliability_bins(calibrated_probabilities(test_logits), test_labels, ECE_BINS)
    after = reliability_bins(calibrated_probabilities(test_logits, temperature), test_labels, ECE_BINS)
    calibration = Calibration(
        temperature=temperature, fitted_on=fitted_on, holdout_images=len(holdout), test_images=len(test),
        ece_bins=ECE_BINS, test_ece_before=round(before.ece, 6), test_ece_after=round(after.ece, 6),
        test_nll_before=round(negative_log_likelihood(test_logits, test_labels), 6),
        test_nll_after=round(negative_log_likelihood(test_logits, test_labels, temperature), 6),
        holdout_nll_before=round(negative_log_likelihood(holdout_logits, holdout_labels), 6),
        holdout_nll_after=round(negative_log_likelihood(holdout_logits, holdout_labels, temperature), 6),
        ood=rule, git_commit=git_commit,
    )
    return TrustFit(calibration=calibration, test_before=before, test_after=after)


def holdout_description(first_index: int, count: int) -> str:
    return f"holdout: training images {first_index}-{first_index + count - 1} ({count}), never trained on"


def calibration_record(calibration: Calibration | None) -> dict[str, Any]:
    """The figures for a metrics record ("final", "calibration"); None when there was nothing to fit on."""
    if calibration is None:
        return {"calibration": None}
    return {"calibration": {
        "temperature": calibration.temperature,
        "test_ece_before": calibration.test_ece_before, "test_ece_after": calibration.test_ece_after,
        "test_nll_before": calibration.test_nll_before, "test_nll_after": calibration.test_nll_after,
        "ood_score": calibration.ood.score, "ood_temperature": calibration.ood.temperature,
        "ood_threshold": calibration.ood.threshold, "ood_upper_threshold": calibration.ood.upper_threshold,
        "ood_test_tpr": calibration.ood.test_tpr,
        "ood_features": None if calibration.ood.features is None else calibration.ood.selection.split(":")[0],
    }}


def calibration_line(figures: dict[str, Any] | None) -> str:
    if figures is None:
        return "calibration: skipped, no holdout split"
    upper = "" if figures.get("ood_upper_threshold") is None else f" and <= {figures['ood_upper_threshold']:.4g}"
    if figures.get("ood_features"):
        figures = {**figures, "ood_score": figures["ood_features"]}
    return (f"calibration (fitted on the holdout): temperature {figures['temperature']:.3f}; test ECE "
            f"{100 * figures['test_ece_before']:.2f} % -> {100 * figures['test_ece_after']:.2f} %, NLL "
            f"{figures['test_nll_before']:.4f} -> {figures['test_nll_after']:.4f}; OOD flag: "
            f"{figures['ood_score']} (T={figures['ood_temperature']:g}) >= {figures['ood_threshold']:.4g}{upper}, set "
            f"to keep {100 * TARGET_TPR:g} % of the holdout")
