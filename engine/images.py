"""Images handed to a request, converted to 8-bit RGB faithfully: scaled, never cast or wrapped.

Accepted (anything else: one InputError naming the accepted forms):
- a path to an image file PIL reads;
- a PIL image of any mode: 8-bit modes (1, L, P, RGB, RGBA, LA, CMYK, YCbCr, ...) as PIL converts them (alpha
  dropped); 16-bit (I;16*) scaled by 255 / 65535; 32-bit integer "I" scaled by 255 / 65535 when its values
  exceed 255 (16-bit PNGs open as "I"), taken as is when they fit in [0, 255], refused when outside [0, 65535];
  floating "F" with values in [0, 1] scaled by 255, refused otherwise;
- an array (numpy or torch, on any device) of shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (alpha dropped):
  uint8 as is; uint16 scaled by 255 / 65535; bool as 0 / 255; other integers when every value is in
  [0, 255], refused otherwise (no wrapping); floats when every value is in [0, 1], scaled by 255 (the
  torchvision convention), refused otherwise (NaN included).
Scaling rounds to the nearest integer: v8 = round(v * 255 / max).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .errors import InputError

ARRAY_FORMS = ("[H, W], [H, W, 1], [H, W, 3] or [H, W, 4] arrays: uint8; uint16 (scaled); bool; other integers "
               "in [0, 255]; floats in [0, 1] (scaled by 255)")


def load_image(item, label: str) -> Image.Image:
    """A request's image (path, PIL image or array) as an RGB PIL image. Raises InputError naming ``label``."""
    if isinstance(item, Image.Image):
        return pil_to_rgb(item, label)
    if isinstance(item, (str, os.PathLike)):
        if not os.path.isfile(item):
            raise InputError(f"{label}: file not found: {item}")
        try:
            with Image.open(item) as im:
                im.load()
                return pil_to_rgb(im, label)
        except InputError:
            raise
        except Exception as e:  # PIL raises several types for unreadable files
            raise InputError(f"{label}: cannot read image {item}: {e}") from None
    if hasattr(item, "shape") and hasattr(item, "dtype"):
        return array_to_rgb(item, label)
    raise InputError(f"{label}: expected an image path, a PIL image or an array ({ARRAY_FORMS}), "
                     f"got {type(item).__name__}")


def pil_to_rgb(im: Image.Image, label: str) -> Image.Image:
    if im.mode.startswith("I;16"):
        return array_to_rgb(np.asarray(im).astype(np.uint16), label)
    if im.mode == "I":
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise InputError(f"{label}: a 32-bit integer image with values in [{a.min()}, {a.max()}]; "
                             "expected 8-bit values or 16-bit values in [0, 65535]")
        return array_to_rgb(a.astype(np.uint16) if a.size and a.max() > 255 else a.astype(np.uint8), label)
    if im.mode == "F":
        return array_to_rgb(np.asarray(im), label)
    if im.width < 1 or im.height < 1:
        raise InputError(f"{label}: an empty image ({im.width} x {im.height})")
    return im.convert("RGB")


def array_to_rgb(item, label: str) -> Image.Image:
    if hasattr(item, "detach"):  # a torch tensor, on any device
        item = item.detach().cpu().numpy()
    a = np.asarray(item)
    shape = list(a.shape)
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        a = a[..., :3] if a.shape[-1] != 1 else a[..., 0]
    elif a.ndim != 2:
        hint = " (a [C, H, W] tensor: pass tensor.permute(1, 2, 0))" if a.ndim == 3 and a.shape[0] in (1, 3, 4) else ""
        raise InputError(f"{label}: an array of shape {shape}{hint}; expected {ARRAY_FORMS}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError(f"{label}: an empty image array of shape {shape}")
    a = to_uint8(a, label, shape)
    return Image.fromarray(a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=-1), "RGB")


def to_uint8(a: np.ndarray, label: str, shape: list) -> np.ndarray:
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return np.rint(a.astype(np.float64) * (255 / 65535)).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise InputError(f"{label}: an {a.dtype} array of shape {shape} with values in [{lo}, {hi}]; integer "
                             "images other than uint16 must hold values in [0, 255] (convert to uint8 yourself)")
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        f = a.astype(np.float64)
        if not np.isfinite(f).all():
            raise InputError(f"{label}: a {a.dtype} image array of shape {shape} holds NaN or infinite values")
        lo, hi = float(f.min()), float(f.max())
        if lo < 0 or hi > 1:
            raise InputError(f"{label}: a {a.dtype} image array of shape {shape} with values in [{lo:g}, {hi:g}]; "
                             "float images must hold values in [0, 1] (for 0-255 values, pass uint8)")
        return np.rint(f * 255).astype(np.uint8)
    raise InputError(f"{label}: an array of dtype {a.dtype}; expected {ARRAY_FORMS}")
