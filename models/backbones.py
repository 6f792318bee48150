"""torchvision trunks with the real weight-loading path: a torchvision weights file given by a local
path or an ``s3://`` URI, loaded with ``weights_only=True``. No hub download: the default is random
initialisation (see the README for how to use ImageNet weights)."""

from __future__ import annotations

import torch
from torch import nn


def load_state_dict(uri: str) -> dict:
    """A state dict from a local path or s3:// URI, safely (tensors only, never arbitrary pickle), through the
    checkpoint loader's bounded reader and checks (models/checkpoint.py: at most 2 GiB, read within 600 s, no
    FIFO or device; an archive no bigger unpacked than the file, tensors owning their storage). Unbounded, a FIFO
    hung the build forever and an S3 object of any size was read whole (audit). Refusals: CheckpointError, a
    ValueError."""
    from .checkpoint_read import read_checked, torch_load_checked

    data = read_checked(uri, what="backbone weights")
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as st_load

        return st_load(data)  # safetensors checks every tensor's offsets against the data: copies, no views
    obj = torch_load_checked(data, uri, checkpoint=False)  # a torchvision file may be torch's legacy format
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return obj


def resnet(depth: int = 50, weights: str | None = None) -> nn.Module:
    """A torchvision ResNet (18/34/50/101) with ImageNet-style weights from ``weights`` if given."""
    # imported here, not at the top: ``import torchvision`` costs ~1.4 s of CPU (it pulls in torch._dynamo),
    # paid by every Ray worker process that loads the model registry, whichever trunk its model has
    import torchvision

    builders = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34,
                50: torchvision.models.resnet50, 101: torchvision.models.resnet101}
    if depth not in builders:
        raise ValueError(f"resnet depth must be one of {sorted(builders)}")
    net = builders[depth](weights=None)
    if weights:
        try:
            missing, unexpected = net.load_state_dict(load_state_dict(weights), strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"{weights} does not fit resnet{depth}: {str(e)[:300]}") from None
        bad = [k for k in missing if not k.startswith("fc.")]
        if bad or unexpected:
            raise ValueError(f"{weights} does not fit resnet{depth}: missing {bad[:5]}, unexpected {unexpected[:5]}")
    return net


# --- the pretrained face backbone (dlib's ResNet, models/dlib_resnet.py) ----------------------------------
BACKBONES = ("resnet", "dlib_resnet")
FACE_FEATURES = ("pooled", "descriptor", "levels")
LEVEL_WIDTHS = (128, 256, 256)  # "levels": the global averages of level2, level1 and level0, concatenated


def dlib_preprocessing(image_size: int | tuple[int, int] = 150, resize: str = "stretch"):
    """dlib's input normalisation (``(rgb - means) / 256``) and its 150×150 / 25 % chip as the face template,
    at ``image_size`` (the template scaled with it)."""
    from .dlib_resnet import INPUT_SIZE, MEAN_RGB, SCALE, chip_template, min_input_size
    from .preprocess import Preprocessing

    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if min(hw) < min_input_size():
        raise ValueError(f"the dlib face backbone needs inputs of at least {min_input_size()} px, got {image_size}")
    pre = Preprocessing(size=(INPUT_SIZE, INPUT_SIZE), mean=tuple(m / 255.0 for m in MEAN_RGB),
                        std=(SCALE / 255.0,) * 3, resize=resize, template=chip_template(INPUT_SIZE))
    return pre if hw == pre.size else pre.with_size(hw)


def dlib_trunk(weights: str | None = "package") -> tuple[nn.Module, nn.Module, int]:
    """dlib's face ResNet split for models that need a spatial map or a res5-like last stage:
    (stem .. level1, level0, channels of level0's map = 256). level0 is dlib's last stage (one down-sampling
    block of 256 channels: 4×4 -> 2×2 at 150 px), the counterpart of a ResNet's res5; its 2×2 map (3×2 at
    218×178) is the last spatial map before the global pooling. Fine-tuned whole (no freezing here)."""
    from .dlib_resnet import dlib_face_resnet, stem

    net, _ = dlib_face_resnet(weights)

    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.affine1 = net.conv1, net.affine1

        def forward(self, x):
            return stem(self.conv1, self.affine1, x)

    return nn.Sequential(Stem(), net.level4, net.level3, net.level2, net.level1), net.level0, 256


def optimizer_groups_with_trunk(model: nn.Module, trunk: nn.Module, lr: float, trunk_lr_scale: float) -> list[dict]:
    """Parameter groups for the optimizer (core.engine.make_optimizer) of a model built on a face trunk: its own
    layers at ``lr``, the trunk's trainable layers at ``trunk_lr_scale * lr``, frozen ones left out. Any other
    trunk (a torchvision ResNet, HMTNet's VGG-M) trains at ``lr`` with the rest, in one group."""
    if not isinstance(trunk, FaceBackbone):
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    return trunk_rate_groups(model, list(trunk.parameters()), trunk.trainable_parameters(), lr, trunk_lr_scale)


def trunk_rate_groups(model: nn.Module, trunk: list, trainable: list, lr: float, trunk_lr_scale: float) -> list[dict]:
    """Two optimizer groups: ``model``'s trainable parameters outside ``trunk`` at ``lr``, then the ``trainable``
    trunk parameters at ``trunk_lr_scale * lr`` (no second group when there are none)."""
    ids = {id(p) for p in trunk}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in ids], "lr": lr}]
    if trainable:
        groups.append({"params": trainable, "lr": lr * trunk_lr_scale})
    return groups


class FaceBackbone(nn.Module):
    """dlib's face-recognition ResNet as a trunk: frozen, partly frozen or fine-tuned, and, when frozen,
    with a cache of its outputs.

    ``weights``: ``"package"`` (dlib's weights from the installed ``face-recognition-models``; random
    initialisation with a warning when it is absent), a path to the same file (checked by sha256), or None
    (random). ``feature``: ``"pooled"``, the 256-D global average pool before dlib's 128-D projection (where
    the blog cuts FaceNet: after its average pooling, without the bottleneck), or ``"descriptor"``, the 128-D
    face descriptor itself, or ``"levels"``, the global averages of three levels' maps (level2, level1 and
    level0: 128 + 256 + 256 = 640-D, :data:`LEVEL_WIDTHS`), for a model whose heads read several depths (HMTNet's
    branches and feature aggregator). ``freeze``: ``"all"``, ``"none"``, or the number of leading groups of
    :data:`DlibFaceResNet.GROUPS` (stem, level4, level3, level2, level1, level0, fc) to keep fixed.

    The cache (``cache=True``) works only in training mode (labeling and serving never fill it) and while
    every parameter is frozen: a batch's samples are looked
    up by a digest of their content (the normalised input tensor, so the preprocessing and augmentation are
    part of the key) together with a digest of the weights; only the misses run through the network. It
    lives in this module (one per process, so per Ray Train worker), is emptied when weights are loaded, and
    stops growing at ``cache_max`` entries. Training the heads on a frozen backbone then costs one backbone
    pass per distinct input (two per face with horizontal flips), not one per epoch.
    """

    def __init__(self, weights: str | None = "package", feature: str = "pooled", freeze: str | int = "all",
                 cache: bool = True, cache_max: int = 200_000):
        super().__init__()
        from .dlib_resnet import DlibFaceResNet, dlib_face_resnet

        if feature not in FACE_FEATURES:
            raise ValueError(f"face backbone feature must be one of {FACE_FEATURES}, got {feature!r}")
        groups = DlibFaceResNet.GROUPS
        if freeze == "all":
            n_frozen = len(groups)
        elif freeze == "none":
            n_frozen = 0
        elif isinstance(freeze, int) and not isinstance(freeze, bool) and 0 <= freeze <= len(groups):
            n_frozen = freeze
        else:
            raise ValueError(f"backbone_freeze must be 'all', 'none' or an integer 0-{len(groups)} (leading groups "
                             f"of {', '.join(groups)}), got {freeze!r}")
        self.net, self.pretrained = dlib_face_resnet(weights)
        self.feature = feature
        self.out_features = {"pooled": 256, "descriptor": 128, "levels": sum(LEVEL_WIDTHS)}[feature]
        if feature != "descriptor":
            self.net.fc.requires_grad_(False)  # not used
        for name in groups[:n_frozen]:
            for m in self.net.group(name):
                m.requires_grad_(False)
        self.frozen_groups = groups[:n_frozen]
        self.cache_enabled = bool(cache)
        self.cache_max = int(cache_max)
        self._cache: dict[bytes, torch.Tensor] = {}
        self._weights_digest: bytes | None = None
        self.cache_hits = self.cache_misses = 0
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_cache())

    def clear_cache(self) -> None:
        self._cache.clear()
        self._weights_digest = None

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self._used_parameters())

    def _used_parameters(self):
        for name, p in self.net.named_parameters():
            if self.feature != "descriptor" and name.startswith("fc."):
                continue
            yield p

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self._used_parameters() if p.requires_grad]

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature == "levels":
            return torch.cat([m.mean(dim=(2, 3)) for m in self.net.level_maps(x)], 1)
        return self.net.pooled(x) if self.feature == "pooled" else self.net(x)

    def _digest_weights(self) -> bytes:
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        for k, v in self.net.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return h.digest()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.cache_enabled and self.training and self.frozen):
            return self._compute(x)
        import hashlib

        if self._weights_digest is None:
            self._weights_digest = self._digest_weights()
        flags = f"{tuple(x.shape[1:])}{x.dtype}{torch.is_autocast_enabled(x.device.type)}".encode()
        rows = x.detach().cpu().contiguous().numpy()
        keys = [hashlib.blake2b(self._weights_digest + flags + r.tobytes(), digest_size=16).digest() for r in rows]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        self.cache_hits += len(keys) - len(missing)
        self.cache_misses += len(missing)
        computed = {}
        if missing:
            with torch.no_grad():
                out = self._compute(x[missing]).float().cpu()
            for j, i in enumerate(missing):
                computed[i] = out[j]
                if len(self._cache) < self.cache_max:
                    self._cache[keys[i]] = out[j].clone()
        return torch.stack([computed[i] if i in computed else self._cache[k] for i, k in enumerate(keys)]).to(x.device)
