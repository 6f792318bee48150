"""The report's charts (core/report.py): PNG bytes from matplotlib's object API (``Figure`` and
``FigureCanvasAgg``; never pyplot, whose global state is not safe in a server or a test run).

Every function takes what the streaming scan kept (counts, :class:`core.report_scan.Hist` bins), never the
rows, and draws several small panels into one figure, so that a report holds a dozen images, not hundreds.
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.ticker import MaxNLocator

MAX_CLASSES = 25  # bars per categorical panel; the rest are summed into one bar
COLOUR = "#3b6ea5"
FLAG = "#c0504d"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig, dpi: int = 90) -> bytes:
    """The figure as PNG, every text drawn as written: matplotlib reads ``$...$`` as mathtext, and a class,
    column or group named ``$\\frac{$`` (anything an output holds) is a parse error that would end the chart."""
    from matplotlib.text import Text

    for t in fig.findobj(Text):
        t.set_parse_math(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _grid(n: int, cols: int, panel=(3.6, 2.6)):
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig = _figure(panel[0] * cols, panel[1] * rows)
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _short(label: str, n: int = 28) -> str:
    label = str(label)
    return label if len(label) <= n else label[: n - 1] + "…"


def counts_png(panels: list[tuple[str, dict]], cols: int = 3) -> bytes:
    """One horizontal bar chart of counts per ``(title, {class: count})``, largest first."""
    fig, axes = _grid(len(panels), cols)
    for ax, (title, counts) in zip(axes, panels):
        items = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
        if len(items) > MAX_CLASSES:
            rest = sum(c for _, c in items[MAX_CLASSES - 1:])
            items = items[: MAX_CLASSES - 1] + [(f"({len(items) - MAX_CLASSES + 1} more)", rest)]
        labels = [_short(k) for k, _ in items][::-1]
        values = [v for _, v in items][::-1]
        total = max(sum(values), 1)
        ax.barh(range(len(values)), values, color=COLOUR)
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        for i, v in enumerate(values):
            ax.annotate(f" {v} ({100 * v / total:.0f} %)", (v, i), va="center", fontsize=7)
        ax.set_xlim(0, max(values, default=1) * 1.35)
        ax.set_title(f"{_short(title, 80)} (n={sum(values)})", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return png(fig)


def hists_png(panels: list[tuple[str, object, str]], cols: int = 3, colour: str = COLOUR) -> bytes:
    """One histogram per ``(title, Hist, x label[, thresholds])``, its count and mean in the title, the
    values outside a fixed range (drawn in the end bins) or NaN in the corner, and each threshold (the
    review setting that flags the faces on one side of it) as a dashed line."""
    fig, axes = _grid(len(panels), cols)
    for ax, (title, h, xlabel, *rest) in zip(axes, panels):
        edges = h.edges
        ax.bar(edges[:-1], h.counts, width=np.diff(edges), align="edge", color=colour, edgecolor="white",
               linewidth=0.3)
        mean = f", mean {h.mean:.3g}" if h.n else ""
        ax.set_title(f"{_short(title, 80)} (n={h.n}{mean})", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_xlim(edges[0], edges[-1])
        ax.tick_params(labelsize=7)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        for t in (rest[0] if rest else ()):
            ax.axvline(t, color=FLAG, linestyle="--", linewidth=1)
        notes = [f"{h.outside} outside, in the end bins"] if h.outside else []
        notes += [f"{h.nan} NaN"] if h.nan else []
        if notes:
            ax.text(0.99, 0.97, "; ".join(notes), transform=ax.transAxes, ha="right", va="top", fontsize=7,
                    color=FLAG)
    return png(fig)


def shares_png(title: str, shares: list[tuple[str, float, int]]) -> bytes:
    """Binary attributes: one horizontal bar per ``(attribute, share true, n)``, in the given order."""
    fig = _figure(7.5, 0.9 + 0.22 * len(shares))
    ax = fig.subplots()
    labels = [_short(a, 40) for a, _, _ in shares][::-1]
    values = [v for _, v, _ in shares][::-1]
    ax.barh(range(len(values)), values, color=COLOUR)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    for i, v in enumerate(values):
        ax.annotate(f" {100 * v:.1f} %", (v, i), va="center", fontsize=6)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("share of faces labelled true", fontsize=8)
    n = max((k for _, _, k in shares), default=0)
    ax.set_title(f"{_short(title, 100)} (n={n})", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    return png(fig)


def confusion_png(panels: list[tuple[str, list[str], np.ndarray]], cols: int = 3) -> bytes:
    """One confusion matrix per ``(output, classes, counts[true, predicted])``: cells coloured by the share
    of their true class (row), written as count and share."""
    fig, axes = _grid(len(panels), cols, panel=(3.8, 3.4))
    for ax, (title, classes, m) in zip(axes, panels):
        m = np.asarray(m, dtype=float)
        share = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        k = len(classes)
        ax.set_xticks(range(k), [_short(c, 12) for c in classes], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(k), [_short(c, 12) for c in classes], fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        if k <= 12:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{int(m[i, j])}\n{100 * share[i, j]:.0f}%", ha="center", va="center",
                            fontsize=6, color="white" if share[i, j] > 0.6 else "black")
        acc = np.trace(m) / max(m.sum(), 1)
        ax.set_title(f"{title} (n={int(m.sum())}, accuracy {acc:.3f})", fontsize=9)
    return png(fig)


def groups_png(key: str, metrics: list[str], groups: dict, cols: int = 3) -> bytes:
    """Per-group bars of each metric with its 95 % interval, for one ``--by`` key (``group_report``'s
    ``groups[key]``); the group's row count under its name."""
    fig, axes = _grid(len(metrics), cols, panel=(3.8, 2.8))
    names = list(groups)
    for ax, metric in zip(axes, metrics):
        vals, lo, hi = [], [], []
        for g in names:
            d = groups[g]["metrics"].get(metric, {})
            v = d.get("value", math.nan)
            vals.append(v)
            lo.append(v - d.get("lo", v) if math.isfinite(d.get("lo", math.nan)) else 0)
            hi.append(d.get("hi", v) - v if math.isfinite(d.get("hi", math.nan)) else 0)
        x = np.arange(len(names))
        ax.bar(x, vals, color=COLOUR, yerr=[lo, hi], capsize=3, error_kw={"linewidth": 0.8})
        ax.set_xticks(x, [f"{_short(g, 12)}\nn={groups[g]['n']}" for g in names], fontsize=7)
        ax.set_title(f"{metric} by {key}", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    return png(fig)
