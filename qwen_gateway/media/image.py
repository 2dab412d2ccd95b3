"""Checking image bytes before any engine sees them: real format, sane size, decodable."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from qwen_gateway.engines.base import ImagePart
from qwen_gateway.errors import ImageSizeInvalid, MediaError, MediaFormatInvalid
from qwen_gateway.media.sniff import sniff_image

# Pillow's plugin for each sniffed type: ``Image.open`` is limited to it, so the bytes can't be handed
# to another plugin (EPS, for one, runs Ghostscript).
_PIL_FORMAT = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
    "image/bmp": "BMP",
    "image/tiff": "TIFF",
}
# DashScope refuses an image whose width or height is 10 px or less (reference §3.3).
MIN_SIDE = 11


@dataclass(frozen=True, slots=True)
class FetchedImage:
    """An image that passed every check: its encoded bytes as received, the type sniffed from them
    (not the declared one) and the size read from its header."""

    data: bytes
    mime_type: str
    width: int
    height: int

    def to_part(self, *, min_pixels: int | None = None, max_pixels: int | None = None) -> ImagePart:
        """The engine's part for this image."""
        return ImagePart(
            data=self.data, mime_type=self.mime_type, min_pixels=min_pixels, max_pixels=max_pixels
        )


def check_image(data: bytes, *, max_pixels: int) -> FetchedImage:
    """Refuse ``data`` unless it is a whole image of a known format with a sane size.

    Blocking (decodes the image once to prove it is whole): run it off the event loop. The pixel cap is
    checked on the size the header declares, before any pixel is decoded, so a decompression bomb is
    refused at the cost of reading its header."""
    mime = sniff_image(data)
    if mime is None:
        raise MediaFormatInvalid("image")
    try:
        # Pillow's own bomb check (``Image.MAX_IMAGE_PIXELS``, a process global we leave alone) may
        # refuse first, for headers far over any sane cap; either way it's the same refusal.
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[mime]]) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageSizeInvalid.too_many_pixels(max_pixels)
            if width < MIN_SIDE or height < MIN_SIDE:
                raise ImageSizeInvalid.too_small(width, height)
            im.load()
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise ImageSizeInvalid.too_many_pixels(max_pixels) from None
    except Exception:
        # Pillow reports a bad file with many exception types (OSError, SyntaxError, ValueError,
        # struct.error, ...); whichever it is, the client gets one fixed message and no decoder text.
        raise MediaFormatInvalid("image") from None
    return FetchedImage(data=data, mime_type=mime, width=width, height=height)
