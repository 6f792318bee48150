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
