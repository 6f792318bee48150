"""The training loop in plain PyTorch, in pieces: optimisers and schedules, one training step (with the
recipe's augmentation on the device, core/augment.py), validation statistics, one epoch of steps
(:func:`train_epoch`) and the row of its validation (:func:`epoch_metrics`), and the line that shows it.
The Ray Train worker (raytasks/train/worker.py) runs them on a DDP model; :func:`fit` runs the same epochs
in this process (the tests and bench/ call it; the product trains through Ray Train). Which metric picks
the best epoch and when to stop: core/selection.py (:class:`Selection` and :func:`choose_selection` are
imported here, where callers find them). Batches (dataset rows -> arrays) are made in core/batches.py
(``from core.batches import load_batch``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pandas as pd
import torch

from core.batches import iter_batches, to_tensors
from core.selection import BestEpoch, Selection, choose_selection  # noqa: F401  (Selection: callers import it here)
from models.hard_sharing import HARD_SHARING_FIRST_EPOCH
from models.outputset import add_stats


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
               channels_last: bool = False, augment=None, generator=None, label_smoothing: float = 0.0
               ) -> dict[str, float]:
    """One optimisation step; ``model`` may be DDP-wrapped. ``augment`` (core/augment.py ``Augment``) runs
    on the batch on ``device``, in the aligned frame, before the forward pass (training only: nothing else
    calls it); ``label_smoothing``: the recipe's (models/base.py ``Recipe``). Returns the loss and its parts."""
    core = getattr(model, "module", model)
    images, targets = to_tensors(batch, device)
    if augment is not None:
        images, targets = augment(images, targets, core.outputs, generator)
    raw = _forward(model, images, device, amp_dtype, channels_last)
    loss, parts = core.loss(raw, targets, label_smoothing)
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


def sample_rows(table: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """At most ``n`` rows drawn at random with ``seed`` (kept in the table's order), not the first ``n``: a data
    set listed in label order (UTKFace's file names start with the age) would otherwise train or be evaluated on
    one end of it. The draw of ``jobs.train --limit`` and ``jobs.evaluate --limit``."""
    if not n or n >= len(table):
        return table
    return table.sample(n=n, random_state=seed).sort_index()


# --- one epoch: its training steps, then the row of its validation --------------------------------------
# Both training loops run these: :func:`fit` below in one process, and the Ray Train worker
# (raytasks/train/worker.py) on a DDP model, which adds its collective parts through :class:`EpochHooks` and sums
# every worker's :class:`EpochSteps` before :func:`epoch_metrics`.
class EpochHooks:
    """What a loop adds around :func:`train_epoch`'s steps. These add nothing (one process: :func:`fit`); the
    Ray Train worker's agree with the other workers on whether to step again, hash the weights around an
    attempt's first step and the model's state after each hook, give the heap back and inject a test's failure."""

    def more(self, has_batch: bool) -> bool:
        """Whether to take another step, given whether this process has a batch for it."""
        return has_batch

    def before_step(self) -> None:
        """Before each step."""

    def after_step(self, steps: int) -> None:
        """After each step; ``steps``: the epoch's, this one included."""

    def after_hook(self) -> None:
        """After each call of the model's ``on_validation`` hook."""


@dataclass
class EpochSteps:
    """What an epoch's training steps did: one process's, as :func:`train_epoch` returns it, or every worker's
    (the Ray Train worker sums the losses and images, and takes the slowest worker's times)."""

    loss_sums: dict[str, float] = field(default_factory=dict)  # the loss and its parts, times each batch's images
    images: float = 0
    steady_images: float = 0  # the images after the epoch's first step
    steps: int = 0
    train_time: float = 0.0  # seconds, less the validations during the epoch
    steady_time: float = 0.0  # the same, from the end of the epoch's first step
    hook_logs: dict = field(default_factory=dict)  # the last on_validation's, with ``validate_every``


def train_epoch(net, batches: Iterator[dict], opt, device: torch.device, epoch: int, step: int, recipe, average,
                validate, *, amp=None, channels_last: bool = False, augment=None, generator=None,
                max_steps: int | None = None, hooks: EpochHooks | None = None) -> tuple[EpochSteps, int]:
    """One epoch of training steps of ``net`` (DDP-wrapped or not) over ``batches``, at most ``max_steps``.
    ``augment``: the recipe's (core/augment.py), run on each batch when active.
    ``average`` (core/averaging.py): the epoch trains on from the latest weights, and ends with the mean of the
    last epochs' in the model, which is what is validated and saved. With ``recipe.validate_every`` (DMM-CNN's P)
    the model's ``on_validation`` hook runs on ``validate()``'s statistics every P steps of the run (``step``: the
    run's steps before this epoch), and only then, so that Eq. 4's rate of change is always measured over P
    iterations. Returns the epoch's :class:`EpochSteps` and the run's steps after it."""
    core = getattr(net, "module", net)
    hooks = hooks or EpochHooks()
    augment = augment if augment is not None and augment.active else None
    done = EpochSteps()
    t0 = time.perf_counter()
    average.restore(core)  # train on from the latest weights, not their average
    core.train()
    val_time, t_first, first_images = 0.0, None, 0  # steady state: from the end of the epoch's first step
    while True:
        batch = None if max_steps and done.steps >= max_steps else next(batches, None)
        if not hooks.more(batch is not None):
            break
        hooks.before_step()
        out = train_step(net, batch, opt, device, amp, channels_last, augment, generator, recipe.label_smoothing)
        n = len(batch["image"])
        for k, v in out.items():
            done.loss_sums[k] = done.loss_sums.get(k, 0.0) + v * n
        done.images += n
        done.steps += 1
        step += 1
        hooks.after_step(done.steps)
        if t_first is None:
            t_first, first_images = time.perf_counter(), n
        if recipe.validate_every and step % recipe.validate_every == 0:
            tv = time.perf_counter()
            done.hook_logs = core.on_validation(validate(), epoch)
            hooks.after_hook()
            val_time += time.perf_counter() - tv
    t_end = time.perf_counter()
    done.train_time = t_end - t0 - val_time
    done.steady_time = t_end - (t_first or t_end) - val_time
    done.steady_images = done.images - first_images
    average.push(core)
    average.use_average(core)  # validated, ranked and saved: the mean of the last K epochs
    return done, step


def epoch_metrics(net, stats: dict, done: EpochSteps, epoch: int, step: int, recipe, opt, sched, *, skipped: int,
                  val_skipped: int, t0: float, hooks: EpochHooks | None = None) -> dict:
    """The epoch's row: the model's metrics on the validation statistics ``stats``, the logs of its
    ``on_validation`` hook (run here on ``stats`` unless ``recipe.validate_every``: see :func:`train_epoch`), the
    validation loss, which then steps the scheduler, and the training losses, counts and speeds of ``done``.
    ``skipped``/``val_skipped``: the images that could not be decoded (left out, as a malformed label is); ``t0``:
    when the epoch began. :class:`core.selection.BestEpoch` judges the row next and adds its ``score``."""
    core = getattr(net, "module", net)
    metrics = core.metrics(stats)
    hook_logs = done.hook_logs
    if not recipe.validate_every:
        hook_logs = core.on_validation(stats, epoch)
        (hooks or EpochHooks()).after_hook()
    metrics.update(hook_logs)
    metrics["val_loss"] = validation_loss(core, metrics)
    step_scheduler(sched, metrics["val_loss"])
    for k in sorted(done.loss_sums):
        metrics["train_" + k] = done.loss_sums[k] / max(done.images, 1.0)
    metrics["train_loss"] = metrics.get("train_loss", float("nan"))
    metrics.update(epoch=epoch, step=step, lr=opt.param_groups[0]["lr"], train_images=done.images,
                   train_skipped=int(skipped), val_skipped=int(val_skipped),
                   val_images=max((float(s["n"]) for s in stats.values()), default=0.0),
                   samples_per_s=done.images / max(done.train_time, 1e-9),
                   steady_samples_per_s=done.steady_images / done.steady_time if done.steady_time > 0 else float("nan"),
                   train_time_s=done.train_time, epoch_time_s=time.perf_counter() - t0)
    return metrics


# --- the plain single-process loop ---------------------------------------------------------------------
def fit(model, train_table: pd.DataFrame, val_table: pd.DataFrame, epochs: int | None = None,
        batch_size: int | None = None, lr: float | None = None, device: str = "cpu", seed: int = 0,
        max_steps_per_epoch: int | None = None, log_fn=print, average_epochs: int | None = None) -> list[dict]:
    """Train ``model`` in this process with its recipe (overridable): the epochs of the Ray Train worker
    (raytasks/train/worker.py), through the same :func:`train_epoch`, :func:`epoch_metrics` and
    :class:`~core.selection.BestEpoch`. The recipe's augmentation runs on ``device`` (core/augment.py); with
    ``average_epochs`` K > 1 each epoch validates the mean of the last K epochs' weights (core/averaging.py),
    which the model holds when ``fit`` returns. Returns one row per epoch, as the worker's (``train_skipped`` /
    ``val_skipped``: the images that could not be decoded); the best epoch and early stopping follow
    :func:`choose_selection` on ``val_table``.

    What the worker does and this does not: no checkpoint, no resume and no history.json (the model is left
    with the last epoch's weights, not the best epoch's); batches read from the tables in this process
    (core.batches.iter_batches: shuffled by ``seed`` and the epoch) rather than Ray Data shards; fp32,
    contiguous, on one device; the augmentation draws from torch's global generator (seeded here) rather than
    a per-worker one; no ETA in the epoch line."""
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
    selection = choose_selection(model, val_table)
    if log_fn and selection.reason:
        log_fn(selection.line())
    judge = BestEpoch(selection, recipe.early_stopping_patience)
    average = EpochAverage(model, recipe.average_epochs)

    def validate(failed: list | None = None) -> dict:
        return evaluate_batches(model, iter_batches(val_table, model, recipe.batch_size, failed=failed), dev)

    history: list[dict] = []
    step = 0
    for epoch in range(1, recipe.epochs + 1):
        t0, failed, val_failed = time.perf_counter(), [], []
        batches = iter_batches(train_table, model, recipe.batch_size, train=True, seed=seed, epoch=epoch,
                               failed=failed)
        done, step = train_epoch(model, batches, opt, dev, epoch, step, recipe, average, validate,
                                 augment=augment, max_steps=max_steps_per_epoch)
        stats = validate(val_failed)
        metrics = epoch_metrics(model, stats, done, epoch, step, recipe, opt, sched, skipped=len(failed),
                                val_skipped=len(val_failed), t0=t0)
        stopped = judge.judge(epoch, metrics)
        history.append(metrics)
        if log_fn:
            log_fn(format_epoch(model, metrics, recipe.epochs, metric=selection.metric))
            if stopped:
                log_fn(judge.stop_line())
        if stopped:
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
    """The paper metrics of ``model`` (with its thresholds) on a dataset table, in this process: for the tests
    (a model that :func:`fit` trained, measured as ``jobs.evaluate`` would). The product does not call it:
    ``jobs.evaluate`` calls ``core.evaluation.run_model`` and ``metrics_from`` itself, as this does.
    ``decode_fn``: see ``core.batches.load_batch`` (evaluation through face detection)."""
    from core.evaluation import metrics_from, run_model

    return metrics_from(model, run_model(model, table, batch_size, device, decode_fn))
