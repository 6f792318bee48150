"""A rerun of a ``--recipe none`` run (same --name and --storage) with other training values is refused before Ray
starts (raytasks/train/resume.py check_values): resuming restores the checkpoint's optimizer and scheduler, so a
new ``--lr`` was never used while history.json and the exported checkpoint recorded it. The same command again
and a larger ``--epochs`` go on. In process, no Ray: the run folder is faked as the worker writes it."""

from __future__ import annotations

import dataclasses
import os

import pandas as pd
import pytest

import models
import storage
from raytasks.train.history import write_history
from raytasks.train.resume import RECIPE_FILE, resume_point
from raytasks.train.spec import VALUES_FILE, TrainError, TrainSpec
from tests.helpers import check_run_folder

VAL = pd.DataFrame({"path": ["a"], "gender": [1.0], "eyeglasses": [0.0]})


def _spec(tmp_path, **kw) -> TrainSpec:
    base = {"model": "hard_sharing", "data": "celeba:/d", "storage": str(tmp_path), "name": "r",
            "recipe": {"epochs": 1, "lr": 0.001, "optimizer": "sgd", "schedule": "none", "batch_size": 16},
            "faces": "whole", "template_images": 0}
    return TrainSpec(**{**base, **kw})


def _recipe(spec: TrainSpec, **kw) -> dict:
    return {**spec.recipe, **kw}


def _first_run(spec: TrainSpec, with_values_file: bool = True):
    """What a first attempt leaves: the driver's train_values.json (check_folder, before Ray) and the worker's
    history.json header (raytasks/train/worker.py: the resolved recipe, epochs included, and the faces)."""
    m = models.create_model(spec.model)
    sel, previous = check_run_folder(spec, m, VAL)
    assert previous is None and os.path.exists(os.path.join(spec.run_uri, VALUES_FILE))
    if not with_values_file:  # a run from before the file was written
        os.remove(os.path.join(spec.run_uri, VALUES_FILE))
    recipe = dataclasses.replace(m.recipe, **spec.recipe).to_dict()
    header = {"run": spec.name, "model": m.name, "config": m.config, "data": spec.data, "split_seed": 0,
              "primary_metric": sel.metric, "primary_mode": sel.mode, "selection": sel.to_dict(), "recipe": recipe,
              "workers": 1, "faces": {"mode": "whole", "detector": None, "max_side": None, "template": "default",
                                      "report": None}, "augment": {}}
    write_history(spec.run_uri, [{"epoch": 1, "val_loss": 1.0, "stopped": 0, "attempt": 1}], [], header)
    return m


def test_a_rerun_with_another_lr_is_refused_naming_the_change(tmp_path):
    spec = _spec(tmp_path)
    m = _first_run(spec)
    rerun = dataclasses.replace(spec, recipe=_recipe(spec, epochs=2, lr=0.5))
    with pytest.raises(TrainError, match=r"--lr 0\.001 -> 0\.5\).*use another --name, or rerun with the original"):
        check_run_folder(rerun, m, VAL)
    # a flag left out is the model's default, not the run's value: also a change
    dropped = dataclasses.replace(spec, recipe={k: v for k, v in spec.recipe.items() if k != "optimizer"})
    with pytest.raises(TrainError, match=rf"--optimizer sgd -> {m.recipe.optimizer}"):
        check_run_folder(dropped, m, VAL)


@pytest.mark.parametrize("change, named", [
    ({"limit": 40}, r"--limit None -> 40"),
    ({"val_limit": 10}, r"--val-limit None -> 10"),
    ({"seed": 1}, r"--seed 0 -> 1"),
    ({"faces": "detect"}, r"--faces whole -> detect"),
    ({"steps_per_epoch": 3}, r"--steps-per-epoch None -> 3"),
    ({"align_jitter": 0.05}, r"--augment/--align-jitter/--no-augment"),
])
def test_a_rerun_with_another_data_draw_seed_or_faces_is_refused(tmp_path, change, named):
    spec = _spec(tmp_path)
    m = _first_run(spec)
    with pytest.raises(TrainError, match=named):
        check_run_folder(dataclasses.replace(spec, **change), m, VAL)


def test_several_changes_are_all_named(tmp_path):
    spec = _spec(tmp_path)
    m = _first_run(spec)
    rerun = dataclasses.replace(spec, recipe=_recipe(spec, lr=0.5, batch_size=32), limit=40)
    with pytest.raises(TrainError) as e:
        check_run_folder(rerun, m, VAL)
    assert all(s in str(e.value) for s in ("--lr 0.001 -> 0.5", "--batch-size 16 -> 32", "--limit None -> 40"))


def test_the_same_command_again_resumes(tmp_path):
    spec = _spec(tmp_path)
    m = _first_run(spec)
    _, previous = check_run_folder(spec, m, VAL)
    assert previous["recipe"]["lr"] == 0.001
    # the faces left to the data's default (whole for celeba) are the run's
    assert check_run_folder(dataclasses.replace(spec, faces=None), m, VAL)[1] is not None
    # how it runs is not what it trains with
    assert check_run_folder(dataclasses.replace(spec, workers=2, keep=3, max_failures=2, calibrate=False), m, VAL)[1]


def test_a_larger_epochs_extends_the_run(tmp_path):
    spec = _spec(tmp_path)
    m = _first_run(spec)
    more = dataclasses.replace(spec, recipe=_recipe(spec, epochs=3))
    _, previous = check_run_folder(more, m, VAL)
    assert resume_point(previous, 1, 3) == (1, False, False)  # goes on after epoch 1 of the finished run


def test_a_run_from_before_train_values_json_is_checked_by_its_header(tmp_path):
    spec = _spec(tmp_path)
    m = _first_run(spec, with_values_file=False)
    assert check_run_folder(dataclasses.replace(spec, limit=40), m, VAL)[1]  # not recorded: says nothing
    assert not os.path.exists(os.path.join(spec.run_uri, VALUES_FILE))  # not written over a run's values
    with pytest.raises(TrainError, match=r"--lr 0\.001 -> 0\.5"):
        check_run_folder(dataclasses.replace(spec, recipe=_recipe(spec, lr=0.5)), m, VAL)


def test_a_recipe_folder_is_left_to_the_recipe_identity(tmp_path):
    """A recipe's stages are compared by their identity (stages.first_to_train), which logs and allows the one
    case it accepts: a one-stage recipe going on with a run from before recipes."""
    spec = _spec(tmp_path)
    m = _first_run(spec)
    storage.write_bytes(storage.join(spec.run_uri, RECIPE_FILE), b"{}")
    assert check_run_folder(dataclasses.replace(spec, recipe=_recipe(spec, lr=0.5)), m, VAL)[1]


# ---- a run that Ray Train itself ended: resumed by the job (jobs/train.py, raytasks/train/job.py) ----------------
def _failed(cause: BaseException) -> TrainError:
    """The job's error for a failed fit, as raytasks/train/job.py ``_fit`` raises it: Ray's error as its cause."""
    try:
        raise TrainError(f"training failed: {cause}\nrerun the same command (same --name and --storage) to resume "
                         "from the last checkpoint") from cause
    except TrainError as e:
        return e


REMOVED = ("The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\nThe actor is dead "
           "because its worker process has died. Worker exit type: INTENDED_SYSTEM_EXIT Worker exit detail: Destroying "
           "worker since its placement group was removed. Placement group id: 647fd9719321eec58a6b29955bab01000000")


@pytest.mark.parametrize("failures,max_failures,resumes,ends", [
    (["removed"], 2, 1, "done"),  # Ray removed the workers once: resumed, then done
    (["removed", "removed"], 1, 1, "error"),  # again after --max-failures resumes: the error, status 1
    (["removed"], 0, 0, "error"),  # --max-failures 0: never resumed
    (["worker"], 2, 0, "error"),  # the training's own failure (a worker's error): the error at once
    (["controller"], 2, 0, "error"),  # another controller error of Ray's: the error at once
])
def test_a_run_ray_train_itself_ended_is_resumed_as_the_same_command_would(tmp_path, monkeypatch, capsys, failures,
                                                                           max_failures, resumes, ends):
    """Ray Train 2.60 removed a live run's placement group in the suite once (docs/benchmarks.md, 2026-12-07) and
    ended the run with a ``ControllerError`` it does not retry, where the same command resumes the run from its
    last checkpoint. The job now does that itself, within --max-failures, with a line that says so; any other
    failure ends it as before. The run is stood in for (no Ray): the rerun in one process is
    tests/test_recipes_runs.py's, which runs the same command again in its own process."""
    from ray.train.v2.api.exceptions import ControllerError

    import jobs.train as train_job
    from raytasks.train.job import ray_removed_the_workers
    from raytasks.train.spec import TrainOutcome

    errors = {"removed": _failed(ControllerError(RuntimeError(REMOVED))),
              "worker": _failed(RuntimeError("Training failed due to worker errors: ... ZeroDivisionError")),
              "controller": _failed(ControllerError(RuntimeError("Callback 'X' hook 'y' is missing")))}
    assert [ray_removed_the_workers(e) for e in errors.values()] == [True, False, False]
    assert ray_removed_the_workers(ControllerError(RuntimeError(REMOVED)))  # Ray's error itself, too
    outcome = TrainOutcome(output=str(tmp_path / "m.pt"), best_epoch=1, best_metrics={"val_loss": 1.0}, history=[],
                           run_uri=str(tmp_path / "runs" / "r"), resumed_from=None, curves=None)
    left = list(failures)
    made = []

    class Run:  # RecipeRun as jobs.train uses it: made and prepared once per attempt, then run
        def __init__(self, spec, recipe):
            made.append(spec)

        def prepare(self):
            pass

        def run(self):
            if left:
                raise errors[left.pop(0)]
            return outcome

    monkeypatch.setattr(train_job, "RecipeRun", Run)
    monkeypatch.setattr(train_job, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(train_job, "joined_address", lambda: None)
    argv = ["--model", "hard_sharing", "--data", f"celeba:{tmp_path}", "--storage", str(tmp_path / "runs"),
            "--name", "r", "--max-failures", str(max_failures)]
    if ends == "done":
        assert train_job.main(argv) is outcome
    else:
        with pytest.raises(SystemExit) as e:
            train_job.main(argv)
        assert e.value.code == 1
    out, err = capsys.readouterr()
    said = [ln for ln in out.splitlines() if ln.startswith("Ray Train removed this run's workers under it")]
    assert len(said) == resumes and len(made) == 1 + resumes, out
    if resumes:
        assert said[-1].endswith(f"resuming from the last checkpoint, as the same command would ({resumes} of "
                                 f"--max-failures {max_failures})")
    assert ("error: training failed" in err) == (ends == "error"), err
