"""An input picture as the pipeline takes it: RGB, upright, opaque.

Applied to every picture before it is encoded, wherever it comes from (HTTP, the CLI):
- EXIF orientation is applied (phones store pictures sideways and set a flag);
- transparency is composited on white (what viewers show), never dropped to black;
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
    if upright.mode == "P":
        upright = upright.convert("RGBA" if "transparency" in upright.info else "RGB")
    if upright.mode in ("RGBA", "LA", "PA") or upright.mode.endswith("a"):
        rgba = upright.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return upright.convert("RGB")
