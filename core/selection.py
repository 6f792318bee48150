"""Which validation metric picks a run's best epoch (:class:`Selection`, :func:`choose_selection`), and the
counters that follow it from epoch to epoch: the best so far and the epochs since, which early stopping reads
(:class:`BestEpoch`). Both training loops judge their epochs with these: ``core.engine.fit`` in one process and
the Ray Train worker (raytasks/train/worker.py), which saves the counters in every checkpoint and resumes them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Selection:
    """The validation metric that picks the best checkpoint and counts the epochs without improvement for early
    stopping: the model's ``primary_metric``, unless the data cannot measure it (:func:`choose_selection`)."""

    metric: str
    mode: str  # "max" or "min"
    model_metric: str = ""  # the model's own primary metric ("" : the same as ``metric``)
    reason: str = ""  # why ``metric`` replaced ``model_metric``; "" when it did not

    @classmethod
    def of_model(cls, model) -> Selection:
        core = getattr(model, "module", model)
        return cls(core.primary_metric, core.primary_mode, core.primary_metric)

    @classmethod
    def from_dict(cls, d: dict) -> Selection:
        sel = cls(**d)
        if sel.mode not in ("max", "min") or not sel.metric:
            raise ValueError(f"a selection metric needs a name and mode max or min, got {d}")
        return sel

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def value(self, metrics: dict) -> float:
        """The epoch's value of the metric; NaN (never the best: :meth:`is_better`; scored -inf) when it was not
        measured or the epoch diverged. A train loss that is not finite means NaN weights, and NaN logits still
        read as class 0 and every binary attribute as negative, close to the majority answers: such an epoch's
        accuracies can beat a sane epoch's (an audit: dmm_cnn's mean accuracy 0.7688 diverged against 0.6813)."""
        loss = metrics.get("train_loss")
        if isinstance(loss, (int, float, np.floating, np.integer)) and not math.isfinite(float(loss)):
            return float("nan")
        v = metrics.get(self.metric, float("nan"))
        return float(v) if isinstance(v, (int, float, np.floating, np.integer)) else float("nan")

    def is_better(self, new: float, best: float | None) -> bool:
        # A value that is not finite (NaN: not measured this epoch, or the model diverged) is never an improvement
        # and never becomes the best: it is refused here by name, not left to ``nan > best`` being False.
        if not math.isfinite(new):
            return False
        if best is None or not math.isfinite(best):
            return True
        return new > best if self.mode == "max" else new < best

    def score(self, value: float) -> float:
        """What Ray ranks checkpoints by (always "max"): the value, negated when lower is better; -inf when it
        could not be computed."""
        if not math.isfinite(value):
            return float("-inf")
        return value if self.mode == "max" else -value

    def line(self) -> str:
        said = f"best checkpoint and early stopping: {self.metric} ({self.mode})"
        return f"{said}, not {self.model_metric}: {self.reason}" if self.reason else said


def _metric_columns(core, metric: str) -> list[str] | None:
    """The label columns ``metric`` is computed from (any one of them labelled is enough); None for a metric
    this does not know, which is then kept as it is."""
    from models.outputs import Binary, Categorical

    if metric == "val_loss":
        return [o.target_column for o in core.outputs]
    if metric == "mean_accuracy":  # models/outputset.py: the mean of every "<x>.accuracy"
        return [o.target_column for o in core.outputs if isinstance(o, (Categorical, Binary))]
    head = metric.rsplit(".", 1)[0]  # beauty.pearson, attributes.mean_accuracy, Smiling.accuracy
    for o in core.outputs:
        if head == o.name or (isinstance(o, Binary) and head in o.labels):
            return [o.target_column]
    return None


def _labelled(table: pd.DataFrame, column: str) -> bool:
    from facedata.datasets.base import missing

    return column in table.columns and bool(table[column].map(lambda v: not missing(v)).any())


def choose_selection(model, table: pd.DataFrame) -> Selection:
    """The metric that picks the best epoch of ``model`` validated on ``table`` (the validation split).

    The rule: the model's ``primary_metric`` when ``table`` has a value of a label column it is computed from.
    Otherwise (hmtnet's ``beauty.pearson`` on UTKFace, which has no beauty: NaN every epoch, so that no epoch
    would ever be the best and patience would stop the run) ``mean_accuracy`` (max) when a classification
    output (categorical or binary) has labels in ``table``, else ``val_loss`` (min), which every labelled output
    adds to. We chose mean_accuracy first because it is the zoo's default primary metric and, unlike the
    loss, weighs the tasks alike whatever their loss scales. Raises ``ValueError`` when ``table`` labels none
    of the model's outputs: nothing could then pick an epoch."""
    core = getattr(model, "module", model)
    own = Selection.of_model(core)
    columns = _metric_columns(core, own.metric)
    if columns is None or any(_labelled(table, c) for c in columns):
        return own
    labelled = sorted({c for c in _metric_columns(core, "val_loss") if _labelled(table, c)})
    if not labelled:
        raise ValueError(f"the validation split has no value of any label {core.name} learns from "
                         f"({', '.join(sorted(set(_metric_columns(core, 'val_loss'))))}): no metric can pick "
                         f"its best epoch")
    reason = (f"the validation split has no {', '.join(sorted(set(columns)))} label to compute it from "
              f"(it labels {', '.join(labelled)})")
    if any(_labelled(table, c) for c in _metric_columns(core, "mean_accuracy")):
        return Selection("mean_accuracy", "max", own.metric, reason)
    return Selection("val_loss", "min", own.metric, reason)


@dataclass
class BestEpoch:
    """The best epoch so far by ``selection`` and the epochs since it; ``patience`` (the recipe's
    ``early_stopping_patience``; 0 or None: never) of those stop the run."""

    selection: Selection
    patience: int | None
    best: float | None = None  # the selection's value at the best epoch; None before one was measured
    best_epoch: int = 0
    since_best: int = 0

    def judge(self, epoch: int, metrics: dict) -> bool:
        """Count the epoch whose row is ``metrics`` and add its ``score`` (what Ray ranks checkpoints by) to it;
        True when the run stops after it."""
        value = self.selection.value(metrics)
        if self.selection.is_better(value, self.best):
            self.best, self.best_epoch, self.since_best = value, epoch, 0
        else:
            self.since_best += 1
        metrics["score"] = self.selection.score(value)
        return bool(self.patience and self.since_best >= self.patience)

    def stop_line(self) -> str:
        said = f"best {self.best:.4f} at epoch {self.best_epoch}" if self.best is not None else "never measured"
        return f"early stopping: no improvement of {self.selection.metric} for {self.since_best} epochs ({said})"
