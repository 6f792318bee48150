"""Small hard-parameter-sharing CNN for gender and eyeglasses (source text 003_2959b2733c7d97c0:
"Multi-Task Learning of CNN For Facial Attribute Recognition", Yuan, Chen, Liu, Zhang, SFU).

What the text fixes: 50×50 grayscale input scaled to [0, 1]; a shared trunk of 3×3 convolutions (stride 1,
ReLU) and sub-sampling, whose first layer has 32 feature maps; then one branch per task; per-task
cross-entropy with weights w1 = w2 = 1; batch 32; early stopping when the validation loss has not fallen
for two epochs; learning rate L_i = L_{i-1} (1 − 1/epoch_i), L_0 = 0.001; 1,524,740 trainable parameters
for the multi-task CNN against 1,525,060 for the two single-task CNNs together.

Readings we chose (the figure with the layer list did not survive extraction):

* Layers. The two parameter counts pin the architecture down: they differ by exactly 320 = 3·3·1·32 + 32,
  the first conv layer, so that layer is the shared trunk and each branch holds (1,524,740 − 320) / 2 =
  762,210 parameters. A branch of conv 3×3 32→64 (18,496), 2×2 max-pool, flatten (11·11·64 = 7,744),
  dense 96 (743,520) and a 2-way softmax (194) has exactly 762,210. So: conv3×3(1→32)+ReLU+maxpool2 shared,
  and per task conv3×3(32→64)+ReLU+maxpool2 → dense 96 + ReLU → dense 2 (softmax). ``tasks`` with a single
  entry gives the single-task CNN of the comparison (762,530 parameters, the same layers).
* Output. A 2-way softmax with cross-entropy, which equals the paper's binary cross-entropy.
* Input normalisation: pixels / 255 (mean 0, std 1 on the [0, 1] scale), as the text says.
* Learning-rate rule, "L_i = L_{i-1} (1 − 1/Epoch_i), L_0 = 0.001". Read literally with Epoch_1 = 1, the
  first epoch would get L_0 (1 − 1/1) = 0 and every later one 0 too. Two readings make sense, selected by
  ``lr_first_epoch``: ``keep`` (default) trains the first epoch at L_0 and applies the rule from the second
  on, so epoch i (from 1) trains at L_0 / i (1e-3, 5e-4, 3.3e-4, ...); ``decay`` applies the rule from the
  first epoch with L_0 as the rate before it and Epoch counting that start as 1, so epoch i trains at
  L_0 / (i + 1) (5e-4, 3.3e-4, ...). Both are schedule ``hard_sharing`` with ``schedule_args``
  ``{"first_epoch": ...}``. The optimiser is not named; Adam (the Keras default of the time) is ours.
* Early stopping: "when the loss function of validation set stops falling in more than two epochs, we
  manually terminate this training". We watch the validation loss (the weighted sum of the two
  cross-entropies, ``primary_metric = "val_loss"``), and an epoch counts as an improvement only when the
  loss falls below the best so far (a tie has not fallen); training stops after two epochs in a row without
  one (``early_stopping_patience = 2``, Keras's ``EarlyStopping(monitor="val_loss", patience=2)``: "more
  than two" read as the third epoch never starting). The kept checkpoint is the epoch of lowest validation
  loss, the one the stopping rule measured against. ``--patience`` changes the count.
* Epochs. The text says the model "usually converge[s] well in no more than 10 epochs" and gives no
  cap; ``epochs = 20`` is ours, a ceiling the stopping rule above normally ends well before (the named
  recipe ``hard_sharing-celeba`` trains 10).
* Initialisation. The text gives none: every layer starts from PyTorch's default (Kaiming-uniform).
"""

from __future__ import annotations

import torch
from torch import nn

from . import register_model
from .base import FaceModel, Recipe
from .outputs import Categorical
from .outputset import OutputSet
from .preprocess import Preprocessing

HARD_SHARING_FIRST_EPOCH = ("keep", "decay")  # readings of the LR rule's first epoch (core/engine.py)

TASKS = {
    "gender": Categorical("gender", classes=("male", "female")),
    "eyeglasses": Categorical("eyeglasses", classes=("no_eyeglasses", "eyeglasses")),
}


def _branch(hidden: int, in_size: int, num_classes: int = 2) -> nn.Sequential:
    side = (in_size - 2) // 2
    return nn.Sequential(
        nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64 * side * side, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes),
    )


@register_model("hard_sharing")
class HardSharingCNN(FaceModel):
    primary_metric = "val_loss"  # early stopping and checkpoint selection: "the loss function of validation set"
    primary_mode = "min"

    def __init__(self, tasks: tuple[str, ...] = ("gender", "eyeglasses"), image_size: int = 50,
                 hidden: int = 96, task_weights: tuple[float, ...] | None = None, lr_first_epoch: str = "keep"):
        super().__init__()
        unknown = set(tasks) - set(TASKS)
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {sorted(TASKS)}")
        if lr_first_epoch not in HARD_SHARING_FIRST_EPOCH:
            raise ValueError(f"lr_first_epoch must be one of {HARD_SHARING_FIRST_EPOCH}, got {lr_first_epoch!r}")
        weights = task_weights or (1.0,) * len(tasks)
        self.tasks = tuple(tasks)
        self.outputs = OutputSet(tuple(
            Categorical(t, weight=float(w), classes=TASKS[t].classes) for t, w in zip(tasks, weights)
        ))
        self.preprocessing = Preprocessing(size=(image_size, image_size), channels=1, mean=(0.0,), std=(1.0,))
        self.recipe = Recipe(optimizer="adam", lr=1e-3, batch_size=32, epochs=20, schedule="hard_sharing",
                             schedule_args={"first_epoch": lr_first_epoch}, early_stopping_patience=2)
        self.trunk = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        trunk_side = (image_size - 2) // 2
        self.branches = nn.ModuleDict({t: _branch(hidden, trunk_side) for t in self.tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.trunk(x)
        return {t: branch(shared) for t, branch in self.branches.items()}
