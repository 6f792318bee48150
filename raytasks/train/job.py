"""Distributed training of any model of the zoo with Ray Train (DDP), the program behind ``jobs.train``.

    python -m jobs.train --model dmm_cnn --data celeba:s3://bucket/celeba --workers 4 --gpu \\
        --storage s3://bucket/runs --name celeba-dmm --output s3://bucket/models/dmm.pt

The driver (:func:`run`) reads the dataset's table (paths + labels), turns the train and validation splits
into Ray Datasets of paths that are decoded and augmented on the fly by Ray Data tasks
(:func:`decode_rows`, the model's own preprocessing through ``engine.load_batch``), and starts a
``TorchTrainer``. Every worker (:func:`train_worker`) streams its own shard of both splits, runs the plain
loop of ``core/engine.py`` on a DDP-wrapped model (gloo on CPUs; NCCL, bf16 autocast and
``channels_last`` on GPUs) and reports a checkpoint every epoch. ``--batch-size`` is the global batch of
one optimisation step (the paper's), split evenly over the workers.

Validation covers the whole validation split: each worker evaluates its shard (split with ``equal=False``
so that no row is dropped), the summed statistics are all-reduced, and every worker derives identical
metrics from them. DMM-CNN's ``on_validation`` (dynamic weights, adaptive thresholds) is called with those
identical statistics on every worker, after every epoch and every ``recipe.validate_every`` steps.

A run lives in ``<storage>/<name>/`` (a folder or ``s3://`` prefix)::

    checkpoint_manager_snapshot.json  Ray Train's index of the kept checkpoints
    epoch_0003/model.pt               the model in the project's checkpoint format (models/checkpoint.py)
    epoch_0003/state.pt               optimizer, scheduler, epoch, step, early-stopping state, history
    history.json, history.csv         one row per epoch, rewritten by rank 0 after every epoch
    curves.png                        the training curves, drawn by the driver at the end

Fault tolerance and resume, the Ray Train V2 way: ``FailureConfig(max_failures=k)`` makes the controller
restart the whole worker group when a worker process dies; the new workers get the latest reported
checkpoint from ``ray.train.get_checkpoint()`` and continue with the next epoch (weights, DMM-CNN's
weights and thresholds, optimizer, scheduler, early-stopping counters and history all come from it).
Running the same command again with the same ``--name`` and ``--storage`` starts a trainer with the
same ``RunConfig(name, storage_path)``: its checkpoint manager finds the snapshot in the run folder, so
``get_checkpoint()`` again returns the latest checkpoint and the run picks up where it stopped (V2 has
no ``Trainer.restore``). A run that is already complete only re-exports its best checkpoint. After each
report every worker waits until the controller has committed the checkpoint
(``get_all_reported_checkpoints(COMMITTED)``): the controller collects a report from all workers before it
registers it, so a worker dying just after ``report`` would otherwise cost the epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import os
import posixpath
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

import models
from core import engine
from facedata import storage
from models.base import Recipe
from models.checkpoint import FORMAT as CHECKPOINT_FORMAT
from models.checkpoint import checkpoint_bytes
from models.outputs import OutputSet
from models.preprocess import Preprocessing, build_augmentation
from raytasks.train.history import Progress, plot_curves, read_history, write_history

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
CURVES_PNG = "curves.png"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's checkpoint index in the run folder
ROWS_PER_BLOCK = 256  # paths per Ray Data block: one decode task handles one block
DECODE_CPUS = 1.0  # CPUs a Ray Data decode task asks for


class TrainError(RuntimeError):
    """A run that cannot start or did not finish; the message says what to do."""


@dataclass
class TrainSpec:
    """Everything a run needs, as plain values (what ``jobs.train``'s flags fill in)."""

    model: str
    data: str  # FORMAT:URI
    storage: str
    name: str
    output: str | None = None  # default: <storage>/<name>/best.pt
    model_kwargs: dict = field(default_factory=dict)  # constructor overrides (image_size, num_landmarks...)
    recipe: dict = field(default_factory=dict)  # overrides of the model's Recipe fields
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads: int | None = None  # torch threads per worker (default: its CPUs)
    amp: bool = True  # bf16 autocast on GPUs
    seed: int = 0
    max_failures: int = 0
    keep: int = 2  # checkpoints kept, best by the primary metric (the latest is always kept too)
    limit: int | None = None  # at most this many training images
    val_limit: int | None = None  # at most this many validation images
    steps_per_epoch: int | None = None
    init_from: str | None = None  # initialise weights from a project checkpoint (task_attention from TMTL)
    find_unused_parameters: bool = False
    fail_at: tuple[int, int, int] | None = None  # (rank, epoch, step): that worker dies once (tests)
    template_images: int = 64  # training images the face template is measured on (faces/templates.py); 0: none
    align_jitter: float | None = None  # added to the recipe's augmentation (models/preprocess.py build_augmentation)

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage, self.name)


@dataclass
class TrainOutcome:
    output: str  # URI of the exported best checkpoint
    best_epoch: int
    best_metrics: dict
    history: list[dict]
    run_uri: str
    resumed_from: int | None  # epoch the run resumed after, None for a fresh run
    curves: str | None


# --- data ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchSpec:
    """What ``engine.load_batch`` needs from a model (its preprocessing and outputs), without its weights:
    this is what travels to the Ray Data decode tasks."""

    preprocessing: Preprocessing
    outputs: OutputSet
    augment: dict | None = None


_reseeded = False


def decode_rows(rows: pd.DataFrame, spec: BatchSpec, train: bool) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: dataset rows (path + labels) -> image/target arrays, reading bytes
    from a folder or S3 and decoding (augmenting when training) with the model's preprocessing."""
    global _reseeded
    if train and not _reseeded:  # torch starts every process with the same seed: give each its own
        torch.seed()
        _reseeded = True
    augment = build_augmentation(spec.preprocessing, spec.augment) if train and spec.augment else None
    return engine.load_batch(rows, spec, train=train, augment=augment)


def make_dataset(table: pd.DataFrame, spec: BatchSpec, train: bool):
    import ray.data

    parts = [table.iloc[i: i + ROWS_PER_BLOCK] for i in range(0, len(table), ROWS_PER_BLOCK)]
    ds = ray.data.from_pandas(parts)
    if train:
        ds = ds.random_shuffle()  # of the paths only, before decoding; a new order every epoch
    return ds.map_batches(decode_rows, fn_kwargs={"spec": spec, "train": train}, batch_format="pandas",
                          batch_size=ROWS_PER_BLOCK, num_cpus=DECODE_CPUS)


def _data_config():
    from ray.train import DataConfig

    class ShardConfig(DataConfig):
        """Train: equal shards (every worker takes the same number of steps). Val: ``equal=False`` so that
        every validation row is evaluated exactly once across the workers."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=(name == "train"),
                                                             locality_hints=hints)):
                    out[i][name] = split
            return out

    return ShardConfig()


# --- collectives ---------------------------------------------------------------------------------------
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def all_have(flag: bool, device: torch.device) -> bool:
    """True when every worker has a batch: the epoch ends for all as soon as one shard runs dry, so that
    DDP's collective calls stay matched even if a worker dropped undecodable images."""
    dist = _dist()
    if dist is None:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_sum(values: list[float], device: torch.device) -> list[float]:
    dist = _dist()
    if dist is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def reduce_stats(stats: dict, device: torch.device) -> dict:
    """Sum every worker's validation statistics (``{output: {name: tensor}}``) with one all-reduce, so that
    all workers hold the statistics of the whole validation set. A worker that saw no rows of an output
    contributes zeros (the layout is agreed on first)."""
    dist = _dist()
    if dist is None:
        return stats
    layout = sorted((o, k, tuple(v.shape)) for o, s in stats.items() for k, v in s.items())
    layouts: list = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, layout)
    union = sorted(set().union(*map(set, layouts)))
    local = {(o, k): v for o, s in stats.items() for k, v in s.items()}
    flat = torch.cat([local[(o, k)].reshape(-1).double().cpu() if (o, k) in local
                      else torch.zeros(math.prod(shape), dtype=torch.float64)
                      for o, k, shape in union]) if union else torch.zeros(0, dtype=torch.float64)
    flat = flat.to(device)
    dist.all_reduce(flat)
    flat = flat.cpu()
    out: dict = {}
    pos = 0
    for o, k, shape in union:
        size = math.prod(shape)
        out.setdefault(o, {})[k] = flat[pos: pos + size].reshape(shape).clone()
        pos += size
    return out


def gather(obj) -> list:
    dist = _dist()
    if dist is None:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def tensors_sha(tensors) -> str:
    """A short hash of ``(name, tensor)`` pairs: equal on two workers iff their values are equal."""
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def weights_sha(model) -> str:
    return tensors_sha(model.named_parameters())


_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def state_buffers_sha(model) -> str:
    """Hash of the buffers that hold model state (DMM-CNN's λ and τ), leaving out normalisation statistics,
    which each DDP worker updates from its own batch between DDP's broadcasts."""
    return tensors_sha((n, b) for n, b in model.named_buffers() if not n.endswith(_NORM_STATS))


# --- checkpoints ---------------------------------------------------------------------------------------
def _read_checkpoint_file(checkpoint, filename: str) -> bytes:
    fs, path = checkpoint.filesystem, posixpath.join(checkpoint.path, filename)
    with fs.open_input_stream(path) as f:
        return f.read()


def _load_state(model, checkpoint, expect: dict) -> dict:
    """Load a Ray checkpoint written by :func:`train_worker` into ``model``; returns the training state."""
    obj = torch.load(io.BytesIO(_read_checkpoint_file(checkpoint, MODEL_FILE)), map_location="cpu",
                     weights_only=True)
    if obj.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{checkpoint.path}/{MODEL_FILE} is not a {CHECKPOINT_FORMAT} file")
    if obj["model"] != expect["model"] or obj["config"] != expect["config"]:
        raise TrainError(f"the run in {checkpoint.path} trained {obj['model']} {obj['config']}, not "
                         f"{expect['model']} {expect['config']}: use another --name or --storage")
    model.load_state_dict(obj["state_dict"])
    return torch.load(io.BytesIO(_read_checkpoint_file(checkpoint, STATE_FILE)), map_location="cpu",
                      weights_only=True)


def _init_from(model, uri: str) -> None:
    """Copy every tensor of a project checkpoint whose name and shape match (e.g. the attention network
    from its TMTL stage); says what was not copied."""
    obj = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"--init-from {uri} is not a {CHECKPOINT_FORMAT} file")
    own = model.state_dict()
    take = {k: v for k, v in obj["state_dict"].items() if k in own and own[k].shape == v.shape}
    if not take:
        raise TrainError(f"--init-from {uri} ({obj['model']}) shares no tensor with {model.name}")
    model.load_state_dict(take, strict=False)
    missing = sorted(set(own) - set(take))
    log.warning("initialised %d/%d tensors from %s; not from it: %s", len(take), len(own), uri,
                ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))


def _numeric(metrics: dict) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for k, v in metrics.items():
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, (float, np.floating)):
            out[k] = float(v)
    return out


def score_of(value: float, mode: str) -> float:
    """The checkpoint score Ray ranks by (always "max"): the primary metric, negated when lower is
    better, and -inf when it could not be computed."""
    if not math.isfinite(value):
        return float("-inf")
    return value if mode == "max" else -value


# --- the worker ----------------------------------------------------------------------------------------
def _validate(model, shard, batch_size: int, device, amp, channels_last) -> dict:
    batches = shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2)
    return reduce_stats(engine.evaluate_batches(model, batches, device, amp, channels_last), device)


def _nonempty(batches):
    for b in batches:
        if len(b["image"]):
            yield b


def train_worker(cfg: dict) -> None:
    """The loop every Ray Train worker runs (see the module docstring)."""
    import ray.train
    import ray.train.torch

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # Ray's zero-copy batches
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    amp = torch.bfloat16 if on_gpu and cfg["amp"] else None
    channels_last = on_gpu
    recipe = Recipe(**cfg["recipe"])
    say = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)

    torch.manual_seed(cfg["seed"])
    model = models.create_model(cfg["model"], **cfg["model_kwargs"])
    if cfg.get("face_template"):  # measured on the driver (measure_template); every checkpoint keeps it
        model.preprocessing = dataclasses.replace(model.preprocessing, **cfg["face_template"])
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        state = _load_state(model, checkpoint, {"model": model.name, "config": model.config})
    elif cfg["init_from"]:
        _init_from(model, cfg["init_from"])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    core = model
    ddp = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": cfg["find_unused_parameters"]})
    opt = engine.make_optimizer(core, recipe)
    sched = engine.make_scheduler(opt, recipe)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
    state = state or {"epoch": 0, "step": 0, "best": None, "best_epoch": 0, "since_best": 0, "stopped": False,
                      "history": [], "attempts": []}
    history, attempts = list(state["history"]), list(state["attempts"])
    start_epoch, step = state["epoch"] + 1, state["step"]
    best, best_epoch, since_best = state["best"], state["best_epoch"], state["since_best"]
    if state["stopped"] or start_epoch > recipe.epochs:
        why = "stopped early" if state["stopped"] else f"completed {state['epoch']} epochs"
        say(f"run {cfg['name']} already {why}: nothing to train")
        return
    attempts.append({"start_epoch": start_epoch, "world_size": world, "time": time.time()})
    say(f"{'resuming at' if start_epoch > 1 else 'starting'} epoch {start_epoch}/{recipe.epochs}: {core.name} "
        f"on {world} worker(s) ({device.type}{', bf16' if amp else ''}), batch {recipe.batch_size} "
        f"({cfg['per_worker_batch']}/worker), lr {opt.param_groups[0]['lr']:.3g}")

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    bs = cfg["per_worker_batch"]
    fail = cfg["fail_at"]
    first_step_hashes: dict | None = None  # weight hashes around the first step of this attempt
    recorded = False
    epoch_times: list[float] = []
    header = {"run": cfg["name"], "model": core.name, "config": core.config, "data": cfg["data"],
              "primary_metric": core.primary_metric, "primary_mode": core.primary_mode,
              "recipe": cfg["recipe"], "workers": world}

    for epoch in range(start_epoch, recipe.epochs + 1):
        t0 = time.perf_counter()
        core.train()
        loss_sums: dict[str, float] = {}
        n_local = steps_local = 0
        hook_logs: dict = {}
        hook_hashes: list[str] = []  # the model's state buffers right after each on_validation (before DDP
        # forwards broadcast rank 0's buffers again): equal on every worker iff the hook saw equal stats
        # a shard's last batch of one image would stop BatchNorm: it joins the batch before it
        batches = engine.fold_remainder(_nonempty(train_shard.iter_batches(batch_size=bs, batch_format="numpy",
                                                                           prefetch_batches=2)))
        val_time, t_first, n_first = 0.0, None, 0  # steady state: from the end of the epoch's first step
        while True:
            limit_hit = cfg["steps_per_epoch"] and steps_local >= cfg["steps_per_epoch"]
            batch = None if limit_hit else next(batches, None)
            if not all_have(batch is not None, device):
                break
            record = not recorded
            if record:
                first_step_hashes = {"init": weights_sha(core)}
            out = engine.train_step(ddp, batch, opt, device, amp, channels_last)
            if record:
                first_step_hashes["after_first_step"] = weights_sha(core)
                recorded = True
            n = len(batch["image"])
            if t_first is None:
                t_first, n_first = time.perf_counter(), n
            for k, v in out.items():
                loss_sums[k] = loss_sums.get(k, 0.0) + v * n
            n_local += n
            steps_local += 1
            step += 1
            if fail and rank == fail[0] and epoch == fail[1] and steps_local >= fail[2]:
                marker = storage.join(cfg["run_uri"], f".injected-failure-rank{rank}-epoch{epoch}")
                if not storage.exists(marker):
                    storage.write_bytes(marker, b"1")
                    print(f"rank {rank}: injected failure at epoch {epoch} step {steps_local}", flush=True)
                    os._exit(1)
            if recipe.validate_every and step % recipe.validate_every == 0:
                tv = time.perf_counter()
                stats = _validate(core, val_shard, bs, device, amp, channels_last)
                hook_logs = core.on_validation(stats, epoch)
                hook_hashes.append(state_buffers_sha(core))
                val_time += time.perf_counter() - tv
        t_end = time.perf_counter()
        train_time = t_end - t0 - val_time
        steady_time = t_end - (t_first or t_end) - val_time

        keys = sorted(loss_sums)
        totals = all_sum([loss_sums[k] for k in keys] + [n_local, n_local - n_first], device)
        n_all, n_steady = totals[len(keys)], totals[len(keys) + 1]
        stats = _validate(core, val_shard, bs, device, amp, channels_last)
        metrics = core.metrics(stats)
        if not recipe.validate_every:
            # as engine.fit: with validate_every (DMM-CNN's P) the hook runs only on the every-P validations
            hook_logs = core.on_validation(stats, epoch)
            hook_hashes.append(state_buffers_sha(core))
        metrics.update(hook_logs)
        metrics["val_loss"] = engine.validation_loss(core, metrics)
        engine.step_scheduler(sched, metrics["val_loss"])
        for k, v in zip(keys, totals):
            metrics["train_" + k] = v / max(n_all, 1.0)
        metrics["train_loss"] = metrics.get("train_loss", float("nan"))
        times = gather((train_time, steady_time))  # the slowest worker sets the pace
        max_time, max_steady = max(t for t, _ in times), max(t for _, t in times)
        metrics.update(epoch=epoch, step=step, lr=opt.param_groups[0]["lr"], train_images=n_all,
                       val_images=max((float(s["n"]) for s in stats.values()), default=0.0),
                       samples_per_s=n_all / max(max_time, 1e-9),
                       steady_samples_per_s=n_steady / max_steady if max_steady > 0 else float("nan"),
                       train_time_s=max_time, epoch_time_s=time.perf_counter() - t0)
        value = engine.primary_value(core, metrics)
        if engine.is_better(core, value, best):
            best, best_epoch, since_best = value, epoch, 0
        else:
            since_best += 1
        stopped = bool(recipe.early_stopping_patience and since_best >= recipe.early_stopping_patience)
        metrics["score"] = score_of(value, core.primary_mode)
        ranks = gather({"rank": rank, "steps": steps_local, "samples": n_local, "weights": weights_sha(core),
                        "buffers": state_buffers_sha(core), "after_on_validation": hook_hashes,
                        "first_step": first_step_hashes})
        epoch_times.append(time.perf_counter() - t0)
        eta = float(np.mean(epoch_times)) * (recipe.epochs - epoch) if not stopped else 0.0
        say(engine.format_epoch(core, metrics, recipe.epochs, eta))
        history.append(dict(_numeric(metrics), eta_s=eta, stopped=int(stopped), attempt=len(attempts),
                            ranks=ranks))
        first_step_hashes = None  # only the first step of an attempt is recorded
        if stopped:
            say(f"early stopping: no improvement of {core.primary_metric} for {since_best} epochs "
                f"(best {best:.4f} at epoch {best_epoch})")

        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                write_history(cfg["run_uri"], history, attempts, header)
                data, _ = checkpoint_bytes(core, _numeric(metrics),
                                           extra={"epoch": epoch, "run": cfg["name"], "data": cfg["data"],
                                                  "recipe": cfg["recipe"]})
                with open(os.path.join(d, MODEL_FILE), "wb") as f:
                    f.write(data)
                torch.save({"epoch": epoch, "step": step, "best": best, "best_epoch": best_epoch,
                            "since_best": since_best, "stopped": stopped, "history": history,
                            "attempts": attempts, "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict() if sched is not None else None},
                           os.path.join(d, STATE_FILE))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(_numeric(metrics), checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch:04d}")
        # The controller registers a report only once it has collected it from every worker; a worker dying
        # before that would lose this checkpoint and a restart would begin again at epoch 1. Wait for it.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if stopped:
            break


# --- the driver ----------------------------------------------------------------------------------------
def prepare(spec: TrainSpec):
    """Read the data and resolve the model and recipe on the driver (so that bad flags fail here, before
    any worker starts). Returns ``(model, recipe, train_table, val_table)``."""
    from facedata.datasets import read_dataset

    if spec.workers < 1:
        raise TrainError(f"--workers must be at least 1, got {spec.workers}")
    models.model_class(spec.model)  # an unknown name fails here, naming the known ones
    ds = read_dataset(spec.data, seed=spec.seed)
    kwargs = ds.model_overrides(spec.model)
    kwargs.update(spec.model_kwargs)
    model = models.create_model(spec.model, **kwargs)
    unknown = set(spec.recipe) - {f.name for f in dataclasses.fields(Recipe)}
    if unknown:
        raise TrainError(f"unknown recipe fields {sorted(unknown)}")
    recipe = dataclasses.replace(model.recipe, **spec.recipe)
    if spec.align_jitter:
        recipe = dataclasses.replace(recipe, augment={**recipe.augment, "align_jitter": spec.align_jitter})
    if recipe.epochs < 1 or recipe.batch_size < spec.workers or recipe.lr < 0:
        raise TrainError(f"need epochs >= 1, lr >= 0 and a batch size of at least one image per worker "
                         f"(epochs {recipe.epochs}, batch {recipe.batch_size}, lr {recipe.lr}, "
                         f"{spec.workers} workers)")
    engine.make_scheduler(engine.make_optimizer(model, recipe), recipe)  # unknown optimizer/schedule -> error
    columns = ["path"] + [c for c in engine.label_columns(model) if c in ds.table.columns]
    if len(columns) == 1:
        raise TrainError(f"{spec.data} has none of the labels {model.name} learns from "
                         f"({', '.join(engine.label_columns(model))})")
    train, val = ds.split("train")[columns], ds.split("val")[columns]
    if spec.limit:
        train = train.iloc[: spec.limit]
    if spec.val_limit:
        val = val.iloc[: spec.val_limit]
    if len(train) < engine.MIN_TRAIN_BATCH * spec.workers:
        raise TrainError(f"{spec.data}: {len(train)} training images for {spec.workers} workers; every worker "
                         f"needs at least {engine.MIN_TRAIN_BATCH} (BatchNorm cannot train on one image)")
    if len(val) == 0:
        raise TrainError(f"{spec.data}: no validation images (split 'val' is empty)")
    if spec.template_images:
        model.preprocessing = measure_template(ds, train, model.preprocessing, spec)
    return model, recipe, train.reset_index(drop=True), val.reset_index(drop=True)


def measure_template(ds, train: pd.DataFrame, pre: Preprocessing, spec: TrainSpec) -> Preprocessing:
    """The model's face template measured on its training images (faces/templates.py), so that label and
    serve align a face found in a photo the way the training crops were; the checkpoint keeps it."""
    from faces.finder import FaceFinder
    from faces.templates import derive_template

    paths = list(train["path"])
    marks = None
    if "landmarks" in ds.table.columns:
        by_path = dict(zip(ds.table["path"], ds.table["landmarks"]))
        marks = [by_path.get(p) for p in paths]
    finder = None if marks is not None and any(m is not None for m in marks) else FaceFinder()
    try:
        pre, report = derive_template(paths, storage.read_bytes, pre, marks, finder, spec.template_images, spec.seed)
    except ValueError as e:
        warnings.warn(f"{spec.data}: {e}; the model keeps its default face template", stacklevel=2)
        return pre
    log.info(report.line())
    print(report.line(), flush=True)
    return pre


def check_resources(spec: TrainSpec) -> None:
    """Ray Data decodes on the CPUs the workers leave free; with none left the run would wait forever."""
    import ray

    total = ray.cluster_resources()
    need = spec.workers * spec.cpus_per_worker + DECODE_CPUS
    if total.get("CPU", 0) < need:
        raise TrainError(f"the Ray cluster has {total.get('CPU', 0):g} CPUs; {spec.workers} worker(s) x "
                         f"{spec.cpus_per_worker:g} CPU plus {DECODE_CPUS:g} for Ray Data's decoding need {need:g}: "
                         f"use fewer --workers or --cpus-per-worker, or a bigger cluster")
    if spec.use_gpu and total.get("GPU", 0) < spec.workers:
        raise TrainError(f"--gpu with {spec.workers} workers needs {spec.workers} GPUs; the cluster has "
                         f"{total.get('GPU', 0):g}")


def _run_config(spec: TrainSpec):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    fs, path = storage.filesystem(spec.storage)
    return RunConfig(
        name=spec.name, storage_path=path, storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=spec.keep, checkpoint_score_attribute="score",
                                           checkpoint_score_order="max"),
    )


def run(spec: TrainSpec, log_fn=print, prepared=None) -> TrainOutcome:
    """Train (or resume) the run described by ``spec`` on the connected Ray cluster, export its best
    checkpoint to ``spec.output`` and draw its curves. Raises :class:`TrainError` when it cannot.
    ``prepared``: what :func:`prepare` returned for ``spec``, if the caller already called it."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    model, recipe, train, val = prepared or prepare(spec)
    output = spec.output or storage.join(spec.run_uri, "best.pt")
    previous = read_history(spec.run_uri)
    resumed_from = None
    if previous is not None:
        if previous.get("model") != model.name or previous.get("config") != model.config:
            raise TrainError(f"{spec.run_uri} holds a run of {previous.get('model')} {previous.get('config')}, "
                             f"not {model.name} {model.config}: use another --name or --storage")
        if storage.exists(storage.join(spec.run_uri, SNAPSHOT_FILE)) and previous.get("epochs"):
            last = previous["epochs"][-1]
            resumed_from = int(last["epoch"])
            if last.get("stopped") or resumed_from >= recipe.epochs:
                log_fn(f"run {spec.name} in {spec.run_uri} is complete ({resumed_from} epochs"
                       f"{', stopped early' if last.get('stopped') else ''}): exporting its best checkpoint")
            else:
                log_fn(f"resuming run {spec.name} from {spec.run_uri} after epoch {resumed_from}")
    per_worker = math.ceil(recipe.batch_size / spec.workers)
    batch_spec = BatchSpec(model.preprocessing, model.outputs, recipe.augment or None)
    datasets = {"train": make_dataset(train, batch_spec, train=True),
                "val": make_dataset(val, batch_spec, train=False)}
    cfg = {
        "model": spec.model, "model_kwargs": model.config, "recipe": recipe.to_dict(), "data": spec.data,
        "name": spec.name, "run_uri": spec.run_uri, "seed": spec.seed, "threads": spec.threads or
        max(1, int(spec.cpus_per_worker)), "amp": spec.amp, "per_worker_batch": per_worker,
        "steps_per_epoch": spec.steps_per_epoch, "init_from": spec.init_from,
        # A head whose labels the data lacks (hmtnet's beauty on UTKFace) gets no gradient: DDP must know.
        "find_unused_parameters": spec.find_unused_parameters
        or any(c not in train.columns for c in engine.label_columns(model)),
        "fail_at": spec.fail_at,
        "face_template": {"template": model.preprocessing.template, "template_crop": model.preprocessing.template_crop},
    }
    resources = {"CPU": spec.cpus_per_worker}
    if spec.use_gpu:
        resources["GPU"] = 1
    check_resources(spec)
    log_fn(f"training {model.name} on {spec.data}: {len(train)} train / {len(val)} val images, "
           f"{spec.workers} worker(s), run {spec.run_uri}")
    trainer = TorchTrainer(
        train_worker, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu,
                                     resources_per_worker=resources),
        run_config=_run_config(spec), datasets=datasets, dataset_config=_data_config(),
    )
    progress = Progress(spec.run_uri, model, recipe, log_fn, after_epoch=resumed_from or 0)
    progress.start()
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray wraps the worker's error; say how to resume
        raise TrainError(f"training failed: {e}\nrerun the same command (same --name and --storage) to "
                         f"resume from the last checkpoint") from e
    finally:
        progress.stop()
    if result.error is not None:
        raise TrainError(f"training failed: {result.error}")
    if not result.best_checkpoints:
        raise TrainError(f"run {spec.run_uri} has no checkpoint to export")
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get("score", float("-inf")))
    storage.write_bytes(output, _read_checkpoint_file(best_ckpt, MODEL_FILE))
    doc = read_history(spec.run_uri) or {"epochs": []}
    curves = None
    if doc["epochs"]:
        curves = storage.join(spec.run_uri, CURVES_PNG)
        storage.write_bytes(curves, plot_curves(doc))
    return TrainOutcome(output=output, best_epoch=int(best_metrics.get("epoch", 0)), best_metrics=best_metrics,
                        history=doc["epochs"], run_uri=spec.run_uri, resumed_from=resumed_from, curves=curves)
