"""Input pictures are made upright, opaque and RGB before encoding (models/picture.py)."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageOps

from models.picture import as_rgb


def _reopened(picture: Image.Image, fmt: str, **save) -> Image.Image:
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **save)
    buffer.seek(0)
    return Image.open(buffer)


def test_exif_orientation_is_applied():
    picture = Image.new("RGB", (40, 20), (255, 0, 0))
    picture.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = picture.getexif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    upright = as_rgb(_reopened(picture, "PNG", exif=exif))
    assert upright.size == (20, 40) and upright.mode == "RGB"
    assert upright.getpixel((10, 2))[2] > 200  # the blue side is now at the top
    assert upright.getpixel((10, 37))[0] > 200


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    out = as_rgb(_reopened(rgba, "PNG"))
    assert out.getpixel((3, 3)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert all(126 <= v <= 128 for v in out.getpixel((1, 0)))  # half black on white
    grey = as_rgb(Image.new("LA", (2, 2), (0, 0)))
    assert grey.getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.info["transparency"] = 0
    assert as_rgb(palette).getpixel((0, 0)) == (255, 255, 255)


def test_an_animated_picture_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 255, 0), (255, 0, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    animated = Image.open(buffer)
    animated.seek(1)
    assert as_rgb(animated).getpixel((4, 4)) == (0, 255, 0)


def test_a_trns_colour_is_composited_on_white():
    rgb = Image.new("RGB", (2, 1), (1, 2, 3))
    rgb.putpixel((1, 0), (1, 2, 4))  # one step off the transparent colour: kept
    out = as_rgb(_reopened(rgb, "PNG", transparency=(1, 2, 3)))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (1, 2, 4)
    grey = Image.new("L", (2, 1), 9)
    grey.putpixel((1, 0), 10)
    out = as_rgb(_reopened(grey, "PNG", transparency=9))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 10, 10)
    one_bit = as_rgb(_reopened(Image.new("1", (2, 1), 1), "PNG", transparency=1))
    assert one_bit.getpixel((0, 0)) == (255, 255, 255)


def test_a_trns_level_in_16_bit_grey_is_matched_at_full_depth():
    deep = Image.new("I;16", (3, 1), 100 * 257)
    deep.putpixel((1, 0), 100 * 257 + 1)  # the same 8-bit grey, but not the transparent level
    deep.putpixel((2, 0), 0)
    out = as_rgb(_reopened(deep, "PNG", transparency=100 * 257))
    assert [out.getpixel((x, 0)) for x in range(3)] == [(255,) * 3, (100,) * 3, (0,) * 3]


def test_deep_grey_is_scaled_to_8_bits_not_clipped():
    for level, expected in ((32768, 128), (100 * 257, 100), (65535, 255), (0, 0), (255, 0)):
        sixteen = _reopened(Image.new("I;16", (2, 2), level), "PNG")
        assert sixteen.mode == "I;16"
        assert as_rgb(sixteen).getpixel((0, 0)) == (expected,) * 3, level
    # 32-bit integers on the same 0 .. 65535 scale, clipped outside it
    for level, expected in ((32768, 128), (-5, 0), (1 << 20, 255)):
        assert as_rgb(Image.new("I", (2, 2), level)).getpixel((0, 0)) == (expected,) * 3, level
    # floats as 0.0 .. 1.0, clipped outside it
    for level, expected in ((0.5, 128), (1.0, 255), (-0.5, 0), (2.0, 255)):
        assert as_rgb(Image.new("F", (2, 2), level)).getpixel((0, 0)) == (expected,) * 3, level


def test_broken_exif_leaves_the_picture_as_stored():
    picture = Image.new("RGB", (8, 4), (0, 200, 0))
    broken = b"Exif\x00\x00garbage"  # not a TIFF header
    with pytest.raises(SyntaxError):  # what the test is about: Pillow fails on this block
        ImageOps.exif_transpose(_reopened(picture, "PNG", exif=broken))
    out = as_rgb(_reopened(picture, "PNG", exif=broken))
    assert out.size == (8, 4) and out.getpixel((0, 0)) == (0, 200, 0)
    assert "exif" not in out.info  # nothing left for a later getexif() to fail on


def test_a_file_that_cannot_be_decoded_still_raises():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, "PNG")
    truncated = Image.open(io.BytesIO(buffer.getvalue()[:60]))
    with pytest.raises(OSError, match="truncated"):
        as_rgb(truncated)
