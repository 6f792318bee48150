"""What a calibration fit records: :class:`OutputCalibration` (one output's temperature(s) or shift, the rows
it used, its NLL, ECE or MAE before and after, and what was not fitted or not kept, with the reason) and
:class:`Calibration` (every output's, its JSON summary, and putting it on a model). Split from
models/calibration.py, which fits them (``fit_calibration``) and says what each field means."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class OutputCalibration:
    """The fit of one output: its temperature(s), the rows it used and its NLL and ECE on them."""

    output: str
    method: str  # "temperature" (categorical), "threshold_temperature" (binary) or "shift" (regression)
    temperatures: list[float]  # [] for a shift
    n: int
    nll_before: float | None  # None for a shift (no probability)
    nll_after: float | None
    ece_before: float | None
    ece_after: float | None
    skipped: list[str] = field(default_factory=list)  # attributes not fitted (NaN temperature), with the reason
    rejected: list[str] = field(default_factory=list)  # fits not kept: T on a bound, or no lower ECE (MAE)
    shift: float | None = None  # a regression's fitted shift (None: not kept or not a regression)
    mae_before: float | None = None
    mae_after: float | None = None
    not_fitted: str | None = None  # why the whole output was not fitted (None: it was); it stays uncalibrated

    def line(self) -> str:
        """One line for a log: ``gender ECE 0.0412 -> 0.0105`` or ``beauty MAE 0.301 -> 0.255 (shift -0.184)``
        (``eyeglasses not fitted`` for an output that could not be: :meth:`rejected_lines` says why)."""
        if self.not_fitted is not None:
            return f"{self.output} not fitted"
        if self.method == "shift":
            kept = f"shift {self.shift:+.4f}" if self.shift is not None else "no shift kept"
            return f"{self.output} MAE {self.mae_before:.4f} -> {self.mae_after:.4f} ({kept})"
        return f"{self.output} ECE {self.ece_before:.4f} -> {self.ece_after:.4f}"

    def rejected_lines(self) -> list[str]:
        """One log line per output or attribute not fitted and per fit not kept, saying what it reports instead
        (the attributes with no labelled row at all in one line)."""
        instead = "score" if self.method == "shift" else "probability"
        lines = [f"  not fitted (uncalibrated {instead} instead): {self.not_fitted}"] if self.not_fitted else []
        unlabelled = [w.split(": ")[0] for w in self.skipped if w.endswith(": no labelled rows")]
        if unlabelled:
            lines.append(f"  not fitted (uncalibrated {instead} instead): {len(unlabelled)} attribute(s) with no "
                         f"labelled rows: {', '.join(unlabelled)}")
        lines += [f"  not fitted (uncalibrated {instead} instead): {why}" for why in self.skipped
                  if not why.endswith(": no labelled rows")]
        return lines + [f"  not kept (uncalibrated {instead} instead): {why}" for why in self.rejected]


@dataclass
class Calibration:
    """What :func:`fit_calibration` fitted (and applied, unless ``apply=False``)."""

    outputs: dict[str, OutputCalibration]

    def summary(self) -> dict:
        """JSON-ready: ``{output: {method, temperatures, n, nll_before, nll_after, ece_before, ece_after, ...}}``."""
        def plain(v):  # NaN (an attribute left uncalibrated, a metric with no rows) as JSON's null
            return None if isinstance(v, float) and v != v else v

        return {name: {**{k: plain(v) for k, v in asdict(c).items()},
                       "temperatures": [plain(t) for t in c.temperatures]}
                for name, c in self.outputs.items()}

    def apply(self, model) -> None:
        """Put these temperatures on ``model.outputs`` (replacing any it had for these outputs)."""
        core = getattr(model, "module", model)
        for name, c in self.outputs.items():
            if c.method == "shift":
                core.outputs.set_shift(name, c.shift)
            else:
                core.outputs.set_temperatures(name, c.temperatures or None)
