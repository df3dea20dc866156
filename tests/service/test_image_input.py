"""service/image_input.py and the size rule of service/image_requests.py, without a server: every
accepted format decodes to upright opaque RGB; every other file, corrupt or truncated data and a
picture declaring too many pixels is a 4xx naming the field and the problem, the pixel count read
from the header before anything is decoded (Pillow's own bomb warning never fires)."""

from __future__ import annotations

import base64
import io
import struct
import time
import warnings
import zlib

import pytest
from PIL import Image

from models.pipeline import Limits
from service.errors import ServiceError
from service.image_input import decode_base64_image, decode_image, sniff_format
from service.image_requests import image_defaults, output_size
from service.settings import PILLOW_MAX_IMAGE_PIXELS

MAX_PIXELS = 4096 * 4096


def encode(image: Image.Image, kind: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def refused(data: bytes, max_pixels: int = MAX_PIXELS) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        decode_image(data, max_pixels=max_pixels)
    error = caught.value
    assert error.field == "image" and error.message.startswith("image: "), error.message
    return error


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height RGB pixels, with a few bytes of IDAT: a
    decompression bomb's shape (decoding it would allocate width x height x 3 bytes)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is rewritten to declare width x height."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (9, 9, 9)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_declaring(width: int, height: int) -> bytes:
    """A WebP (VP8X: an extended file, here with EXIF) whose canvas header declares
    width x height."""
    exif = Image.Exif()
    exif[0x0112] = 1
    picture = Image.new("RGB", (16, 16), (1, 2, 3))
    data = bytearray(encode(picture, "WEBP", lossless=True, exif=exif))
    assert data[12:16] == b"VP8X"
    data[24:27] = (width - 1).to_bytes(3, "little")
    data[27:30] = (height - 1).to_bytes(3, "little")
    return bytes(data)


# ------------------------------------------------------------------------- accepted formats


@pytest.mark.parametrize(
    ("kind", "options"),
    [("PNG", {}), ("JPEG", {"quality": 95}), ("WEBP", {"lossless": True})],
)
def test_png_jpeg_and_webp_decode_to_rgb_of_their_size(kind: str, options: dict) -> None:
    data = encode(Image.new("RGB", (40, 24), (200, 30, 30)), kind, **options)
    assert sniff_format(data) == kind
    image = decode_image(data, max_pixels=MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (40, 24)
    assert all(abs(a - b) <= 3 for a, b in zip(image.getpixel((20, 12)), (200, 30, 30)))


def test_cmyk_jpeg_and_grey_and_palette_images_become_rgb() -> None:
    for source in (
        Image.new("CMYK", (8, 8), (0, 255, 255, 0)),
        Image.new("L", (8, 8), 77),
        Image.new("1", (8, 8), 1),
        Image.new("RGB", (8, 8), (5, 6, 7)).convert("P"),
    ):
        kind = "JPEG" if source.mode == "CMYK" else "PNG"
        image = decode_image(encode(source, kind), max_pixels=MAX_PIXELS)
        assert image.mode == "RGB" and image.size == (8, 8), source.mode


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    for level, expected in ((65535, 255), (100 * 257, 100), (0, 0)):
        grey = Image.new("I;16", (4, 4), level)
        image = decode_image(encode(grey), max_pixels=MAX_PIXELS)
        assert image.getpixel((0, 0)) == (expected,) * 3, level


def test_an_animated_image_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((250, 0, 0), (0, 250, 0))]
    for kind, options in (("PNG", {}), ("WEBP", {"lossless": True})):
        data = encode(frames[0], kind, save_all=True, append_images=frames[1:], **options)
        assert decode_image(data, max_pixels=MAX_PIXELS).getpixel((4, 4)) == (250, 0, 0), kind


# --------------------------------------------------------------------- orientation and alpha


@pytest.mark.parametrize(
    ("orientation", "size", "red_corner"),
    [
        (1, (40, 20), (0, 0)),
        (3, (40, 20), (39, 19)),
        (6, (20, 40), (19, 0)),
        (8, (20, 40), (0, 39)),
    ],
)
def test_exif_orientation_is_applied(
    orientation: int, size: tuple[int, int], red_corner: tuple[int, int]
) -> None:
    picture = Image.new("RGB", (40, 20), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, 6, 6))  # a red top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = decode_image(encode(picture, "JPEG", quality=95, exif=exif), max_pixels=MAX_PIXELS)
    assert image.size == size
    red = image.getpixel(red_corner)
    assert red[0] > 200 and red[2] < 60, (orientation, red)


@pytest.mark.parametrize("kind", ["JPEG", "PNG", "WEBP"])
def test_broken_exif_data_is_ignored(kind: str) -> None:
    # Pillow drops this block when it opens a JPEG; for PNG and WebP exif_transpose raises on it.
    picture = encode(Image.new("RGB", (8, 4), (0, 200, 0)), kind, exif=b"Exif\x00\x00junk")
    assert decode_image(picture, max_pixels=MAX_PIXELS).size == (8, 4)


def test_alpha_is_composited_on_white() -> None:
    half_red = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    cases = {
        "RGBA half transparent": (encode(half_red), (255, 127, 127)),
        "RGBA fully transparent": (encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0))), (255,) * 3),
        "LA": (encode(Image.new("LA", (4, 4), (0, 0))), (255,) * 3),
        "WebP with alpha": (encode(half_red, "WEBP", lossless=True), (255, 127, 127)),
        "grey with tRNS": (encode(Image.new("L", (4, 4), 9), transparency=9), (255,) * 3),
        "RGB with tRNS": (
            encode(Image.new("RGB", (4, 4), (1, 2, 3)), transparency=(1, 2, 3)),
            (255,) * 3,
        ),
    }
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] * 256)
    cases["P with transparency"] = (encode(palette, transparency=0), (255,) * 3)
    for name, (data, expected) in cases.items():
        image = decode_image(data, max_pixels=MAX_PIXELS)
        assert image.mode == "RGB", name
        got = image.getpixel((1, 1))
        assert all(abs(a - b) <= 1 for a, b in zip(got, expected)), (name, got)


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (encode(Image.new("RGB", (4, 4)), "GIF"), "GIF is not accepted"),
        (encode(Image.new("RGB", (4, 4)), "BMP"), "BMP is not accepted"),
        (encode(Image.new("RGB", (4, 4)), "TIFF"), "TIFF is not accepted"),
        (b"%PDF-1.7\n...", "PDF is not accepted"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "SVG is not accepted"),
        (b"\x00\x00\x00\x1cftypavif" + b"\0" * 20, "AVIF is not accepted"),
        (b"plain text, not a picture", "not an image file this server reads"),
    ],
    ids=["gif", "bmp", "tiff", "pdf", "svg", "avif", "text"],
)
def test_other_formats_are_refused_naming_the_accepted_ones(data: bytes, named: str) -> None:
    error = refused(data)
    assert error.status == 422 and error.code == "invalid_field"
    assert "accepted formats: PNG, JPEG or WebP" in error.message
    assert named in error.message, error.message


def test_an_empty_file_is_refused() -> None:
    assert "empty" in refused(b"").message


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "WEBP"])
def test_truncated_and_corrupt_files_are_refused(kind: str) -> None:
    picture = Image.effect_noise((64, 64), 50).convert("RGB")
    data = encode(picture, kind, **({"lossless": True} if kind == "WEBP" else {}))
    for broken in (data[: len(data) // 2], data[:40], data[:12] + b"\x00" * (len(data) - 12)):
        error = refused(broken)
        assert error.status == 422 and "corrupt or truncated" in error.message, kind


@pytest.mark.parametrize("declaring", [png_declaring, jpeg_declaring, webp_declaring])
def test_too_many_pixels_is_refused_from_the_header_without_decoding(declaring) -> None:
    bomb = declaring(50_000, 40_000)  # 2 gigapixels: 6 GB as RGB, above Pillow's own limits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would raise here
        started = time.perf_counter()
        error = refused(bomb)
    assert time.perf_counter() - started < 1.0
    assert error.status == 422
    assert "50000x40000 = 2000000000 pixels" in error.message
    assert f"limit is {MAX_PIXELS} pixels (CASCADE_MAX_IMAGE_PIXELS)" in error.message


def test_the_pixel_limit_is_inclusive() -> None:
    data = encode(Image.new("RGB", (100, 50)))
    assert decode_image(data, max_pixels=5000).size == (100, 50)
    assert "5000 pixels; the limit is 4999" in refused(data, max_pixels=4999).message


def test_pillow_bomb_threshold_constant_matches_pillow() -> None:
    assert Image.MAX_IMAGE_PIXELS == PILLOW_MAX_IMAGE_PIXELS


# ------------------------------------------------------------------------------- base64


def test_base64_and_data_urls_decode() -> None:
    data = encode(Image.new("RGB", (12, 10), (0, 0, 200)))
    text = base64.b64encode(data).decode()
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    for given in (text, wrapped, f"data:image/png;base64,{text}", f"DATA:image/jpeg;base64,{text}"):
        image = decode_base64_image(given, max_bytes=10**6, max_pixels=MAX_PIXELS)
        assert image.size == (12, 10)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("not base64 at all!", "not valid base64"),
        ("QUJD" + "é", "not valid base64"),
        ("data:text/plain;base64,QUJD", "a data URL of 'text/plain'"),
        ("data:image/png,rawbytes", "not base64-encoded"),
        ("data:image/png;base64", "not a valid data URL"),
    ],
)
def test_bad_base64_is_refused(text: str, words: str) -> None:
    with pytest.raises(ServiceError) as caught:
        decode_base64_image(text, max_bytes=10**6, max_pixels=MAX_PIXELS)
    assert caught.value.status == 422 and caught.value.field == "image"
    assert words in caught.value.message


def test_too_many_bytes_is_413_before_decoding() -> None:
    data = encode(Image.new("RGB", (64, 64)))
    text = base64.b64encode(data).decode()
    with pytest.raises(ServiceError) as caught:
        decode_base64_image(text, max_bytes=len(data) - 1, max_pixels=MAX_PIXELS)
    error = caught.value
    assert (error.status, error.code) == (413, "image_too_large")
    assert f"{len(data)} bytes; the limit is {len(data) - 1} bytes" in error.message
    assert "CASCADE_MAX_IMAGE_BYTES" in error.message
    assert decode_base64_image(text, max_bytes=len(data), max_pixels=MAX_PIXELS).size == (64, 64)
    # counted from the text's length: 100 MB of "A" is refused without being decoded
    started = time.perf_counter()
    with pytest.raises(ServiceError):
        decode_base64_image("A" * 100_000_000, max_bytes=8 << 20, max_pixels=MAX_PIXELS)
    assert time.perf_counter() - started < 2.0


# ------------------------------------------------------------- defaults and output size


def test_defaults_follow_the_official_recipes() -> None:
    assert image_defaults("", None, None) == (1.0, True)  # variation: from noise
    assert image_defaults("  ", None, None) == (1.0, True)
    assert image_defaults("a cat", None, None) == (0.8, False)  # the img2img example
    assert image_defaults("a cat", 0.5, True) == (0.5, True)
    assert image_defaults("", 0.3, None) == (0.3, True)


@pytest.mark.parametrize(
    ("prompt", "strength", "variation", "field"),
    [
        ("a cat", 1.0, None, "strength"),
        ("", None, False, "image_variation"),
        ("x", 1, False, "strength"),
    ],
)
def test_an_image_that_would_not_be_used_is_refused(
    prompt: str, strength: float | None, variation: bool | None, field: str
) -> None:
    with pytest.raises(ServiceError) as caught:
        image_defaults(prompt, strength, variation)
    assert caught.value.field == field and "would not be used" in caught.value.message


LIMITS = Limits(min_size=64, max_size=512, size_step=8)


@pytest.mark.parametrize(
    ("image_size", "width", "height", "expected"),
    [
        ((100, 60), None, None, (104, 64)),  # nearest multiples of 8
        ((128, 128), None, None, (128, 128)),
        ((1200, 600), None, None, (512, 256)),  # larger than max: scaled, aspect ratio kept
        ((600, 1200), None, None, (256, 512)),
        ((20, 20), None, None, (64, 64)),  # smaller than min
        ((300, 200), 256, None, (256, 168)),  # one side given: the other follows the image
        ((300, 200), None, 128, (192, 128)),
        ((300, 200), 96, 72, (96, 72)),  # both given: as they are
    ],
)
def test_output_size_from_the_image(image_size, width, height, expected) -> None:
    assert output_size(LIMITS, image_size, width, height) == expected
