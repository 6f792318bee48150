"""The base class of every model output (models/outputs.py describes them all and what is derived from them):
what each kind answers for training, evaluation and what a user reads."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch

from .losses import valid_rows

Tensor = torch.Tensor


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

    def masked_loss(self, raw: Tensor, target: Tensor, **kw) -> Tensor:
        """Loss over the rows that have a label; 0 (with a gradient path) when none do. ``kw``: the output's own
        training options (a categorical output's ``smoothing``)."""
        keep = valid_rows(target)
        if not bool(keep.any()):
            return raw.sum() * 0.0
        return self.loss(raw[keep], target[keep], **kw)

    # --- evaluation -----------------------------------------------------------------------------
    def stats(self, raw: Tensor, target: Tensor, **ctx) -> dict[str, Tensor]:
        """Summable float64 statistics for one batch (rows without a label are ignored)."""
        raise NotImplementedError

    def metrics(self, stats: dict[str, Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def unmirror(self, raw: Tensor) -> Tensor:
        """Raw output of the mirrored face -> the raw output the face itself would have, to be averaged with
        it (test-time mirror averaging, models/preprocess.py ``mirror``). The same values here: no label of
        the zoo names a side (gender, age, beauty, smile, glasses...); landmarks override this."""
        return raw

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
