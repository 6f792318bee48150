"""The rows: their schema and the one place where the per-image and per-face columns are built.

A row is the same whether it lands in the label job's Parquet or in a serving answer (docs/schema.md):

* per image: ``path``, ``ok``, ``error_kind``, ``error_message``, ``width``, ``height``, then ``model`` and
  ``checkpoint`` (the model's architecture and checkpoint hash, or a set's name and identity);
* per face: ``detector`` (how faces were found, or ``whole``), ``faces`` (how many the photo has),
  ``face`` (this face's rank, 0 = highest score), ``face_score``, ``face_box`` and ``face_points`` in pixels
  of the original image; then its size, pose and image quality and whether a person should review it
  (``face_size`` ... ``review_reasons``, docs/quality.md);
* then what the models say: one model's output fields flat, or one struct column per model of a set, and
  the set's ``embedding`` / ``embedding_model``.

A photo with faces has one row per face (image order, then detection score); an image without a face, or
that failed, keeps one row, whose face and model columns are empty. ``--faces whole`` rows (the image is
the face) have empty face columns and ``detector`` "whole".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

WHOLE = "whole"  # the ``detector`` column of rows labelled without detection

IMAGE_FIELDS = [
    pa.field("path", pa.string()),
    pa.field("ok", pa.bool_()),
    pa.field("error_kind", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("model", pa.string()),
    pa.field("checkpoint", pa.string()),
]
FACE_FIELDS = [
    pa.field("detector", pa.string()),
    pa.field("faces", pa.int32()),
    pa.field("faces_dropped", pa.int32()),
    pa.field("face", pa.int32()),
    pa.field("face_score", pa.float32()),
    pa.field("face_box", pa.list_(pa.float32())),
    pa.field("face_points", pa.list_(pa.float32())),
]
# Per face, from the detector's points and a quality crop, whatever the models (docs/quality.md): once per
# face in a set too. ``review`` / ``review_reasons`` also hold the models' low confidence (core/annotator.py).
QUALITY_FIELDS = [
    pa.field("face_size", pa.float32()),
    pa.field("pose_yaw", pa.float32()),
    pa.field("pose_pitch", pa.float32()),
    pa.field("pose_roll", pa.float32()),
    pa.field("sharpness", pa.float32()),
    pa.field("brightness", pa.float32()),
    pa.field("review", pa.bool_()),
    pa.field("review_reasons", pa.list_(pa.string())),
]
EMBEDDING_FIELDS = [pa.field("embedding", pa.list_(pa.float32())), pa.field("embedding_model", pa.string())]
COMMON = {f.name for f in IMAGE_FIELDS + FACE_FIELDS + QUALITY_FIELDS + EMBEDDING_FIELDS}  # no model may name a column so


@dataclass
class Face:
    """One found face for its row: rank in its photo, score, box and points in original pixels."""

    index: int
    score: float
    box: list[float]
    points: list[float]


def build_rows(batch: dict, names: list[str], constants: dict, detector: str, counts: list[int | None],
               slots: list[list[tuple[int, Face | None]]], quality: dict[str, list], per_face: dict[str, list],
               no_face: dict) -> dict[str, list]:
    """Columns of the rows of a decoded batch (facedata/decode.py). ``names``: the schema's columns;
    ``constants``: values of every row (``model``, ``checkpoint``); ``counts``: per image ``(faces,
    faces_dropped)``, or None (a whole image, or one that failed); ``slots``: per image its faces as ``(j, face)``, ``j`` indexing the ``quality`` and ``per_face``
    value lists and ``face`` None for a whole image (an image without a face, or that failed, has none, and
    empty quality columns); ``no_face``: the model columns' values on a row without a face."""
    cols: dict[str, list] = {name: [] for name in names}
    ok = np.asarray(batch["ok"], dtype=bool)
    for i in range(len(ok)):
        for slot in slots[i] or [None]:
            cols["path"].append(str(batch["path"][i]))
            cols["ok"].append(bool(ok[i]))
            cols["error_kind"].append(batch["error_kind"][i])
            cols["error_message"].append(batch["error_message"][i])
            cols["width"].append(int(batch["width"][i]) if ok[i] else None)
            cols["height"].append(int(batch["height"][i]) if ok[i] else None)
            for name, value in constants.items():
                cols[name].append(value)
            cols["detector"].append(detector)
            cols["faces"].append(counts[i][0] if counts[i] else None)
            cols["faces_dropped"].append(counts[i][1] if counts[i] else None)
            j, face = slot if slot is not None else (None, None)
            cols["face"].append(face.index if face else None)
            cols["face_score"].append(face.score if face else None)
            cols["face_box"].append(face.box if face else None)
            cols["face_points"].append(face.points if face else None)
            for f in QUALITY_FIELDS:
                cols[f.name].append(None if j is None else quality[f.name][j])
            for name, value in (no_face.items() if j is None else ((n, v[j]) for n, v in per_face.items())):
                cols[name].append(value)
    return cols


def rows_per_image(cols: dict[str, list], n_images: int) -> list[list[dict]]:
    """Columns of :func:`build_rows` -> per image its row dicts (a photo's faces, or its one row)."""
    out: list[list[dict]] = []
    r = 0
    for _ in range(n_images):
        k = max(1, cols["faces"][r] or 0)
        out.append([{name: cols[name][r + j] for name in cols} for j in range(k)])
        r += k
    if r != len(cols["path"]):
        raise RuntimeError(f"{len(cols['path'])} rows do not split into {n_images} images")
    return out


def row_dicts(cols: dict[str, list]) -> list[dict]:
    return [{k: cols[k][i] for k in cols} for i in range(len(cols["path"]))]
