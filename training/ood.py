"""Out-of-distribution measures, the synthetic OOD sets made offline, and the choice of the score and threshold.

The sets, each uint8 ``N x 3 x 32 x 32`` RGB as an upload decodes to (``benchmarks/ood.py`` adds scikit-learn's
digits, which training does not need):

- ``gaussian_noise``: every channel of every pixel drawn independently from a normal distribution of mean
  127.5 and standard deviation 64 (in 0..255 units), rounded and clipped to 0..255;
- ``uniform_noise``: every channel of every pixel drawn independently and uniformly from 0..255;
- ``constant_colour``: each image one colour, its red, green and blue drawn uniformly from 0..255;
- ``shuffled_pixels``: CIFAR images with their 1,024 pixel positions permuted (each pixel keeps its RGB
  triple; one random permutation per image), so the colour histogram stays and the shapes go.

The rule (``choose_rule``) is fitted on the holdout split only: every candidate is measured by its mean AUROC
of the holdout images against these sets made from the holdout (noise of a seed of its own), the best is
kept, and its threshold keeps 95 % of the holdout images. The candidates are each score (energy, MSP) on the
raw and on the temperature-scaled logits, one-sided (low = out) and two-sided (either tail = out, 2.5 % of
the holdout in each): fastcnn, whose first layer whitens 2 x 2 patches and so amplifies pixel noise, gives
noise images a higher energy and MSP than 95 % of real ones, which a one-sided rule can never flag.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from model.card import OutOfDistributionRule
from model.trust import SCORE_KINDS, ScoreKind, in_distribution, ood_score

TARGET_TPR = 0.95
SELECTION_SEED = 1          # the benchmark draws its own noise with another seed (benchmarks/ood.py)
SELECTION_IMAGES = 1000     # per synthetic set


def gaussian_noise(count: int, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(count, 3, 32, 32, generator=generator) * 64 + 127.5
    return noise.round().clamp(0, 255).to(torch.uint8)


def uniform_noise(count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, 32, 32), generator=generator, dtype=torch.uint8)


def constant_colour(count: int, generator: torch.Generator) -> torch.Tensor:
    colours = torch.randint(0, 256, (count, 3, 1, 1), generator=generator, dtype=torch.uint8)
    return colours.expand(count, 3, 32, 32).contiguous()


def shuffled_pixels(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flat = images.reshape(len(images), 3, -1)
    order = torch.argsort(torch.rand(len(images), flat.shape[2], generator=generator), dim=1)
    return flat.gather(2, order.unsqueeze(1).expand_as(flat)).reshape(images.shape).contiguous()


NOISE_SETS: dict[str, Callable[[int, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "uniform_noise": uniform_noise,
    "constant_colour": constant_colour,
}


def synthetic_sets(cifar_images: torch.Tensor, count: int, seed: int) -> dict[str, torch.Tensor]:
    """The noise sets of ``count`` images each, and the first ``count`` of ``cifar_images`` shuffled."""
    generator = torch.Generator().manual_seed(seed)
    sets = {name: make(count, generator) for name, make in NOISE_SETS.items()}
    sets["shuffled_pixels"] = shuffled_pixels(cifar_images[:count].cpu(), generator)
    return sets


def threshold_at_tpr(in_scores: torch.Tensor, tpr: float = TARGET_TPR) -> float:
    """The largest threshold that keeps at least ``tpr`` of ``in_scores`` (score >= threshold is kept)."""
    return two_sided_thresholds(in_scores, tpr, lower_share=1.0)[0]


def two_sided_thresholds(in_scores: torch.Tensor, tpr: float = TARGET_TPR,
                         lower_share: float = 0.5) -> tuple[float, float]:
    """(low, high) that keep at least ``tpr`` of ``in_scores`` between them, inclusive, dropping
    ``lower_share`` of the rest below ``low`` and the others above ``high``: the tightest such pair."""
    ordered = torch.sort(in_scores.double().cpu()).values
    # The 1e-9 keeps (1 - 0.95) * 100 = 5.000000000000004 from becoming 4 through float rounding.
    drop = int(np.floor((1 - tpr) * len(ordered) + 1e-9))
    below = min(int(np.floor(drop * lower_share + 1e-9)), len(ordered) - 1)
    above = drop - below
    return float(ordered[below]), float(ordered[len(ordered) - 1 - above])


def tail_score(reference: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """min(F(s), 1 - F(s)) for F the empirical distribution of ``reference``: the share of the reference at
    least as far out in the same tail. Higher = more typical; thresholding it at 0.025 is the equal-tailed
    two-sided rule."""
    ordered = torch.sort(reference.double().cpu()).values
    values = scores.double().cpu()
    at_most = torch.searchsorted(ordered, values, side="right").double()
    at_least = len(ordered) - torch.searchsorted(ordered, values, side="left").double()
    return torch.minimum(at_most, at_least) / len(ordered)


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """P(an in-distribution score > an OOD score), ties counted half: the area under the ROC curve with
    in-distribution as the positive class."""
    ordered = np.sort(in_scores.double().cpu().numpy())
    out = out_scores.double().cpu().numpy()
    below_or_equal = np.searchsorted(ordered, out, side="right")
    below = np.searchsorted(ordered, out, side="left")
    greater, ties = len(ordered) - below_or_equal, below_or_equal - below
    return float((greater + 0.5 * ties).sum() / (len(ordered) * len(out)))


def fpr_at_tpr(in_scores: torch.Tensor, out_scores: torch.Tensor, tpr: float = TARGET_TPR) -> float:
    """The share of OOD images kept at the threshold that keeps ``tpr`` of the in-distribution ones."""
    return float((out_scores.double() >= threshold_at_tpr(in_scores, tpr)).double().mean())


@dataclass(frozen=True)
class Candidate:
    kind: ScoreKind
    temperature: float  # inside the score
    two_sided: bool

    @property
    def name(self) -> str:
        return f"{self.kind}@T={self.temperature:g}" + (" two-sided" if self.two_sided else "")

    def scores(self, logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
        """Higher = more in distribution; a two-sided candidate ranks by the tails of the reference's scores."""
        raw = ood_score(logits, self.kind, self.temperature)
        if not self.two_sided:
            return raw
        return tail_score(ood_score(reference_logits, self.kind, self.temperature), raw)

    def auroc(self, in_logits: torch.Tensor, out_logits: torch.Tensor) -> float:
        return auroc(self.scores(in_logits, in_logits), self.scores(out_logits, in_logits))

    def thresholds(self, in_logits: torch.Tensor, tpr: float = TARGET_TPR) -> tuple[float, float | None]:
        raw = ood_score(in_logits, self.kind, self.temperature)
        if self.two_sided:
            return two_sided_thresholds(raw, tpr)
        return threshold_at_tpr(raw, tpr), None

    def kept(self, logits: torch.Tensor, low: float, high: float | None) -> float:
        return float(in_distribution(ood_score(logits, self.kind, self.temperature), low, high).double().mean())


def candidates(temperature: float) -> list[Candidate]:
    """Each score on the raw logits, as the papers define them, and on the calibrated ones; one- and two-sided."""
    temperatures = [1.0] if abs(temperature - 1) < 1e-6 else [1.0, round(temperature, 6)]
    return [Candidate(kind, t, two_sided) for two_sided in (False, True) for kind in SCORE_KINDS
            for t in temperatures]


def choose_rule(holdout_logits: torch.Tensor, ood_logits: Mapping[str, torch.Tensor], temperature: float,
                test_logits: torch.Tensor | None = None, tpr: float = TARGET_TPR,
                sets_description: str = "made from it") -> OutOfDistributionRule:
    """The candidate with the highest mean AUROC of the holdout against ``ood_logits`` (the first in
    ``candidates`` order on a tie), thresholded to keep ``tpr`` of the holdout."""
    table: dict[str, dict[str, float]] = {}
    best: tuple[float, Candidate] | None = None
    for candidate in candidates(temperature):
        table[candidate.name] = {name: round(candidate.auroc(holdout_logits, logits), 6)
                                 for name, logits in ood_logits.items()}
        mean = float(np.mean(list(table[candidate.name].values())))
        if best is None or mean > best[0]:
            best = (mean, candidate)
    assert best is not None
    chosen = best[1]
    low, high = chosen.thresholds(holdout_logits, tpr)
    test_tpr = None
    if test_logits is not None and len(test_logits):
        test_tpr = round(chosen.kept(test_logits, low, high), 6)
    return OutOfDistributionRule(
        score=chosen.kind, temperature=chosen.temperature, threshold=low, upper_threshold=high, target_tpr=tpr,
        holdout_tpr=round(chosen.kept(holdout_logits, low, high), 6), test_tpr=test_tpr,
        selection=f"{chosen.name}: the highest mean AUROC of the holdout against {', '.join(ood_logits)} "
                  f"({sets_description}), among {', '.join(table)}",
        candidates_auroc=table,
    )
