"""The project's one checkpoint format.

A checkpoint is a single ``torch.save`` file holding only tensors and plain Python values, so that it
loads with ``torch.load(weights_only=True)`` (no arbitrary pickle, safe to read from a shared bucket):

    {"format": "faceattr-checkpoint/2", "model": name, "config": {...constructor arguments...},
     "outputs": [...output description...], "preprocessing": {...}, "metrics": {...},
     "extra": {...}, "created": "...", "state_dict": {...}, "hash": "sha256:..."}

Thresholds and dynamic weights (DMM-CNN) are buffers of the model and travel in ``state_dict``.

The hash (format 2) covers every field but ``created`` and ``hash`` itself: the model name, config,
output description, preprocessing (with the face template), metrics, extra and every tensor's name,
dtype, shape and bytes. We chose to cover ``metrics`` and ``extra`` too although they do not change a
prediction: they are served by ``/v1/models`` and read by people deciding which model to trust, so an
edit to them is tampering as well; ``created`` is left out so that two saves of the same model have one
hash. It is checked on load and reported by the label job and the serving endpoint, so a Parquet row says
exactly which checkpoint produced it.

Pinning: every place that takes a checkpoint URI (``jobs.label --checkpoint``, ``jobs.serve --model``,
``models:`` in ``serve.yaml``) accepts ``URI#sha256:<64 hex digits>``; the checkpoint is refused unless its
content hash is that one (:func:`split_pin`).

Format 1 files (hash over name, config and weights only) are refused with a message that says how to
re-save them (:func:`upgrade_checkpoint`, ``python -m models.checkpoint upgrade OLD NEW``): accepting them
would let anyone edit the outputs or preprocessing of a format-2 file, relabel it format 1 and still
load it.

Safety. The hash is unkeyed (anyone can re-sign an edited file), so the work done on a file before its hash and pin
are checked, and before its model is built, is bounded by the file's size and the bounds below (audit): the read
(models/checkpoint_read.py ``read_limits``: 2 GiB, 600 s, no FIFO or device); the archive before ``torch.load``
(entries stored, as torch.save writes them, and no bigger in sum than the file: ``checkpoint_hash.check_archive``);
the loaded values before hashing (JSON values, tensors only in ``state_dict``, each owning exactly its storage,
counts capped: ``checkpoint_hash.check_contents``); the fields of ``metrics`` and ``extra`` the jobs read, once the
hash is checked (:func:`metadata_problem`: ``extra["faces"]``, ``extra["split_seed"]``, the recipe's record); the model before it is allocated (built on the meta device from the file's
config, held to the read limit and to the file's tensors' shapes and dtypes: :func:`_check_fits`; its input size
and face template to models/preprocess.py ``check_bounds``). Every refusal is a :class:`CheckpointError`.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import warnings
from dataclasses import dataclass

import torch

from .checkpoint_hash import FORMAT, OLD_FORMAT, check_contents, hash_of, old_content_hash
from .checkpoint_read import (  # noqa: F401 - CheckpointError and the read bounds are part of this module's API
    DEFAULT_MAX_CHECKPOINT_BYTES,
    MAX_BYTES_ENV,
    TIMEOUT_ENV,
    CheckpointError,
    read_checked,
    read_limits,
    torch_load_checked,
)

PIN_SEP = "#sha256:"
_FIELDS = {"model": str, "config": dict, "outputs": list, "preprocessing": dict, "metrics": dict, "extra": dict,
           "state_dict": dict, "hash": str}


def split_pin(uri: str) -> tuple[str, str | None]:
    """``"s3://b/m.pt#sha256:<hex>"`` -> ``("s3://b/m.pt", "sha256:<hex>")``; no pin -> ``(uri, None)``."""
    if PIN_SEP not in uri:
        return uri, None
    base, _, digest = uri.rpartition(PIN_SEP)
    digest = digest.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not base:
        raise CheckpointError(f"{uri!r}: a pinned checkpoint is URI#sha256:<64 hex digits>")
    return base, "sha256:" + digest


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


def checkpoint_bytes(model, metrics: dict | None = None, extra: dict | None = None) -> tuple[bytes, str]:
    """Serialise ``model`` (a ``FaceModel``, possibly wrapped by DDP) into the checkpoint format."""
    model = getattr(model, "module", model)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
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
    }
    digest = obj["hash"] = hash_of(obj)  # JSON of the metadata: a tuple and the list it loads back as hash alike
    return _save(obj), digest


def _save(obj: dict) -> bytes:
    check_contents(obj, read_limits()[0])  # never write what the loader refuses (a non-string key, a view)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(model, uri: str, metrics: dict | None = None, extra: dict | None = None) -> str:
    """Write a checkpoint to a local path or s3:// URI; returns its content hash."""
    import storage

    data, digest = checkpoint_bytes(model, metrics, extra)
    storage.write_bytes(uri, data)
    return digest


def _read(uri: str, map_location="cpu", max_bytes: int | None = None, timeout_s: float | None = None,
          data: bytes | None = None) -> dict:
    """``uri``'s checkpoint dict, its fields checked; ``data``: its bytes, already in memory (``uri`` names them)."""
    max_bytes, timeout_s = read_limits(max_bytes, timeout_s)
    if data is None:
        data = read_checked(uri, max_bytes, timeout_s)
    elif len(data) > max_bytes:
        raise CheckpointError(f"{uri}: {len(data)} bytes, over the checkpoint read limit of {max_bytes}")
    obj = torch_load_checked(data, uri, map_location, max_bytes)
    if not isinstance(obj, dict) or obj.get("format") not in (FORMAT, OLD_FORMAT):
        raise CheckpointError(f"{uri} is not a {FORMAT} file")
    bad = [k for k, typ in _FIELDS.items() if k not in obj and not (k in ("metrics", "extra") and obj["format"] == OLD_FORMAT)
           or (k in obj and not isinstance(obj[k], typ))]
    if bad or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj["state_dict"].items()):
        raise CheckpointError(f"{uri} is a malformed checkpoint (missing or mistyped: {', '.join(bad) or 'state_dict'})")
    return obj


def _verified(uri: str, map_location="cpu", expected_hash: str | None = None, max_bytes: int | None = None,
              timeout_s: float | None = None, data: bytes | None = None) -> tuple[str, dict]:
    """``(uri without its pin, the checkpoint's dict)`` once its format, content hash and pin are checked."""
    uri, pin = split_pin(uri)
    if expected_hash is not None:
        _, expected = split_pin("x" + PIN_SEP + expected_hash.removeprefix("sha256:"))
        if pin is not None and pin != expected:
            raise CheckpointError(f"{uri}: two different pins ({pin}, {expected})")
        pin = expected
    obj = _read(uri, map_location, max_bytes, timeout_s, data)
    if obj["format"] == OLD_FORMAT:
        raise CheckpointError(f"{uri} is a {OLD_FORMAT} file, whose hash does not cover its outputs, preprocessing, "
                              f"metrics and extra; re-save it as {FORMAT} with "
                              f"`python -m models.checkpoint upgrade {uri} NEW` (checks its old hash first)")
    try:
        digest = hash_of(obj)
    except (RecursionError, TypeError, ValueError, RuntimeError, MemoryError, OverflowError) as e:
        # check_contents bounded the work; what is left (an int too long for str(), an allocation that fails on
        # a small machine) is still this file's fault, not a crash of the caller
        raise CheckpointError(f"{uri}: its metadata cannot be hashed ({type(e).__name__}: {str(e)[:200]})") from None
    if digest != obj["hash"]:
        raise CheckpointError(f"{uri}: content hash mismatch (file says {obj['hash']}, content is {digest})")
    if pin is not None and digest != pin:
        raise CheckpointError(f"{uri} is {digest}, not the pinned {pin}: refusing it")
    problem = metadata_problem(obj["metrics"], obj["extra"])
    if problem:
        raise CheckpointError(f"{uri}: its metadata is not what jobs.train writes ({problem}): refusing it, as a "
                              "job that reads the field would fail half way")
    return uri, obj


def _kind(v) -> str:
    return "null" if v is None else type(v).__name__


def metadata_problem(metrics: dict, extra: dict) -> str | None:
    """What is wrong with the fields of a checkpoint's metadata that the jobs read, or None: ``metrics`` numbers
    (``checkpoint_bytes`` writes them back with ``float``); ``extra["faces"]`` a mapping whose ``mode`` is text
    (how it was trained: jobs.evaluate's default ``--faces``); ``extra["split_seed"]`` an integer (the split
    jobs.evaluate reads); the recipe's record (``extra["named_recipe"]``, models/recipes.py ``record_lines``) a
    mapping whose ``faces`` is a mapping and ``stages`` a list of mappings. Each may be absent or null but the
    seed. A hashed file can hold anything (its hash is unkeyed): checked when it is loaded, not where it is read."""
    from .recipes import RECORD_KEY

    for k, v in metrics.items():
        if not isinstance(v, (int, float)):
            return f"metrics.{k[:80]} is {_kind(v)}, not a number"

    def mapping(value, where: str, text: tuple = ()) -> str | None:
        if value is not None and not isinstance(value, dict):
            return f"{where} is {_kind(value)}, not a mapping"
        for key in text:
            v = (value or {}).get(key)
            if v is not None and not isinstance(v, str):
                return f"{where}.{key} is {_kind(v)}, not text"
        return None

    if "split_seed" in extra and (isinstance(extra["split_seed"], bool) or not isinstance(extra["split_seed"], int)):
        return f"extra.split_seed is {_kind(extra['split_seed'])}, not an integer"
    rec = extra.get(RECORD_KEY)
    problem = mapping(extra.get("faces"), "extra.faces", ("mode",)) or mapping(rec, f"extra.{RECORD_KEY}")
    if problem or rec is None:
        return problem
    faces = rec.get("faces")
    problem = (mapping(faces, f"extra.{RECORD_KEY}.faces", ("mode",))
               or mapping((faces or {}).get("options"), f"extra.{RECORD_KEY}.faces.options"))
    stages = rec.get("stages")
    if not problem and stages is not None and not (isinstance(stages, list) and all(isinstance(x, dict) for x in stages)):
        problem = f"extra.{RECORD_KEY}.stages is {_kind(stages)}, not a list of mappings"
    return problem


def load_checkpoint(uri: str, map_location="cpu", expected_hash: str | None = None, max_bytes: int | None = None,
                    timeout_s: float | None = None, data: bytes | None = None):
    """Load a checkpoint from a path or s3:// URI -> ``(model in eval mode, CheckpointInfo)``; with ``data``,
    from those bytes (a file already read: the train job's export), ``uri`` naming them.

    Uses ``torch.load(weights_only=True)``; refuses (:class:`CheckpointError`) files of another format,
    malformed ones, files whose content does not match their hash, and, when the URI ends in
    ``#sha256:<hex>`` or ``expected_hash`` is given, files whose hash is not that one, and what the module
    docstring's bounds refuse (the read: 2 GiB and 600 s unless set, :func:`read_limits`)."""
    import models
    from models.preprocess import Preprocessing, check_bounds

    max_bytes, timeout_s = read_limits(max_bytes, timeout_s)
    uri, obj = _verified(uri, map_location, expected_hash, max_bytes, timeout_s, data)
    config = dict(obj["config"])
    config.pop("backbone_weights", None)  # the trained weights replace any initial backbone weights
    try:
        skeleton = _skeleton(obj["model"], config)
    except Exception as e:  # noqa: BLE001 - a file whose hash matches but whose content does not build a model
        raise CheckpointError(f"{uri} does not build its model ({type(e).__name__}: {e})") from None
    try:
        pre = _with_template(skeleton.preprocessing, obj["preprocessing"])
        check_bounds(pre)
        check_bounds(Preprocessing.from_dict(obj["preprocessing"]))  # served as it is by /v1/models
    except Exception as e:  # noqa: BLE001 - e.g. a 100000 px input (a 60 GB warm-up batch: audit), a NaN template
        raise CheckpointError(f"{uri}: its preprocessing is refused ({e})") from None
    _check_fits(uri, skeleton, obj["state_dict"], max_bytes)
    try:  # built by its constructor: to_empty() leaves garbage in non-persistent buffers (dmm_cnn's _to_celeba)
        model = models.create_model(obj["model"], **config)
        model.config = obj["config"]
        model.load_state_dict(obj["state_dict"])
        model.preprocessing = pre
    except Exception as e:  # noqa: BLE001 - MemoryError included: a clear error, not a crash of the caller
        raise CheckpointError(f"{uri} does not build its model ({type(e).__name__}: {e})") from None
    model.eval()
    return model, _info(uri, obj)


def _skeleton(name: str, config: dict):
    """The model ``config`` builds, on the meta device (per thread): no memory (hard_sharing with hidden=10**6 is
    62 GB: audit). The registry is imported first (no module's constants made there); warnings are silenced (the
    real build gives them; dlib's weights loaded into meta parameters warn)."""
    import models

    models.model_class(name)
    with torch.device("meta"), _NoValues(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return models.create_model(name, **config)


class _NoValues(torch.overrides.TorchFunctionMode):
    """In _skeleton: values meta tensors do not have are not computed (random draws, the zoo's argsort and
    arithmetic with a number: an empty tensor of the shape and dtype they would give). On the meta device torch
    runs them in Python code that imports torch._dynamo and sympy: 0.6-1.5 s and up to 150 MB (measured)."""

    OPS = frozenset({"normal_", "uniform_", "argsort", "mul", "__mul__", "add", "__add__", "randn", "rand"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name, kwargs = getattr(func, "__name__", ""), kwargs or {}
        if name not in self.OPS:  # the mode sees every tensor call of the build: the rest at once
            return func(*args, **kwargs)
        t = args[0] if args and isinstance(args[0], torch.Tensor) and args[0].is_meta else None
        if t is not None and name in ("normal_", "uniform_"):
            return t
        if t is not None and name == "argsort" and len(args) == 1 and not kwargs:
            return torch.empty(t.shape, dtype=torch.int64)  # not empty_like: Python code too
        if t is not None and len(args) == 2 and isinstance(args[1], (int, float)) and not kwargs \
                and t.is_floating_point() and name in ("mul", "__mul__", "add", "__add__"):
            return torch.empty(t.shape, dtype=t.dtype)
        if name in ("randn", "rand") and func in (torch.randn, torch.rand):  # on the enclosing meta device
            return torch.empty(*args, **{k: v for k, v in kwargs.items() if k != "generator"})
        return func(*args, **kwargs)


def _check_fits(uri: str, skeleton, state_dict: dict, max_bytes: int) -> None:
    """Refuse a model over ``max_bytes`` of parameters and buffers (the read limit: no readable file holds it) or
    whose persistent tensors the file's do not match in name, shape, dtype (load_state_dict casts a dtype silently);
    extra ones (calibration buffers) are left to the strict load."""
    from itertools import chain

    size = sum(t.numel() * t.element_size() for t in chain(skeleton.parameters(), skeleton.buffers()))
    if size > max_bytes:
        raise CheckpointError(f"{uri}: its config builds a model of {size} bytes of parameters and buffers, over "
                              f"the limit of {max_bytes} ({MAX_BYTES_ENV})")
    bad = []
    for k, v in skeleton.state_dict().items():
        t = state_dict.get(k)
        if t is None or t.shape != v.shape or t.dtype != v.dtype:
            got = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
            bad.append(f"{k}: {got}, the model has {tuple(v.shape)} {v.dtype}")
    if bad:
        raise CheckpointError(f"{uri}: its tensors do not fit the model its config builds ({len(bad)} differ: "
                              f"{'; '.join(bad[:3])})")


def _info(uri: str, obj: dict) -> CheckpointInfo:
    return CheckpointInfo(uri=uri, model=obj["model"], config=obj["config"], outputs=obj["outputs"],
                          preprocessing=obj["preprocessing"], metrics=obj["metrics"], extra=obj["extra"],
                          hash=obj["hash"])


def checkpoint_dict(uri: str, data: bytes | None = None) -> dict:
    """A checkpoint's whole dict, weights included, its format, fields and content hash checked, without building
    its model (``data``: its bytes, already in memory): what a training run resumes from."""
    return _verified(uri, data=data)[1]


def checkpoint_info(uri: str, data: bytes | None = None) -> CheckpointInfo:
    """A checkpoint's metadata, its format and content hash checked, without building its model (``data``: its
    bytes, already in memory)."""
    return _info(*_verified(uri, data=data))


def with_extra(uri: str, entries: dict, data: bytes | None = None) -> tuple[bytes, str]:
    """The checkpoint ``data`` (its bytes, to be written to ``uri``; None: read from ``uri``) with ``entries``
    added to its ``extra``, and its new content hash (the hash covers ``extra``; weights, outputs and
    preprocessing are kept byte for byte). Nothing is written: the train job adds a recipe's record
    (models/recipes.py) to the export this way before writing it once."""
    uri, obj = _verified(uri, data=data)
    obj = {**obj, "extra": json.loads(json.dumps({**obj["extra"], **entries}))}
    obj["hash"] = hash_of(obj)
    return _save(obj), obj["hash"]


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
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: int(inf)
        raise CheckpointError(f"the checkpoint's face template is malformed: {e}") from None


# Constructor arguments added since format 1 whose defaults changed what an old checkpoint means (issue 11):
# an upgraded file keeps the behaviour it was trained with. task_attention then copied all of res5 per task
# (ResNet-18/34: 2/3 blocks, 50/101: 3); dmm_cnn's landmarks were on [0, 1].
_FORMAT1_READINGS = {
    "task_attention": lambda c: {"task_blocks": 2 if int(c.get("depth", 50)) == 18 else 3},
    "dmm_cnn": lambda c: {"landmark_scale": "unit"},
}


def upgrade_checkpoint(src: str, dst: str) -> str:
    """Re-save a format-1 checkpoint as format 2 after checking its format-1 hash; returns the new hash.
    Arguments added since (``_FORMAT1_READINGS``) are written into its config with their format-1 meaning."""
    import storage

    obj = _read(src)
    if obj["format"] != OLD_FORMAT:
        raise CheckpointError(f"{src} is not a {OLD_FORMAT} file")
    if old_content_hash(obj["model"], obj["config"], obj["state_dict"]) != obj["hash"]:
        raise CheckpointError(f"{src}: content hash mismatch: not upgrading a file that was changed")
    obj = {**obj, "format": FORMAT, "metrics": obj.get("metrics", {}), "extra": obj.get("extra", {}),
           "config": {**_FORMAT1_READINGS.get(obj["model"], lambda c: {})(obj["config"]), **obj["config"]}}
    obj["hash"] = hash_of(obj)
    storage.write_bytes(dst, _save(obj))
    return obj["hash"]


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "upgrade":
        raise SystemExit("usage: python -m models.checkpoint upgrade OLD_CHECKPOINT NEW_CHECKPOINT")
    try:
        print(upgrade_checkpoint(sys.argv[2], sys.argv[3]))
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
