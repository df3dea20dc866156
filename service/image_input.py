"""Input images (image-to-image, image variation): base64 text or file bytes -> an RGB PIL image,
or an error naming the field and what is wrong with it. No torch; runs in the encode thread pool.

The rules, in order, each failure a 4xx naming the field (``image``):

1. base64 (optionally a ``data:image/...;base64,`` URL; whitespace is ignored), decoded size at
   most ``max_bytes`` (413, checked from the text's length before decoding);
2. PNG, JPEG or WebP by their magic bytes (the declared media type and file name are not
   trusted); anything else is refused naming the accepted formats and, when recognisable, what
   it is;
3. width x height at most ``max_pixels``, read from the header before any pixel is decoded
   (decompression bombs: a few KB of PNG can declare gigapixels);
4. decoding: corrupt or truncated data is refused, never half-read;
5. EXIF orientation applied (broken EXIF ignored); alpha (RGBA, LA, P or RGB with a transparent
   colour) composited on white; 16-bit grey scaled to 8 bits; result RGB. Animated images: the
   first frame.

Step 5 is models/picture.py's ``as_rgb`` (Pillow only, no torch), the rule the CLI applies too,
so a picture gives the same pixels over HTTP and on the command line.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct

from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from models.picture import as_rgb
from service.errors import ImageTooLarge, InvalidRequest

ACCEPTED = "PNG, JPEG or WebP"
# Pillow's bomb guard sits in Image.open (a warning above Image.MAX_IMAGE_PIXELS, an error above
# twice that). The plugins are opened directly instead, after our own check of the header, so an
# image is refused by our limit with our message and Pillow's warning never fires.
_PLUGINS: dict[str, type[ImageFile.ImageFile]] = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.JpegImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
}
# Formats worth naming when refused: (magic at offset, offset, name)
_OTHER_FORMATS = (
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"%PDF", 0, "PDF"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\xff\x0a", 0, "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", 0, "JPEG XL"),
    (b"ftypavif", 4, "AVIF"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"8BPS", 0, "Photoshop"),
)
_DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)
# Exceptions Pillow raises for bad files: OSError (truncated, broken stream), SyntaxError (a bad
# header), ValueError (e.g. a text chunk over MAX_TEXT_CHUNK), struct.error, EOFError, and
# DecompressionBombError if anything slips past our own check.
_BAD_FILE = (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, KeyError)


def decode_base64_image(
    text: str, *, max_bytes: int, max_pixels: int, field: str = "image"
) -> Image.Image:
    """A base64 string (or a base64 ``data:`` URL) -> RGB image; see the module docstring."""
    payload = text
    match = _DATA_URL.match(text)
    if match is not None:
        media_type = match.group("type").strip().lower()
        if media_type and not media_type.startswith("image/"):
            raise InvalidRequest(
                f"{field}: a data URL of {media_type!r}; send an image "
                "(data:image/png;base64,... or the base64 text alone)",
                field=field,
            )
        if "base64" not in match.group("params").lower():
            raise InvalidRequest(
                f"{field}: the data URL is not base64-encoded; send data:image/png;base64,... "
                "(or the base64 text alone)",
                field=field,
            )
        payload = text[match.end() :]
    elif text.lstrip()[:5].lower() == "data:":
        raise InvalidRequest(
            f"{field}: not a valid data URL; send data:image/png;base64,... or the base64 text "
            "alone",
            field=field,
        )
    payload = "".join(payload.split())  # base64 wrapped at 76 characters is common
    padding = len(payload) - len(payload.rstrip("="))
    size = len(payload) * 3 // 4 - min(padding, 2)
    check_file_size(size, max_bytes, field)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            f"{field}: not valid base64 (the standard alphabet A-Z a-z 0-9 + /, padded with =); "
            "send the image file base64-encoded, or a data:image/...;base64, URL",
            field=field,
        ) from None
    return decode_image(data, max_pixels=max_pixels, field=field)


def check_file_size(size: int, max_bytes: int, field: str = "image") -> None:
    """413 when an image file is over ``max_bytes`` (CASCADE_MAX_IMAGE_BYTES)."""
    if size > max_bytes:
        raise ImageTooLarge(
            f"{field}: the image file is {size} bytes; the limit is {max_bytes} bytes "
            "(CASCADE_MAX_IMAGE_BYTES): send a smaller file (a JPEG or WebP, or fewer pixels)",
            field=field,
        )


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG or WEBP from the first bytes; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _other_format(data: bytes) -> str | None:
    for magic, offset, name in _OTHER_FORMATS:
        if data[offset : offset + len(magic)] == magic:
            return name
    head = data[:256].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml")) and b"<svg" in data[:4096].lower():
        return "SVG"
    return None


def _webp_canvas(data: bytes) -> tuple[int, int] | None:
    """A WebP file's canvas size from its first chunk header (VP8, VP8L or VP8X), None if the
    header is too short or unknown. Read before Pillow creates its decoder, which allocates the
    whole canvas at once."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None


def decode_image(data: bytes, *, max_pixels: int, field: str = "image") -> Image.Image:
    """An image file's bytes -> RGB image; see the module docstring. Raises InvalidRequest."""
    if not data:
        raise InvalidRequest(f"{field}: the image is empty; send a {ACCEPTED} file", field=field)
    kind = sniff_format(data)
    if kind is None:
        other = _other_format(data)
        what = f"{other} is not accepted" if other else "not an image file this server reads"
        raise InvalidRequest(
            f"{field}: {what}; accepted formats: {ACCEPTED} (detected by the file's content)",
            field=field,
        )
    corrupt = InvalidRequest(
        f"{field}: the {kind.replace('WEBP', 'WebP')} file is corrupt or truncated; send the "
        "whole file",
        field=field,
    )
    if kind == "WEBP":
        canvas = _webp_canvas(data)
        if canvas is None:
            raise corrupt
        _check_pixels(canvas, max_pixels, field)
    try:
        image = _PLUGINS[kind](io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise _too_many_pixels(None, max_pixels, field) from None
    except _BAD_FILE:
        raise corrupt from None
    _check_pixels(image.size, max_pixels, field)
    try:
        image.load()  # the first frame of an animated image
        return as_rgb(image)
    except Image.DecompressionBombError:
        raise _too_many_pixels(None, max_pixels, field) from None
    except _BAD_FILE:
        raise corrupt from None
    finally:
        image.close()


def _check_pixels(size: tuple[int, int], max_pixels: int, field: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InvalidRequest(f"{field}: the image is {width}x{height} pixels", field=field)
    if width * height > max_pixels:
        raise _too_many_pixels(size, max_pixels, field)


def _too_many_pixels(size: tuple[int, int] | None, max_pixels: int, field: str) -> InvalidRequest:
    what = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels" if size else "too many pixels"
    return InvalidRequest(
        f"{field}: the image is {what}; the limit is {max_pixels} pixels "
        "(CASCADE_MAX_IMAGE_PIXELS): scale it down before sending",
        field=field,
    )
