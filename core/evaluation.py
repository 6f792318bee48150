"""Evaluating a model on labelled faces: its raw outputs over a table, each paper's metrics, the calibration
error, the reliability diagram, and every metric per group of people with confidence intervals.

``jobs.evaluate`` is the command line around it (its docstring says what each figure is). Faces are read
whole or through the same detector and alignment as label and serve (``faces.finder.decode_face``); a row
that names its face (a manifest's face_box / face_points) as training reads it (core/evalinputs.py). The
metrics of one group, the labelled rows behind each and the largest gaps are computed in core/groupstats.py.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from core.batches import concat_batches, load_batch, to_tensors
from core.engine import validation_loss
from core.evalinputs import face_parts
from core.groupstats import (
    accuracy_counts,
    labelled_counts,
    labelled_outputs,
    largest_gaps,
    output_ctx,
    point_metrics,
    subset_rows,
)
from facedata.datasets.base import missing
from models.outputs import Binary, Categorical
from models.outputset import add_stats
from models.photo import DEFAULT_PHOTO_SIDE
from models.reliability import CalibrationError, ece, reliability_bins

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


def _batches_with_rows(table: pd.DataFrame, model, batch_size: int, decode_fn=None, max_side: int = DEFAULT_PHOTO_SIDE):
    """``core.batches.load_batch`` over the table in order, with the table positions of the rows kept (a row
    whose image cannot be decoded is dropped there; the chunk is then reloaded row by row to know which). Rows
    with a resolved face (``core.evalinputs.NamedFaces``) are aligned with it, the others read by ``decode_fn``."""
    for start in range(0, len(table), batch_size):
        whole = table.iloc[start:start + batch_size]
        for chunk, pos in face_parts(whole, np.arange(start, start + len(whole))):
            b = load_batch(chunk, model, decode_fn=decode_fn, max_side=max_side)
            if len(b["image"]) == len(chunk):
                yield b, pos
                continue
            parts, rows = [], []
            for i in range(len(chunk)):
                bi = load_batch(chunk.iloc[i:i + 1], model, decode_fn=decode_fn, max_side=max_side)
                if len(bi["image"]):
                    parts.append(bi)
                    rows.append(pos[i])
            if parts:
                yield functools.reduce(concat_batches, parts), np.array(rows)


@torch.no_grad()
def run_model(model, table: pd.DataFrame, batch_size: int = 64, device: str = "cpu", decode_fn=None,
              max_side: int = DEFAULT_PHOTO_SIDE) -> Evaluated:
    dev = torch.device(device)
    model.to(dev).eval()
    raws: dict[str, list] = {}
    tgts: dict[str, list] = {}
    rows: list[np.ndarray] = []
    stats = None
    for batch, pos in _batches_with_rows(table, model, batch_size, decode_fn, max_side):
        images, targets = to_tensors(batch, dev)
        raw = {k: v.float() for k, v in model.infer(model.prepare(images)).items()}
        stats = add_stats(stats, model.stats(raw, targets))
        for k, v in raw.items():
            raws.setdefault(k, []).append(v.detach().cpu())
        for k, v in targets.items():
            tgts.setdefault(k, []).append(v.detach().cpu())
        rows.append(pos)
    at = np.concatenate(rows) if rows else np.zeros(0, dtype=int)
    order = torch.as_tensor(np.argsort(at, kind="stable"))  # table order (a chunk's two parts come one by one)
    return Evaluated({k: torch.cat(v)[order] for k, v in raws.items()}, {k: torch.cat(v)[order] for k, v in tgts.items()},
                     at[order.numpy()], stats or {})


def calibration_pairs(model, ev: Evaluated) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{output: (raw, targets)}`` of every calibratable output (probabilities, regression scores) with labels
    in ``ev``: what ``models.calibration.fit_calibration`` fits on (``run_model`` over the validation table
    gives ``ev``)."""
    return {o.name: (ev.raw[o.name], ev.targets[o.target_column])
            for o in model.outputs.calibratable() + model.outputs.shiftable()
            if o.name in ev.raw and o.target_column in ev.targets}


def metrics_from(model, ev: Evaluated) -> dict[str, float]:
    """What ``core.engine.evaluate_table`` returns, from the same statistics."""
    metrics = model.metrics(ev.stats)
    metrics["val_loss"] = validation_loss(model, metrics)
    metrics["n_images"] = float(max((float(s["n"]) for s in ev.stats.values()), default=0.0))
    return metrics


def calibration_errors(model, raw: dict, targets: dict, validate: bool = True) -> dict[str, float]:
    """``<name>.ece_uncalibrated`` for every labelled categorical output and binary attribute (and
    ``<group>.mean_ece_uncalibrated``), plus ``..._calibrated`` for the outputs that carry temperatures."""
    out: dict[str, float] = {}
    for o, r, t in labelled_outputs(model, raw, targets):
        for k, v in ece(o, r, t, calibrated=False, ctx=output_ctx(model, o), validate=validate).items():
            out[f"{k}_uncalibrated"] = v
        if o.calibrated:
            for k, v in ece(o, r, t, calibrated=True, ctx=output_ctx(model, o), validate=validate).items():
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
            if missing(v):
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


def group_report(model, table: pd.DataFrame, raw: dict, targets: dict, by: list[str], n_boot: int = 1000,
                 min_group: int = 30, seed: int = 0, rows: np.ndarray | None = None) -> dict:
    """Every metric and the ECE of each group of each key in ``by`` (see the module docstring).

    ``raw``/``targets``: the model's raw outputs and the targets (``core.engine`` names: target column ->
    tensor), one row per evaluated row; ``rows``: their positions in ``table`` (default: all rows, in
    order). Returns ``{"by", "ci", "bootstrap", "min_group", "groups": {key: {group: {"n", "metrics": {metric:
    {"value", "lo", "hi", "n"}}}}}, "gaps": {key: {metric: {"gap", "max_group", "max", "min_group", "min"}}},
    "missing": {key: rows without the label}}``. A group's ``n`` counts its rows, a metric's ``n`` the rows
    with that metric's label (core/groupstats.py ``labelled_counts``); a metric's gap compares the groups
    whose metric has ``n >= min_group``."""
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
            r, t = subset_rows(raw, idx), subset_rows(targets, idx)
            point, stats = point_metrics(model, r, t)
            counts = accuracy_counts(model, stats)
            behind = labelled_counts(model, stats, point)  # each metric's labelled rows: what --min-group reads
            boot: dict[str, list[float]] = {k: [] for k in point if k not in counts}
            if boot and n_boot > 0:
                for _ in range(int(n_boot)):
                    sample = idx[rng.integers(0, len(idx), len(idx))]
                    m, _ = point_metrics(model, subset_rows(raw, sample), subset_rows(targets, sample), validate=False)
                    for k in boot:
                        boot[k].append(m.get(k, float("nan")))
            metrics = {}
            for k, v in sorted(point.items()):
                if k in counts:
                    c, n = counts[k]
                    lo, hi = wilson(c, n)
                else:
                    lo, hi = bootstrap_interval(v, boot.get(k, []))
                    n = behind.get(k, len(idx))
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

    items = list(labelled_outputs(model, raw, targets))
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
            b = reliability_bins(o, r, t, calibrated=cal, ctx=output_ctx(model, o))
            e = ece(o, r, t, calibrated=cal, ctx=output_ctx(model, o))
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
