"""Batches for training and evaluation: dataset rows -> dicts of numpy arrays (what Ray Data hands a
worker, and what the plain loop of core/engine.py reads).

A batch holds ``image`` uint8 (B, C, H, W) and one ``t:<label column>`` array per canonical label the
model's outputs consume (NaN = missing). :func:`load_batch` makes it from dataset rows with the model's own
preprocessing (``models.preprocess.decode``), or, for rows whose face was found in a photo
(``jobs.train --faces detect|landmarks``), with that face aligned to the model's template
(faces/trainfaces.py). The augmentation happens later, on the device (core/augment.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
import torch

import storage
from facedata.datasets.base import missing
from faces.trainfaces import ALIGN_POINTS, ALIGN_SHA, training_input
from models.imagebytes import ImageDecodeError
from models.landmarks import Landmarks
from models.photo import DEFAULT_PHOTO_SIDE
from models.preprocess import build_augmentation, decode

log = logging.getLogger(__name__)

TARGET_PREFIX = "t:"


# --- batches ------------------------------------------------------------------------------------------
def label_columns(model) -> list[str]:
    return sorted({o.target_column for o in model.outputs})


def unlabelled_columns(model, columns) -> list[str]:
    """The model's label columns that the data lacks (hmtnet's beauty on UTKFace). The heads behind them get no
    gradient, so DDP must be told to look for unused parameters or it stops at the second step."""
    have = set(columns)
    return [c for c in label_columns(model) if c not in have]


def _target_array(values, n_expected: int | None) -> np.ndarray:
    """A column of scalars or lists (None/NaN = missing) -> float32 array (B,) or (B, K) with NaN rows."""
    vals = list(values)
    if n_expected is None:
        return np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float32)
    out = np.full((len(vals), n_expected), np.nan, dtype=np.float32)
    for i, v in enumerate(vals):
        if not missing(v):
            arr = np.asarray(v, dtype=np.float32).reshape(-1)
            if arr.size == n_expected:
                out[i] = arr
    return out


def _target_width(output) -> int | None:
    if isinstance(output, Landmarks):
        return 2 * output.points
    labels = getattr(output, "labels", None)
    if labels and len(labels) > 1:
        return len(labels)
    return None


def load_batch(rows: pd.DataFrame | dict, model, train: bool = False, augment=None,
               read=storage.read_bytes, decode_fn=None, max_side: int = DEFAULT_PHOTO_SIDE,
               failed: list | None = None, keep_failed: bool = False) -> dict[str, np.ndarray]:
    """Dataset rows (``path`` + canonical label columns) -> a training/eval batch. Rows whose image cannot be
    decoded are dropped with a warning (a training set with a bad file must not stop a run) and appended to
    ``failed`` as ``(path, reason)``; with ``keep_failed`` they stay in the batch instead, with a zero image
    and ``skipped`` = 1 (Ray Data's decode tasks: the worker drops and counts them, :func:`drop_failed`).
    Rows with a resolved face (``faces.trainfaces.ALIGN_POINTS``: ``jobs.train --faces detect|landmarks``)
    are aligned with it (``faces.trainfaces.training_input``, decoding photos at ``max_side``).
    ``decode_fn`` (bytes, preprocessing) -> (uint8 tensor, geometry) replaces the whole-image decode
    (evaluation through face detection: ``faces.finder.decode_face``). ``augment``: the decode's own part
    of the augmentation (``models.preprocess.build_augmentation``: HMTNet's random crop); the rest runs on
    the device (core/augment.py, :func:`train_step`)."""
    pre = model.preprocessing
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    c, (h, w) = pre.channels, pre.size
    faces = (list(df[ALIGN_POINTS]), list(df[ALIGN_SHA])) if ALIGN_POINTS in df.columns else None
    images, geos, keep, bad = [], [], [], []
    # ``decode(train=True)`` keeps a margin around the crop (HMTNet: 227 px around 224) for the augmentation's
    # random crop to take back; without an augmentation nothing would crop it, so decode as for evaluation.
    crop_margin = train and augment is not None
    for i, path in enumerate(df["path"]):
        try:
            data = read(path)
            if faces is not None:
                t, g = training_input(data, pre, faces[0][i], faces[1][i], max_side)
            elif decode_fn is not None:
                t, g = decode_fn(data, pre)
            else:
                t, g = decode(data, pre, train=crop_margin)
        except (ImageDecodeError, OSError) as e:
            log.warning("skipping %s: %s", path, e)
            if failed is not None:
                failed.append((path, str(e)))
            if keep_failed:
                images.append(np.zeros((c, h, w), np.uint8))
                geos.append({"sx": 1.0, "sy": 1.0, "tx": 0.0, "ty": 0.0, "input_w": w, "input_h": h})
                keep.append(i)
                bad.append(i)
            continue
        if augment is not None and faces is None:
            t = augment(t)
        if tuple(t.shape[-2:]) != tuple(pre.size):
            raise ValueError(f"{path}: the {'training' if train else 'evaluation'} input is "
                             f"{tuple(t.shape[-2:])} px, the model's is {tuple(pre.size)}: an augmentation "
                             f"must crop back to the input size")
        images.append(t.numpy())
        geos.append(g)
        keep.append(i)
    df = df.iloc[keep]
    batch: dict[str, np.ndarray] = {
        "image": np.stack(images) if images else np.zeros((0, c, h, w), np.uint8),
    }
    if keep_failed:
        batch["skipped"] = np.isin(np.asarray(keep, dtype=np.int64), np.asarray(bad, dtype=np.int64)).astype(np.uint8)
    for o in model.outputs:
        col = o.target_column
        key = TARGET_PREFIX + col
        if key in batch:
            continue
        if col not in df.columns:
            continue
        arr = _target_array(df[col], _target_width(o))
        if isinstance(o, Landmarks) and len(arr):
            arr = o.normalise(arr, geos)  # pixels of the original image (or of an aligned face) -> the input's units
        batch[key] = arr
    return batch


def drop_failed(batches: Iterable[dict], counter: list[int]) -> Iterator[dict]:
    """Batches made with ``load_batch(keep_failed=True)`` without their failed rows (and without the
    ``skipped`` column); ``counter[0]`` grows by the rows dropped. Empty batches are not yielded."""
    for b in batches:
        flags = b.get("skipped")
        if flags is not None:
            bad = np.asarray(flags).astype(bool)
            counter[0] += int(bad.sum())
            b = {k: np.asarray(v)[~bad] for k, v in b.items() if k != "skipped"}
        if len(b["image"]):
            yield b


MIN_TRAIN_BATCH = 2  # BatchNorm in training mode needs more than one value per channel


def concat_batches(a: dict, b: dict) -> dict:
    """Two batches (dicts of arrays with the same keys) as one."""
    if set(a) != set(b):
        raise ValueError(f"cannot join batches with different columns {sorted(a)} and {sorted(b)}")
    return {k: np.concatenate([np.asarray(a[k]), np.asarray(b[k])]) for k in a}


def fold_remainder(batches: Iterable[dict], min_size: int = MIN_TRAIN_BATCH) -> Iterator[dict]:
    """Training batches in which none holds fewer than ``min_size`` images. A short batch joins the batch
    after it, or, when it is the last (an epoch's or a worker shard's remainder), the batch before it: every
    image of the stream is still seen once per epoch (PyTorch's ``drop_last`` would drop the remainder instead;
    on several Ray Train workers the stream itself is cut to equal shards first, raytasks/train/data.py). A batch of
    one image stops a run in any BatchNorm layer that sees a 1×1 map in training mode (HMTNet's ANet:
    "Expected more than 1 value per channel when training"). When the whole stream holds fewer than
    ``min_size`` images there is nothing to fold them into: they are dropped with a warning. Evaluation
    needs no folding: BatchNorm uses its running statistics there."""
    held = None  # a batch of at least min_size images, kept back in case the remainder must join it
    short = None  # short batches waiting for the next one
    for b in batches:
        if short is not None:
            b, short = concat_batches(short, b), None
        if len(b["image"]) < min_size:
            short = b
            continue
        if held is not None:
            yield held
        held = b
    if short is not None:
        if held is None:
            if len(short["image"]):
                log.warning("dropping a training batch of %d image(s): too few for BatchNorm and no batch to "
                            "fold it into", len(short["image"]))
            return
        held = concat_batches(held, short)
    if held is not None:
        yield held


def iter_batches(table: pd.DataFrame, model, batch_size: int, train: bool = False, seed: int = 0,
                 epoch: int = 0, decode_fn=None, failed: list | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Plain single-process batches over a dataset table (shuffled per epoch when training; a training
    remainder too small for BatchNorm is folded into the batch before it, :func:`fold_remainder`). Rows
    that cannot be decoded are left out and appended to ``failed`` (see :func:`load_batch`)."""
    order = np.arange(len(table))
    if train:
        np.random.default_rng(seed + epoch).shuffle(order)
    # as the Ray workers decide (raytasks/train/data.py decode_rows): no augmentation asked, none built (HMTNet's
    # random crop included), so both loops train on the inputs evaluation reads
    augment = build_augmentation(model.preprocessing, model.recipe.augment) if train and model.recipe.augment else None

    def batches():
        for start in range(0, len(order), batch_size):
            b = load_batch(table.iloc[order[start : start + batch_size]], model, train=train, augment=augment,
                           decode_fn=decode_fn, failed=failed)
            if len(b["image"]):
                yield b

    return fold_remainder(batches()) if train else batches()


def to_tensors(batch: dict, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images = torch.as_tensor(np.asarray(batch["image"]), device=device)
    targets = {k[len(TARGET_PREFIX):]: torch.as_tensor(np.asarray(v, dtype=np.float32), device=device)
               for k, v in batch.items() if k.startswith(TARGET_PREFIX)}
    return images, targets


