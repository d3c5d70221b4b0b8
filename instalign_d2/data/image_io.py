"""Read any image file as 3-channel uint8, EXIF orientation applied.

Detectron2's ``read_image`` is this, except for high-bit-depth files: PIL converts a 16-bit
greyscale PNG to RGB by clipping at 255 (almost all white). We scale such images to 8 bits
first; every other mode (greyscale, palette, RGBA, CMYK, ...) takes Detectron2's path
(``convert_PIL_to_numpy``) unchanged.
"""

from __future__ import annotations

import numpy as np
from detectron2.data.detection_utils import convert_PIL_to_numpy
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

SUPPORTED_FORMATS = ("RGB", "BGR")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_8bit(image: Image.Image) -> Image.Image:
    """An "L" image of a 16-bit, 32-bit integer or float greyscale image, scaled to 0-255."""
    values = np.asarray(image).astype(np.float64)
    if image.mode in SIXTEEN_BIT_MODES:
        values = values / 257.0
    elif image.mode == "F":
        # floats: [0, 1] images are scaled, others taken as already 0-255
        values = values * 255.0 if values.size and values.max() <= 1.0 else values
    elif values.size and values.max() > 255:  # "I": usually 16-bit data that PIL widened
        values = values / (257.0 if values.max() <= 65535 else values.max() / 255.0)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def read_image_uint8(file_name: str, image_format: str = "RGB") -> np.ndarray:
    """``uint8 (H, W, 3)`` in ``image_format`` ("RGB" or "BGR"), EXIF orientation applied.

    Raises whatever PIL raises for a missing, truncated or non-image file (``OSError`` and
    subclasses such as ``UnidentifiedImageError``).
    """
    if image_format not in SUPPORTED_FORMATS:
        raise ValueError(
            f"INPUT.FORMAT={image_format!r}: the GRES mapper supports {SUPPORTED_FORMATS}"
        )
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in SIXTEEN_BIT_MODES + ("I", "F"):
            image = to_8bit(image)
        array = convert_PIL_to_numpy(image, image_format)
    return np.ascontiguousarray(array, dtype=np.uint8)
