"""Image checks at load time and RGB conversion at access time.

Processors of every model family expect 8-bit RGB. PIL's plain `convert("RGB")` turns transparent
pixels black and clips 16-bit images to white, so those cases are handled here explicitly.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of any PIL image (RGB input is returned as is).

    Transparency (RGBA, LA, PA, palette with a transparent index) is composited on white;
    integer modes ("I", "I;16", ...) are taken as 16-bit and scaled to 8 bits; CMYK, grayscale,
    bilevel and palette images use PIL's conversion.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "I" or image.mode.startswith("I;16"):
        pixels = np.asarray(image.convert("I"), dtype=np.int64)
        return Image.fromarray(np.clip(pixels >> 8, 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def check_image(source: Path | bytes) -> None:
    """Raise if `source` (a file or encoded bytes) is not a complete, decodable image.

    `verify()` checks the container (PNG checksums) but not every format's pixel data, and it
    leaves the image unusable, so the image is opened a second time and fully decoded.
    """
    with Image.open(_as_file(source)) as image:
        image.verify()
    with Image.open(_as_file(source)) as image:
        image.load()


def _as_file(source: Path | bytes) -> Path | io.BytesIO:
    return io.BytesIO(source) if isinstance(source, bytes) else source


def png_bytes(image: Image.Image) -> bytes:
    """Lossless, deterministic encoding for images generated in memory."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
