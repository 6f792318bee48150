"""One face per training image, found and aligned the way label, serve and evaluate do it (``jobs.train
--faces detect|landmarks|whole``).

* ``detect``: every image is decoded as a photo and searched by the same detector as the label job
  (faces/finder.py); the face trained on is the highest-scoring one, or the one the manifest names by its
  box (``face_box``: x1, y1, x2, y2) or its 5 points (``face_points``), in pixels of the original image.
  The detections are computed once per data set and cached beside the runs (faces/facecache.py), keyed by
  the file's content and the detector's identity. The driver resolves every row's face before training
  (:func:`find_training_faces`) and the rows carry the chosen face's 5 points (:data:`ALIGN_POINTS`) and
  the file's content hash (:data:`ALIGN_SHA`); the decode tasks then warp each image with
  ``faces.finder.face_input`` (the same decode and warp as ``decode_face``) after checking that the bytes
  still have that hash (:func:`training_input`): a file changed since its face was found is skipped and
  counted, never trained on with another file's face.
* ``landmarks``: the data's own 5 points (CelebA's ``list_landmarks_align_celeba.txt``, a manifest's
  5-point ``landmarks``) stand in for the detector (:func:`landmark_faces`); nothing is detected.
* ``whole``: the image is the face, stretched to the model's input (data sets of aligned crops), as
  before.

An image without a face, one whose manifest box or points match none of the faces found, and one that
cannot be read or decoded (empty, truncated, not an image, too large) is skipped with its reason, counted
in the :class:`FaceReport` and training goes on, like a malformed label.

Which mode is the default for a format (:data:`FORMAT_FACES`), and why: docs/faces.md, "Training on
photos". With ``detect`` and ``landmarks`` the model's face template is the canonical one for its input
size (``faces.align.default_template``), not one measured on the training images: faces in photos sit
anywhere, so a median of their points in the photo frame means nothing.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch

import storage
from facedata.datasets import FACE_SELECT_COLUMNS
from faces.facecache import CACHE_DECIMALS, Detection, DetectionCache, content_hash
from faces.finder import face_input, picture_scales
from models.imagebytes import ImageDecodeError
from models.photo import DEFAULT_PHOTO_SIDE
from models.preprocess import decode_photo

log = logging.getLogger(__name__)

# The default of --faces per data set format (docs/faces.md, "Training on photos", has the measurements):
# CelebA's and UTKFace's aligned crops keep ``whole`` until training through detection is measured to do as
# well on their held-out crops and on photos (issue #19, item 6); a manifest is a user's own photos. SCUT-FBP5500's
# 256x256 photos are ``detect``: its recipe's face trunk, trained whole, reached a validation PC of 0.825 where
# through detection it reached 0.884 (docs/results.md, 2026-12-04). A recipe's own ``faces`` comes first
# (models/recipes.py: age_gender_race-utkface and hard_sharing-celeba train through detection).
FORMAT_FACES = {"celeba": "whole", "utkface": "whole", "scut_fbp5500": "detect", "genki4k": "detect",
                "manifest": "detect", "mixed": "detect"}  # mixed: several --data of different formats
ALIGN_POINTS = "_align_points"  # the chosen face's 5 points, 10 floats in original pixels
ALIGN_SHA = "_align_sha"  # the content hash of the file those points were found in (None: landmarks)
BOX_MATCH_IOU = 0.3  # a manifest box names the detected face it overlaps most, when at least this much
POINTS_MATCH = 0.35  # manifest points name the face whose points are nearest, within this many eye distances
CHUNK = 32  # images read (in threads) and detected per step of the pass
FLUSH_EVERY = 2048  # new detections written to the cache at least this often
DETECT_BATCH = 8  # images per detector call


def default_mode(fmt: str) -> str:
    return FORMAT_FACES.get(fmt, "detect")


@dataclass
class FaceReport:
    """What the face pass did: images looked at, read from the cache, detected, used, and every image
    skipped with its reason."""

    mode: str
    identity: str | None = None
    images: int = 0
    cached: int = 0
    detected: int = 0
    used: int = 0
    seconds: float = 0.0
    detect_seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def kinds(self) -> dict[str, int]:
        """Skips per kind (the reason's first word: ``no_face``, ``unmatched``, ``truncated``, ...)."""
        return dict(Counter(reason.split(":", 1)[0] for _, reason in self.skipped))

    def line(self) -> str:
        rate = f", {self.images / self.seconds:.1f} images/s" if self.seconds > 0 else ""
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.kinds().items())) or "none"
        found = f", {self.cached} from the cache, {self.detected} detected{rate}" if self.mode == "detect" else ""
        return f"faces ({self.mode}): {self.used}/{self.images} images used{found}; skipped {len(self.skipped)} ({kinds})"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skipped"] = [list(s) for s in self.skipped[:100]]  # the first hundred, with their reasons
        d["skipped_total"] = len(self.skipped)
        d["skipped_kinds"] = self.kinds()
        return d


def _iou(a: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(a[0], boxes[:, 0]), np.maximum(a[1], boxes[:, 1])
    x2, y2 = np.minimum(a[2], boxes[:, 2]), np.minimum(a[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(boxes) - inter, 1e-9)


def pick_face(faces: np.ndarray, box=None, points=None) -> int:
    """The index of the face to train on among ``faces`` (K, 15) (faces/facecache.py), highest score first:
    the first, or the one the manifest's ``box`` or 5 ``points`` name. Raises ValueError with the reason
    (``no_face: ...`` or ``unmatched: ...``) when there is none."""
    if len(faces) == 0:
        raise ValueError("no_face: the detector found no face")
    if points is not None:
        want = np.asarray(points, dtype=np.float64).reshape(5, 2)
        got = faces[:, 5:].reshape(-1, 5, 2)
        eyes = max(float(np.linalg.norm(want[1] - want[0])), 1.0)
        dist = np.linalg.norm(got - want, axis=2).mean(1) / eyes
        best = int(np.argmin(dist))
        if dist[best] > POINTS_MATCH:
            raise ValueError(f"unmatched: the manifest's face_points are {dist[best]:.2f} eye distances from the "
                             f"nearest of the {len(faces)} face(s) found (at most {POINTS_MATCH})")
        return best
    if box is not None:
        iou = _iou(np.asarray(box, dtype=np.float64).reshape(4), faces[:, :4])
        best = int(np.argmax(iou))
        if iou[best] < BOX_MATCH_IOU:
            raise ValueError(f"unmatched: the manifest's face_box overlaps none of the {len(faces)} face(s) found "
                             f"(best IoU {iou[best]:.2f}, needs {BOX_MATCH_IOU})")
        return best
    return 0


def _selector(row: dict, column: str, size: int):
    v = row.get(column)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return np.asarray(v, dtype=np.float64).reshape(size)


def _read(path: str, read) -> tuple[bytes | None, str | None]:
    try:
        return read(path), None
    except OSError as e:
        return None, f"unreadable: {e}"


def _detect(finder, items: list[tuple[str, bytes]], max_side: int) -> dict[str, Detection | str]:
    """(sha, bytes) of images not in the cache -> their detections (or the decode error's reason)."""
    out: dict[str, Detection | str] = {}
    decoded = []
    for sha, data in items:
        try:
            img, (w, h), scale = decode_photo(data, max_side)
        except ImageDecodeError as e:
            out[sha] = f"{e.kind}: {e.message}"
            continue
        decoded.append((sha, img, w, h, scale))
    for start in range(0, len(decoded), DETECT_BATCH):
        part = decoded[start:start + DETECT_BATCH]
        found = finder.find([d[1] for d in part], [d[4] for d in part])
        for (sha, img, w, h, _), f in zip(part, found):
            # decoded -> original pixels, each axis its own: a change of this mapping bumps faces.finder.TO_ORIGINAL
            # (the cache is keyed by it: entries mapped another way are detected again, never reused)
            sx, sy = picture_scales((w, h), img)
            faces = torch.cat([f.boxes.double().reshape(-1, 4) * torch.tensor([sx, sy] * 2, dtype=torch.float64),
                               f.scores.double().reshape(-1, 1),
                               f.points.double().reshape(-1, 10) * torch.tensor([sx, sy] * 5, dtype=torch.float64)],
                              dim=1).cpu().numpy()
            out[sha] = Detection(w, h, faces.round(CACHE_DECIMALS))  # as the cache stores it: a later run
            # trains on exactly the faces this one did
    return out


def find_training_faces(table: pd.DataFrame, finder, cache: DetectionCache, read=storage.read_bytes,
                        threads: int = 8, progress=None) -> tuple[pd.DataFrame, FaceReport]:
    """``table`` (``path`` + labels, and the manifest's ``face_box`` / ``face_points`` when it has them) ->
    the rows with a face, with :data:`ALIGN_POINTS` and :data:`ALIGN_SHA` added, and the report. Every file
    is read once and hashed; a file whose hash is in ``cache`` is not detected again; the new detections
    are written to the cache every :data:`FLUSH_EVERY` detections and at the end (a pass stopped half-way
    keeps what it found). ``progress(report, total)`` is called after each step when given."""
    t0 = time.perf_counter()
    report = FaceReport("detect", identity=cache.identity)
    max_side = getattr(getattr(finder, "options", None), "max_side", DEFAULT_PHOTO_SIDE)
    rows = table.to_dict("records")
    points_col: list = [None] * len(rows)
    sha_col: list = [None] * len(rows)
    keep: list[int] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(rows), CHUNK):
            idx = list(range(start, min(start + CHUNK, len(rows))))
            got = list(pool.map(lambda i: _read(rows[i]["path"], read), idx))
            shas: dict[int, str] = {}
            misses: dict[str, bytes] = {}
            for i, (data, err) in zip(idx, got):
                report.images += 1
                if err is not None:
                    report.skipped.append((rows[i]["path"], err))
                    continue
                shas[i] = sha = content_hash(data)
                if cache.get(sha) is None:
                    misses.setdefault(sha, data)
            report.cached += sum(1 for i in shas if shas[i] not in misses)
            td = time.perf_counter()
            detected = _detect(finder, list(misses.items()), max_side)
            report.detect_seconds += time.perf_counter() - td
            for sha, d in detected.items():
                if isinstance(d, Detection):
                    cache.put(sha, d)
            report.detected += sum(1 for i in shas if isinstance(detected.get(shas[i]), Detection))
            for i, sha in shas.items():
                d = detected.get(sha) if sha in misses else cache.get(sha)
                if not isinstance(d, Detection):
                    report.skipped.append((rows[i]["path"], d))
                    continue
                try:
                    k = pick_face(d.faces, _selector(rows[i], "face_box", 4), _selector(rows[i], "face_points", 10))
                except ValueError as e:
                    report.skipped.append((rows[i]["path"], str(e)))
                    continue
                points_col[i], sha_col[i] = d.faces[k, 5:].tolist(), sha
                keep.append(i)
            if cache.pending >= FLUSH_EVERY:
                cache.flush()
            if progress is not None:
                report.seconds = time.perf_counter() - t0
                progress(report, len(rows))
    cache.flush()
    report.used, report.seconds = len(keep), time.perf_counter() - t0
    for path, reason in report.skipped:
        log.warning("skipping %s: %s", path, reason)
    return _with_faces(table, keep, points_col, sha_col), report


def landmark_faces(table: pd.DataFrame) -> tuple[pd.DataFrame, FaceReport]:
    """``--faces landmarks``: each row's own 5-point ``landmarks`` are the face to align (no detector)."""
    if "landmarks" not in table.columns:
        raise ValueError("--faces landmarks needs 5-point landmarks in the data (CelebA's "
                         "list_landmarks_align_celeba.txt or a manifest's landmarks column); this data has none")
    report = FaceReport("landmarks", images=len(table))
    points_col: list = [None] * len(table)
    keep = []
    for i, (path, marks) in enumerate(zip(table["path"], table["landmarks"])):
        arr = None if marks is None else np.asarray(marks, dtype=np.float64).reshape(-1)
        if arr is None or arr.size != 10 or not np.isfinite(arr).all():
            n = 0 if arr is None else arr.size // 2
            report.skipped.append((path, f"no_landmarks: {n} points, alignment needs the 5 (eyes, nose, mouth corners)"))
            continue
        points_col[i] = arr.tolist()
        keep.append(i)
    report.used = len(keep)
    return _with_faces(table, keep, points_col, [None] * len(table)), report


def _with_faces(table: pd.DataFrame, keep: list[int], points: list, shas: list) -> pd.DataFrame:
    out = table.copy()
    out[ALIGN_POINTS] = points
    out[ALIGN_SHA] = shas
    return out.iloc[sorted(keep)].drop(columns=[c for c in FACE_SELECT_COLUMNS if c in out.columns]).reset_index(drop=True)


def training_input(data: bytes, pre, points, sha: str | None, max_side: int = DEFAULT_PHOTO_SIDE):
    """A training row's face: ``data`` aligned with its resolved 5 ``points`` (``faces.finder.face_input``),
    after checking that the bytes are those the points were found in (``sha``; None for landmarks).
    Raises ImageDecodeError ``changed`` when they are not."""
    if sha is not None and content_hash(data) != sha:
        raise ImageDecodeError("changed", "the file changed after its face was found (content hash differs): "
                                          "run again to detect it anew")
    return face_input(data, pre, points, max_side)
