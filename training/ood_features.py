"""Fit the feature-based OOD rule (issue 24, item 4): statistics of the training images' features, and a choice
among feature candidates and the logit rule, made on the tuned-on synthetic sets only.

The logit rule (``training.ood``) flagged 46-88 % of the benchmark's held-out families (text, sketches, stripes,
...; ``benchmarks/results/cpu-recipe/ood-families-logit-rule.json``). The candidates here read the network's
features (``model.features``), each scored as minus the squared Mahalanobis distance to one Gaussian fitted on
``FIT_IMAGES`` training images (never the holdout, which sets the threshold, nor the test set):

- ``penultimate l2``: the penultimate vector divided by its length (Lee et al. 2018 on the features Sun et al.
  2022 normalise);
- ``stage1 log``: the first stage's output averaged over the image, through ``log(max(v, 0) + 0.1)``. Shapes
  drawn in flat colours (text, line drawings, stripes) differ from photos in exactly these low-level statistics,
  where the penultimate layer already maps them near some class;
- ``stage1 log + energy``: that score and the energy of the logits, each standardised by its median and
  standard deviation on the same training images, summed with equal weights.

Measured on weights/fastcnn before this choice was written down: the penultimate features (Mahalanobis raw or
L2-normalised, k-NN with k 1-50 over 2,000-10,000 normalised training features) kept more of every held-out
family than the energy did, so they stay a candidate but lose; the first stage carries the signal. The
candidate with the highest mean AUROC of the holdout against the tuned-on sets wins, the logit rule included
(on a tie the logit rule, which needs no extra file), and its threshold keeps ``TARGET_TPR`` of the holdout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model.card import FeatureScore, OutOfDistributionRule
from model.features import GaussianStatistics, LogitsAndFeatures, joined, transform
from model.trust import energy_score, feature_score
from training.augment import normalize
from training.evaluate import EVAL_BATCH
from training.ood import TARGET_TPR, auroc, threshold_at_tpr

FIT_IMAGES = 10_000  # training images the statistics are fitted on: 64 (fastcnn's stage 1) to 2,048 dimensions
FIT_SEED = 0
# A covariance of D dimensions from fewer than a few times D images is mostly noise (a smoke run's 44 images
# against fastcnn's 64 first-stage channels gave a threshold of -926,101): such a candidate is not tried.
MIN_IMAGES_PER_DIMENSION = 4


@dataclass(frozen=True)
class Outputs:
    logits: torch.Tensor    # (N, classes), float32, CPU
    features: torch.Tensor  # (N, D), float32, CPU: joined's features


def outputs_of(model: nn.Module, images: torch.Tensor, device: torch.device,
               autocast: Callable[[], AbstractContextManager]) -> Outputs:
    """Logits and features of uint8 images, computed on ``device`` in batches."""
    wrapped = LogitsAndFeatures(model.eval())
    logits, features = [], []
    with torch.inference_mode():
        for start in range(0, len(images), EVAL_BATCH):
            with autocast():
                batch_logits, batch_features = joined(wrapped(normalize(images[start:start + EVAL_BATCH].to(device))))
            logits.append(batch_logits.float().cpu())
            features.append(batch_features.float().cpu())
    return Outputs(torch.cat(logits), torch.cat(features))


def fit_subset(count: int, limit: int = FIT_IMAGES, seed: int = FIT_SEED) -> torch.Tensor:
    """Which training images the statistics are fitted on: ``limit`` of ``count`` at random, seeded."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit]


@dataclass(frozen=True)
class FeatureCandidate:
    part: str
    transform: str
    energy_weight: float

    @property
    def name(self) -> str:
        return f"features {self.part} {self.transform}" + (" + energy" if self.energy_weight else "")


CANDIDATES = (FeatureCandidate("penultimate", "l2", 0.0), FeatureCandidate("stage1", "log", 0.0),
              FeatureCandidate("stage1", "log", 1.0))


@dataclass(frozen=True)
class FittedCandidate:
    rule: FeatureScore
    statistics: GaussianStatistics
    statistics_bytes: bytes

    def scores(self, outputs: Outputs) -> torch.Tensor:
        return feature_score(outputs.logits, outputs.features, self.rule, self.statistics)


def fit_candidate(candidate: FeatureCandidate, train: Outputs, penultimate_width: int,
                  fitted_on: str) -> FittedCandidate:
    part = (train.features[:, -penultimate_width:] if candidate.part == "penultimate"
            else train.features[:, :-penultimate_width])
    statistics = GaussianStatistics.fit(transform(part, candidate.transform))  # type: ignore[arg-type]
    data = statistics.to_bytes()
    statistics = GaussianStatistics.from_bytes(data)  # exactly what a server will read
    mahalanobis = statistics.score(transform(part, candidate.transform))  # type: ignore[arg-type]
    energy = energy_score(train.logits)
    rule = FeatureScore(
        part=candidate.part, transform=candidate.transform,
        statistics_sha256=hashlib.sha256(data).hexdigest(),
        feature_centre=float(mahalanobis.median()), feature_scale=_spread(mahalanobis),
        energy_weight=candidate.energy_weight, energy_centre=float(energy.median()),
        energy_scale=_spread(energy), fitted_on=fitted_on)
    return FittedCandidate(rule, statistics, data)


def _spread(scores: torch.Tensor) -> float:
    """The standard deviation, kept above zero: a network that gives every training image the same energy
    (an untrained one) must not divide by it."""
    return max(float(scores.double().std()), 1e-6)


@dataclass(frozen=True)
class FeatureChoice:
    rule: OutOfDistributionRule
    statistics_bytes: bytes | None  # to write as the rule's statistics_file; None when the logit rule won


def choose_feature_rule(logit_rule: OutOfDistributionRule, train: Outputs, holdout: Outputs,
                        tuned_on: Mapping[str, Outputs], penultimate_width: int, *, fitted_on: str,
                        test: Outputs | None = None, tpr: float = TARGET_TPR) -> FeatureChoice:
    """The best of ``CANDIDATES`` and ``logit_rule`` by mean AUROC against ``tuned_on``."""
    table = dict(logit_rule.candidates_auroc)
    logit_name = logit_rule.selection.split(":")[0]
    best_mean = float(np.mean(list(table[logit_name].values()))) if logit_name in table else -1.0
    best: FittedCandidate | None = None
    for candidate in CANDIDATES:
        width = penultimate_width if candidate.part == "penultimate" else train.features.shape[1] - penultimate_width
        if len(train.features) < MIN_IMAGES_PER_DIMENSION * width:
            continue
        fitted = fit_candidate(candidate, train, penultimate_width, fitted_on)
        inside = fitted.scores(holdout)
        table[candidate.name] = {name: round(auroc(inside, fitted.scores(out)), 6) for name, out in tuned_on.items()}
        mean = float(np.mean(list(table[candidate.name].values())))
        if mean > best_mean:
            best_mean, best = mean, fitted
    if best is None:
        return FeatureChoice(logit_rule.model_copy(update={"candidates_auroc": table}), None)
    holdout_scores = best.scores(holdout)
    threshold = threshold_at_tpr(holdout_scores, tpr)
    test_tpr = None if test is None or not len(test.logits) else \
        round(float((best.scores(test) >= threshold).double().mean()), 6)
    name = next(c.name for c in CANDIDATES if (c.part, c.transform, c.energy_weight) ==
                (best.rule.part, best.rule.transform, best.rule.energy_weight))
    rule = OutOfDistributionRule(
        score="features", temperature=1.0, threshold=threshold, upper_threshold=None, target_tpr=tpr,
        holdout_tpr=round(float((holdout_scores >= threshold).double().mean()), 6), test_tpr=test_tpr,
        selection=f"{name}: the highest mean AUROC of the holdout against {', '.join(tuned_on)}, among "
                  f"{', '.join(table)} (the logit candidates as training.ood measured them)",
        candidates_auroc=table, features=best.rule)
    return FeatureChoice(rule, best.statistics_bytes)
