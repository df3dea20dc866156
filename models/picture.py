"""An input picture as the pipeline takes it: RGB, upright, opaque, 8 bits a channel.

Applied to every picture before it is encoded, wherever it comes from (HTTP, the CLI):
- EXIF orientation is applied (phones store pictures sideways and set a flag); EXIF that cannot
  be parsed is ignored and the picture used as stored: it says nothing reliable about
  orientation, and the pixels are still a picture;
- transparency is composited on white (what viewers show), never dropped to black: an alpha
  channel, a palette's transparent entries, and the single transparent colour or grey level a
  PNG's tRNS chunk gives an RGB, grey or 16-bit grey picture;
- deep grey is scaled to 8 bits, not clipped at 255: 16-bit grey (``I;16``) and 32-bit integer
  (``I``, read on the same 0 .. 65535 scale: Pillow's older mode for 16-bit PNGs) take the high
  byte, values outside the scale clipped; floating point (``F``) is read as 0.0 (black) ..
  1.0 (white), the usual range of float pictures, values outside it clipped;
- the first frame of an animated picture is used.

Decoding errors (a truncated or corrupt file) are not caught here: they are the caller's to
report, as the HTTP service and the CLI each do.
"""

from __future__ import annotations

import struct

from PIL import Image, ImageChops, ImageOps

WHITE = (255, 255, 255)
_DEEP_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# What Pillow's EXIF parsing raises for a broken block (a bad TIFF header, offsets past its end,
# values of the wrong type or count).
_BROKEN_EXIF = (
    SyntaxError,
    OSError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    EOFError,
    ZeroDivisionError,
    struct.error,
)


def as_rgb(picture: Image.Image) -> Image.Image:
    """The picture upright, opaque, 8-bit RGB, as a new image without EXIF (its orientation has
    been applied); see the module docstring. An animated ``picture`` is left at its first
    frame."""
    if getattr(picture, "n_frames", 1) > 1:
        picture.seek(0)
    picture.load()  # outside the EXIF guard below: a decoding error must still raise
    upright = _upright(picture)
    upright.info.pop("exif", None)
    if upright.mode in _DEEP_GREY:
        upright = _eight_bit_grey(upright)
    # Pillow's conversion to RGBA honours a tRNS colour / transparent palette entry (alpha 0);
    # its conversion to RGB silently drops it.
    if upright.mode in ("1", "L", "P", "RGB") and "transparency" in upright.info:
        upright = upright.convert("RGBA")
    if upright.mode in ("RGBA", "LA", "PA") or upright.mode.endswith("a"):
        rgba = upright.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return upright.convert("RGB")


def _upright(picture: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(picture) or picture
    except _BROKEN_EXIF:
        return picture.copy()


def _eight_bit_grey(picture: Image.Image) -> Image.Image:
    """A deep grey picture (``_DEEP_GREY``) as 8-bit ``L``, or ``LA`` when a tRNS grey level
    makes some pixels transparent."""
    if picture.mode == "F":
        grey = picture.point(lambda v: v * 255 + 0.5).convert("L")  # F -> L truncates: rounded
        return _without_transparency(grey)
    levels = picture.convert("I")
    grey = _without_transparency(levels.point(lambda v: v / 256).convert("L"))  # v >> 8, clipped
    transparent = picture.info.get("transparency")
    if isinstance(transparent, int):
        # The mask is taken from the full-depth levels: after scaling, the 255 levels next to the
        # transparent one would share its 8-bit value. Pillow's point() on 32-bit levels only
        # scales and offsets, so "level != transparent" is built as the larger of the two clipped
        # differences times 255: 0 at the transparent level, 255 (opaque) anywhere else.
        above = levels.point(lambda v: (v - transparent) * 255).convert("L")
        below = levels.point(lambda v: (transparent - v) * 255).convert("L")
        grey.putalpha(ImageChops.lighter(above, below))
    return grey


def _without_transparency(picture: Image.Image) -> Image.Image:
    # A copied tRNS level is on the full-depth scale, meaningless for the 8-bit picture.
    picture.info.pop("transparency", None)
    return picture
