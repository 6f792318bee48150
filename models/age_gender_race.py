"""Age / gender / ethnicity network for UTKFace (source text 004_517cf5b39635cad0: "Building a Facial
Attributes Model using Multi-Task Learning", a blog post).

What the text fixes: a face-embedding backbone pretrained on faces (FaceNet, Inception-ResNet, on
MS-Celeb-1M) cut after its global average pooling (the bottleneck, batch-norm and dropout layers removed);
two fully connected layers with LeakyReLU; three softmax branches: age as 117 classes (ages 0–116) whose
expectation Σ p_k · k is the predicted age, gender (male, female) and ethnicity (UTKFace's White, Black,
Asian, Indian, Others); every loss has the same weight. Faces are cropped and aligned beforehand (MTCNN;
UTKFace's aligned-and-cropped release is already so).

Readings we chose:

* Backbone (``backbone``). By default dlib's face-recognition ResNet (``backbone="dlib_resnet"``,
  ``models/dlib_resnet.py``): like FaceNet, a ResNet trained on millions of faces for face recognition, and the
  only such network whose weights ship in a package here (``face-recognition-models``, CC0). The blog cuts
  FaceNet after its global average pooling, before the bottleneck; the same cut in dlib's network is its
  256-D global average pool, before its 128-D projection (``face_feature="pooled"``, the default;
  ``"descriptor"`` takes the 128-D descriptor). ``backbone_freeze``: ``"all"`` (the default for this backbone: the trunk is a fixed
  embedding, as the blog's "pretrained model for embedding faces" reads, and its outputs are cached, so the
  heads train in minutes on a CPU), ``"none"`` (fine-tuned end to end) or the number of leading groups kept
  fixed (stem, level4, level3, level2, level1, level0, fc). The blog does not say whether it fine-tuned.
  A trainable trunk learns at ``backbone_lr_scale`` × the heads' learning rate (0.01 by default: measured on
  UTKFace from the frozen run's heads, Adam at 0.1 × 1e-3 on the pretrained trunk made the first epoch worse
  than the frozen model (validation mean accuracy 0.836 against 0.888), 0.01 × gave 0.891 then 0.901;
  docs/results.md).
  ``backbone_weights`` for this trunk: a path to dlib's file (refused unless its sha256 is the known one),
  ``"random"``, or by default the installed package's file.
  ``backbone="resnet"`` is a torchvision ResNet (``models.backbones.resnet``) whose ``fc`` is removed, keeping
  its global average pooling, for users who bring their own weights (``backbone_weights``, a torchvision
  state dict by path or s3:// URI); ``depth`` 50 by default (ResNet-50 is the torchvision trunk closest to
  Inception-ResNet-v1 in capacity), 18 the light option. Given only ``depth`` (the arguments of earlier
  versions), the model is the ResNet one.
* Input. dlib's network was trained on 150×150 chips, 5-point aligned with 25 % padding
  (``get_face_chip_details(shape, 150, 0.25)``); its input is ``(rgb - (122.782, 117.001, 104.298)) / 256``.
  UTKFace's aligned faces are dlib chips too: dlib's own 5-point alignment run on 386 of them puts the
  150/0.25 chip at the image centre (±1 px) and 215 px wide, i.e. UTKFace is dlib's default 200×200 chip
  with 20 % padding. We stretch the whole 200×200 face to 150×150 (``resize="stretch"``): the same alignment,
  the face 7 % larger than in dlib's chip (docs/results.md measures what that costs). The face template for
  photos (``Preprocessing.template``) is dlib's 150/0.25 chip (``dlib_resnet.chip_template``), scaled with
  ``image_size``. The ResNet backbone: 160×160 (FaceNet's input), ImageNet mean and std, stretched.
* Fully connected layers. The blog gives no widths: ``hidden=(512, 256)`` by default, each Linear followed
  by LeakyReLU with slope 0.3 (``leaky_slope``; the Keras default the blog's Keras model would have used).
* Heads. "3 branches of MLPs" whose output layers are softmaxes: each branch is one linear layer to its
  classes on top of the shared FC layers (the figure with more detail is lost).
* Recipe. The blog gives only "softmax heads, equal weights". Ours: Adam, lr 1e-3 (the Keras default), batch
  32, up to 30 epochs, lr × 0.1 when the validation loss has not improved for 3 epochs, early stopping after
  6, horizontal flips (aligned faces are near-symmetric; no label depends on the side).
* Checkpoint selection uses ``mean_accuracy`` (gender and race); the age RMSE is reported alongside.
* Initialisation of the layers above the trunk. The blog gives none: PyTorch's default for each Linear
  (Kaiming-uniform).
"""

from __future__ import annotations

import torch
from torch import nn

from . import register_model
from .backbones import BACKBONES, FaceBackbone, dlib_preprocessing, optimizer_groups_with_trunk, resnet
from .base import FaceModel, Recipe
from .dlib_resnet import INPUT_SIZE as DLIB_SIZE
from .dlib_resnet import min_input_size
from .outputs import AgeDistribution, Categorical
from .outputset import OutputSet
from .preprocess import Preprocessing

UTKFACE_RACES = ("White", "Black", "Asian", "Indian", "Others")  # UTKFace's race codes 0-4 (facedata reads them)
MIN_IMAGE_SIZE = 32  # a ResNet's stride is 32


@register_model("age_gender_race")
class AgeGenderRaceNet(FaceModel):
    primary_metric = "mean_accuracy"
    primary_mode = "max"

    def __init__(self, depth: int | None = None, image_size: int | None = None, hidden: tuple[int, ...] = (512, 256),
                 leaky_slope: float = 0.3, age_bins: int = 117, backbone_weights: str | None = None,
                 backbone: str | None = None, backbone_freeze: str | int | None = None, backbone_lr_scale: float = 0.01,
                 face_feature: str = "pooled"):
        super().__init__()
        if backbone is None:
            backbone = "dlib_resnet" if depth is None else "resnet"
        if backbone not in BACKBONES:
            raise ValueError(f"age_gender_race: backbone must be one of {BACKBONES}, got {backbone!r}")
        dlib = backbone == "dlib_resnet"
        if dlib and depth is not None:
            raise ValueError("age_gender_race: depth is for backbone='resnet'; dlib_resnet has one depth")
        if image_size is None:
            image_size = DLIB_SIZE if dlib else 160
        min_size = min_input_size() if dlib else MIN_IMAGE_SIZE
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < min_size:
            raise ValueError(f"age_gender_race: image_size must be an integer >= {min_size}, got {image_size!r}")
        widths = tuple(hidden)
        if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
            raise ValueError(f"age_gender_race: hidden must be positive integer widths, got {hidden!r}")
        if not isinstance(age_bins, int) or isinstance(age_bins, bool) or age_bins < 2:
            raise ValueError(f"age_gender_race: age_bins must be an integer >= 2, got {age_bins!r}")
        if not 0.0 <= float(leaky_slope) < 1.0:
            raise ValueError(f"age_gender_race: leaky_slope must be in [0, 1), got {leaky_slope!r}")
        if not 0.0 < float(backbone_lr_scale) <= 10.0:
            raise ValueError(f"age_gender_race: backbone_lr_scale must be in (0, 10], got {backbone_lr_scale!r}")
        self.backbone_lr_scale = float(backbone_lr_scale)

        self.outputs = OutputSet((
            AgeDistribution("age", bins=age_bins),
            Categorical("gender", classes=("male", "female")),
            Categorical("race", classes=UTKFACE_RACES),
        ))
        self.recipe = Recipe(optimizer="adam", lr=1e-3, batch_size=32, epochs=30, schedule="plateau",
                             schedule_args={"factor": 0.1, "patience": 3}, early_stopping_patience=6,
                             augment={"hflip": 0.5})
        if dlib:
            self.preprocessing = dlib_preprocessing(image_size)
            weights = "package" if backbone_weights is None else (None if backbone_weights == "random" else backbone_weights)
            self.backbone = FaceBackbone(weights, feature=face_feature,
                                         freeze="all" if backbone_freeze is None else backbone_freeze)
            width = self.backbone.out_features
        else:
            if backbone_freeze not in (None, "none"):
                raise ValueError("age_gender_race: backbone_freeze is for the dlib_resnet backbone (a ResNet trains whole)")
            self.preprocessing = Preprocessing(size=(image_size, image_size), resize="stretch")
            self.backbone = resnet(50 if depth is None else depth, weights=backbone_weights)  # ValueError: bad depth/file
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

    def optimizer_groups(self, lr: float) -> list[dict]:
        """The heads at ``lr``, a trainable face backbone at ``backbone_lr_scale * lr``; frozen parameters are
        left out."""
        return optimizer_groups_with_trunk(self, self.backbone, lr, self.backbone_lr_scale)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc(self.backbone(x))
        return {name: head(h) for name, head in self.heads.items()}
