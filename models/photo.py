"""Bytes -> a whole photo's pixels for face detection, without torch.

The label job's decode tasks run only this (through facedata/decode.py and raytasks/label/decoding.py), so
their processes never import torch: 1.7 s of CPU and about 265 MB of private memory each that a decode worker
does not need (docs/benchmarks.md, "Camera-sized photos"). ``models.preprocess`` turns these pixels into the
tensor detection reads (``photo_tensor``, ``decode_photo``) and decodes model inputs (``decode``).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .imagebytes import DEFAULT_MAX_PIXELS, draft_request, jpeg_draft_size, open_image

DEFAULT_PHOTO_SIDE = 2048  # longest side a photo is decoded at for face detection and alignment (see decode_photo_pixels)
# A JPEG may decode at a DCT scale whose longest side is up to 1/32 under max_side (2048 -> 1984): a 12 MP phone
# photo (4000 or 4032 px) then decodes at half size, 2000-2016 px, in 35-39 ms, not whole and shrunk to 2048 px
# in 164-177 ms (docs/benchmarks.md, "Camera-sized photos").
JPEG_DRAFT_SLACK = 32


def jpeg_draft_side(max_side: int) -> int:
    """The least longest side a JPEG's reduced DCT scale may leave a photo decoded for ``max_side`` with."""
    return max_side - max_side // JPEG_DRAFT_SLACK


def photo_size(width: int, height: int, max_side: int = DEFAULT_PHOTO_SIDE) -> tuple[int, int]:
    """The (width, height) :func:`decode_photo_pixels` gives a JPEG of ``width`` x ``height`` (upright): the reduced DCT
    scale it decodes at, then the shrink to ``max_side``. ``raytasks.label.gpu_decode`` shrinks nvjpeg's whole
    decode to it, so that both decoders give one size and scale."""
    return _within(*jpeg_draft_size(width, height, draft_request(width, height, jpeg_draft_side(max_side))), max_side)


def _within(w: int, h: int, max_side: int) -> tuple[int, int]:
    """``(w, h)`` shrunk so that its longest side is ``max_side``, when it is longer."""
    if max(w, h) <= max_side:
        return w, h
    f = max_side / max(w, h)
    return max(1, round(w * f)), max(1, round(h * f))


def axis_scales(original: tuple[int, int], decoded: tuple[int, int]) -> tuple[float, float]:
    """``(x, y)`` factors from a decoded picture's pixels to its original's (``x_original = x * sx``,
    ``y_original = y * sy``): the original ``(width, height)`` over the decoded ``(width, height)``. The one
    ``scale`` :func:`decode_photo_pixels` returns is the longer side's: a shrink to ``max_side`` rounds the
    shorter side to whole pixels, so its own factor differs (a 16000 x 800 strip decoded at 2048 x 102: y
    7.843, not 7.812, 3 px at its bottom edge). Positions mapped back to the original take these; sizes that
    only compare (``min_face``, ``small_face``) keep ``scale``. (1.0, 1.0) for a photo decoded at its size.
    A change here bumps ``faces.finder.TO_ORIGINAL`` (cached training detections are keyed by it)."""
    (w, h), (dw, dh) = original, decoded
    return w / dw, h / dh


def decode_photo_pixels(data: bytes, max_side: int = DEFAULT_PHOTO_SIDE,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int], float]:
    """Photo bytes -> ``(uint8 RGB (h, w, 3) array, (width, height) of the upright original, scale)``, the whole
    picture for face detection, its longest side at most ``max_side`` pixels; the array is read-only
    (``models.preprocess.decode_photo`` makes a writable tensor of it). ``np.asarray`` copies Pillow's pixels
    once (Pillow 13 keeps RGB at 4 bytes a pixel and hands numpy a packed 3-byte copy, ``tobytes``), so both are
    held until this returns and Pillow's image is freed (``models.imagebytes.decode_cost`` was measured through
    this function, that copy included).

    A large JPEG is decoded at a reduced DCT scale (JPEG draft mode: 1/2, 1/4 or 1/8, the smallest that keeps
    its longest side at or above :func:`jpeg_draft_side`, 31/32 of ``max_side``) and then area-resized if it is
    still over ``max_side``, so neither its full-size pixels nor their time are spent: a 24 MP photo (6000 px)
    decodes at 3000 px and is shrunk to 2048, a 12 MP phone photo (4000-4032 px) decodes at 2000-2016 px and is
    kept so (4.5x faster than decoding it whole to shrink it by 1.6 %). Other formats are resized after
    decoding. ``scale`` maps decoded pixels to original ones (``x_original = x * scale``) along the longer side;
    :func:`axis_scales` gives each axis its own (the shorter side was rounded to whole pixels). 2048 px keeps a face
    that fills a tenth of a 6000 px photo's width at about 200 px, the input size of the largest model; a
    smaller ``max_side`` is faster and loses small faces first.

    The pixels stay in Pillow's layout, rows of RGB triples (HWC): a transposition into planes (CHW) was a copy
    of the whole photo, and the detector's 8-bit letterbox wants HWC memory anyway (docs/benchmarks.md,
    "Camera-sized photos")."""
    if max_side < 32:
        raise ValueError("max_side must be at least 32 pixels")
    img, (ow, oh) = open_image(data, max_pixels, draft_to=jpeg_draft_side(max_side))
    img = img if img.mode == "RGB" else img.convert("RGB")
    size = _within(*img.size, max_side)
    if size != img.size:
        img = img.resize(size, Image.BILINEAR, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.uint8)
    return arr, (ow, oh), max(ow, oh) / max(arr.shape[0], arr.shape[1])
