"""Bytes -> decoded pictures, a batch at a time: the one decode loop of label, serve and evaluate.

A *decoded batch* is a dict of columns with one entry per input, failures included:

* ``path``, ``ok``, ``error_kind``, ``error_message``, ``width``, ``height`` (the original size): the
  per-image outcome, from which the rows' per-image columns are built (core/rows.py);
* for photos (:class:`Photos`: faces are found later): ``image`` (a list of uint8 ``(h, w, 3)`` RGB arrays,
  Pillow's layout, at most ``max_side`` on their longest side, None where the row failed; read-only where
  they come from Pillow or Ray: ``models.preprocess.photo_tensor`` makes the ``(3, h, w)`` tensor that
  detection reads) and ``scale`` (decoded -> original pixels);
* for whole images (:class:`Whole`: each image is one aligned face crop) and each distinct preprocessing
  ``k`` of the models that will read it: ``image_<k>`` (uint8 ``(n, C, H, W)``, the model's input) and
  ``geometry_<k>`` (``(n, 4)`` float64: ``sx, sy, tx, ty``, input pixel -> original pixel).

A file that cannot be read or decoded is a row with ``ok`` False and its reason (``models.preprocess``'s
error kinds, or the reader's ``unreadable`` / ``forbidden``), never an exception. With several
preprocessings an image fails with the first one that fails.

Photos decode without torch (models/photo.py): the label job's decode tasks never import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from models.imagebytes import DEFAULT_MAX_PIXELS, ImageDecodeError, Prechecked, read_header
from models.photo import DEFAULT_PHOTO_SIDE, decode_photo_pixels, jpeg_draft_side

if TYPE_CHECKING:
    from models.preprocess import Preprocessing

GEOMETRY_KEYS = ("sx", "sy", "tx", "ty")
IMAGE_COLUMNS = ("path", "ok", "error_kind", "error_message", "width", "height")


@dataclass(frozen=True)
class Photos:
    """Decode whole photos for face detection, longest side at most ``max_side``."""

    max_side: int = DEFAULT_PHOTO_SIDE


@dataclass(frozen=True)
class Whole:
    """Decode each image straight to the input of every distinct preprocessing (``--faces whole``)."""

    preprocessings: tuple[Preprocessing, ...]


def empty_batch(paths: list[str], target: Photos | Whole) -> dict:
    """A batch of ``paths`` in which nothing is decoded yet (every row ``ok`` False, no reason)."""
    n = len(paths)
    batch = {"path": [str(p) if p is not None else "" for p in paths], "ok": np.zeros(n, bool),
             "error_kind": [None] * n, "error_message": [None] * n, "width": np.zeros(n, np.int32),
             "height": np.zeros(n, np.int32)}
    if isinstance(target, Photos):
        batch["scale"] = np.ones(n, np.float64)
        batch["image"] = [None] * n
    else:
        for k, pre in enumerate(target.preprocessings):
            batch[f"image_{k}"] = np.zeros((n, pre.channels, *pre.size), np.uint8)
            batch[f"geometry_{k}"] = np.zeros((n, 4), np.float64)
    return batch


def fail(batch: dict, i: int, kind: str, message: str) -> None:
    """Row ``i`` failed (a read error, or a decode error found elsewhere)."""
    batch["ok"][i] = False
    batch["error_kind"][i], batch["error_message"][i] = kind, message


def fail_decode(batch: dict, i: int, e: Exception) -> None:
    """Row ``i``'s decoder raised ``e``: an :class:`ImageDecodeError` gives its kind and message, anything else
    (a decoder bug, which must not kill a 10-hour job) is a ``decode_error`` naming the exception."""
    if isinstance(e, ImageDecodeError):
        fail(batch, i, e.kind, e.message)
    else:
        fail(batch, i, "decode_error", f"{type(e).__name__}: {e}")


def _data(data: bytes | Prechecked | None) -> bytes | Prechecked:
    """What the decoders are given: bytes, or a :class:`~models.imagebytes.Prechecked` as it is."""
    return data if isinstance(data, Prechecked) else bytes(data) if data is not None else b""


def decode_into(batch: dict, i: int, data: bytes | Prechecked | None, target: Photos | Whole) -> bool:
    """Decode ``data`` into row ``i`` of ``batch``; returns whether it worked (else the row holds why). A
    :class:`~models.imagebytes.Prechecked` that :func:`cost` read is decoded without its header checks run
    again (they passed, for these bytes and these decoders' arguments)."""
    data = _data(data)
    try:
        if isinstance(target, Photos):
            batch["image"][i], (w, h), batch["scale"][i] = decode_photo_pixels(data, target.max_side)
        else:
            from models.preprocess import decode  # torch: only for whole images (photos decode without it)

            for k, pre in enumerate(target.preprocessings):
                t, g = decode(data, pre)
                batch[f"image_{k}"][i] = t.numpy()
                batch[f"geometry_{k}"][i] = [g[key] for key in GEOMETRY_KEYS]
            w, h = g["width"], g["height"]
    except Exception as e:  # noqa: BLE001 - every failure is this row's error (fail_decode)
        fail_decode(batch, i, e)
        return False
    batch["ok"][i], batch["width"][i], batch["height"][i] = True, w, h
    return True


def cost(data: bytes | Prechecked | None, target: Photos | Whole) -> tuple[int, int]:
    """What decoding ``data`` for ``target`` would cost, from the header alone (no pixel decoded):
    ``(source pixels, bytes held after decoding)``. The first bounds the decoder's CPU time (a whole image is
    decoded once per distinct preprocessing, and each decode reads every source pixel), the second the memory
    the decoded picture holds until it is answered.

    The header is read by ``models.imagebytes.read_header`` with the arguments :func:`decode_into`'s decoders
    give ``open_image`` (accepted formats, pixel and memory limits, JPEG draft scale), so what a file is
    charged and how it is decoded cannot drift apart. A file whose header fails those checks raises the
    :class:`ImageDecodeError` its decode would raise (an unexpected exception is a ``decode_error``, as in
    :func:`decode_into`): it is refused here, before anything is decoded, never counted as free. Refusing
    rather than charging it the largest image: the decoder runs these same checks first, so it could only
    refuse it after the request had taken memory and a decode slot for it. Given a
    :class:`~models.imagebytes.Prechecked`, what the checks found is kept in it, and :func:`decode_batch`
    given it decodes without checking again (the serving ingress: each file checked once per request)."""
    data = _data(data)
    try:
        if isinstance(target, Photos):  # models.photo.decode_photo_pixels
            w, h = read_header(data, DEFAULT_MAX_PIXELS, draft_to=jpeg_draft_side(target.max_side)).size
            f = min(1.0, target.max_side / max(w, h, 1))
            return w * h, 3 * round(w * f) * round(h * f)
        pixels = 0
        for pre in target.preprocessings:  # models.preprocess.decode: pre.size is (H, W)
            w, h = read_header(data, pre.max_pixels, draft_to=(2 * pre.size[1], 2 * pre.size[0])).size
            pixels += w * h
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - a header reader bug: refused as decode_into would refuse it
        raise ImageDecodeError("decode_error", f"{type(e).__name__}: {e}") from None
    return pixels, sum(pre.channels * pre.size[0] * pre.size[1] for pre in target.preprocessings)


def decode_batch(paths: list[str], datas: list[bytes | Prechecked | None], target: Photos | Whole) -> dict:
    """Bytes already in memory (a request's files, as :class:`~models.imagebytes.Prechecked` once :func:`cost`
    has read their headers) -> a decoded batch."""
    batch = empty_batch(paths, target)
    for i, data in enumerate(datas):
        decode_into(batch, i, data, target)
    return batch


def rows_of(batch: dict, keep: list[int] | np.ndarray) -> dict:
    """The rows ``keep`` of a decoded batch, as a batch of their own (one image of a batch, retried alone by
    ``core.annotator``); a tensor column (images decoded on the GPU) stays a tensor on its device."""
    import torch

    out = {}
    for key, col in batch.items():
        if isinstance(col, np.ndarray):
            out[key] = col[np.asarray(keep, dtype=np.int64)]
        elif isinstance(col, torch.Tensor):
            out[key] = col[torch.as_tensor(keep, dtype=torch.long, device=col.device)]
        else:
            out[key] = [col[i] for i in keep]
    return out
