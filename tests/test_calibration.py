"""Calibrated probabilities (models/calibration.py): fitting lowers the ECE and keeps every decision, the
temperatures travel in checkpoints, and checkpoints without them load, label and say they are uncalibrated.
No Ray; a few seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

import models
from core.evaluation import Evaluated, calibration_pairs
from models.calibration import CalibrationError, calibration_status, ece, fit_calibration
from models.checkpoint import load_checkpoint, save_checkpoint


def overconfident(n: int, k: int, sharpen: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose true class gets a margin, then multiplied by ``sharpen``: right about as often as
    before, far more sure of itself (a deliberately miscalibrated toy model)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    z = torch.randn(n, k, generator=g)
    z[torch.arange(n), y] += 1.0
    return z * sharpen, y.float()


@pytest.fixture(scope="module")
def hs():
    torch.manual_seed(0)
    return models.create_model("hard_sharing")


def test_temperature_lowers_ece_and_keeps_every_argmax():
    m = models.create_model("hard_sharing")
    z, y = overconfident(3000, 2, sharpen=6.0)
    zv, yv = overconfident(3000, 2, sharpen=6.0, seed=1)  # held-out rows of the same toy model
    o = m.outputs["gender"]
    before = multiclass_calibration_error(torch.softmax(zv, 1), yv.long(), num_classes=2, n_bins=15, norm="l1")
    cal = fit_calibration(m, {"gender": (z, y)})
    fitted = m.outputs["gender"]
    assert fitted.temperature == pytest.approx(cal.outputs["gender"].temperatures[0]) and fitted.temperature > 2
    after = multiclass_calibration_error(fitted.probabilities(zv), yv.long(), num_classes=2, n_bins=15, norm="l1")
    assert float(after) < 0.5 * float(before) and float(before) > 0.1
    # torchmetrics' ECE where no probability is exactly 1.0 (to its float32 sums); the raw softmax has 325 rows
    # at exactly 1.0, which torchmetrics bins apart and ours folds into the last of the 15 bins (models/reliability.py)
    assert ece(fitted, zv, yv)["gender.ece"] == pytest.approx(float(after), abs=1e-6)
    raw_conf, raw_pred = torch.softmax(zv, 1).max(1)
    assert int((raw_conf == 1.0).sum()) == 325
    idx = np.minimum((raw_conf.double().numpy() * 15).astype(int), 14)
    gap = np.bincount(idx, raw_conf.double().numpy() - (raw_pred == yv.long()).double().numpy(), minlength=15)
    assert ece(fitted, zv, yv, calibrated=False)["gender.ece"] == pytest.approx(np.abs(gap).sum() / len(idx), rel=1e-9)
    assert ece(fitted, zv, yv, calibrated=False)["gender.ece"] == pytest.approx(float(before), abs=1e-5)
    s = cal.summary()["gender"]
    assert s["ece_after"] < s["ece_before"] and s["nll_after"] < s["nll_before"] and s["n"] == 3000
    # decisions: the class is the raw argmax, before and after; only the probabilities move
    raw_cols = o.to_columns(zv)
    cal_cols = fitted.to_columns(zv)
    assert cal_cols["gender"] == raw_cols["gender"] == [("male", "female")[i] for i in zv.argmax(1).tolist()]
    assert not np.allclose(cal_cols["gender_prob"], raw_cols["gender_prob"])
    assert fitted.to_columns(zv, calibrated=False) == raw_cols  # the raw probabilities stay reproducible
    # the whole model's decode (label and serve columns) is calibrated too
    cols = m.to_columns({"gender": zv[:5], "eyeglasses": zv[:5]})
    assert cols["gender_prob"] == pytest.approx(cal_cols["gender_prob"][:5])
    assert cols["eyeglasses_prob"] == pytest.approx(raw_cols["gender_prob"][:5])  # eyeglasses not fitted


def test_five_classes_and_underconfidence():
    m = models.create_model("age_gender_race", depth=18, image_size=32, hidden=(8,))
    z, y = overconfident(2000, 5, sharpen=0.3)  # too timid: T < 1
    cal = fit_calibration(m, {"race": (z, y)})
    assert cal.outputs["race"].temperatures[0] < 1 and cal.outputs["race"].ece_after < cal.outputs["race"].ece_before
    assert m.outputs["race"].to_columns(z)["race"] == m.outputs["race"].to_columns(z, calibrated=False)["race"]
    assert "age" not in cal.outputs and m.outputs["age"].describe().get("calibration") is None


def test_dmm_attributes_keep_their_adaptive_threshold_decisions():
    m = models.create_model("dmm_cnn", depth=18, image_size=64, num_landmarks=0)
    g = torch.Generator().manual_seed(3)
    m.thresholds.copy_(torch.empty(40).uniform_(-0.4, 0.4, generator=g))  # as Eq. 6 leaves them
    truth = (torch.rand(1500, 40, generator=g) < 0.4).float()
    scores = (truth * 2 - 1) * 0.6 + 0.5 * torch.randn(1500, 40, generator=g) + m.thresholds
    target = truth * 2 - 1  # CelebA's ±1
    target[:100, 5] = float("nan")  # missing labels are left out
    out = m.outputs["attributes"]
    before = out.to_columns(scores, thresholds=m.thresholds)
    cal = fit_calibration(m, {"attributes": (scores, target)})
    fitted = m.outputs["attributes"]
    assert len(fitted.temperatures) == 40 and cal.outputs["attributes"].skipped == []
    after = m.to_columns({"attributes": scores})
    for label in out.labels:
        assert after[label] == before[label]  # the label is still score > τ_j
        p = np.array(after[f"{label}_prob"])
        assert ((p > 0.5) == np.array(after[label])).all()  # and agrees with its probability
    s = cal.summary()["attributes"]
    assert s["ece_after"] < s["ece_before"]


def test_calibration_survives_save_and_load(tmp_path, hs):
    z, y = overconfident(500, 2, sharpen=5.0)
    m = models.create_model("hard_sharing")
    m.load_state_dict(hs.state_dict())
    fit_calibration(m, {"gender": (z, y), "eyeglasses": (z, y)})
    digest = save_checkpoint(m, str(tmp_path / "cal.pt"), metrics={"mean_accuracy": 0.5})
    m2, info = load_checkpoint(str(tmp_path / "cal.pt"))
    assert info.hash == digest
    for name in ("gender", "eyeglasses"):
        assert m2.outputs[name].temperature == m.outputs[name].temperature
    assert calibration_status(m2)["calibrated"] and calibration_status(info.outputs) == calibration_status(m)
    assert info.outputs[0]["calibration"] == {"method": "temperature", "temperature": m.outputs["gender"].temperature}
    x = torch.randint(0, 255, (3, 1, 50, 50), dtype=torch.uint8)
    with torch.no_grad():
        a, b = m.eval().to_columns(m(m.prepare(x))), m2.to_columns(m2(m2.prepare(x)))
    assert a == b
    # refitting starts from the raw outputs, and removing the calibration is possible
    m2.outputs.clear_calibration()
    assert not calibration_status(m2)["calibrated"] and not any(k.startswith("outputs.") for k in m2.state_dict())


def test_uncalibrated_checkpoint_loads_labels_and_says_so(tmp_path, hs):
    assert not any(k.startswith("outputs.") for k in hs.state_dict())  # the same tensors as before calibration
    save_checkpoint(hs, str(tmp_path / "raw.pt"))
    m, info = load_checkpoint(str(tmp_path / "raw.pt"))
    status = calibration_status(m)
    assert status == {"calibrated": False, "outputs": {"gender": None, "eyeglasses": None}, "shifts": {}}
    assert calibration_status(info.outputs) == status
    assert all("calibration" not in d for d in info.outputs)
    x = torch.randint(0, 255, (2, 1, 50, 50), dtype=torch.uint8)
    with torch.no_grad():
        raw = m(m.prepare(x))
    cols = m.to_columns(raw)
    assert cols["gender_prob"] == pytest.approx(torch.softmax(raw["gender"], 1).max(1).values.tolist())


def test_fit_from_a_model_run_and_bad_input():
    m = models.create_model("hard_sharing")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (64, 1, 50, 50), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        raw = m.eval()(m.prepare(x))
    ev = Evaluated(raw, {"gender": torch.randint(0, 2, (64,), generator=g).float()}, np.arange(64), {})
    pairs = calibration_pairs(m, ev)  # only outputs with labels: eyeglasses has none here
    assert set(pairs) == {"gender"} and pairs["gender"][0] is raw["gender"]
    cal = fit_calibration(m, pairs, apply=False)
    assert set(cal.outputs) == {"gender"} and cal.outputs["gender"].n == 64
    assert not calibration_status(m)["calibrated"]  # apply=False leaves the model alone
    cal.apply(m)
    assert m.outputs["gender"].temperature == (cal.outputs["gender"].temperatures or [None])[0]
    with pytest.raises(TypeError, match="calibration_pairs"):
        fit_calibration(m, [{"image": x.numpy()}])
    with pytest.raises(CalibrationError, match="at least 20"):
        fit_calibration(m, {"gender": (torch.zeros(5, 2), torch.zeros(5))})
    with pytest.raises(CalibrationError, match="no output"):
        fit_calibration(m, {"gender": (torch.zeros(50, 2), torch.zeros(50))}, outputs=["smile"])


def test_a_fit_that_does_not_lower_the_ece_is_not_kept(tmp_path):
    """"No worse for any output": a temperature is kept only where it lowers the ECE on its fitting rows.
    Categorical: 95 % of the rows are calibrated already (p 0.9, right 9 times in 10); 5 % are sure and
    wrong half the time, which pulls the NLL's temperature far up and would spoil the 95 %. Binary (DMM-CNN's
    ±1 scores): attribute 0's linear probability (s + 1) / 2 is calibrated by construction, and no sigmoid
    of the score reproduces it; attribute 1 is over-confident and a temperature fixes it."""
    g = torch.Generator().manual_seed(0)
    n = 4000
    m = models.create_model("hard_sharing")
    y = torch.randint(0, 2, (n,), generator=g)
    right = torch.rand(n, generator=g) < 0.9
    pred = torch.where(right, y, 1 - y)
    z = torch.zeros(n, 2)
    z[torch.arange(n), pred] = float(np.log(9.0))  # softmax: 0.9 on the predicted class
    sure = torch.arange(n) < n // 20
    pred[sure] = torch.where(torch.rand(int(sure.sum()), generator=g) < 0.5, y[sure], 1 - y[sure])
    z[sure] = 0.0
    z[sure, pred[sure]] = 30.0
    cal = fit_calibration(m, {"gender": (z, y.float())})
    c = cal.outputs["gender"]
    assert c.temperatures == [] and c.ece_after == c.ece_before and "gender: T = " in c.rejected[0]
    assert m.outputs["gender"].temperature is None and not calibration_status(m)["calibrated"]

    d = models.create_model("dmm_cnn", depth=18, image_size=64, num_landmarks=0)
    p = torch.rand(n, 40, generator=g)
    truth = (torch.rand(n, 40, generator=g) < p).float()
    scores = 2 * p - 1  # attribute j: P(true | s) = (s + 1) / 2 exactly
    scores[:, 1] = torch.where(truth[:, 1] > 0, 0.9, -0.9) * torch.where(torch.rand(n, generator=g) < 0.8, 1, -1)
    cal = fit_calibration(d, {"attributes": (scores, truth * 2 - 1)})
    c = cal.outputs["attributes"]
    out = d.outputs["attributes"]
    t = out.temperatures
    assert np.isnan(t[0]) and not np.isnan(t[1]) and any(r.startswith(f"{out.labels[0]}: ") for r in c.rejected)
    assert c.ece_after <= c.ece_before
    after, raw = ece(out, scores, truth * 2 - 1), ece(out, scores, truth * 2 - 1, calibrated=False)
    for label in out.labels:  # never worse than uncalibrated, attribute by attribute, on the fitting rows
        assert after[f"{label}.ece"] <= raw[f"{label}.ece"] + 1e-12
    assert after[f"{out.labels[1]}.ece"] < raw[f"{out.labels[1]}.ece"]
    probs = out.probabilities(scores, thresholds=d.thresholds)
    assert torch.allclose(probs[:, 0], out.prob(scores)[:, 0])  # left: its uncalibrated probability
    assert cal.summary()["attributes"]["temperatures"][0] is None  # JSON's null, not NaN
    # and it survives a checkpoint: NaN in the buffer, null in the description, the same columns
    save_checkpoint(d, str(tmp_path / "dmm.pt"))
    d2, info = load_checkpoint(str(tmp_path / "dmm.pt"))
    assert d2.outputs == d.outputs and calibration_status(d2)["calibrated"]
    desc = next(o for o in info.outputs if o["name"] == "attributes")["calibration"]["temperatures"]
    assert desc[0] is None and desc[1] == pytest.approx(float(t[1]))
    assert d2.to_columns({"attributes": scores[:8]}) == d.to_columns({"attributes": scores[:8]})




# --- a regression score's shift (HMTNet's beauty) ----------------------------------------------------------
def _hmtnet():
    torch.manual_seed(0)
    return models.create_model("hmtnet", image_size=96)


def test_a_regression_offset_is_fitted_shifts_columns_and_metrics_and_travels_in_the_checkpoint(tmp_path):
    m = _hmtnet()
    g = torch.Generator().manual_seed(3)
    y = 1.5 + 3 * torch.rand(400, generator=g)  # SCUT's 1-5 scores
    x = y - 0.2 + 0.1 * torch.randn(400, generator=g)  # read 0.2 low, as HMTNet's drifting offset did
    o = m.outputs["beauty"]
    mae_raw = o.metrics(o.stats(x, y))["beauty.mae"]
    cal = fit_calibration(m, {"beauty": (x, y)})
    fit = cal.outputs["beauty"]
    assert fit.method == "shift" and fit.shift == pytest.approx(0.2, abs=0.02) and not fit.rejected
    assert fit.mae_before == pytest.approx(mae_raw, abs=1e-6) and fit.mae_after < fit.mae_before
    assert "beauty MAE" in fit.line() and f"shift {fit.shift:+.4f}" in fit.line()
    o = m.outputs["beauty"]
    assert o.calibrated and o.describe()["calibration"] == {"method": "shift", "shift": fit.shift}
    # the columns and the metrics read the shifted score (clamped to the range in the columns), the loss does not
    raw = torch.tensor([2.0, 4.95])
    assert o.to_columns(raw)["beauty"] == pytest.approx([2.0 + fit.shift, 5.0])
    assert o.to_columns(raw, calibrated=False)["beauty"] == pytest.approx([2.0, 4.95])
    assert o.metrics(o.stats(x, y))["beauty.mae"] == pytest.approx(fit.mae_after, abs=1e-5)
    assert fit.mae_after < mae_raw - 0.1
    assert torch.equal(o.loss(x, y), _hmtnet().outputs["beauty"].loss(x, y))
    # in the checkpoint: a buffer, read back into a freshly built model; clearing removes it
    path = str(tmp_path / "hmt.pt")
    save_checkpoint(m, path)
    loaded, info = load_checkpoint(path)
    assert loaded.outputs["beauty"].shift == fit.shift
    assert "outputs.shift_beauty" in loaded.state_dict()
    assert [d for d in info.outputs if d["name"] == "beauty"][0]["calibration"]["shift"] == fit.shift
    # a shift alone makes the checkpoint calibrated (jobs.evaluate's "calibrated:" line and JSON read this)
    status = calibration_status(loaded)
    assert status == {"calibrated": True, "outputs": {"gender": None, "race": None}, "shifts": {"beauty": fit.shift}}
    assert calibration_status(info.outputs) == status
    loaded.outputs.clear_calibration()
    assert loaded.outputs["beauty"].shift is None and not any("shift_" in k for k in loaded.state_dict())
    assert calibration_status(loaded) == {**status, "calibrated": False, "shifts": {"beauty": None}}
    assert not any("shift_" in k for k in _hmtnet().state_dict())  # a model never fitted has no such buffer


def test_a_shift_that_does_not_lower_the_mae_is_not_kept():
    m = _hmtnet()
    y = torch.tensor([3.0] * 20 + [3.0] * 5)
    x = torch.tensor([3.0] * 20 + [-1.0] * 5)  # a few far misses pull the mean residual up: shifting all is worse
    fit = fit_calibration(m, {"beauty": (x, y)}).outputs["beauty"]
    assert fit.shift is None and fit.mae_after == fit.mae_before and "would not lower the MAE" in fit.rejected[0]
    assert m.outputs["beauty"].shift is None and not m.outputs["beauty"].calibrated
    with pytest.raises(CalibrationError, match="labelled rows"):  # asked for by name with too few labels
        fit_calibration(m, {"beauty": (x[:5], y[:5])}, outputs=["beauty"])
    with pytest.raises(ValueError, match="one finite number"):
        m.outputs.set_shift("beauty", float("nan"))
    with pytest.raises(ValueError, match="not a regression score"):
        m.outputs.set_shift("gender", 0.1)
