"""One description of every model output.

Each model declares its outputs once, as a tuple of the ``Output`` subclasses below. Everything else is
derived from that declaration:

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
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def _valid_rows(target: Tensor) -> Tensor:
    """Rows whose target is fully present (no NaN)."""
    if target.dim() == 1:
        return ~torch.isnan(target)
    return ~torch.isnan(target).any(dim=tuple(range(1, target.dim())))


def log_cosh(x: Tensor) -> Tensor:
    """``log(cosh(x))`` without overflow. The naive form overflows float32 above |x| ≈ 89 (cosh = inf) and
    gives NaN gradients there, and near 0 it loses precision (cosh(0.01) = 1.00005 in float32). Above
    |x| = 10 we use ``|x| + log1p(e^{-2|x|}) − log 2``, below it ``log1p(2 sinh²(x/2))`` (cosh x − 1 =
    2 sinh²(x/2): accurate near 0, where the first form cancels). The near branch sees a clamped input so
    that its unused gradient is never inf·0."""
    a = x.abs()
    near = torch.log1p(2.0 * torch.sinh(a.clamp(max=10.0) / 2.0) ** 2)
    far = a + torch.log1p(torch.exp(-2.0 * a)) - math.log(2.0)
    return torch.where(a < 10.0, near, far)


def smooth_huber_loss(pred: Tensor, target: Tensor, delta: float = 0.6) -> Tensor:
    """HMTNet's Smooth Huber loss (section 3.3, Eq. 5), averaged over the batch: ``log cosh`` of the error
    inside δ, a straight line outside, joined so that value and slope meet at δ::

        l(x) = log cosh(x)                              if |x| <= δ
             = log cosh(δ) + tanh(δ) (|x| - δ)          otherwise

    Why this reading (the paper: "It follows a Huber fashion, but it's smoother ... and is more robust to
    outliers", δ = 0.6). The extracted Eq. 5 reads ``log cosh(x)`` inside and ``|x|`` outside; taken
    literally the loss jumps at δ (0.165 just inside, 0.6 just outside) and an error just inside δ gets
    ``tanh(0.6) = 0.54`` of the gradient an outlier gets (1): the opposite of robust. A public
    implementation that carries HMTNet's loss (an ``HMTLoss`` with task weights 1/1/2 and
    ``SmoothHuberLoss(delta=0.6)``) computes the literal form, with the batch-mean absolute error outside; a
    variant in the same code base uses ``½ log cosh`` inside and ``δ |x| − ½ δ²`` outside, switching on the
    batch mean, which is not continuous either (0.083 against 0.18 at δ = 0.6). Huber's loss, which the
    paper says it smooths, is ``½x²`` inside and ``δ|x| − ½δ²`` outside: continuous with a continuous slope,
    and the slope is largest (δ) for outliers and never more. The form above is Huber's with ``½x²``
    replaced by ``log cosh(x)`` (which is ``½x² + O(x⁴)``): continuous, slope ``tanh(x)`` inside and
    ``tanh(δ)`` outside, so no sample gets more gradient than one at δ. :func:`log_cosh` keeps it finite
    for any error.
    """
    x = pred - target
    a = x.abs()
    d = torch.as_tensor(float(delta), dtype=a.dtype, device=a.device)
    outer = log_cosh(d) + torch.tanh(d) * (a - d)
    return torch.where(a <= d, log_cosh(x), outer).mean()


REGRESSION_LOSSES = ("smooth_huber", "mse", "l1", "smooth_l1")


def regression_loss(pred: Tensor, target: Tensor, loss_type: str = "mse", delta: float = 0.6) -> Tensor:
    """The regression losses of HMTNet's Table 4 ablation, averaged over the batch: ``smooth_huber``
    (:func:`smooth_huber_loss`, δ), ``mse``, ``l1`` and ``smooth_l1`` (PyTorch's, with ``beta`` = δ:
    ``½x²/δ`` inside δ, ``|x| − ½δ`` outside)."""
    if loss_type == "smooth_huber":
        return smooth_huber_loss(pred, target, delta)
    if loss_type == "mse":
        return F.mse_loss(pred, target)
    if loss_type == "l1":
        return F.l1_loss(pred, target)
    if loss_type == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=float(delta))
    raise ValueError(f"unknown regression loss {loss_type!r}; expected one of {REGRESSION_LOSSES}")


@dataclass(frozen=True)
class Output:
    """Base class. ``name`` keys the raw output dict; ``weight`` is the task weight in the total loss."""

    name: str
    weight: float = 1.0
    target: str | None = None  # canonical dataset label column; None = same as ``name``

    kind = "abstract"

    @property
    def target_column(self) -> str:
        return self.target or self.name

    # --- training -------------------------------------------------------------------------------
    def loss(self, raw: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def masked_loss(self, raw: Tensor, target: Tensor) -> Tensor:
        """Loss over the rows that have a label; 0 (with a gradient path) when none do."""
        keep = _valid_rows(target)
        if not bool(keep.any()):
            return raw.sum() * 0.0
        return self.loss(raw[keep], target[keep])

    # --- evaluation -----------------------------------------------------------------------------
    def stats(self, raw: Tensor, target: Tensor, **ctx) -> dict[str, Tensor]:
        """Summable float64 statistics for one batch (rows without a label are ignored)."""
        raise NotImplementedError

    def metrics(self, stats: dict[str, Tensor]) -> dict[str, float]:
        raise NotImplementedError

    # --- what a user reads ----------------------------------------------------------------------
    def fields(self) -> list[pa.Field]:
        raise NotImplementedError

    def to_columns(self, raw: Tensor, geometry: list[dict] | None = None, **ctx) -> dict[str, list]:
        """Columns (name -> one value per row) for a batch of raw outputs."""
        raise NotImplementedError

    def describe(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "weight": self.weight, "target": self.target_column}
        d.update(self._describe())
        return d

    def _describe(self) -> dict:
        return {}


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

    def loss(self, raw, target):
        return F.cross_entropy(raw.float(), target.long())

    def stats(self, raw, target, **ctx):
        keep = _valid_rows(target)
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

    ``loss="bce"``: raw values are logits, the probability is ``sigmoid(raw)``, targets are 0/1.
    ``loss="mse_pm1"``: DMM-CNN's reading: raw values are scores regressed onto ±1 targets with MSE (Eq. 2),
    the label is ``raw > τ_j`` (Eq. 5) with the model's per-attribute thresholds τ (Eq. 6), passed in
    ``ctx["thresholds"]``; the reported probability is the score mapped linearly from [-1, 1] to [0, 1].
    Columns: ``<label>`` (bool) and ``<label>_prob`` for every label.

    ``temperatures`` (one per label, set by models/calibration.py; None = uncalibrated): the reported
    probability becomes ``sigmoid((raw − τ_j) / T_j)``, a Platt scaling whose bias is tied to the decision
    threshold, so that the probability is above 0.5 exactly when the label is true and the label itself
    (``raw > τ_j``, DMM-CNN's adaptive thresholds included) never changes.
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

    def prob(self, raw: Tensor) -> Tensor:
        """The uncalibrated probability of each label (sigmoid of a logit, or DMM-CNN's linear map)."""
        if self.loss_type == "bce":
            return torch.sigmoid(raw)
        return ((raw.clamp(-1, 1) + 1) / 2)

    def probabilities(self, raw: Tensor, calibrated: bool = True, **ctx) -> Tensor:
        """(B, J) probabilities of the positive class: calibrated when the output has temperatures and
        ``calibrated``, with the thresholds of ``ctx`` (see the class docstring)."""
        raw = raw.float()
        if not (calibrated and self.temperatures is not None):
            return self.prob(raw)
        t = torch.tensor(self.temperatures, dtype=raw.dtype, device=raw.device)
        return torch.sigmoid((raw - self._thresholds(raw, ctx)) / t)

    def per_label_loss(self, raw: Tensor, target: Tensor) -> Tensor:
        """Mean loss of each label over the batch, shape (J,)."""
        # Targets may be 0/1 or CelebA's ±1: positive means > 0 in both conventions.
        raw, pos = raw.float(), (target > 0).float()
        if self.loss_type == "bce":
            return F.binary_cross_entropy_with_logits(raw, pos, reduction="none").mean(0)
        return ((raw - (pos * 2 - 1)) ** 2).mean(0)

    def loss(self, raw, target, label_weights: Tensor | None = None):
        per = self.per_label_loss(raw, target)
        if label_weights is not None:
            return (per * label_weights.to(per)).sum()
        return per.sum() if self.loss_type == "mse_pm1" else per.mean()

    def stats(self, raw, target, **ctx):
        keep = _valid_rows(target)
        raw, target = raw[keep].float(), target[keep].float()
        truth = target > 0
        pred = self.positive(raw, ctx)
        j = len(self.labels)
        z = torch.zeros(j, dtype=torch.float64)
        if len(target) == 0:
            return {"n": torch.zeros((), dtype=torch.float64), "correct": z, "fp": z.clone(), "fn": z.clone(),
                    "tp": z.clone(), "loss_sum": z.clone()}
        per_row = self.per_label_loss(raw, target) * len(target)
        return {
            "n": torch.tensor(float(len(target)), dtype=torch.float64),
            "correct": (pred == truth).sum(0).double(),
            "tp": (pred & truth).sum(0).double(),
            "fp": (pred & ~truth).sum(0).double(),
            "fn": (~pred & truth).sum(0).double(),
            "loss_sum": per_row.double(),
        }

    def metrics(self, s):
        n = float(s["n"])
        if n == 0:
            return {}
        acc = (s["correct"] / n).tolist()
        out = {f"{label}.accuracy": a for label, a in zip(self.labels, acc)}
        if len(self.labels) > 1:
            out[f"{self.name}.mean_accuracy"] = float(np.mean(acc))
        out[f"{self.name}.loss"] = float(s["loss_sum"].sum()) / n
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
            d["calibration"] = {"method": "threshold_temperature", "temperatures": [float(t) for t in self.temperatures]}
        return d


@dataclass(frozen=True)
class Regression(Output):
    """A scalar score in ``range``; MAE, RMSE and Pearson correlation. ``loss_type`` is one of
    :data:`REGRESSION_LOSSES` (:func:`regression_loss`; ``delta`` for ``smooth_huber`` and ``smooth_l1``).
    The raw output has shape (B,) or (B, 1)."""

    range: tuple[float, float] = (1.0, 5.0)
    loss_type: str = "mse"
    delta: float = 0.6
    kind = "regression"

    def __post_init__(self):
        if self.loss_type not in REGRESSION_LOSSES:
            raise ValueError(f"{self.name}: unknown loss {self.loss_type!r}; expected one of {REGRESSION_LOSSES}")
        if not (isinstance(self.delta, (int, float)) and not isinstance(self.delta, bool)
                and math.isfinite(self.delta) and self.delta > 0):
            raise ValueError(f"{self.name}: delta must be a positive number, got {self.delta!r}")

    def loss(self, raw, target):
        return regression_loss(raw.float().reshape(-1), target, self.loss_type, self.delta)

    def stats(self, raw, target, **ctx):
        keep = _valid_rows(target)
        x = raw.float().reshape(-1)[keep].double()
        y = target[keep].double()
        loss_sum = self.loss(x.float(), y.float()).double() * len(y) if len(y) else torch.zeros((), dtype=torch.float64)
        return scalar_error_stats(x, y, loss_sum)

    def metrics(self, s):
        return scalar_error_metrics(self.name, s)

    def fields(self):
        return [pa.field(self.name, pa.float32())]

    def to_columns(self, raw, geometry=None, **ctx):
        lo, hi = self.range
        return {self.name: raw.float().reshape(-1).clamp(lo, hi).tolist()}

    def _describe(self):
        return {"range": list(self.range), "loss": self.loss_type, "delta": self.delta}


def scalar_error_stats(pred: Tensor, y: Tensor, loss_sum: Tensor) -> dict[str, Tensor]:
    """Summable statistics of a scalar prediction (float64): count, absolute and squared error, and the
    sums Pearson's correlation needs."""
    err = pred - y
    return {"n": torch.tensor(float(len(y)), dtype=torch.float64), "abs": err.abs().sum(), "sq": (err**2).sum(),
            "sx": pred.sum(), "sy": y.sum(), "sxx": (pred * pred).sum(), "syy": (y * y).sum(),
            "sxy": (pred * y).sum(), "loss_sum": loss_sum}


def scalar_error_metrics(name: str, s: dict[str, Tensor]) -> dict[str, float]:
    """MAE, RMSE, Pearson correlation and mean loss from :func:`scalar_error_stats` sums."""
    n = float(s["n"])
    if n == 0:
        return {}
    return {f"{name}.mae": float(s["abs"]) / n, f"{name}.rmse": math.sqrt(float(s["sq"]) / n),
            f"{name}.pearson": pearson_from_sums(s), f"{name}.loss": float(s["loss_sum"]) / n}


def pearson_from_sums(s: dict[str, Tensor]) -> float:
    n = float(s["n"])
    cov = float(s["sxy"]) - float(s["sx"]) * float(s["sy"]) / n
    vx = float(s["sxx"]) - float(s["sx"]) ** 2 / n
    vy = float(s["syy"]) - float(s["sy"]) ** 2 / n
    if vx <= 0 or vy <= 0:
        return float("nan")
    return cov / math.sqrt(vx * vy)


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
        keep = _valid_rows(target)
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


LANDMARK_SCALES = ("signed", "unit")


@dataclass(frozen=True)
class Landmarks(Output):
    """T facial points regressed with MSE (DMM-CNN Eq. 1). The raw output (B, 2T) and the targets are in the
    model input's coordinates scaled by ``scale``: ``signed`` (default) maps the input's width and height to
    [-1, 1] (``2x/W − 1``, ``2y/H − 1``), the range of the ±1 attribute targets the same loss sums with;
    ``unit`` maps them to [0, 1]. :meth:`normalise` turns pixel targets into these units; ``to_columns`` maps the
    points back to pixels of the original image through each row's preprocessing geometry (``sx, sy, tx, ty``)
    or, for a face aligned in a photo, its 2x3 ``affine`` map from input to original pixels. Metric: mean
    point error in units of the input's size (``mean_error``: x/W, y/H, whatever the scale) and ``nme``
    (divided by the inter-ocular distance when T == 5)."""

    points: int = 5
    scale: str = "signed"
    kind = "landmarks"

    def __post_init__(self):
        if self.scale not in LANDMARK_SCALES:
            raise ValueError(f"{self.name}: landmark scale must be one of {LANDMARK_SCALES}, got {self.scale!r}")

    @property
    def _span(self) -> float:
        return 2.0 if self.scale == "signed" else 1.0

    @property
    def _offset(self) -> float:
        return -1.0 if self.scale == "signed" else 0.0

    def normalise(self, points, geometry: list[dict]):
        """(B, 2T) pixel coordinates of the original images -> the model's target units (a new array)."""
        out = np.array(points, dtype=np.float32, copy=True)
        for r, g in enumerate(geometry):
            x, y = out[r, 0::2].astype(np.float64), out[r, 1::2].astype(np.float64)
            if "affine" in g:  # an aligned face: invert its input -> original map
                a = np.linalg.inv(np.vstack([np.reshape(g["affine"], (2, 3)), [0, 0, 1]]))
                u, v = a[0, 0] * x + a[0, 1] * y + a[0, 2], a[1, 0] * x + a[1, 1] * y + a[1, 2]
            else:
                u, v = (x - g["tx"]) / g["sx"], (y - g["ty"]) / g["sy"]
            out[r, 0::2] = u / g["input_w"] * self._span + self._offset
            out[r, 1::2] = v / g["input_h"] * self._span + self._offset
        return out

    def loss(self, raw, target):
        # Eq. 1: squared L2 norm of the 2T-vector, averaged over images.
        return ((raw.float() - target) ** 2).sum(1).mean()

    def stats(self, raw, target, **ctx):
        keep = _valid_rows(target)
        raw, y = raw[keep].float(), target[keep].float()
        n = torch.tensor(float(len(y)), dtype=torch.float64)
        if len(y) == 0:
            z = torch.zeros((), dtype=torch.float64)
            return {"n": n, "err": z, "nme": z.clone(), "loss_sum": z.clone()}
        p, t = raw.reshape(len(y), -1, 2) / self._span, y.reshape(len(y), -1, 2) / self._span
        err = (p - t).norm(dim=2).mean(1)
        if self.points == 5:
            iod = (t[:, 0] - t[:, 1]).norm(dim=1).clamp_min(1e-6)
            nme = err / iod
        else:
            nme = err
        return {"n": n, "err": err.double().sum(), "nme": nme.double().sum(),
                "loss_sum": ((raw - y) ** 2).sum(1).double().sum()}

    def metrics(self, s):
        n = float(s["n"])
        if n == 0:
            return {}
        return {f"{self.name}.mean_error": float(s["err"]) / n, f"{self.name}.nme": float(s["nme"]) / n,
                f"{self.name}.loss": float(s["loss_sum"]) / n}

    def fields(self):
        return [pa.field(self.name, pa.list_(pa.float32()))]

    def to_columns(self, raw, geometry=None, **ctx):
        pts = raw.float().reshape(raw.shape[0], -1, 2)
        rows = []
        for i in range(pts.shape[0]):
            g = geometry[i] if geometry else None
            if g is None:
                rows.append(pts[i].reshape(-1).tolist())
                continue
            u = (pts[i, :, 0].double() - self._offset) / self._span * g["input_w"]
            v = (pts[i, :, 1].double() - self._offset) / self._span * g["input_h"]
            if "affine" in g:  # an aligned face: input pixel -> original pixel by a 2x3 map (faces/align.py)
                a = g["affine"]
                x, y = a[0] * u + a[1] * v + a[2], a[3] * u + a[4] * v + a[5]
            else:
                x, y = u * g["sx"] + g["tx"], v * g["sy"] + g["ty"]
            rows.append(torch.stack([x, y], 1).reshape(-1).tolist())
        return {self.name: rows}

    def _describe(self):
        return {"points": self.points, "scale": self.scale}


OUTPUT_KINDS = {c.kind: c for c in (Categorical, Binary, Regression, AgeDistribution, Landmarks)}


CALIBRATION_PREFIX = "temperature_"  # buffer name of an output's fitted temperatures: temperature_<output>


class OutputSet(nn.Module):
    """The outputs of one model, in order, and what is derived from them as a whole.

    An ``nn.Module`` only so that fitted calibration travels with the model: when a model's ``outputs``
    are calibrated (:meth:`set_temperatures`), each calibrated output has one float32 buffer
    ``temperature_<output>`` (shape (1,) for a categorical output, (J,) for J binary attributes) and its
    ``Output`` carries the same values. An uncalibrated set has no buffer, parameter or child: the model's
    ``state_dict`` is what it was before calibration existed. Loading a calibrated ``state_dict`` into a
    freshly built model (``models.checkpoint.load_checkpoint``) creates the buffers and calibrates it."""

    def __init__(self, outputs, extra: dict | None = None):
        super().__init__()
        self.outputs: tuple[Output, ...] = tuple(outputs)
        self.extra = dict(extra or {})

    def __eq__(self, other):
        """Equal when they describe the same outputs (temperatures included): a deep copy of a model (batch-norm
        folding) has equal outputs, as when this was a dataclass."""
        if not isinstance(other, OutputSet):
            return NotImplemented
        return self.outputs == other.outputs and self.extra == other.extra

    __hash__ = nn.Module.__hash__  # identity, as nn.Module's bookkeeping (named_modules' memo set) needs

    def __iter__(self):
        return iter(self.outputs)

    def __len__(self):
        return len(self.outputs)

    def __getitem__(self, name: str) -> Output:
        for o in self.outputs:
            if o.name == name:
                return o
        raise KeyError(name)

    def names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def fields(self) -> list[pa.Field]:
        fs: list[pa.Field] = []
        for o in self.outputs:
            fs += o.fields()
        return fs

    def describe(self) -> list[dict]:
        return [o.describe() for o in self.outputs]

    # --- calibration --------------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        """True when any output carries fitted temperatures."""
        return any(getattr(o, "calibrated", False) for o in self.outputs)

    def calibratable(self) -> list[Output]:
        """The outputs a temperature applies to: categorical outputs and binary attribute groups."""
        return [o for o in self.outputs if isinstance(o, (Categorical, Binary))]

    def set_temperatures(self, name: str, temperatures) -> None:
        """Calibrate output ``name`` with ``temperatures`` (a number or one per class group / attribute);
        ``None`` removes its calibration. Temperatures must be finite and positive."""
        o = self[name]
        if not isinstance(o, (Categorical, Binary)):
            raise ValueError(f"output {name!r} ({o.kind}) has no probabilities to calibrate")
        key = CALIBRATION_PREFIX + name
        if temperatures is None:
            if key in self._buffers:
                del self._buffers[key]
            self._replace(replace(o, **{_temperature_field(o): None}))
            return
        t = torch.as_tensor(temperatures, dtype=torch.float64).reshape(-1)
        want = 1 if isinstance(o, Categorical) else len(o.labels)
        if t.numel() != want:
            raise ValueError(f"output {name!r} needs {want} temperature(s), got {t.numel()}")
        if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
            raise ValueError(f"output {name!r}: temperatures must be finite and > 0, got {t.tolist()}")
        vals = tuple(float(v) for v in t.float().tolist())  # what the buffer holds, so a reload is exact
        buf = torch.tensor(vals, dtype=torch.float32)
        if key in self._buffers:
            self._buffers[key] = buf.to(self._buffers[key].device)
        else:
            self.register_buffer(key, buf)
        self._replace(replace(o, **{_temperature_field(o): vals[0] if isinstance(o, Categorical) else vals}))

    def clear_calibration(self) -> None:
        for o in self.calibratable():
            self.set_temperatures(o.name, None)

    def _replace(self, new: Output) -> None:
        self.outputs = tuple(new if o.name == new.name else o for o in self.outputs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A calibrated checkpoint into a freshly built (uncalibrated) model: make the buffers first, so that
        # nn.Module's loading fills them and strict loading sees no unexpected key.
        for key, value in state_dict.items():
            if key.startswith(prefix + CALIBRATION_PREFIX) and key[len(prefix):] not in self._buffers:
                name = key[len(prefix) + len(CALIBRATION_PREFIX):]
                if name in self.names() and isinstance(value, torch.Tensor):
                    self.register_buffer(CALIBRATION_PREFIX + name, torch.ones_like(value, dtype=torch.float32))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key in list(self._buffers):
            if key.startswith(CALIBRATION_PREFIX) and prefix + key in state_dict:
                try:
                    self.set_temperatures(key[len(CALIBRATION_PREFIX):], self._buffers[key].detach().cpu())
                except ValueError as e:
                    error_msgs.append(f"{prefix}{key}: {e}")


def _temperature_field(o: Output) -> str:
    return "temperature" if isinstance(o, Categorical) else "temperatures"


def finalize_metrics(outputs, stats: dict[str, dict[str, Tensor]]) -> dict[str, float]:
    """Paper metrics from summed statistics; ``mean_accuracy`` averages every per-attribute/per-task
    accuracy (for CelebA: the 40 attributes, as in the papers' tables)."""
    out: dict[str, float] = {}
    for o in outputs:
        if o.name in stats:
            out.update(o.metrics(stats[o.name]))
    accs = [v for k, v in out.items() if k.endswith(".accuracy")]
    if accs:
        out["mean_accuracy"] = float(np.mean(accs))
    return out


def add_stats(acc: dict | None, new: dict) -> dict:
    """Add nested stats dicts ({output: {stat: tensor}}) elementwise."""
    if acc is None:
        return {k: {s: v.clone() for s, v in d.items()} for k, d in new.items()}
    for k, d in new.items():
        for s, v in d.items():
            acc[k][s] = acc[k][s] + v
    return acc
