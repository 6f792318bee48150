"""Detections of training images, computed once per data set and kept beside the runs (``jobs.train
--faces detect``; the pass that fills it is faces/trainfaces.py).

An entry is every face the detector found in one file, keyed by the sha256 of the file's bytes, in a folder
named by a digest of :func:`cache_key`: the detector's identity (``FaceFinder.identity``: the network, its weights'
hash, every setting that changes which faces are found, and the size photos are decoded at) and the version of
the mapping that put the faces in original pixels (``faces.finder.TO_ORIGINAL``). So:

* every epoch, every worker and every later run with the same detector reads the entry instead of
  detecting again (the train job's driver resolves each row's face before the workers start);
* a file whose bytes changed has another hash: its old entry is never found, the file is detected again;
* another detector or setting has another identity, hence another folder: nothing is shared between them;
* so has another mapping back to original pixels: entries cached before the key named it (2026-12-06), whose
  points were off by up to 3 px in y for a photo decoded shrunk (one factor for both axes), are detected again.

Layout, under the run storage (a folder or an ``s3://`` prefix, through storage/__init__.py)::

    <storage>/_face_cache/<digest of the key>/identity.txt        the key, in full
    <storage>/_face_cache/<digest of the key>/part-<time>-<id>.jsonl   one JSON object per line

Each line is ``{"sha": hex, "width": w, "height": h, "faces": [[x1, y1, x2, y2, score, px1, py1, ...,
px5, py5], ...]}`` in pixels of the original (upright) image, highest score first; ``faces`` is empty for an
image without a face (that is a result too, and costs a detection). A run adds one part with what it
detected; parts are never rewritten, so concurrent runs cannot spoil each other's entries. A line that
cannot be read (a part cut short) is skipped with a warning: its image is detected again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np

import storage
from faces.finder import TO_ORIGINAL

log = logging.getLogger(__name__)

CACHE_DIR = "_face_cache"
IDENTITY_FILE = "identity.txt"
FACE_FIELDS = 15  # x1, y1, x2, y2, score, then the 5 points (x, y)
CACHE_DECIMALS = 3  # coordinates and scores are kept to a thousandth of a pixel


def cache_key(identity: str) -> str:
    """What a cache folder is named by (a digest of it) and its ``identity.txt`` holds: the detector's
    ``identity`` and ``to_original=`` :data:`faces.finder.TO_ORIGINAL`.

    The mapping's version is here, in the cache's own key, and not in ``FaceFinder.identity``: that identity is
    every label row's ``detector`` column (core/annotator.py), which a label output compares on resume, the golden
    rows (tests/test_golden.py) and the checkpoints (``extra["faces"]["detector"]``) record, and it names which
    faces are found in the decoded picture, which the mapping does not change. What the mapping changes is what
    this cache stores, points in original pixels, so it keys the cache. A folder made before the key held it was
    named by the identity alone (its entries one factor's, or a mix): it is never read again (it may be removed)."""
    return f"{identity} to_original={TO_ORIGINAL}"


def content_hash(data: bytes) -> str:
    """The key of a file's entry: the sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Detection:
    """Every face found in one image, in its original pixels: ``faces`` (K, 15) float64 as in the module
    docstring, highest score first."""

    width: int
    height: int
    faces: np.ndarray

    def to_json(self, sha: str) -> dict:
        return {"sha": sha, "width": int(self.width), "height": int(self.height),
                "faces": [[round(float(v), CACHE_DECIMALS) for v in f] for f in self.faces]}

    @classmethod
    def from_json(cls, d: dict) -> Detection:
        faces = np.asarray(d["faces"], dtype=np.float64).reshape(-1, FACE_FIELDS)
        if not np.isfinite(faces).all():
            raise ValueError("non-finite coordinates")
        return cls(int(d["width"]), int(d["height"]), faces)


class DetectionCache:
    """The entries of one detector identity (and mapping to original pixels: :func:`cache_key`) under one run
    storage (see the module docstring)."""

    def __init__(self, storage_uri: str, identity: str):
        self.identity = identity  # the detector's (reports name it)
        self.key = cache_key(identity)
        digest = hashlib.sha256(self.key.encode()).hexdigest()[:20]
        self.folder = storage.join(storage_uri, CACHE_DIR, digest)
        self._entries: dict[str, Detection] | None = None
        self._new: dict[str, Detection] = {}

    def load(self) -> dict[str, Detection]:
        """Every stored entry (read once; later calls return the same dict)."""
        if self._entries is not None:
            return self._entries
        entries: dict[str, Detection] = {}
        ident = storage.join(self.folder, IDENTITY_FILE)
        if storage.exists(ident):
            stored = storage.read_bytes(ident).decode("utf-8", "replace")
            if stored != self.key:
                raise ValueError(f"{self.folder} holds detections of {stored!r}, not {self.key!r}: "
                                 f"remove that folder (a digest collision or a hand-edited cache)")
            for uri, _ in storage.iter_files(self.folder, (".jsonl",)):
                for n, line in enumerate(storage.read_bytes(uri).splitlines(), start=1):
                    try:
                        d = json.loads(line)
                        entries[str(d["sha"])] = Detection.from_json(d)
                    except (ValueError, KeyError, TypeError) as e:
                        log.warning("face cache %s:%d unreadable (%s): that image is detected again", uri, n, e)
        self._entries = entries
        return entries

    def get(self, sha: str) -> Detection | None:
        return self.load().get(sha)

    def put(self, sha: str, detection: Detection) -> None:
        self.load()[sha] = detection
        self._new[sha] = detection

    @property
    def pending(self) -> int:
        """Entries added since the last flush."""
        return len(self._new)

    def flush(self) -> int:
        """Write the entries added since the last flush as one new part; returns how many."""
        if not self._new:
            return 0
        ident = storage.join(self.folder, IDENTITY_FILE)
        if not storage.exists(ident):
            storage.write_bytes(ident, self.key.encode())
        name = f"part-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}.jsonl"
        body = "\n".join(json.dumps(d.to_json(sha), separators=(",", ":")) for sha, d in self._new.items())
        storage.write_bytes(storage.join(self.folder, name), (body + "\n").encode())
        n, self._new = len(self._new), {}
        return n
