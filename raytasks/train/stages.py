"""A recipe's stages (models/recipes.py) as Ray Train runs, one after the other: what ``jobs.train`` runs.

Each stage is a run of raytasks/train/job.py (:func:`~raytasks.train.job.run`) with the stage's values, in
its own folder under the run's, and every stage after the first is initialised from the previous stage's
best checkpoint through ``init_from`` (the ``--init-from`` path of the worker)::

    <storage>/<name>/recipe.json                the recipe, and per stage its identity, state and result
    <storage>/<name>/stage-1-frozen/            a run folder (history, checkpoints, curves: job.py's docstring)
    <storage>/<name>/stage-1-frozen/best.pt     its best checkpoint, not calibrated: where stage 2 starts
    <storage>/<name>/stage-2-finetune/ ...
    --output (default <storage>/<name>/best.pt) the last stage's best checkpoint, calibrated, with the recipe,
                                                every stage's values, best epoch and metrics in
                                                ``extra["named_recipe"]``

A recipe of one stage trains in ``<storage>/<name>/`` itself, as a run without a recipe (``--recipe none``).
Stages differ only in model arguments and ``Recipe`` values: the data set is read, its faces found and the face
template measured once, before Ray starts, for every stage whose model reads its input the same way.

Rerunning the same command resumes. A stage that ``recipe.json`` says is done (its epochs trained or stopped
early, its checkpoint where it was written) is skipped; the first stage that is not resumes from its last
checkpoint, as a single run does (a worker that dies inside a stage is Ray Train's ``max_failures``, as
always). Each stage's identity (recipe, version, stage, model, data and every value but ``epochs``) is kept:
a rerun whose values differ is refused before anything trains, naming what changed, as is a rerun that would
train an earlier stage again (more ``--epochs``) after a later one started from it, and a later stage whose
starting checkpoint is not the one it started from. A larger ``--epochs`` extends the last stage trained.
"""

from __future__ import annotations

import dataclasses
import json
import time

import storage
from models.checkpoint import PIN_SEP, checkpoint_info
from models.recipes import RECORD_KEY, Stage, TrainingRecipe, describe, face_values, stage_values
from raytasks.reach import check_reachable
from raytasks.train.history import HISTORY_JSON, read_history
from raytasks.train.job import prepare, resolve_model, run
from raytasks.train.resume import check_folder
from raytasks.train.spec import TrainError, TrainOutcome, TrainSpec

RECIPE_FILE = "recipe.json"


def summary_metrics(metrics: dict) -> dict:
    """The per-output metrics of a result (CelebA's 40 per-attribute accuracies, capitalised, stay in the
    history): what ``jobs.train`` prints and a checkpoint's recipe record keeps."""
    return {k: metrics[k] for k in sorted(metrics)
            if k in ("val_loss", "mean_accuracy")
            or (k.endswith(("accuracy", ".mae", ".nme", ".pearson")) and not k[:1].isupper() and not k[:1].isdigit())}


@dataclasses.dataclass
class StageRun:
    index: int  # 1-based
    stage: Stage | None  # None: one run without a recipe
    spec: TrainSpec
    identity: dict


def plan(spec: TrainSpec, recipe: TrainingRecipe | None) -> list[StageRun]:
    """The runs of ``spec`` under ``recipe`` (the flags' values replace the stages' in every stage; ``--init-from``
    is the first stage's start; the last stage exports to ``--output``, calibrated; ``fail_at`` applies to the
    stage ``fail_stage``). Without a recipe: ``spec`` itself."""
    if recipe is None:
        return [StageRun(1, None, spec, {})]
    n, runs = len(recipe.stages), []
    faces, face_options = face_values(recipe, spec.faces, spec.face_options)
    for k, stage in enumerate(recipe.stages, 1):
        model_args, train = stage_values(stage, spec.model_kwargs, spec.recipe)
        name = spec.name if n == 1 else f"{spec.name}/stage-{k}-{stage.name}"
        last = k == n
        sspec = dataclasses.replace(
            spec, name=name, model_kwargs=model_args, recipe=train, calibrate=spec.calibrate and last,
            faces=faces, face_options=face_options,
            output=(spec.output or storage.join(spec.run_uri, "best.pt")) if last
            else storage.join(spec.storage, name, "best.pt"),
            init_from=spec.init_from if k == 1 else None, fail_at=spec.fail_at if k == spec.fail_stage else None)
        identity = {"recipe": recipe.name, "version": recipe.version, "stage": k, "stage_name": stage.name,
                    "model": spec.model, "data": spec.data, "model_args": model_args,
                    "train": {key: v for key, v in train.items() if key != "epochs"},
                    "augment": spec.augment, "align_jitter": spec.align_jitter, "seed": spec.seed,
                    "limit": spec.limit, "val_limit": spec.val_limit, "steps_per_epoch": spec.steps_per_epoch,
                    "faces": faces, "face_options": face_options, "template_images": spec.template_images,
                    "init_from": spec.init_from if k == 1 else f"stage {k - 1}",
                    **({"template": spec.template} if spec.template else {}),  # absent: older runs' identity
                    **({"split_seed": spec.split_seed} if spec.split_seed else {})}
        runs.append(StageRun(k, stage, sspec, json.loads(json.dumps(identity))))
    return runs


def _reading(pre):
    """How a model reads its input, but the face template (which job.prepare measures on the data)."""
    return dataclasses.replace(pre, template=None, template_crop=None)


def _stage_title(r: StageRun, n: int) -> str:
    return f"stage {r.index}/{n} {r.stage.name}"


def _done(r: StageRun, entry: dict | None, exists=storage.exists) -> bool:
    if not entry or entry.get("status") != "done" or not exists(entry["output"]):
        return False
    epochs = r.spec.recipe.get("epochs", entry["train_values"]["epochs"])
    return bool(entry["stopped"]) or entry["epochs_done"] >= epochs


def first_to_train(runs: list[StageRun], recipe: TrainingRecipe | None, state: dict | None, run_uri: str,
                   single_run_there: bool, exists=storage.exists) -> int:
    """Index of the first run of ``runs`` that trains (earlier ones are done), given what the run folder holds:
    its ``recipe.json`` (``state``) and whether it holds a run trained without a recipe. Raises
    :class:`TrainError` when the folder holds something else than what ``runs`` would train."""
    other = "use another --name (or --storage)"
    if recipe is None:
        if state is not None:
            raise TrainError(f"{run_uri} holds recipe {state['recipe']} v{state['version']}: rerun with --recipe "
                             f"{state['recipe']} to resume it, or {other} to train without a recipe")
        return 0
    if state is None:
        if single_run_there and len(runs) > 1:
            raise TrainError(f"{run_uri} holds a run trained without a recipe: rerun with --recipe none to resume "
                             f"it, or {other} to train recipe {recipe.name}")
        return 0
    if (state["recipe"], state["version"]) != (recipe.name, recipe.version):
        raise TrainError(f"{run_uri} holds recipe {state['recipe']} v{state['version']}, not {recipe.name} "
                         f"v{recipe.version}: {other}")
    entries = {e["index"]: e for e in state["stages"]}
    for r in runs:
        old = (entries.get(r.index) or {}).get("identity")
        if old is not None and old != r.identity:
            changed = sorted(k for k in set(old) | set(r.identity) if old.get(k) != r.identity.get(k))
            detail = "; ".join(f"{k}: {old.get(k)} -> {r.identity.get(k)}" for k in changed)
            raise TrainError(f"{_stage_title(r, len(runs))} in {run_uri} was trained with other values ({detail}): "
                             f"{other}")
    first = next((i for i, r in enumerate(runs) if not _done(r, entries.get(r.index), exists)), len(runs) - 1)
    later = [r.index for r in runs[first + 1:] if r.index in entries]
    if later:
        raise TrainError(f"{_stage_title(runs[first], len(runs))} in {run_uri} would train again (more epochs, or its "
                         f"checkpoint is gone) but stage {later[0]} already started from it: {other}")
    return first


class RecipeRun:
    """``jobs.train``'s program: :meth:`prepare` before Ray starts, then :meth:`run`."""

    def __init__(self, spec: TrainSpec, recipe: TrainingRecipe | None, log_fn=print):
        self.spec, self.recipe, self.log = spec, recipe, log_fn
        self.runs = plan(spec, recipe)
        self.state: dict | None = None
        self.first = 0
        self.prepared: dict[int, tuple] = {}  # stage index -> what job.prepare returns for it

    @property
    def _file(self) -> str:
        return storage.join(self.spec.run_uri, RECIPE_FILE)

    def prepare(self) -> None:
        """Print the recipe, check the run folder against it and resolve every stage still to train, so that a
        bad flag or value fails before Ray starts. The first stage to train is prepared whole (data, faces, face
        template: job.prepare); a later stage whose model reads its input the same way trains on those tables,
        faces and template (the data and its reading are the same in every stage), else it is prepared when it
        starts. First, on a cluster this process is connected to: a run storage on this machine's disk that the
        cluster's workers could not reach is refused, before anything is written there (the detection cache
        too), and data or a starting checkpoint there is warned about (raytasks/reach.py)."""
        data = self.spec.data if isinstance(self.spec.data, tuple) else (self.spec.data,)
        check_reachable([("--storage", self.spec.storage)],
                        [*(("--data", d.partition(":")[2]) for d in data), ("--init-from", self.spec.init_from)],
                        TrainError, self.log)
        if self.recipe is not None:
            for line in describe(self.recipe, self.spec.model_kwargs, self.spec.recipe, self.spec.faces,
                                 self.spec.face_options):
                self.log(line)
        self.state = json.loads(storage.read_bytes(self._file)) if storage.exists(self._file) else None
        single = self.state is None and storage.exists(storage.join(self.spec.run_uri, HISTORY_JSON))
        self.first = first_to_train(self.runs, self.recipe, self.state, self.spec.run_uri, single)
        if self.recipe is not None and single:
            self.log(f"{self.spec.run_uri} holds a run from before recipes: it goes on with recipe "
                     f"{self.recipe.name}'s values (what it was trained with is not checked)")
        ds, first = None, None
        for r in self.runs[self.first:]:
            try:
                if ds is None:  # every stage has the same data and split (its identity): read once; any
                    from core.dataread import read_data  # failure of the read is one message (DataReadError)

                    ds = read_data(r.spec.data, seed=r.spec.split_seed)
                if first is None:
                    first = self.prepared[r.index] = prepare(r.spec, ds)
                    if r.stage is None:  # a run without a recipe: its folder holds it or none, checked before
                        # Ray starts (a recipe's stages are checked by their identity: first_to_train)
                        check_folder(r.spec, first[0], first[1], first[3], first[4]["mode"])
                    continue
                model, recipe = resolve_model(r.spec, ds)
                if _reading(model.preprocessing) == _reading(first[0].preprocessing):
                    model.preprocessing = first[0].preprocessing
                    self.prepared[r.index] = (model, recipe, *first[2:])
            except (TrainError, ValueError) as e:
                if r.stage is None:
                    raise
                raise type(e)(f"{_stage_title(r, len(self.runs))} of recipe {self.recipe.name}: {e} (--recipe none: "
                              f"train without a recipe)") from None

    def _entry(self, index: int) -> dict | None:
        return next((e for e in (self.state or {}).get("stages", []) if e["index"] == index), None)

    def _save(self, entry: dict) -> dict:
        stages = [e for e in (self.state or {}).get("stages", []) if e["index"] != entry["index"]] + [entry]
        self.state = {**self.recipe.to_dict(), "recipe": self.recipe.name, "data": self.spec.data,
                      "stages": sorted(stages, key=lambda e: e["index"])}
        storage.write_bytes(self._file, json.dumps(self.state, indent=1).encode())
        return entry

    def run(self) -> TrainOutcome:
        """Train the stages from the first one not done (:meth:`prepare` first), export the last one's best
        checkpoint and record the recipe in it."""
        if self.recipe is None:
            return run(self.spec, self.log, prepared=self.prepared.get(1))
        n, prev, outcome = len(self.runs), None, None
        for i, r in enumerate(self.runs):
            entry = self._entry(r.index)
            if i < self.first:
                self.log(f"{_stage_title(r, n)}: done ({entry['epochs_done']} epochs, best epoch {entry['best_epoch']}), "
                         f"skipped: {entry['output']}")
                prev = entry
                continue
            init_hash = None
            if prev is not None:
                init_hash = checkpoint_info(prev["output"]).hash
                if init_hash != prev["output_hash"] or (entry and entry.get("init_hash") not in (None, init_hash)):
                    raise TrainError(f"{prev['output']} is not the checkpoint {_stage_title(r, n)} started from "
                                     f"({prev['output_hash']}): use another --name (or --storage)")
                # pinned: the workers load exactly the checkpoint checked here (models.checkpoint.split_pin)
                r.spec.init_from = prev["output"] + PIN_SEP + init_hash.removeprefix("sha256:")
            start = r.spec.init_from
            self.log(f"{_stage_title(r, n)}{f', from {start}' if start else ''}: {r.spec.run_uri}")
            self._save({**(entry or {}), "index": r.index, "name": r.stage.name, "identity": r.identity,
                        "run": r.spec.run_uri, "status": "training", "init_from": start, "init_hash": init_hash,
                        "started": (entry or {}).get("started", time.time())})
            done: dict = {}

            def finish(o: TrainOutcome, r=r, done=done) -> dict:
                # the record goes into the export before it is written, so --output is written once
                done["entry"] = self._done_entry(r, o)
                done["record"] = self._record(done["entry"])
                return {RECORD_KEY: done["record"]}

            outcome = run(r.spec, self.log, prepared=self.prepared.pop(r.index, None),
                          finish=finish if i == n - 1 else None)
            prev = self._save({**(done.get("entry") or self._done_entry(r, outcome)),
                               "output_hash": outcome.output_hash})
        return dataclasses.replace(outcome, recipe=done["record"])

    def _done_entry(self, r: StageRun, outcome: TrainOutcome) -> dict:
        """Stage ``r``'s entry in recipe.json once it has trained (its ``output_hash``: the one exported)."""
        doc = read_history(r.spec.run_uri) or {}
        last = outcome.history[-1] if outcome.history else {}
        return {**self._entry(r.index), "status": "done", "finished": time.time(),
                "epochs_done": int(last.get("epoch", 0)), "stopped": bool(last.get("stopped")),
                "best_epoch": outcome.best_epoch, "best_metrics": summary_metrics(outcome.best_metrics),
                "primary_metric": doc.get("primary_metric"), "train_values": doc.get("recipe"),
                "model_config": doc.get("config"), "output": outcome.output, "output_hash": outcome.output_hash,
                "overrides": {**r.spec.model_kwargs, **r.spec.recipe}}

    def _record(self, last: dict) -> dict:
        """The recipe's record that the exported checkpoint keeps: every stage's entry, ``last`` the last one's."""
        stages = sorted([e for e in self.state["stages"] if e["index"] != last["index"]] + [last],
                        key=lambda e: e["index"])
        first = self.runs[0].spec  # the faces every stage trained on, where the recipe or a flag chose them
        faces = {"faces": {"mode": first.faces, "options": first.face_options}} if first.faces else {}
        return {"name": self.recipe.name, "version": self.recipe.version, "about": self.recipe.about, **faces,
                "stages": [{k: v for k, v in e.items() if k not in ("identity", "status", "output_hash")}
                           for e in stages]}
