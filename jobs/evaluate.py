"""Evaluate a checkpoint on a dataset with each paper's metrics, its calibration, and per group.

    python -m jobs.evaluate --checkpoint CKPT --data FORMAT:PATH [--split test] [--json OUT] [--faces detect]
        [--calibrate-on val [--save-calibrated NEW.pt]] [--reliability OUT.png]
        [--by gender,race,age_group [--groups-json OUT] [--min-group 30] [--bootstrap 1000]] [--report OUT.html]

Prints per-attribute and mean accuracy (with the checkpoint's thresholds), MAE / RMSE / Pearson for
scores, age MAE / RMSE and class accuracy; ``--json OUT`` writes a flat object ``{"<output>.<metric>":
number, ..., "mean_accuracy": number}``. ``--faces detect`` measures the model the way a user meets it: the
detector finds the face in each image and the model reads its aligned crop (faces/finder.py); images in
which no face is found are left out and counted (``images_without_face``). A row that names its face (a
manifest's ``face_box`` / ``face_points``: several labelled people in one photo) is judged on that face, found as
training finds it (core/evalinputs.py); ``--face-pick`` chooses for the other rows. ``--faces whole`` feeds each
image whole, and refuses ``--face-pick`` and the detector's flags, which would do nothing. The default is the way
the checkpoint was trained: ``detect`` for a model trained with ``jobs.train --faces detect`` or ``landmarks``
(its ``extra["faces"]``), ``whole`` otherwise.

Labels whose class codes mean other classes than the checkpoint's outputs (SCUT-FBP5500's race 0 = Asian for
age_gender_race's 0 = White; a manifest's code the head does not have) are not scored, and the run names them
(core/evalinputs.py: the rule training applies to a mix of sources). The ``--json`` object is strict JSON: a
figure that is not a number (the Pearson of constant predictions) is ``null``.

Calibration (models/calibration.py). The run says whether the checkpoint is calibrated (``calibrated: false``
for one saved without temperatures) and gives the expected calibration error (15 bins, l1: models/reliability.py) of
every categorical output and binary attribute: ``<name>.ece_uncalibrated`` (the raw softmax / sigmoid) and,
for a calibrated model, ``<name>.ece_calibrated`` (what the label and serve jobs report). These keys and
``calibrated`` (0 or 1) are added to the ``--json`` object; ``main`` returns the metrics alone.
``--calibrate-on SPLIT`` fits temperatures on that split first (not the evaluated one, or the figures are
in-sample: asked for, that is warned about; made so by ``--split test`` falling back to val on data without
test rows, it is refused), and ``--save-calibrated NEW`` writes the calibrated checkpoint (same metrics and extra, plus
``extra["calibration"]``). ``--reliability OUT.png`` draws a reliability diagram per output. A checkpoint
trained with a recipe (models/recipes.py) says so: its stages, their values, best epochs and metrics.

Groups. ``--by gender,race,age_group`` recomputes every metric and the ECE for each value of each key, with
its count and a 95 % confidence interval: Wilson's score interval for an accuracy (a proportion of
``n`` labelled rows), a percentile bootstrap (``--bootstrap`` resamples of the group's rows, seeded;
bias-corrected, see ``bootstrap_interval``) for every other metric (MAE, RMSE, Pearson, losses, ECE, mean accuracies). For each key and metric it gives the
largest gap between groups (largest minus smallest value) over the groups with at least ``--min-group``
rows labelled for that metric (the metric's ``n``, not the group's rows). A key is a label column of the data (class indices are named by the model's output that predicts
them: 0 -> male), ``age_group`` (from ``age``: 0-17, 18-29, 30-44, 45-59, 60+) or one binary attribute of
the model (``Male``: Male / not_Male). Rows without the key's label are left out of that key.
``--groups-json OUT`` writes the report.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import dataclass

import pandas as pd

import storage
from core.batches import label_columns
from core.dataread import DataReadError, read_data
from core.engine import sample_rows
from core.evalinputs import NamedFaces, class_disagreements, has_named_faces
from core.evaluation import (
    GroupError,
    calibration_errors,
    calibration_pairs,
    format_groups,
    group_report,
    group_values,
    metrics_from,
    reliability_png,
    run_model,
)
from facedata.datasets import SPLITS
from faces.finder import FACE_PICKS
from jobs._cli import add_face_args, check_job_paths, data_path, face_options, non_negative, positive
from models.calibration import CalibrationError, calibration_status, fit_calibration
from models.checkpoint import CheckpointError, CheckpointInfo, checkpoint_bytes, load_checkpoint
from models.recipes import record_lines
from raytasks.reach import path_of

# --limit and --calibrate-limit draw their rows at random (core.engine.sample_rows, jobs.train's --limit draw)
# with this seed, not the split's: a fixed one, so that every evaluation with the same limit sees the same rows
LIMIT_SEED = 0


SPLIT_CHOICES = (*SPLITS, "all")


def _split(ds, name: str, p, doing: str = "evaluating") -> tuple[pd.DataFrame, str]:
    """The rows of split ``name`` and the split they are (test falls back to val when there are no test rows)."""
    table = ds.table if name == "all" else ds.split(name)
    if len(table) == 0 and name == "test":
        table, name = ds.split("val"), "val"
        print(f"no test rows: {doing} on the validation split", file=sys.stderr)
    if len(table) == 0:
        p.error(f"no rows in split {name!r}")
    return table, name


def _overlap(a: str, b: str) -> bool:
    return a == b or "all" in (a, b)


def _check_calibration_split(args, split: str, cal_split: str, p) -> None:
    """Temperatures fitted on the rows they are then judged on give in-sample figures. Asked for (``--split val
    --calibrate-on val``, or ``all``), it is said loudly; made so by the fallback of ``--split test`` to val on
    data without test rows, it is refused: the user asked for held-out figures."""
    if not _overlap(split, cal_split):
        return
    if not _overlap(args.split, args.calibrate_on):
        p.error(f"--split {args.split} --calibrate-on {args.calibrate_on}: the data has no test rows, so both read "
                f"the {split if split != 'all' else cal_split} split and the calibrated figures would be measured on "
                f"the rows the temperatures were fitted on; give --split {split} to accept in-sample figures, or "
                f"calibrate on another split")
    shared = split if split == cal_split else (cal_split if split == "all" else split)
    print(f"warning: the temperatures are fitted on {cal_split} and the evaluation reads {split}: the {shared} rows "
          f"are in both, so the calibrated figures are in-sample", file=sys.stderr)


def _check_face_flags(args, opts: dict, defaulted: bool, p) -> None:
    """With ``--faces whole`` nothing is detected: flags that choose or tune detection would do nothing (as
    ``jobs.train`` refuses them with whole)."""
    if args.faces != "whole":
        return
    given = [why for why, on in (("--face-pick chooses among detected faces", args.face_pick is not None),
                                 ("--det-*, --min-face and --max-faces tune the detector", bool(opts.get("detector"))),
                                 ("--max-side sizes photos for the detector", "max_side" in opts)) if on]
    if given:
        trained = ", as the checkpoint was trained" if defaulted else ""
        p.error(f"{'; '.join(given)}: {'they need' if len(given) > 1 else 'it needs'} --faces detect (faces are "
                f"read whole here{trained})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint path or s3:// URI")
    p.add_argument("--data", required=True, help="FORMAT:PATH, e.g. celeba:../shared/data/celeba")
    p.add_argument("--split", default="test", choices=SPLIT_CHOICES,
                   help="the rows evaluated (default test; val if the data has no test rows)")
    p.add_argument("--batch-size", type=positive(int), default=64)
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the split when the data has none; default: the checkpoint's (jobs.train "
                        "--split-seed; 0 for checkpoints that do not record one)")
    p.add_argument("--limit", type=positive(int), default=None,
                   help=f"evaluate at most this many images, drawn at random with the fixed seed {LIMIT_SEED} (the "
                        "same rows every run), not the first ones: a data set listed in label order (UTKFace: "
                        "by age) would be measured on one end of it")
    p.add_argument("--mirror", choices=("on", "off"), default=None,
                   help="read each face with its mirror image too and average the outputs (on), or not (off); "
                        "default: as the checkpoint says (its recipe's choice; models/preprocess.py)")
    p.add_argument("--json", default=None, help="write the metrics as a flat JSON object here (path or s3://)")
    c = p.add_argument_group("calibration (models/calibration.py)")
    c.add_argument("--calibrate-on", default=None, choices=SPLIT_CHOICES, metavar="SPLIT",
                   help="fit temperatures on this split (train, val, test or all; e.g. val) before evaluating; "
                        "replaces the checkpoint's")
    c.add_argument("--calibrate-limit", type=positive(int), default=None,
                   help=f"fit on at most this many images, drawn at random with the fixed seed {LIMIT_SEED}")
    c.add_argument("--save-calibrated", default=None, metavar="URI", help="write the calibrated checkpoint here")
    c.add_argument("--reliability", default=None, metavar="OUT.png", help="write a reliability diagram (PNG) here")
    p.add_argument("--report", default=None, metavar="OUT.html", help="write an HTML report here: metrics, reliability "
                   "diagrams, confusion matrices, per-group bars with --by (core/report.py)")
    g = p.add_argument_group("groups")
    g.add_argument("--by", default=None, help="comma-separated keys, e.g. gender,race,age_group (or an attribute: Male)")
    g.add_argument("--groups-json", default=None, help="write the per-group report here (path or s3://)")
    g.add_argument("--min-group", type=non_negative, default=30, help="a metric's gap compares only the groups with at least this many rows labelled for that metric")
    g.add_argument("--bootstrap", type=non_negative, default=1000, help="bootstrap resamples for non-accuracy CIs (0: none)")
    add_face_args(p, default_mode=None, faces_help="detect: find the face in each image and align it to the model's "
                  "template; whole: feed each image whole. Default: as the checkpoint was trained (detect after "
                  "jobs.train --faces detect or landmarks, else whole)")
    p.add_argument("--face-pick", choices=FACE_PICKS, default=None,
                   help="with --faces detect, which face of a photo holding several is the labelled one, for rows "
                        "that do not name theirs by face_box / face_points: the detector's most confident "
                        "(default, score), the largest, or the one nearest the middle (LFW's rule)")
    return p


@dataclass
class _Inputs:
    """What a run evaluates: the checkpoint, the rows evaluated and those calibrated on."""
    model: object  # the checkpoint's FaceModel (models/base.py), in eval mode
    info: CheckpointInfo
    face_opts: dict  # face_options(args): the detector's settings
    table: pd.DataFrame  # the rows evaluated; with --faces detect, the faces they name resolved (_face_run)
    split: str  # the split they are (test falls back to val)
    cal_table: pd.DataFrame | None  # the rows --calibrate-on fits on, or None
    cal_split: str | None
    left_out: dict  # label column -> why it is not scored
    by: list[str]  # the --by keys
    n_rows: int  # rows evaluated, before any face is looked for


def _prepare(args, p) -> _Inputs:
    """Load the checkpoint and read the data, filling ``args.faces`` and ``args.seed`` from the checkpoint where
    they are not given; every refusal that does not need the model to run comes here."""
    try:
        model, info = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        p.error(str(e))
    if args.mirror is not None:
        try:
            model.set_mirror(args.mirror == "on")
        except ValueError as e:
            p.error(str(e))
    defaulted = args.faces is None
    if defaulted:
        trained = (info.extra.get("faces") or {}).get("mode", "whole")
        args.faces = "detect" if trained in ("detect", "landmarks") else "whole"
        print(f"faces: {args.faces} (as the checkpoint was trained: --faces {trained})", file=sys.stderr)
    opts = face_options(args)
    _check_face_flags(args, opts, defaulted, p)
    if args.seed is None:
        args.seed = int(info.extra.get("split_seed", 0))
        if args.seed:
            print(f"split seed {args.seed} (the one the checkpoint was trained with)", file=sys.stderr)
    wanted = label_columns(model)
    try:  # for_labels: a 40-attribute model is scored on the attributes the data has (GENKI's smile as Smiling)
        ds = read_data(args.data, seed=args.seed).for_labels(wanted)
    except DataReadError as e:
        p.error(str(e))
    table, split = _split(ds, args.split, p)
    cal_table = cal_split = None
    if args.calibrate_on:
        cal_table, cal_split = _split(ds, args.calibrate_on, p, "calibrating")
        _check_calibration_split(args, split, cal_split, p)
        cal_table = sample_rows(cal_table, args.calibrate_limit, LIMIT_SEED).reset_index(drop=True)
    table = sample_rows(table, args.limit, LIMIT_SEED).reset_index(drop=True)  # positions index the rows later
    left_out = class_disagreements(ds, model)  # codes of other classes than the checkpoint's: not scored
    for col, why in left_out.items():
        print(f"{col}: not scored ({why})", file=sys.stderr)
        table = table.drop(columns=[col])
        cal_table = None if cal_table is None else cal_table.drop(columns=[col])
    if not any(c in table.columns and table[c].notna().any() for c in wanted):
        p.error(f"{args.data} (split {split}) has none of the labels {info.model} predicts "
                f"({', '.join(wanted)}; it has {', '.join(c for c in table.columns if c not in ('path', 'split'))}"
                f"{''.join(f'; {c} not scored: {w}' for c, w in left_out.items())}): nothing to compare its answers with")
    by = _group_keys(args, p, table, model, left_out)
    return _Inputs(model, info, opts, table, split, cal_table, cal_split, left_out, by, n_rows=len(table))


def _group_keys(args, p, table: pd.DataFrame, model, left_out: dict) -> list[str]:
    """The ``--by`` keys, each tried on one row: a bad key fails now, before the model runs."""
    by = [k.strip() for k in args.by.split(",") if k.strip()] if args.by else []
    for key in by:
        if key in left_out:
            p.error(f"--by {key}: {left_out[key]}; groups named by the checkpoint's classes would be wrong")
        try:
            group_values(table.iloc[:1], model, key)
        except GroupError as e:
            p.error(str(e))
    return by


def _face_run(args, inp: _Inputs) -> tuple[functools.partial, NamedFaces | None]:
    """How the model reads the images -> ``(run, named)``: ``run(table)`` runs it on rows; with ``--faces detect``
    it reads the aligned crop of the face the detector finds, and ``named`` (when rows name their face) has found
    the named faces of ``inp.table``, finds those of the calibration rows, and is closed after the run."""
    run_args: dict = {"batch_size": args.batch_size}
    named = None
    if args.faces == "detect":
        from faces.finder import FaceFinder, FaceOptions, decode_face

        finder = FaceFinder(FaceOptions.from_dict(inp.face_opts))
        pick = args.face_pick or "score"
        run_args.update(decode_fn=lambda data, pre: decode_face(data, pre, finder, pick=pick),
                        max_side=finder.options.max_side)  # the named faces' decode (core/evalinputs.py)
        if has_named_faces(inp.table) or (inp.cal_table is not None and has_named_faces(inp.cal_table)):
            named = NamedFaces(finder)  # a row that names its face is judged on it, as training finds it
            inp.table, faces = named.resolve(inp.table)
            if faces is not None:
                print(f"faces named by the data (face_box / face_points), {inp.split}: {faces.line()}",
                      file=sys.stderr)
    return functools.partial(run_model, inp.model, **run_args), named


def _calibrate(args, inp: _Inputs, run, named: NamedFaces | None, p):
    """Fit temperatures on ``inp.cal_table`` (replacing the checkpoint's), say what was fitted, and write the
    calibrated checkpoint with ``--save-calibrated``; -> the fit."""
    model, cal_table, cal_split = inp.model, inp.cal_table, inp.cal_split
    if named is not None:
        cal_table, faces = named.resolve(cal_table)
        if faces is not None:
            print(f"faces named by the data, {cal_split}: {faces.line()}", file=sys.stderr)
    cal_ev = run(cal_table)
    model.outputs.clear_calibration()
    try:
        fitted = fit_calibration(model, calibration_pairs(model, cal_ev))
    except CalibrationError as e:
        p.error(str(e))
    for name, f in fitted.outputs.items():
        if f.method == "shift":
            print(f"fitted {name} on {cal_split} ({f.n} rows): {f.line()}")
        else:
            ts = (", ".join(f"{t:.3f}" for t in f.temperatures[:5]) + (" ..." if len(f.temperatures) > 5 else "")
                  if f.temperatures else "none kept")
            print(f"fitted {name} on {cal_split} ({f.n} rows): T = {ts}; NLL {f.nll_before:.4f} -> "
                  f"{f.nll_after:.4f}, ECE {f.ece_before:.4f} -> {f.ece_after:.4f}")
        for line in f.rejected_lines():
            print(line)
    if args.save_calibrated:
        data, digest = checkpoint_bytes(model, inp.info.metrics, {**inp.info.extra, "calibration": {
            "split": cal_split, "data": args.data, "fit": fitted.summary()}})
        storage.write_bytes(args.save_calibrated, data)
        print(f"calibrated checkpoint {args.save_calibrated} {digest}")
    return fitted


def _print_results(args, inp: _Inputs, ev, metrics: dict, eces: dict, status: dict, refit: bool) -> None:
    """The run's line, how the checkpoint was trained, the metrics, and its calibration status with the ECEs."""
    model, info, split = inp.model, inp.info, inp.split
    fitted_on = f" + temperatures fitted on {inp.cal_split}" if refit else ""
    shown = split if split == args.split else f"{split} (no test rows)"
    print(f"model {info.model}  checkpoint {info.short_hash()}{fitted_on}  data {args.data}  split {shown}  "
          f"images {int(metrics['n_images'])}  mirror {'on' if model.preprocessing.mirror else 'off'}")
    for line in record_lines(info.extra):  # how it was trained: its recipe's stages (models/recipes.py)
        print(line)
    width = max(len(k) for k in list(metrics) + list(eces))
    for k in sorted(metrics):
        print(f"  {k:<{width}}  {metrics[k]:.4f}")
    for o in model.outputs:  # a 40-attribute model on data that labels a few of them (GENKI-4K: Smiling)
        counts = (ev.stats.get(o.name) or {}).get("n_label")
        if counts is not None and len(o.labels) > 1 and bool((counts == 0).any()):
            have = [lab for lab, n in zip(o.labels, counts.tolist()) if n > 0]
            print(f"  ({o.name}: the data labels {len(have)} of {len(o.labels)} ({', '.join(have)}); "
                  f"{o.name}.mean_accuracy is over {'it' if len(have) == 1 else 'them'})")
    for col in inp.left_out:
        print(f"  ({col}: not scored: the data's codes are not the checkpoint's classes)")
    shifts = ", ".join(f"{k} {v:+.4f}" for k, v in status["shifts"].items() if v is not None)
    print(f"calibrated: {str(status['calibrated']).lower()}"
          + ("" if status["calibrated"] else "  (no temperatures in this checkpoint: probabilities are the raw "
                                             "softmax / sigmoid)")
          + (f"  (shift of the scores, fitted at export: {shifts})" if shifts else ""))
    for k in sorted(eces):
        print(f"  {k:<{width}}  {eces[k]:.4f}")


def _write_outputs(args, inp: _Inputs, ev, metrics: dict, eces: dict, status: dict) -> None:
    """The outputs asked for: --json, --reliability, the groups of --by (printed; --groups-json), --report."""
    model = inp.model
    if args.json:  # strict JSON: a figure that is not a number (one row's Pearson) is null, as in --groups-json
        doc = {**metrics, **eces, "calibrated": float(status["calibrated"])}
        storage.write_bytes(args.json, json.dumps(_json_safe(doc), indent=2, sort_keys=True, allow_nan=False).encode())
    title = f"{inp.info.model} {inp.info.short_hash()} on {args.data} ({inp.split})"
    if args.reliability:
        storage.write_bytes(args.reliability, reliability_png(model, ev.raw, ev.targets, title=title))
        print(f"reliability diagram {args.reliability}")
    report = None
    if inp.by:
        report = group_report(model, inp.table, ev.raw, ev.targets, inp.by, n_boot=args.bootstrap,
                              min_group=args.min_group, seed=args.seed, rows=ev.rows)
        for line in format_groups(report):
            print(line)
        if args.groups_json:
            storage.write_bytes(args.groups_json, json.dumps(_json_safe(report), indent=2).encode())
    if args.report:
        from core.report import evaluation_html

        storage.write_bytes(args.report, evaluation_html(model, ev, metrics, eces, groups=report,
                                                         title=title).encode())
        print(f"report {args.report}")


def main(argv: list[str] | None = None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    # relative paths resolve into Ray's unpacked working_dir under `ray job submit`: refused there (raytasks/reach.py)
    check_job_paths(p, [("--checkpoint", path_of(args.checkpoint)), ("--data", data_path(args.data)),
                        *((f"--{k.replace('_', '-')}", getattr(args, k)) for k in (
                            "json", "save_calibrated", "reliability", "report", "groups_json"))])
    if args.save_calibrated and not args.calibrate_on:
        p.error("--save-calibrated needs --calibrate-on SPLIT")
    for flag in ("json", "save_calibrated", "reliability", "report", "groups_json"):  # written at the end: a
        problem = storage.unwritable(getattr(args, flag)) if getattr(args, flag) else None  # path that cannot be
        if problem:  # is refused before the evaluation, not after it
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: {problem}")

    inp = _prepare(args, p)
    run, named = _face_run(args, inp)
    fitted = _calibrate(args, inp, run, named, p) if inp.cal_table is not None else None

    ev = run(inp.table)
    if named is not None:
        named.close()
    metrics = metrics_from(inp.model, ev)
    if args.faces == "detect":
        metrics["images_without_face"] = float(inp.n_rows - len(ev.rows))  # not found, or not decoded
    status = calibration_status(inp.model)
    eces = calibration_errors(inp.model, ev.raw, ev.targets)
    _print_results(args, inp, ev, metrics, eces, status, refit=fitted is not None)
    _write_outputs(args, inp, ev, metrics, eces, status)
    return metrics


def _json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


if __name__ == "__main__":
    main()
