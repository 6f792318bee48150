"""Distributed training of any model of the zoo with Ray Train (DDP), the program behind ``jobs.train``.

    python -m jobs.train --model dmm_cnn --data celeba:s3://bucket/celeba --workers 4 --gpu \\
        --storage s3://bucket/runs --name celeba-dmm --output s3://bucket/models/dmm.pt

The driver (:func:`run`) reads the dataset's table (paths + labels), turns the train and validation splits
into Ray Datasets of paths that are decoded and augmented on the fly by Ray Data tasks
(:func:`decode_rows`, the model's own preprocessing through ``core.batches.load_batch``), and starts a
``TorchTrainer``. Every worker (:func:`train_worker`) streams its own shard of both splits, runs the epochs
of ``core/engine.py`` (``train_epoch``, ``epoch_metrics``: the ones ``engine.fit`` runs) on a DDP-wrapped model (gloo on CPUs; NCCL, bf16 autocast and
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
    history.json, history.csv         one row per epoch and every attempt, rewritten by rank 0 when an attempt
                                      starts and after every epoch
    curves.png                        the training curves, drawn by the driver at the end
    train_values.json                 without a recipe: the values history.json does not record (seed, limits,
                                      detector, template, --init-from), for a rerun to be checked against

Fault tolerance and resume, the Ray Train V2 way: ``FailureConfig(max_failures=k)`` makes the controller
restart the whole worker group when a worker process dies; the new workers get the latest reported
checkpoint from ``ray.train.get_checkpoint()`` and continue with the next epoch (weights, DMM-CNN's
weights and thresholds, optimizer, scheduler, early-stopping counters and history all come from it).
Running the same command again with the same ``--name`` and ``--storage`` starts a trainer with the
same ``RunConfig(name, storage_path)``: its checkpoint manager finds the snapshot in the run folder, so
``get_checkpoint()`` again returns the latest checkpoint and the run picks up where it stopped (V2 has
no ``Trainer.restore``). A run that is already complete (judged by its latest committed checkpoint, not by
history.json, which is written first) only re-exports its best checkpoint; a rerun with another model, config,
``--data`` or ``--split-seed``, or (without a recipe) any other training value but a larger ``--epochs``, is refused
(raytasks/train/resume.py ``check_values``; a recipe's stages by their identity, raytasks/train/stages.py). After each
report every worker waits until the controller has committed the checkpoint
(``get_all_reported_checkpoints(COMMITTED)``): the controller collects a report from all workers before it
registers it, so a worker dying just after ``report`` would otherwise cost the epoch.
"""

from __future__ import annotations

import dataclasses
import math

import models
import storage
from core import engine
from core.batches import MIN_TRAIN_BATCH, label_columns, unlabelled_columns
from facedata.datasets import FACE_SELECT_COLUMNS
from facedata.datasets.base import label_line
from faces.align import default_template
from faces.trainfaces import default_mode
from models.base import Recipe
from models.checkpoint import CheckpointError, checkpoint_info, with_extra
from models.recipes import TRAIN_FACE_MODES
from raytasks.reach import started_here
from raytasks.train.data import DECODE_CPUS, BatchSpec, data_config, make_dataset, val_datasets
from raytasks.train.facerows import measure_template, resolve_faces
from raytasks.train.history import HISTORY_JSON, Progress, plot_curves, read_history
from raytasks.train.resume import check_folder, committed_epoch, resume_point, stored_result
from raytasks.train.spec import CURVES_PNG, MODEL_FILE, SNAPSHOT_FILE, TrainError, TrainOutcome, TrainSpec
from raytasks.train.worker import init_tensors, read_checkpoint_file, train_worker


def resolve_model(spec: TrainSpec, ds):
    """The model and its :class:`Recipe` for ``spec`` on the data set ``ds`` (the data's own constructor
    arguments, then ``spec.model_kwargs``; the model's recipe with ``spec.recipe`` and the augmentation flags):
    every value checked, no image read."""
    from core.augment import Augment

    kwargs = ds.model_overrides(spec.model)
    kwargs.update(spec.model_kwargs)
    model = models.create_model(spec.model, **kwargs)
    unknown = set(spec.recipe) - {f.name for f in dataclasses.fields(Recipe)}
    if unknown:
        raise TrainError(f"unknown recipe fields {sorted(unknown)}")
    recipe = dataclasses.replace(model.recipe, **spec.recipe)
    extra_aug = {**spec.augment, **({"align_jitter": spec.align_jitter} if spec.align_jitter else {})}
    if extra_aug:
        recipe = dataclasses.replace(recipe, augment={**recipe.augment, **extra_aug})
    try:
        Augment.from_recipe(recipe.augment).check(model.outputs)
    except ValueError as e:
        raise TrainError(f"augmentation: {e}") from None
    if not 0 <= recipe.label_smoothing < 1:
        raise TrainError(f"--label-smoothing must be at least 0 and below 1, got {recipe.label_smoothing}")
    if recipe.epochs < 1 or recipe.batch_size < spec.workers or not 0 <= recipe.lr < math.inf \
            or not 0 <= recipe.weight_decay < math.inf:  # "not 0 <= x": a NaN rate would train on NaN
        raise TrainError(f"need epochs >= 1, a finite lr and weight decay >= 0 and a batch size of at least one "
                         f"image per worker (epochs {recipe.epochs}, batch {recipe.batch_size}, lr {recipe.lr}, "
                         f"weight decay {recipe.weight_decay}, {spec.workers} workers)")
    engine.make_scheduler(engine.make_optimizer(model, recipe), recipe)  # unknown optimizer/schedule -> error
    return model, recipe


def prepare(spec: TrainSpec, ds=None):
    """Read the data (``ds``: the data set already read for ``spec.data`` and ``spec.seed``), find the
    training faces and resolve the model and recipe on the driver (so that bad flags and data fail here,
    before any worker starts). Returns ``(model, recipe, train_table, val_table, faces)``; ``faces`` says how
    the faces were found (:func:`~raytasks.train.facerows.resolve_faces`)."""
    from facedata.datasets import read_dataset

    if spec.workers < 1:
        raise TrainError(f"--workers must be at least 1, got {spec.workers}")
    models.model_class(spec.model)  # an unknown name fails here, naming the known ones
    ds = ds if ds is not None else read_dataset(spec.data, seed=spec.split_seed)
    model, recipe = resolve_model(spec, ds)
    check_output(spec.output)
    if spec.init_from and not storage.exists(storage.join(spec.run_uri, HISTORY_JSON)):  # a rerun resumes from
        check_init_from(model, spec.init_from)  # its own checkpoint: the starting one may be gone, and unread
    ds = ds.for_labels(label_columns(model))  # DMM-CNN's Smiling from GENKI-4K's smile, in a mix
    columns = ["path"] + [c for c in label_columns(model) if c in ds.table.columns]
    if len(columns) == 1:
        raise TrainError(f"{spec.data} has none of the labels {model.name} learns from "
                         f"({', '.join(label_columns(model))})")
    mode = spec.faces or default_mode(ds.format)
    if mode not in TRAIN_FACE_MODES:
        raise TrainError(f"--faces must be one of {', '.join(TRAIN_FACE_MODES)}, got {mode!r}")
    extra = [c for c in (*FACE_SELECT_COLUMNS, "landmarks") if c in ds.table.columns and c not in columns]
    train, val = ds.split("train")[columns + extra], ds.split("val")[columns + extra]
    train, val = engine.sample_rows(train, spec.limit, spec.seed), engine.sample_rows(val, spec.val_limit, spec.seed)
    train, val, faces = resolve_faces(spec, mode, train, val)
    train, val = train.drop(columns=extra), val.drop(columns=extra)
    if len(train) < MIN_TRAIN_BATCH * spec.workers:
        raise TrainError(f"{spec.data}: {len(train)} training images for {spec.workers} workers; every worker "
                         f"needs at least {MIN_TRAIN_BATCH} (BatchNorm cannot train on one image)")
    if len(val) == 0:
        raise TrainError(f"{spec.data}: no validation images (split 'val' is empty)")
    if faces["template"] == "measured":
        model.preprocessing = measure_template(ds, train, model.preprocessing, spec)
    elif mode != "whole":
        # faces in photos sit anywhere: the canonical template of the input size (faces/trainfaces.py), the
        # model's own where it has one (age_gender_race's dlib chip, which its pretrained trunk learned from)
        pre = model.preprocessing
        if pre.template is None:
            model.preprocessing = dataclasses.replace(pre, template_crop=None, template=default_template(pre))
    print(label_line(train, val, label_columns(model)), flush=True)  # what each label learns from
    return model, recipe, train.reset_index(drop=True), val.reset_index(drop=True), faces


def check_output(output: str | None) -> None:
    """Refuse, before the faces and the workers, a local ``--output`` that could not be written after training
    (``storage.unwritable``: it was a traceback once the run had trained). An s3:// output is written at the end
    (a refused PUT there, or any write error, is a :class:`TrainError` that keeps the run: :func:`run`)."""
    problem = storage.unwritable(output) if output else None
    if problem:
        raise TrainError(f"--output {output}: {problem}: the checkpoint could not be written")


def check_init_from(model, uri: str) -> None:
    """``--init-from`` read in the driver as the workers will read it (:func:`init_tensors`): a file that is not
    there, not a checkpoint, not the pinned hash or that shares no tensor with the model is a :class:`TrainError`
    before the data's faces are found and the workers start (it was the workers' error, with a "rerun to resume"
    that could not help). A local file missing here while the cluster runs the workers on other nodes is left to
    them: their disks may hold it."""
    from raytasks.reach import path_of, tasks_elsewhere

    path = path_of(uri)
    if not storage.is_s3(path) and not storage.exists(path) and tasks_elsewhere() is not None:
        return
    init_tensors(model, uri)


def check_resources(spec: TrainSpec, can_grow: bool | None = None, warn=print) -> None:
    """The workers' CPUs and GPUs plus the CPU of Ray Data's decoding, against the cluster's resources now.

    Short on a Ray this process started (:func:`raytasks.reach.started_here`, the rule the label job uses:
    ``can_grow`` False) it is an error, since nothing will add a node and the run would wait forever. Short on a
    cluster this process joined it is a warning naming what is missing, and the run goes on: Ray Train's worker
    group waits for its placement group, which the autoscaler sees and adds nodes for (cluster.yaml's GPU
    workers scale from zero and its head offers no CPU, so ``--workers 4 --gpu`` finds nothing there at first).
    No ``request_resources`` is made: the placement group is already that demand, and a request would stay in
    force after the job, keeping the nodes up until someone cleared it."""
    import ray

    can_grow = (not started_here()) if can_grow is None else can_grow
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    need = spec.workers * spec.cpus_per_worker + DECODE_CPUS
    short = []
    if cpus < need:
        short.append(f"the Ray cluster has {cpus:g} CPUs; {spec.workers} worker(s) x {spec.cpus_per_worker:g} CPU "
                     f"plus {DECODE_CPUS:g} for Ray Data's decoding need {need:g}")
    if spec.use_gpu and gpus < spec.workers:
        short.append(f"--gpu with {spec.workers} workers needs {spec.workers} GPUs; the cluster has {gpus:g}")
    if not short:
        return
    if not can_grow:
        hint = ("use fewer --workers or --cpus-per-worker, or a bigger cluster" if cpus < need else
                "use fewer --workers, or a cluster with more GPUs")
        raise TrainError(f"{'; and '.join(short)} (on this Ray, which this process started, nothing adds "
                         f"nodes): {hint}")
    warn(f"warning: {'; and '.join(short)} now; Ray Train will wait for the autoscaler to add nodes (the run "
         "waits for ever if no node type of the cluster can give them)")


def _run_config(spec: TrainSpec):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    fs, path = storage.filesystem(spec.storage)
    return RunConfig(
        name=spec.name, storage_path=path, storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=spec.keep, checkpoint_score_attribute="score",
                                           checkpoint_score_order="max"),
    )


def calibrated_bytes(data: bytes, output: str, val, batch_size: int, log_fn=print) -> tuple[bytes, str]:
    """The best checkpoint (``data``, to be exported to ``output``) with its temperatures (one per categorical
    output, one per binary attribute) and regression shifts fitted on the validation split, in the driver
    (models/calibration.py): the label and serve columns ``*_prob`` are then calibrated, and
    ``extra["calibration"]`` records the fit. A model with nothing to calibrate is ``data`` as it is, and says so.
    Returns the bytes and their content hash. Nothing is written: the export writes ``output`` once. The
    per-epoch checkpoints stay raw."""
    import torch

    from core.evaluation import calibration_pairs, run_model
    from models.calibration import CalibrationError, fit_calibration
    from models.checkpoint import checkpoint_bytes, load_checkpoint

    model, info = load_checkpoint(output, data=data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        cal = fit_calibration(model, calibration_pairs(model, run_model(model, val, batch_size, device)))
    except CalibrationError as e:
        log_fn(f"not calibrated: {e}")
        return data, info.hash
    data, digest = checkpoint_bytes(model.cpu(), info.metrics,
                               {**info.extra, "calibration": {"split": "val", "images": len(val), "fit": cal.summary()}})
    log_fn("calibrated on the validation split (" + ", ".join(c.line() for c in cal.outputs.values()) + ")")
    for c in cal.outputs.values():
        for line in c.rejected_lines():
            log_fn(line)
    return data, digest


def ray_removed_the_workers(error: BaseException) -> bool:
    """Whether a failed run (the :class:`TrainError` of :func:`_fit`, or Ray's own error) ended by Ray Train's fault,
    not the training's: a live run's placement group removed under its workers, which Ray reports as a
    ``ControllerError`` naming the removed group and does not retry. Seen with Ray 2.60 in the suite (2026-12-07,
    docs/benchmarks.md): the run's ``PlacementGroupCleaner`` asks Ray's State API whether the controller lives and
    reads a missing answer as a dead controller (the flaw named in the review of ray-project/ray#65447). The same
    command resumes such a run from its last checkpoint."""
    cause = error.__cause__ if isinstance(error, TrainError) and error.__cause__ is not None else error
    return type(cause).__name__ == "ControllerError" and "placement group was removed" in str(cause)


def _fit(spec: TrainSpec, model, recipe, train, val, faces, selection, resumed_from, log_fn):
    """Start (or resume) the TorchTrainer of the run and wait for it; returns Ray Train's result."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    per_worker = math.ceil(recipe.batch_size / spec.workers)
    batch_spec = BatchSpec(model.preprocessing, model.outputs, recipe.augment or None, faces["max_side"])
    datasets = {"train": make_dataset(train, batch_spec, train=True), **val_datasets(val, spec.workers, batch_spec)}
    cfg = {
        "model": spec.model, "model_kwargs": model.config, "recipe": recipe.to_dict(), "data": spec.data,
        "name": spec.name, "run_uri": spec.run_uri, "seed": spec.seed, "split_seed": spec.split_seed, "threads": spec.threads or
        max(1, int(spec.cpus_per_worker)), "amp": spec.amp, "per_worker_batch": per_worker,
        "steps_per_epoch": spec.steps_per_epoch, "init_from": spec.init_from,
        # A head whose labels the data lacks (hmtnet's beauty on UTKFace) gets no gradient: DDP must know.
        "find_unused_parameters": spec.find_unused_parameters or bool(unlabelled_columns(model, train.columns)),
        "fail_at": spec.fail_at,
        "face_template": {"template": model.preprocessing.template, "template_crop": model.preprocessing.template_crop},
        "faces": faces, "selection": selection.to_dict(),
    }
    resources = {"CPU": spec.cpus_per_worker}
    if spec.use_gpu:
        resources["GPU"] = 1
    check_resources(spec, warn=log_fn)
    log_fn(f"training {model.name} on {spec.data}: {len(train)} train / {len(val)} val images, "
           f"{spec.workers} worker(s), run {spec.run_uri}")
    log_fn(selection.line())
    trainer = TorchTrainer(
        train_worker, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu,
                                     resources_per_worker=resources),
        run_config=_run_config(spec), datasets=datasets, dataset_config=data_config(),
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
    return result


def run(spec: TrainSpec, log_fn=print, prepared=None, finish=None) -> TrainOutcome:
    """Train (or resume) the run described by ``spec`` on the connected Ray cluster, export its best
    checkpoint to ``spec.output`` and draw its curves. Raises :class:`TrainError` when it cannot.
    ``prepared``: what :func:`prepare` returned for ``spec``, if the caller already called it. A run that is
    already complete starts no worker: its best checkpoint is read from the run's storage and exported.
    ``finish(outcome) -> dict``: entries added to the export's ``extra`` before it is written (a recipe's
    record, raytasks/train/stages.py), given the outcome as it stands then (no curves; the hash before them)."""
    model, recipe, train, val, faces = prepared or prepare(spec)
    output = spec.output or storage.join(spec.run_uri, "best.pt")
    selection, previous = check_folder(spec, model, recipe, val, faces["mode"])  # another run there is refused
    result, resumed_from, complete = None, None, False
    if storage.exists(storage.join(spec.run_uri, SNAPSHOT_FILE)):
        result = stored_result(spec)
        resumed_from, complete, stopped = resume_point(previous, committed_epoch(result), recipe.epochs)
        if complete:
            log_fn(f"run {spec.name} in {spec.run_uri} is complete ({resumed_from} epochs"
                   f"{', stopped early' if stopped else ''}): exporting its best checkpoint")
        elif resumed_from is not None:
            log_fn(f"resuming run {spec.name} from {spec.run_uri} after epoch {resumed_from}")
    if not complete:
        result = _fit(spec, model, recipe, train, val, faces, selection, resumed_from, log_fn)
    if result.error is not None:
        raise TrainError(f"training failed: {result.error}")
    if not result.best_checkpoints:
        raise TrainError(f"run {spec.run_uri} has no checkpoint to export")
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get("score", float("-inf")))
    loss = best_metrics.get("train_loss")
    if isinstance(loss, (int, float)) and not math.isfinite(loss):  # a diverged epoch scores -inf: all of them did
        raise TrainError(f"training diverged: every kept checkpoint of {spec.run_uri} has a train loss of {loss} "
                         "(NaN weights); nothing is exported: lower --lr (with bf16 on a GPU, --no-amp may help too)")
    try:
        data = read_checkpoint_file(best_ckpt, MODEL_FILE)
    except CheckpointError as e:
        raise TrainError(f"cannot export the best checkpoint of {spec.run_uri}: {e}") from None
    if spec.calibrate:  # the raw bytes are checked as they are loaded, the calibrated ones made and hashed here
        data, output_hash = calibrated_bytes(data, output, engine.sample_rows(val, spec.calibrate_limit, spec.seed),
                                             recipe.batch_size, log_fn)
    else:
        output_hash = checkpoint_info(output, data=data).hash  # checked before it is exported
    doc = read_history(spec.run_uri) or {"epochs": []}
    outcome = TrainOutcome(output=output, best_epoch=int(best_metrics.get("epoch", 0)), best_metrics=best_metrics,
                           history=doc["epochs"], run_uri=spec.run_uri, resumed_from=resumed_from, curves=None,
                           output_hash=output_hash)
    if finish is not None:  # what the caller adds to the export's extra (a recipe's record), in memory
        data, output_hash = with_extra(output, finish(outcome), data=data)
    try:  # once: a reader of --output never sees a raw, unrecorded or half-made export
        storage.write_bytes(output, data)
    except OSError as e:  # the training is kept: a rerun finds the run complete and only exports
        raise TrainError(f"cannot write --output {output} ({type(e).__name__}: {e}); the trained run is kept in "
                         f"{spec.run_uri}: run the same command with another --output to export it (nothing is "
                         "trained again)") from None
    curves = None
    if doc["epochs"]:
        curves = storage.join(spec.run_uri, CURVES_PNG)
        storage.write_bytes(curves, plot_curves(doc))
    return dataclasses.replace(outcome, curves=curves, output_hash=output_hash)
