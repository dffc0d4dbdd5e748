"""Image files for the service's tests, each made here from a few pixels: valid ones of every awkward kind,
and broken ones. All deterministic."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw


def pixels(width: int = 48, height: int = 40, seed: int = 0) -> np.ndarray:
    """A gradient with fixed noise: not a flat colour, so different images get different predictions."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), np.full_like(x, 128)], axis=-1)
    return np.clip(base + rng.integers(-40, 40, size=(height, width, 3)), 0, 255).astype(np.uint8)


def encode(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png(width: int = 48, height: int = 40, seed: int = 0) -> bytes:
    return encode(Image.fromarray(pixels(width, height, seed)), "PNG")


def jpeg(width: int = 48, height: int = 40, seed: int = 0, quality: int = 95) -> bytes:
    return encode(Image.fromarray(pixels(width, height, seed)), "JPEG", quality=quality)


def photo_jpeg(width: int = 4000, height: int = 3000) -> bytes:
    """A smooth, photo-like JPEG (gradients and a disc) of ``width`` x ``height`` pixels."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    image = Image.fromarray(array.astype(np.uint8))
    ImageDraw.Draw(image).ellipse((width // 4, height // 6, 3 * width // 4, 5 * height // 6), fill=(250, 200, 20))
    return encode(image, "JPEG", quality=90)


def two_halves(width: int = 64, height: int = 32) -> Image.Image:
    """Left half red, right half blue: which way it is turned shows in the decoded pixels."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = (255, 0, 0)
    array[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(array)


def exif_rotated_jpeg() -> bytes:
    """A wide red|blue JPEG whose EXIF says "rotate 90 degrees clockwise to view" (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(two_halves(), "JPEG", quality=95, exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    return encode(Image.fromarray(pixels()).convert("CMYK"), "JPEG", quality=95)


def sixteen_bit_png() -> tuple[bytes, np.ndarray]:
    """A 16-bit grayscale PNG of mid-to-high values (which Pillow's own I;16 -> L conversion would clip to
    white), and the 8-bit values it stands for."""
    eight = pixels(seed=3)[..., 0] // 2 + 64
    sixteen = eight.astype(np.uint16) * 257
    return encode(Image.fromarray(sixteen), "PNG"), eight


def palette_with_transparency() -> bytes:
    """A palette PNG whose colour 0 is transparent: the left half, which must come out white."""
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0] + [200, 30, 30] + [0] * 762)
    image.paste(1, (16, 0, 32, 32))
    return encode(image, "PNG", transparency=0)


def transparent_rgba() -> bytes:
    array = np.zeros((32, 32, 4), dtype=np.uint8)
    array[..., :3] = 10
    array[:, 16:, 3] = 255  # left half fully transparent black, right half opaque dark grey
    return encode(Image.fromarray(array, "RGBA"), "PNG")


def gray_alpha_png() -> bytes:
    return encode(Image.fromarray(pixels()).convert("LA"), "PNG")


def animated_gif() -> tuple[bytes, bytes]:
    """A two-frame GIF (green, then magenta) and its first frame alone as a PNG."""
    first = Image.new("RGB", (32, 32), (0, 200, 0))
    second = Image.new("RGB", (32, 32), (200, 0, 200))
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0), encode(first, "PNG")


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A PNG header claiming ``width`` x ``height`` pixels, with a tiny body: only a decoder that trusted
    the header would try to allocate it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def corrupt_png() -> bytes:
    """A PNG with flipped bytes in its image data, so the chunk's CRC no longer matches."""
    data = bytearray(png(64, 64))
    start = data.index(b"IDAT") + 20
    data[start: start + 16] = bytes(255 - b for b in data[start: start + 16])
    return bytes(data)


PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32"><rect width="32" height="32"/></svg>'
TEXT = b"this is not an image, just some text\n"
