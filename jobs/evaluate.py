"""Evaluate a checkpoint on a dataset with each paper's metrics, its calibration, and per group.

    python -m jobs.evaluate --checkpoint CKPT --data FORMAT:PATH [--split test] [--json OUT] [--faces detect]
        [--calibrate-on val [--save-calibrated NEW.pt]] [--reliability OUT.png]
        [--by gender,race,age_group [--groups-json OUT] [--min-group 30] [--bootstrap 1000]]

Prints per-attribute and mean accuracy (with the checkpoint's thresholds), MAE / RMSE / Pearson for
scores, age MAE / RMSE and class accuracy; ``--json OUT`` writes a flat object ``{"<output>.<metric>":
number, ..., "mean_accuracy": number}``. ``--faces detect`` measures the model the way a user meets it: the
detector finds the face in each image and the model reads its aligned crop (faces/finder.py); images in
which no face is found are left out and counted (``images_without_face``). The default, ``whole``, feeds each
image whole, as training did.

Calibration (models/calibration.py). The run says whether the checkpoint is calibrated (``calibrated: false``
for one saved without temperatures) and gives the expected calibration error (15 bins, l1, torchmetrics) of
every categorical output and binary attribute: ``<name>.ece_uncalibrated`` (the raw softmax / sigmoid) and,
for a calibrated model, ``<name>.ece_calibrated`` (what the label and serve jobs report). These keys and
``calibrated`` (0 or 1) are added to the ``--json`` object; ``main`` returns the metrics alone.
``--calibrate-on SPLIT`` fits temperatures on that split first (not the evaluated one, or the figures are
in-sample), and ``--save-calibrated NEW`` writes the calibrated checkpoint (same metrics and extra, plus
``extra["calibration"]``). ``--reliability OUT.png`` draws a reliability diagram per output.

Groups. ``--by gender,race,age_group`` recomputes every metric and the ECE for each value of each key, with
its count and a 95 % confidence interval: Wilson's score interval for an accuracy (a proportion of
``n`` labelled rows), a percentile bootstrap (``--bootstrap`` resamples of the group's rows, seeded;
bias-corrected, see ``bootstrap_interval``) for every other metric (MAE, RMSE, Pearson, losses, ECE, mean accuracies). For each key and metric it gives the
largest gap between groups (largest minus smallest value) over the groups with at least ``--min-group``
rows. A key is a label column of the data (class indices are named by the model's output that predicts
them: 0 -> male), ``age_group`` (from ``age``: 0-17, 18-29, 30-44, 45-59, 60+) or one binary attribute of
the model (``Male``: Male / not_Male). Rows without the key's label are left out of that key.
``--groups-json OUT`` writes the report.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from core.engine import concat_batches, load_batch, to_tensors, validation_loss
from facedata import storage
from facedata.datasets import read_dataset
from jobs._cli import add_face_args, face_options, positive
from models.calibration import (
    CalibrationError,
    calibration_status,
    ece,
    fit_calibration,
    reliability_bins,
)
from models.checkpoint import CheckpointError, checkpoint_bytes, load_checkpoint
from models.outputs import Binary, Categorical, add_stats

AGE_GROUPS: tuple[tuple[str, float, float], ...] = (
    ("0-17", 0, 18), ("18-29", 18, 30), ("30-44", 30, 45), ("45-59", 45, 60), ("60+", 60, math.inf),
)
Z95 = 1.959963984540054
GENDER_NAMES = ("male", "female")  # the canonical gender column: 0 = male, 1 = female, in every data set


class GroupError(ValueError):
    """A ``--by`` key the data or the model cannot answer."""


# --- one pass over the table: metrics, and every row's raw outputs -------------------------------------
@dataclass
class Evaluated:
    """Raw outputs and targets of the rows that were evaluated, in table order (``rows``: positions in the
    table), and the summed statistics of every output (as ``core.engine.evaluate_batches`` sums them)."""

    raw: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    rows: np.ndarray
    stats: dict


def _batches_with_rows(table: pd.DataFrame, model, batch_size: int, decode_fn=None):
    """``core.engine.load_batch`` over the table in order, with the table positions of the rows kept (a row
    whose image cannot be decoded is dropped there; the chunk is then reloaded row by row to know which)."""
    for start in range(0, len(table), batch_size):
        chunk = table.iloc[start:start + batch_size]
        b = load_batch(chunk, model, decode_fn=decode_fn)
        if len(b["image"]) == len(chunk):
            yield b, np.arange(start, start + len(chunk))
            continue
        parts, rows = [], []
        for i in range(len(chunk)):
            bi = load_batch(chunk.iloc[i:i + 1], model, decode_fn=decode_fn)
            if len(bi["image"]):
                parts.append(bi)
                rows.append(start + i)
        if parts:
            merged = parts[0]
            for p in parts[1:]:
                merged = concat_batches(merged, p)
            yield merged, np.array(rows)


@torch.no_grad()
def run_model(model, table: pd.DataFrame, batch_size: int = 64, device: str = "cpu", decode_fn=None) -> Evaluated:
    dev = torch.device(device)
    model.to(dev).eval()
    raws: dict[str, list] = {}
    tgts: dict[str, list] = {}
    rows: list[np.ndarray] = []
    stats = None
    for batch, pos in _batches_with_rows(table, model, batch_size, decode_fn):
        images, targets = to_tensors(batch, dev)
        raw = {k: v.float() for k, v in model(model.prepare(images)).items()}
        stats = add_stats(stats, model.stats(raw, targets))
        for k, v in raw.items():
            raws.setdefault(k, []).append(v.detach().cpu())
        for k, v in targets.items():
            tgts.setdefault(k, []).append(v.detach().cpu())
        rows.append(pos)
    return Evaluated({k: torch.cat(v) for k, v in raws.items()}, {k: torch.cat(v) for k, v in tgts.items()},
                     np.concatenate(rows) if rows else np.zeros(0, dtype=int), stats or {})


def metrics_from(model, ev: Evaluated) -> dict[str, float]:
    """What ``core.engine.evaluate_table`` returns, from the same statistics."""
    metrics = model.metrics(ev.stats)
    metrics["val_loss"] = validation_loss(model, metrics)
    metrics["n_images"] = float(max((float(s["n"]) for s in ev.stats.values()), default=0.0))
    return metrics


def _ctx(model, o) -> dict:
    sub = model.decode_context().get(o.name)
    return sub if isinstance(sub, dict) else {}


def _labelled(model, raw: dict, targets: dict):
    """(output, raw, target) of every output with probabilities whose labels the data has."""
    for o in model.outputs.calibratable():
        if o.name in raw and o.target_column in targets:
            yield o, raw[o.name], targets[o.target_column]


def calibration_errors(model, raw: dict, targets: dict, validate: bool = True) -> dict[str, float]:
    """``<name>.ece_uncalibrated`` for every labelled categorical output and binary attribute (and
    ``<group>.mean_ece_uncalibrated``), plus ``..._calibrated`` for the outputs that carry temperatures."""
    out: dict[str, float] = {}
    for o, r, t in _labelled(model, raw, targets):
        for k, v in ece(o, r, t, calibrated=False, ctx=_ctx(model, o), validate=validate).items():
            out[f"{k}_uncalibrated"] = v
        if o.calibrated:
            for k, v in ece(o, r, t, calibrated=True, ctx=_ctx(model, o), validate=validate).items():
                out[f"{k}_calibrated"] = v
    return out


# --- groups --------------------------------------------------------------------------------------------
def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion of ``k`` successes in ``n`` trials."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(estimate: float, replicates) -> tuple[float, float]:
    """95 % bias-corrected percentile bootstrap interval (Efron's BC): the 2.5 and 97.5 percentiles, moved
    by ``z0 = Φ⁻¹(share of replicates below the estimate)``. Plain percentiles can miss the estimate of a
    biased statistic: resampling duplicates rows, which fills the 15 bins unevenly and pushes every ECE
    replicate above the estimate. When the replicates still lie on one side, the interval is extended to
    the estimate. NaN when there are no finite replicates."""
    from statistics import NormalDist

    vals = np.asarray([x for x in replicates if math.isfinite(x)], dtype=float)
    if not len(vals) or not math.isfinite(estimate):
        return (float("nan"), float("nan"))
    nd = NormalDist()
    below = (np.sum(vals < estimate) + 0.5 * np.sum(vals == estimate)) / len(vals)
    below = min(max(below, 1 / (len(vals) + 1)), len(vals) / (len(vals) + 1))
    z0 = nd.inv_cdf(below)
    lo_q, hi_q = nd.cdf(2 * z0 - Z95), nd.cdf(2 * z0 + Z95)
    lo, hi = float(np.quantile(vals, lo_q)), float(np.quantile(vals, hi_q))
    return (min(lo, estimate), max(hi, estimate))


def age_group(age) -> str | None:
    if age is None or (isinstance(age, float) and math.isnan(age)):
        return None
    a = float(age)
    for name, lo, hi in AGE_GROUPS:
        if lo <= a < hi:
            return name
    return None


def group_keys(table: pd.DataFrame, model) -> list[str]:
    """The ``--by`` keys this data and model can answer."""
    keys = [c for c in table.columns if c not in ("path", "split", "attributes", "landmarks")]
    if "age" in table.columns:
        keys.append("age_group")
    for o in model.outputs:
        if isinstance(o, Binary) and o.target_column in table.columns and len(o.labels) > 1:
            keys += list(o.labels)
    return keys


def group_values(table: pd.DataFrame, model, key: str) -> list[str | None]:
    """One group name per table row for ``key`` (None: the row has no such label)."""
    if key == "age_group":
        if "age" not in table.columns:
            raise GroupError(f"--by age_group needs an 'age' column; the data has {_available(table, model)}")
        return [age_group(a) for a in table["age"]]
    if key in table.columns:
        names = GENDER_NAMES if key == "gender" else None  # the canonical meaning (facedata/datasets.py)
        for o in model.outputs:
            if isinstance(o, Categorical) and o.target_column == key:
                names = o.classes
        out: list[str | None] = []
        for v in table[key]:
            if v is None or (isinstance(v, float) and math.isnan(v)):
                out.append(None)
            elif names is not None and float(v).is_integer() and 0 <= int(v) < len(names):
                out.append(names[int(v)])
            elif isinstance(v, (int, float, np.integer, np.floating)) and float(v).is_integer():
                out.append(str(int(v)))
            else:
                out.append(str(v))
        return out
    for o in model.outputs:
        if isinstance(o, Binary) and key in o.labels and o.target_column in table.columns:
            j = o.labels.index(key)
            out = []
            for v in table[o.target_column]:
                arr = None if v is None else np.asarray(v, dtype=float).reshape(-1)
                if arr is None or arr.size != len(o.labels) or math.isnan(arr[j]):
                    out.append(None)
                else:
                    out.append(key if arr[j] > 0 else f"not_{key}")
            return out
    raise GroupError(f"--by {key}: no such column or attribute in the data; it has {_available(table, model)}")


def _available(table, model) -> str:
    return ", ".join(group_keys(table, model)) or "no label column"


def _subset(d: dict[str, torch.Tensor], idx: np.ndarray) -> dict[str, torch.Tensor]:
    ix = torch.as_tensor(idx, dtype=torch.long)
    return {k: v.index_select(0, ix) for k, v in d.items()}


def _point_metrics(model, raw: dict, targets: dict, validate: bool = True) -> tuple[dict[str, float], dict]:
    stats = model.stats(raw, targets)
    m = model.metrics(stats)
    for o, r, t in _labelled(model, raw, targets):
        m.update(ece(o, r, t, calibrated=True, ctx=_ctx(model, o), validate=validate))
    return {k: v for k, v in m.items() if isinstance(v, float)}, stats


def _accuracy_counts(model, stats: dict) -> dict[str, tuple[float, float]]:
    """``{"<x>.accuracy": (correct, n)}`` for every accuracy that is a proportion of labelled rows."""
    out: dict[str, tuple[float, float]] = {}
    for o in model.outputs:
        s = stats.get(o.name)
        if not s or "correct" not in s:
            continue
        n = float(s["n"])
        if isinstance(o, Binary):
            for label, c in zip(o.labels, s["correct"].tolist()):
                out[f"{label}.accuracy"] = (float(c), n)
        else:
            out[f"{o.name}.accuracy"] = (float(s["correct"]), n)
    return out


def group_report(model, table: pd.DataFrame, raw: dict, targets: dict, by: list[str], n_boot: int = 1000,
                 min_group: int = 30, seed: int = 0, rows: np.ndarray | None = None) -> dict:
    """Every metric and the ECE of each group of each key in ``by`` (see the module docstring).

    ``raw``/``targets``: the model's raw outputs and the targets (``core.engine`` names: target column ->
    tensor), one row per evaluated row; ``rows``: their positions in ``table`` (default: all rows, in
    order). Returns ``{"by", "ci", "bootstrap", "min_group", "groups": {key: {group: {"n", "metrics": {metric:
    {"value", "lo", "hi", "n"}}}}}, "gaps": {key: {metric: {"gap", "max_group", "max", "min_group", "min"}}},
    "missing": {key: rows without the label}}``."""
    if rows is None:
        rows = np.arange(len(table))
    n_rows = {len(v) for v in list(raw.values()) + list(targets.values())}
    if n_rows != {len(rows)}:
        raise GroupError(f"raw outputs and targets have {sorted(n_rows)} rows, the table positions {len(rows)}")
    by = [k.strip() for k in by if k.strip()]
    if not by:
        raise GroupError("--by needs at least one key")
    values = {k: group_values(table, model, k) for k in by}  # every key checked before any work
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small tensors: a thread pool costs ~100x here on a busy machine
    try:
        return _group_report(model, table, raw, targets, by, values, rows, n_boot, min_group, seed)
    finally:
        torch.set_num_threads(threads)


def _group_report(model, table, raw, targets, by, values, rows, n_boot, min_group, seed) -> dict:
    rng = np.random.default_rng(seed)
    report: dict = {"by": by, "bootstrap": int(n_boot), "min_group": int(min_group), "groups": {}, "gaps": {},
                    "missing": {},
                    "ci": "95 %: Wilson score interval for accuracies; bias-corrected percentile bootstrap of the "
                          f"group's rows ({int(n_boot)} resamples, seed {seed}) for every other metric"}
    for key in by:
        names = [values[key][int(r)] for r in rows]
        report["missing"][key] = sum(v is None for v in names)
        groups: dict[str, dict] = {}
        for g in sorted({v for v in names if v is not None}, key=_group_order):
            idx = np.array([i for i, v in enumerate(names) if v == g])
            r, t = _subset(raw, idx), _subset(targets, idx)
            point, stats = _point_metrics(model, r, t)
            counts = _accuracy_counts(model, stats)
            boot: dict[str, list[float]] = {k: [] for k in point if k not in counts}
            if boot and n_boot > 0:
                for _ in range(int(n_boot)):
                    sample = idx[rng.integers(0, len(idx), len(idx))]
                    m, _ = _point_metrics(model, _subset(raw, sample), _subset(targets, sample), validate=False)
                    for k in boot:
                        boot[k].append(m.get(k, float("nan")))
            metrics = {}
            for k, v in sorted(point.items()):
                if k in counts:
                    c, n = counts[k]
                    lo, hi = wilson(c, n)
                else:
                    lo, hi = bootstrap_interval(v, boot.get(k, []))
                    n = float(len(idx))
                metrics[k] = {"value": v, "lo": lo, "hi": hi, "n": int(n)}
            groups[g] = {"n": int(len(idx)), "metrics": metrics}
        report["groups"][key] = groups
        report["gaps"][key] = largest_gaps(groups, min_group)
    return report


def _group_order(name: str):
    for i, (g, _, _) in enumerate(AGE_GROUPS):
        if name == g:
            return (0, i, "")
    return (1, 0, name)


def largest_gaps(groups: dict[str, dict], min_group: int = 1) -> dict[str, dict]:
    """For each metric: the largest value minus the smallest over the groups with ``n >= min_group``."""
    gaps: dict[str, dict] = {}
    metrics = sorted({k for g in groups.values() for k in g["metrics"]})
    for k in metrics:
        vals = [(g, d["metrics"][k]["value"]) for g, d in groups.items()
                if d["n"] >= min_group and k in d["metrics"] and math.isfinite(d["metrics"][k]["value"])]
        if len(vals) < 2:
            continue
        (gmax, vmax), (gmin, vmin) = max(vals, key=lambda x: x[1]), min(vals, key=lambda x: x[1])
        gaps[k] = {"gap": vmax - vmin, "max_group": gmax, "max": vmax, "min_group": gmin, "min": vmin}
    return gaps


def format_groups(report: dict) -> list[str]:
    lines = []
    for key in report["by"]:
        groups = report["groups"][key]
        missing = report["missing"][key]
        lines.append(f"by {key}: {len(groups)} groups" + (f", {missing} rows without the label" if missing else ""))
        metrics = sorted({k for g in groups.values() for k in g["metrics"]})
        for k in metrics:
            cells = []
            for g, d in groups.items():
                m = d["metrics"].get(k)
                if m is not None:
                    cells.append(f"{g} {m['value']:.4f} [{m['lo']:.4f}, {m['hi']:.4f}] n={m['n']}")
            gap = report["gaps"][key].get(k)
            gap_s = f"  | gap {gap['gap']:.4f} ({gap['max_group']} - {gap['min_group']})" if gap else ""
            lines.append(f"  {k}: " + "; ".join(cells) + gap_s)
    return lines


# --- reliability diagram -------------------------------------------------------------------------------
def reliability_png(model, raw: dict, targets: dict, title: str = "") -> bytes:
    """A reliability diagram per labelled categorical / binary output (binary: all attributes pooled):
    accuracy against confidence per bin, uncalibrated and (when the model has temperatures) calibrated,
    with the bins' share of rows below. Matplotlib's object API (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    items = list(_labelled(model, raw, targets))
    if not items:
        raise CalibrationError("no categorical or binary output with labels to draw")
    fig = Figure(figsize=(4.2 * len(items), 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(items), squeeze=False, height_ratios=(3, 1), sharex="col")
    for col, (o, r, t) in enumerate(items):
        ax, hist = axes[0][col], axes[1][col]
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
        variants = [("uncalibrated", False, "tab:red")] + ([("calibrated", True, "tab:blue")] if o.calibrated else [])
        for name, cal, colour in variants:
            b = reliability_bins(o, r, t, calibrated=cal, ctx=_ctx(model, o))
            e = ece(o, r, t, calibrated=cal, ctx=_ctx(model, o))
            e_v = e.get(f"{o.name}.ece", e.get(f"{o.name}.mean_ece", next(iter(e.values()), float("nan"))))
            conf, acc, cnt = (np.array(b[k], dtype=float) for k in ("confidence", "accuracy", "count"))
            ok = cnt > 0
            ax.plot(conf[ok], acc[ok], marker="o", color=colour, label=f"{name} (ECE {e_v:.3f})")
            centres = (np.array(b["edges"][:-1]) + np.array(b["edges"][1:])) / 2
            hist.bar(centres, cnt / max(cnt.sum(), 1), width=1 / len(cnt), alpha=0.5, color=colour,
                     edgecolor="white")
        kind = "top-label confidence" if isinstance(o, Categorical) else "P(positive), all attributes"
        ax.set(title=f"{o.name}", ylabel="accuracy" if isinstance(o, Categorical) else "fraction positive",
               xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=8)
        hist.set(xlabel=kind, ylabel="share of rows", xlim=(0, 1))
    if title:
        fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


# --- the command ---------------------------------------------------------------------------------------
def _split(ds, name: str, p) -> pd.DataFrame:
    table = ds.table if name == "all" else ds.split(name)
    if len(table) == 0 and name == "test":
        table = ds.split("val")
        print("no test rows: evaluating on the validation split", file=sys.stderr)
    if len(table) == 0:
        p.error(f"no rows in split {name!r}")
    return table


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint path or s3:// URI")
    p.add_argument("--data", required=True, help="FORMAT:PATH, e.g. celeba:../shared/data/celeba")
    p.add_argument("--split", default="test", help="train, val, test or all (default test; val if no test rows)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the split when the data has none")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    p.add_argument("--json", default=None, help="write the metrics as a flat JSON object here (path or s3://)")
    c = p.add_argument_group("calibration (models/calibration.py)")
    c.add_argument("--calibrate-on", default=None, metavar="SPLIT",
                   help="fit temperatures on this split (e.g. val) before evaluating; replaces the checkpoint's")
    c.add_argument("--calibrate-limit", type=positive(int), default=None, help="fit on at most this many images")
    c.add_argument("--save-calibrated", default=None, metavar="URI", help="write the calibrated checkpoint here")
    c.add_argument("--reliability", default=None, metavar="OUT.png", help="write a reliability diagram (PNG) here")
    g = p.add_argument_group("groups")
    g.add_argument("--by", default=None, help="comma-separated keys, e.g. gender,race,age_group (or an attribute: Male)")
    g.add_argument("--groups-json", default=None, help="write the per-group report here (path or s3://)")
    g.add_argument("--min-group", type=int, default=30, help="groups smaller than this are left out of the gaps")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for non-accuracy CIs (0: none)")
    add_face_args(p, default_mode="whole")
    args = p.parse_args(argv)
    if args.save_calibrated and not args.calibrate_on:
        p.error("--save-calibrated needs --calibrate-on SPLIT")

    try:
        model, info = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        p.error(str(e))
    ds = read_dataset(args.data, seed=args.seed)
    table = _split(ds, args.split, p)
    if args.limit:
        table = table.iloc[: args.limit]
    by = [k.strip() for k in args.by.split(",") if k.strip()] if args.by else []
    for key in by:  # a bad key fails now, before the model runs
        try:
            group_values(table.iloc[:1], model, key)
        except GroupError as e:
            p.error(str(e))
    decode_fn = None
    if args.faces == "detect":
        from faces.finder import FaceFinder, FaceOptions, decode_face

        finder = FaceFinder(FaceOptions.from_dict(face_options(args)))
        decode_fn = lambda data, pre: decode_face(data, pre, finder)  # noqa: E731

    fitted = None
    if args.calibrate_on:
        if args.calibrate_on == args.split:
            print(f"warning: calibrating and evaluating on the same split ({args.split}): in-sample figures",
                  file=sys.stderr)
        cal_table = _split(ds, args.calibrate_on, p)
        if args.calibrate_limit:
            cal_table = cal_table.iloc[: args.calibrate_limit]
        cal_ev = run_model(model, cal_table, args.batch_size, decode_fn=decode_fn)
        model.outputs.clear_calibration()
        try:
            fitted = fit_calibration(model, {o.name: (cal_ev.raw[o.name], cal_ev.targets[o.target_column])
                                             for o in model.outputs.calibratable()
                                             if o.name in cal_ev.raw and o.target_column in cal_ev.targets})
        except CalibrationError as e:
            p.error(str(e))
        for name, f in fitted.outputs.items():
            ts = ", ".join(f"{t:.3f}" for t in f.temperatures[:5]) + (" ..." if len(f.temperatures) > 5 else "")
            print(f"fitted {name} on {args.calibrate_on} ({f.n} rows): T = {ts}; NLL {f.nll_before:.4f} -> "
                  f"{f.nll_after:.4f}, ECE {f.ece_before:.4f} -> {f.ece_after:.4f}")
        if args.save_calibrated:
            data, digest = checkpoint_bytes(model, info.metrics, {**info.extra, "calibration": {
                "split": args.calibrate_on, "data": args.data, "fit": fitted.summary()}})
            storage.write_bytes(args.save_calibrated, data)
            print(f"calibrated checkpoint {args.save_calibrated} {digest}")

    ev = run_model(model, table, args.batch_size, decode_fn=decode_fn)
    metrics = metrics_from(model, ev)
    if decode_fn is not None:
        metrics["images_without_face"] = float(len(table) - metrics["n_images"])
    status = calibration_status(model)
    eces = calibration_errors(model, ev.raw, ev.targets)
    refit = f" + temperatures fitted on {args.calibrate_on}" if fitted is not None else ""
    print(f"model {info.model}  checkpoint {info.short_hash()}{refit}  data {args.data}  split {args.split}  "
          f"images {int(metrics['n_images'])}")
    width = max(len(k) for k in list(metrics) + list(eces))
    for k in sorted(metrics):
        print(f"  {k:<{width}}  {metrics[k]:.4f}")
    print(f"calibrated: {str(status['calibrated']).lower()}"
          + ("" if status["calibrated"] else "  (no temperatures in this checkpoint: probabilities are the raw "
                                             "softmax / sigmoid)"))
    for k in sorted(eces):
        print(f"  {k:<{width}}  {eces[k]:.4f}")
    if args.json:
        doc = {**metrics, **eces, "calibrated": float(status["calibrated"])}
        storage.write_bytes(args.json, json.dumps(doc, indent=2, sort_keys=True).encode())
    if args.reliability:
        storage.write_bytes(args.reliability, reliability_png(
            model, ev.raw, ev.targets, title=f"{info.model} {info.short_hash()} on {args.data} ({args.split})"))
        print(f"reliability diagram {args.reliability}")
    if by:
        report = group_report(model, table, ev.raw, ev.targets, by, n_boot=args.bootstrap,
                              min_group=args.min_group, seed=args.seed, rows=ev.rows)
        for line in format_groups(report):
            print(line)
        if args.groups_json:
            storage.write_bytes(args.groups_json, json.dumps(_json_safe(report), indent=2).encode())
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
