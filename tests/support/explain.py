"""Images for the Grad-CAM tests: a real CIFAR-10 test image from examples/ on a plain canvas, at a corner."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from app.classification.images import fit_to_size
from tests.support import REPO_ROOT

EXAMPLES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CANVAS = 64
GREY = (128, 128, 128)


def canvas_image(name: str, corner: tuple[int, int]) -> Image.Image:
    """examples/<name>.png (32x32) pasted into corner (row, column), each 0 or 1, of a plain grey 64x64 canvas."""
    canvas = Image.new("RGB", (CANVAS, CANVAS), GREY)
    example = Image.open(REPO_ROOT / "examples" / f"{name}.png").convert("RGB")
    canvas.paste(example, (corner[1] * (CANVAS - example.width), corner[0] * (CANVAS - example.height)))
    return canvas


def canvas_png(name: str, corner: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    canvas_image(name, corner).save(buffer, format="PNG")
    return buffer.getvalue()


def object_on_canvas(name: str, corner: tuple[int, int], size: int = 32) -> np.ndarray:
    """The canvas as the service's fit stage makes it: ``size`` x ``size`` uint8 RGB."""
    return np.array(fit_to_size(canvas_image(name, corner), size))


def peak(heatmap: np.ndarray) -> tuple[float, float]:
    """(row, column) of the map's maximum; the mean position where several pixels share it (an 8-bit PNG
    rounds a broad peak to a plateau of 255s)."""
    rows, columns = np.nonzero(heatmap == heatmap.max())
    return float(rows.mean()), float(columns.mean())
