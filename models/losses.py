"""The losses and summable error statistics the outputs (models/outputs.py) are built from: HMTNet's Smooth
Huber and the other regression losses of its Table 4, masking of missing labels, and MAE / RMSE / Pearson from
sums that add across batches and workers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def valid_rows(target: Tensor) -> Tensor:
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

