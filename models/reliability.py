"""How well calibrated a model's probabilities are: the expected calibration error and what a reliability
diagram draws, on labelled rows. Fitting temperatures that lower it: models/calibration.py.

ECE: torchmetrics' ``multiclass_calibration_error`` (top-label confidence) and ``binary_calibration_error``
(the probability of the positive class), 15 equal-width bins, ``norm="l1"``.
"""

from __future__ import annotations

import torch

from .outputs import Binary, Categorical, Output

N_BINS = 15
NORM = "l1"


class CalibrationError(ValueError):
    """Calibration cannot be fitted or measured with what was given."""


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """Rows of one value or of several (an attribute group) as (rows, values)."""
    return x.reshape(len(x), -1)


def ece(output: Output, raw: torch.Tensor, target: torch.Tensor, calibrated: bool = True,
        ctx: dict | None = None, validate: bool = True) -> dict[str, float]:
    """Expected calibration error (15 bins, l1) of ``output``'s probabilities on labelled rows.

    Categorical: ``{"<name>.ece": e}`` (top-label). Binary: ``{"<label>.ece": e, ...}`` per attribute (the
    positive-class probability against the label) and ``"<name>.mean_ece"`` when there are several.
    Rows whose target is missing (NaN) are left out; an attribute without labelled rows is left out.
    Other outputs: ``{}``. ``validate=False`` skips torchmetrics' checks of the inputs (bootstrap loops)."""
    # imported here: models/__init__ imports every module of the package when it builds its registry
    from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

    ctx = ctx or {}
    raw, target = raw.detach().float().cpu(), target.detach().float().cpu()
    if isinstance(output, Categorical):
        keep = ~torch.isnan(as_2d(target)).any(1)
        if not bool(keep.any()):
            return {}
        p = output.probabilities(raw[keep], calibrated)
        e = multiclass_calibration_error(p, target[keep].long(), num_classes=len(output.classes), n_bins=N_BINS,
                                         norm=NORM, validate_args=validate)
        return {f"{output.name}.ece": float(e)}
    if isinstance(output, Binary):
        raw2, t2 = as_2d(raw), as_2d(target)
        p = output.probabilities(raw2, calibrated, **ctx)
        out: dict[str, float] = {}
        for j, label in enumerate(output.labels):
            keep = ~torch.isnan(t2[:, j])
            if bool(keep.any()):
                out[f"{label}.ece"] = float(binary_calibration_error(p[keep, j], (t2[keep, j] > 0).long(),
                                                                     n_bins=N_BINS, norm=NORM, validate_args=validate))
        if len(output.labels) > 1 and out:
            out[f"{output.name}.mean_ece"] = sum(out.values()) / len(out)
        return out
    return {}


def reliability_bins(output: Output, raw: torch.Tensor, target: torch.Tensor, calibrated: bool = True,
                     ctx: dict | None = None, n_bins: int = N_BINS) -> dict[str, list[float]]:
    """What a reliability diagram draws (the same binning as the ECE): per bin of confidence, its mean
    confidence, its accuracy (categorical: top-label correct; binary: fraction positive, all attributes
    pooled) and its count. Empty bins have count 0 and NaN means."""
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
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = (torch.bucketize(conf.double(), edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).double()
    csum = torch.bincount(idx, weights=conf.double(), minlength=n_bins)
    hsum = torch.bincount(idx, weights=hit, minlength=n_bins)
    nan = torch.full_like(count, float("nan"))
    return {"edges": edges.tolist(), "count": count.tolist(),
            "confidence": torch.where(count > 0, csum / count.clamp_min(1), nan).tolist(),
            "accuracy": torch.where(count > 0, hsum / count.clamp_min(1), nan).tolist()}
