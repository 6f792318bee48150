"""Recipes: the best measured way to train each model on each kind of data here, as named, versioned values.

A model's :class:`~models.base.Recipe` holds its paper's values for one run. A :class:`TrainingRecipe` is what
``jobs.train`` runs by default for a model on a data format: one or more :class:`Stage` s, each a set of
overrides of those values (``train``: fields of ``Recipe``; ``model_args``: constructor arguments) and an
early-stopping ``patience``, run in order, each stage initialised from the previous stage's best checkpoint.
Every value a stage does not name is the model's own default. The table (:data:`RECIPES`) is the only place
recipes are written; docs/results.md ("Recipes") says where each one's figures come from.

The rule for flags (:func:`stage_values`): a value given on the command line (``--epochs``, ``--lr``,
``--patience``, ``--model-arg K=V``, ...) replaces that value in every stage. ``--recipe none`` trains one run
with the model's defaults, as before recipes existed.

Changing what a recipe trains means a new ``version``: a run folder remembers the name, version and values
of each stage it trained, and a rerun that would train something else there is refused (raytasks/train/
stages.py). This module is plain data and pure functions (no torch, no Ray): models/ is the bottom layer,
and recipes are facts about the models, like their ``Recipe``.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field

from .base import Recipe

RECORD_KEY = "named_recipe"  # the checkpoint's extra entry that records the recipe a model was trained with
TRAIN_FACE_MODES = ("detect", "landmarks", "whole")  # jobs.train's --faces (faces/trainfaces.py)
FACE_KEYS = ("mode", "detector", "max_side")  # a recipe's faces: the FaceOptions of training (faces/finder.py)


@dataclass(frozen=True)
class Stage:
    """One training run of a recipe: its overrides of the model's ``Recipe`` (``train``) and constructor
    (``model_args``), and ``patience``: stop after that many epochs without a better primary metric (None:
    train every epoch)."""

    name: str
    train: dict = field(default_factory=dict)
    model_args: dict = field(default_factory=dict)
    patience: int | None = None


@dataclass(frozen=True)
class TrainingRecipe:
    name: str
    version: int
    model: str
    formats: tuple[str, ...]  # the data formats it was measured on (and is the default for)
    stages: tuple[Stage, ...]
    about: str  # one line: what it does and where its figures are
    # how its training and validation images become faces, the same in every stage (jobs.train's --faces and
    # face flags: {"mode": detect|landmarks|whole, "detector": {...}, "max_side": N}); empty: the format's default
    faces: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "model": self.model, "formats": list(self.formats),
                "about": self.about, "faces": deepcopy(self.faces),
                "stages": [{"name": s.name, "train": dict(s.train), "model_args": dict(s.model_args),
                            "patience": s.patience} for s in self.stages]}


_FINE_TUNE = {"backbone_freeze": "none", "backbone_lr_scale": 0.01}
# dlib's trunk has no batch norm (fixed affine layers): under Adam at 0.1 x 1e-3 it was pushed off what it knew and
# both tasks sat at chance for 3 epochs (docs/results.md); at 0.01 x it learnt in the first epoch (GENKI-4K's
# task_attention, then CelebA's dmm_cnn)
_DLIB_TRUNK = {"backbone": "dlib_resnet", "image_size": 150, "trunk_lr_scale": 0.01}

RECIPES: dict[str, TrainingRecipe] = {r.name: r for r in (
    TrainingRecipe(
        "age_gender_race-utkface", 3, "age_gender_race", ("utkface",),
        (Stage("frozen", {"epochs": 8, "optimizer": "adam", "lr": 1e-3}, {"backbone_freeze": "all"}, patience=3),
         Stage("finetune", {"epochs": 2, "lr": 1e-3}, _FINE_TUNE, patience=1),
         Stage("finetune-low", {"epochs": 3, "lr": 3e-4}, _FINE_TUNE, patience=1)),
        "dlib's face trunk frozen while the heads learn (patience 3), then fine-tuned whole at 0.01 x the heads' "
        "rate, then up to 3 epochs at a third of that rate; (v3) every chip through the detector (det-size 256: "
        "a 200 px chip is never enlarged) and aligned as label and serve align it: test gender 95.02 / 94.78 %, "
        "race 87.37 / 87.52 %, RMSE 6.23 / 6.40, LFW photos' gender 97.70 / 97.80 % in two runs, against 94.10-"
        "94.44 %, 87.67-88.25 %, 6.19-6.37 and 96.90-97.30 % for v2, which read the chips whole (docs/results.md, "
        "2026-12-05, 'v3'; v1: patience 2 and 2 low-rate epochs)",
        faces={"mode": "detect", "detector": {"size": 256}}),
    TrainingRecipe(
        "hard_sharing-celeba", 2, "hard_sharing", ("celeba",),
        (Stage("train", {"epochs": 10}, patience=2),),
        "the paper's recipe (50x50 grey, Adam 1e-3 with the L0/i rule, early stopping on the validation loss) "
        "for 10 epochs; (v2) every crop through the detector at det-size 256, as label and serve read faces: "
        "CelebA test gender 90.61 %, eyeglasses 95.96 % read through detection, against 87.09 % and 95.18 % "
        "for v1 trained on the crops whole (which read them whole at 91.67 %, 95.70 %), and LFW photos' gender "
        "85.0 % against 82.3 % (docs/results.md, 'LFW gender on the whole CelebA subset'; v1 2026-11-29: test "
        "gender 92.32 %, eyeglasses 95.57 % read whole)",
        faces={"mode": "detect", "detector": {"size": 256}}),
    TrainingRecipe(
        "dmm_cnn-celeba", 3, "dmm_cnn", ("celeba",),
        (Stage("train", {"epochs": 4, "optimizer": "adam", "lr": 1e-3, "batch_size": 32, "validate_every": 50},
               _DLIB_TRUNK),),
        "dlib's face trunk at 150 px learning at 0.01 x the SPP branches' rate (the paper: a ResNet-50, "
        "initialisation not stated, with SGD), Adam 1e-3, P = 50, 4 epochs, every crop through the detector at det-size 256 as label and serve "
        "read faces (v3, 2026-12-06, two runs): CelebA test mean over the 40 attributes 88.35 / 88.06 % against "
        "85.83 / 86.86 % for v2's ResNet-18 from scratch at 64 px, GENKI-4K photos' smile 92.98 / 93.33 % against "
        "85.96 / 82.46 %, LFW photos' gender (Male) 92.90 / 95.30 % against 85.9 / 83.1 % (docs/results.md); the "
        "trunk from scratch (v2: --model-arg backbone=resnet --model-arg depth=18 --model-arg trunk_lr_scale=1 "
        "--image-size 64) learnt no smile in one run of four",
        faces={"mode": "detect", "detector": {"size": 256}}),
    TrainingRecipe(
        "task_attention-celeba", 3, "task_attention", ("celeba",),
        (Stage("train", {"epochs": 4, "batch_size": 32}, _DLIB_TRUNK),),
        "dlib's face trunk at 150 px learning at 0.01 x the new layers' rate, each task its own copy of dlib's last "
        "stage, Adam 1e-3, 4 epochs, every crop through the detector at det-size 256 (v3, 2026-12-06, two runs): "
        "CelebA test gender 97.39 / 96.35 % and smile 89.57 / 88.14 % against 89.31 % and 71.84 % for v2's ResNet-18 "
        "from scratch at 64 px (one run), GENKI-4K photos' smile 94.04 / 94.74 % against 68.77 %, LFW photos' gender "
        "94.50 / 95.80 % against 83.80 % (docs/results.md); v2: --model-arg backbone=resnet --model-arg depth=18 "
        "--model-arg task_blocks=2 --model-arg trunk_lr_scale=1 --image-size 64",
        faces={"mode": "detect", "detector": {"size": 256}}),
    TrainingRecipe(
        "task_attention-genki4k", 1, "task_attention", ("genki4k",),
        (Stage("tmtl", {"epochs": 6, "optimizer": "adam", "lr": 1e-3, "batch_size": 32},
               {**_DLIB_TRUNK, "attention": False}, patience=2),
         Stage("attention", {"epochs": 4, "optimizer": "adam", "lr": 3e-4, "batch_size": 32},
               {**_DLIB_TRUNK, "attention": True}, patience=2)),
        "the paper's two steps on dlib's face trunk at 150 px (its layers at 0.01 x the new layers' rate): TMTL, "
        "then the attention network initialised from it: GENKI-4K test smile 94.39 % through detection as one command "
        "(96.14 % chained by hand), LFW gender 92.40 %, with CelebA's gender as a second --data (docs/results.md, "
        "2026-12-03, evening)"),
    TrainingRecipe(
        "hmtnet-scut_fbp5500", 4, "hmtnet", ("scut_fbp5500",),
        (Stage("frozen", {"epochs": 12, "optimizer": "adam", "lr": 3e-4, "average_epochs": 3},
               {"backbone": "dlib_resnet", "backbone_freeze": "all", "mirror": True}, patience=4),),
        "dlib's face trunk (frozen; its level2, level1 and level0 read by the branches) in place of the paper's "
        "VGG-M-Face, which cannot be had here, Adam 3e-4, up to 12 epochs, each face read with its mirror image too, "
        "and (v4) each epoch's model the mean of the last 3 epochs' weights: test beauty PC 0.889, MAE 0.232 as "
        "one command (paper 0.8783, 0.250; v3 without the averaging: PC 0.859-0.882 in three runs; "
        "docs/results.md, 2026-12-04, 'Weight averaging'; v2 without the mirror: PC 0.873; v1, the paper's recipe "
        "from random weights, was never run to its end here; fine-tuning the trunk after it lowered the "
        "validation PC)"),
)}


def get_recipe(name: str) -> TrainingRecipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))} (or none)")
    return RECIPES[name]


def recipe_for(model: str, fmt: str) -> TrainingRecipe | None:
    """The default recipe of ``model`` on data of format ``fmt``, if one was measured."""
    for r in RECIPES.values():
        if r.model == model and fmt in r.formats:
            return r
    return None


def stage_values(stage: Stage, model_args: dict, train: dict) -> tuple[dict, dict]:
    """A stage's effective overrides ``(model_args, train)``: the stage's values, with the command line's
    (``model_args``, ``train``: ``Recipe`` fields) replacing them. ``train`` holds ``early_stopping_patience``."""
    return ({**stage.model_args, **model_args},
            {**stage.train, "early_stopping_patience": stage.patience, **train})


def face_values(recipe: TrainingRecipe | None, mode: str | None, options: dict) -> tuple[str | None, dict]:
    """The face mode and options ``(mode, options)`` a run trains with: the recipe's ``faces``, with the command
    line's (``mode``: ``--faces``; ``options``: ``{"detector": {...}, "max_side": N}`` from the face flags)
    replacing them key by key. A ``--faces`` other than the recipe's mode drops the recipe's settings, which
    belong to its mode. ``None``: the data format's default."""
    faces = dict((recipe.faces if recipe is not None else None) or {})
    if not faces or (mode is not None and mode != faces.get("mode")):
        return mode, dict(options)
    merged = {k: v for k, v in faces.items() if k != "mode"}
    for key, value in options.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return faces["mode"], deepcopy(merged)


def check_table() -> list[str]:
    """What is wrong with :data:`RECIPES` (empty when nothing): unknown ``Recipe`` fields, stage names that are
    not folder names, a patience below 0 (the worker would stop after the first epoch), two recipes for one model
    and format."""
    fields = set(Recipe.__dataclass_fields__)
    problems, seen = [], {}
    for r in RECIPES.values():
        if not r.stages or r.version < 1:
            problems.append(f"{r.name}: needs at least one stage and a version >= 1")
        names = [s.name for s in r.stages]
        if len(set(names)) != len(names) or not all(n and n.replace("-", "").replace("_", "").isalnum()
                                                     for n in names):
            problems.append(f"{r.name}: stage names must be distinct words: {names}")
        for s in r.stages:
            if set(s.train) - fields or "early_stopping_patience" in s.train:
                problems.append(f"{r.name}/{s.name}: not Recipe fields (patience is its own): "
                                f"{sorted(set(s.train) - fields) or ['early_stopping_patience']}")
            if s.patience is not None and (not isinstance(s.patience, int) or s.patience < 0):
                problems.append(f"{r.name}/{s.name}: patience must be None or an integer >= 0 (0: off), "
                                f"got {s.patience!r}")
        if set(r.faces) - set(FACE_KEYS) or (r.faces and r.faces.get("mode") not in TRAIN_FACE_MODES):
            problems.append(f"{r.name}: faces takes {', '.join(FACE_KEYS)} with a mode of {', '.join(TRAIN_FACE_MODES)}: "
                            f"{r.faces}")
        for fmt in r.formats:
            if (r.model, fmt) in seen:
                problems.append(f"{r.name} and {seen[r.model, fmt]} are both for {r.model} on {fmt}")
            seen[r.model, fmt] = r.name
    return problems


def _values(values: dict, flagged: set) -> str:
    return ", ".join(f"{'patience' if k == 'early_stopping_patience' else k}={v}" + (" (flag)" if k in flagged else "")
                     for k, v in values.items())


def faces_text(mode: str | None, options: dict) -> str:
    """``detect (detector size=256)``: a face mode and its settings in one phrase."""
    parts = "; ".join(f"{k} {_values(v, set()) if isinstance(v, dict) else v}" for k, v in options.items() if v)
    return f"{mode or 'the format default'}{f' ({parts})' if parts else ''}"


def describe(recipe: TrainingRecipe, model_args: dict, train: dict, faces: str | None = None,
             face_options: dict | None = None) -> list[str]:
    """The lines ``jobs.train`` prints at start: the recipe, the faces it trains on (``faces``,
    ``face_options``: the command line's, :func:`face_values`) and each stage's effective values, ``(flag)``
    after a value the command line set."""
    n = len(recipe.stages)
    lines = [f"recipe {recipe.name} v{recipe.version}: {recipe.about}"]
    if recipe.faces or faces:
        mode, options = face_values(recipe, faces, face_options or {})
        flagged = faces is not None or any(v for v in (face_options or {}).values())
        lines.append(f"  faces in every stage: {faces_text(mode, options)}{' (flags)' if flagged else ''}")
    for k, s in enumerate(recipe.stages, 1):
        margs, tr = stage_values(s, model_args, train)
        start = "" if k == 1 else f"; from stage {k - 1}'s best checkpoint"
        lines.append(f"  stage {k}/{n} {s.name}: {_values({**margs, **tr}, set(model_args) | set(train))}{start}")
    lines.append("  every other value: the model's defaults; a flag replaces a value in every stage "
                 "(--recipe none: one run with the model's defaults)")
    return lines


def _map(x) -> dict:
    return x if isinstance(x, dict) else {}


def record_lines(extra: dict) -> list[str]:
    """What a checkpoint says about the recipe it was trained with (``extra[RECORD_KEY]``), for jobs.evaluate;
    nothing for a checkpoint trained without one. A loaded checkpoint's record has its shape checked
    (models/checkpoint.py ``metadata_problem``); a value of another type inside it is shown as it is, never
    an exception after an evaluation's work."""
    rec = extra.get(RECORD_KEY) if isinstance(extra, dict) else None
    if not isinstance(rec, dict):
        return []
    lines = [f"recipe {rec.get('name')} v{rec.get('version')}"]
    faces = rec.get("faces")
    if isinstance(faces, dict) and faces:
        lines.append(f"  faces: {faces_text(faces.get('mode'), _map(faces.get('options')))}")
    elif faces:
        lines.append(f"  faces: {str(faces)[:200]}")
    stages = rec.get("stages")
    for s in stages if isinstance(stages, list) else []:
        if not isinstance(s, dict):
            lines.append(f"  stage {str(s)[:200]}")
            continue
        train = _map(s.get("train_values"))
        metric = s.get("primary_metric")
        best = _map(s.get("best_metrics")).get(metric) if isinstance(metric, str) else None
        shown = f", {metric} {best:.4f}" if isinstance(best, (int, float)) else ""
        lines.append(f"  stage {s.get('index')} {s.get('name')}: {s.get('epochs_done')} of {train.get('epochs')} "
                     f"epochs{' (stopped early)' if s.get('stopped') else ''}, best epoch {s.get('best_epoch')}"
                     f"{shown}; {_values(_map(s.get('overrides')), set())}")
    return lines
