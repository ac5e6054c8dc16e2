"""Image checks at load time and RGB conversion at access time.

Processors of every model family expect 8-bit RGB. PIL's plain `convert("RGB")` turns transparent
pixels black and clips 16-bit images to white, so those cases are handled here explicitly.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from dopd_vlm.errors import one_line

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


# Qwen-VL image processors (every supported vision family) reject images whose longer side is
# more than 200 times the shorter one (`smart_resize`); anything smaller is resized to their
# min/max pixel budget, so a 1x1 image is fine (upsampled to the minimum, e.g. 56x56).
MAX_ASPECT_RATIO = 200


class ImageProblem(ValueError):
    """An image that cannot be used; the message is one short line without the file name."""


def check_image(source: Path | bytes) -> tuple[int, int]:
    """Raise `ImageProblem` if `source` (a file or encoded bytes) is not a complete, decodable
    image the model processors accept; return its (width, height).

    `verify()` checks the container (PNG checksums) but not every format's pixel data, and it
    leaves the image unusable, so the image is opened a second time and fully decoded. Images
    above PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, twice that is an error)
    and extreme aspect ratios are refused here rather than at the first training step.
    """
    if (len(source) if isinstance(source, bytes) else source.stat().st_size) == 0:
        raise ImageProblem("empty file (0 bytes)" if isinstance(source, Path) else "empty (0 bytes)")
    try:
        with Image.open(_as_file(source)) as image:
            image.verify()
        with Image.open(_as_file(source)) as image:
            image.load()
            width, height = image.size
    except Image.UnidentifiedImageError:
        raise ImageProblem("cannot decode: not an image (unrecognised format)") from None
    except Exception as error:  # PIL raises many types for undecodable data
        raise ImageProblem(f"cannot decode: {one_line(error)}") from None
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageProblem(
            f"{width}x{height} pixels: aspect ratio above {MAX_ASPECT_RATIO}:1, which the "
            "Qwen-VL image processors reject"
        )
    return width, height


def _as_file(source: Path | bytes) -> Path | io.BytesIO:
    return io.BytesIO(source) if isinstance(source, bytes) else source


def png_bytes(image: Image.Image) -> bytes:
    """Lossless, deterministic encoding for images generated in memory."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
