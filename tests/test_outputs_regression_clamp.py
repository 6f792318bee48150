"""A regression score's metrics measure the column users get: the label and serve jobs clamp HMTNet's beauty
to its range (1-5) after the fitted shift, and MAE, RMSE and Pearson's r (jobs.evaluate, training's validation)
read those same values; the loss stays the training objective of the unclamped score, and the shift is fitted
on raw scores (it is applied before the clamp). No Ray; a second."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.calibration import fit_calibration
from models.outputs import Regression


def by_hand(col, y):
    col, y = np.asarray(col, dtype=float), np.asarray(y, dtype=float)
    return {"mae": np.abs(col - y).mean(), "rmse": math.sqrt(((col - y) ** 2).mean()),
            "pearson": np.corrcoef(col, y)[0, 1]}


@pytest.mark.parametrize("shift", [None, 0.5])
def test_metrics_measure_the_clamped_column(shift):
    o = Regression("beauty", range=(1.0, 5.0), loss_type="smooth_huber", shift=shift)
    raw = torch.tensor([5.6, 0.4, 3.0, 4.8, 1.2, 2.5])
    y = torch.tensor([5.0, 1.0, 3.0, 4.0, 1.5, 2.0])
    col = o.to_columns(raw)["beauty"]
    assert min(col) >= 1.0 and max(col) <= 5.0
    m = o.metrics(o.stats(raw, y))
    want = by_hand(col, y)
    for k in ("mae", "rmse", "pearson"):
        assert m[f"beauty.{k}"] == pytest.approx(want[k], rel=1e-6), k
    assert o.values(raw).tolist() == col  # the column is values(), the one place the clamp is defined
    # the loss is the training objective of the shifted, unclamped score (no slope lost past the range)
    shifted = raw + (shift or 0.0)
    assert m["beauty.loss"] == pytest.approx(float(o.loss(shifted, y)), rel=1e-6)
    # uncalibrated columns are clamped too, and the raw path is the shifted one minus the shift
    assert o.to_columns(raw, calibrated=False)["beauty"] == pytest.approx(raw.clamp(1, 5).tolist())
    assert torch.equal(o.shifted(raw, calibrated=False), raw)


def test_rows_without_a_label_and_summed_batches():
    o = Regression("beauty", range=(1.0, 5.0))
    raw = torch.tensor([6.0, 0.0, 3.0, 9.0])
    y = torch.tensor([5.0, float("nan"), 2.0, 4.0])
    m = o.metrics(o.stats(raw, y))
    assert m["beauty.mae"] == pytest.approx((0.0 + 1.0 + 1.0) / 3)  # 6 -> 5, 9 -> 5; the NaN row left out


def test_the_shift_is_fitted_on_raw_scores_then_clamped():
    """Scores read 0.5 low, some of them below 1: the fitted shift is the raw scores' offset (0.5), which a fit
    on clamped scores would get wrong; the columns and the metrics are those scores shifted, then clamped."""
    import models

    torch.manual_seed(0)
    m = models.create_model("hmtnet", image_size=96)
    g = torch.Generator().manual_seed(1)
    y = 1.0 + 4 * torch.rand(300, generator=g)
    x = y - 0.5
    fit = fit_calibration(m, {"beauty": (x, y)}).outputs["beauty"]
    assert fit.shift == pytest.approx(0.5, abs=1e-5)
    o = m.outputs["beauty"]
    col = o.to_columns(x)["beauty"]
    assert col == pytest.approx((x + fit.shift).clamp(1, 5).tolist())
    assert o.metrics(o.stats(x, y))["beauty.mae"] == pytest.approx(by_hand(col, y)["mae"], abs=1e-6)
