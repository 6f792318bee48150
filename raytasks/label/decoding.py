"""The label job's CPU stage: ``path`` rows -> decoded batches (facedata/decode.py) as Arrow tables for Ray
Data, and the memory each decode task reserves.

Its imports hold no torch (photos decode with models/photo.py; whole images import ``models.preprocess`` when
first decoded), so a decode worker does not spend 1.7 s of CPU and about 265 MB of private memory on it
(docs/benchmarks.md, "Camera-sized photos"); ``tests/test_faces_e2e.py`` checks that it stays so.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from facedata.decode import IMAGE_COLUMNS, Photos, Whole, decode_into, empty_batch, fail
from facedata.paths import resolve_path
from facedata.reading import fetch_chunks
from raytasks.label.gpu_decode import jpeg_for_gpu

DECODE_FILE_BYTES = 4 * 1024 * 1024  # a photo's bytes plus PIL's (draft-reduced) decode buffer, for decode_memory
# the decode worker itself (Python, Ray's core worker, pyarrow, PIL): 138 MB private at its first task here
# (260 while it imported torch, before 2026-12-06); kept at the old reservation. With it the reservation holds
# what a decode worker's own memory reaches, about twice over: 389 and 669 MB of private anonymous memory at
# its peak for batches of 16 and 32 phone photos, against 901 and 1,418 MB reserved (the object-store pages it
# writes are the object store's, not this reservation's; docs/benchmarks.md, "Camera-sized photos")
DECODE_PROCESS_BYTES = 384 * 1024 * 1024


def target_of(faces: dict, pre_dicts: list[dict]) -> Photos | Whole:
    """What the CPU stage decodes to: photos for detection, or every distinct preprocessing's input."""
    if faces["mode"] == "detect":
        return Photos(int(faces["max_side"]))
    from models.preprocess import Preprocessing  # torch: whole images only

    return Whole(tuple(Preprocessing.from_dict(d) for d in pre_dicts))


def read_and_decode(batch: pa.Table, faces: dict, pre_dicts: list[dict], base: str | None = None,
                    jpegs_to_actor: bool = False, allow: tuple[str, ...] | None = None) -> pa.Table:
    """Map function of the CPU stage: ``path`` rows -> a decoded batch, files read a bounded chunk at a time
    (``facedata.reading.fetch_chunks``) and decoded before the next chunk is read. A file that cannot be read
    is an ``unreadable`` (or ``forbidden``, or ``transient`` when it may pass if run again: S3 throttling, a 5xx, a
    dropped connection, a read over its timeout) row. With ``jpegs_to_actor`` (``--gpu-decode``, ``--actor-decode``),
    JPEGs that the actor's decoder can take (``jpeg_for_gpu``: checked from the header and end marker) travel
    as bytes in ``jpeg_bytes`` and are decoded in the actor."""
    paths = [p if p is not None else "" for p in batch.column("path").to_pylist()]
    target = target_of(faces, pre_dicts)
    out = empty_batch(paths, target)
    jpeg_bytes = [None] * len(paths) if jpegs_to_actor else None
    limits = None if isinstance(target, Photos) else target.preprocessings[0]  # the decoder limits jpeg_for_gpu checks
    for chunk in fetch_chunks([resolve_path(p, base) for p in paths], allow=allow):
        for i, (data, kind, message) in chunk:
            if kind is not None:  # the read failed: its reason, not decode's "empty"
                fail(out, i, kind, message)
            elif jpegs_to_actor and jpeg_for_gpu(data, limits):
                jpeg_bytes[i] = data
            else:
                decode_into(out, i, data, target)
    return to_arrow(out, jpeg_bytes)


def to_arrow(batch: dict, jpeg_bytes: list | None = None) -> pa.Table:
    """A decoded batch as an Arrow table for Ray Data: photos of different sizes in one of Ray's
    variable-shaped tensor columns, HWC as decoded (a failed row holds a 0x0 image), whole images as
    fixed-shape ones. Ray concatenates the photos into one buffer, the one copy the task makes of Pillow's pixels."""
    from ray.data.extensions import ArrowTensorArray

    arrays = {
        "path": pa.array(batch["path"], pa.string()),
        "ok": pa.array(np.asarray(batch["ok"], dtype=bool)),
        "error_kind": pa.array(list(batch["error_kind"]), pa.string()),
        "error_message": pa.array(list(batch["error_message"]), pa.string()),
        "width": pa.array(np.asarray(batch["width"], dtype=np.int32)),
        "height": pa.array(np.asarray(batch["height"], dtype=np.int32)),
    }
    for key, col in batch.items():
        if key in IMAGE_COLUMNS:
            continue
        if key == "scale":
            arrays[key] = pa.array(np.asarray(col, dtype=np.float64))
        elif key == "image":
            images = np.empty(len(col), dtype=object)
            images[:] = [im if im is not None else np.zeros((0, 0, 3), np.uint8) for im in col]
            arrays[key] = ArrowTensorArray.from_numpy(images)
        else:
            arrays[key] = ArrowTensorArray.from_numpy(np.ascontiguousarray(col))
    if jpeg_bytes is not None:
        arrays["jpeg_bytes"] = pa.array(jpeg_bytes, pa.binary())
    return pa.table(arrays)


def decode_memory(batch_size: int, faces: dict, pre_dicts: list[dict]) -> int:
    """Memory a decode task reserves: the worker process (``DECODE_PROCESS_BYTES``, what Ray Data measured
    it using) and per image its file and PIL's decode buffer (``DECODE_FILE_BYTES``) and three copies of
    what it decodes to (numpy, Arrow, serialisation): a photo at most ``max_side`` on its longest side (a 4:3
    photo uses 3/4 of the square's bytes), or each model input. Besides keeping Ray from starting more
    decode tasks than memory holds, a reservation the actors do not have keeps Ray Data from fusing the
    decode into the actors (operator fusion needs equal remote arguments), so decoding scales as CPU tasks."""
    if faces["mode"] == "detect":
        side = int(faces["max_side"])
        return int(DECODE_PROCESS_BYTES + batch_size * (DECODE_FILE_BYTES + 3 * 3 * side * side * 3 // 4))
    return int(sum(DECODE_PROCESS_BYTES + batch_size * (DECODE_FILE_BYTES + 3 * d["channels"] * d["size"][0] * d["size"][1])
                   for d in pre_dicts))


def largest_batch_within(memory: float, faces: dict, pre_dicts: list[dict]) -> int:
    """The largest batch size whose decode task reserves at most ``memory`` bytes (0: not even one image)."""
    one, none = decode_memory(1, faces, pre_dicts), decode_memory(0, faces, pre_dicts)
    return max(0, int((memory - none) // (one - none)))
