"""How well calibrated a model's probabilities are: the expected calibration error and what a reliability
diagram draws, on labelled rows. Fitting temperatures that lower it: models/calibration.py.

ECE: top-label confidence (categorical) or the probability of the positive class (binary), 15 equal-width
bins, ``norm="l1"``: ``sum_b |sum of hits in b - sum of confidences in b| / n``, the definition of
torchmetrics' ``multiclass_calibration_error`` / ``binary_calibration_error``. Computed here, from the very
bins :func:`reliability_bins` returns, so the printed ECE and the diagram always agree. Bin ``b`` holds
``edges[b] <= p < edges[b + 1]`` and the last bin holds ``p = 1.0`` too. Why not torchmetrics itself: it puts
a probability of exactly 1.0 in a 16th bin of its own, and saturated float32 probabilities are exactly 1.0
(a 1.0 that was half wrong and a 0.95 that was right: torchmetrics 0.2737, these 15 bins 0.2263). The two
agree whenever no probability is exactly 1.0.
"""

from __future__ import annotations

import torch

from .outputs import Binary, Categorical, Output

N_BINS = 15


class CalibrationError(ValueError):
    """Calibration cannot be fitted or measured with what was given."""


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """Rows of one value or of several (an attribute group) as (rows, values)."""
    return x.reshape(len(x), -1)


def ece(output: Output, raw: torch.Tensor, target: torch.Tensor, calibrated: bool = True,
        ctx: dict | None = None, validate: bool = True) -> dict[str, float]:
    """Expected calibration error (15 bins, l1; the bins of :func:`reliability_bins`) of ``output``'s
    probabilities on labelled rows.

    Categorical: ``{"<name>.ece": e}`` (top-label). Binary: ``{"<label>.ece": e, ...}`` per attribute (the
    positive-class probability against the label) and ``"<name>.mean_ece"`` when there are several.
    Rows whose target is missing (NaN) are left out; an attribute without labelled rows is left out.
    Other outputs: ``{}``. ``validate=False`` skips the checks of the inputs (bootstrap loops)."""
    ctx = ctx or {}
    raw, target = raw.detach().float().cpu(), target.detach().float().cpu()
    if isinstance(output, Categorical):
        keep = ~torch.isnan(as_2d(target)).any(1)
        if not bool(keep.any()):
            return {}
        y = target[keep].reshape(-1)
        if validate and not bool(((y >= 0) & (y < len(output.classes)) & (y == y.round())).all()):
            raise CalibrationError(f"output {output.name!r}: targets must be class indices "
                                   f"0..{len(output.classes) - 1}")
        p = output.probabilities(raw[keep], calibrated)
        conf, pred = p.max(1)
        return {f"{output.name}.ece": _ece(conf, (pred == y.long()).double(), output.name, validate)}
    if isinstance(output, Binary):
        raw2, t2 = as_2d(raw), as_2d(target)
        p = output.probabilities(raw2, calibrated, **ctx)
        out: dict[str, float] = {}
        for j, label in enumerate(output.labels):
            keep = ~torch.isnan(t2[:, j])
            if bool(keep.any()):
                out[f"{label}.ece"] = _ece(p[keep, j], (t2[keep, j] > 0).double(), label, validate)
        if len(output.labels) > 1 and out:
            out[f"{output.name}.mean_ece"] = sum(out.values()) / len(out)
        return out
    return {}


def _bins(conf: torch.Tensor, hit: torch.Tensor, n_bins: int = N_BINS):
    """The ECE's and the reliability diagram's binning: ``(edges, count, confidence sum, hit sum)`` per bin,
    ``n_bins`` equal-width bins of [0, 1], ``edges[b] <= p < edges[b + 1]``, p = 1.0 in the last bin."""
    conf = conf.detach().double().reshape(-1)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).double()
    csum = torch.bincount(idx, weights=conf, minlength=n_bins)
    hsum = torch.bincount(idx, weights=hit.detach().double().reshape(-1), minlength=n_bins)
    return edges, count, csum, hsum


def _ece(conf: torch.Tensor, hit: torch.Tensor, what: str, validate: bool = True) -> float:
    """l1 ECE of confidences against hits (1 right / positive, 0 not): ``sum_b |hits_b - conf_b| / n``."""
    if validate and not bool(((conf >= 0) & (conf <= 1)).all()):  # NaN fails this too
        raise CalibrationError(f"{what}: probabilities must lie in [0, 1]")
    _, count, csum, hsum = _bins(conf, hit)
    return float((hsum - csum).abs().sum() / count.sum().clamp_min(1))


def reliability_bins(output: Output, raw: torch.Tensor, target: torch.Tensor, calibrated: bool = True,
                     ctx: dict | None = None, n_bins: int = N_BINS) -> dict[str, list[float]]:
    """What a reliability diagram draws (the very bins of the ECE, :func:`_bins`; p = 1.0 in the last bin): per
    bin of confidence, its mean confidence, its accuracy (categorical: top-label correct; binary: fraction
    positive, all attributes pooled) and its count. Empty bins have count 0 and NaN means. With the default
    ``n_bins``, ``sum(count * |accuracy - confidence|) / sum(count)`` is :func:`ece` (binary: of the pooled
    attributes)."""
    raw, target = raw.detach().float().cpu(), target.detach().float().cpu()
    if isinstance(output, Categorical):
        keep = ~torch.isnan(as_2d(target)).any(1)
        p = output.probabilities(raw[keep], calibrated)
        conf, pred = p.max(1)
        hit = (pred == target[keep].long()).double()
    elif isinstance(output, Binary):
        raw2, t2 = as_2d(raw), as_2d(target)
        p = output.probabilities(raw2, calibrated, **(ctx or {}))
        keep = ~torch.isnan(t2)
        conf, hit = p[keep], (t2[keep] > 0).double()
    else:
        raise CalibrationError(f"output {output.name!r} ({output.kind}) has no probabilities")
    edges, count, csum, hsum = _bins(conf, hit, n_bins)
    nan = torch.full_like(count, float("nan"))
    return {"edges": edges.tolist(), "count": count.tolist(),
            "confidence": torch.where(count > 0, csum / count.clamp_min(1), nan).tolist(),
            "accuracy": torch.where(count > 0, hsum / count.clamp_min(1), nan).tolist()}
