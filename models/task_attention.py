"""Multi-task learning with task dependencies: smile and gender with cross-task attention (source text
002_2457a8f64eb2a4af, Appl. Sci. 2019, 9, 2535, section 3).

What the text fixes:

* ResNet-50, "We share the parameters from its first 46 layers for all the tasks", then two task branches;
  FCS and FCG, fully connected layers of K = 64 units, are attached "respectively to 'res5c1' and
  'res5c2', where 'res5c1' and 'res5c2' are residual blocks in ResNet50": one copy of res5c per task.
* Gender-context attention (Eq. 3-6), for every i in 1..K: ``score(x_Sj, C_Gi) = tanh(W_S x_Sj + W_G C_Gi)``,
  ``P(d = j | x_S, C_Gi) = softmax_j(score)``, ``Ŝ_i = Σ_j P(d = j | x_S, C_Gi) x_Sj``; the context units C_Gi
  are the units of FCG. Symmetrically (Eq. 9-12) ``Ĝ_i`` from the gender units with the smile context FCS.
  The K attended units form FCS|CG (FCG|CS), fed to a 2-way softmax.
* Cross-entropy per task, ``L = λs LS + λg LG`` with λs = λg = 1 (Eq. 13-15). Smile classes
  ('non_smile', 'smile'); gender ('male', 'female') with g = 1 for female, the dataset's convention.
* TMTL, the baseline: FCS and FCG straight into their softmax layers (``attention=False``); the attention
  model is initialised from a trained TMTL (:meth:`TaskAttentionNet.from_tmtl`) and trained 30 epochs.
* 224×224×3 input (faces resized), Adam, batch 64, learning rate 0.001 then 0.0001 after 25 epochs,
  horizontal flip and horizontal/vertical shift augmentation, he_normal initialisation.

Readings we chose:

* **Where the network splits** (``task_blocks``). Counting ResNet-50's 50 weight layers as He et al. do
  (conv1, 16 bottleneck blocks of 3 convolutions, fc; projection shortcuts not counted), the first 46 are
  conv1 (1) + res2a-c (9) + res3a-d (12) + res4a-f (18) + res5a-b (6): everything up to and including
  res5b. The remaining 4 are res5c's three convolutions and fc, which is what each branch holds (its res5c
  copy, then FCS or FCG where fc was): the two readings of the text agree. So by default the shared trunk
  ends after res5b and each task has ``task_blocks = 1`` block of res5 (res5c1, res5c2); ``task_blocks=3``
  copies the whole res5 stage per task (what this code did before: 10.5 M more unshared parameters at
  depth 50). With ResNet-18/34 (``depth``) the same count keeps the last ``task_blocks`` basic blocks of
  the last stage per task. :func:`shared_conv_layers` counts the shared layers.
* **Shapes of W_S, W_G.** x_Sj and C_Gi are single units, so ``W_S x_Sj + W_G C_Gi`` must be a scalar per
  (i, j): W_S and W_G are scalars. The text builds K separate modules Att_CGi (Fig. 3, one per context unit),
  so each module has its own pair: ``score_ij = tanh(w_S^i x_Sj + w_G^i C_Gi)`` — 2K parameters per
  direction, and the gender direction has its own pairs (Eq. 9 reuses the symbols, but it is a different set
  of modules, Fig. 4). No bias: Eq. 3 writes none. ``attention_weights="shared"`` is the other reading (one
  scalar pair for all K modules of a direction). All K modules run at once by broadcasting
  (:func:`context_attention`); :func:`context_attention_reference` is the literal per-unit loop.
* **FC activation**: the text does not name one; ReLU (``fc_activation``), which he_normal is made for.
  ``"linear"`` is the Keras default reading.
* **Initialisation**: the new layers (FCS, FCG, the softmax layers and the attention scalars) get he_normal
  (normal, std sqrt(2 / fan_in); fan_in = 1 for a scalar weight, so std sqrt 2), biases 0. The ResNet layers
  keep torchvision's own He-normal init when no ``backbone_weights`` are given (section 4.4 starts from
  ImageNet weights: pass them as ``backbone_weights``; both res5 copies start from the same weights).
* **Epochs**: 30 for the attention model; for TMTL (``attention=False``) 40, the FotW figure (30 on LFWA:
  override ``--epochs``).
* **Shift**: the text names no range; 0.1 of the size.
* **Trunk learning rate** (``trunk_lr_scale``, ours; default 1: the paper's one rate for the whole network).
  With a pretrained trunk (``backbone=dlib_resnet`` or ``backbone_weights``) the shared layers and both res5
  copies can learn at ``trunk_lr_scale`` × the rate of the new layers (FCS, FCG, attention, softmax), as
  ``age_gender_race``'s ``backbone_lr_scale`` does: a short run can then give the new layers a rate that a
  pretrained trunk would not survive under Adam.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from . import register_model
from .backbones import dlib_preprocessing, dlib_trunk, resnet, trunk_rate_groups
from .base import FaceModel, Recipe
from .outputs import Categorical
from .outputset import OutputSet
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

ATTENTION_WEIGHTS = ("per_module", "shared")
FC_ACTIVATIONS = ("relu", "linear")


def context_attention(x: torch.Tensor, context: torch.Tensor, w_x: torch.Tensor, w_c: torch.Tensor) -> torch.Tensor:
    """Eq. 3-6 for all K context units at once.

    ``x``, ``context``: (B, K) representation and context units; ``w_x``, ``w_c``: (K,) per-module scalars
    (or (1,) shared). ``score[b, i, j] = tanh(w_x[i] x[b, j] + w_c[i] context[b, i])``, softmax over j,
    ``out[b, i] = Σ_j P[b, i, j] x[b, j]``. Returns (B, K)."""
    score = torch.tanh(w_x[:, None] * x[:, None, :] + (w_c * context)[:, :, None])  # (B, K_i, K_j)
    p = torch.softmax(score, dim=2)
    return torch.einsum("bij,bj->bi", p, x)


def context_attention_reference(x: torch.Tensor, context: torch.Tensor, w_x: torch.Tensor,
                                w_c: torch.Tensor) -> torch.Tensor:
    """The literal reading of Eq. 3-6: one module Att_Ci per context unit, one score per input unit, in
    Python loops over floats (float64). For tests only: O(B K²) Python operations."""
    b_size, k = x.shape
    out = torch.empty(b_size, k, dtype=torch.float64)
    for b in range(b_size):
        for i in range(k):  # module Att_Ci
            wx = float(w_x[i if w_x.numel() > 1 else 0])
            wc = float(w_c[i if w_c.numel() > 1 else 0])
            ci = float(context[b, i])
            scores = [math.tanh(wx * float(x[b, j]) + wc * ci) for j in range(k)]  # Eq. 3
            exps = [math.exp(s) for s in scores]
            total = sum(exps)
            probs = [e / total for e in exps]  # Eq. 4-5
            out[b, i] = sum(probs[j] * float(x[b, j]) for j in range(k))  # Eq. 6
    return out


class CrossTaskAttention(nn.Module):
    """K attention modules Att_Ci of one direction (e.g. gender context -> smile units)."""

    def __init__(self, units: int, sharing: str = "per_module"):
        super().__init__()
        if sharing not in ATTENTION_WEIGHTS:
            raise ValueError(f"attention_weights must be one of {ATTENTION_WEIGHTS}, got {sharing!r}")
        n = units if sharing == "per_module" else 1
        # he_normal with fan_in = 1 (each weight multiplies one scalar unit): std sqrt(2).
        self.w_x = nn.Parameter(torch.randn(n) * math.sqrt(2.0))
        self.w_c = nn.Parameter(torch.randn(n) * math.sqrt(2.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return context_attention(x, context, self.w_x, self.w_c)


def shared_conv_layers(module: nn.Module) -> int:
    """Weight layers (convolutions) on the main path of ``module``, projection shortcuts
    (torchvision's ``downsample``) not counted: the way ResNet-50 gets its 50 (49 convs + fc)."""
    return sum(1 for name, m in module.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in name)


def _he_normal(layer: nn.Linear) -> nn.Linear:
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    nn.init.zeros_(layer.bias)
    return layer


@register_model("task_attention")
class TaskAttentionNet(FaceModel):
    """See the module docstring. ``attention=False`` is TMTL."""

    def __init__(self, attention: bool = True, image_size: int = 224, backbone_weights: str | None = None,
                 units: int = 64, attention_weights: str = "per_module", fc_activation: str = "relu",
                 task_weights: tuple[float, float] = (1.0, 1.0), depth: int = 50, task_blocks: int = 1,
                 backbone: str = "resnet", trunk_lr_scale: float = 1.0):
        super().__init__()
        if isinstance(trunk_lr_scale, bool) or not isinstance(trunk_lr_scale, (int, float)) or trunk_lr_scale < 0:
            raise ValueError(f"trunk_lr_scale must be a number >= 0, got {trunk_lr_scale!r}")
        self.trunk_lr_scale = float(trunk_lr_scale)
        if int(units) < 1:
            raise ValueError(f"units must be >= 1, got {units}")
        if attention_weights not in ATTENTION_WEIGHTS:
            raise ValueError(f"attention_weights must be one of {ATTENTION_WEIGHTS}, got {attention_weights!r}")
        if fc_activation not in FC_ACTIVATIONS:
            raise ValueError(f"fc_activation must be one of {FC_ACTIVATIONS}, got {fc_activation!r}")
        if int(image_size) < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        if len(tuple(task_weights)) != 2:
            raise ValueError("task_weights must be (λs, λg)")
        self.attention = bool(attention)
        self.units = int(units)
        lam_s, lam_g = (float(w) for w in task_weights)
        self.outputs = OutputSet((
            Categorical("smile", weight=lam_s, classes=("non_smile", "smile")),
            Categorical("gender", weight=lam_g, classes=("male", "female")),
        ))
        self.preprocessing = Preprocessing(size=(int(image_size), int(image_size)), channels=3,
                                           mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.recipe = Recipe(optimizer="adam", lr=1e-3, batch_size=64, epochs=30 if self.attention else 40,
                             schedule="milestones", schedule_args={"milestones": [25], "gamma": 0.1},
                             augment={"hflip": 0.5, "shift": 0.1})

        # depth: the paper's ResNet-50 by default; 18/34 (512 channels) for quick CPU runs and tests.
        if backbone == "dlib_resnet":  # dlib's face ResNet: shared = stem..level1, "res5" = its last stage, level0
            self.shared, self.res5_smile, feat = dlib_trunk("package" if backbone_weights is None else backbone_weights)
            self.res5_gender = copy.deepcopy(self.res5_smile)
            self.preprocessing = dlib_preprocessing(int(image_size))
            self.task_blocks = task_blocks
        elif backbone != "resnet":
            raise ValueError(f"backbone must be 'resnet' or 'dlib_resnet', got {backbone!r}")
        else:
            net = resnet(int(depth), backbone_weights)
            feat = net.fc.in_features
            res5 = list(net.layer4)
            if isinstance(task_blocks, bool) or not isinstance(task_blocks, int) or not 1 <= task_blocks <= len(res5):
                raise ValueError(f"task_blocks must be an integer from 1 to {len(res5)} (the blocks of res5 at depth "
                                 f"{depth}), got {task_blocks!r}")
            self.task_blocks = task_blocks
            split = len(res5) - task_blocks
            shared = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3]
            if split:
                shared.append(nn.Sequential(*res5[:split]))  # res5a, res5b at depth 50 with task_blocks=1
            self.shared = nn.Sequential(*shared)
            self.res5_smile = nn.Sequential(*res5[split:])  # res5c1
            self.res5_gender = copy.deepcopy(self.res5_smile)  # res5c2
            self._register_load_state_dict_pre_hook(self._check_split)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc_smile = _he_normal(nn.Linear(feat, self.units))  # FCS
        self.fc_gender = _he_normal(nn.Linear(feat, self.units))  # FCG
        self.act = nn.ReLU() if fc_activation == "relu" else nn.Identity()
        if self.attention:
            self.att_smile = CrossTaskAttention(self.units, attention_weights)  # Att_CGi: FCS|CG
            self.att_gender = CrossTaskAttention(self.units, attention_weights)  # Att_CSi: FCG|CS
        self.head_smile = _he_normal(nn.Linear(self.units, 2))
        self.head_gender = _he_normal(nn.Linear(self.units, 2))

    def optimizer_groups(self, lr: float) -> list[dict]:
        """The new layers at ``lr``, the trunk (shared layers and both res5 copies) at ``trunk_lr_scale * lr``
        (core.engine.make_optimizer)."""
        trunk = [p for m in (self.shared, self.res5_smile, self.res5_gender) for p in m.parameters()]
        return trunk_rate_groups(self, trunk, [p for p in trunk if p.requires_grad], lr, self.trunk_lr_scale)

    def _check_split(self, state_dict, prefix, *args) -> None:
        """Weights split at another block (e.g. saved before the split moved to res5c, when each task had all
        of res5) cannot load: say which ``task_blocks`` they need instead of listing missing keys."""
        head = f"{prefix}res5_smile."
        blocks = {k[len(head):].split(".", 1)[0] for k in state_dict if k.startswith(head)}
        if blocks and len(blocks) != self.task_blocks:
            raise ValueError(f"these task_attention weights have {len(blocks)} res5 block(s) per task; this model "
                             f"was built with task_blocks={self.task_blocks}: build it with "
                             f"task_blocks={len(blocks)} (checkpoints from before the res5c split copied the "
                             f"whole res5 stage)")

    def task_units(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(FCS, FCG) units, each (B, K), before any attention."""
        shared = self.shared(x)
        xs = self.act(self.fc_smile(self.pool(self.res5_smile(shared)).flatten(1)))
        xg = self.act(self.fc_gender(self.pool(self.res5_gender(shared)).flatten(1)))
        return xs, xg

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        xs, xg = self.task_units(x)
        if self.attention:
            xs, xg = self.att_smile(xs, xg), self.att_gender(xg, xs)  # Eq. 3-6 and Eq. 9-12, from the same units
        return {"smile": self.head_smile(xs), "gender": self.head_gender(xg)}

    @classmethod
    def from_tmtl(cls, source, **overrides) -> TaskAttentionNet:
        """The attention model initialised from a trained TMTL: ``source`` is a checkpoint path or s3:// URI
        (models.checkpoint format), a ``TaskAttentionNet`` or a state dict. Every TMTL weight is copied (trunk,
        both res5, FCS, FCG, softmax layers); the attention scalars keep their he_normal init. The new model's
        other constructor arguments come from the TMTL's config, then ``overrides``."""
        import models
        from models.checkpoint import load_checkpoint

        config: dict = {}
        if isinstance(source, str) or hasattr(source, "__fspath__"):
            tmtl, info = load_checkpoint(str(source))
            if info.model != "task_attention":
                raise ValueError(f"{source} is a {info.model!r} checkpoint, not task_attention (TMTL)")
            config, state = dict(info.config), tmtl.state_dict()
        elif isinstance(source, TaskAttentionNet):
            config, state = dict(getattr(source, "config", {})), source.state_dict()
        elif isinstance(source, dict):
            state = source
        else:
            raise TypeError(f"from_tmtl takes a checkpoint URI, a TaskAttentionNet or a state dict, not {type(source)}")
        config.pop("backbone_weights", None)  # the TMTL's trained weights replace any initial weights
        config.update(overrides)
        config["attention"] = True
        model = models.create_model("task_attention", **config)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a tensor of another shape (e.g. another ``units``)
            raise ValueError(f"the TMTL weights do not fit the attention model: {e}") from None
        not_attention = [k for k in missing if not k.startswith(("att_smile.", "att_gender."))]
        if not_attention or unexpected:
            raise ValueError(f"the TMTL weights do not fit: missing {not_attention[:5]}, unexpected {unexpected[:5]}")
        return model


def from_tmtl(source, **overrides) -> TaskAttentionNet:
    """Module-level alias of :meth:`TaskAttentionNet.from_tmtl`."""
    return TaskAttentionNet.from_tmtl(source, **overrides)
