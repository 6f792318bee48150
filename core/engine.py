"""The training and evaluation loop pieces, in plain PyTorch, shared by the Ray Train job
(``raytasks/train/job.py``), ``jobs.evaluate``, the demo and the tests.

A batch is a dict of numpy arrays (what Ray Data hands a worker): ``image`` uint8 (B, C, H, W) and one
``t:<label column>`` array per canonical label the model's outputs consume (NaN = missing). It is made by
:func:`load_batch` from dataset rows with the model's own preprocessing (``models.preprocess.decode``)
and, in training, its recipe's augmentation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
import torch

from facedata import storage
from models.hard_sharing import HARD_SHARING_FIRST_EPOCH
from models.landmarks import Landmarks
from models.outputset import add_stats
from models.preprocess import ImageDecodeError, build_augmentation, decode

log = logging.getLogger(__name__)

TARGET_PREFIX = "t:"


# --- batches ------------------------------------------------------------------------------------------
def label_columns(model) -> list[str]:
    return sorted({o.target_column for o in model.outputs})


def _target_array(values, n_expected: int | None) -> np.ndarray:
    """A column of scalars or lists (None/NaN = missing) -> float32 array (B,) or (B, K) with NaN rows."""
    vals = list(values)
    if n_expected is None:
        return np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float32)
    out = np.full((len(vals), n_expected), np.nan, dtype=np.float32)
    for i, v in enumerate(vals):
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
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
               read=storage.read_bytes, decode_fn=None) -> dict[str, np.ndarray]:
    """Dataset rows (``path`` + canonical label columns) -> a training/eval batch. Rows whose image cannot be
    decoded are dropped with a warning (a training set with a bad file must not stop a run). ``decode_fn``
    (bytes, preprocessing) -> (uint8 tensor, geometry) replaces the whole-image decode (evaluation through
    face detection: ``faces.finder.decode_face``)."""
    pre = model.preprocessing
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    images, geos, keep = [], [], []
    # ``decode(train=True)`` keeps a margin around the crop (HMTNet: 227 px around 224) for the augmentation's
    # random crop to take back; without an augmentation nothing would crop it, so decode as for evaluation.
    crop_margin = train and augment is not None
    for i, path in enumerate(df["path"]):
        try:
            t, g = decode(read(path), pre, train=crop_margin) if decode_fn is None else decode_fn(read(path), pre)
        except (ImageDecodeError, OSError) as e:
            log.warning("skipping %s: %s", path, e)
            continue
        if augment is not None:
            t = augment(t)
        if tuple(t.shape[-2:]) != tuple(pre.size):
            raise ValueError(f"{path}: the {'training' if train else 'evaluation'} input is "
                             f"{tuple(t.shape[-2:])} px, the model's is {tuple(pre.size)}: an augmentation "
                             f"must crop back to the input size")
        images.append(t.numpy())
        geos.append(g)
        keep.append(i)
    df = df.iloc[keep]
    c, (h, w) = pre.channels, pre.size
    batch: dict[str, np.ndarray] = {
        "image": np.stack(images) if images else np.zeros((0, c, h, w), np.uint8),
    }
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


MIN_TRAIN_BATCH = 2  # BatchNorm in training mode needs more than one value per channel


def concat_batches(a: dict, b: dict) -> dict:
    """Two batches (dicts of arrays with the same keys) as one."""
    if set(a) != set(b):
        raise ValueError(f"cannot join batches with different columns {sorted(a)} and {sorted(b)}")
    return {k: np.concatenate([np.asarray(a[k]), np.asarray(b[k])]) for k in a}


def fold_remainder(batches: Iterable[dict], min_size: int = MIN_TRAIN_BATCH) -> Iterator[dict]:
    """Training batches in which none holds fewer than ``min_size`` images. A short batch joins the batch
    after it, or, when it is the last (an epoch's or a worker shard's remainder), the batch before it: every
    image is still seen once per epoch (PyTorch's ``drop_last`` would drop the remainder instead). A batch of
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
                 epoch: int = 0, decode_fn=None) -> Iterator[dict[str, np.ndarray]]:
    """Plain single-process batches over a dataset table (shuffled per epoch when training; a training
    remainder too small for BatchNorm is folded into the batch before it, :func:`fold_remainder`)."""
    order = np.arange(len(table))
    if train:
        np.random.default_rng(seed + epoch).shuffle(order)
    augment = build_augmentation(model.preprocessing, model.recipe.augment) if train else None

    def batches():
        for start in range(0, len(order), batch_size):
            b = load_batch(table.iloc[order[start : start + batch_size]], model, train=train, augment=augment,
                           decode_fn=decode_fn)
            if len(b["image"]):
                yield b

    return fold_remainder(batches()) if train else batches()


def to_tensors(batch: dict, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images = torch.as_tensor(np.asarray(batch["image"]), device=device)
    targets = {k[len(TARGET_PREFIX):]: torch.as_tensor(np.asarray(v, dtype=np.float32), device=device)
               for k, v in batch.items() if k.startswith(TARGET_PREFIX)}
    return images, targets


# --- optimisation -------------------------------------------------------------------------------------
def make_optimizer(model, recipe) -> torch.optim.Optimizer:
    # A model may give parameter groups with their own learning rates (a pretrained trunk slower than its heads)
    groups = getattr(model, "optimizer_groups", None)
    params = groups(recipe.lr) if groups else [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}")


def make_scheduler(optimizer, recipe):
    """Per-epoch schedulers; ``plateau`` is stepped with the validation loss (see :func:`step_scheduler`)."""
    a = recipe.schedule_args
    s = recipe.schedule
    if s == "none":
        return None
    if s == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, a.get("step_size", 50), a.get("gamma", 0.1))
    if s == "milestones":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, a.get("milestones", [25]), a.get("gamma", 0.1))
    if s == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=a.get("factor", 0.1),
                                                          patience=a.get("patience", 1))
    if s == "hard_sharing":
        # L_i = L_{i-1} (1 - 1/Epoch_i), two readings of the first epoch (models/hard_sharing.py):
        # "keep": epoch i (from 1) trains at L_0 / i; "decay": at L_0 / (i + 1). ``e`` counts from 0.
        first = a.get("first_epoch", "keep")
        if first not in HARD_SHARING_FIRST_EPOCH:
            raise ValueError(f"schedule hard_sharing: first_epoch must be one of {HARD_SHARING_FIRST_EPOCH}, "
                             f"got {first!r}")
        shift = 1 if first == "keep" else 2
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0 / (e + shift))
    raise ValueError(f"unknown schedule {s!r}")


def step_scheduler(scheduler, val_loss: float | None) -> None:
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if val_loss is not None and math.isfinite(val_loss):
            scheduler.step(val_loss)
    else:
        scheduler.step()


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _forward(net, images: torch.Tensor, device: torch.device, amp_dtype, channels_last: bool) -> dict:
    """uint8 images -> float32 raw outputs of ``net`` (a FaceModel, or its DDP wrapper for training)."""
    core = getattr(net, "module", net)
    x = core.prepare(images)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp_dtype):
        raw = net(x)
    return {k: v.float() for k, v in raw.items()}


def train_step(model, batch: dict, optimizer, device: torch.device, amp_dtype=None,
               channels_last: bool = False) -> dict[str, float]:
    """One optimisation step; ``model`` may be DDP-wrapped. Returns the loss and its parts."""
    core = getattr(model, "module", model)
    images, targets = to_tensors(batch, device)
    raw = _forward(model, images, device, amp_dtype, channels_last)
    loss, parts = core.loss(raw, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    out = {"loss": float(loss.detach())}
    out.update({f"loss.{k}": float(v) for k, v in parts.items()})
    return out


@torch.no_grad()
def evaluate_batches(model, batches: Iterable[dict], device: torch.device, amp_dtype=None,
                     channels_last: bool = False) -> dict:
    """Summed statistics of every output over ``batches`` (not yet reduced across workers)."""
    core = getattr(model, "module", model)
    was_training = core.training
    core.eval()
    stats = None
    for batch in batches:
        images, targets = to_tensors(batch, device)
        if len(images) == 0:
            continue
        raw = _forward(core, images, device, amp_dtype, channels_last)
        stats = add_stats(stats, core.stats(raw, targets))
    core.train(was_training)
    return stats or {}


def validation_loss(model, metrics: dict) -> float:
    core = getattr(model, "module", model)
    total, seen = 0.0, False
    for o in core.outputs:
        k = f"{o.name}.loss"
        if k in metrics and math.isfinite(metrics[k]):
            total += o.weight * metrics[k]
            seen = True
    return total if seen else float("nan")


def primary_value(model, metrics: dict) -> float:
    core = getattr(model, "module", model)
    if core.primary_metric == "val_loss":
        return metrics.get("val_loss", float("nan"))
    return metrics.get(core.primary_metric, float("nan"))


def is_better(model, new: float, best: float | None) -> bool:
    core = getattr(model, "module", model)
    if best is None or not math.isfinite(best):
        return math.isfinite(new)
    return new > best if core.primary_mode == "max" else new < best


# --- the plain single-process loop ---------------------------------------------------------------------
def fit(model, train_table: pd.DataFrame, val_table: pd.DataFrame, epochs: int | None = None,
        batch_size: int | None = None, lr: float | None = None, device: str = "cpu", seed: int = 0,
        max_steps_per_epoch: int | None = None, log_fn=print) -> list[dict]:
    """Train ``model`` in this process with its recipe (overridable) and validate every epoch and, when the
    recipe says so, every ``validate_every`` steps (DMM-CNN). Returns one metrics dict per epoch."""
    import dataclasses

    torch.manual_seed(seed)
    recipe = dataclasses.replace(model.recipe, **{k: v for k, v in
                                                 {"epochs": epochs, "batch_size": batch_size, "lr": lr}.items()
                                                 if v is not None})
    dev = torch.device(device)
    model.to(dev).train()
    opt = make_optimizer(model, recipe)
    sched = make_scheduler(opt, recipe)
    history: list[dict] = []
    best, since_best, step = None, 0, 0
    for epoch in range(1, recipe.epochs + 1):
        t0, n_seen, losses = time.perf_counter(), 0, []
        for i, batch in enumerate(iter_batches(train_table, model, recipe.batch_size, train=True, seed=seed,
                                               epoch=epoch)):
            if max_steps_per_epoch and i >= max_steps_per_epoch:
                break
            losses.append(train_step(model, batch, opt, dev)["loss"])
            n_seen += len(batch["image"])
            step += 1
            if recipe.validate_every and step % recipe.validate_every == 0:
                stats = evaluate_batches(model, iter_batches(val_table, model, recipe.batch_size), dev)
                model.on_validation(stats, epoch)
        stats = evaluate_batches(model, iter_batches(val_table, model, recipe.batch_size), dev)
        metrics = model.metrics(stats)
        if not recipe.validate_every:
            # With validate_every (DMM-CNN's P) the hook runs only on the every-P validations, so that
            # Eq. 4's rate of change is always measured over P iterations.
            metrics.update(model.on_validation(stats, epoch))
        metrics["val_loss"] = validation_loss(model, metrics)
        step_scheduler(sched, metrics["val_loss"])
        metrics.update(epoch=epoch, train_loss=float(np.mean(losses)) if losses else float("nan"),
                       samples_per_s=n_seen / max(1e-9, time.perf_counter() - t0),
                       lr=opt.param_groups[0]["lr"])
        history.append(metrics)
        if log_fn:
            log_fn(format_epoch(model, metrics, recipe.epochs))
        value = primary_value(model, metrics)
        if is_better(model, value, best):
            best, since_best = value, 0
        else:
            since_best += 1
            if recipe.early_stopping_patience and since_best >= recipe.early_stopping_patience:
                if log_fn:
                    log_fn(f"early stopping: no improvement of {model.primary_metric} for {since_best} epochs")
                break
    model.eval()
    return history


def format_epoch(model, m: dict, epochs: int, eta_s: float | None = None) -> str:
    core = getattr(model, "module", model)
    names = set(core.outputs.names())  # per-output metrics only, not each of CelebA's 40 attributes
    first = [] if core.primary_metric == "val_loss" else [core.primary_metric]  # val_loss is always shown
    keys = first + [k for k in sorted(m) if k.endswith((".accuracy", ".mae", ".pearson", ".nme"))
                                    and k.split(".", 1)[0] in names]
    shown = " ".join(f"{k}={m[k]:.4f}" for k in dict.fromkeys(keys) if k in m and isinstance(m[k], float))
    eta = f" eta={eta_s:.0f}s" if eta_s is not None else ""
    return (f"epoch {m['epoch']}/{epochs} train_loss={m['train_loss']:.4f} val_loss={m['val_loss']:.4f} "
            f"{shown} samples/s={m['samples_per_s']:.1f}{eta}")


def evaluate_table(model, table: pd.DataFrame, batch_size: int = 64, device: str = "cpu",
                   decode_fn=None) -> dict[str, float]:
    """The paper metrics of ``model`` (with its thresholds) on a dataset table, in this process.
    ``decode_fn``: see :func:`load_batch` (evaluation through face detection). The loop is
    ``core.evaluation.run_model``'s, which ``jobs.evaluate`` runs too."""
    from core.evaluation import metrics_from, run_model

    return metrics_from(model, run_model(model, table, batch_size, device, decode_fn))
