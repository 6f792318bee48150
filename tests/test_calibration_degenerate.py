"""Calibration on rows that cannot determine a temperature (models/calibration.py): one class, separable rows,
a temperature on the lower bound of [T_MIN, T_MAX] (the upper one is kept), too few labelled rows for one output among several, attributes no
row labels; and the ECE and the reliability diagram reading the same 15 bins (models/reliability.py). Every
output or attribute not calibrated says why, and keeps its uncalibrated probability. No Ray; a few seconds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import models
from models.calibration import T_MAX, T_MIN, CalibrationError, calibration_status, fit_calibration
from models.reliability import ece, reliability_bins


def logits_of(p_first: torch.Tensor) -> torch.Tensor:
    """Two-class logits whose softmax gives class 0 the probability ``p_first``."""
    return torch.stack([torch.logit(p_first.double()).float(), torch.zeros(len(p_first))], 1)


def fair(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Over-confident two-class logits with both classes and some wrong rows: a temperature fits (T > 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    z = torch.randn(n, 2, generator=g)
    z[torch.arange(n), y] += 1.0
    return z * 5, y.float()


def caller_lines(c) -> list[str]:
    """What jobs.evaluate and the train job print for a fit (their format strings), which must not fail."""
    ts = ", ".join(f"{t:.3f}" for t in c.temperatures[:5]) if c.temperatures else "none kept"
    head = c.line() if c.method == "shift" else (f"T = {ts}; NLL {c.nll_before:.4f} -> {c.nll_after:.4f}, "
                                                 f"ECE {c.ece_before:.4f} -> {c.ece_after:.4f}")
    return [head, c.line(), *c.rejected_lines()]


# --- 1. one class, separable rows, a temperature on a bound --------------------------------------------------
def test_one_class_among_the_labelled_rows_is_not_fitted():
    """Every validation face of one class: the NLL falls as T -> 0, the old fit ran to T_MIN = 0.05 and a raw
    0.51 face read 0.73 (0.57: 0.9975), so it no longer fired low_confidence."""
    g = torch.Generator().manual_seed(0)
    z = logits_of(0.55 + 0.35 * torch.rand(200, generator=g))  # right on every row, 0.55-0.9 sure
    y = torch.zeros(200)
    zg, yg = fair(300)
    m = models.create_model("hard_sharing")
    cal = fit_calibration(m, {"eyeglasses": (z, y), "gender": (zg, yg)})  # the other output is fitted still
    c = cal.outputs["eyeglasses"]
    assert c.temperatures == [] and "only one class" in c.not_fitted and "200 labelled rows" in c.not_fitted
    assert m.outputs["eyeglasses"].temperature is None and m.outputs["gender"].temperature is not None
    test = torch.tensor([[0.05, 0.0], [0.30, 0.0]])
    assert m.outputs["eyeglasses"].to_columns(test)["eyeglasses_prob"] == \
        pytest.approx(torch.softmax(test, 1)[:, 0].tolist())  # 0.512 and 0.574, not 0.73 and 0.9975
    assert any("not fitted" in line and "only one class" in line for line in c.rejected_lines())
    assert all(isinstance(x, str) for x in caller_lines(c))
    # alone, nothing can be fitted: an error that says why; named explicitly: an error too
    with pytest.raises(CalibrationError, match="only one class"):
        fit_calibration(models.create_model("hard_sharing"), {"gender": (z, y)})
    with pytest.raises(CalibrationError, match="only one class"):
        fit_calibration(models.create_model("hard_sharing"), {"gender": (z, y), "eyeglasses": (zg, yg)},
                        outputs=["gender", "eyeglasses"])


def test_separable_rows_are_not_fitted():
    """Both classes, but every one of 25 rows predicted right: no finite optimum either."""
    g = torch.Generator().manual_seed(0)
    z = logits_of(0.55 + 0.35 * torch.rand(25, generator=g))
    y = torch.zeros(25)
    z[::2], y[::2] = z[::2].flip(1), 1.0
    m = models.create_model("hard_sharing")
    with pytest.raises(CalibrationError, match="separable"):
        fit_calibration(m, {"gender": (z, y)})
    assert m.outputs["gender"].temperature is None
    cal = fit_calibration(m, {"gender": (z, y), "eyeglasses": fair(300)})
    assert "separable" in cal.outputs["gender"].not_fitted and m.outputs["gender"].temperature is None
    probe = torch.tensor([[0.05, 0.0]])
    assert m.outputs["gender"].to_columns(probe)["gender_prob"] == pytest.approx([0.5125], abs=1e-4)


def test_a_temperature_on_the_lower_bound_is_refused_with_its_reason_and_on_the_upper_one_kept():
    """Not separable, both classes, and the ECE on the fitting rows does fall, yet the NLL's optimum is past the
    bound: T_MIN (199 rows right by a small margin, one wrong) is refused; T_MAX (scores that point the wrong
    way: the outputs say nothing of the labels) is kept, the flattest probability allowed."""
    z = logits_of(torch.full((200,), 0.574))  # logit margin 0.3 for class 0
    y = torch.zeros(200)
    z[0], y[0] = torch.tensor([0.0, 0.01]), 0.0  # one row wrong, by very little
    z[1::2], y[1::2] = z[1::2].flip(1), 1.0
    m = models.create_model("hard_sharing")
    cal = fit_calibration(m, {"gender": (z, y), "eyeglasses": fair(300)})
    c = cal.outputs["gender"]
    assert c.temperatures == [] and m.outputs["gender"].temperature is None and c.not_fitted is None
    assert len(c.rejected) == 1 and f"is the lower bound of [{T_MIN}, {T_MAX}]" in c.rejected[0] and "T -> 0" in c.rejected[0]
    assert c.ece_after == c.ece_before and any("not kept" in line for line in c.rejected_lines())

    g = torch.Generator().manual_seed(1)
    z = torch.randn(300, 2, generator=g) * 3
    y = 1.0 - z.argmax(1).float()  # the other class, always: no positive T does better than a flat 0.5
    z[:3] = z[:3].flip(1)  # ... but a few right, so not separable the other way
    y[:3] = z[:3].argmax(1).float()
    c = fit_calibration(m, {"gender": (z, y), "eyeglasses": fair(300)}).outputs["gender"]
    assert c.rejected == [] and c.temperatures == [pytest.approx(T_MAX)]
    assert m.outputs["gender"].temperature == pytest.approx(T_MAX) and c.ece_after < c.ece_before
    p = m.outputs["gender"].to_columns(z)["gender_prob"]
    raw = torch.softmax(z, 1).max(1).values
    assert float(raw.mean()) > 0.85 and max(p) < 0.7 and float(np.mean(p)) < 0.56  # confidently wrong before; unsure now

    # an attribute of a binary group: refused, NaN (its uncalibrated probability); the others fitted
    d = models.create_model("dmm_cnn", depth=18, image_size=64, num_landmarks=0)
    g = torch.Generator().manual_seed(2)
    truth = (torch.rand(400, 40, generator=g) < 0.5).float()
    scores = (truth * 2 - 1) * 0.6 + 0.5 * torch.randn(400, 40, generator=g)
    scores[:, 3] = (truth[:, 3] * 2 - 1) * 0.02  # attribute 3: right by a hair on every row but one
    scores[0, 3] = -scores[0, 3] * 0.001
    scores[:, 4] = (truth[:, 4] * 2 - 1) * 0.3  # attribute 4: right on every row (separable)
    cal = fit_calibration(d, {"attributes": (scores, truth * 2 - 1)})
    c, out = cal.outputs["attributes"], d.outputs["attributes"]
    t = out.temperatures
    assert math.isnan(t[3]) and math.isnan(t[4]) and not math.isnan(t[0])
    assert any(r.startswith(f"{out.labels[3]}: T = ") and "bound" in r for r in c.rejected)
    assert any(r.startswith(f"{out.labels[4]}: ") and "separable" in r for r in c.skipped)
    p = out.probabilities(scores)
    assert torch.allclose(p[:, 3:5], out.prob(scores)[:, 3:5])
    assert cal.summary()["attributes"]["temperatures"][3] is None


# --- 2. one output that cannot be fitted does not abort the others ------------------------------------------
def test_one_short_output_is_reported_and_the_others_are_fitted():
    zg, yg = fair(300)
    ze, _ = fair(300, seed=1)
    ye = torch.full((300,), float("nan"))
    ye[:12], ye[12:15] = 1.0, 0.0  # eyeglasses: 15 labelled rows
    m = models.create_model("hard_sharing")
    cal = fit_calibration(m, {"gender": (zg, yg), "eyeglasses": (ze, ye)})
    g, e = cal.outputs["gender"], cal.outputs["eyeglasses"]
    assert g.temperatures and g.not_fitted is None
    assert m.outputs["gender"].temperature == pytest.approx(g.temperatures[0])
    assert e.temperatures == [] and e.n == 15 and "15 labelled rows, at least 20" in e.not_fitted
    assert m.outputs["eyeglasses"].temperature is None and e.line() == "eyeglasses not fitted"
    assert e.ece_before == e.ece_after and not math.isnan(e.ece_before)  # its ECE on the 15 rows, unchanged
    assert any("15 labelled rows" in line for line in caller_lines(e))
    json.dumps(cal.summary(), allow_nan=False)  # NaN (no NLL) as null
    assert cal.summary()["eyeglasses"]["nll_before"] is None
    # named by the caller: still an error
    with pytest.raises(CalibrationError, match="at least 20"):
        fit_calibration(m, {"gender": (zg, yg), "eyeglasses": (ze, ye)}, outputs=["gender", "eyeglasses"])
    # a regression score with too few labels is reported too, not dropped without a word
    h = models.create_model("hmtnet", image_size=96)
    zr, yr = fair(300, seed=2)
    cal = fit_calibration(h, {"gender": (zr, yr), "beauty": (torch.full((5,), 3.0), torch.full((5,), 3.2))})
    b = cal.outputs["beauty"]
    assert b.shift is None and "5 labelled rows" in b.not_fitted and h.outputs["beauty"].shift is None
    assert b.line() == "beauty not fitted" and any("uncalibrated score instead" in x for x in b.rejected_lines())


# --- 3. attributes a fit skipped stay uncalibrated (DMM-CNN's ±1 scores) ------------------------------------
def test_attributes_no_row_labels_keep_their_uncalibrated_probability():
    """GENKI-4K labels Smiling only: the other 39 attributes are not fitted. T = 1 would turn a +1.0 score's
    probability 1.0 into sigmoid(1) = 0.731; they must stay on the uncalibrated map and say so."""
    d = models.create_model("dmm_cnn", depth=18, image_size=64, num_landmarks=0)
    out = d.outputs["attributes"]
    assert out.loss_type == "mse_pm1"
    j = out.labels.index("Smiling")
    g = torch.Generator().manual_seed(0)
    n = 400
    truth = (torch.rand(n, generator=g) < 0.5).float()
    right = torch.rand(n, generator=g) < 0.8
    s = torch.rand(n, 40, generator=g) * 2 - 1
    s[:, j] = torch.where(right, truth * 2 - 1, 1 - truth * 2) * 0.9  # over-confident: a temperature helps
    y = torch.full((n, 40), float("nan"))
    y[:, j] = truth
    probe = torch.tensor([[1.0] * 40, [-0.9] * 40])
    before = out.to_columns(probe)
    cal = fit_calibration(d, {"attributes": (s, y)})
    c = cal.outputs["attributes"]
    t = d.outputs["attributes"].temperatures
    assert not math.isnan(t[j]) and sum(math.isnan(v) for v in t) == 39
    assert len(c.skipped) == 39 and all(w.endswith(": no labelled rows") for w in c.skipped)
    after = d.to_columns({"attributes": probe})
    for label in out.labels:
        if label != "Smiling":
            assert after[f"{label}_prob"] == pytest.approx(before[f"{label}_prob"])  # 1.0 and 0.05, unchanged
    assert after["Young_prob"] == pytest.approx([1.0, 0.05])
    status = calibration_status(d)["outputs"]["attributes"]
    assert math.isnan(status[out.labels.index("Young")]) and not math.isnan(status[j])
    assert d.outputs["attributes"].describe()["calibration"]["temperatures"][out.labels.index("Young")] is None
    lines = c.rejected_lines()
    assert any("39 attribute(s) with no labelled rows" in x and "Young" in x for x in lines)


# --- 4. the ECE and the reliability diagram read the same 15 bins -------------------------------------------
def _ece_from_bins(b) -> float:
    cnt = np.array(b["count"])
    conf, acc = np.nan_to_num(np.array(b["confidence"])), np.nan_to_num(np.array(b["accuracy"]))
    return float((np.abs(acc - conf) * cnt).sum() / cnt.sum())


def test_ece_is_the_reliability_diagrams_binning_with_saturated_probabilities():
    o = models.create_model("hard_sharing").outputs["gender"]
    z = torch.tensor([[40.0, 0.0]] * 10 + [[3.0, 0.0]] * 10)  # 10 rows at exactly 1.0 (float32), 10 at 0.953
    y = torch.tensor([0.0] * 5 + [1.0] * 5 + [0.0] * 10)  # the 1.0 rows half wrong, the 0.953 rows right
    assert int((o.probabilities(z).max(1).values == 1.0).sum()) == 10
    b = reliability_bins(o, z, y)
    assert b["count"][-1] == 20  # one last bin, p = 1.0 in it
    e = ece(o, z, y)["gender.ece"]
    assert e == pytest.approx(_ece_from_bins(b), rel=1e-12) and e == pytest.approx(0.2263, abs=1e-4)  # not 0.2737

    # binary: one attribute labelled, so the diagram's pooled bins are that attribute's
    d = models.create_model("dmm_cnn", depth=18, image_size=64, num_landmarks=0).outputs["attributes"]
    s = torch.zeros(20, 40)
    s[:10, 0], s[10:, 0] = 5.0, 0.9  # p = 1.0 exactly, and 0.95
    t = torch.full((20, 40), float("nan"))
    t[:, 0] = torch.tensor([1.0] * 5 + [-1.0] * 5 + [1.0] * 10)
    e = ece(d, s, t)[f"{d.labels[0]}.ece"]
    assert e == pytest.approx(_ece_from_bins(reliability_bins(d, s, t)), rel=1e-12)

    # unsaturated probabilities: the same value as torchmetrics' ECE
    from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 2, generator=g) * 2
    y = torch.randint(0, 2, (500,), generator=g).float()
    p = o.probabilities(z)
    assert ece(o, z, y)["gender.ece"] == pytest.approx(
        float(multiclass_calibration_error(p, y.long(), num_classes=2, n_bins=15, norm="l1")), abs=1e-6)
    assert ece(o, z, y)["gender.ece"] == pytest.approx(_ece_from_bins(reliability_bins(o, z, y)), rel=1e-12)
    s = torch.rand(500, 40, generator=g) * 1.8 - 0.9
    t = (torch.rand(500, 40, generator=g) < 0.5).float() * 2 - 1
    p1 = d.probabilities(s)[:, 1].contiguous()
    assert ece(d, s, t)[f"{d.labels[1]}.ece"] == pytest.approx(
        float(binary_calibration_error(p1, (t[:, 1] > 0).long(), n_bins=15)), abs=1e-6)
    with pytest.raises(ValueError, match="class indices"):
        ece(o, z, torch.full((500,), 2.0))
