"""The outputs of one model as a whole (:class:`OutputSet`): loss and metrics over all of them, the columns of
a row, and the fitted temperatures of calibration as buffers, so they travel in the model's ``state_dict``.
The kinds of output are in models/outputs.py (and models/landmarks.py).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from .outputs import Binary, Categorical, Output, Regression

Tensor = torch.Tensor

CALIBRATION_PREFIX = "temperature_"  # buffer name of an output's fitted temperatures: temperature_<output>
SHIFT_PREFIX = "shift_"  # buffer name of a regression output's fitted shift: shift_<output>


class OutputSet(nn.Module):
    """The outputs of one model, in order, and what is derived from them as a whole.

    An ``nn.Module`` only so that fitted calibration travels with the model: when a model's ``outputs``
    are calibrated (:meth:`set_temperatures`), each calibrated output has one float32 buffer
    ``temperature_<output>`` (shape (1,) for a categorical output, (J,) for J binary attributes) and its
    ``Output`` carries the same values; a regression output with a fitted shift (:meth:`set_shift`) has a
    buffer ``shift_<output>`` of shape (1,). An uncalibrated set has no buffer, parameter or child: the model's
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
        return [_comparable(o) for o in self.outputs] == [_comparable(o) for o in other.outputs] \
            and self.extra == other.extra

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

    # --- test-time mirror averaging ---------------------------------------------------------------
    def check_mirror(self) -> None:
        """Raise ``ValueError`` when an output cannot be read from the mirror image (landmarks of unknown
        left/right order), before any image is read."""
        for o in self.outputs:
            o.unmirror(torch.zeros((1, 2 * getattr(o, "points", 1))))

    def mirror_average(self, raw: dict[str, Tensor], mirrored: dict[str, Tensor]) -> dict[str, Tensor]:
        """The mean of the raw outputs of the faces and of their mirror images, each output of the mirror
        mapped back first (``Output.unmirror``). Logits are averaged as logits (a geometric mean of the
        probabilities), regressions as values. A raw entry that is no output is the unmirrored pass's."""
        outputs = {o.name: o for o in self.outputs}
        return {k: (v + outputs[k].unmirror(mirrored[k])) / 2 if k in outputs else v for k, v in raw.items()}

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
        ``None`` removes its calibration. Temperatures must be finite and positive; a binary attribute's may
        be NaN (that attribute keeps its uncalibrated probability)."""
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
        # NaN: this binary attribute keeps its uncalibrated probability (models/calibration.py), not the others
        fitted = t[~torch.isnan(t)] if isinstance(o, Binary) else t
        if not len(fitted) or not bool(torch.isfinite(fitted).all()) or bool((fitted <= 0).any()):
            raise ValueError(f"output {name!r}: temperatures must be finite and > 0 (NaN: an attribute left "
                             f"uncalibrated, not all of them), got {t.tolist()}")
        vals = tuple(float(v) for v in t.float().tolist())  # what the buffer holds, so a reload is exact
        self._store(key, vals)
        self._replace(replace(o, **{_temperature_field(o): vals[0] if isinstance(o, Categorical) else vals}))

    def shiftable(self) -> list[Output]:
        """The outputs a fitted shift applies to: regression scores."""
        return [o for o in self.outputs if isinstance(o, Regression)]

    def set_shift(self, name: str, shift) -> None:
        """Add ``shift`` (a finite number) to regression output ``name``'s scores; ``None`` removes it."""
        o = self[name]
        if not isinstance(o, Regression):
            raise ValueError(f"output {name!r} ({o.kind}) is not a regression score: no shift")
        key = SHIFT_PREFIX + name
        if shift is None:
            self._buffers.pop(key, None)
            self._replace(replace(o, shift=None))
            return
        t = torch.as_tensor(shift, dtype=torch.float64).reshape(-1)
        if t.numel() != 1 or not bool(torch.isfinite(t).all()):
            raise ValueError(f"output {name!r}: a shift is one finite number, got {t.tolist()}")
        value = float(t.float())  # what the buffer holds, so a reload is exact
        self._store(key, (value,))
        self._replace(replace(o, shift=value))

    def clear_calibration(self) -> None:
        for o in self.calibratable():
            self.set_temperatures(o.name, None)
        for o in self.shiftable():
            self.set_shift(o.name, None)

    def _store(self, key: str, values: tuple[float, ...]) -> None:
        """Buffer ``key`` holds ``values`` (float32), on the device of the buffer it replaces."""
        buf = torch.tensor(values, dtype=torch.float32)
        if key in self._buffers:
            self._buffers[key] = buf.to(self._buffers[key].device)
        else:
            self.register_buffer(key, buf)

    def _replace(self, new: Output) -> None:
        self.outputs = tuple(new if o.name == new.name else o for o in self.outputs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A calibrated checkpoint into a freshly built (uncalibrated) model: make the buffers first, so that
        # nn.Module's loading fills them and strict loading sees no unexpected key.
        setters = {CALIBRATION_PREFIX: self.set_temperatures, SHIFT_PREFIX: self.set_shift}
        for key, value in state_dict.items():
            for head in setters:
                if key.startswith(prefix + head) and key[len(prefix):] not in self._buffers:
                    name = key[len(prefix) + len(head):]
                    if name in self.names() and isinstance(value, torch.Tensor):
                        self.register_buffer(head + name, torch.ones_like(value, dtype=torch.float32))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key in list(self._buffers):
            for head, setter in setters.items():
                if key.startswith(head) and prefix + key in state_dict:
                    try:
                        setter(key[len(head):], self._buffers[key].detach().cpu())
                    except ValueError as e:
                        error_msgs.append(f"{prefix}{key}: {e}")


def _comparable(o: Output) -> Output:
    """``o`` with the NaN of an uncalibrated attribute as None (NaN never equals itself)."""
    if isinstance(o, Binary) and o.temperatures is not None:
        return replace(o, temperatures=tuple(None if t != t else t for t in o.temperatures))
    return o


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

