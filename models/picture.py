"""An input picture as the pipeline takes it: RGB, upright, opaque.

Applied to every picture before it is encoded, wherever it comes from (HTTP, the CLI):
- EXIF orientation is applied (phones store pictures sideways and set a flag);
- transparency is composited on white (what viewers show), never dropped to black: an alpha
  channel, a palette's transparent entries, and the single transparent colour or grey level a
  PNG's tRNS chunk gives an RGB or grey picture;
- the first frame of an animated picture is used.
"""

from __future__ import annotations

from PIL import Image, ImageOps

WHITE = (255, 255, 255)


def as_rgb(picture: Image.Image) -> Image.Image:
    """The picture upright, opaque and RGB, as a new image (an animated ``picture`` is left at
    its first frame)."""
    if getattr(picture, "n_frames", 1) > 1:
        picture.seek(0)
    upright = ImageOps.exif_transpose(picture) or picture
    # Pillow's conversion to RGBA honours a tRNS colour / transparent palette entry (alpha 0);
    # its conversion to RGB silently drops it.
    if upright.mode in ("1", "L", "P", "RGB") and "transparency" in upright.info:
        upright = upright.convert("RGBA")
    if upright.mode in ("RGBA", "LA", "PA") or upright.mode.endswith("a"):
        rgba = upright.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return upright.convert("RGB")
