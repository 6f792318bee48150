"""What a checkpoint's content hash covers, and how (models/checkpoint.py says why; this is the how).

Format 2 (:func:`content_hash`): the format name, the metadata (model name, config, output description,
preprocessing, metrics, extra) and every tensor's name, dtype, shape and bytes. Format 1
(:func:`old_content_hash`): name, config and tensors only, kept to re-save old files
(``models.checkpoint.upgrade_checkpoint``).
"""

from __future__ import annotations

import hashlib
import json

import torch

FORMAT = "faceattr-checkpoint/2"
OLD_FORMAT = "faceattr-checkpoint/1"


def tensor_digest(h, state_dict: dict) -> None:
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes directly;
        # the flat view has the same bytes as before for every other tensor.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def has_arrays(value) -> bool:
    """Whether a tensor or numpy array appears anywhere in ``value`` (nested in dicts, lists, tuples)."""
    import numpy as np

    if isinstance(value, (torch.Tensor, np.ndarray)):
        return True
    if isinstance(value, dict):
        return any(has_arrays(k) or has_arrays(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(has_arrays(v) for v in value)
    return False


def exact_encoding(value, out: list) -> None:
    """An injective, length-prefixed encoding of ``value`` appended to ``out``: tensors and arrays by dtype,
    shape and every byte (``repr`` shortens them to a few values), dicts by sorted encoded keys, a tuple as
    the list it loads back as (as JSON did), anything else by type and ``repr``."""
    import numpy as np

    def put(tag: bytes, data: bytes) -> None:
        out.append(tag + len(data).to_bytes(8, "big") + data)

    if value is None or isinstance(value, bool):
        put(b"z", repr(value).encode())
    elif isinstance(value, int):
        put(b"i", str(int(value)).encode())
    elif isinstance(value, float):
        put(b"f", float(value).hex().encode())
    elif isinstance(value, str):
        put(b"s", value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, (bytes, bytearray)):
        put(b"y", bytes(value))
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        put(b"t", f"{t.dtype}|{tuple(t.shape)}|".encode() + raw)
    elif isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        raw = a.tobytes() if a.dtype != object else repr(a.tolist()).encode()
        put(b"a", f"{a.dtype.str}|{a.shape}|".encode() + raw)
    elif isinstance(value, dict):
        items = []
        for k, v in value.items():
            kb, vb = [], []
            exact_encoding(k, kb)
            exact_encoding(v, vb)
            items.append((b"".join(kb), b"".join(vb)))
        put(b"d", b"".join(k + v for k, v in sorted(items)))
    elif isinstance(value, (list, tuple)):
        parts: list = []
        for v in value:
            exact_encoding(v, parts)
        put(b"l", len(value).to_bytes(8, "big") + b"".join(parts))
    elif isinstance(value, (set, frozenset)):
        parts = []
        for v in value:
            enc: list = []
            exact_encoding(v, enc)
            parts.append(b"".join(enc))
        put(b"e", b"".join(sorted(parts)))
    else:
        put(b"r", f"{type(value).__module__}.{type(value).__qualname__}|{value!r}".encode("utf-8", "surrogatepass"))


def content_hash(name: str, config: dict, state_dict: dict, outputs: list | None = None,
                 preprocessing: dict | None = None, metrics: dict | None = None, extra: dict | None = None) -> str:
    """The format-2 hash: everything that describes the checkpoint (see the module docstring).

    The metadata is hashed as sorted JSON. Where it holds a tensor or numpy array (in ``extra``, say, at
    any depth), JSON would turn it into its ``repr``, which shows a few of its values: two files that differ
    in one value of a 5,000-value tensor hashed alike (issue #22). Such metadata is hashed instead by an
    exact encoding (:func:`exact_encoding`: every byte of every array) after a separator that JSON text never
    contains; metadata without arrays (every checkpoint ``save_checkpoint`` writes, whose ``extra`` is
    JSON) keeps the hash it always had."""
    h = hashlib.sha256()
    h.update(FORMAT.encode())
    meta = {"model": name, "config": config, "outputs": outputs, "preprocessing": preprocessing,
            "metrics": metrics, "extra": extra}
    if has_arrays(meta):
        parts: list = []
        exact_encoding(meta, parts)
        h.update(b"\x00exact-metadata/1\x00")
        h.update(b"".join(parts))
    else:
        h.update(json.dumps(meta, sort_keys=True, default=repr).encode())
    tensor_digest(h, state_dict)
    return "sha256:" + h.hexdigest()


def old_content_hash(name: str, config: dict, state_dict: dict) -> str:
    """The format-1 hash (model name, config, tensors), for :func:`upgrade_checkpoint` only."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": name, "config": config}, sort_keys=True).encode())
    tensor_digest(h, state_dict)
    return "sha256:" + h.hexdigest()


def hash_of(obj: dict) -> str:
    return content_hash(obj["model"], obj["config"], obj["state_dict"], obj["outputs"], obj["preprocessing"],
                        obj["metrics"], obj["extra"])
