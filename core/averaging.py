"""Weight averaging over epochs (``Recipe.average_epochs``), used by both training loops (core/engine.py
``fit`` in one process, raytasks/train/worker.py under Ray Train).

After each epoch, the model that is validated, ranked by early stopping and saved in the epoch's checkpoint
is the mean of the weights the model had at the end of the last ``K`` epochs; training goes on from its own
latest weights. This is the weight averaging of Izmailov et al., "Averaging Weights Leads to Wider Optima
and Better Generalization" (UAI 2018). Where we chose (their text averages from a chosen epoch on, under a
constant or cyclic learning rate, and recomputes BatchNorm's statistics with one pass over the training data):

* a sliding window of the last ``K`` epochs (fewer in the first ``K - 1``), so that no start epoch has to be
  chosen and early stopping reads an average after every epoch;
* BatchNorm's running mean and variance are averaged like the weights, not recomputed (no extra pass over
  the data); every other buffer (``num_batches_tracked``, DMM-CNN's dynamic weights and thresholds, which
  its validation hook sets) is the latest epoch's;
* the validation hook (``FaceModel.on_validation``) sees the averaged model, since that is what is validated.

Measured (docs/results.md, "Weight averaging"): HMTNet on SCUT-FBP5500, the average of three epochs'
checkpoints against each of them alone. ``K = 1`` (the default of every model) changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn


def averaged_keys(model: nn.Module) -> list[str]:
    """The state-dict entries that are averaged: every parameter and BatchNorm's running statistics."""
    keys = [name for name, _ in model.named_parameters()]
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            keys += [f"{prefix}.{b}" if prefix else b for b in ("running_mean", "running_var")]
    return keys


class EpochAverage:
    """The window of the last ``epochs`` epochs' weights (CPU copies) and the swap in and out of their mean.

    ``push(model)`` at the end of an epoch's training; ``use_average(model)`` then puts the mean in the
    model's own tensors (in place, so a DDP wrapper keeps working); ``restore(model)`` puts the latest
    weights back before the next epoch trains. ``state()`` / ``resume()`` carry the window across a
    restart (the latest weights are its last entry)."""

    def __init__(self, model: nn.Module, epochs: int = 1):
        if int(epochs) != epochs or epochs < 1:
            raise ValueError(f"average_epochs must be a whole number >= 1, got {epochs!r}")
        self.epochs = int(epochs)
        self.keys = averaged_keys(model) if self.epochs > 1 else []
        self.window: list[dict[str, torch.Tensor]] = []
        self.swapped = False

    @property
    def active(self) -> bool:
        return self.epochs > 1

    def push(self, model: nn.Module) -> None:
        if not self.active:
            return
        own = model.state_dict()
        # contiguous, whatever the model's layout (channels_last on a GPU): the window is saved in a run's
        # training state, whose loader refuses any other tensor (raytasks/train/worker.py save_state)
        self.window = [*self.window, {k: own[k].detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
                                      for k in self.keys}][-self.epochs:]

    def use_average(self, model: nn.Module) -> None:
        if not self.active or not self.window or self.swapped:
            return
        n = len(self.window)
        mean = {k: sum(w[k].double() for w in self.window) / n for k in self.keys}
        self._load(model, mean)
        self.swapped = True

    def restore(self, model: nn.Module) -> None:
        if self.swapped:
            self._load(model, self.window[-1])
            self.swapped = False

    def state(self) -> list[dict[str, torch.Tensor]]:
        return list(self.window)

    def resume(self, model: nn.Module, window: list[dict] | None) -> None:
        """A restart: ``model`` holds a checkpoint's weights, the mean of ``window`` (saved with it by
        ``state()``); the window is taken back and the model gets its latest weights, to train on from."""
        if not self.active or not window:
            return
        missing = set(self.keys) - set(window[-1])
        if missing:
            raise ValueError(f"the saved weight window lacks {sorted(missing)[:3]}")
        self.window = list(window)[-self.epochs:]
        self._load(model, self.window[-1])
        self.swapped = False

    @staticmethod
    def _load(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
        own = model.state_dict()
        with torch.no_grad():
            for k, v in values.items():
                own[k].copy_(v.to(dtype=own[k].dtype, device=own[k].device))
