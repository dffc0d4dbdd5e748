"""The OOD benchmark's held-out families and its photo-like in-distribution check, all made offline and seeded.

Each family is uint8 ``N x 3 x 32 x 32`` RGB, as an upload decodes to after ``fit_to_size``. Drawn shapes are
made at ``CANVAS`` x ``CANVAS`` pixels and shrunk to 32 with antialiasing (PIL's LANCZOS), as a larger upload
would be. Each family has a random generator of its own (``numpy.random.default_rng([seed, family])``), so
adding a family never changes another.

Held out means that nothing was chosen by looking at them (issue 24, item 4): ``training.ood`` picks the score
and its threshold on the holdout against its own synthetic sets (noise, constant colours, shuffled pixels),
and these families only report how that choice generalises:

- ``text``: one to three letters or digits in one of 14 TrueType fonts matplotlib ships (DejaVu Sans, Serif
  and Mono in their styles, STIX, Computer Modern), 30 to 80 px on the canvas, at a random spot, in an ink
  colour at least 120 (sum over R, G, B) away from a random background colour;
- ``stripes``: a square or a sine wave across a random angle, period 3 to 16 px (at 32 px), two random colours;
- ``checkerboards``: squares of 2 to 10 px (at 32 px), rotated by a random angle, two random colours;
- ``smooth_noise``: "plasma": per channel, uniform noise at 2, 4, 8 and 16 px summed with random octave
  weights, each octave enlarged bicubically, then stretched to a random contrast around a random mean;
- ``blotches``: 3 to 12 filled ellipses of random colours on a random background, blurred (Gaussian radius
  0 to 3 px on the canvas);
- ``sketches``: 2 to 6 random strokes, polygons, ellipses and arcs, 2 to 8 px wide, in one ink on a plain
  background, as a line drawing;
- ``digits``: scikit-learn's handwritten digits, coloured (``coloured_digits``).

``photo_like`` is in distribution: CIFAR-10 test images enlarged 4 x bicubically, saved as JPEG quality 85,
decoded and fitted back to 32 px by the service's own ``app.classification.images.fit_to_size``, as a photo
upload of the same scene would reach the network.
"""

from __future__ import annotations

import io
import string
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from app.classification.images import fit_to_size

CANVAS = 96
SIZE = 32
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf",
)
TEXT_CHARACTERS = string.ascii_letters + string.digits


def _font_folder() -> Path:
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _contrasting(rng: np.random.Generator, background: tuple[int, int, int]) -> tuple[int, int, int]:
    """A random colour at least 120 away from ``background`` (the sum of the R, G, B differences)."""
    while True:
        ink = _colour(rng)
        if sum(abs(a - b) for a, b in zip(ink, background)) >= 120:
            return ink


def _shrink(canvas: Image.Image) -> np.ndarray:
    return np.asarray(canvas.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS), dtype=np.uint8)


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def text(count: int, rng: np.random.Generator) -> torch.Tensor:
    folder = _font_folder()
    images = []
    for _ in range(count):
        background = _colour(rng)
        canvas = Image.new("RGB", (CANVAS, CANVAS), background)
        font = ImageFont.truetype(str(folder / FONT_FILES[rng.integers(len(FONT_FILES))]), int(rng.integers(30, 81)))
        word = "".join(rng.choice(list(TEXT_CHARACTERS), int(rng.integers(1, 4))))
        draw = ImageDraw.Draw(canvas)
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
        x = rng.integers(-left - (right - left) // 4, max(CANVAS - right + (right - left) // 4, -left) + 1)
        y = rng.integers(-top - (bottom - top) // 4, max(CANVAS - bottom + (bottom - top) // 4, -top) + 1)
        draw.text((int(x), int(y)), word, font=font, fill=_contrasting(rng, background))
        images.append(_shrink(canvas))
    return _stack(images)


def _two_colours(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``mask`` (H x W, 0..1) blended between two random colours, as H x W x 3 uint8."""
    first, second = np.array(_colour(rng), float), np.array(_colour(rng), float)
    return (first + mask[..., None] * (second - first)).round().clip(0, 255).astype(np.uint8)


def _grid(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Canvas coordinates in 32-px units, rotated by a random angle."""
    angle = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:CANVAS, 0:CANVAS] * (SIZE / CANVAS)
    return x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)


def stripes(count: int, rng: np.random.Generator) -> torch.Tensor:
    images = []
    for _ in range(count):
        along, _ = _grid(rng)
        phase = 2 * np.pi * along / rng.uniform(3, 16) + rng.uniform(0, 2 * np.pi)
        mask = (np.sin(phase) > 0).astype(float) if rng.random() < 0.5 else 0.5 + 0.5 * np.sin(phase)
        images.append(_shrink(Image.fromarray(_two_colours(mask, rng))))
    return _stack(images)


def checkerboards(count: int, rng: np.random.Generator) -> torch.Tensor:
    images = []
    for _ in range(count):
        u, v = _grid(rng)
        side = rng.uniform(2, 10)
        mask = ((np.floor(u / side) + np.floor(v / side)) % 2).astype(float)
        images.append(_shrink(Image.fromarray(_two_colours(mask, rng))))
    return _stack(images)


def smooth_noise(count: int, rng: np.random.Generator) -> torch.Tensor:
    octaves = (2, 4, 8, 16)
    total = torch.zeros(count, 3, SIZE, SIZE)
    weights = torch.from_numpy(rng.uniform(0, 1, (count, len(octaves)))).float()
    weights /= weights.sum(1, keepdim=True)
    for index, side in enumerate(octaves):
        coarse = torch.from_numpy(rng.uniform(-1, 1, (count, 3, side, side))).float()
        fine = F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
        total += weights[:, index].view(-1, 1, 1, 1) * fine
    total = total / total.flatten(1).abs().amax(1).clamp_min(1e-6).view(-1, 1, 1, 1)  # -1..1
    mean = torch.from_numpy(rng.uniform(60, 196, (count, 3, 1, 1))).float()
    contrast = torch.from_numpy(rng.uniform(30, 127, (count, 1, 1, 1))).float()
    return (mean + contrast * total).round().clamp(0, 255).to(torch.uint8)


def blotches(count: int, rng: np.random.Generator) -> torch.Tensor:
    images = []
    for _ in range(count):
        canvas = Image.new("RGB", (CANVAS, CANVAS), _colour(rng))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(3, 13))):
            x, y = rng.integers(-20, CANVAS, 2)
            width, height = rng.integers(10, 60, 2)
            draw.ellipse((int(x), int(y), int(x + width), int(y + height)), fill=_colour(rng))
        images.append(_shrink(canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 3))))))
    return _stack(images)


def sketches(count: int, rng: np.random.Generator) -> torch.Tensor:
    images = []
    for _ in range(count):
        background = _colour(rng)
        canvas = Image.new("RGB", (CANVAS, CANVAS), background)
        draw, ink = ImageDraw.Draw(canvas), _contrasting(rng, background)
        for _ in range(int(rng.integers(2, 7))):
            width, kind = int(rng.integers(2, 9)), rng.integers(4)
            points = [tuple(int(v) for v in rng.integers(4, CANVAS - 4, 2)) for _ in range(int(rng.integers(2, 6)))]
            box = sorted(rng.integers(4, CANVAS - 4, 2)), sorted(rng.integers(4, CANVAS - 4, 2))
            bounds = (int(box[0][0]), int(box[1][0]), int(box[0][1]) + 4, int(box[1][1]) + 4)
            if kind == 0:
                draw.line(points, fill=ink, width=width, joint="curve")
            elif kind == 1 and len(points) >= 3:
                draw.polygon(points, outline=ink, width=width)
            elif kind == 2:
                draw.ellipse(bounds, outline=ink, width=width)
            else:
                draw.arc(bounds, int(rng.integers(0, 360)), int(rng.integers(0, 360)), fill=ink, width=width)
        images.append(_shrink(canvas))
    return _stack(images)


def coloured_digits(generator: torch.Generator) -> torch.Tensor:
    """scikit-learn's 1,797 bundled 8 x 8 digits (no download): intensities 0..16 scaled to 0..1, upscaled to
    32 x 32 bilinearly, then per image an ink and a paper colour, pixel = paper + intensity x (ink - paper)."""
    from sklearn.datasets import load_digits  # the test extra; bundled with scikit-learn

    intensity = torch.from_numpy(load_digits().images).float().div(16).unsqueeze(1)  # N x 1 x 8 x 8, 0..1
    intensity = F.interpolate(intensity, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    ink = torch.randint(0, 256, (len(intensity), 3, 1, 1), generator=generator).float()
    paper = torch.randint(0, 256, (len(intensity), 3, 1, 1), generator=generator).float()
    return (paper + intensity * (ink - paper)).round().clamp(0, 255).to(torch.uint8)


FAMILIES: dict[str, Callable[[int, np.random.Generator], torch.Tensor]] = {
    "text": text, "stripes": stripes, "checkerboards": checkerboards, "smooth_noise": smooth_noise,
    "blotches": blotches, "sketches": sketches,
}


def held_out_families(count: int, seed: int) -> dict[str, torch.Tensor]:
    """``count`` images of each drawn family, and all the digits."""
    sets = {name: make(count, np.random.default_rng([seed, index]))
            for index, (name, make) in enumerate(FAMILIES.items())}
    sets["digits"] = coloured_digits(torch.Generator().manual_seed(seed))
    return sets


def jpeg_round_trip(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """``images`` (uint8 N x 3 x 32 x 32) JPEG-encoded at ``quality`` with 4:2:0 chroma at their own size and
    decoded: the degradation of a rebuilt CIFAR-10 copy's training images (ours: quality about 75), with no
    enlargement, so it tells the loss of detail apart from the photo-like path's resampling."""
    decoded = []
    for image in images.permute(0, 2, 3, 1).numpy():
        encoded = io.BytesIO()
        Image.fromarray(image).save(encoded, format="JPEG", quality=quality, subsampling=2)
        with Image.open(io.BytesIO(encoded.getvalue())) as back:
            decoded.append(np.asarray(back.convert("RGB"), dtype=np.uint8))
    return _stack(decoded)


def ycbcr_detail(images: torch.Tensor) -> dict[str, float]:
    """The mean absolute Laplacian of each of Y, Cb and Cr over ``images`` (uint8 N x 3 x H x W): how much fine
    detail the brightness and the colour carry. 4:2:0 JPEG halves the colour's, which the first stage's
    features (and so a rule that reads them) notice."""
    planes = np.stack([np.asarray(Image.fromarray(image).convert("YCbCr"), dtype=np.float32)
                       for image in images.permute(0, 2, 3, 1).numpy()])
    x = torch.from_numpy(planes).permute(0, 3, 1, 2)
    laplacian = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return {name: round(float(value), 3) for name, value in zip(("Y", "Cb", "Cr"), laplacian.abs().mean(dim=(0, 2, 3)))}


def photo_like(images: torch.Tensor, scale: int = 4, quality: int = 85) -> torch.Tensor:
    """``images`` (uint8 N x 3 x 32 x 32) enlarged ``scale`` x bicubically, JPEG-encoded at ``quality`` and fitted
    back to 32 px by the service's ``fit_to_size``."""
    fitted = []
    for image in images.permute(0, 2, 3, 1).numpy():
        large = Image.fromarray(image).resize((SIZE * scale, SIZE * scale), Image.Resampling.BICUBIC)
        encoded = io.BytesIO()
        large.save(encoded, format="JPEG", quality=quality)
        with Image.open(io.BytesIO(encoded.getvalue())) as decoded:
            fitted.append(fit_to_size(decoded.convert("RGB"), SIZE))
    return _stack(fitted)
