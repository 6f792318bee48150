"""HMTNet: hierarchical multi-task fully convolutional network for gender, race and facial beauty
(source text 000_65bb72c7911c4614: "HMTNet", Xu et al.; SCUT-FBP5500).

What the text fixes:

* Three parts: shared lower layers, a feature aggregator that fuses feature maps of several levels, and
  branched sub-networks; every layer is convolutional (no fully connected layer).
* GNet (gender) is branched after ``relu3``, RNet (race) after ``relu5``; their input is 13×13×512 at
  224 px. Table 1, for both: conv 512→256 k3 p0, conv 256→128 k3 p0, max-pool 3, conv 128→2 k1 stride 2,
  global average pooling; "BatchNorm and ReLU layers are not shown".
* ANet (attractiveness) predicts the beauty score from the aggregated features. Aggregation is either the
  average of same-shaped feature maps of different levels (Eq. 1, the default: PC 0.8783) or their
  depth-wise concatenation (Eq. 2, PC 0.8706). The paper also calls the network "a feature extractor
  (after relu5)".
* Losses: cross-entropy (gender, race), Smooth Huber with δ = 0.6 (beauty, ``losses.smooth_huber_loss``);
  task weights α_g = α_r = 1, α_a = 2. Table 4 compares it with MSE, L1 and Smooth L1 losses: ``beauty_loss``
  selects one of ``smooth_huber``, ``mse``, ``l1``, ``smooth_l1`` and ``delta`` sets δ (Smooth L1's β too).
* Training: 224×224 random crops of images whose shorter side is 227, random rotation within 30°, colour
  jitter, batch norm, SGD for 170 epochs, weight decay 0.05, batch 32, lr 0.001 divided by 10 every 50
  epochs. The weight decay of 0.05 is what the text says (and what the authors' released training code
  uses); it is unusually high for SGD fine-tuning, but we keep it as the recipe default.

Readings we chose (Fig. 1, which showed the trunk, did not survive extraction):

* Trunk. ``relu3``/``relu5``, 13×13×512 at 224 px for both, and a fully convolutional ``fc6``/``fc7`` are
  the layer names and shapes of VGG-M (Chatfield et al.), the face variant of which (VGG-M-Face with batch
  norm) the authors' public implementation of HMTNet builds on: conv1 7×7/2 96 → max-pool 3/2 → conv2
  5×5/2 p1 256 → max-pool 3/2 (ceil) → conv3, conv4, conv5 3×3 p1 512, each conv followed by BatchNorm
  and ReLU. At 224 px conv3–conv5 are 13×13×512, so GNet can take 512 channels after relu3 and RNet after
  relu5, exactly as Table 1 says. (SqueezeNet 1.0's fire modules were the other candidate; only its
  last fire module has 13×13×512, so it cannot give GNet 512 channels at 13×13 after a third ReLU.) The
  trunk's layers keep the VGG-M-Face weight names (``conv1``, ``bn49``, …, ``conv5``, ``bn53``) so that
  a ``vgg_m_face_bn_dag`` state dict loads as it is (``backbone_weights``).
* Feature aggregator. Average (or concatenation) of ``aggregate_levels``, by default conv3 (before its
  BN), relu3 and relu5, the levels the authors' implementation averages; any of conv3/relu3/conv4/relu4/
  conv5/relu5 can be chosen, all 13×13×512 at 224 px.
* ANet. VGG-M's head made convolutional, as in the authors' implementation: max-pool 3/2 → fc6 (conv
  6×6, ``anet_width`` = 4096 channels) → BN → ReLU → fc7 (1×1) → BN → ReLU, a second average (or
  concatenation) aggregator over fc6, fc7 (before BN) and relu7 (``anet_aggregator``), then fc8 (1×1 to
  one channel) and global average pooling. At 224 px fc6 sees a 6×6 map and everything after it is 1×1.
* Branch details. BN + ReLU after the two 3×3 convs of GNet/RNet; the final 1×1 conv gives the logits
  directly (the authors' code also put BN + ReLU after it, which clips logits at zero; we keep logits
  linear). RNet reads relu5 as the paper says (``rnet_from``; the authors' code feeds it the aggregated
  map, ``rnet_from="aggregate"``); GNet reads relu3 (``gnet_from``).
* Smaller inputs (fast CPU runs). Table 1's "Max Pooling (3)" gives no stride; we read it as 3 (the
  kernel: 9 → 3 at 224 px, where a stride of 2 would give 4) and use ``ceil_mode`` so that maps smaller than 3×3 still pool to 1×1; fc6's kernel is ``min(6, map side)``
  after pool5 (6 at 224 px and above). The smallest input is 96 px (relu3 must be at least 5×5 for the
  two unpadded 3×3 convs of GNet/RNet). The model is fully convolutional above its ``image_size`` (larger
  inputs are pooled globally); an input too small for its fc6 is refused with the ``image_size`` to use.
* Size. 101,787,717 parameters at 224 px (trunk 6,532,416; GNet and RNet 1,475,970 each; ANet 92,303,361,
  of which fc6 is 75.5 M as in VGG-M); 34,678,853 at 112 px. Concatenation makes fc6 read 3×512
  channels (252,790,853 parameters at 224 px); ``anet_width`` shrinks ANet for light runs.
* Outputs. ``race`` has 2 classes by default (SCUT-FBP5500: Asian, Caucasian); ``race_classes=5`` gives
  UTKFace's names, other counts generic names. ``beauty`` is a regression in [1, 5] (clamped when
  decoded, not in training).
* Smooth Huber. The extracted Eq. 5 (``log cosh`` inside δ, ``|x|`` outside) jumps at δ and gives errors
  just inside δ half the gradient of outliers; we use the continuous form whose two pieces meet in value
  and slope at δ, Huber's with ``½x²`` replaced by ``log cosh`` (the reasons are in
  ``losses.smooth_huber_loss``).
* Initialisation. The text gives none: the trunk, the aggregators and the branches start from PyTorch's
  default initialisation of each layer (Kaiming-uniform convolutions, BN at weight 1, bias 0).
* No augmentation (``--no-augment``): training then decodes exactly as evaluation (the centre 224 crop of
  the 227 resize), so both see the same input size; the 227 margin is only kept for the random crop.
* Preprocessing. ImageNet mean and std (the authors' SCUT-FBP5500 loader uses them); evaluation is the
  centre 224 crop of the image resized to a shorter side of 227. Recipe momentum 0.9 is from the authors'
  code (the paper names SGD only); the colour-jitter strength 0.2 is ours (the text gives none).

The pretrained face trunk (``backbone="dlib_resnet"``, ours). Our reading of the paper's trunk (above) is VGG-M pretrained on faces
(VGG-M-Face, the authors' implementation's; the text we have names no trunk and no pretraining); no such weights can be had here, and from random weights the network reached PC 0.71 in the runs
this CPU allows (docs/results.md). dlib's face-recognition ResNet (``models/dlib_resnet.py``, the weights in
the installed package, as for ``age_gender_race``) stands in for it, the same way: a trunk pretrained on faces,
whose levels the three branches read.

* Levels. The trunk's maps after level2, level1 and level0 (128, 256 and 256 channels; 8×8, 4×4 and 2×2 at
  150 px) are too small for Table 1's unpadded 3×3 convolutions and differ in width, so each is averaged
  globally (``FaceBackbone(feature="levels")``, 640-D). GNet reads level1 (the middle level, as relu3 is in
  VGG-M), RNet level0 (the last, as relu5) (``gnet_from``, ``rnet_from``: ``level2``, ``level1``, ``level0``
  or ``aggregate``). The aggregator concatenates the levels (Eq. 2; ``aggregation="avg"`` needs levels of
  one width, e.g. ``aggregate_levels=("level1", "level0")``), by default all three: measured with the trunk
  frozen on SCUT-FBP5500 (ridge regression on 2,640 faces, 660 held out), beauty PC 0.844 from level0 alone,
  0.854 from level1 and level0, 0.871 from all three.
* Branches. GNet and RNet are Table 1's widths (256, 128, classes) on a 1×1 map: the same ``BranchNet`` with
  1×1 convolutions and no pooling. ANet is the same head with ``pool5`` left out and ``fc6`` 1×1 on the
  aggregate, ``anet_width`` 1024 by default (on the frozen features above a two-layer head of 1024 gave PC
  0.893 and of 256 0.889, mirror images averaged at test; 4,096 is VGG-M's own fc width, kept for VGG-M).
* Input, freezing and rate, as ``age_gender_race`` with this trunk: dlib's 150×150 chip with 25 % padding,
  5-point aligned (its template is the face template for photos), ``(rgb - means) / 256``;
  ``backbone_freeze`` ``"all"`` by default (the trunk's outputs are then cached in training), ``"none"`` or
  a number of leading groups; a trainable trunk learns at ``backbone_lr_scale`` × the heads' rate (0.01).
  The model's own recipe for this trunk is ours (the paper's is for fine-tuning VGG-M): Adam 3e-4 (at 1e-3 the
  validation PC jumped between 0.77 and 0.86 from epoch to epoch; docs/results.md), batch 32,
  30 epochs, the rate × 0.1 after 3 epochs without a better validation loss, early stopping after 6,
  horizontal flips only (each flip of a face is one cached trunk pass; a random crop or rotation would make
  every epoch run the trunk again).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import register_model
from .backbones import LEVEL_WIDTHS, FaceBackbone, dlib_preprocessing, optimizer_groups_with_trunk
from .base import FaceModel, Recipe
from .dlib_resnet import min_input_size
from .losses import REGRESSION_LOSSES
from .outputs import Categorical, Regression
from .outputset import OutputSet
from .preprocess import Preprocessing

SCUT_RACES = ("Asian", "Caucasian")  # same order as facedata.datasets.SCUT_RACES
UTKFACE_RACES = ("White", "Black", "Asian", "Indian", "Others")  # facedata.datasets.UTKFACE_RACES

TRUNK_LEVELS = ("conv3", "relu3", "conv4", "relu4", "conv5", "relu5")
BRANCH_SOURCES = ("relu3", "relu4", "relu5", "aggregate")
HMT_BACKBONES = ("vggm", "dlib_resnet")
DLIB_LEVELS = ("level2", "level1", "level0")  # widths: backbones.LEVEL_WIDTHS
# per trunk: aggregate_levels, aggregation, gnet_from, rnet_from, anet_width, image_size when not given
TRUNK_DEFAULTS = {"vggm": (("conv3", "relu3", "relu5"), "avg", "relu3", "relu5", 4096, 224),
                  "dlib_resnet": (DLIB_LEVELS, "concat", "level1", "level0", 1024, 150)}
AGGREGATIONS = ("avg", "concat")
MIN_IMAGE_SIZE = 96
_PRETRAINED_HEAD = ("fc6", "bn54", "fc7", "bn55")  # VGG-M-Face layers that ANet reuses
_PRETRAINING_CLASSIFIER = ("fc8",)  # VGG-Face's 2,622-way identity classifier: never loaded


def race_class_names(n: int) -> tuple[str, ...]:
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ValueError(f"race_classes must be an integer >= 2, got {n!r}")
    if n == len(SCUT_RACES):
        return SCUT_RACES
    if n == len(UTKFACE_RACES):
        return UTKFACE_RACES
    return tuple(f"race_{i}" for i in range(n))


def feature_sides(image_size: int) -> dict[str, int]:
    """Spatial side of the trunk's maps (relu3 = relu5) and of ANet's pool5 for a square input."""
    s = (image_size - 7) // 2 + 1  # conv1 7x7/2
    s = (s - 3) // 2 + 1  # pool1 3/2
    s = (s + 2 - 5) // 2 + 1  # conv2 5x5/2 p1
    if s < 3:
        return {"relu3": 0, "pool5": 0}
    out = -(-(s - 3) // 2) + 1  # pool2 3/2, ceil mode
    if (out - 1) * 2 >= s:  # PyTorch drops a last window that would start outside the input
        out -= 1
    pool5 = (out - 3) // 2 + 1 if out >= 3 else 0
    return {"relu3": out, "pool5": pool5}


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, pad: int = 0) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=pad), nn.BatchNorm2d(cout)


class VGGMTrunk(nn.Module):
    """conv1–relu5 of VGG-M-Face (BN variant), with its weight names; returns the taps of conv3–relu5."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn49 = _conv_bn(3, 96, 7, stride=2)
        self.pool1 = nn.MaxPool2d(3, 2)
        self.conv2, self.bn50 = _conv_bn(96, 256, 5, stride=2, pad=1)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.bn51 = _conv_bn(256, 512, 3, pad=1)
        self.conv4, self.bn52 = _conv_bn(512, 512, 3, pad=1)
        self.conv5, self.bn53 = _conv_bn(512, 512, 3, pad=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.pool1(self.relu(self.bn49(self.conv1(x))))
        x = self.pool2(self.relu(self.bn50(self.conv2(x))))
        taps = {}
        for i, (conv, bn) in enumerate(((self.conv3, self.bn51), (self.conv4, self.bn52), (self.conv5, self.bn53)), 3):
            c = conv(x)
            x = self.relu(bn(c))  # BN output is a new tensor: the in-place ReLU leaves ``c`` intact
            taps[f"conv{i}"], taps[f"relu{i}"] = c, x
        return taps


class BranchNet(nn.Module):
    """GNet / RNet (Table 1): conv3 → conv3 → max-pool 3 → conv1×1 stride 2 → global average pooling.
    ``pointwise``: the same widths on a 1×1 map (1×1 convolutions, no pooling), for the face trunk's levels."""

    def __init__(self, in_channels: int, num_classes: int, pointwise: bool = False):
        super().__init__()
        k = 1 if pointwise else 3
        self.body = nn.Sequential(
            *_conv_bn(in_channels, 256, k), nn.ReLU(inplace=True),
            *_conv_bn(256, 128, k), nn.ReLU(inplace=True),
            nn.Identity() if pointwise else nn.MaxPool2d(3, ceil_mode=True),
        )
        self.classifier = nn.Conv2d(128, num_classes, 1, stride=1 if pointwise else 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x)).mean(dim=(2, 3))


def _aggregate(maps: list[torch.Tensor], mode: str) -> torch.Tensor:
    if len(maps) == 1:
        return maps[0]
    if mode == "avg":
        return torch.stack(maps, 0).mean(0)
    return torch.cat(maps, 1)


class ANet(nn.Module):
    """Beauty head: pool5 → fc6 → BN/ReLU → fc7 → BN/ReLU → (aggregator) → fc8 → global average pooling.
    Layer names follow VGG-M-Face so its fc6/fc7 can be reused."""

    def __init__(self, in_channels: int, width: int, fc6_kernel: int, aggregation: str, aggregator: bool,
                 pool5: bool = True):
        super().__init__()
        self.pool5 = nn.MaxPool2d(3, 2) if pool5 else nn.Identity()  # no pool5 on the face trunk's 1×1 aggregate
        self.fc6, self.bn54 = _conv_bn(in_channels, width, fc6_kernel)
        self.fc7, self.bn55 = _conv_bn(width, width, 1)
        self.relu = nn.ReLU(inplace=True)
        self.aggregation = aggregation
        self.aggregator = aggregator
        fused = width * 3 if aggregator and aggregation == "concat" else width
        self.fc8 = nn.Conv2d(fused, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f6 = self.fc6(self.pool5(x))
        f7 = self.fc7(self.relu(self.bn54(f6)))
        r7 = self.relu(self.bn55(f7))
        h = _aggregate([f6, f7, r7], self.aggregation) if self.aggregator else r7
        return self.fc8(h).mean(dim=(1, 2, 3))


@register_model("hmtnet")
class HMTNet(FaceModel):
    primary_metric = "beauty.pearson"  # the paper's headline figure on SCUT-FBP5500
    primary_mode = "max"

    def __init__(self, image_size: int | None = None, race_classes: int = 2, aggregation: str | None = None,
                 aggregate_levels: tuple[str, ...] | None = None, anet_aggregator: bool = True,
                 anet_width: int | None = None, gnet_from: str | None = None, rnet_from: str | None = None,
                 task_weights: tuple[float, float, float] = (1.0, 1.0, 2.0), backbone_weights: str | None = None,
                 beauty_loss: str = "smooth_huber", delta: float = 0.6, backbone: str = "vggm",
                 backbone_freeze: str | int | None = None, backbone_lr_scale: float = 0.01):
        super().__init__()
        if backbone not in HMT_BACKBONES:
            raise ValueError(f"hmtnet: backbone must be one of {HMT_BACKBONES}, got {backbone!r}")
        dlib = backbone == "dlib_resnet"
        levels_d, aggregation_d, gnet_d, rnet_d, width_d, size_d = TRUNK_DEFAULTS[backbone]
        image_size = size_d if image_size is None else image_size
        aggregation = aggregation_d if aggregation is None else aggregation
        levels = levels_d if aggregate_levels is None else tuple(aggregate_levels)
        gnet_from, rnet_from = gnet_d if gnet_from is None else gnet_from, rnet_d if rnet_from is None else rnet_from
        anet_width = width_d if anet_width is None else anet_width
        min_size = min_input_size() if dlib else MIN_IMAGE_SIZE
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < min_size:
            why = "the face trunk's smallest input" if dlib else "relu3 must be at least 5x5 for GNet/RNet"
            raise ValueError(f"hmtnet: image_size must be an integer of at least {min_size} px ({why}), "
                             f"got {image_size!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"hmtnet: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        known = DLIB_LEVELS if dlib else TRUNK_LEVELS
        if not levels or any(lv not in known for lv in levels) or len(set(levels)) != len(levels):
            raise ValueError(f"hmtnet: aggregate_levels must be distinct names among {known}, got {levels!r}")
        width_of = dict(zip(DLIB_LEVELS, LEVEL_WIDTHS)) if dlib else dict.fromkeys(TRUNK_LEVELS, 512)
        if aggregation == "avg" and len({width_of[lv] for lv in levels}) > 1:
            raise ValueError(f"hmtnet: aggregation 'avg' needs levels of one width; {levels} have "
                             f"{[width_of[lv] for lv in levels]} channels (use 'concat')")
        sources = DLIB_LEVELS + ("aggregate",) if dlib else BRANCH_SOURCES
        for name, src in (("gnet_from", gnet_from), ("rnet_from", rnet_from)):
            if src not in sources:
                raise ValueError(f"hmtnet: {name} must be one of {sources}, got {src!r}")
        if not isinstance(anet_width, int) or isinstance(anet_width, bool) or anet_width < 1:
            raise ValueError(f"hmtnet: anet_width must be a positive integer, got {anet_width!r}")
        weights = tuple(float(w) for w in task_weights)
        if len(weights) != 3 or any(w < 0 for w in weights):
            raise ValueError(f"hmtnet: task_weights must be 3 non-negative numbers (gender, race, beauty), "
                             f"got {task_weights!r}")
        races = race_class_names(race_classes)
        if beauty_loss not in REGRESSION_LOSSES:
            raise ValueError(f"hmtnet: beauty_loss must be one of {REGRESSION_LOSSES}, got {beauty_loss!r}")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta > 0:
            raise ValueError(f"hmtnet: delta must be a positive number, got {delta!r}")
        if not dlib and backbone_freeze not in (None, "none"):
            raise ValueError("hmtnet: backbone_freeze is for the dlib_resnet backbone (the VGG-M trunk trains whole)")
        if isinstance(backbone_lr_scale, bool) or not 0.0 < float(backbone_lr_scale) <= 10.0:
            raise ValueError(f"hmtnet: backbone_lr_scale must be in (0, 10], got {backbone_lr_scale!r}")
        self.backbone_lr_scale = float(backbone_lr_scale)

        self.aggregation = aggregation
        self.aggregate_levels = levels
        self.gnet_from, self.rnet_from = gnet_from, rnet_from
        self.outputs = OutputSet((
            Categorical("gender", weight=weights[0], classes=("male", "female")),
            Categorical("race", weight=weights[1], classes=races),
            Regression("beauty", weight=weights[2], range=(1.0, 5.0), loss_type=beauty_loss, delta=float(delta)),
        ))
        agg_channels = (sum(width_of[lv] for lv in levels) if aggregation == "concat"
                        else width_of[levels[0]])
        branch_in = {"aggregate": agg_channels, **width_of}
        self.backbone_report: dict = {}
        if dlib:
            self.preprocessing = dlib_preprocessing(image_size)
            self.recipe = Recipe(optimizer="adam", lr=3e-4, batch_size=32, epochs=30, schedule="plateau",
                                 schedule_args={"factor": 0.1, "patience": 3}, early_stopping_patience=6,
                                 augment={"hflip": 0.5})
            trunk_weights = "package" if backbone_weights is None else (
                None if backbone_weights == "random" else backbone_weights)
            self.trunk = FaceBackbone(trunk_weights, feature="levels",
                                      freeze="all" if backbone_freeze is None else backbone_freeze)
            self.gnet = BranchNet(branch_in[gnet_from], 2, pointwise=True)
            self.rnet = BranchNet(branch_in[rnet_from], len(races), pointwise=True)
            self.anet = ANet(agg_channels, anet_width, 1, aggregation, anet_aggregator, pool5=False)
            return
        self.preprocessing = Preprocessing(
            size=(224, 224), resize="shorter_center_crop", resize_shorter=227,
        ).with_size(image_size)
        self.recipe = Recipe(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=0.05, batch_size=32, epochs=170,
                             schedule="step", schedule_args={"step_size": 50, "gamma": 0.1},
                             augment={"random_crop": True, "rotation": 30, "color_jitter": 0.2})
        self.trunk = VGGMTrunk()
        self.gnet = BranchNet(branch_in[gnet_from], 2)
        self.rnet = BranchNet(branch_in[rnet_from], len(races))
        self.anet = ANet(agg_channels, anet_width, min(6, feature_sides(image_size)["pool5"]), aggregation,
                         anet_aggregator)
        if backbone_weights:
            self.backbone_report = self.load_backbone(backbone_weights)

    def optimizer_groups(self, lr: float) -> list[dict]:
        """The heads at ``lr``; with the face trunk, its trainable layers at ``backbone_lr_scale * lr`` (frozen
        ones left out). The VGG-M trunk trains at ``lr`` with the heads, as in the paper."""
        return optimizer_groups_with_trunk(self, self.trunk, lr, self.backbone_lr_scale)

    # --- weights ---------------------------------------------------------------------------------
    def load_backbone(self, uri: str) -> dict:
        """Load trunk weights (VGG-M-Face ``vgg_m_face_bn_dag`` or a saved ``model.trunk.state_dict()``)
        from a path or s3:// URI. Every trunk tensor must be present with its shape; fc6/bn54/fc7/bn55 are
        loaded into ANet when present and of matching shape (skipped with a warning otherwise); the
        pretraining classifier fc8 is ignored. Any other key means the file is not a trunk: ValueError."""
        from .backbones import load_state_dict

        if isinstance(self.trunk, FaceBackbone):
            raise ValueError("hmtnet: load_backbone reads VGG-M weights; the dlib_resnet trunk takes backbone_weights")
        sd = load_state_dict(uri)
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{uri}: expected a state dict of tensors")
        sd = {k.removeprefix("module.").removeprefix("trunk."): v for k, v in sd.items()}
        trunk_sd = self.trunk.state_dict()
        head_sd = {k: v for k, v in self.anet.state_dict().items() if k.split(".")[0] in _PRETRAINED_HEAD}
        missing = [k for k in trunk_sd if k not in sd and not k.endswith("num_batches_tracked")]
        unknown = [k for k in sd if k not in trunk_sd and k not in head_sd
                   and k.split(".")[0] not in _PRETRAINING_CLASSIFIER]
        wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in trunk_sd.items()
                 if k in sd and sd[k].shape != v.shape]
        if missing or unknown or wrong:
            raise ValueError(f"{uri} does not fit the HMTNet (VGG-M) trunk: missing {missing[:5]}, "
                             f"unexpected {unknown[:5]}, wrong shapes {wrong[:5]}")
        self.trunk.load_state_dict({k: v for k, v in sd.items() if k in trunk_sd}, strict=False)
        report = {"trunk": len([k for k in sd if k in trunk_sd]), "anet": 0}
        head = {k: v for k, v in sd.items() if k in head_sd}
        if head:
            bad = [k for k, v in head.items() if v.shape != head_sd[k].shape]
            if bad:
                warnings.warn(f"{uri}: fc6/fc7 not loaded into ANet, shapes differ ({bad[:3]}; image_size, "
                              f"anet_width or concat aggregation change them)", stacklevel=2)
            else:
                self.anet.load_state_dict(head, strict=False)
                report["anet"] = len(head)
        return report

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        taps = self._face_trunk_taps(x) if isinstance(self.trunk, FaceBackbone) else self._vggm_taps(x)
        taps["aggregate"] = _aggregate([taps[lv] for lv in self.aggregate_levels], self.aggregation)
        return {
            "gender": self.gnet(taps[self.gnet_from]),
            "race": self.rnet(taps[self.rnet_from]),
            "beauty": self.anet(taps["aggregate"]),
        }

    def _vggm_taps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        side = min(x.shape[-2:])
        sides = feature_sides(side)
        if sides["relu3"] < 5:
            raise ValueError(f"hmtnet inputs must be at least {MIN_IMAGE_SIZE} px, got {side} px")
        k = self.anet.fc6.kernel_size[0]
        if sides["pool5"] < k:
            raise ValueError(f"hmtnet built for {self.preprocessing.size[0]} px cannot take a {side} px input "
                             f"(fc6 is {k}x{k}); build it with image_size={side}")
        return self.trunk(x)

    def _face_trunk_taps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The face trunk's pooled levels as 1×1 maps."""
        pooled = self.trunk(x)
        return {lv: t[:, :, None, None] for lv, t in zip(DLIB_LEVELS, pooled.split(LEVEL_WIDTHS, 1))}
