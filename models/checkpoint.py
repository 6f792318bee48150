"""The project's one checkpoint format.

A checkpoint is a single ``torch.save`` file holding only tensors and plain Python values, so that it
loads with ``torch.load(weights_only=True)`` (no arbitrary pickle, safe to read from a shared bucket):

    {"format": "faceattr-checkpoint/1", "model": name, "config": {...constructor arguments...},
     "outputs": [...output description...], "preprocessing": {...}, "metrics": {...},
     "extra": {...}, "state_dict": {...}, "hash": "sha256:..."}

Thresholds and dynamic weights (DMM-CNN) are buffers of the model and travel in ``state_dict``. The hash
covers the model name, config and every tensor's bytes; it is checked on load and reported by the label
job and the serving endpoint so a Parquet row says exactly which weights produced it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
from dataclasses import dataclass

import torch

FORMAT = "faceattr-checkpoint/1"


class CheckpointError(ValueError):
    pass


@dataclass
class CheckpointInfo:
    uri: str
    model: str
    config: dict
    outputs: list
    preprocessing: dict
    metrics: dict
    extra: dict
    hash: str

    def short_hash(self) -> str:
        return self.hash.split(":", 1)[-1][:16]


def content_hash(name: str, config: dict, state_dict: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"model": name, "config": config}, sort_keys=True).encode())
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes directly;
        # the flat view has the same bytes as before for every other tensor.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def checkpoint_bytes(model, metrics: dict | None = None, extra: dict | None = None) -> tuple[bytes, str]:
    """Serialise ``model`` (a ``FaceModel``, possibly wrapped by DDP) into the checkpoint format."""
    model = getattr(model, "module", model)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    digest = content_hash(model.name, model.config, sd)
    obj = {
        "format": FORMAT,
        "model": model.name,
        "config": model.config,
        "outputs": model.outputs.describe(),
        "preprocessing": model.preprocessing.to_dict(),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "extra": json.loads(json.dumps(extra or {})),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "state_dict": sd,
        "hash": digest,
    }
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue(), digest


def save_checkpoint(model, uri: str, metrics: dict | None = None, extra: dict | None = None) -> str:
    """Write a checkpoint to a local path or s3:// URI; returns its content hash."""
    from facedata import storage

    data, digest = checkpoint_bytes(model, metrics, extra)
    storage.write_bytes(uri, data)
    return digest


def load_checkpoint(uri: str, map_location="cpu"):
    """Load a checkpoint from a path or s3:// URI -> ``(model in eval mode, CheckpointInfo)``.

    Uses ``torch.load(weights_only=True)``; refuses files of another format and files whose content
    does not match their hash."""
    import models
    from facedata import storage

    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {uri}") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not our format"
        raise CheckpointError(f"{uri} is not a loadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{uri} is not a {FORMAT} file")
    sd = obj["state_dict"]
    digest = content_hash(obj["model"], obj["config"], sd)
    if digest != obj["hash"]:
        raise CheckpointError(f"{uri}: content hash mismatch (file says {obj['hash']}, content is {digest})")
    config = dict(obj["config"])
    config.pop("backbone_weights", None)  # the trained weights replace any initial backbone weights
    model = models.create_model(obj["model"], **config)
    model.config = obj["config"]
    model.preprocessing = _with_template(model.preprocessing, obj.get("preprocessing"))
    model.load_state_dict(sd)
    model.eval()
    info = CheckpointInfo(uri=uri, model=obj["model"], config=obj["config"], outputs=obj["outputs"],
                          preprocessing=obj["preprocessing"], metrics=obj.get("metrics", {}),
                          extra=obj.get("extra", {}), hash=obj["hash"])
    return model, info


def _with_template(pre, saved: dict | None):
    """The model's preprocessing with the face template its checkpoint measured on the training data (the
    constructor does not know it; older checkpoints have none and keep the model's default)."""
    from dataclasses import replace

    if not isinstance(saved, dict) or saved.get("template") is None:
        return pre
    tc = saved.get("template_crop")
    try:
        return replace(pre, template=tuple(tuple(map(float, p)) for p in saved["template"]),
                       template_crop=tuple(map(int, tc)) if tc is not None else None)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's face template is malformed: {e}") from None
