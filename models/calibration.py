"""Calibrated probabilities: fit temperatures on validation outputs, measure expected calibration error.

    >>> from models.calibration import fit_calibration
    >>> cal = fit_calibration(model, {"gender": (logits, labels), ...})   # raw outputs and targets
    >>> # (core.evaluation.calibration_pairs(model, run_model(model, val_table)) gives them for a table)
    >>> cal.summary()["gender"]["ece_after"]

What is fitted, per output (``models.outputs``):

* **Categorical** (gender, race, smile, ...): one temperature T, probabilities ``softmax(z / T)``. A positive
  T keeps the order of the classes, so the predicted class never changes (Guo et al., 2017).
* **Binary** attribute groups (DMM-CNN's 40 CelebA attributes): one temperature T_j per attribute around the
  model's decision threshold τ_j, ``p_j = sigmoid((s_j − τ_j) / T_j)``: Platt scaling ``sigmoid(a s + b)``
  with ``a = 1/T_j`` and the bias tied to ``b = −τ_j / T_j``. Why not a free bias: it moves the point where
  the probability crosses 0.5 away from the label's threshold, so either the label would change (DMM-CNN's
  adaptive thresholds, Eq. 6, would no longer decide) or a row could say ``Smiling: true`` with
  ``Smiling_prob: 0.4``. Tied to τ_j, the label is untouched and agrees with its probability. For
  ``bce`` outputs (τ = 0) this is plain temperature scaling of the logit; for DMM-CNN's ``mse_pm1`` scores
  (regressed onto ±1, not logits) the uncalibrated "probability" is the piecewise-linear map of [-1, τ_j]
  onto [0, 0.5] and [τ_j, 1] onto [0.5, 1] (``Binary.prob``; ``(s + 1) / 2`` when τ_j = 0) and the
  calibrated one is this sigmoid of the distance to the threshold. Both cross 0.5 at τ_j, so an attribute
  whose fit is not kept (NaN, below) agrees with its label too.
* **Regression** scores (HMTNet's beauty): no probability, but one fitted **shift** ``s`` added to the raw
  score, ``s = mean(y − x)`` on the validation rows (least squares). Kept only when it lowers the MAE on
  those rows. Why: the score's offset drifted by up to ±0.25 between epochs while its correlation held, and
  the validation offset predicted the test one (docs/results.md). The shift moves the columns and the
  metrics, never the loss.
* **Not calibrated**: age (``AgeDistribution``: a temperature would change the expected age, the prediction
  itself) and landmarks (no probability).

How: each temperature minimises the negative log-likelihood (cross-entropy / BCE, a proper scoring rule) of
the validation labels, by L-BFGS (strong-Wolfe line search) on ``log(1/T)`` in float64. The NLL is convex in
``1/T`` and the problem has one (categorical) or J independent (binary) unknowns, so L-BFGS converges in a
few dozen evaluations of a (N, K) tensor; the log keeps T positive. Minimising the binned ECE directly is
not done: it is piecewise constant in T and over-fits its 15 bins.

What the rows must hold, or the output (attribute) is **not fitted** and keeps its uncalibrated probability
(never T = 1, which for DMM-CNN's ``mse_pm1`` scores is a sigmoid, not the uncalibrated map): at least
``min_rows`` labelled rows, both classes among them (categorical: at least two), and at least one row the
model gets wrong (categorical: another class scores above the true one; binary: the score is on the wrong
side of τ_j). Why the last two: on rows of one class, or on rows every one of which is predicted right
(separable), the NLL keeps falling as T → 0, so it has no minimum and the fit would only stop at the lower
bound; a T that sharp turns a face read 0.51 into 0.73 and 0.57 into 0.9975, and the lowered ECE on those
same rows would wrongly "confirm" it. For the same reason a fitted T is **refused** (not kept, a stated
reason under ``rejected``) when it lands on the lower bound of [``T_MIN``, ``T_MAX``] = [0.05, 20]: an
optimum at that bound means the NLL was still falling towards ever sharper probabilities, so the data did not
determine T and the bound, not the data, chose it. (On the upper bound the outputs carry no information
about the labels, and the flattest probability allowed is kept: ``_bound_reason``.) An attribute not fitted is listed under ``skipped`` with its reason and has ``NaN`` in its slot of
``temperatures``. When all outputs are fitted (``outputs=None``), an output that cannot be fitted (too few
labelled rows, one class, separable rows, or, binary, no attribute that can be) is recorded with its reason
(``OutputCalibration.not_fitted``; it keeps its uncalibrated probability or score) and the others are fitted;
an output named in ``outputs`` that cannot be fitted raises :class:`CalibrationError`, as does a fit where no
output at all can be fitted.

Kept only where it helps: a fitted temperature is kept only when it is not on the lower bound (above) and lowers
the output's (or the attribute's) ECE on the rows it was fitted on. Otherwise the output keeps its
uncalibrated probability (categorical: no temperature; binary attribute: ``NaN`` in its slot of
``temperatures``, read as "this attribute is not calibrated"), and the fit's summary says so under
``rejected``. NLL and ECE can
disagree: for DMM-CNN's ``mse_pm1`` scores the uncalibrated probability is a linear map that no
temperature reproduces, and on a small validation split the NLL's optimum can bin worse than the raw
probabilities. The issue asks for "no worse than before for any output"; the rows the choice is made
on are the fitting split's, never the test split's.

Where it is kept: ``model.outputs`` (an ``nn.Module``) gets a buffer ``temperature_<output>`` per calibrated
output and each ``Output`` a ``temperature``/``temperatures`` field, so ``checkpoint_bytes`` /
``save_checkpoint`` write it in the ``state_dict`` and ``load_checkpoint`` restores it with no change to the
checkpoint format; the output description (``/v1/models``, ``CheckpointInfo.outputs``) shows
``"calibration": {...}`` for each calibrated output. A model or checkpoint without calibration loads and
decodes exactly as before (no buffer, no new description field, the same bytes and hash):
:func:`calibration_status` says ``{"calibrated": false}`` for it.

Raw probabilities stay reproducible two ways: ``Output.to_columns(raw, calibrated=False)`` /
``Output.probabilities(raw, calibrated=False)``, and from the stored temperatures (``z = T · log p`` up to
a per-row constant for a categorical output; ``s = τ_j + T_j · logit(p)`` for an attribute, to within the
float32 step next to 0.5 that keeps ``p > 0.5`` equal to the label: ``Binary.probabilities``).

The calibration error itself (ECE, reliability diagrams) is measured in models/reliability.py. What a fit
records is in models/calibration_records.py: ``OutputCalibration`` (one output's fit, its ``not_fitted``,
``skipped`` and ``rejected`` reasons, its log lines) and ``Calibration`` (every output's: ``summary``,
``apply``); this module fits them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F

from .calibration_records import Calibration, OutputCalibration
from .outputs import Binary, Categorical, Output, Regression
from .reliability import CalibrationError, as_2d, ece

T_MIN, T_MAX = 0.05, 20.0
MIN_ROWS = 20


# --- fitting -----------------------------------------------------------------------------------------
def _lbfgs(loss_fn, n: int) -> torch.Tensor:
    """Minimise ``loss_fn(log_a)`` over ``log_a`` (n values, a = 1/T) from a = 1; returns T, clipped to
    [T_MIN, T_MAX] (NaN where the optimiser diverged). A T on a bound is not an optimum the data determined:
    :func:`_bound_reason` says so and the caller refuses it."""
    log_a = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_a], lr=1.0, max_iter=100, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(log_a)
        loss.backward()
        return loss

    opt.step(closure)
    t = torch.exp(-log_a.detach())  # NaN stays NaN (refused below), never a silent T = 1
    return t.clamp(T_MIN, T_MAX).float().double()  # the float32 value the model's buffer will hold


_LO = float(torch.tensor(T_MIN).float())  # the lower bound as the float32 buffer holds it


def _bound_reason(what: str, t: float) -> str | None:
    """Why a fitted ``t`` is refused, or None. At T_MIN the NLL was still falling when the clip stopped it:
    the rows reward ever sharper probabilities (one class, or nearly separable), so they did not determine T
    and the bound chose it; keeping it would make every face look surer than any row showed. At T_MAX the
    NLL was still falling towards flat probabilities: the raw outputs tell the labels apart no better than a
    constant, and the flattest probability allowed is the honest one (every face then reads as unsure and is
    flagged ``low_confidence`` for review), so it is kept (if it lowers the ECE, as every fit must)."""
    if t != t:
        return f"{what}: the NLL's minimisation diverged (T not finite)"
    if t <= _LO:
        return (f"{what}: T = {t:.3f} is the lower bound of [{T_MIN}, {T_MAX}], not an optimum: the NLL kept "
                f"falling towards T -> 0 (ever sharper), so the fitting rows do not determine T")
    return None


def _fit_categorical(o: Categorical, raw: torch.Tensor, target: torch.Tensor, min_rows: int) -> OutputCalibration:
    """One temperature for ``o``; raises :class:`CalibrationError` when the rows cannot determine it (too few,
    one class, or every row predicted right: module docstring)."""
    keep = ~torch.isnan(target.reshape(len(target), -1)).any(1)
    z, y = raw[keep].double(), target[keep].reshape(-1).long()
    if len(y) < min_rows:
        raise CalibrationError(f"output {o.name!r}: {len(y)} labelled rows, at least {min_rows} needed to fit")
    if len(torch.unique(y)) < 2:
        c = int(y[0])
        cls = o.classes[c] if 0 <= c < len(o.classes) else c
        raise CalibrationError(f"output {o.name!r}: only one class ({cls!r}) among {len(y)} labelled rows; a "
                               f"temperature needs at least two")
    if bool((z.gather(1, y[:, None]).squeeze(1) >= z.max(1).values).all()):
        raise CalibrationError(f"output {o.name!r}: every one of the {len(y)} labelled rows is predicted right "
                               f"(separable): the NLL falls as T -> 0, so these rows do not determine T")
    t = _lbfgs(lambda log_a: F.cross_entropy(z * torch.exp(log_a[0]), y), 1)
    before = ece(replace_t(o, None), z, y.double())[f"{o.name}.ece"]
    nll_before = float(F.cross_entropy(z, y))
    bound = _bound_reason(o.name, float(t[0]))
    if bound is not None:
        return OutputCalibration(o.name, "temperature", [], len(y), nll_before, nll_before, before, before,
                                 rejected=[bound])
    after = ece(replace_t(o, float(t[0])), z, y.double())[f"{o.name}.ece"]
    if not after < before:  # kept only where it lowers the ECE (module docstring)
        return OutputCalibration(o.name, "temperature", [], len(y), nll_before, nll_before, before, before,
                                 rejected=[f"{o.name}: T = {float(t[0]):.3f} gave ECE {after:.4f} >= "
                                           f"{before:.4f} uncalibrated on the fitting rows"])
    return OutputCalibration(o.name, "temperature", [float(t[0])], len(y), nll_before,
                             float(F.cross_entropy(z / t[0], y)), before, after)


def _fit_binary(o: Binary, raw: torch.Tensor, target: torch.Tensor, ctx: dict, min_rows: int) -> OutputCalibration:
    s, y = as_2d(raw).double(), as_2d(target).double()
    tau = o._thresholds(s, ctx).double()
    lab = ~torch.isnan(y)
    pos = (y > 0).double()
    d = s - tau
    wrong = lab & (((pos > 0) & (d < 0)) | ((pos == 0) & (d > 0)))  # a labelled row on the wrong side of τ_j
    usable, skipped = [], []
    for j, label in enumerate(o.labels):  # not fitted: NaN, the uncalibrated probability (module docstring)
        n_j, p_j = int(lab[:, j].sum()), int((pos[:, j] * lab[:, j]).sum())
        if n_j == 0:
            skipped.append(f"{label}: no labelled rows")
        elif n_j < min_rows:
            skipped.append(f"{label}: {n_j} labelled rows (< {min_rows})")
        elif p_j in (0, n_j):
            skipped.append(f"{label}: only one class among {n_j} rows")
        elif not bool(wrong[:, j].any()):
            skipped.append(f"{label}: every one of the {n_j} labelled rows is on the right side of its threshold "
                           f"(separable): the NLL falls as T -> 0, so these rows do not determine T")
        else:
            usable.append(j)
    if not usable:
        raise CalibrationError(f"output {o.name!r}: no attribute can be fitted ({'; '.join(skipped)})")
    u = torch.tensor(usable)
    w = lab[:, u].double()
    counts = w.sum(0)

    def nll(log_a):
        x = d[:, u] * torch.exp(log_a)
        per = F.binary_cross_entropy_with_logits(x, pos[:, u], reduction="none") * w
        return (per.sum(0) / counts).sum()  # separable: each attribute's mean NLL, minimised jointly

    t_fit = _lbfgs(nll, len(usable))
    temps = torch.full((len(o.labels),), float("nan"), dtype=torch.float64)  # skipped: not calibrated, not T = 1
    temps[u] = t_fit
    rejected = []
    for j in usable:  # a T on a bound is refused (_bound_reason)
        bound = _bound_reason(o.labels[j], float(temps[j]))
        if bound is not None:
            rejected.append(bound)
            temps[j] = float("nan")
    fitted = [j for j in usable if not bool(torch.isnan(temps[j]))]

    def mean_bce(x):
        return float(((F.binary_cross_entropy_with_logits(x[:, u], pos[:, u], reduction="none") * w).sum(0)
                      / counts).mean())

    before_p = replace_t(o, None).probabilities(s.float(), **ctx).double().clamp(1e-7, 1 - 1e-7)  # uncalibrated
    nll_before = mean_bce(torch.logit(before_p))
    e_before = ece(replace_t(o, None), s, y, ctx=ctx)
    e_fit = ece(replace_t(o, tuple(float(v) for v in temps)), s, y, ctx=ctx) if fitted else {}
    for j in fitted:  # kept only where it lowers that attribute's ECE (module docstring)
        label = o.labels[j]
        if not e_fit[f"{label}.ece"] < e_before[f"{label}.ece"]:
            rejected.append(f"{label}: T = {float(temps[j]):.3f} gave ECE {e_fit[f'{label}.ece']:.4f} >= "
                            f"{e_before[f'{label}.ece']:.4f} uncalibrated on the fitting rows")
            temps[j] = float("nan")
    key = f"{o.name}.mean_ece" if len(o.labels) > 1 else f"{o.labels[0]}.ece"
    if bool(torch.isnan(temps).all()):  # nothing kept: the output stays uncalibrated
        return OutputCalibration(o.name, "threshold_temperature", [], int(lab.any(1).sum()), nll_before,
                                 nll_before, e_before[key], e_before[key], skipped, rejected)
    final = replace_t(o, tuple(float(v) for v in temps))
    e_after = ece(final, s, y, ctx=ctx)
    p_after = final.probabilities(s.float(), **ctx).double().clamp(1e-7, 1 - 1e-7)
    return OutputCalibration(o.name, "threshold_temperature", [float(v) for v in temps], int(lab.any(1).sum()),
                             nll_before, mean_bce(torch.logit(p_after)), e_before[key], e_after[key], skipped,
                             rejected)


def _fit_shift(o: Regression, raw: torch.Tensor, target: torch.Tensor, min_rows: int) -> OutputCalibration:
    keep = ~torch.isnan(target.reshape(-1))
    x, y = raw.reshape(-1)[keep].double(), target.reshape(-1)[keep].double()
    if len(y) < min_rows:
        raise CalibrationError(f"output {o.name!r}: {len(y)} labelled rows, at least {min_rows} needed")
    shift = float((y - x).mean().float())  # the float32 value the buffer will hold; fitted on the raw scores

    def mae(s):  # of the values the column holds (``Regression.values``: shifted, then clamped to the range)
        return float((replace(o, shift=s).values(x.float()).double() - y).abs().mean())

    before, after = mae(None), mae(shift)
    kept = after < before
    rejected = [] if kept else [f"{o.name}: shift {shift:+.4f} would not lower the MAE ({before:.4f} -> {after:.4f})"]
    return OutputCalibration(o.name, "shift", [], len(y), None, None, None, None, rejected=rejected,
                             shift=shift if kept else None, mae_before=before, mae_after=after if kept else before)


def _unfitted(o: Output, raw: torch.Tensor, target: torch.Tensor, ctx: dict, why: str) -> OutputCalibration:
    """The record of an output that could not be fitted (``why``): it keeps its uncalibrated probability or
    score, and its metrics on whatever labelled rows there were (NaN: none) stand before and after."""
    nan = float("nan")
    if isinstance(o, Regression):
        keep = ~torch.isnan(target.reshape(-1))
        x, y = raw.reshape(-1)[keep].double(), target.reshape(-1)[keep].double()
        mae = float((replace(o, shift=None).values(x.float()).double() - y).abs().mean()) if len(y) else nan
        return OutputCalibration(o.name, "shift", [], len(y), None, None, None, None, mae_before=mae, mae_after=mae,
                                 not_fitted=why)
    n = int((~torch.isnan(as_2d(target))).any(1).sum()) if isinstance(o, Binary) else \
        int((~torch.isnan(as_2d(target))).all(1).sum())
    e = ece(replace_t(o, None), raw, target, ctx=ctx, validate=False) if n else {}
    key = f"{o.name}.ece" if isinstance(o, Categorical) else \
        (f"{o.name}.mean_ece" if len(o.labels) > 1 else f"{o.labels[0]}.ece")
    e_before = e.get(key, nan)
    method = "temperature" if isinstance(o, Categorical) else "threshold_temperature"
    return OutputCalibration(o.name, method, [], n, nan, nan, e_before, e_before, not_fitted=why)


def replace_t(o: Output, t):
    """``o`` with temperature(s) ``t`` (None: uncalibrated)."""
    if isinstance(o, Categorical):
        return replace(o, temperature=t)
    if isinstance(o, Binary):
        return replace(o, temperatures=t)
    return o


def fit_calibration(model, data: Mapping, outputs: Iterable[str] | None = None, apply: bool = True,
                    min_rows: int = MIN_ROWS) -> Calibration:
    """Fit temperatures for ``model``'s categorical and binary outputs, and shifts for its regression scores,
    on validation data and (``apply``) put them on the model, so that ``model.decode`` and every checkpoint
    saved from it are calibrated.

    ``data``: ``{output name: (raw outputs, targets)}`` (targets as in the dataset: class index, 0/1 or ±1
    per attribute, NaN = missing); for a table, ``core.evaluation.calibration_pairs`` runs the model and
    gives them. ``outputs``: names to fit (default: every
    categorical and binary output with labels in ``data``). Fitting starts from the raw outputs: a model that
    is already calibrated is refitted, not calibrated twice. Binary thresholds are the model's own
    (``column_context``), so fit after the last threshold update.

    An output that cannot be fitted (too few labelled rows, one class, separable rows: module docstring) is,
    by default, recorded with its reason (``OutputCalibration.not_fitted``, printed by ``rejected_lines``)
    and left uncalibrated while the others are fitted; named in ``outputs``, it raises
    :class:`CalibrationError`. Raises :class:`CalibrationError` too when no output can be fitted."""
    core = getattr(model, "module", model)
    if not isinstance(data, Mapping):
        raise TypeError("fit_calibration takes {output: (raw, targets)}; core.evaluation.calibration_pairs "
                        "makes it from a table")
    pairs = {k: (torch.as_tensor(v[0]).detach().float().cpu(), torch.as_tensor(v[1]).detach().float().cpu())
             for k, v in data.items()}
    wanted = list(outputs) if outputs is not None else \
        [o.name for o in core.outputs.calibratable() + core.outputs.shiftable()]
    unknown = [n for n in wanted if n not in core.outputs.names()]
    if unknown:
        raise CalibrationError(f"{core.name}: no output {unknown}; outputs: {core.outputs.names()}")
    ctx_all = core.column_context()
    fits: dict[str, OutputCalibration] = {}
    not_fitted: list[str] = []
    for name in wanted:
        o = core.outputs[name]
        if not isinstance(o, (Categorical, Binary, Regression)):
            if outputs is not None:
                raise CalibrationError(f"output {name!r} ({o.kind}) has no probabilities or score to calibrate")
            continue
        if name not in pairs:
            if outputs is not None:
                raise CalibrationError(f"no raw outputs and labels for output {name!r} in the calibration data")
            continue
        raw, target = pairs[name]
        if len(raw) != len(target):
            raise CalibrationError(f"output {name!r}: {len(raw)} raw rows but {len(target)} targets")
        sub = ctx_all.get(name)
        ctx = sub if isinstance(sub, dict) else {}
        try:
            if isinstance(o, Regression):
                fits[name] = _fit_shift(o, raw, target, min_rows)
            elif isinstance(o, Categorical):
                fits[name] = _fit_categorical(o, raw, target, min_rows)
            else:
                fits[name] = _fit_binary(o, raw, target, ctx, min_rows)
        except CalibrationError as e:
            if outputs is not None:  # the caller asked for this output by name
                raise
            fits[name] = _unfitted(o, raw, target, ctx, str(e))  # the others are fitted still
            not_fitted.append(str(e))
    if not fits:
        raise CalibrationError(f"{core.name}: nothing to calibrate (no labelled categorical, binary or regression "
                               f"output in the data; outputs with labels: {sorted(pairs)})")
    if len(not_fitted) == len(fits):
        raise CalibrationError(f"{core.name}: no output can be fitted ({'; '.join(not_fitted)})")
    cal = Calibration(fits)
    if apply:
        cal.apply(core)
    return cal


def calibration_status(model_or_outputs) -> dict:
    """``{"calibrated": bool, "outputs": {name: temperatures or None}, "shifts": {name: shift or None}}`` for
    a model, its ``outputs``, or a checkpoint's output description (``CheckpointInfo.outputs``: a list of
    dicts). A model is calibrated when it holds a temperature or a regression shift (HMTNet's beauty)."""
    if isinstance(model_or_outputs, list):
        def cal(d):
            return d.get("calibration") or {}

        per = {d["name"]: cal(d).get("temperature", cal(d).get("temperatures"))
               for d in model_or_outputs if d.get("kind") in ("categorical", "binary")}
        shifts = {d["name"]: cal(d).get("shift") for d in model_or_outputs if d.get("kind") == "regression"}
    else:
        outs = getattr(getattr(model_or_outputs, "module", model_or_outputs), "outputs", model_or_outputs)
        per = {o.name: (o.temperature if isinstance(o, Categorical) else
                        (list(o.temperatures) if o.temperatures is not None else None))
               for o in outs.calibratable()}
        shifts = {o.name: o.shift for o in outs.shiftable()}
    fitted = [v for v in (*per.values(), *shifts.values()) if v is not None]
    return {"calibrated": bool(fitted), "outputs": per, "shifts": shifts}

