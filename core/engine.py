"""The training and evaluation loop pieces, in plain PyTorch, shared by the Ray Train job
(``raytasks/train/job.py``), ``jobs.evaluate``, the demo and the tests: optimisers and schedules, one
training step (with the recipe's augmentation on the device, core/augment.py), evaluation statistics and
the plain single-process loop :func:`fit`. Batches (dataset rows -> arrays) are made in core/batches.py:
import them from there (``from core.batches import load_batch``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from core.batches import iter_batches, to_tensors
from models.hard_sharing import HARD_SHARING_FIRST_EPOCH
from models.outputset import add_stats

log = logging.getLogger(__name__)


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
        raw = net(x) if core.training else core.infer(x, net)  # validation reads faces as label does
    return {k: v.float() for k, v in raw.items()}


def train_step(model, batch: dict, optimizer, device: torch.device, amp_dtype=None,
               channels_last: bool = False, augment=None, generator=None) -> dict[str, float]:
    """One optimisation step; ``model`` may be DDP-wrapped. ``augment`` (core/augment.py ``Augment``) runs
    on the batch on ``device``, in the aligned frame, before the forward pass (training only: nothing else
    calls it). Returns the loss and its parts."""
    core = getattr(model, "module", model)
    images, targets = to_tensors(batch, device)
    if augment is not None:
        images, targets = augment(images, targets, core.outputs, generator)
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


# --- which validation metric picks the best epoch -------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """The validation metric that picks the best checkpoint and counts the epochs without improvement for early
    stopping: the model's ``primary_metric``, unless the data cannot measure it (:func:`choose_selection`)."""

    metric: str
    mode: str  # "max" or "min"
    model_metric: str = ""  # the model's own primary metric ("" : the same as ``metric``)
    reason: str = ""  # why ``metric`` replaced ``model_metric``; "" when it did not

    @classmethod
    def of_model(cls, model) -> Selection:
        core = getattr(model, "module", model)
        return cls(core.primary_metric, core.primary_mode, core.primary_metric)

    @classmethod
    def from_dict(cls, d: dict) -> Selection:
        sel = cls(**d)
        if sel.mode not in ("max", "min") or not sel.metric:
            raise ValueError(f"a selection metric needs a name and mode max or min, got {d}")
        return sel

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def value(self, metrics: dict) -> float:
        """The epoch's value of the metric; NaN (never the best: :meth:`is_better`; scored -inf) when it was not
        measured or the epoch diverged. A train loss that is not finite means NaN weights, and NaN logits still
        read as class 0 and every binary attribute as negative, close to the majority answers: such an epoch's
        accuracies can beat a sane epoch's (an audit: dmm_cnn's mean accuracy 0.7688 diverged against 0.6813)."""
        loss = metrics.get("train_loss")
        if isinstance(loss, (int, float, np.floating, np.integer)) and not math.isfinite(float(loss)):
            return float("nan")
        v = metrics.get(self.metric, float("nan"))
        return float(v) if isinstance(v, (int, float, np.floating, np.integer)) else float("nan")

    def is_better(self, new: float, best: float | None) -> bool:
        # A value that is not finite (NaN: not measured this epoch, or the model diverged) is never an improvement
        # and never becomes the best: it is refused here by name, not left to ``nan > best`` being False.
        if not math.isfinite(new):
            return False
        if best is None or not math.isfinite(best):
            return True
        return new > best if self.mode == "max" else new < best

    def score(self, value: float) -> float:
        """What Ray ranks checkpoints by (always "max"): the value, negated when lower is better; -inf when it
        could not be computed."""
        if not math.isfinite(value):
            return float("-inf")
        return value if self.mode == "max" else -value

    def line(self) -> str:
        said = f"best checkpoint and early stopping: {self.metric} ({self.mode})"
        return f"{said}, not {self.model_metric}: {self.reason}" if self.reason else said


def _metric_columns(core, metric: str) -> list[str] | None:
    """The label columns ``metric`` is computed from (any one of them labelled is enough); None for a metric
    this does not know, which is then kept as it is."""
    from models.outputs import Binary, Categorical

    if metric == "val_loss":
        return [o.target_column for o in core.outputs]
    if metric == "mean_accuracy":  # models/outputset.py: the mean of every "<x>.accuracy"
        return [o.target_column for o in core.outputs if isinstance(o, (Categorical, Binary))]
    head = metric.rsplit(".", 1)[0]  # beauty.pearson, attributes.mean_accuracy, Smiling.accuracy
    for o in core.outputs:
        if head == o.name or (isinstance(o, Binary) and head in o.labels):
            return [o.target_column]
    return None


def _labelled(table: pd.DataFrame, column: str) -> bool:
    from facedata.datasets.base import missing

    return column in table.columns and bool(table[column].map(lambda v: not missing(v)).any())


def choose_selection(model, table: pd.DataFrame) -> Selection:
    """The metric that picks the best epoch of ``model`` validated on ``table`` (the validation split).

    The rule: the model's ``primary_metric`` when ``table`` has a value of a label column it is computed from.
    Otherwise (hmtnet's ``beauty.pearson`` on UTKFace, which has no beauty: NaN every epoch, so that no epoch
    would ever be the best and patience would stop the run) ``mean_accuracy`` (max) when a classification
    output (categorical or binary) has labels in ``table``, else ``val_loss`` (min), which every labelled output
    adds to. We chose mean_accuracy first because it is the zoo's default primary metric and, unlike the
    loss, weighs the tasks alike whatever their loss scales. Raises ``ValueError`` when ``table`` labels none
    of the model's outputs: nothing could then pick an epoch."""
    core = getattr(model, "module", model)
    own = Selection.of_model(core)
    columns = _metric_columns(core, own.metric)
    if columns is None or any(_labelled(table, c) for c in columns):
        return own
    labelled = sorted({c for c in _metric_columns(core, "val_loss") if _labelled(table, c)})
    if not labelled:
        raise ValueError(f"the validation split has no value of any label {core.name} learns from "
                         f"({', '.join(sorted(set(_metric_columns(core, 'val_loss'))))}): no metric can pick "
                         f"its best epoch")
    reason = (f"the validation split has no {', '.join(sorted(set(columns)))} label to compute it from "
              f"(it labels {', '.join(labelled)})")
    if any(_labelled(table, c) for c in _metric_columns(core, "mean_accuracy")):
        return Selection("mean_accuracy", "max", own.metric, reason)
    return Selection("val_loss", "min", own.metric, reason)


def primary_value(model, metrics: dict) -> float:
    """The model's own primary metric in ``metrics`` (NaN when absent); see :class:`Selection`."""
    return Selection.of_model(model).value(metrics)


def is_better(model, new: float, best: float | None) -> bool:
    return Selection.of_model(model).is_better(new, best)


def sample_rows(table: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """At most ``n`` rows drawn at random with ``seed`` (kept in the table's order), not the first ``n``: a data
    set listed in label order (UTKFace's file names start with the age) would otherwise train or be evaluated on
    one end of it. The draw of ``jobs.train --limit`` and ``jobs.evaluate --limit``."""
    if not n or n >= len(table):
        return table
    return table.sample(n=n, random_state=seed).sort_index()


# --- the plain single-process loop ---------------------------------------------------------------------
def fit(model, train_table: pd.DataFrame, val_table: pd.DataFrame, epochs: int | None = None,
        batch_size: int | None = None, lr: float | None = None, device: str = "cpu", seed: int = 0,
        max_steps_per_epoch: int | None = None, log_fn=print, average_epochs: int | None = None) -> list[dict]:
    """Train ``model`` in this process with its recipe (overridable) and validate every epoch and, when the
    recipe says so, every ``validate_every`` steps (DMM-CNN). The recipe's augmentation runs on ``device``
    (core/augment.py). With ``average_epochs`` K > 1 each epoch validates the mean of the last K epochs'
    weights (core/averaging.py), which the model holds when ``fit`` returns. Returns one metrics dict per
    epoch; ``train_skipped`` / ``val_skipped`` count the images that could not be decoded (left out, as a
    malformed label is). The best epoch and early stopping follow :func:`choose_selection` on ``val_table``."""
    from core.augment import Augment
    from core.averaging import EpochAverage

    torch.manual_seed(seed)
    recipe = dataclasses.replace(model.recipe, **{k: v for k, v in
                                                 {"epochs": epochs, "batch_size": batch_size, "lr": lr,
                                                  "average_epochs": average_epochs}.items()
                                                 if v is not None})
    dev = torch.device(device)
    model.to(dev).train()
    opt = make_optimizer(model, recipe)
    sched = make_scheduler(opt, recipe)
    augment = Augment.from_recipe(recipe.augment)
    augment.check(model.outputs)
    augment = augment if augment.active else None
    history: list[dict] = []
    best, since_best, step = None, 0, 0
    selection = choose_selection(model, val_table)
    if log_fn and selection.reason:
        log_fn(selection.line())
    average = EpochAverage(model, recipe.average_epochs)
    for epoch in range(1, recipe.epochs + 1):
        average.restore(model)  # train on from the latest weights, not their average
        t0, n_seen, losses, failed, val_failed = time.perf_counter(), 0, [], [], []
        for i, batch in enumerate(iter_batches(train_table, model, recipe.batch_size, train=True, seed=seed,
                                               epoch=epoch, failed=failed)):
            if max_steps_per_epoch and i >= max_steps_per_epoch:
                break
            losses.append(train_step(model, batch, opt, dev, augment=augment)["loss"])
            n_seen += len(batch["image"])
            step += 1
            if recipe.validate_every and step % recipe.validate_every == 0:
                stats = evaluate_batches(model, iter_batches(val_table, model, recipe.batch_size), dev)
                model.on_validation(stats, epoch)
        average.push(model)
        average.use_average(model)  # what is validated (and left in the model at the end) is the average
        stats = evaluate_batches(model, iter_batches(val_table, model, recipe.batch_size, failed=val_failed), dev)
        metrics = model.metrics(stats)
        metrics.update(train_skipped=len(failed), val_skipped=len(val_failed))
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
            log_fn(format_epoch(model, metrics, recipe.epochs, metric=selection.metric))
        value = selection.value(metrics)
        if selection.is_better(value, best):
            best, since_best = value, 0
        else:
            since_best += 1
            if recipe.early_stopping_patience and since_best >= recipe.early_stopping_patience:
                if log_fn:
                    log_fn(f"early stopping: no improvement of {selection.metric} for {since_best} epochs")
                break
    model.eval()
    return history


def format_epoch(model, m: dict, epochs: int, eta_s: float | None = None, metric: str | None = None) -> str:
    """One epoch's line; ``metric``: the one that picks the best epoch (:class:`Selection`), shown first (default:
    the model's primary metric)."""
    core = getattr(model, "module", model)
    names = set(core.outputs.names())  # per-output metrics only, not each of CelebA's 40 attributes
    metric = metric or core.primary_metric
    first = [] if metric == "val_loss" else [metric]  # val_loss is always shown
    keys = first + [k for k in sorted(m) if k.endswith((".accuracy", ".mae", ".pearson", ".nme"))
                                    and k.split(".", 1)[0] in names]
    shown = " ".join(f"{k}={m[k]:.4f}" for k in dict.fromkeys(keys) if k in m and isinstance(m[k], float))
    eta = f" eta={eta_s:.0f}s" if eta_s is not None else ""
    skipped = (f" skipped={int(m.get('train_skipped', 0))}/{int(m.get('val_skipped', 0))} (train/val, not decodable)"
               if m.get("train_skipped") or m.get("val_skipped") else "")
    return (f"epoch {m['epoch']}/{epochs} train_loss={m['train_loss']:.4f} val_loss={m['val_loss']:.4f} "
            f"{shown} samples/s={m['samples_per_s']:.1f}{eta}{skipped}")


def evaluate_table(model, table: pd.DataFrame, batch_size: int = 64, device: str = "cpu",
                   decode_fn=None) -> dict[str, float]:
    """The paper metrics of ``model`` (with its thresholds) on a dataset table, in this process.
    ``decode_fn``: see ``core.batches.load_batch`` (evaluation through face detection). The loop is
    ``core.evaluation.run_model``'s, which ``jobs.evaluate`` runs too."""
    from core.evaluation import metrics_from, run_model

    return metrics_from(model, run_model(model, table, batch_size, device, decode_fn))
