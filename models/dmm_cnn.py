"""DMM-CNN: deep multi-task multi-label CNN for the 40 CelebA attributes (source text
001_42c566c8f5e1d200: Mao, Yan, Xue, Wang, "Deep Multi-task Multi-label CNN for Effective Facial
Attribute Classification").

What the text fixes (sections 3.1-3.3, Algorithm 1, 4.1):

* Shared features: ResNet-50 without its global average pooling (and fc).
* Objective attributes (22): 1-level SPP (2,048) -> FC 1,024 -> FC 22.
* Subjective attributes (18): 3-level SPP (28,672) -> FC 2,048 -> FC 1,024 -> FC 18.
* Facial landmark detection (FLD, auxiliary): the same 2,048-d 1-level SPP vector -> FC 1,024 -> FC 2T.
* Losses: MSE everywhere. Eq. 1 ``L_FLD`` (squared L2 norm of the 2T vector, averaged over images), Eq. 2
  ``L_FAC^j`` (MSE of the score against the ±1 label), Eq. 3 ``L = Σ_j λ_t^j L_FAC^j + β L_FLD`` with β = 0.5.
* Dynamic weights, Eq. 4: ``λ_t^j = |(L^j(t) − L^j(t−1)) / L^j(t−1)|`` from the per-attribute validation
  loss on the whole validation set, recomputed every P iterations (Algorithm 1).
* Labels, Eq. 5: positive when the score is above τ_j; adaptive thresholds, Eq. 6:
  ``τ_t = τ_{t−1} + γ·l·(N_FP − N_FN) / V`` with γ = 0.01, l the current epoch, V the validation size.
* 15 epochs, batch 64, base learning rate 0.001 multiplied by 0.1 when the validation loss stops decreasing.
* "The model size is about 360M": these layers have 88,713,464 parameters with T = 72 (355 MB in float32;
  88,576,114 with CelebA's T = 5), which confirms the layer list above and the 1, 2, 3 pyramid (levels
  1, 2, 4 would give a 43,008-d vector and 29.4 M more parameters, 472 MB).

Readings we chose (each configurable):

* **Objective / subjective split** (``objective``). The text's own examples contradict each other: §3.2.1
  calls "Attractive" and "Big Nose" objective and "Bald" and "Male" subjective, while Fig. 1 shows
  Eyeglasses, Bangs, Wearing Hat as objective and Smiling, Pointy Nose, Big Lips as subjective, §1 calls
  "Big Lips" and "Oval Face" very subjective, §4.2 plots "MouthOpen" as objective and "Young" as subjective
  and §4.3 names "Pointy Nose", "Smiling" and "Bushy Eyebrows" as subjective. We follow Fig. 1 and the
  learning-complexity rationale (objective = the presence of a visible thing, a colour or a state that low-level
  appearance features decide; subjective = a judgement of shape, size or degree, or a holistic judgement).
  Objective (22): accessories (Eyeglasses, Wearing_Hat, Wearing_Earrings, Wearing_Lipstick,
  Wearing_Necklace, Wearing_Necktie), facial hair (5_o_Clock_Shadow, Goatee, Mustache, No_Beard, Sideburns),
  hair presence and colour (Bald, Bangs, Black_Hair, Blond_Hair, Brown_Hair, Gray_Hair), skin colour
  (Pale_Skin, Rosy_Cheeks), image and mouth state (Blurry, Mouth_Slightly_Open) and Male. Subjective (18):
  shape and size judgements (Arched_Eyebrows, Big_Lips, Big_Nose, Bushy_Eyebrows, Narrow_Eyes, Oval_Face,
  Pointy_Nose, High_Cheekbones, Straight_Hair, Wavy_Hair, Receding_Hairline), degree judgements
  (Bags_Under_Eyes, Chubby, Double_Chin, Heavy_Makeup) and holistic ones (Attractive, Smiling, Young).
  Colour attributes (Pale_Skin, Rosy_Cheeks) are what brings the objective group to the paper's 22.
  ``objective=()`` gives the DMM-SPP ablation (every attribute through the 3-level branch).
* **Output layout**: one ``Binary`` output ``attributes`` in CelebA file order; the forward puts the 22 + 18
  branch scores back into that order.
* **Input**: CelebA's aligned faces at their native 218×178 (H×W), no warping, ImageNet mean and std: the
  SPP layers exist so that the input need not be warped to a square. ``image_size`` changes it (any size
  works; the smallest useful one is 64 px, a 2×2 res5 map).
* **Dropout**: none; the text mentions none. ``dropout`` adds it after each hidden FC layer.
* **New layers** keep PyTorch's default initialisation (the paper's framework; no scheme is named).
* **Optimiser**: not named. SGD with momentum 0.9, no weight decay ("stochastic gradient descent" in
  Algorithm 1). Plateau schedule (×0.1, patience 1) on the validation loss.
* **P** (``Recipe.validate_every``): not given. 1,000 iterations: CelebA's training split is 2,544
  iterations per epoch at batch 64, Fig. 5 reads convergence in thousands of iterations (15,000 and 30,000),
  and validating the 19,867 images costs about a twentieth of an epoch's training, so P = 1,000 gives about 38
  weight updates in 15 epochs at roughly 10 % overhead.
* **First update**: Eq. 4 needs L(t−1); the first validation only records the losses and λ stays 1.0.
* **Zero weights** (``weight_mode``): Eq. 4 gives λ = 0 to an attribute whose validation loss did not change
  at all, and would give every attribute 0 if all stalled, leaving only the landmark loss. The paper is silent.
  ``renormalise`` (default) rescales Eq. 4's rates to mean 1 (all ones if every rate is 0): the attributes'
  relative weights are Eq. 4's, the overall scale of the attribute loss stays that of λ = 1. ``floor`` keeps
  Eq. 4's magnitudes, lifting each weight to at least ``weight_floor`` (1e-3); ``raw`` is Eq. 4 as written.
  Why not the magnitudes: rates of change are small (typically 0.001-0.1), so with them the attribute loss,
  and with it the effective learning rate, shrinks by one to three orders of magnitude after the first
  update. In our from-scratch CelebA run with ``floor`` (docs/results.md) the training loss fell from 28 to
  0.06 while the validation loss stayed at 18 and the accuracy stalled.
  A previous loss of exactly 0 (a perfect attribute) gives rate 0 rather than a division by zero.
* **Epoch** l in Eq. 6 counts from 1 (the first epoch is l = 1, so its thresholds move); ``on_validation``
  refuses epoch < 1. V is the number of validation images with attribute labels: per attribute, the images
  that label it (data that labels a few attributes, GENKI-4K's Smiling, beside CelebA's 40). An attribute
  without validation values keeps its τ and λ; each attribute's loss is over the rows that label it.
* **Trunk learning rate** (``trunk_lr_scale``, ours; default 1: the paper's one rate). With a pretrained trunk
  (``backbone=dlib_resnet``, ``backbone_weights``) the trunk can learn at ``trunk_lr_scale`` × the heads'
  rate, as ``task_attention``'s does: Adam at a rate the new layers need wrecks a pretrained trunk.
* **Landmarks**: ``num_landmarks`` T (CelebA's file has 5, the paper uses 72 from dlib; 68 works too).
  ``num_landmarks=0`` drops the FLD branch (the DMM-FAC ablation, and CelebA copies without the landmark file).
* **Landmark scale** (``landmark_scale``), which fixes what β = 0.5 means. The text gives no scale for
  Eq. 1's coordinates. Eq. 3 adds ``β L_FLD`` (a sum of 2T squared coordinate errors) to ``Σ_j λ_j L_FAC^j``
  (one squared error of a score against a ±1 label per attribute), and calls β "the regularization
  parameter": that weighs one landmark coordinate against one attribute score only when both live on the
  same scale. So β = 0.5 assumes coordinates on the scale of the ±1 targets: ``signed`` (default) maps the
  model input's width and height to [-1, 1]. The other readings make β meaningless: dlib's pixels would
  make ``β L_FLD`` hundreds of times the attribute loss at 218×178 (a 3 px error on 144 coordinates is
  1,296), and [0, 1] (``unit``, what this code did before) makes it a quarter of ``signed``, negligible
  next to 40 attribute losses. See ``models.landmarks.Landmarks``.
* **ReLU between the fully connected layers**: the text lists the FC widths of each branch (1,024 → 22;
  2,048 → 1,024 → 18; 1,024 → 2T) but no activation; we put a ReLU after every hidden FC layer (without
  one, a branch's FC layers would collapse into a single linear map) and keep the last layer linear (its
  output is regressed with MSE against ±1 labels or coordinates).
* Ablations of Table 1: ``use_dynamic_weights=False`` keeps λ = 1 (EQ), ``use_adaptive_thresholds=False``
  keeps τ = 0 (FIX).
"""

from __future__ import annotations

import torch
from torch import nn

from . import register_model
from .backbones import dlib_preprocessing, dlib_trunk, resnet, trunk_rate_groups
from .base import FaceModel, Recipe
from .landmarks import LANDMARK_SCALES, Landmarks
from .outputs import Binary
from .outputset import OutputSet
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

# CelebA's 40 attributes in the order of its list_attr_celeba.txt: the model's outputs and the celeba reader's columns
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
    "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip

OBJECTIVE_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Bald", "Bangs", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Eyeglasses",
    "Goatee", "Gray_Hair", "Male", "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin", "Rosy_Cheeks",
    "Sideburns", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie",
)  # fmt: skip
SUBJECTIVE_ATTRIBUTES: tuple[str, ...] = tuple(a for a in CELEBA_ATTRIBUTES if a not in OBJECTIVE_ATTRIBUTES)

OBJECTIVE_SPP_LEVELS = (1,)
SUBJECTIVE_SPP_LEVELS = (1, 2, 3)
WEIGHT_MODES = ("floor", "renormalise", "raw")


class SpatialPyramidPooling(nn.Module):
    """An n-level SPP layer (He et al.): level k max-pools the map over a k×k grid; the outputs of all levels
    are flattened (channel-major) and concatenated, so any input size gives ``C · Σ k²`` features."""

    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        if not levels or any(int(k) < 1 for k in levels):
            raise ValueError(f"SPP levels must be positive integers, got {levels}")
        self.levels = tuple(int(k) for k in levels)
        self.pools = nn.ModuleList(nn.AdaptiveMaxPool2d(k) for k in self.levels)

    def out_features(self, channels: int) -> int:
        return channels * sum(k * k for k in self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x).flatten(1) for p in self.pools], dim=1)


def _mlp(in_features: int, widths: tuple[int, ...], dropout: float) -> nn.Sequential:
    """FC layers of the given output widths, ReLU (and optional dropout) between them, linear last."""
    layers: list[nn.Module] = []
    for i, w in enumerate(widths):
        layers.append(nn.Linear(in_features, w))
        if i < len(widths) - 1:
            layers.append(nn.ReLU(inplace=True))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        in_features = w
    return nn.Sequential(*layers)


# --------------------------------------------------------------------- Eq. 4 and Eq. 6 as pure functions


def dynamic_weights(loss: torch.Tensor, prev_loss: torch.Tensor) -> torch.Tensor:
    """Eq. 4 as written: ``|(L(t) − L(t−1)) / L(t−1)|`` per attribute. A previous loss of exactly 0 gives 0
    (the rate of change relative to nothing is undefined; a perfect attribute needs no weight)."""
    loss, prev_loss = loss.double(), prev_loss.double()
    safe = torch.where(prev_loss > 0, prev_loss, torch.ones_like(prev_loss))
    return torch.where(prev_loss > 0, ((loss - prev_loss) / safe).abs(), torch.zeros_like(loss))


def stabilise_weights(raw: torch.Tensor, mode: str = "floor", floor: float = 1e-3) -> torch.Tensor:
    """The weights actually used from Eq. 4's ``raw`` rates: ``floor`` (max(raw, floor)), ``renormalise``
    (mean 1; all ones when every rate is 0) or ``raw`` (unchanged, zeros allowed)."""
    if mode == "raw":
        return raw.clone()
    if mode == "floor":
        return raw.clamp_min(floor)
    if mode == "renormalise":
        total = raw.sum()
        if float(total) <= 0:
            return torch.ones_like(raw)
        return raw * (raw.numel() / total)
    raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {mode!r}")


def adaptive_thresholds(tau: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, n, epoch: int,
                        gamma: float = 0.01) -> torch.Tensor:
    """Eq. 6: ``τ_t = τ_{t−1} + γ · l · (N_FP − N_FN) / V`` (l = ``epoch``, V = ``n`` validation images: a
    number, or one per attribute, the images that have it)."""
    if bool((torch.as_tensor(n) <= 0).any()):
        raise ValueError("adaptive thresholds need a validation set with at least one labelled image (V > 0)")
    return tau.double() + gamma * epoch * (fp.double() - fn.double()) / n


@register_model("dmm_cnn")
class DMMCNN(FaceModel):
    """See the module docstring for the layers, the equations and the readings we chose."""

    def __init__(self, num_landmarks: int = 5, image_size: int | tuple[int, int] = (218, 178),
                 backbone_weights: str | None = None, objective: tuple[str, ...] = OBJECTIVE_ATTRIBUTES,
                 beta: float = 0.5, gamma: float = 0.01, weight_mode: str = "renormalise", weight_floor: float = 1e-3,
                 use_dynamic_weights: bool = True, use_adaptive_thresholds: bool = True, dropout: float = 0.0,
                 depth: int = 50, landmark_scale: str = "signed", backbone: str = "resnet",
                 trunk_lr_scale: float = 1.0):
        super().__init__()
        if isinstance(trunk_lr_scale, bool) or not isinstance(trunk_lr_scale, (int, float)) or trunk_lr_scale < 0:
            raise ValueError(f"trunk_lr_scale must be a number >= 0, got {trunk_lr_scale!r}")
        self.trunk_lr_scale = float(trunk_lr_scale)
        objective = tuple(objective)
        unknown = [a for a in objective if a not in CELEBA_ATTRIBUTES]
        if unknown:
            raise ValueError(f"objective attributes {unknown} are not CelebA attribute names")
        if len(set(objective)) != len(objective):
            raise ValueError("objective attributes contain duplicates")
        if int(num_landmarks) < 0:
            raise ValueError(f"num_landmarks must be >= 0 (0 = no landmark branch), got {num_landmarks}")
        if weight_mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
        if landmark_scale not in LANDMARK_SCALES:
            raise ValueError(f"landmark_scale must be one of {LANDMARK_SCALES}, got {landmark_scale!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        hw = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        if len(hw) != 2 or min(hw) < 32:
            raise ValueError(f"image_size must be an int or (H, W) with both sides >= 32, got {image_size}")

        self.objective = tuple(a for a in CELEBA_ATTRIBUTES if a in objective)  # CelebA order inside a group
        self.subjective = tuple(a for a in CELEBA_ATTRIBUTES if a not in objective)
        self.num_landmarks = int(num_landmarks)
        self.beta, self.gamma = float(beta), float(gamma)
        self.weight_mode, self.weight_floor = weight_mode, float(weight_floor)
        self.use_dynamic_weights, self.use_adaptive_thresholds = bool(use_dynamic_weights), bool(use_adaptive_thresholds)

        outputs = [Binary("attributes", labels=tuple(CELEBA_ATTRIBUTES), loss_type="mse_pm1", target="attributes")]
        if self.num_landmarks:
            outputs.append(Landmarks("landmarks", weight=self.beta, points=self.num_landmarks, target="landmarks",
                                     scale=landmark_scale))
        self.outputs = OutputSet(tuple(outputs))
        self.preprocessing = Preprocessing(size=hw, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.recipe = Recipe(optimizer="sgd", lr=1e-3, momentum=0.9, batch_size=64, epochs=15, schedule="plateau",
                             schedule_args={"factor": 0.1, "patience": 1}, validate_every=1000)

        # depth: the paper's ResNet-50 by default; 18/34 (512 channels) for quick CPU runs and tests.
        if backbone == "dlib_resnet":  # dlib's face ResNet, whole conv trunk (to level0): SPP on its 256-ch map
            shared, last, channels = dlib_trunk("package" if backbone_weights is None else backbone_weights)
            self.trunk = nn.Sequential(shared, last)
            self.preprocessing = dlib_preprocessing(hw)
        elif backbone != "resnet":
            raise ValueError(f"backbone must be 'resnet' or 'dlib_resnet', got {backbone!r}")
        else:
            net = resnet(int(depth), backbone_weights)
            self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                       net.layer4)
            channels = net.fc.in_features
        self.spp_objective = SpatialPyramidPooling(OBJECTIVE_SPP_LEVELS)
        self.spp_subjective = SpatialPyramidPooling(SUBJECTIVE_SPP_LEVELS)
        d1, d3 = self.spp_objective.out_features(channels), self.spp_subjective.out_features(channels)
        self.objective_head = _mlp(d1, (1024, len(self.objective)), dropout) if self.objective else None
        self.subjective_head = _mlp(d3, (2048, 1024, len(self.subjective)), dropout) if self.subjective else None
        self.landmark_head = _mlp(d1, (1024, 2 * self.num_landmarks), dropout) if self.num_landmarks else None

        # Branch outputs (objective then subjective) -> CelebA order.
        branch_order = [CELEBA_ATTRIBUTES.index(a) for a in self.objective + self.subjective]
        self.register_buffer("_to_celeba", torch.argsort(torch.tensor(branch_order)), persistent=False)
        j = len(CELEBA_ATTRIBUTES)
        # State of Eq. 4 and Eq. 6: buffers, so checkpoints and DDP broadcasts carry them.
        self.register_buffer("attribute_weights", torch.ones(j))
        self.register_buffer("thresholds", torch.zeros(j))
        self.register_buffer("prev_val_loss", torch.full((j,), float("nan")))

    def optimizer_groups(self, lr: float) -> list[dict]:
        """Every layer at ``lr`` (one group, as before ``trunk_lr_scale``), or the trunk at ``trunk_lr_scale * lr``
        and the SPP branches at ``lr`` (core.engine.make_optimizer)."""
        if self.trunk_lr_scale == 1.0:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]
        trunk = list(self.trunk.parameters())
        return trunk_rate_groups(self, trunk, [p for p in trunk if p.requires_grad], lr, self.trunk_lr_scale)

    # --------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.trunk(x)
        scores = []
        pooled1 = self.spp_objective(fmap)  # 2,048-d: objective and landmark branches
        if self.objective_head is not None:
            scores.append(self.objective_head(pooled1))
        if self.subjective_head is not None:
            scores.append(self.subjective_head(self.spp_subjective(fmap)))
        out = {"attributes": torch.cat(scores, dim=1).index_select(1, self._to_celeba)}
        if self.landmark_head is not None:
            out["landmarks"] = self.landmark_head(pooled1)
        return out

    # --------------------------------------------------------------------------------- Eq. 3
    def loss(self, raw: dict, targets: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 3: ``Σ_j λ_j L_FAC^j + β L_FLD`` (rows without a label are left out of their task). The part
        reported for ``attributes`` is the λ-weighted sum, for ``landmarks`` the unweighted ``L_FLD``.
        ``label_smoothing`` does not apply: no output here is categorical (40 binary scores, points)."""
        parts: dict[str, torch.Tensor] = {}
        total = None
        if "attributes" in targets:
            scores, target = raw["attributes"], targets["attributes"]
            # each attribute over the rows that have it (a row of GENKI-4K has Smiling alone)
            term = self.outputs["attributes"].loss(scores, target, label_weights=self.attribute_weights)
            parts["attributes"] = term.detach()
            total = term
        if self.num_landmarks and "landmarks" in targets:
            part = self.outputs["landmarks"].masked_loss(raw["landmarks"], targets["landmarks"])
            parts["landmarks"] = part.detach()
            total = self.beta * part if total is None else total + self.beta * part
        if total is None:
            raise ValueError(f"no target for any output of {self.name}: {self.outputs.names()}")
        return total, parts

    # --------------------------------------------------------------------------------- Eq. 4, Eq. 6
    def on_validation(self, stats: dict, epoch: int) -> dict:
        """Algorithm 1, lines 4-6, from the summed validation statistics (``{"attributes": {...}}`` as from
        ``self.stats``, or the Binary stats dict itself): τ by Eq. 6, then λ by Eq. 4. The caller all-reduces
        the statistics first, so every worker computes identical buffers. ``epoch`` counts from 1."""
        s = stats.get("attributes", stats) if isinstance(stats, dict) else None
        need = ("n_label", "loss_sum", "fp", "fn")
        if not isinstance(s, dict) or any(k not in s for k in need):
            raise ValueError(f"{self.name}.on_validation needs the attributes' summed stats with {need}")
        j = len(CELEBA_ATTRIBUTES)
        for k in ("n_label", "loss_sum", "fp", "fn"):
            if tuple(s[k].shape) != (j,):
                raise ValueError(f"stats[{k!r}] must have shape ({j},), got {tuple(s[k].shape)}")
        n = s["n_label"]
        seen = (n > 0).to(self.thresholds.device)  # the attributes the validation set has values for
        if not bool(seen.any()):
            raise ValueError("the validation set has no image with attribute labels: cannot update λ and τ")
        if int(epoch) < 1:
            raise ValueError(f"epoch counts from 1 (Eq. 6's l), got {epoch}")
        dev = self.thresholds.device
        n = n.double().clamp_min(1).to(dev)
        # An attribute without validation values (a mix whose validation part has no Smiling, say) keeps its
        # τ and λ: Eq. 4 and Eq. 6 have nothing to read for it. With CelebA every attribute is seen.
        loss = torch.where(seen, s["loss_sum"].double().to(dev) / n, torch.full_like(n, float("nan")))
        logs: dict[str, float] = {}
        with torch.no_grad():
            if self.use_adaptive_thresholds:
                tau = adaptive_thresholds(self.thresholds, s["fp"].to(dev), s["fn"].to(dev), n, int(epoch), self.gamma)
                self.thresholds.copy_(torch.where(seen, tau.to(self.thresholds.dtype), self.thresholds))
            both = seen & ~torch.isnan(self.prev_val_loss)
            if self.use_dynamic_weights and bool(both.any()):
                raw = dynamic_weights(loss[both], self.prev_val_loss[both])
                logs["dmm.raw_weights_zero"] = float((raw == 0).sum())
                lam = stabilise_weights(raw, self.weight_mode, self.weight_floor)
                self.attribute_weights[both] = lam.to(self.attribute_weights.dtype)
            self.prev_val_loss.copy_(torch.where(seen, loss.to(self.prev_val_loss.dtype), self.prev_val_loss))
        w, t = self.attribute_weights, self.thresholds
        logs.update({"dmm.weight_mean": float(w.mean()), "dmm.weight_min": float(w.min()),
                     "dmm.weight_max": float(w.max()), "dmm.threshold_mean": float(t.mean()),
                     "dmm.threshold_min": float(t.min()), "dmm.threshold_max": float(t.max())})
        return logs

    def column_context(self) -> dict:
        return {"attributes": {"thresholds": self.thresholds.detach()}}

