"""Out-of-distribution detection: how well each score tells the CIFAR-10 test set from images of no class.

    .venv/bin/python -m benchmarks.ood --weights weights/fastcnn --data-dir data --skip-integrity-check \\
        --out benchmarks/results/cpu-recipe/ood.json

In distribution: the CIFAR-10 test set (all 10,000 images unless ``--test-limit``). Out of distribution, all
made here offline as uint8 32 x 32 RGB, with seed ``--seed`` (2; training chose its rule on sets of seed 1
made from the holdout, and never saw the digits):

- ``digits``: scikit-learn's bundled 8 x 8 handwritten digits (``sklearn.datasets.load_digits``, all 1,797,
  no download): intensities 0..16 scaled to 0..1, upscaled to 32 x 32 bilinearly (``torch.nn.functional.
  interpolate``, ``align_corners=False``), then coloured: per image an ink and a paper colour, each RGB
  drawn uniformly from 0..255, and pixel = paper + intensity x (ink - paper), rounded;
- ``gaussian_noise``, ``uniform_noise``, ``constant_colour``: ``--count`` images each, made as
  ``training.ood`` describes (i.i.d. N(127.5, 64²) clipped; i.i.d. uniform 0..255; one uniform random colour
  per image);
- ``shuffled_pixels``: the first ``--count`` CIFAR-10 test images, each with its 1,024 pixel positions
  randomly permuted (RGB triples kept together).

For every candidate (``msp`` and ``energy``, each on the raw logits and divided by the card's temperature,
one-sided and two-sided, as ``training.ood`` defines them) it reports the AUROC (in-distribution positive,
ties half; a two-sided candidate ranks by its tails of the test set's own scores) and the FPR at 95 % TPR:
the share of OOD images kept by the threshold(s) that keep 95 % of the test images. For the card's own rule it also
reports the share of each set that its stored threshold (chosen on the holdout) calls in distribution.
Writes JSON (default ``benchmarks/results/ood_<model version>.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.serve_load import describe_machine
from model.checkpoint import load_checkpoint
from model.trust import in_distribution, ood_score
from training.data import load_split
from training.distributed import resolve_device
from training.evaluate import logits_of
from training.ood import NOISE_SETS, Candidate, candidates, shuffled_pixels
from training.precision import resolve_precision
from training.provenance import git_commit
from training.run import evaluation_autocast

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
BENCHMARK_SEED = 2
DESCRIPTIONS = {
    "digits": "sklearn load_digits (1797), 0..16 -> 0..1, bilinear 8->32, paper + v*(ink - paper) with ink and "
              "paper uniform random RGB per image",
    "gaussian_noise": "i.i.d. per channel N(127.5, 64^2), rounded, clipped to 0..255",
    "uniform_noise": "i.i.d. per channel uniform 0..255",
    "constant_colour": "one colour per image, R, G, B uniform 0..255",
    "shuffled_pixels": "CIFAR-10 test images, pixel positions randomly permuted per image (RGB kept)",
}


def coloured_digits(generator: torch.Generator) -> torch.Tensor:
    from sklearn.datasets import load_digits  # the bench and test extras; bundled with scikit-learn

    intensity = torch.from_numpy(load_digits().images).float().div(16).unsqueeze(1)  # N x 1 x 8 x 8, 0..1
    intensity = F.interpolate(intensity, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    ink = torch.randint(0, 256, (len(intensity), 3, 1, 1), generator=generator).float()
    paper = torch.randint(0, 256, (len(intensity), 3, 1, 1), generator=generator).float()
    return (paper + intensity * (ink - paper)).round().clamp(0, 255).to(torch.uint8)


def ood_sets(test_images: torch.Tensor, count: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sets = {"digits": coloured_digits(generator)}
    sets.update({name: make(count, generator) for name, make in NOISE_SETS.items()})
    sets["shuffled_pixels"] = shuffled_pixels(test_images[:count], generator)
    return sets


def measure(in_logits: torch.Tensor, out_logits: dict[str, torch.Tensor], temperature: float,
            rule: dict | None) -> dict[str, dict]:
    """Per OOD set: AUROC and FPR at 95 % TPR of every candidate, and what the card's rule keeps."""
    results: dict[str, dict] = {}
    for name, logits in out_logits.items():
        scores = {}
        for candidate in candidates(temperature):
            scores[candidate.name] = {"auroc": round(candidate.auroc(in_logits, logits), 4),
                                      "fpr_at_95_tpr": round(candidate.kept(logits, *candidate.thresholds(in_logits)),
                                                             4)}
        entry = {"images": len(logits), "made": DESCRIPTIONS[name], "scores": scores}
        if rule is not None:
            kept = in_distribution(ood_score(logits, rule["score"], rule["temperature"]), rule["threshold"],
                                   rule["upper_threshold"])
            entry["card_rule_kept"] = round(float(kept.double().mean()), 4)
        results[name] = entry
    return results


def table(results: dict[str, dict], rule_name: str | None) -> str:
    names = list(next(iter(results.values()))["scores"])
    header = "| OOD set | images | " + " | ".join(f"{n} AUROC | {n} FPR@95" for n in names)
    header += " | card rule keeps |" if rule_name else " |"
    lines = [header, "|---|---:|" + "---:|" * (2 * len(names) + (1 if rule_name else 0))]
    for name, entry in results.items():
        cells = [f"{entry['scores'][n]['auroc']:.4f} | {entry['scores'][n]['fpr_at_95_tpr']:.4f}" for n in names]
        row = f"| {name} | {entry['images']} | " + " | ".join(cells)
        row += f" | {entry['card_rule_kept']:.4f} |" if rule_name else " |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ood", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--data-dir", type=Path, required=True, help="folder that holds cifar-10-batches-py")
    parser.add_argument("--skip-integrity-check", action="store_true", help="for rebuilt copies of CIFAR-10")
    parser.add_argument("--test-limit", type=int, help="in-distribution test images (default: all)")
    parser.add_argument("--count", type=int, default=2000, help="images per noise / shuffled set (default 2000)")
    parser.add_argument("--seed", type=int, default=BENCHMARK_SEED, help="of the OOD sets (default %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/ood_<version>.json)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    checkpoint = load_checkpoint(args.weights, device)
    card = checkpoint.card
    autocast = evaluation_autocast(device, resolve_precision("auto", device))
    test = load_split(args.data_dir, train=False, skip_integrity_check=args.skip_integrity_check)
    test = test.take(0, args.test_limit)
    in_logits = logits_of(checkpoint.model, test.images, device, autocast)
    out_logits = {name: logits_of(checkpoint.model, images, device, autocast)
                  for name, images in ood_sets(test.images, args.count, args.seed).items()}
    calibration = card.calibration
    temperature = calibration.temperature if calibration else 1.0
    rule = (calibration.ood.model_dump(include={"score", "temperature", "threshold", "upper_threshold"})
            if calibration else None)
    results = measure(in_logits, out_logits, temperature, rule)
    rule_name = (Candidate(rule["score"], rule["temperature"], rule["upper_threshold"] is not None).name
                 if rule else None)

    record = {
        "benchmark": "ood", "time": datetime.now(UTC).isoformat(timespec="seconds"), "git_commit": git_commit(),
        "machine": describe_machine(), "weights": str(args.weights), "model_version": card.version,
        "in_distribution": f"CIFAR-10 test set, {len(test)} images", "seed": args.seed,
        "card_temperature": calibration.temperature if calibration else None,
        "card_rule": {**rule, "name": rule_name} if rule else None,
        "card_rule_test_kept": (round(Candidate(rule["score"], rule["temperature"], False).kept(
                                    in_logits, rule["threshold"], rule["upper_threshold"]), 4) if rule else None),
        "sets": results,
    }
    out = args.out or RESULTS / f"ood_{card.version}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{card.version} on {record['machine']['cpu']}; in distribution: {record['in_distribution']}")
    if rule:
        bounds = f">= {rule['threshold']:.4g}" + (f" and <= {rule['upper_threshold']:.4g}"
                                                  if rule["upper_threshold"] is not None else "")
        print(f"card rule: {rule_name} {bounds} (chosen on the holdout) keeps "
              f"{record['card_rule_test_kept']:.4f} of the test images")
    print(table(results, rule_name))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
