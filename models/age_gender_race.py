"""Age / gender / ethnicity network for UTKFace (source text 004_517cf5b39635cad0: "Building a Facial
Attributes Model using Multi-Task Learning", a blog post).

What the text fixes: a face-embedding backbone pretrained on faces (FaceNet, Inception-ResNet, on
MS-Celeb-1M) cut after its global average pooling (the bottleneck, batch-norm and dropout layers removed);
two fully connected layers with LeakyReLU; three softmax branches: age as 117 classes (ages 0–116) whose
expectation Σ p_k · k is the predicted age, gender (male, female) and ethnicity (UTKFace's White, Black,
Asian, Indian, Others); every loss has the same weight. Faces are cropped and aligned beforehand (MTCNN;
UTKFace's aligned-and-cropped release is already so).

Readings we chose:

* Backbone. FaceNet weights cannot be had here, so the trunk is a torchvision ResNet
  (``models.backbones.resnet``) whose ``fc`` is removed, keeping its global average pooling. The default
  depth is 50: ResNet-50's trunk (23.5 M parameters, a 2,048-d pooled feature) is the torchvision trunk
  closest to Inception-ResNet-v1 (a 1,792-d pooled feature, parameters of the same order) in capacity and
  embedding width; ``depth=18`` is the light option for CPU runs. ``backbone_weights`` takes a torchvision ResNet
  state dict by path or s3:// URI (e.g. ImageNet weights, or face-trained weights converted to it).
* Fully connected layers. The blog gives no widths: ``hidden=(512, 256)`` by default, each Linear followed
  by LeakyReLU with slope 0.3 (``leaky_slope``; the Keras default the blog's Keras model would have used).
* Heads. "3 branches of MLPs" whose output layers are softmaxes: each branch is one linear layer to its
  classes on top of the shared FC layers (the figure with more detail is lost).
* Input. 160×160 RGB, FaceNet's input size; the whole (already cropped) face is stretched to it
  (``resize="stretch"``); ImageNet mean and std, matching the torchvision trunk.
* Recipe. The blog gives only "softmax heads, equal weights". Ours: Adam, lr 1e-3 (the Keras default), batch
  32, up to 30 epochs, lr × 0.1 when the validation loss has not improved for 3 epochs, early stopping after
  6, horizontal flips (aligned faces are near-symmetric; no label depends on the side).
* Checkpoint selection uses ``mean_accuracy`` (gender and race); the age RMSE is reported alongside.
"""

from __future__ import annotations

import torch
from torch import nn

from . import register_model
from .backbones import resnet
from .base import FaceModel, Recipe
from .outputs import AgeDistribution, Categorical, OutputSet
from .preprocess import Preprocessing

UTKFACE_RACES = ("White", "Black", "Asian", "Indian", "Others")  # facedata.datasets.UTKFACE_RACES
MIN_IMAGE_SIZE = 32  # a ResNet's stride is 32


@register_model("age_gender_race")
class AgeGenderRaceNet(FaceModel):
    primary_metric = "mean_accuracy"
    primary_mode = "max"

    def __init__(self, depth: int = 50, image_size: int = 160, hidden: tuple[int, ...] = (512, 256),
                 leaky_slope: float = 0.3, age_bins: int = 117, backbone_weights: str | None = None):
        super().__init__()
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"age_gender_race: image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
        widths = tuple(hidden)
        if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
            raise ValueError(f"age_gender_race: hidden must be positive integer widths, got {hidden!r}")
        if not isinstance(age_bins, int) or isinstance(age_bins, bool) or age_bins < 2:
            raise ValueError(f"age_gender_race: age_bins must be an integer >= 2, got {age_bins!r}")
        if not 0.0 <= float(leaky_slope) < 1.0:
            raise ValueError(f"age_gender_race: leaky_slope must be in [0, 1), got {leaky_slope!r}")

        self.outputs = OutputSet((
            AgeDistribution("age", bins=age_bins),
            Categorical("gender", classes=("male", "female")),
            Categorical("race", classes=UTKFACE_RACES),
        ))
        self.preprocessing = Preprocessing(size=(image_size, image_size), resize="stretch")
        self.recipe = Recipe(optimizer="adam", lr=1e-3, batch_size=32, epochs=30, schedule="plateau",
                             schedule_args={"factor": 0.1, "patience": 3}, early_stopping_patience=6,
                             augment={"hflip": 0.5})

        self.backbone = resnet(depth, weights=backbone_weights)  # ValueError for an unknown depth or bad file
        width = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()  # keep conv1..layer4 and the global average pooling
        layers: list[nn.Module] = []
        for w in widths:
            layers += [nn.Linear(width, w), nn.LeakyReLU(float(leaky_slope), inplace=True)]
            width = w
        self.fc = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({
            "age": nn.Linear(width, age_bins),
            "gender": nn.Linear(width, 2),
            "race": nn.Linear(width, len(UTKFACE_RACES)),
        })

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc(self.backbone(x))
        return {name: head(h) for name, head in self.heads.items()}
