"""Recipes (models/recipes.py, raytasks/train/stages.py), what a recipe plans before anything trains: the table,
the rule for flags (a flag replaces a value in every stage), the faces a recipe names, every stage checked before
Ray, and a stage initialised from the one before. A recipe's runs (the run folder's checks, the record in the
checkpoint, the Ray Train run that dies, resumes and restarts): tests/test_recipes_runs.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import models
from facedata import synth
from facedata.datasets import FORMATS
from jobs import train as train_job
from models.checkpoint import save_checkpoint
from models.recipes import (
    RECIPES,
    check_table,
    describe,
    faces_text,
    get_recipe,
    recipe_for,
)
from raytasks.train.stages import RecipeRun, plan


def test_every_recipe_names_real_values_and_builds_its_models():
    assert check_table() == []
    assert {(r.model, f) for r in RECIPES.values() for f in r.formats} == {
        ("age_gender_race", "utkface"), ("hard_sharing", "celeba"), ("dmm_cnn", "celeba"),
        ("task_attention", "celeba"), ("task_attention", "genki4k"), ("hmtnet", "scut_fbp5500")}
    for r in RECIPES.values():
        assert r.model in models.list_models() and set(r.formats) <= set(FORMATS) and recipe_for(r.model, r.formats[0]) is r
        for s in r.stages:  # a model argument the model does not take fails here, not after a stage has trained
            random = {"backbone_weights": "random"} if r.model in ("age_gender_race", "hmtnet") else {}
            models.create_model(r.model, **s.model_args, **random)
    agr = get_recipe("age_gender_race-utkface")
    assert [(s.name, s.model_args["backbone_freeze"], s.train["lr"], s.train["epochs"]) for s in agr.stages] == [
        ("frozen", "all", 1e-3, 8), ("finetune", "none", 1e-3, 2), ("finetune-low", "none", 3e-4, 3)]
    assert agr.stages[1].model_args["backbone_lr_scale"] == 0.01 and [s.patience for s in agr.stages] == [3, 1, 1]
    # trained the way label and serve read faces: each chip through the detector, at a canvas that never enlarges
    # UTKFace's 200 px chips (the cache of an earlier run at that size is reused)
    assert agr.faces == {"mode": "detect", "detector": {"size": 256}}
    assert [r.name for r in RECIPES.values() if r.faces] == [agr.name, "hard_sharing-celeba", "dmm_cnn-celeba",
                                                             "task_attention-celeba"]
    assert get_recipe("hard_sharing-celeba").faces == agr.faces  # the 50 px model reads LFW's photos better too
    assert get_recipe("dmm_cnn-celeba").faces == agr.faces  # and DMM-CNN GENKI's smiles, as well LFW's gender
    ta = get_recipe("task_attention-genki4k").stages  # the paper's TMTL, then the attention net from it
    assert [(s.name, s.model_args["attention"], s.model_args["trunk_lr_scale"]) for s in ta] == [
        ("tmtl", False, 0.01), ("attention", True, 0.01)]
    (hmt,) = get_recipe("hmtnet-scut_fbp5500").stages  # dlib's face trunk, frozen, in place of VGG-M-Face,
    # and each face read with its mirror image too (the checkpoint says so: label and serve read it that way)
    assert hmt.model_args == {"backbone": "dlib_resnet", "backbone_freeze": "all", "mirror": True}
    assert (hmt.train["optimizer"], hmt.train["lr"], hmt.patience) == ("adam", 3e-4, 4)
    assert hmt.train["average_epochs"] == 3  # each epoch's model: the mean of the last 3 epochs' weights
    assert recipe_for("hmtnet", "utkface") is None and recipe_for("age_gender_race", "manifest") is None


def _spec(argv):
    args = train_job.build_parser().parse_args(argv)
    return args, train_job.spec_from_args(args)


def test_a_flag_replaces_the_value_in_every_stage(tmp_path):
    argv = ["--model", "age_gender_race", "--data", "utkface:/d", "--storage", str(tmp_path), "--name", "agr",
            "--epochs", "3", "--model-arg", "image_size=112", "--patience", "0", "--init-from", "start.pt",
            "--inject-failure", "0:2:1@2", "--output", "out.pt"]
    args, spec = _spec(argv)
    runs = plan(spec, train_job.choose_recipe(args))
    assert [r.spec.name for r in runs] == ["agr/stage-1-frozen", "agr/stage-2-finetune", "agr/stage-3-finetune-low"]
    assert [r.spec.recipe["lr"] for r in runs] == [1e-3, 1e-3, 3e-4]  # the stages' own values
    assert [r.spec.model_kwargs["backbone_freeze"] for r in runs] == ["all", "none", "none"]
    for r in runs:  # the flags': in every stage
        assert r.spec.recipe["epochs"] == 3 and r.spec.recipe["early_stopping_patience"] is None
        assert r.spec.model_kwargs["image_size"] == 112
    assert [r.spec.init_from for r in runs] == ["start.pt", None, None]  # later stages: the previous stage's best
    assert [r.spec.fail_at for r in runs] == [None, (0, 2, 1), None]
    assert [(r.spec.output, r.spec.calibrate) for r in runs] == [
        (f"{tmp_path}/agr/stage-1-frozen/best.pt", False), (f"{tmp_path}/agr/stage-2-finetune/best.pt", False),
        ("out.pt", True)]
    assert runs[1].identity["train"] == {"lr": 1e-3, "early_stopping_patience": None}  # epochs may grow on a rerun
    # one stage: the run folder itself; --recipe none: the spec as it is; a recipe is for its model only
    args, spec = _spec(["--model", "hard_sharing", "--data", "celeba:/d", "--lr", "0.01"])
    (one,) = plan(spec, train_job.choose_recipe(args))
    assert one.spec.name == "hard_sharing-celeba" and one.spec.recipe == {"epochs": 10, "lr": 0.01,
                                                                         "early_stopping_patience": 2}
    args, spec = _spec(["--model", "hard_sharing", "--data", "celeba:/d", "--recipe", "none"])
    assert train_job.choose_recipe(args) is None and plan(spec, None)[0].spec is spec
    for recipe, message in (("nope", "unknown recipe 'nope'"), ("dmm_cnn-celeba", "trains dmm_cnn, not hard_sharing")):
        with pytest.raises(ValueError, match=message):
            train_job.choose_recipe(_spec(["--model", "hard_sharing", "--data", "celeba:/d", "--recipe", recipe])[0])


def test_a_recipes_faces_apply_to_every_stage_and_a_flag_replaces_them(tmp_path, monkeypatch):
    """A recipe says how its images become faces (the mode and detector it was measured with); the face flags
    replace those values key by key, and a --faces of another mode drops the recipe's detector settings."""
    agr = get_recipe("age_gender_race-utkface")
    det = dataclasses.replace(agr, name="agr-detect", formats=(), faces={"mode": "detect", "detector": {"size": 256}})
    monkeypatch.setitem(RECIPES, det.name, det)
    assert check_table() == []
    base = ["--model", "age_gender_race", "--data", "utkface:/d", "--storage", str(tmp_path), "--recipe", det.name]
    for flags, mode, options in (
            ([], "detect", {"detector": {"size": 256}}),
            (["--det-threshold", "0.7"], "detect", {"detector": {"size": 256, "threshold": 0.7}}),
            (["--det-size", "320", "--max-side", "1024"], "detect", {"detector": {"size": 320}, "max_side": 1024}),
            (["--faces", "detect"], "detect", {"detector": {"size": 256}}),
            (["--faces", "whole"], "whole", {"detector": {}})):
        args, spec = _spec(base + flags)
        runs = plan(spec, train_job.choose_recipe(args))
        assert [(r.spec.faces, r.spec.face_options) for r in runs] == [(mode, options)] * 3, flags
        assert all((r.identity["faces"], r.identity["face_options"]) == (mode, options) for r in runs)
        lines = describe(det, spec.model_kwargs, spec.recipe, spec.faces, spec.face_options)
        assert lines[1] == f"  faces in every stage: {faces_text(mode, options)}{' (flags)' if flags else ''}"
    assert faces_text("detect", {"detector": {"size": 256}}) == "detect (detector size=256)"
    # a recipe without faces leaves the flags as they are (the format's default when none): run folders
    # trained before recipes had faces keep their identity
    args, spec = _spec(["--model", "hmtnet", "--data", "scut_fbp5500:/d"])
    (one,) = plan(spec, train_job.choose_recipe(args))
    assert (one.spec.faces, one.identity["faces"]) == (None, None) and "faces" not in " ".join(
        describe(get_recipe("hmtnet-scut_fbp5500"), {}, {}))
    # the table refuses a mode or key a run cannot take
    monkeypatch.setitem(RECIPES, "bad", dataclasses.replace(det, name="bad", formats=(), faces={"mode": "crop"}))
    monkeypatch.setitem(RECIPES, "bad2", dataclasses.replace(det, name="bad2", formats=(),
                                                             faces={"mode": "detect", "size": 256}))
    assert [p.split(":")[0] for p in check_table()] == ["bad", "bad2"]


def test_every_stage_is_checked_before_ray_and_later_stages_reuse_the_first_ones_data(tmp_path):
    data = synth.generate("utkface", 20, str(tmp_path / "utk"), seed=4, size=(96, 96))
    base = ["--model", "age_gender_race", "--data", f"utkface:{data}", "--storage", str(tmp_path / "runs"),
            "--template-images", "0", "--model-arg", "backbone_weights=random", "--faces", "whole"]
    args, spec = _spec(base)
    job = RecipeRun(spec, train_job.choose_recipe(args), log_fn=lambda line: None)
    job.prepare()
    (m1, r1, train, val, faces), p2, p3 = (job.prepared[k] for k in (1, 2, 3))
    assert [m.config["backbone_freeze"] for m in (m1, p2[0], p3[0])] == ["all", "none", "none"]
    assert [r.lr for r in (r1, p2[1], p3[1])] == [1e-3, 1e-3, 3e-4]
    for p in (p2, p3):  # the same images, faces and face template in every stage: read and measured once
        assert p[2] is train and p[3] is val and p[4] is faces
        assert p[0].preprocessing == m1.preprocessing and m1.preprocessing.template is not None
    # a model argument that does not fit a stage fails now, naming the stage, not after stage 1 has trained
    args, spec = _spec(base + ["--model-arg", "depth=18"])
    with pytest.raises(ValueError, match=r"stage 1/3 frozen of recipe age_gender_race-utkface: .*backbone_freeze"):
        RecipeRun(spec, train_job.choose_recipe(args), log_fn=lambda line: None).prepare()


def test_the_attention_stage_starts_from_every_weight_of_the_tmtl_stage(tmp_path):
    """task_attention-genki4k's second stage is the paper's attention network initialised from its TMTL (its
    first stage's best checkpoint, through ``--init-from``'s copy of every tensor of the same name and shape):
    every weight comes over, and only the attention scalars keep their own initialisation."""
    from raytasks.train.worker import _init_from

    tmtl_stage, att_stage = get_recipe("task_attention-genki4k").stages
    tmtl = models.create_model("task_attention", **tmtl_stage.model_args)
    with torch.no_grad():  # as if trained: no tensor left as the package's or a fresh init gave it
        for t in tmtl.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.01)
    save_checkpoint(tmtl, str(tmp_path / "tmtl.pt"))
    att = models.create_model("task_attention", **att_stage.model_args)
    _init_from(att, str(tmp_path / "tmtl.pt"))
    own, theirs = att.state_dict(), tmtl.state_dict()
    assert sorted(set(own) - set(theirs)) == ["att_gender.w_c", "att_gender.w_x", "att_smile.w_c", "att_smile.w_x"]
    assert set(theirs) <= set(own) and all(torch.equal(own[k], theirs[k]) for k in theirs)
