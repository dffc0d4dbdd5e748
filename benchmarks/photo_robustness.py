"""How right is the served model on photo-like uploads, not only on 32x32 test images? (issue 24)

    .venv/bin/python -m benchmarks.photo_robustness --data-dir data                 # all 10,000 test images
    .venv/bin/python -m benchmarks.photo_robustness --data-dir data --split holdout   # training images, for tuning

Each image of the chosen split is turned into one realistic upload per family (below), encoded as the file
a user would send, and classified through the service's own pipeline: ``decode_image`` then ``fit_to_size``
to the model's input size, exactly as ``/predict`` runs them (``app/classification/images.py``), then the
served model on the exact float32 backend. Reported per family: accuracy and its drop against the same images
sent as 32x32 PNGs, then the mean and the worst drop over the tuned-on families, and the held-back families
apart. ``--fit`` compares other fit stages (filters) on the holdout split, never on the test set.

Every random choice comes from ``--seed`` and the image's index, so a family is the same set of files on
every run and machine. The families (``FAMILIES``; the held-back ones were fixed before any tuning and are
never used to choose a recipe or a fit stage):

- ``upscale-<filter>``: enlarged to a random side in 64-512 px with nearest, bilinear, bicubic or Lanczos,
  saved as PNG (a screenshot of a small image, an upscaled thumbnail);
- ``jpeg``: enlarged (bicubic, 96-384 px), then JPEG at quality 50-95 with 4:2:0 chroma (a phone photo);
- ``crop-shift``: enlarged to 256 px (bicubic), then a crop of 80-95 % of the side at a random offset that
  keeps the subject (CIFAR's objects are centred), JPEG q90;
- ``aspect``: the scene extended to 3:2 or 2:3 by mirroring its edges, enlarged 4-8x, JPEG q90 (a photo
  with more background beside the subject; the fit stage's centre crop should find the subject again);
- ``alpha``: enlarged 4x, RGBA PNG whose margin of 8-20 % is transparent (a cut-out on a transparent sheet);
- ``greyscale``: enlarged 4x, greyscale JPEG q90;
- held back: ``webp`` (enlarged 3-8x with Lanczos, lossy WebP q 60-90) and ``phone-large`` (enlarged to
  1,024-2,048 px, light Gaussian blur, JPEG q 70-90: the draft decode path of a multi-megapixel photo).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from app.classification import images as pipeline
from app.engine.backend_choice import BackendPolicy
from app.engine.served_model import ServedModel
from benchmarks.compare import git_revision
from benchmarks.cpu_backends import describe_machine, read_batch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
MAX_PIXELS = 40_000_000  # the service's default APP_MAX_IMAGE_PIXELS is higher than any family needs
HOLDOUT = 2_500  # the last training images, which the CPU recipe holds out (its --holdout): the tuning split

Random = np.random.Generator
Maker = Callable[[Image.Image, Random], bytes]


def _encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _enlarge(image: Image.Image, side: int, resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    return image.resize((side, side), resample)


def upscale(resample: Image.Resampling) -> Maker:
    return lambda image, rng: _encode(_enlarge(image, int(rng.integers(64, 513)), resample), "PNG")


def jpeg(image: Image.Image, rng: Random) -> bytes:
    return _encode(_enlarge(image, int(rng.integers(96, 385))), "JPEG", quality=int(rng.integers(50, 96)),
                   subsampling="4:2:0")


def crop_shift(image: Image.Image, rng: Random) -> bytes:
    large = _enlarge(image, 256)
    side = int(256 * rng.uniform(0.80, 0.95))
    left, top = (int(rng.integers(0, 256 - side + 1)) for _ in range(2))
    return _encode(large.crop((left, top, left + side, top + side)), "JPEG", quality=90, subsampling="4:2:0")


def aspect(image: Image.Image, rng: Random) -> bytes:
    """A wider (or taller) field of view around the same subject: the picture is extended to 3:2 or 2:3 by
    mirroring its edges, then enlarged; the fit stage's centre crop should find the subject again."""
    pixels = np.asarray(image)
    extra = 8  # 32 + 2 * 8 = 48 = 1.5 x 32
    pad = ((0, 0), (extra, extra), (0, 0)) if rng.random() < 0.5 else ((extra, extra), (0, 0), (0, 0))
    wide = Image.fromarray(np.pad(pixels, pad, mode="reflect"))
    scale = int(rng.integers(4, 9))
    return _encode(wide.resize((wide.width * scale, wide.height * scale), Image.Resampling.BICUBIC), "JPEG",
                   quality=90, subsampling="4:2:0")


def alpha(image: Image.Image, rng: Random) -> bytes:
    large = _enlarge(image, 128).convert("RGBA")
    side = 128 + 2 * int(128 * rng.uniform(0.08, 0.20))
    sheet = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    offset = (side - 128) // 2
    sheet.paste(large, (offset, offset))
    return _encode(sheet, "PNG")


def greyscale(image: Image.Image, rng: Random) -> bytes:
    return _encode(_enlarge(image, 128).convert("L"), "JPEG", quality=90)


def webp(image: Image.Image, rng: Random) -> bytes:
    side = 32 * int(rng.integers(3, 9))
    return _encode(_enlarge(image, side, Image.Resampling.LANCZOS), "WEBP", quality=int(rng.integers(60, 91)))


def phone_large(image: Image.Image, rng: Random) -> bytes:
    side = int(rng.integers(1024, 2049))
    large = _enlarge(image, side).filter(ImageFilter.GaussianBlur(radius=side / 512))
    return _encode(large, "JPEG", quality=int(rng.integers(70, 91)), subsampling="4:2:0")


FAMILIES: dict[str, Maker] = {
    "upscale-nearest": upscale(Image.Resampling.NEAREST),
    "upscale-bilinear": upscale(Image.Resampling.BILINEAR),
    "upscale-bicubic": upscale(Image.Resampling.BICUBIC),
    "upscale-lanczos": upscale(Image.Resampling.LANCZOS),
    "jpeg": jpeg,
    "crop-shift": crop_shift,
    "aspect": aspect,
    "alpha": alpha,
    "greyscale": greyscale,
    "webp": webp,
    "phone-large": phone_large,
}
HELD_BACK = ("webp", "phone-large")


def family_uploads(images: np.ndarray, family: str, seed: int) -> list[bytes]:
    """The family's upload for each image: the same bytes for the same seed, family and index."""
    maker = FAMILIES[family]
    salt = list(FAMILIES).index(family)
    return [maker(Image.fromarray(pixels), np.random.default_rng([seed, salt, index]))
            for index, pixels in enumerate(images)]


def fit_with(resample: Image.Resampling, reducing_gap: float | None) -> Callable[[Image.Image, int], np.ndarray]:
    """A fit stage like the service's (centre square crop, one resampling step) with another filter: the
    levers --fit compares on the holdout split."""
    def fit(image: Image.Image, size: int) -> np.ndarray:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
        return np.asarray(image.resize((size, size), resample, box=box, reducing_gap=reducing_gap), dtype=np.uint8)
    return fit


FITS: dict[str, Callable[[Image.Image, int], np.ndarray] | None] = {
    "service": None,  # whatever app/classification/images.py fit_to_size does today
    "bilinear": fit_with(Image.Resampling.BILINEAR, None),
    "bicubic": fit_with(Image.Resampling.BICUBIC, None),
    "lanczos": fit_with(Image.Resampling.LANCZOS, None),
    "box": fit_with(Image.Resampling.BOX, None),
    "hamming": fit_with(Image.Resampling.HAMMING, None),
}


def accuracy(model: ServedModel, uploads: list[bytes], labels: np.ndarray, batch_size: int = 250,
             fit: str = "service") -> float:
    size = model.card.input_size
    fitting = FITS[fit] or pipeline.fit_to_size
    correct = 0
    for start in range(0, len(uploads), batch_size):
        pixels = np.stack([fitting(pipeline.decode_image(data, MAX_PIXELS, draft_size=size), size)
                           for data in uploads[start:start + batch_size]])
        logits = model.logits(model.normalise(torch.from_numpy(pixels)))
        correct += int((logits.argmax(1).numpy() == labels[start:start + batch_size]).sum())
    return correct / len(uploads)


def images_of(data_dir: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    if split == "test":
        images, labels = read_batch(data_dir, "test_batch")
    else:  # the last HOLDOUT training images, which the CPU recipe holds out of training (its --holdout)
        images, labels = read_batch(data_dir, "data_batch_5")
        images, labels = images[-HOLDOUT:], labels[-HOLDOUT:]
    return (images[:limit], labels[:limit]) if limit else (images, labels)


def run(weights: Path, data_dir: Path, split: str, limit: int | None, seed: int, families: list[str],
        fits: list[str]) -> dict:
    torch.manual_seed(0)
    model = ServedModel.load(weights, torch.device("cpu"), BackendPolicy(cpu_backend="fused"))
    images, labels = images_of(data_dir, split, limit)
    started = time.perf_counter()
    originals = [_encode(Image.fromarray(pixels), "PNG") for pixels in images]
    reference = accuracy(model, originals, labels)
    uploads = {family: family_uploads(images, family, seed) for family in families}
    by_fit = {fit: summary(model, uploads, labels, reference, fit) for fit in fits}
    return {
        "benchmark": "photo_robustness", "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": git_revision(), "machine": describe_machine(), "weights": str(weights),
        "model_version": model.card.version if hasattr(model.card, "version") else None,
        "weights_sha256": model.card.weights_sha256, "backend": model.backend, "split": split,
        "images": len(labels), "seed": seed, "originals_png_32_accuracy": round(reference, 4),
        "fits": by_fit, "seconds": round(time.perf_counter() - started, 1),
    }


def summary(model: ServedModel, uploads: dict[str, list[bytes]], labels: np.ndarray, reference: float,
            fit: str) -> dict:
    rows = {}
    for family, files in uploads.items():
        value = accuracy(model, files, labels, fit=fit)
        rows[family] = {"accuracy": round(value, 4), "drop_points": round((reference - value) * 100, 2),
                        "held_back": family in HELD_BACK}
        print(f"{fit:9s} {family:18s} {value:.2%}  drop {(reference - value) * 100:+.2f} points", flush=True)
    tuned = [row["drop_points"] for row in rows.values() if not row["held_back"]]
    held = [row["drop_points"] for row in rows.values() if row["held_back"]]
    return {
        "families": rows,
        "tuned_on": {"mean_drop_points": round(float(np.mean(tuned)), 2) if tuned else None,
                     "worst_drop_points": max(tuned) if tuned else None},
        "held_back": {"mean_drop_points": round(float(np.mean(held)), 2) if held else None,
                      "worst_drop_points": max(held) if held else None},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=REPO_ROOT / "weights" / "fastcnn")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data",
                        help="the folder holding cifar-10-batches-py/ (default: data)")
    parser.add_argument("--split", choices=("test", "holdout"), default="test",
                        help="test: the 10,000 test images (report); holdout: the last 2,500 training images "
                             "(tune on these)")
    parser.add_argument("--limit", type=int, help="only the first N images (a quick look)")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--families", nargs="*", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--fit", nargs="*", choices=list(FITS), default=["service"],
                        help="fit stages to compare (default: the service's own); tune on --split holdout only")
    args = parser.parse_args(argv)
    if args.split == "test" and args.fit != ["service"]:
        parser.error("compare fit stages on --split holdout: the test set only reports the chosen one")
    result = run(args.weights, args.data_dir, args.split, args.limit, args.seed, args.families, args.fit)
    print(f"32x32 PNG: {result['originals_png_32_accuracy']:.2%}")
    for fit, figures in result["fits"].items():
        tuned, held = figures["tuned_on"], figures["held_back"]
        print(f"fit {fit}: tuned-on families: mean drop {tuned['mean_drop_points']} points, worst "
              f"{tuned['worst_drop_points']}; held back: mean {held['mean_drop_points']}, worst "
              f"{held['worst_drop_points']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"photo_robustness_{result['split']}_{result['weights_sha256'][:12]}_{'-'.join(args.fit)}"
    out = RESULTS / f"{name}{'_limit' + str(args.limit) if args.limit else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
