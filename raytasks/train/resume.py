"""What a rerun of the same ``--name`` finds in the run folder: whether it may go on (:func:`check_folder`), where
it goes on from (:func:`resume_point`) and the run's stored result (:func:`stored_result`).

Split from raytasks/train/job.py (the driver), which calls these before any worker starts.
"""

from __future__ import annotations

import json

import storage
from core.engine import Selection, choose_selection
from raytasks.train.history import read_history
from raytasks.train.spec import TrainError, TrainSpec


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


def check_folder(spec: TrainSpec, model, val) -> tuple[Selection, dict | None]:
    """``(selection, history.json of the run folder or None)`` for a run of ``model`` validated on ``val``: the
    metric that picks its best epoch (core.engine.choose_selection) and, when the folder holds a run, that run
    checked to be this one (:func:`check_resume`). Called before Ray starts (stages.py) and by job.run."""
    try:
        selection = choose_selection(model, val)
    except ValueError as e:
        raise TrainError(f"{spec.data}: {e}") from None
    previous = read_history(spec.run_uri)
    if previous is not None:
        check_resume(previous, model, spec, selection)
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
