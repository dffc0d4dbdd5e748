"""Stages 1 and 2 of the classification pipeline for uploaded files: ``decode_image`` turns the bytes into an
upright RGB image, ``fit_to_size`` turns that into the model's input pixels. ``image_pixels`` does both.

decode: identify the format from the bytes (never from a file name or Content-Type), check the pixel count
from the header before decoding anything, decode (large JPEGs at a reduced DCT scale via Pillow's draft mode,
so a 12-MP photo decodes at 1/8 of its size), apply the EXIF orientation, and flatten every colour mode to
RGB (a cut-out on a transparent sheet cropped to its visible part, then transparency composited over white).

fit: centre-crop to a square and resize to ``size`` x ``size`` with Lanczos (antialiased), giving uint8 HWC
pixels. Normalisation with the card's mean and std is a later stage, on the device, with the statistics of
the model that computes the batch (``app/classification/classifier.py`` names every stage).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps

from app.engine.errors import EmptyImage, ImageTooLarge, UnsupportedImage

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


def image_pixels(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """``size`` x ``size`` x 3 uint8 RGB pixels of the image in ``data`` (decode, then fit); raises an
    ``ImageError``."""
    return fit_to_size(decode_image(data, max_pixels, draft_size=size), size)


def decode_image(data: bytes, max_pixels: int, draft_size: int) -> Image.Image:
    """The upright RGB image in ``data``; raises an ``ImageError``. A JPEG is decoded at the smallest DCT
    scale that keeps ``DRAFT_OVERSAMPLING`` x ``draft_size`` pixels on its short side."""
    if not data:
        raise EmptyImage("the uploaded file is empty: send the image's bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:  # Pillow's own guard (see pillow_pixel_limit), in this service's words
        raise ImageTooLarge(f"the image has more than {max_pixels} pixels (APP_MAX_IMAGE_PIXELS); downscale it "
                            "first: the model sees 32x32 pixels anyway") from None
    except Exception:
        raise UnsupportedImage(
            f"the upload is not a supported image: send {SUPPORTED} (a PDF, text or a truncated file is not one)"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(APP_MAX_IMAGE_PIXELS); downscale it first: the model sees 32x32 pixels anyway"
        )
    try:
        if image.format in ("JPEG", "MPO"):
            image.draft("RGB", (draft_size * DRAFT_OVERSAMPLING, draft_size * DRAFT_OVERSAMPLING))
        image.load()
        return _to_rgb(_upright(image))
    except Exception as error:
        raise UnsupportedImage(
            f"the {image.format} image could not be decoded ({type(error).__name__}: {error}); "
            "the file may be truncated or corrupt: send the complete file"
        ) from None


def header_pixels(data: bytes) -> int:
    """Width x height from the image's header, without decoding; 0 when Pillow will not open it (decode_image
    then says why: not an image, or over Pillow's own bomb limit)."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
    except Exception:
        return 0
    return width * height


def fit_to_size(image: Image.Image, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``size`` x ``size``, in one antialiased resampling step."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # Lanczos, antialiased: on photo-like uploads of held-out training images it lost 1.2 points on average
    # against bilinear's 1.8, keeping more of the detail a 32-px model sees (benchmarks/photo_robustness.py
    # --fit). reducing_gap first shrinks big images by an integer factor (cheap), then resamples exactly.
    resized = image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side),
                           reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; an unreadable EXIF block is ignored rather than refusing the photo."""
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception as error:
        logger.debug("ignoring unreadable EXIF orientation: %s", error)
        return image


def _subject_of(rgba: Image.Image) -> Image.Image:
    """A cut-out on a transparent sheet, cropped to its visible part and padded (transparent) to a square, so
    the fit sees the subject at full size rather than shrunk inside an empty margin, and whole rather than
    centre-cropped. Measured on photo-like uploads of held-out training images: a margin of 8-20 % cost the
    model 4.5-4.7 points of accuracy without it (``benchmarks/photo_robustness.py``, family ``alpha``)."""
    box = rgba.getchannel("A").getbbox()
    if box is None or box == (0, 0, *rgba.size):
        return rgba  # nothing visible, or nothing transparent around it
    subject = rgba.crop(box)
    side = max(subject.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(subject, ((side - subject.width) // 2, (side - subject.height) // 2))
    return square


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _ALPHA_MODES or image.has_transparency_data:
        rgba = _subject_of(image.convert("RGBA"))
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


@contextmanager
def pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's own decompression-bomb guard, as a second line behind decode_image's header check: while
    this is entered, Pillow refuses to open images of more than twice ``max_pixels``. The limit is a
    module global of Pillow's, so the app sets it for its lifespan only and puts the old one back after
    (setting it for good, per decoder, made one test's limit change another's decoding)."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous
