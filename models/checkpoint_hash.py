"""What a checkpoint's content hash covers, and how (models/checkpoint.py says why; this is the how).

Format 2 (:func:`content_hash`): the format name, the metadata (model name, config, output description,
preprocessing, metrics, extra) and every tensor's name, dtype, shape and bytes. Format 1
(:func:`old_content_hash`): name, config and tensors only, kept to re-save old files
(``models.checkpoint.upgrade_checkpoint``).

What a loaded file may hold (:func:`check_contents`, run before hashing): the JSON that hashes the metadata is
injective only on JSON's own values, so a file whose metadata holds anything else (a dict key that is not a
string, bytes, a set, a tensor outside ``state_dict``, ...) is refused rather than hashed like another file (``{1: x}`` and ``{"1": x}`` had one
hash: audit); ``save_checkpoint`` never writes such a file, so no existing hash changes. The same walk bounds the
hashing's work: every tensor owns exactly its storage, and the values, text and tensor bytes it reaches (counted
each time they are reached, so shared references do not multiply the work unseen) are capped; before
``torch.load``, :func:`check_archive` holds what the archive unpacks to to the file's own size.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile

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
        # the flat view has the same bytes as before for every other tensor. Hashed through the buffer protocol,
        # not a tobytes() copy: the same bytes, without a second copy of each tensor while loading.
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())


# Caps of check_contents. Real metadata is a few thousand values and tens of KB of text (76 checkpoints of
# the zoo and tests scanned: at most ~9,000 values); a file may reach a value many times through shared
# references (a list of 2 references to a list of 2 ... : 2**30 values from a 2 KB pickle), which the JSON of
# the hash would expand. Depth: the zoo nests 4 deep; JSON's encoder recurses once a level.
MAX_VALUES = 1_000_000
MAX_TEXT_CHARS = 64 << 20
MAX_DEPTH = 64


class UnsafeContent(ValueError):
    """A loaded checkpoint holds something that the hash cannot cover faithfully or cheaply."""


def check_tensor(t: torch.Tensor, where: str) -> int:
    """``t``'s bytes, once it is known to own exactly its storage: strided, contiguous, at offset 0, its
    storage no larger than its values. torch.load rebuilds any view a file describes (``zeros(1).expand(N, N)``:
    a 2 KB file whose hashing made 2.5 GB: audit); a state dict torch.save wrote from a model's parameters never
    holds one (checkpoint_bytes saves each tensor contiguous)."""
    if t.layout != torch.strided or t.is_quantized:
        raise UnsafeContent(f"{where}: a {t.layout} tensor (only dense tensors are saved)")
    nbytes = t.numel() * t.element_size()
    if not t.is_contiguous() or t.storage_offset() != 0 or t.untyped_storage().nbytes() != nbytes:
        raise UnsafeContent(f"{where}: a view of shape {tuple(t.shape)}, strides {t.stride()}, offset "
                            f"{t.storage_offset()} over {t.untyped_storage().nbytes()} bytes of storage (a saved "
                            f"tensor owns exactly its {nbytes} bytes)")
    return nbytes


_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip entry's local header (zipfile's own layout)


def check_archive(data: bytes) -> None:
    """Refuse an archive that would unpack to more than the file holds: every entry stored (as torch.save writes
    them; a deflated 779 KB file unpacked an 800 MB tensor: audit), inside the file, and the entries' sizes at
    most the file's in sum (overlapping entries cannot count one region twice). Local headers too, not only the
    central directory zipfile reads: torch's reader must find the same stored entries."""
    try:
        infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as e:
        raise UnsafeContent(f"not a torch.save archive: {e}") from None
    total = 0
    for info in infos:
        start = info.header_offset + _LOCAL_HEADER.size
        header = data[info.header_offset:start]
        if len(header) < _LOCAL_HEADER.size:
            raise UnsafeContent(f"archive entry {info.filename!r} lies outside the file")
        sig, _, _, _, method, *_, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        end = start + name_len + extra_len + info.compress_size
        if sig != b"PK\x03\x04" or info.compress_type != zipfile.ZIP_STORED or method != zipfile.ZIP_STORED \
                or info.file_size != info.compress_size or end > len(data):
            raise UnsafeContent(f"archive entry {info.filename!r} is not stored whole in the file (compression "
                                f"{info.compress_type}; torch.save stores its entries uncompressed)")
        total += info.file_size
    if total > len(data):
        raise UnsafeContent(f"its archive entries add up to {total} bytes, more than the file's {len(data)}")


def check_contents(obj, max_tensor_bytes: int, json_only: bool = True) -> None:
    """Raise :class:`UnsafeContent` unless every tensor in ``obj`` (a loaded file) passes :func:`check_tensor`,
    their bytes at most ``max_tensor_bytes``, within :data:`MAX_VALUES`, :data:`MAX_TEXT_CHARS` and
    :data:`MAX_DEPTH`; iterative, so a hostile nesting is no RecursionError. ``json_only`` (a checkpoint): also
    tensors only as the values of the top-level ``state_dict`` and JSON values everywhere else (docs/deploy.md:
    a tensor in ``extra`` or ``metrics`` is refused at load, not when a job later writes the metadata back as
    JSON), dict keys strings, and state-dict keys without "(" (the tensor digest writes
    ``key dtype (shape) bytes`` with no length: a key holding "(" could splice two tensors into one: audit)."""
    values = text = tensor_bytes = 0
    # (value, depth, where): ``where`` is (parent's where, key), spelt out only in an error message, so that a
    # long list costs one small tuple a value, not one path string
    stack: list = [(obj, 0, None)]
    while stack:
        value, depth, where = stack.pop()
        values += 1
        if values + len(stack) > MAX_VALUES or depth > MAX_DEPTH:  # the pending ones count: no huge stack
            raise UnsafeContent(f"more than {MAX_VALUES} values or {MAX_DEPTH} levels of nesting (at {_path(where)})")
        if isinstance(value, torch.Tensor):
            if json_only and not (depth == 2 and where[0] == (None, "state_dict")):
                raise UnsafeContent(f"{_path(where)}: a tensor outside state_dict (a checkpoint's metadata is plain "
                                    "JSON values: numbers, text, lists and mappings; write a tensor's values as a list)")
            tensor_bytes += check_tensor(value, _path(where))
            if tensor_bytes > max_tensor_bytes:
                raise UnsafeContent(f"its tensors hold more than {max_tensor_bytes} bytes, counting references")
        elif isinstance(value, dict):
            state_dict = depth == 1 and where[1] == "state_dict"
            for k, v in value.items():
                if json_only and (not isinstance(k, str) or (state_dict and "(" in k)):
                    raise UnsafeContent(f"{_path(where)}: key {k!r} (keys are strings; a state dict's hold no '(')")
                text += len(k) if isinstance(k, str) else 1
                stack.append((v, depth + 1, (where, k)))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1, (where, i)) for i, v in enumerate(value))
        elif isinstance(value, str):
            text += len(value)
        elif json_only and not (value is None or isinstance(value, (bool, int, float))):
            raise UnsafeContent(f"{_path(where)}: a {type(value).__name__}, which the hash's JSON would take as its repr")
        if text > MAX_TEXT_CHARS:
            raise UnsafeContent(f"more than {MAX_TEXT_CHARS} characters of text, counting references")


def _path(where) -> str:
    keys = []
    while where is not None:
        where, key = where
        keys.append(f"[{key}]" if isinstance(key, int) else f".{str(key)[:40]}")
    return "checkpoint" + "".join(reversed(keys))


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
    JSON) keeps the hash it always had. A file whose metadata holds a tensor is refused when it is loaded
    (:func:`check_contents`); the exact encoding keeps it from sharing a hash with another all the same."""
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
