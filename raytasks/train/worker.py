"""One Ray Train worker (:func:`train_worker`): resume from the latest checkpoint, then the epochs of
core/engine.py (:func:`~core.engine.train_epoch`, :func:`~core.engine.epoch_metrics`, judged by
core.selection.BestEpoch: the epochs ``engine.fit`` runs in one process) on a DDP model, with what only DDP
workers do: every worker steps while all have a batch (:class:`_WorkerHooks`), validation over the whole split
(each worker's shard, the statistics all-reduced), the epoch's counts summed over the workers, and a checkpoint
reported to Ray Train every epoch (rank 0 writes it, with history.json)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import tempfile
import time
import warnings

import numpy as np
import torch

import models
import storage
from core import engine
from core.augment import Augment
from core.averaging import EpochAverage
from core.batches import drop_failed, fold_remainder
from core.runner import gpu_has_bf16
from core.selection import BestEpoch, Selection
from models.base import Recipe
from models.checkpoint import checkpoint_bytes
from raytasks import heap
from raytasks.train.collective import all_have, all_sum, gather, reduce_stats, state_buffers_sha, weights_sha
from raytasks.train.data import val_name
from raytasks.train.history import read_history, write_history
from raytasks.train.spec import MODEL_FILE, STATE_FILE, TrainError

log = logging.getLogger(__name__)

def read_checkpoint_file(checkpoint, filename: str) -> bytes:
    """A file of a Ray checkpoint of this run, read as every checkpoint is (models.checkpoint_read.read_checked:
    a run folder is storage like any other): refused over the checkpoint size limit before a byte is read, and
    given up after the read timeout (a hung mount or endpoint), a ``CheckpointError`` either way."""
    from models.checkpoint_read import read_checked

    return read_checked(storage.to_uri(checkpoint.filesystem, posixpath.join(checkpoint.path, filename)))


def _same_data(extra: dict, expect: dict) -> bool:
    """Whether a checkpoint's ``extra`` says it trained on ``expect``'s data (a file that does not say is not
    judged on it) and split seed (absent: 0, as jobs.evaluate reads such a checkpoint)."""
    same = "data" not in extra or json.loads(json.dumps(extra["data"])) == json.loads(json.dumps(expect["data"]))
    return same and int(extra.get("split_seed") or 0) == int(expect["split_seed"] or 0)


def _load_state(model, checkpoint, expect: dict) -> dict:
    """Load a Ray checkpoint written by :func:`train_worker` into ``model``; returns the training state. ``expect``:
    the model name, config, data and split seed this attempt trains; a checkpoint of anything else is refused
    (the driver refuses it first from history.json, raytasks/train/resume.py: this also covers a run whose
    history predates the split seed in its header)."""
    from models.checkpoint import CheckpointError, checkpoint_dict
    from models.checkpoint_read import torch_load_checked

    where = f"{checkpoint.path}/{MODEL_FILE}"
    try:  # read as every checkpoint is (bounded archive and contents, weights_only), and its hash checked
        obj = checkpoint_dict(where, read_checkpoint_file(checkpoint, MODEL_FILE))
    except CheckpointError as e:
        raise TrainError(f"cannot resume from {checkpoint.path}: {e}; use a new --name") from None
    if obj["model"] != expect["model"] or obj["config"] != expect["config"]:
        raise TrainError(f"the run in {checkpoint.path} trained {obj['model']} {obj['config']}, not "
                         f"{expect['model']} {expect['config']}: use another --name or --storage")
    extra = obj.get("extra") or {}
    if not _same_data(extra, expect):
        raise TrainError(f"the run in {checkpoint.path} trained on {extra.get('data')} with split seed "
                         f"{extra.get('split_seed') or 0}, not {expect['data']} with split seed {expect['split_seed']}: "
                         f"its train split may hold this split's test faces; use a new --name")
    try:  # read once the checkpoint is known to be this run's
        state = torch_load_checked(read_checkpoint_file(checkpoint, STATE_FILE), f"{checkpoint.path}/{STATE_FILE}",
                                   checkpoint=False)
    except CheckpointError as e:
        raise TrainError(f"cannot resume from {checkpoint.path}: {e}") from None
    model.load_state_dict(obj["state_dict"])
    return state


def _contiguous(value):
    """``value`` with every tensor in it (through dicts, lists and tuples) contiguous: a tensor already
    contiguous is itself, any other a contiguous copy."""
    if isinstance(value, torch.Tensor):
        return value.contiguous()
    if isinstance(value, dict):
        return {k: _contiguous(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_contiguous(v) for v in value)
    return value


def save_state(state: dict, path: str) -> None:
    """Write a run's training state (STATE_FILE: the epoch counters, the optimizer's and scheduler's state, the
    averaging window) at ``path``, every tensor contiguous. :func:`_load_state` reads it back through
    ``torch_load_checked``, which refuses a tensor that is not contiguous (models/checkpoint_hash.py
    ``check_tensor``); on a GPU the model is channels_last, and so are its optimizer's buffers (SGD's
    momentum, Adam's moments, and the averaging window's copies of it): saved as they were, no restart or rerun
    could resume. The layout carries no values: a resumed optimizer takes them back contiguous
    (``optimizer.load_state_dict`` casts to the parameters' device and dtype only; :func:`optimizer_layout_like_params`
    gives them the parameters' layout back)."""
    torch.save(_contiguous(state), path)


def optimizer_layout_like_params(opt) -> None:
    """After ``opt.load_state_dict`` of a state :func:`save_state` wrote: every buffer shaped like its parameter
    takes the parameter's layout again (channels_last on a GPU), as a run that never stopped has it, so that a
    resumed step is the same kernel on the same layout (``load_state_dict`` keeps the saved, contiguous strides)."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            for k, v in (st or {}).items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def init_tensors(model, uri: str) -> tuple[dict, object]:
    """The tensors of the project checkpoint ``uri`` whose name and shape match ``model``'s (e.g. the attention
    network from its TMTL stage), and its ``CheckpointInfo``; a :class:`TrainError` when it cannot be read or
    shares none. The file is read as every checkpoint is (models.checkpoint.load_checkpoint: bounded read,
    weights_only, content hash checked, ``URI#sha256:<hex>`` pinned); we load it through that function, which also
    builds its model, rather than repeat its checks here. The driver calls it too (raytasks/train/job.py
    ``prepare``), so that a missing or unfit file is refused before the data and the workers."""
    from models.checkpoint import CheckpointError, load_checkpoint

    try:
        source, info = load_checkpoint(uri)
    except CheckpointError as e:
        raise TrainError(f"--init-from: {e}") from None
    own, theirs = model.state_dict(), source.state_dict()
    take = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    if not take:
        raise TrainError(f"--init-from {uri} ({info.model}) shares no tensor with {model.name}")
    return take, info


def _init_from(model, uri: str) -> None:
    """Copy every tensor of a project checkpoint whose name and shape match (:func:`init_tensors`); says what was
    not copied."""
    take, info = init_tensors(model, uri)
    own = model.state_dict()
    model.load_state_dict(take, strict=False)
    missing = sorted(set(own) - set(take))
    log.warning("initialised %d/%d tensors from %s (%s); not from it: %s", len(take), len(own), info.uri,
                info.short_hash(), ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))


def _numeric(metrics: dict) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for k, v in metrics.items():
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, (float, np.floating)):
            out[k] = float(v)
    return out


# --- the worker ----------------------------------------------------------------------------------------
def _validate(model, shard, batch_size: int, device, amp, channels_last, skipped: list[int] | None = None) -> dict:
    """Statistics over the whole validation split (all-reduced); ``skipped[0]`` counts this worker's
    validation images that could not be decoded."""
    batches = drop_failed(shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2),
                                 skipped if skipped is not None else [0])
    return reduce_stats(engine.evaluate_batches(model, batches, device, amp, channels_last), device)


class _WorkerHooks(engine.EpochHooks):
    """What a DDP worker adds around core.engine.train_epoch's steps: it steps while every worker has a batch
    (a shard's undecodable images would otherwise unmatch DDP's collective calls), records the weights around
    the first step of this attempt and the model's state buffers after each on_validation (before DDP's forward
    broadcasts rank 0's buffers again: equal on every worker iff the hook saw equal statistics), gives the freed
    heap back (raytasks/heap.py) and injects a test's failure (``fail_at``: rank, epoch, step)."""

    def __init__(self, core, device, rank: int, cfg: dict):
        self.core, self.device, self.rank, self.cfg = core, device, rank, cfg
        self.epoch, self.recorded = 0, False
        self.first_step: dict | None = None  # weight hashes around the first step of this attempt
        self.hook_hashes: list[str] = []  # the epoch's

    def start(self, epoch: int) -> None:
        self.epoch, self.hook_hashes = epoch, []

    def more(self, has_batch: bool) -> bool:
        return all_have(has_batch, self.device)

    def before_step(self) -> None:
        if not self.recorded:
            self.first_step = {"init": weights_sha(self.core)}

    def after_step(self, steps: int) -> None:
        if not self.recorded:
            self.first_step["after_first_step"] = weights_sha(self.core)
            self.recorded = True
        if steps % heap.TRIM_EVERY_STEPS == 0:
            heap.trim()
        fail, rank, epoch = self.cfg["fail_at"], self.rank, self.epoch
        if fail and rank == fail[0] and epoch == fail[1] and steps >= fail[2]:
            marker = storage.join(self.cfg["run_uri"], f".injected-failure-rank{rank}-epoch{epoch}")
            if not storage.exists(marker):
                storage.write_bytes(marker, b"1")
                print(f"rank {rank}: injected failure at epoch {epoch} step {steps}", flush=True)
                os._exit(1)

    def after_hook(self) -> None:
        self.hook_hashes.append(state_buffers_sha(self.core))


def _all_workers(done: engine.EpochSteps, skipped: int, val_skipped: int, device) -> tuple[engine.EpochSteps, int, int]:
    """Every worker's epoch: the losses, images and undecodable images (train, validation) summed, the slowest
    worker's times (it sets the pace)."""
    keys = sorted(done.loss_sums)
    totals = all_sum([done.loss_sums[k] for k in keys] + [done.images, done.steady_images, skipped, val_skipped],
                     device)
    times = gather((done.train_time, done.steady_time))
    n = len(keys)
    total = dataclasses.replace(done, loss_sums=dict(zip(keys, totals)), images=totals[n], steady_images=totals[n + 1],
                                train_time=max(t for t, _ in times), steady_time=max(t for _, t in times))
    return total, int(totals[n + 2]), int(totals[n + 3])


def _precision(cfg: dict, device, rank: int):
    """bf16 autocast where the GPU computes it natively (sm_80 and up); a V100 or T4 only emulates it, slower than
    fp32 (core.runner.gpu_has_bf16, the rule label and serve use); fp32 there, with a line saying so."""
    on_gpu = device.type == "cuda"
    amp = torch.bfloat16 if on_gpu and cfg["amp"] and gpu_has_bf16(device) else None
    if on_gpu and cfg["amp"] and amp is None and rank == 0:
        log.warning("%s computes bfloat16 only by emulation (compute capability below 8.0): training in fp32",
                    torch.cuda.get_device_name(device))
    return amp


def _model(cfg: dict, recipe: Recipe, checkpoint, channels_last: bool):
    """This worker's model, created with the run's seed and face template, with the latest checkpoint's weights
    and its training state (None: a new run, from ``--init-from`` when given) and the averaging window."""
    torch.manual_seed(cfg["seed"])
    model = models.create_model(cfg["model"], **cfg["model_kwargs"])
    if cfg.get("face_template"):  # measured on the driver (measure_template); every checkpoint keeps it
        model.preprocessing = dataclasses.replace(model.preprocessing, **cfg["face_template"])
    state = None
    if checkpoint is not None:
        state = _load_state(model, checkpoint, {"model": model.name, "config": model.config, "data": cfg["data"],
                                                "split_seed": cfg.get("split_seed", 0)})
    elif cfg["init_from"]:
        _init_from(model, cfg["init_from"])
    average = EpochAverage(model, recipe.average_epochs)
    if state is not None:  # the checkpoint's weights are the window's average; training goes on from its last
        average.resume(model, state.get("average_window"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, state, average


def _optimizer(core, recipe: Recipe, state: dict | None):
    """The optimizer and scheduler (None: none), with the checkpoint's state when ``state`` is one's."""
    opt = engine.make_optimizer(core, recipe)
    sched = engine.make_scheduler(opt, recipe)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        optimizer_layout_like_params(opt)
        if sched is not None and state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
    return opt, sched


def _header(cfg: dict, core, selection, augment: Augment, world: int) -> dict:
    """history.json's header. data and split_seed: a rerun of this --name on other data or another split is
    refused (raytasks/train/resume.py); primary_metric: what picks the best epoch, the model's own unless the data
    cannot measure it ("selection")."""
    return {"run": cfg["name"], "model": core.name, "config": core.config, "data": cfg["data"],
            "split_seed": cfg.get("split_seed", 0), "primary_metric": selection.metric,
            "primary_mode": selection.mode, "selection": selection.to_dict(),
            "recipe": cfg["recipe"], "workers": world, "faces": cfg.get("faces"), "augment": augment.to_dict()}


_NEW_RUN = {"epoch": 0, "step": 0, "best": None, "best_epoch": 0, "since_best": 0, "stopped": False, "history": [],
           "attempts": []}


def _record_attempt(cfg: dict, history: list, attempts: list, header: dict) -> list:
    """Rank 0 records this attempt now, not with its first epoch: an attempt whose workers die before their first
    checkpoint (a rerun's resumed attempt killed in its first epoch) is not in the state a restart loads, so the
    list of attempts is history.json's, which every attempt writes when it starts. The driver's Progress counts
    them there to say that the worker group restarted. Returns the attempts."""
    written = read_history(cfg["run_uri"])
    if written and len(written.get("attempts", ())) >= len(attempts):
        attempts = [*written["attempts"], attempts[-1]]
    write_history(cfg["run_uri"], history, attempts, header)
    return attempts


def _export(folder: str, cfg: dict, core, metrics: dict, selection, augment: Augment, state: dict):
    """Rank 0's checkpoint of an epoch, written in ``folder``: the model in the project's format (MODEL_FILE,
    models/checkpoint.py) and the training state a restart resumes (STATE_FILE)."""
    import ray.train

    data, _ = checkpoint_bytes(core, _numeric(metrics),
                               extra={"epoch": state["epoch"], "run": cfg["name"], "data": cfg["data"],
                                      "split_seed": cfg.get("split_seed", 0), "selection": selection.to_dict(),
                                      "recipe": cfg["recipe"], "augment": augment.to_dict(), "faces": cfg.get("faces")})
    with open(os.path.join(folder, MODEL_FILE), "wb") as f:
        f.write(data)
    save_state(state, os.path.join(folder, STATE_FILE))
    return ray.train.Checkpoint.from_directory(folder)


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
    amp, channels_last = _precision(cfg, device, rank), device.type == "cuda"
    recipe = Recipe(**cfg["recipe"])
    # the metric that picks the best epoch, chosen on the driver from the validation split (core.selection.choose_selection)
    selection = Selection.from_dict(cfg["selection"])
    augment = Augment.from_recipe(recipe.augment)  # on this device, in the aligned frame (core/augment.py)
    say = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)

    core, state, average = _model(cfg, recipe, ray.train.get_checkpoint(), channels_last)
    ddp = ray.train.torch.prepare_model(
        core, parallel_strategy_kwargs={"find_unused_parameters": cfg["find_unused_parameters"]})
    opt, sched = _optimizer(core, recipe, state)
    state = state or _NEW_RUN
    history, attempts = list(state["history"]), list(state["attempts"])
    start_epoch, step = state["epoch"] + 1, state["step"]
    judge = BestEpoch(selection, recipe.early_stopping_patience, state["best"], state["best_epoch"], state["since_best"])
    if state["stopped"] or start_epoch > recipe.epochs:
        why = "stopped early" if state["stopped"] else f"completed {state['epoch']} epochs"
        say(f"run {cfg['name']} already {why}: nothing to train")
        return
    attempts.append({"start_epoch": start_epoch, "world_size": world, "time": time.time()})
    generator = torch.Generator(device).manual_seed(cfg["seed"] * 7919 + 1009 * len(attempts) + rank)
    say(f"{'resuming at' if start_epoch > 1 else 'starting'} epoch {start_epoch}/{recipe.epochs}: {core.name} "
        f"on {world} worker(s) ({device.type}{', bf16' if amp else ''}), batch {recipe.batch_size} "
        f"({cfg['per_worker_batch']}/worker), lr {opt.param_groups[0]['lr']:.3g}")

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard(val_name(rank, world))
    bs = cfg["per_worker_batch"]
    hooks = _WorkerHooks(core, device, rank, cfg)
    epoch_times: list[float] = []
    header = _header(cfg, core, selection, augment, world)
    if rank == 0:
        attempts = _record_attempt(cfg, history, attempts, header)

    def validate(skipped: list[int] | None = None) -> dict:
        return _validate(core, val_shard, bs, device, amp, channels_last, skipped)

    for epoch in range(start_epoch, recipe.epochs + 1):
        t0 = time.perf_counter()
        hooks.start(epoch)
        skipped, val_skipped = [0], [0]  # images of this worker's shards that could not be decoded
        # a shard's last batch of one image would stop BatchNorm: it joins the batch before it
        batches = fold_remainder(drop_failed(train_shard.iter_batches(
            batch_size=bs, batch_format="numpy", prefetch_batches=2), skipped))
        done, step = engine.train_epoch(ddp, batches, opt, device, epoch, step, recipe, average, validate, amp=amp,
                                        channels_last=channels_last, augment=augment, generator=generator,
                                        max_steps=cfg["steps_per_epoch"], hooks=hooks)
        stats = validate(val_skipped)
        total, n_skipped, n_val_skipped = _all_workers(done, skipped[0], val_skipped[0], device)
        metrics = engine.epoch_metrics(core, stats, total, epoch, step, recipe, opt, sched, skipped=n_skipped,
                                       val_skipped=n_val_skipped, t0=t0, hooks=hooks)
        stopped = judge.judge(epoch, metrics)
        ranks = gather({"rank": rank, "steps": done.steps, "samples": done.images, "weights": weights_sha(core),
                        "buffers": state_buffers_sha(core), "after_on_validation": hooks.hook_hashes,
                        "first_step": hooks.first_step})
        epoch_times.append(time.perf_counter() - t0)
        eta = float(np.mean(epoch_times)) * (recipe.epochs - epoch) if not stopped else 0.0
        say(engine.format_epoch(core, metrics, recipe.epochs, eta, metric=selection.metric))
        history.append(dict(_numeric(metrics), eta_s=eta, stopped=int(stopped), attempt=len(attempts),
                            ranks=ranks))
        hooks.first_step = None  # only the first step of an attempt is recorded
        if stopped:
            say(judge.stop_line())

        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                write_history(cfg["run_uri"], history, attempts, header)
                ckpt = _export(d, cfg, core, metrics, selection, augment, {
                    "epoch": epoch, "step": step, "best": judge.best, "best_epoch": judge.best_epoch,
                    "since_best": judge.since_best, "stopped": stopped, "history": history, "attempts": attempts,
                    "optimizer": opt.state_dict(), "average_window": average.state(),
                    "scheduler": sched.state_dict() if sched is not None else None})
            ray.train.report(_numeric(metrics), checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch:04d}")
        # The controller registers a report only once it has collected it from every worker; a worker dying
        # before that would lose this checkpoint and a restart would begin again at epoch 1. Wait for it.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if stopped:
            break
