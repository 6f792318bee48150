"""What a rerun of the same ``--name`` finds in the run folder: whether it may go on (:func:`check_folder`), where
it goes on from (:func:`resume_point`) and the run's stored result (:func:`stored_result`).

Split from raytasks/train/job.py (the driver), which calls these before any worker starts.
"""

from __future__ import annotations

import json

import storage
from core.engine import Selection, choose_selection
from raytasks.train.history import read_history
from raytasks.train.spec import VALUES_FILE, TrainError, TrainSpec

RECIPE_FILE = "recipe.json"  # a recipe's record (raytasks/train/stages.py RECIPE_FILE): its stages have their own rule
# the flag of each recipe field a rerun's refusal names (jobs/train.py); a field without one is named as it is
_FLAGS = {"lr": "--lr", "batch_size": "--batch-size", "optimizer": "--optimizer", "weight_decay": "--weight-decay",
          "schedule": "--schedule", "early_stopping_patience": "--patience", "validate_every": "--validate-every",
          "average_epochs": "--average-epochs", "label_smoothing": "--label-smoothing",
          "augment": "--augment/--align-jitter/--no-augment"}
_SPEC_FLAGS = {"seed": "--seed", "limit": "--limit", "val_limit": "--val-limit", "steps_per_epoch": "--steps-per-epoch",
               "face_options": "face settings (--det-*, --min-face, --max-faces, --max-side)",
               "template": "--template", "template_images": "--template-images", "init_from": "--init-from"}


def _plain(value):
    """JSON's reading of ``value``: a mix's tuple of data specs as the list history.json holds."""
    return json.loads(json.dumps(value))


def check_resume(previous: dict, model, spec: TrainSpec, selection: Selection) -> None:
    """Refuse (:class:`TrainError`) to go on with the run whose history.json header is ``previous`` when it
    trained another model or config, other data or another split seed, or ranked its checkpoints by another
    metric. Other data or another split seed would continue the checkpoint on a train split that may hold the
    faces of the new test split, and record the new values: ``jobs.evaluate`` would then test on trained faces.
    A header from before the split seed was recorded in it says nothing of it; the worker then compares the
    checkpoint's own ``extra["split_seed"]`` (raytasks/train/worker.py ``_load_state``)."""
    where = spec.run_uri
    if previous.get("model") != model.name or previous.get("config") != model.config:
        raise TrainError(f"{where} holds a run of {previous.get('model')} {previous.get('config')}, "
                         f"not {model.name} {model.config}: use another --name or --storage")
    changed = []
    if _plain(previous.get("data")) != _plain(spec.data):
        changed.append(f"--data {previous.get('data')} -> {spec.data}")
    if "split_seed" in previous and int(previous["split_seed"] or 0) != int(spec.split_seed or 0):
        changed.append(f"--split-seed {previous['split_seed']} -> {spec.split_seed}")
    if changed:
        raise TrainError(f"{where} was trained on other data or another split ({'; '.join(changed)}): going on "
                         f"would train its checkpoint on a split that may hold the new test faces; use a new --name "
                         f"(or rerun with the run's own --data and --split-seed)")
    old = previous.get("selection")
    if isinstance(old, dict) and (old.get("metric"), old.get("mode")) != (selection.metric, selection.mode):
        # scores of the kept checkpoints would not compare with the new ones: the exported best would be arbitrary
        raise TrainError(f"{where} ranked its checkpoints by {old.get('metric')} ({old.get('mode')}); this data "
                         f"ranks by {selection.metric} ({selection.mode}): use a new --name")


def spec_values(spec: TrainSpec) -> dict:
    """The values ``spec`` trains with that history.json's header does not record (the run folder's
    ``train_values.json`` keeps them)."""
    return _plain({k: getattr(spec, k) for k in _SPEC_FLAGS})


def check_values(previous: dict, recorded: dict | None, recipe, mode: str, spec: TrainSpec) -> None:
    """Refuse (:class:`TrainError`) to go on, without a recipe, with the run whose history.json header is
    ``previous`` (and whose ``train_values.json`` is ``recorded``, None for a run from before it was written) when
    ``spec`` would train it with other values: ``recipe`` and ``mode``, the recipe and face mode job.prepare
    resolved for it (the values the worker records in the header). A resumed run restores its checkpoint's optimizer and scheduler
    (raytasks/train/worker.py) and goes on with the rows its first attempt drew, while history.json and the
    exported checkpoint would record the new values: a changed ``--lr`` would be recorded and never used.

    Compared: every recipe value but ``epochs`` (lr, optimizer, momentum, weight decay, batch size, schedule and
    its arguments, early stopping patience, validate_every, average_epochs, augmentation) against the header's
    ``recipe``; the face mode (``--faces``, or the data's default) against the header's ``faces``; and, where the
    folder records them, ``--seed``, ``--limit``, ``--val-limit``, ``--steps-per-epoch``, the face settings,
    ``--template``, ``--template-images`` and ``--init-from``: the rule of a recipe's stages (their ``identity``,
    raytasks/train/stages.py), applied to one run. ``--epochs`` is not compared: a larger one extends a run (a
    finished one too), a smaller one only re-exports it. Nor are where and how it runs (workers, GPUs, threads,
    ``--keep``, ``--max-failures``, calibration, ``--output``). A value the old header or file does not hold (a
    field added since) says nothing and is not compared. Model, config, data and split seed: :func:`check_resume`."""
    changed = []
    old_recipe = previous.get("recipe")
    if isinstance(old_recipe, dict):
        new = {k: v for k, v in _plain(recipe.to_dict()).items() if k != "epochs"}
        for k in sorted(set(old_recipe) & set(new)):
            if k != "epochs" and _plain(old_recipe[k]) != new[k]:
                changed.append(f"{_FLAGS.get(k, 'recipe ' + k)} {old_recipe[k]} -> {new[k]}")
    old_mode = (previous.get("faces") or {}).get("mode") if isinstance(previous.get("faces"), dict) else None
    if old_mode is not None and old_mode != mode:
        changed.append(f"--faces {old_mode} -> {mode}")
    if isinstance(recorded, dict):
        new = spec_values(spec)
        for k in [k for k in _SPEC_FLAGS if k in recorded and k in new]:
            if _plain(recorded[k]) != new[k]:
                changed.append(f"{_SPEC_FLAGS[k]} {recorded[k]} -> {new[k]}")
    if changed:
        raise TrainError(f"{spec.run_uri} holds a run trained with other values ({'; '.join(changed)}): resuming it "
                         f"would go on from its checkpoint with the old values (optimizer, scheduler, drawn rows) "
                         f"while recording the new ones; use another --name, or rerun with the original values")


def _in_recipe(spec: TrainSpec) -> bool:
    """Whether the run folder is a recipe's (its ``recipe.json`` there or, for a stage, in the folder above):
    its stages are checked by their identity (raytasks/train/stages.py first_to_train)."""
    parent = spec.name.rpartition("/")[0]
    return storage.exists(storage.join(spec.run_uri, RECIPE_FILE)) or bool(
        parent and storage.exists(storage.join(spec.storage, parent, RECIPE_FILE)))


def check_folder(spec: TrainSpec, model, recipe, val, mode: str) -> tuple[Selection, dict | None]:
    """``(selection, history.json of the run folder or None)`` for a run of ``model`` with ``recipe`` and faces
    ``mode`` (what job.prepare resolved) validated on ``val``: the
    metric that picks its best epoch (core.engine.choose_selection) and, when the folder holds a run, that run
    checked to be this one (:func:`check_resume`) and, for a run without a recipe, to train with the same values
    (:func:`check_values`; but ``--epochs``). A folder without a run gets the values not in history.json's header
    (``train_values.json``) for a rerun to compare with. Called before Ray starts (stages.py) and by job.run."""
    try:
        selection = choose_selection(model, val)
    except ValueError as e:
        raise TrainError(f"{spec.data}: {e}") from None
    previous = read_history(spec.run_uri)
    if previous is not None:
        check_resume(previous, model, spec, selection)
    if _in_recipe(spec):
        return selection, previous
    values = storage.join(spec.run_uri, VALUES_FILE)
    if previous is not None:
        recorded = json.loads(storage.read_bytes(values)) if storage.exists(values) else None
        check_values(previous, recorded, recipe, mode, spec)
    else:  # no attempt has started (history.json is written first): what this one trains with
        storage.write_bytes(values, json.dumps(spec_values(spec), indent=1).encode())
    return selection, previous


def committed_epoch(result) -> int | None:
    """The epoch of the run's latest committed checkpoint (Ray Train's ``Result`` read from the run folder's
    checkpoint index), or None when it has none."""
    metrics = getattr(result, "metrics", None) or {}
    epoch = metrics.get("epoch")
    return int(epoch) if isinstance(epoch, (int, float)) else None


def resume_point(previous: dict | None, committed: int | None, epochs: int) -> tuple[int | None, bool, bool]:
    """``(resumed_from, complete, stopped)`` of a rerun: the epoch it goes on after, whether there is nothing
    left to train, and whether the run stopped early.

    Decided by ``committed`` (the latest checkpoint the controller committed), not by history.json's last row:
    the worker writes history.json before its epoch's checkpoint is committed, so a run that died in between
    has a row the checkpoints do not have; judged by that row, a run killed there at its last epoch would be
    "complete" and export a best checkpoint chosen without its last epoch. Whether the run stopped early is
    read from history.json's row of the committed epoch (written before that checkpoint, so it is there)."""
    if committed is None:
        return None, False, False
    rows = [r for r in (previous or {}).get("epochs", ()) if int(r.get("epoch", -1)) == committed]
    stopped = bool(rows and rows[-1].get("stopped"))
    return committed, stopped or committed >= epochs, stopped


def stored_result(spec: TrainSpec):
    """The run's result as its storage holds it (Ray Train's checkpoint index): no worker starts."""
    from ray.train import Result

    fs, path = storage.filesystem(spec.run_uri)
    try:
        return Result.from_path(path, storage_filesystem=fs)
    except Exception as e:  # noqa: BLE001 - a damaged run folder: say which and how to go on
        raise TrainError(f"the checkpoints of run {spec.run_uri} cannot be read ({e}): use another --name to "
                         f"train again") from e
