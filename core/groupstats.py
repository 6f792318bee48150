"""The figures behind ``jobs.evaluate --by`` (core/evaluation.py ``group_report``): every metric of one group of
rows, the labelled rows behind each metric, and the largest gap of each metric between the groups.

A group counts its rows, but a metric counts the rows that have its label: a group of 100 faces of which 2
have an eyeglasses label has an eyeglasses accuracy of 2 rows. :func:`labelled_counts` gives each metric its
own count, and :func:`largest_gaps` compares only the groups whose count for that metric reaches
``min_group`` (``--min-group``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from models.outputs import Binary
from models.reliability import ece


def output_ctx(model, o) -> dict:
    """The column context of output ``o`` (``model.column_context()``: DMM-CNN's thresholds), ``{}`` if none."""
    sub = model.column_context().get(o.name)
    return sub if isinstance(sub, dict) else {}


def labelled_outputs(model, raw: dict, targets: dict):
    """(output, raw, target) of every output with probabilities whose labels the data has."""
    for o in model.outputs.calibratable():
        if o.name in raw and o.target_column in targets:
            yield o, raw[o.name], targets[o.target_column]


def subset_rows(d: dict[str, torch.Tensor], idx: np.ndarray) -> dict[str, torch.Tensor]:
    ix = torch.as_tensor(idx, dtype=torch.long)
    return {k: v.index_select(0, ix) for k, v in d.items()}


def point_metrics(model, raw: dict, targets: dict, validate: bool = True) -> tuple[dict[str, float], dict]:
    """Every metric (and the calibrated ECE) of these rows, and the statistics they come from."""
    stats = model.stats(raw, targets)
    m = model.metrics(stats)
    for o, r, t in labelled_outputs(model, raw, targets):
        m.update(ece(o, r, t, calibrated=True, ctx=output_ctx(model, o), validate=validate))
    return {k: v for k, v in m.items() if isinstance(v, float)}, stats


def accuracy_counts(model, stats: dict) -> dict[str, tuple[float, float]]:
    """``{"<x>.accuracy": (correct, n)}`` for every accuracy that is a proportion of labelled rows."""
    out: dict[str, tuple[float, float]] = {}
    for o in model.outputs:
        s = stats.get(o.name)
        if not s or "correct" not in s:
            continue
        if isinstance(o, Binary):  # each attribute over the rows that have it
            for label, c, n in zip(o.labels, s["correct"].tolist(), s["n_label"].tolist()):
                if n > 0:
                    out[f"{label}.accuracy"] = (float(c), float(n))
        else:
            out[f"{o.name}.accuracy"] = (float(s["correct"]), float(s["n"]))
    return out


def labelled_counts(model, stats: dict, metrics) -> dict[str, int]:
    """The labelled rows behind each of ``metrics`` (names as ``point_metrics`` gives them), from the rows'
    ``stats``: an output's metrics (``gender.accuracy``, ``age.mae``, ``race.ece``) count the rows with its
    label, a binary attribute's (``Eyeglasses.accuracy``, ``Eyeglasses.ece``) the rows with that attribute;
    a mean over several (a binary group's ``.mean_accuracy``, ``.mean_ece``, ``.loss``; ``mean_accuracy``)
    the fewest behind any of its parts. A metric this cannot place is left out (its group's rows count)."""
    behind: dict[str, float] = {}
    for o in model.outputs:
        s = stats.get(o.name)
        if not s or "n" not in s:
            continue
        if isinstance(o, Binary):
            per = [float(v) for v in s["n_label"].reshape(-1).tolist()]
            for label, n in zip(o.labels, per):
                behind.setdefault(label, n)
            behind.setdefault(o.name, min((n for n in per if n > 0), default=0.0))
        else:
            behind.setdefault(o.name, float(s["n"]))
    out = {k: int(behind[k.rsplit(".", 1)[0]]) for k in metrics if k.rsplit(".", 1)[0] in behind}
    parts = [n for k, n in out.items() if k.endswith(".accuracy")]  # what mean_accuracy averages
    if "mean_accuracy" in metrics and parts:
        out["mean_accuracy"] = min(parts)
    return out


def largest_gaps(groups: dict[str, dict], min_group: int = 1) -> dict[str, dict]:
    """For each metric: the largest value minus the smallest over the groups whose metric has ``n >= min_group``
    labelled rows (the metric's own ``n``, not the group's: a group of 100 rows with 2 eyeglasses labels has
    no eyeglasses figure to compare at ``min_group`` 30)."""
    gaps: dict[str, dict] = {}
    metrics = sorted({k for g in groups.values() for k in g["metrics"]})
    for k in metrics:
        vals = [(g, d["metrics"][k]["value"]) for g, d in groups.items()
                if k in d["metrics"] and d["metrics"][k]["n"] >= min_group and math.isfinite(d["metrics"][k]["value"])]
        if len(vals) < 2:
            continue
        (gmax, vmax), (gmin, vmin) = max(vals, key=lambda x: x[1]), min(vals, key=lambda x: x[1])
        gaps[k] = {"gap": vmax - vmin, "max_group": gmax, "max": vmax, "min_group": gmin, "min": vmin}
    return gaps
