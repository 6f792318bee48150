"""A decoded PIL image of any mode -> RGB or L, the two modes the models and photos take: 16-bit and 32-bit
grey scaled to 8 bits a strip at a time, palette and alpha composited on white, CMYK/YCbCr/LAB converted.
Split from models/imagebytes.py, whose :func:`~models.imagebytes.open_image` calls :func:`to_standard_mode`
on every image it decodes (and whose ``decode_cost`` estimates the peak memory of that conversion)."""

from __future__ import annotations

import numpy as np
from PIL import Image

_STRIP_PIXELS = 1 << 20  # 16/32-bit to 8-bit conversion works on strips of about this many pixels


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer or float grey -> L, a strip at a time in float32 (no whole-image float64
    copy). 16-bit is divided by 257; 32-bit integers too when any value is over 255; floats in [0, 1] are
    multiplied by 255."""
    mode = img.mode
    lo, hi = img.getextrema()
    if mode.startswith("I;16") or (mode == "I" and hi > 255):
        mul = 1.0 / 257.0
    elif mode == "F" and hi <= 1.0:
        mul = 255.0
    else:
        mul = 1.0
    w, h = img.size
    out = np.empty((h, w), np.uint8)
    rows = max(1, _STRIP_PIXELS // w)
    for y in range(0, h, rows):
        strip = np.array(img.crop((0, y, w, min(h, y + rows))), dtype=np.float32)
        if mul != 1.0:
            strip *= np.float32(mul)
        np.clip(np.rint(strip, out=strip), 0, 255, out=strip)
        out[y:y + strip.shape[0]] = strip
    return Image.fromarray(out, "L")


def to_standard_mode(img: Image.Image) -> Image.Image:
    """RGB or L from any PIL mode: 16-bit and 32-bit grey scaled to 8 bits, palette and alpha composited
    on white (a transparent background is not part of a face), CMYK/YCbCr/LAB converted. Peak memory is
    what :func:`~models.imagebytes.decode_cost` estimates."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _to_8bit(img)
    if mode == "1":
        return img.convert("L")
    if mode == "P":
        if "transparency" not in img.info:
            return img.convert("RGB")
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)  # RGB onto RGB through the alpha band, without an RGB copy
        return out
    return img.convert("RGB")
