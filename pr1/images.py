"""Any image input (PIL image, uint8 array, encoded bytes, file path) as an HxWx3 uint8 RGB array.

One decoder for everything that reads pixels: the processor before patchifying, the data loader
when it opens a row, and the server engines before they PNG-encode an image for the wire, so every
path sees the same pixels. It depends on nothing else in pr1.
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

ImageLike = Union[Image.Image, np.ndarray, bytes, bytearray, memoryview, str, os.PathLike]


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    # Transparent pixels become white, as in transformers' convert_to_rgb (a plain convert("RGB")
    # would expose whatever colour the transparent pixels happen to store).
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0..255), got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image arrays must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        # Same blend onto white as transformers' convert_to_rgb for uint8 arrays.
        alpha = array[..., 3:4] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return array


def load_rgb(image: ImageLike) -> np.ndarray:
    """Any supported image input as an HxWx3 uint8 array.

    Files and encoded bytes follow transformers' `load_image` (EXIF orientation applied, then
    `convert("RGB")`); PIL images and arrays follow the image processor's RGB conversion.
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        source, opener = "image bytes", lambda: Image.open(io.BytesIO(bytes(image)))
    elif isinstance(image, (str, os.PathLike)):
        source = os.fspath(image)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"image file {source} not found")
        opener = lambda: Image.open(source)  # noqa: E731
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}; pass a PIL image, an HxWx3 uint8 "
            "array, encoded bytes or a file path"
        )
    try:
        with opener() as opened:
            return np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    except Image.UnidentifiedImageError as e:
        raise ValueError(f"cannot decode {source}: {e}") from None
