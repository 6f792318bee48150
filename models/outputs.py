"""One description of every model output.

Each model declares its outputs once, as a tuple of the ``Output`` subclasses below (the base class is in
models/outputbase.py). Everything else is derived from that declaration:

* the training loss (``Output.loss``), with missing labels (NaN targets) masked out;
* evaluation: summable statistics per batch (``Output.stats``) that can be added across batches and
  all-reduced across Ray Train workers, and the paper's metrics computed from them (``Output.metrics``),
  named ``<output>.<metric>`` (binary groups name each attribute: ``Male.accuracy``);
* what a user reads (``Output.to_columns``): the columns of a Parquet row of the label job and the fields of
  the JSON answer of the serving endpoint, with their Arrow types (``Output.fields``).

Calibration (models/calibration.py): a categorical output or a group of binary attributes may carry fitted
temperatures (``Categorical.temperature``, ``Binary.temperatures``); ``to_columns`` then reports calibrated
probabilities (``<name>_prob``, ``<name>_probs``, ``<label>_prob``) while every decision (the class, the
boolean label) stays the one of the raw outputs. ``to_columns(..., calibrated=False)`` gives the raw
probabilities of an uncalibrated model. The temperatures are buffers of :class:`OutputSet` (an
``nn.Module``, so a model's ``outputs`` travel in its ``state_dict`` and its checkpoint); a model without them
has no extra tensor at all, and its checkpoints are the same bytes as before.

Raw model outputs are a ``dict[name, Tensor]`` with the batch first. Targets come from the dataset's
canonical label columns (``Output.target``, defaulting to the output's name); a missing label is NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa
import torch
import torch.nn.functional as F

from .losses import REGRESSION_LOSSES, regression_loss, scalar_error_metrics, scalar_error_stats, valid_rows
from .outputbase import Output

Tensor = torch.Tensor
_ABOVE_HALF = float(torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)))  # float32: 0.5 + 2**-24


@dataclass(frozen=True)
class Categorical(Output):
    """Softmax over named classes; cross-entropy loss; accuracy. Target: class index.

    ``temperature`` (set by models/calibration.py, None = uncalibrated): the reported probabilities are
    ``softmax(raw / T)``; the class is always ``argmax(raw)``, which a positive T does not change."""

    classes: tuple[str, ...] = ()
    temperature: float | None = None
    kind = "categorical"

    @property
    def calibrated(self) -> bool:
        return self.temperature is not None

    def probabilities(self, raw: Tensor, calibrated: bool = True, **ctx) -> Tensor:
        """(B, K) class probabilities: calibrated when the output has a temperature and ``calibrated``."""
        z = raw.float()
        if calibrated and self.temperature is not None:
            z = z / float(self.temperature)
        return torch.softmax(z, dim=1)

    def loss(self, raw, target, smoothing: float = 0.0):
        """Cross-entropy; with ``smoothing`` ε (training only, ``Recipe.label_smoothing``) against the target
        mixed with the uniform distribution, 1 - ε + ε/K on the class and ε/K elsewhere (Szegedy et al., 2016).
        Validation losses and metrics (:meth:`stats`) are always the plain cross-entropy."""
        return F.cross_entropy(raw.float(), target.long(), label_smoothing=float(smoothing))

    def stats(self, raw, target, **ctx):
        keep = valid_rows(target)
        raw, t = raw[keep].float(), target[keep].long()
        n = len(self.classes)
        pred = raw.argmax(1)
        conf = torch.bincount(t * n + pred, minlength=n * n).reshape(n, n).double()
        loss_sum = F.cross_entropy(raw, t, reduction="sum").double() if len(t) else torch.zeros((), dtype=torch.float64)
        return {"n": torch.tensor(float(len(t)), dtype=torch.float64), "correct": conf.trace(),
                "confusion": conf, "loss_sum": loss_sum}

    def metrics(self, s):
        n = float(s["n"])
        if n == 0:
            return {}
        return {f"{self.name}.accuracy": float(s["correct"]) / n, f"{self.name}.loss": float(s["loss_sum"]) / n}

    def fields(self):
        return [pa.field(self.name, pa.string()), pa.field(f"{self.name}_prob", pa.float32()),
                pa.field(f"{self.name}_probs", pa.list_(pa.float32()))]

    def to_columns(self, raw, geometry=None, calibrated: bool = True, **ctx):
        probs = self.probabilities(raw, calibrated)
        if calibrated and self.temperature is not None:
            idx = raw.float().argmax(1)  # the decision of the raw outputs, whatever rounding does to probs
            conf = probs.gather(1, idx[:, None])[:, 0]
        else:  # the uncalibrated path exactly as before calibration existed
            conf, idx = probs.max(1)
        return {self.name: [self.classes[i] for i in idx.tolist()], f"{self.name}_prob": conf.tolist(),
                f"{self.name}_probs": probs.tolist()}

    def _describe(self):
        d = {"classes": list(self.classes)}
        if self.temperature is not None:
            d["calibration"] = {"method": "temperature", "temperature": float(self.temperature)}
        return d


@dataclass(frozen=True)
class Binary(Output):
    """A group of J binary attributes sharing one raw tensor of shape (B, J).

    ``loss="bce"``: raw values are logits, the probability is ``sigmoid(raw − τ_j)``, targets are 0/1.
    ``loss="mse_pm1"``: DMM-CNN's reading: raw values are scores regressed onto ±1 targets with MSE (Eq. 2),
    the label is ``raw > τ_j`` (Eq. 5) with the model's per-attribute thresholds τ (Eq. 6), passed in
    ``ctx["thresholds"]`` (τ = 0 without them, for either loss). Columns: ``<label>`` (bool) and
    ``<label>_prob`` for every label.

    In every row ``<label> == (<label>_prob > 0.5)``: uncalibrated, :meth:`prob` (0.5 at τ_j); with
    ``temperatures`` (one per label, set by models/calibration.py; None = uncalibrated; NaN for one label =
    that label on :meth:`prob`) ``sigmoid((raw − τ_j) / T_j)``, a Platt scaling whose bias is tied to the
    decision threshold. The label itself (``raw > τ_j``, adaptive thresholds included) never changes.
    """

    labels: tuple[str, ...] = ()
    loss_type: str = "bce"
    temperatures: tuple[float, ...] | None = None
    kind = "binary"

    @property
    def calibrated(self) -> bool:
        return self.temperatures is not None

    def _thresholds(self, raw: Tensor, ctx) -> Tensor:
        t = ctx.get("thresholds")
        if t is None:  # τ = 0: probability 0.5 for logits, the midpoint of ±1 for scores
            t = torch.zeros(raw.shape[1])
        return t.to(raw.device, raw.dtype)

    def positive(self, raw: Tensor, ctx) -> Tensor:
        """Boolean predictions. For bce the threshold is on the logit (0 = probability 0.5)."""
        return raw > self._thresholds(raw, ctx)

    def prob(self, raw: Tensor, thresholds: Tensor | None = None) -> Tensor:
        """The uncalibrated probability of each label, 0.5 at its threshold τ_j (``thresholds`` (J,), None: 0):
        ``sigmoid(raw − τ_j)`` of a logit; a ±1 score mapped piecewise-linearly, [-1, τ_j] onto [0, 0.5] and
        [τ_j, 1] onto [0.5, 1], clipped (past a τ_j beyond ±1: 0 or 1). Why piecewise: the one map
        ``(raw + 1) / 2`` crossed 0.5 at 0, not at an adaptive τ_j (rows said ``Smiling: false,
        Smiling_prob: 0.55``); where τ_j = 0 it is that map still."""
        tau = torch.zeros(raw.shape[1], dtype=raw.dtype, device=raw.device) if thresholds is None \
            else thresholds.to(raw.device, raw.dtype)
        if self.loss_type == "bce":
            return torch.sigmoid(raw - tau)
        lo, hi = tau.clamp(max=-1.0), tau.clamp(min=1.0)
        tiny = torch.finfo(raw.dtype).tiny  # a side of no width (τ_j at or beyond ±1): all of it 0 or 1
        below = 0.5 - 0.5 * ((tau - raw) / (tau - lo).clamp_min(tiny)).clamp(0, 1)  # 0.5 at τ_j, even then
        above = 0.5 + 0.5 * ((raw - tau) / (hi - tau).clamp_min(tiny)).clamp(0, 1)
        return torch.where(raw > tau, above, below)

    def probabilities(self, raw: Tensor, calibrated: bool = True, **ctx) -> Tensor:
        """(B, J) probabilities of the positive class: calibrated when the output has temperatures and
        ``calibrated``, with the thresholds of ``ctx``; above 0.5 exactly where :meth:`positive` (see the class
        docstring)."""
        raw = raw.float()
        tau = self._thresholds(raw, ctx)
        p = self.prob(raw, tau)
        if calibrated and self.temperatures is not None:
            t = torch.tensor(self.temperatures, dtype=raw.dtype, device=raw.device)
            left = torch.isnan(t)  # attributes whose fit was not kept (models/calibration.py): the map above
            p = torch.where(left, p, torch.sigmoid((raw - tau) / t))
        # Both maps cross 0.5 at τ_j, but a score an ulp above τ_j can round to 0.5 (float32 sigmoid, the
        # linear step): the label decides, the next float32 above 0.5, so label == (prob > 0.5) in every row.
        return torch.where(raw > tau, p.clamp(min=_ABOVE_HALF), p.clamp(max=0.5))

    def _per_label_sums(self, raw: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss summed over the rows that have each label, how many rows have it)``, both (J,). A target
        row may have some labels and not others (NaN = missing: GENKI-4K's smile is DMM-CNN's ``Smiling`` with
        the other 39 missing, facedata.datasets ``attributes_from_columns``)."""
        raw, t = raw.float(), target.float()
        have = ~torch.isnan(t)
        pos = (t > 0).float()  # targets may be 0/1 or CelebA's ±1: positive means > 0 in both conventions
        if self.loss_type == "bce":
            each = F.binary_cross_entropy_with_logits(raw, pos, reduction="none")
        else:
            each = (raw - (pos * 2 - 1)) ** 2
        return torch.where(have, each, torch.zeros_like(each)).sum(0), have.sum(0)

    def per_label_loss(self, raw: Tensor, target: Tensor) -> Tensor:
        """Mean loss of each label over the rows of the batch that have it, shape (J,); 0 for a label that no
        row has."""
        total, count = self._per_label_sums(raw, target)
        return total / count.clamp_min(1)

    def loss(self, raw, target, label_weights: Tensor | None = None):
        per = self.per_label_loss(raw, target)
        if label_weights is not None:
            return (per * label_weights.to(per)).sum()
        if self.loss_type == "mse_pm1":
            return per.sum()
        present = (~torch.isnan(target)).any(0)  # the mean over the labels this batch has (all, for CelebA)
        return per.sum() / present.sum().clamp_min(1)

    def masked_loss(self, raw: Tensor, target: Tensor) -> Tensor:
        """Loss over the labels each row has (per label, not per row as for the other outputs)."""
        if not bool((~torch.isnan(target)).any()):
            return raw.sum() * 0.0
        return self.loss(raw, target)

    def stats(self, raw, target, **ctx):
        """Per label: ``n_label`` rows that have it, and ``correct``/``tp``/``fp``/``fn``/``loss_sum`` over them;
        ``n``: rows with at least one label."""
        target = target.float().reshape(len(target), -1)
        rows = (~torch.isnan(target)).any(1)
        raw, target = raw[rows].float(), target[rows]
        have = ~torch.isnan(target)
        truth = target > 0
        pred = self.positive(raw, ctx)
        loss_sum, count = self._per_label_sums(raw, target)
        return {
            "n": rows.sum().double(),
            "n_label": count.double(),
            "correct": (have & (pred == truth)).sum(0).double(),
            "tp": (have & pred & truth).sum(0).double(),
            "fp": (have & pred & ~truth).sum(0).double(),
            "fn": (have & ~pred & truth).sum(0).double(),
            "loss_sum": loss_sum.double(),
        }

    def metrics(self, s):
        n = s["n_label"].double()
        scored = n > 0
        if not bool(scored.any()):
            return {}
        acc = s["correct"].double() / n.clamp_min(1)
        out = {f"{label}.accuracy": float(a) for label, a, k in zip(self.labels, acc, scored) if k}
        if len(self.labels) > 1:
            # over the labels the data has: all 40 for CelebA, Smiling alone for GENKI-4K
            out[f"{self.name}.mean_accuracy"] = float(acc[scored].mean())
        out[f"{self.name}.loss"] = float((s["loss_sum"].double()[scored] / n[scored]).sum())
        return out

    def fields(self):
        fs = []
        for label in self.labels:
            fs += [pa.field(label, pa.bool_()), pa.field(f"{label}_prob", pa.float32())]
        return fs

    def to_columns(self, raw, geometry=None, calibrated: bool = True, **ctx):
        raw = raw.float()
        pos = self.positive(raw, ctx)
        prob = self.probabilities(raw, calibrated, **ctx)
        cols = {}
        for j, label in enumerate(self.labels):
            cols[label] = pos[:, j].tolist()
            cols[f"{label}_prob"] = prob[:, j].tolist()
        return cols

    def _describe(self):
        d = {"labels": list(self.labels), "loss": self.loss_type}
        if self.temperatures is not None:
            d["calibration"] = {"method": "threshold_temperature",  # null: that attribute is not calibrated
                                "temperatures": [None if t != t else float(t) for t in self.temperatures]}
        return d


@dataclass(frozen=True)
class Regression(Output):
    """A scalar score in ``range``; MAE, RMSE and Pearson correlation. ``loss_type`` is one of
    :data:`REGRESSION_LOSSES` (:func:`regression_loss`; ``delta`` for ``smooth_huber`` and ``smooth_l1``).
    The raw output has shape (B,) or (B, 1).

    ``shift`` (set by models/calibration.py on the validation split at export, None = none): a constant added
    to the raw score in the columns and in the metrics (not in the loss: training never sees it). Why:
    HMTNet's beauty score drifted by up to ±0.25 from epoch to epoch while its correlation held (early stopping
    on PC cannot see an offset), and the validation split's offset predicted the test split's
    (docs/results.md, "hmtnet's beauty offset").

    The ``<name>`` column holds :meth:`values`: the shifted score clamped to ``range``, and MAE, RMSE and PC
    measure those same values (jobs.evaluate, the validation metrics of training), so a score the column
    reports as 5.0 is scored as 5.0. ``<name>.loss`` stays the training objective of the unclamped score
    (:meth:`shifted`): a loss of clamped values would be flat past the range, where the model still errs."""

    range: tuple[float, float] = (1.0, 5.0)
    loss_type: str = "mse"
    delta: float = 0.6
    shift: float | None = None
    kind = "regression"

    @property
    def calibrated(self) -> bool:
        return self.shift is not None

    def shifted(self, raw, calibrated: bool = True):
        """(B,) float32 scores: the raw output plus the fitted shift (when there is one and ``calibrated``), not
        clamped. The shift is fitted on these raw, unclamped scores (models/calibration.py), and should be: it
        is added before the clamp (a clamped score would hide how far off it was), and :meth:`values` clamps after."""
        x = raw.float().reshape(-1)
        return x + self.shift if calibrated and self.shift is not None else x

    def values(self, raw, calibrated: bool = True):
        """(B,) float32 scores as the ``<name>`` column holds them: :meth:`shifted` clamped to ``range`` (the one
        place the clamp is defined; the metrics measure these values too)."""
        lo, hi = self.range
        return self.shifted(raw, calibrated).clamp(lo, hi)

    def __post_init__(self):
        if self.loss_type not in REGRESSION_LOSSES:
            raise ValueError(f"{self.name}: unknown loss {self.loss_type!r}; expected one of {REGRESSION_LOSSES}")
        if not (isinstance(self.delta, (int, float)) and not isinstance(self.delta, bool)
                and math.isfinite(self.delta) and self.delta > 0):
            raise ValueError(f"{self.name}: delta must be a positive number, got {self.delta!r}")

    def loss(self, raw, target):
        return regression_loss(raw.float().reshape(-1), target, self.loss_type, self.delta)

    def stats(self, raw, target, **ctx):
        keep = valid_rows(target)
        y = target[keep].double()
        x = self.shifted(raw)[keep]  # the loss of the unclamped score, the metrics of the column's values
        loss_sum = self.loss(x, y.float()).double() * len(y) if len(y) else torch.zeros((), dtype=torch.float64)
        return scalar_error_stats(self.values(raw)[keep].double(), y, loss_sum)

    def metrics(self, s):
        return scalar_error_metrics(self.name, s)

    def fields(self):
        return [pa.field(self.name, pa.float32())]

    def to_columns(self, raw, geometry=None, calibrated: bool = True, **ctx):
        return {self.name: self.values(raw, calibrated).tolist()}

    def _describe(self):
        d = {"range": list(self.range), "loss": self.loss_type, "delta": self.delta}
        if self.shift is not None:
            d["calibration"] = {"method": "shift", "shift": float(self.shift)}
        return d


@dataclass(frozen=True)
class AgeDistribution(Output):
    """Age as a softmax over ``bins`` integer ages 0..bins-1; the prediction is its expectation
    ``Σ p_k · k`` (the blog's "expected value of your age distribution"). Cross-entropy on the integer age;
    MAE and RMSE of the expected age."""

    bins: int = 117
    kind = "age"

    def expected(self, raw: Tensor) -> Tensor:
        ages = torch.arange(self.bins, device=raw.device, dtype=torch.float32)
        return torch.softmax(raw.float(), dim=1) @ ages

    def loss(self, raw, target):
        return F.cross_entropy(raw.float(), target.round().clamp(0, self.bins - 1).long())

    def stats(self, raw, target, **ctx):
        keep = valid_rows(target)
        raw, y = raw[keep].float(), target[keep].double()
        loss_sum = self.loss(raw, y.float()).double() * len(y) if len(y) else torch.zeros((), dtype=torch.float64)
        return scalar_error_stats(self.expected(raw).double(), y, loss_sum)

    def metrics(self, s):
        return scalar_error_metrics(self.name, s)

    def fields(self):
        return [pa.field(self.name, pa.float32()), pa.field(f"{self.name}_mode", pa.int16())]

    def to_columns(self, raw, geometry=None, **ctx):
        return {self.name: self.expected(raw).tolist(), f"{self.name}_mode": raw.float().argmax(1).tolist()}

    def _describe(self):
        return {"bins": self.bins}

