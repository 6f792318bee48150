"""torchvision trunks with the real weight-loading path: a torchvision weights file given by a local
path or an ``s3://`` URI, loaded with ``weights_only=True``. No hub download: the default is random
initialisation (see the README for how to use ImageNet weights)."""

from __future__ import annotations

import io

import torch
import torchvision
from torch import nn


def load_state_dict(uri: str) -> dict:
    """A state dict from a local path or s3:// URI, safely (tensors only, never arbitrary pickle)."""
    from facedata import storage

    data = storage.read_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as st_load

        return st_load(data)
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return obj


def resnet(depth: int = 50, weights: str | None = None) -> nn.Module:
    """A torchvision ResNet (18/34/50/101) with ImageNet-style weights from ``weights`` if given."""
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
