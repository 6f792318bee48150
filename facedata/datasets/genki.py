"""The ``genki4k`` format: MPLab's GENKI-4K, photos of faces in ordinary scenes (not aligned) labelled smiling
or not, with the head's pose.

Two layouts are read:

* ``labels.csv`` with a header ``file,smile,yaw,pitch,roll`` (the copy in ``../shared/data/genki4k``), the
  images beside it or in ``files/``;
* the release's own ``labels.txt`` (one line ``smile yaw pitch roll`` per image, in order) with the images
  ``files/file0001.jpg`` ... (line *i* is ``file{i:04d}.jpg``).

The table has ``smile`` (1 smiling, 0 not) and the pose in radians (``yaw``, ``pitch``, ``roll``; not a
label any model learns, kept for grouping the results). GENKI has no split of its own: every image gets the
seeded split of its file name, so a held-out part is the same on every run with the same seed and never
seen in training. The faces are not aligned: ``jobs.train`` reads them through the detector (``--faces
detect``, the default for this format, as for a manifest).
"""

from __future__ import annotations

import math

import storage
from facedata.datasets.base import (
    FaceDataset,
    _basename,
    _frame,
    _list_images,
    _Skips,
    _Splitter,
)
from facedata.datasets.textfiles import csv_records, read_lines, read_text

GENKI_LABELS_CSV = "labels.csv"
GENKI_LABELS_TXT = "labels.txt"
GENKI_FILES = "files"
GENKI_POSE = ("yaw", "pitch", "roll")


def _genki_images(root: str) -> dict[str, str]:
    """File name -> URI of every image in ``root`` and ``root/files``."""
    out: dict[str, str] = {}
    for folder in (root, storage.join(root, GENKI_FILES)):
        if storage.exists(folder):
            for uri in _list_images(folder):
                out.setdefault(_basename(uri), uri)
    return out


def _records(root: str, skips: _Skips) -> list[tuple[str, str, list]]:
    """(where, file name, [smile, yaw, pitch, roll] as given) per label line."""
    csv_uri, txt_uri = storage.join(root, GENKI_LABELS_CSV), storage.join(root, GENKI_LABELS_TXT)
    if storage.exists(csv_uri):
        # line by line (a line with an extra field is reported and skipped, not the end of the read)
        columns, rows = csv_records(read_text(csv_uri), GENKI_LABELS_CSV, skips, file=csv_uri)
        missing = [c for c in ("file", "smile") if c not in columns]
        if missing:
            raise ValueError(f"{csv_uri}: no {' or '.join(missing)} column (columns: {', '.join(columns)})")
        return [(f"{GENKI_LABELS_CSV}:row {i}", rec["file"].strip(), [rec.get(c, "") for c in ("smile", *GENKI_POSE)])
                for i, rec in rows]
    if storage.exists(txt_uri):
        out = []
        for lineno, line in enumerate(read_lines(txt_uri), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 4:
                skips.add(f"{GENKI_LABELS_TXT}:{lineno}", f"expected 'smile yaw pitch roll', got {line.strip()[:80]!r}")
                continue
            out.append((f"{GENKI_LABELS_TXT}:{lineno}", f"file{lineno:04d}.jpg", fields))
        return out
    raise FileNotFoundError(f"neither {csv_uri} nor {txt_uri} exists (GENKI-4K's labels)")


def _number(text) -> float:
    text = str(text).strip()
    return math.nan if not text else float(text)


def read_genki(root: str, splitter: _Splitter) -> FaceDataset:
    skips = _Skips()
    images = _genki_images(root)
    rows = []
    seen: set[str] = set()
    for where, name, values in _records(root, skips):
        try:
            smile, *pose = (_number(v) for v in values)
        except ValueError:
            skips.add(where, f"{name}: smile and pose must be numbers, got {values}")
            continue
        if smile not in (0.0, 1.0):
            skips.add(where, f"{name}: smile {values[0]!r} is not 0 or 1")
            continue
        if name in seen:
            skips.add(where, f"{name}: duplicate line")
            continue
        path = images.get(name)
        if path is None:
            skips.add(where, f"image {name} is missing")
            continue
        seen.add(name)
        rows.append({"path": path, "split": splitter(name), "smile": smile, **dict(zip(GENKI_POSE, pose))})
    return FaceDataset("genki4k", root, _frame(rows, ["path", "split", "smile", *GENKI_POSE]), list(skips))
