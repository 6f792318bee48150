"""What every architecture shares: its outputs, preprocessing, training recipe and the loss, metric and
columns derived from them. An architecture subclasses :class:`FaceModel`, builds its layers, declares
``outputs``/``preprocessing``/``recipe`` and implements ``forward(x) -> dict[name, Tensor]``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .outputs import Categorical
from .outputset import OutputSet, add_stats, finalize_metrics
from .preprocess import Preprocessing, normalize


@dataclass
class Recipe:
    """A paper's training recipe as plain values (the train job's defaults; every field is a flag).

    ``schedule``: ``none``; ``step`` (``step_size`` epochs, ``gamma``); ``milestones`` (``milestones``,
    ``gamma``); ``plateau`` (``factor``, ``patience``, on the validation loss); ``hard_sharing``
    (L_i = L_{i-1} (1 - 1/epoch_i), see models/hard_sharing.py). ``validate_every``: validate on the whole
    validation set every P iterations (DMM-CNN's dynamic weights and thresholds) in addition to every epoch.
    ``average_epochs``: validate and save the mean of the weights of the last K epochs (core/averaging.py;
    1: off). ``label_smoothing``: ε of every categorical output's training loss (gender, race, smile, eyeglasses;
    not the age distribution, not binary attributes): ``Categorical.loss``; 0: off.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 10
    schedule: str = "none"
    schedule_args: dict = field(default_factory=dict)
    early_stopping_patience: int | None = None
    augment: dict = field(default_factory=dict)
    validate_every: int | None = None
    average_epochs: int = 1
    label_smoothing: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class FaceModel(nn.Module):
    """Base class of the model zoo. Subclasses set ``self.outputs``, ``self.preprocessing``,
    ``self.recipe`` in ``__init__`` and implement ``forward``."""

    name: str = ""
    primary_metric: str = "mean_accuracy"  # checkpoint selection and early stopping
    primary_mode: str = "max"

    outputs: OutputSet
    preprocessing: Preprocessing
    recipe: Recipe
    config: dict  # the constructor arguments, set by models.create_model; saved in checkpoints

    # --- input -----------------------------------------------------------------------------------
    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) from ``preprocess.decode`` -> the float input of ``forward``."""
        return normalize(batch, self.preprocessing)

    def set_mirror(self, on: bool) -> None:
        """Read faces with their mirror images too (``infer``) or not; refused (``ValueError``) for landmarks
        whose left/right order is unknown."""
        if on:
            self.outputs.check_mirror()
        self.preprocessing = replace(self.preprocessing, mirror=bool(on))

    def infer(self, x: torch.Tensor, forward=None) -> dict:
        """The raw outputs a face is labelled and evaluated with: ``forward(x)`` (default: this model; the
        runner passes its compiled graph), or with ``preprocessing.mirror`` the mean over ``x`` and its
        mirror image (``OutputSet.mirror_average``), two passes of the same batch shape. Training never
        calls this: its forward is the plain one."""
        forward = self if forward is None else forward  # not `or`: a compiled module has __len__
        raw = forward(x)
        if not self.preprocessing.mirror:
            return raw
        return self.outputs.mirror_average(raw, forward(x.flip(-1)))

    # --- training --------------------------------------------------------------------------------
    def loss(self, raw: dict, targets: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of the task losses (rows without a label are masked per task); ``label_smoothing``: the
        recipe's, for the categorical outputs (:class:`Recipe`)."""
        parts = {}
        total = None
        for o in self.outputs:
            if o.target_column not in targets:
                continue
            kw = {"smoothing": label_smoothing} if label_smoothing and isinstance(o, Categorical) else {}
            part = o.masked_loss(raw[o.name], targets[o.target_column], **kw)
            parts[o.name] = part.detach()
            total = o.weight * part if total is None else total + o.weight * part
        if total is None:
            raise ValueError(f"no target for any output of {self.name}: {self.outputs.names()}")
        return total, parts

    def on_validation(self, stats: dict, epoch: int) -> dict:
        """Hook called with the summed validation statistics (identical on every worker); DMM-CNN updates
        its dynamic weights and thresholds here. Returns values to log."""
        return {}

    # --- evaluation and columns ------------------------------------------------------------------
    def column_context(self) -> dict:
        """Extra state the outputs need to build their columns (DMM-CNN: its adaptive thresholds)."""
        return {}

    def stats(self, raw: dict, targets: dict) -> dict:
        ctx = self.column_context()
        out = {}
        for o in self.outputs:
            if o.target_column in targets:
                out[o.name] = o.stats(raw[o.name].detach().cpu(), targets[o.target_column].cpu(), **_ctx_for(ctx, o))
        return out

    def metrics(self, stats: dict) -> dict[str, float]:
        return finalize_metrics(self.outputs, stats)

    def to_columns(self, raw: dict, geometry: list[dict] | None = None) -> dict[str, list]:
        """Raw outputs of a batch -> the user-facing columns of every output."""
        ctx = self.column_context()
        cols: dict[str, list] = {}
        for o in self.outputs:
            cols.update(o.to_columns(raw[o.name].detach().float().cpu(), geometry, **_ctx_for(ctx, o)))
        return cols

    def describe(self) -> dict:
        return {
            "model": self.name,
            "outputs": self.outputs.describe(),
            "preprocessing": self.preprocessing.to_dict(),
            "primary_metric": self.primary_metric,
        }


def _ctx_for(ctx: dict, output) -> dict:
    """Per-output column context: ``ctx`` may map output names to dicts."""
    sub = ctx.get(output.name)
    return sub if isinstance(sub, dict) else {}


__all__ = ["FaceModel", "Recipe", "add_stats"]
