"""Decode an uploaded image into the model's input pixels: ``decode_image(data, size, max_pixels)``.

The steps, in order: identify the format from the bytes (never from a file name or Content-Type), check
the pixel count from the header before decoding anything, decode (large JPEGs at a reduced DCT scale via
Pillow's draft mode, so a 12-MP photo decodes at 1/8 of its size), apply the EXIF orientation, flatten every
colour mode to RGB (transparency composited over white), centre-crop to a square and resize to
``size`` x ``size`` with an antialiasing filter. The result is uint8 HWC pixels; normalisation with the
card's mean and std happens in the engine, with the statistics of the model that computes the batch.

``Preprocessor`` runs ``decode_image`` in a thread pool, so decoding never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps

from app.engine.errors import EmptyImage, ImageError, ImageTooLarge, UnsupportedImage

logger = logging.getLogger(__name__)

# Pillow's JPEG opener also returns the multi-picture JPEGs (format "MPO") that many phone cameras write.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
Image.init()  # register every plugin now: Image.open(formats=...) looks them up without loading them
SUPPORTED = "JPEG, PNG, WebP, BMP, GIF or TIFF"
# The draft decode keeps at least this many times the target size on the short side, so the antialiased
# resize that follows still has real pixels to average over.
DRAFT_OVERSAMPLING = 2
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WHITE = (255, 255, 255, 255)


def decode_image(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """``size`` x ``size`` x 3 uint8 RGB pixels of the image in ``data``; raises an ``ImageError``."""
    if not data:
        raise EmptyImage("the uploaded file is empty: send the image's bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as error:  # Pillow's own guard (see pillow_pixel_limit)
        raise ImageTooLarge(f"the image has more pixels than APP_MAX_IMAGE_PIXELS={max_pixels} allows ({error}); "
                            "downscale it first: the model sees 32x32 pixels anyway") from None
    except Exception:
        raise UnsupportedImage(
            f"the upload is not a supported image: send {SUPPORTED} (a PDF, text or a truncated file is not one)"
        ) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"the image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                "(APP_MAX_IMAGE_PIXELS); downscale it first: the model sees 32x32 pixels anyway"
            )
        try:
            if image.format in ("JPEG", "MPO"):
                image.draft("RGB", (size * DRAFT_OVERSAMPLING, size * DRAFT_OVERSAMPLING))
            image.load()
            image = _upright(image)
            rgb = _to_rgb(image)
            return np.asarray(_square_resize(rgb, size), dtype=np.uint8)
        except ImageError:
            raise
        except Exception as error:
            raise UnsupportedImage(
                f"the {image.format} image could not be decoded ({type(error).__name__}: {error}); "
                "the file may be truncated or corrupt: send the complete file"
            ) from None


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; an unreadable EXIF block is ignored rather than refusing the photo."""
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception as error:
        logger.debug("ignoring unreadable EXIF orientation: %s", error)
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _ALPHA_MODES or image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT:
        # Pillow's own I;16 -> L conversion clips at 255 instead of scaling, which turns most 16-bit
        # photos white; scale the 0..65535 range down instead.
        values = np.asarray(image, dtype=np.float32)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
        pixels = np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _square_resize(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize, in one antialiased resampling step."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # Bilinear with antialiasing, as torchvision's Resize does by default; reducing_gap first shrinks big
    # images by an integer factor (cheap), then resamples the rest exactly.
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side),
                        reducing_gap=3.0)


@contextmanager
def pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's own decompression-bomb guard, as a second line behind decode_image's header check: while
    this is entered, Pillow refuses to open images of more than twice ``max_pixels``. The limit is a
    module global of Pillow's, so the app sets it for its lifespan only and puts the old one back after
    (a Preprocessor setting it for good made one test's limit change another's decoding)."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


class Preprocessor:
    """Decodes uploads on a thread pool; Pillow releases the GIL while it decodes."""

    def __init__(self, threads: int, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        # Pillow's warning for images between its limits is noise: the header check in decode_image decides.
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

    async def decode(self, uploads: Sequence[bytes], size: int) -> list[np.ndarray]:
        """Decode every upload in parallel; the first failure names which file it was (1-based)."""
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._pool, decode_image, data, size, self.max_pixels) for data in uploads]
        results = await asyncio.gather(*futures, return_exceptions=True)
        for number, result in enumerate(results, start=1):
            if isinstance(result, ImageError):
                raise type(result)(_which(number, len(uploads)) + str(result))
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    async def run(self, function, *args):  # type: ignore[no-untyped-def]
        """Run other CPU-bound request parsing (a v2 JSON tensor) on the same pool."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _which(number: int, total: int) -> str:
    return f"file {number} of {total}: " if total > 1 else ""
