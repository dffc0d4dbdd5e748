import io
import time

import numpy as np
import pytest
from PIL import Image

from app.classification.images import image_pixels
from app.engine.errors import EmptyImage, ImageTooLarge, UnsupportedImage
from tests.support import images

SIZE = 32
LIMIT = 40_000_000


def decode(data: bytes) -> np.ndarray:
    return image_pixels(data, SIZE, LIMIT)


def test_a_32x32_png_comes_back_pixel_exact():
    original = images.pixels(32, 32)
    decoded = decode(images.encode(Image.fromarray(original), "PNG"))
    assert decoded.dtype == np.uint8 and decoded.shape == (32, 32, 3)
    assert np.array_equal(decoded, original)


def test_a_wide_image_is_centre_cropped_not_squashed():
    # 96x32: red | green | blue thirds; the centre crop is the green square.
    array = np.zeros((32, 96, 3), dtype=np.uint8)
    array[:, :32] = (255, 0, 0)
    array[:, 32:64] = (0, 255, 0)
    array[:, 64:] = (0, 0, 255)
    decoded = decode(images.encode(Image.fromarray(array), "PNG"))
    assert np.array_equal(decoded, np.broadcast_to(np.array([0, 255, 0], np.uint8), (32, 32, 3)))


def test_downscaling_is_antialiased():
    # A one-pixel checkerboard averages to mid-grey; a nearest-neighbour resize would keep pure black/white.
    board = (np.indices((256, 256)).sum(axis=0) % 2 * 255).astype(np.uint8)
    decoded = decode(images.encode(Image.fromarray(board), "PNG"))
    assert np.all(np.abs(decoded.astype(int) - 128) < 8)


def test_exif_orientation_is_applied():
    # The stored image is wide, red left and blue right; EXIF orientation 6 means "turn 90 degrees
    # clockwise", after which red is on top and blue at the bottom.
    decoded = decode(images.exif_rotated_jpeg()).astype(int)
    top, bottom = decoded[:8].mean(axis=(0, 1)), decoded[-8:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 50, "red should be on top after rotation"
    assert bottom[2] > 200 and bottom[0] < 50, "blue should be at the bottom after rotation"


def test_cmyk_jpeg_becomes_rgb_close_to_the_original():
    decoded = decode(images.cmyk_jpeg()).astype(int)
    reference = decode(images.png()).astype(int)
    assert np.abs(decoded - reference).mean() < 12


def test_16_bit_grayscale_is_scaled_not_clipped():
    data, eight_bit = images.sixteen_bit_png()
    decoded = decode(data)
    reference = decode(images.encode(Image.fromarray(eight_bit).convert("RGB"), "PNG"))
    assert np.abs(decoded.astype(int) - reference.astype(int)).max() <= 1
    assert decoded.mean() < 200, "Pillow's clipping conversion would have made it nearly white"


def test_palette_transparency_is_composited_over_white():
    # The visible right half (16 x 32) is the subject: centred on a square, its sides padded white.
    decoded = decode(images.palette_with_transparency())
    assert np.all(decoded[:, :7] == 255) and np.all(decoded[:, 25:] == 255), "the transparent sides must be white"
    assert np.all(np.abs(decoded[:, 9:23].astype(int) - (200, 30, 30)) <= 1)


def test_rgba_transparency_is_composited_over_white():
    decoded = decode(images.transparent_rgba())
    assert np.all(decoded[:, :7] == 255) and np.all(decoded[:, 25:] == 255) and np.all(decoded[:, 9:23] == 10)


def test_a_cut_out_is_fitted_by_its_visible_part_not_its_transparent_margin():
    # A 20 x 20 subject in the middle of a 100 x 100 transparent sheet: the model should see the subject whole
    # and at full size, not a small square inside a white frame.
    array = np.zeros((100, 100, 4), dtype=np.uint8)
    array[40:60, 40:60] = (30, 120, 200, 255)
    decoded = decode(images.encode(Image.fromarray(array, "RGBA"), "PNG"))
    assert np.all(np.abs(decoded.astype(int) - (30, 120, 200)) <= 1)


def test_a_fully_transparent_image_is_white():
    array = np.zeros((40, 40, 4), dtype=np.uint8)
    assert np.all(decode(images.encode(Image.fromarray(array, "RGBA"), "PNG")) == 255)


def test_animated_gif_gives_its_first_frame():
    gif, first_frame = images.animated_gif()
    assert np.array_equal(decode(gif), decode(first_frame))


@pytest.mark.parametrize("mode", ["L", "LA", "1", "P", "RGBA", "I;16", "I", "F", "CMYK", "YCbCr"])
def test_every_mode_becomes_rgb(mode):
    image = Image.fromarray(images.pixels()).convert(mode)
    format = "TIFF" if mode in ("F", "I", "YCbCr") else "PNG" if mode != "CMYK" else "JPEG"
    decoded = decode(images.encode(image, format))
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.uint8


@pytest.mark.parametrize("format", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_supported_format_decodes(format):
    decoded = decode(images.encode(Image.fromarray(images.pixels()), format))
    reference = decode(images.png())
    # GIF quantises to 256 colours and JPEG/WebP are lossy: close, not equal.
    assert np.abs(decoded.astype(int) - reference.astype(int)).mean() < 20


def test_a_12_megapixel_jpeg_is_decoded_at_reduced_scale(monkeypatch):
    from PIL import JpegImagePlugin

    decoded_sizes = []
    original_load = JpegImagePlugin.JpegImageFile.load

    def recording_load(self):
        decoded_sizes.append(self.size)  # after draft(): the size the decoder will actually produce
        return original_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", recording_load)
    photo = images.photo_jpeg(4000, 3000)
    decode(photo)
    width, height = decoded_sizes[0]
    # Scaled in the DCT by 1/8 (500x375), never below twice the 32-pixel target on the short side.
    assert width * height <= 4000 * 3000 / 16 and min(width, height) >= 64, decoded_sizes
    monkeypatch.undo()
    reference = (Image.open(io.BytesIO(photo)).convert("RGB")
                 .resize((32, 32), Image.Resampling.BILINEAR, box=(500, 0, 3500, 3000)))
    assert np.abs(decode(photo).astype(int) - np.asarray(reference).astype(int)).mean() < 3


def test_a_one_pixel_image_is_scaled_up():
    decoded = decode(images.encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"))
    assert np.all(decoded == (10, 200, 30))


def test_pillows_own_guard_follows_the_limit_only_while_set():
    from PIL import Image as PillowImage

    from app.classification.images import pillow_pixel_limit

    default = PillowImage.MAX_IMAGE_PIXELS
    with pillow_pixel_limit(1_000_000):
        assert PillowImage.MAX_IMAGE_PIXELS == 1_000_000
        # Over twice Pillow's limit, Pillow refuses while opening, before the header check could run.
        with pytest.raises(ImageTooLarge, match="more than 1000000 pixels") as refused:
            image_pixels(images.bomb_png(2000, 2000), SIZE, max_pixels=1_000_000)
    # One limit, the service's own, in its own words: not Pillow's (twice as high) nor its "DOS attack" text.
    assert "APP_MAX_IMAGE_PIXELS" in str(refused.value) and "2000000" not in str(refused.value)
    assert "decompression bomb" not in str(refused.value)
    assert PillowImage.MAX_IMAGE_PIXELS == default


def test_the_pixel_limit_is_checked_from_the_header_before_decoding():
    started = time.thread_time()  # CPU time: decoding 10^8 pixels would take seconds of it
    with pytest.raises(ImageTooLarge, match="10000x10000"):
        decode(images.bomb_png())
    assert time.thread_time() - started < 0.05
    with pytest.raises(ImageTooLarge):
        image_pixels(images.png(100, 100), SIZE, max_pixels=99 * 100)


@pytest.mark.parametrize("data", [
    images.TEXT, images.PDF, images.SVG, images.png()[:200], images.jpeg(64, 64)[:300], images.corrupt_png(),
    b"\x89PNG\r\n\x1a\n", bytes(range(256)) * 4,
], ids=["text", "pdf", "svg", "truncated-png", "truncated-jpeg", "corrupt-png", "png-signature-only", "noise"])
def test_what_is_not_a_decodable_image_is_unsupported(data):
    with pytest.raises(UnsupportedImage, match="JPEG, PNG|could not be decoded"):
        decode(data)


def test_an_empty_upload_is_empty():
    with pytest.raises(EmptyImage):
        decode(b"")
