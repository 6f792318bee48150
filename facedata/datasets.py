"""Readers for the face datasets the models train on, from a local folder or an ``s3://`` prefix.

``read_dataset("FORMAT:URI")`` returns a :class:`FaceDataset`: one row per usable image with its full
``path`` (readable with :func:`facedata.storage.read_bytes`), its ``split`` (``train`` / ``val`` / ``test``)
and the *canonical* label columns every model output consumes:

============  ===========================================================================================
column        meaning
============  ===========================================================================================
gender        float, 0 = male, 1 = female (CelebA: ``Male == 1`` -> 0)
race          float class index (UTKFace: :data:`UTKFACE_RACES`; SCUT-FBP5500: :data:`SCUT_RACES`)
age           float, years
beauty        float, 1-5
attributes    list of the 40 CelebA values, +1 / -1, in :data:`CELEBA_ATTRIBUTES` order
smile         float 0 / 1 (CelebA ``Smiling``)
eyeglasses    float 0 / 1 (CelebA ``Eyeglasses``)
landmarks     list of 2T floats ``[x1, y1, x2, y2, ...]`` in the pixel coordinates of the image file, or None
============  ===========================================================================================

A format only has the columns it can fill; a missing value is NaN (None in the list columns).

Formats (``FORMAT`` in the spec):

* ``celeba`` - ``img_align_celeba/*.jpg`` + ``list_attr_celeba.txt``; optional
  ``list_landmarks_align_celeba.txt`` (5 points) and ``list_eval_partition.txt`` (0/1/2 -> train/val/test).
* ``utkface`` - labels in the file name ``[age]_[gender]_[race]_[date&time].jpg.chip.jpg`` (or ``.jpg``),
  files possibly nested in sub-folders.
* ``scut_fbp5500`` - ``Images/{A,C}{F,M}N.jpg`` + ``train_test_files/All_labels.txt`` and/or the 60/40 split
  files ``train_test_files/split_of_60%training and 40%testing/{train,test}.txt``; gender and race come from
  the file-name prefix.
* ``manifest`` - a CSV or Parquet file with a ``path`` column (relative paths are resolved against the
  manifest's folder or prefix), any canonical label columns and an optional ``split`` column; for photos of
  several people, ``face_box`` or ``face_points`` (:data:`FACE_SELECT_COLUMNS`) name the face a row's labels
  are about. ``gender``
  also takes ``male``/``female`` (``m``/``f``); ``smile`` and ``eyeglasses`` take ``yes``/``no``,
  ``true``/``false``, the model's class names (``smile``/``non_smile``, ``eyeglasses``/``no_eyeglasses``)
  and CelebA's ``-1`` for no. With ``attributes`` and without ``gender``/``smile``/``eyeglasses`` those
  three are filled from the attributes (``Male``, ``Smiling``, ``Eyeglasses``).

Malformed entries (a bad file name, a line with the wrong number of fields, a value out of range, a label
row whose image is missing) never stop a read: each is logged with ``logging.warning`` and listed in
``FaceDataset.skipped`` as ``(file or file:line, reason)``.

When the data carries no split, :func:`seeded_split` assigns one from a hash of ``(seed, file name)``: the
same on every worker and independent of listing order.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from facedata import storage

log = logging.getLogger(__name__)

CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
    "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip
UTKFACE_RACES = ("White", "Black", "Asian", "Indian", "Others")
SCUT_RACES = ("Asian", "Caucasian")
CELEBA_LANDMARKS = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")

FORMATS = ("celeba", "utkface", "scut_fbp5500", "manifest")
SPLITS = ("train", "val", "test")
LABEL_COLUMNS = ("gender", "race", "age", "beauty", "attributes", "smile", "eyeglasses", "landmarks")
LIST_COLUMNS = ("attributes", "landmarks", "face_box", "face_points")
# Manifest columns that name which face of a photo a row is about (``jobs.train --faces detect`` trains on
# the detected face they match; faces/trainfaces.py): ``face_box`` x1, y1, x2, y2 and ``face_points`` the 5
# points (eyes, nose, mouth corners: x, y each), in pixels of the original image.
FACE_SELECT_COLUMNS = ("face_box", "face_points")
_LIST_SIZES = {"face_box": 4, "face_points": 10}

DATASET_MODELS: dict[str, tuple[str, ...]] = {
    "celeba": ("dmm_cnn", "task_attention", "hard_sharing"),
    "utkface": ("age_gender_race", "hmtnet"),
    "scut_fbp5500": ("hmtnet",),
    "manifest": (),  # () = any model whose labels the manifest's columns carry, see MODEL_LABELS
}
# The canonical columns each model learns from (its outputs' target columns, checked against the models in
# tests/test_datasets.py); a manifest can train a model when it fills at least one.
MODEL_LABELS: dict[str, tuple[str, ...]] = {
    "dmm_cnn": ("attributes",),  # + landmarks when present (the auxiliary FLD task)
    "task_attention": ("smile", "gender"),  # the paper's FotW / LFWA labels
    "hard_sharing": ("gender", "eyeglasses"),  # the paper's own set
    "age_gender_race": ("age", "gender", "race"),
    "hmtnet": ("gender", "race", "beauty"),
}

CELEBA_IMAGES = "img_align_celeba"
CELEBA_ATTR_FILE = "list_attr_celeba.txt"
CELEBA_LANDMARK_FILE = "list_landmarks_align_celeba.txt"
CELEBA_PARTITION_FILE = "list_eval_partition.txt"
SCUT_IMAGES = "Images"
SCUT_LABELS = "train_test_files/All_labels.txt"
SCUT_SPLIT_DIR = "train_test_files/split_of_60%training and 40%testing"

UTKFACE_AGE_RANGE = (0, 116)
_UTK_NAME = re.compile(r"^(?P<age>-?\d+)_(?P<gender>-?\d+)_(?P<race>-?\d+)_")
_UTK_SUFFIXES = (".jpg.chip.jpg", ".jpg")
_SCUT_NAME = re.compile(r"^(?P<race>[AC])(?P<gender>[FM])\d+\.\w+$")
_PARTITION = {"0": "train", "1": "val", "2": "test"}
_SPLIT_ALIASES = {
    "train": "train", "training": "train", "0": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val", "1": "val",
    "test": "test", "testing": "test", "2": "test",
}  # fmt: skip


@dataclass
class FaceDataset:
    format: str
    root: str
    table: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)
    has_landmarks: bool = False
    num_landmarks: int = 0

    def __len__(self) -> int:
        return len(self.table)

    @property
    def label_columns(self) -> tuple[str, ...]:
        return tuple(c for c in LABEL_COLUMNS if c in self.table.columns)

    def split(self, name: str) -> pd.DataFrame:
        """The rows of split ``name`` ("train", "val" or "test"), re-indexed from 0."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return self.table[self.table["split"] == name].reset_index(drop=True)

    def compatible_models(self) -> tuple[str, ...]:
        known = DATASET_MODELS.get(self.format, ())
        if known:
            return known
        return tuple(m for m, cols in MODEL_LABELS.items() if any(self._filled(c) for c in cols))

    def model_overrides(self, model_name: str) -> dict:
        """Constructor overrides that fit ``model_name`` to this dataset's labels, e.g. utkface + hmtnet ->
        ``{"race_classes": 5}``. Raises ValueError naming the compatible models when it cannot train it."""
        compatible = self.compatible_models()
        if model_name not in compatible:
            raise ValueError(
                f"a {self.format} dataset ({self.root}) cannot train model {model_name!r}; "
                f"compatible models: {', '.join(compatible) or 'none (no usable label columns)'}"
            )
        overrides: dict = {}
        if model_name == "dmm_cnn":
            overrides["num_landmarks"] = self.num_landmarks
        if model_name == "hmtnet":
            if self.format == "utkface":
                overrides["race_classes"] = len(UTKFACE_RACES)
            elif self.format == "scut_fbp5500":
                overrides["race_classes"] = len(SCUT_RACES)
            elif self._filled("race"):
                overrides["race_classes"] = int(np.nanmax(self.table["race"].to_numpy(dtype=float))) + 1
        return overrides

    def _filled(self, column: str) -> bool:
        if column not in self.table.columns:
            return False
        return bool(self.table[column].notna().any())


# --------------------------------------------------------------------------------------------- helpers


def parse_spec(spec: str) -> tuple[str, str]:
    """``"celeba:../data/celeba"`` -> ``("celeba", "../data/celeba")``; the URI may itself hold a colon."""
    fmt, sep, uri = str(spec).partition(":")
    fmt = fmt.strip().lower()
    if not sep or not uri or fmt not in FORMATS:
        raise ValueError(f"dataset spec {spec!r} is not FORMAT:URI with FORMAT one of {', '.join(FORMATS)}")
    return fmt, uri


def seeded_split(key: str, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """A split for ``key`` (a file name) from a hash of ``(seed, key)``: stable across processes and
    machines, independent of the order the files were listed in."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def read_dataset(
    spec: str, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> FaceDataset:
    """Read a dataset given as ``"FORMAT:URI"`` (local folder, ``s3://`` prefix, or manifest file)."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions val={val_fraction} test={test_fraction}")
    fmt, uri = parse_spec(spec)
    reader = _READERS[fmt]
    ds = reader(uri, _Splitter(seed, val_fraction, test_fraction))
    if ds.skipped:
        log.warning("%s:%s: skipped %d malformed entries", fmt, uri, len(ds.skipped))
    return ds


@dataclass
class _Splitter:
    seed: int
    val_fraction: float
    test_fraction: float

    def __call__(self, key: str) -> str:
        return seeded_split(key, self.seed, self.val_fraction, self.test_fraction)

    def carve_val(self, key: str) -> str:
        """For data that only splits train / test: move ``val_fraction`` of train to val."""
        return "val" if seeded_split(key, self.seed, self.val_fraction, 0.0) == "val" else "train"


class _Skips(list):
    def add(self, where: str, reason: str) -> None:
        log.warning("skipping %s: %s", where, reason)
        self.append((where, reason))


def _basename(uri: str) -> str:
    return posixpath.basename(uri.replace("\\", "/"))


def _relpath(uri: str, root: str) -> str:
    root_path = storage.filesystem(root)[1]
    path = storage.filesystem(uri)[1]
    rel = path[len(root_path) :] if path.startswith(root_path) else path
    return rel.replace("\\", "/").lstrip("/")


def _read_lines(uri: str) -> list[str]:
    return storage.read_bytes(uri).decode("utf-8", errors="replace").splitlines()


def _list_images(folder: str) -> list[str]:
    if not storage.exists(folder):
        raise FileNotFoundError(f"image folder {folder} does not exist")
    return [u for u, _ in storage.iter_files(folder, storage.IMAGE_EXTENSIONS)]


def _frame(rows: list[dict], columns: Iterable[str]) -> pd.DataFrame:
    columns = list(columns)
    table = pd.DataFrame(rows, columns=columns)
    for col in columns:
        if col in ("path", "split") or col in LIST_COLUMNS:
            table[col] = table[col].astype(object)
        else:
            table[col] = table[col].astype(float)
    return table


# --------------------------------------------------------------------------------------------- CelebA


def _read_celeba(root: str, splitter: _Splitter) -> FaceDataset:
    skips = _Skips()
    attr_uri = storage.join(root, CELEBA_ATTR_FILE)
    if not storage.exists(attr_uri):
        raise FileNotFoundError(f"CelebA attribute file {attr_uri} not found")
    images = _list_images(storage.join(root, CELEBA_IMAGES))
    by_name = {_basename(u): u for u in images}
    by_stem: dict[str, str] = {}
    for name, u in by_name.items():
        by_stem.setdefault(name.rsplit(".", 1)[0], u)

    attrs = _read_celeba_attributes(attr_uri, skips)
    landmarks, num_points = _read_celeba_landmarks(storage.join(root, CELEBA_LANDMARK_FILE), skips)
    partition = _read_celeba_partition(storage.join(root, CELEBA_PARTITION_FILE), skips)

    i_male, i_smile, i_glasses = (CELEBA_ATTRIBUTES.index(a) for a in ("Male", "Smiling", "Eyeglasses"))
    rows = []
    for name, values in attrs.items():
        path = by_name.get(name) or by_stem.get(name.rsplit(".", 1)[0])
        if path is None:
            skips.add(f"{CELEBA_ATTR_FILE}:{name}", f"image {CELEBA_IMAGES}/{name} is missing")
            continue
        row = {
            "path": path,
            "split": partition.get(name) or splitter(name),
            "gender": 0.0 if values[i_male] == 1 else 1.0,
            "smile": 1.0 if values[i_smile] == 1 else 0.0,
            "eyeglasses": 1.0 if values[i_glasses] == 1 else 0.0,
            "attributes": [float(v) for v in values],
        }
        if num_points:
            row["landmarks"] = landmarks.get(name)
        rows.append(row)
    unlabelled = len(by_name) - len(rows)
    if unlabelled > 0:
        log.info("celeba:%s: %d images have no attribute line and are not used", root, unlabelled)
    columns = ["path", "split", "gender", "smile", "eyeglasses", "attributes"]
    if num_points:
        columns.append("landmarks")
    table = _frame(rows, columns)
    has_landmarks = bool(num_points) and bool(table["landmarks"].notna().any())
    return FaceDataset("celeba", root, table, list(skips), has_landmarks, num_points if has_landmarks else 0)


def _read_celeba_attributes(uri: str, skips: _Skips) -> dict[str, list[int]]:
    lines = _read_lines(uri)
    if len(lines) < 2:
        raise ValueError(f"{uri}: expected a count line and a header line")
    header = lines[1].split()
    if sorted(header) != sorted(CELEBA_ATTRIBUTES):
        unknown = sorted(set(header) - set(CELEBA_ATTRIBUTES))
        missing = sorted(set(CELEBA_ATTRIBUTES) - set(header))
        raise ValueError(f"{uri}: header is not the 40 CelebA attributes (unknown {unknown}, missing {missing})")
    order = [header.index(a) for a in CELEBA_ATTRIBUTES]
    out: dict[str, list[int]] = {}
    for lineno, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        where = f"{CELEBA_ATTR_FILE}:{lineno}"
        name = fields[0]
        if len(fields) != 1 + len(header):
            skips.add(where, f"{name}: expected {len(header)} values, got {len(fields) - 1}")
            continue
        if any(v not in ("1", "-1") for v in fields[1:]):
            bad = next(v for v in fields[1:] if v not in ("1", "-1"))
            skips.add(where, f"{name}: value {bad!r} is not 1 or -1")
            continue
        if name in out:
            skips.add(where, f"{name}: duplicate line")
            continue
        values = fields[1:]
        out[name] = [int(values[i]) for i in order]
    declared, present = lines[0].strip(), sum(1 for x in lines[2:] if x.strip())
    if declared.isdigit() and int(declared) != present:
        log.warning("%s: count line says %s rows, the file has %d", uri, declared, present)
    return out


def _read_celeba_landmarks(uri: str, skips: _Skips) -> tuple[dict[str, list[float]], int]:
    if not storage.exists(uri):
        return {}, 0
    lines = _read_lines(uri)
    out: dict[str, list[float]] = {}
    num_values = 0
    header = lines[1].split() if len(lines) > 1 else []
    if header and len(header) % 2 == 0 and not any(_is_number(h) for h in header):
        num_values = len(header)
    start = 2 if num_values else 1
    for lineno, line in enumerate(lines[start:], start=start + 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{CELEBA_LANDMARK_FILE}:{lineno}"
        if not num_values:
            num_values = len(fields) - 1
        if len(fields) != 1 + num_values or num_values % 2:
            skips.add(where, f"{fields[0]}: expected {num_values} coordinates, got {len(fields) - 1}")
            continue
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            skips.add(where, f"{fields[0]}: coordinates are not numbers")
            continue
        if any(v < 0 or not math.isfinite(v) for v in values):
            skips.add(where, f"{fields[0]}: negative or non-finite coordinate")
            continue
        out[fields[0]] = values
    return out, num_values // 2 if out else 0


def _read_celeba_partition(uri: str, skips: _Skips) -> dict[str, str]:
    if not storage.exists(uri):
        return {}
    out: dict[str, str] = {}
    for lineno, line in enumerate(_read_lines(uri), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in _PARTITION:
            skips.add(f"{CELEBA_PARTITION_FILE}:{lineno}", f"expected 'name 0|1|2', got {line.strip()[:80]!r}")
            continue
        out[fields[0]] = _PARTITION[fields[1]]
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------- UTKFace


def parse_utkface_name(name: str) -> tuple[int, int, int]:
    """``"26_1_2_20170116174525125.jpg.chip.jpg"`` -> ``(age, gender, race)``; ValueError with the reason
    when the name does not carry three valid labels."""
    m = _UTK_NAME.match(name)
    if not m:
        fields = name.split("_")
        if len(fields) < 4:
            raise ValueError(
                f"missing a label field: expected age_gender_race_datetime, found {len(fields)} '_'-separated fields"
            )
        raise ValueError("age, gender and race fields are not integers")
    age, gender, race = int(m["age"]), int(m["gender"]), int(m["race"])
    if not UTKFACE_AGE_RANGE[0] <= age <= UTKFACE_AGE_RANGE[1]:
        raise ValueError(f"age {age} outside {UTKFACE_AGE_RANGE[0]}-{UTKFACE_AGE_RANGE[1]}")
    if gender not in (0, 1):
        raise ValueError(f"gender {gender} is not 0 or 1")
    if not 0 <= race < len(UTKFACE_RACES):
        raise ValueError(f"race {race} outside 0-{len(UTKFACE_RACES) - 1}")
    return age, gender, race


def _read_utkface(root: str, splitter: _Splitter) -> FaceDataset:
    skips = _Skips()
    rows = []
    for uri in _list_images(root):
        name = _basename(uri)
        if not name.lower().endswith(_UTK_SUFFIXES):
            continue
        try:
            age, gender, race = parse_utkface_name(name)
        except ValueError as err:
            skips.add(_relpath(uri, root), str(err))
            continue
        rows.append({"path": uri, "split": splitter(name), "age": age, "gender": gender, "race": race})
    table = _frame(rows, ["path", "split", "age", "gender", "race"])
    return FaceDataset("utkface", root, table, list(skips))


# --------------------------------------------------------------------------------------------- SCUT-FBP5500


def _read_scut_scores(uri: str, skips: _Skips, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for lineno, line in enumerate(_read_lines(uri), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label}:{lineno}"
        if len(fields) != 2:
            skips.add(where, f"expected 'name score', got {line.strip()[:80]!r}")
            continue
        try:
            score = float(fields[1])
        except ValueError:
            skips.add(where, f"{fields[0]}: score {fields[1]!r} is not a number")
            continue
        if not 1.0 <= score <= 5.0:
            skips.add(where, f"{fields[0]}: score {score} outside 1-5")
            continue
        if not _SCUT_NAME.match(fields[0]):
            skips.add(where, f"{fields[0]}: name does not start with A/C (race) then F/M (gender)")
            continue
        out[fields[0]] = score
    return out


def _read_scut(root: str, splitter: _Splitter) -> FaceDataset:
    skips = _Skips()
    images = {_basename(u): u for u in _list_images(storage.join(root, SCUT_IMAGES))}
    scores: dict[str, float] = {}
    given_split: dict[str, str] = {}
    all_labels = storage.join(root, SCUT_LABELS)
    train_uri, test_uri = (storage.join(root, SCUT_SPLIT_DIR, f) for f in ("train.txt", "test.txt"))
    have_all = storage.exists(all_labels)
    if have_all:
        scores.update(_read_scut_scores(all_labels, skips, "All_labels.txt"))
    if storage.exists(train_uri) and storage.exists(test_uri):
        for split, uri in (("train", train_uri), ("test", test_uri)):
            part = _read_scut_scores(uri, skips if not have_all else _Skips(), f"{split}.txt")
            for name, score in part.items():
                scores.setdefault(name, score)
                given_split[name] = split
    elif not have_all:
        raise FileNotFoundError(f"neither {all_labels} nor the split files under {SCUT_SPLIT_DIR} exist")

    rows = []
    for name, score in scores.items():
        path = images.get(name)
        if path is None:
            skips.add(f"{SCUT_IMAGES}/{name}", "image listed in the labels is missing")
            continue
        m = _SCUT_NAME.match(name)
        split = given_split.get(name)
        if split == "train":
            split = splitter.carve_val(name)
        elif split is None:
            split = splitter(name)
        rows.append(
            {
                "path": path,
                "split": split,
                "gender": 1.0 if m["gender"] == "F" else 0.0,
                "race": float(SCUT_RACES.index("Asian" if m["race"] == "A" else "Caucasian")),
                "beauty": score,
            }
        )
    table = _frame(rows, ["path", "split", "gender", "race", "beauty"])
    return FaceDataset("scut_fbp5500", root, table, list(skips))


# --------------------------------------------------------------------------------------------- manifest


def _read_manifest(uri: str, splitter: _Splitter) -> FaceDataset:
    skips = _Skips()
    data = storage.read_bytes(uri)
    lower = uri.lower()
    if lower.endswith((".parquet", ".pq")) or data[:4] == b"PAR1":
        raw = pd.read_parquet(io.BytesIO(data))
    elif lower.endswith((".csv", ".tsv", ".txt")) or lower.endswith(".csv.gz"):
        raw = pd.read_csv(io.BytesIO(data), sep="\t" if lower.endswith(".tsv") else ",",
                          compression="gzip" if lower.endswith(".gz") else None)
    else:
        raise ValueError(f"manifest {uri}: expected a .csv or .parquet file")
    if "path" not in raw.columns:
        raise ValueError(
            f"manifest {uri} has no 'path' column (columns: {', '.join(map(str, raw.columns))}); "
            "a manifest needs one image path per row, relative to the manifest's folder or absolute"
        )
    base = uri.rsplit("/", 1)[0] if storage.is_s3(uri) else posixpath.dirname(storage.filesystem(uri)[1])

    label_cols = [c for c in LABEL_COLUMNS + FACE_SELECT_COLUMNS if c in raw.columns]
    rows = []
    for i, rec in enumerate(raw.to_dict("records")):
        where = f"{_basename(uri)}:row {i}"
        path = rec.get("path")
        if not isinstance(path, str) or not path.strip():
            skips.add(where, "empty path")
            continue
        path = path.strip()
        full = path if storage.is_s3(path) or path.startswith(("/", "file://")) else storage.join(base, path)
        split = _manifest_split(rec.get("split"))
        if split is False:
            skips.add(where, f"split {rec.get('split')!r} is not train/val/test")
            continue
        row: dict = {"path": full, "split": split or splitter(path)}
        try:
            for col in label_cols:
                row[col] = _manifest_value(col, rec.get(col))
        except ValueError as err:
            skips.add(where, str(err))
            continue
        rows.append(row)
    table = _frame(rows, ["path", "split", *label_cols])
    if "attributes" in table.columns:
        _derive_from_attributes(table)
    num_points = 0
    if "landmarks" in table.columns:
        lengths = {len(v) for v in table["landmarks"] if v is not None}
        if len(lengths) > 1:
            raise ValueError(f"manifest {uri}: landmark lists have different lengths {sorted(lengths)}")
        num_points = lengths.pop() // 2 if lengths else 0
    return FaceDataset("manifest", uri, table, list(skips), num_points > 0, num_points)


def _manifest_split(value) -> str | None | bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    key = str(int(value)) if isinstance(value, (int, float, np.integer)) else str(value).strip().lower()
    if not key:
        return None
    return _SPLIT_ALIASES.get(key, False)


# CelebA attributes that are label columns of their own (gender = not Male), as the celeba reader fills them.
_FROM_ATTRIBUTES = {"gender": ("Male", 0.0), "smile": ("Smiling", 1.0), "eyeglasses": ("Eyeglasses", 1.0)}


def _derive_from_attributes(table: pd.DataFrame) -> None:
    """A manifest with CelebA's 40 ``attributes`` but no ``gender``/``smile``/``eyeglasses`` column gets them
    from the attributes, as the celeba reader does; a column the manifest has is kept as it is."""
    for col, (attr, when_positive) in _FROM_ATTRIBUTES.items():
        if col in table.columns:
            continue
        i = CELEBA_ATTRIBUTES.index(attr)
        table[col] = [math.nan if v is None else (when_positive if v[i] > 0 else 1.0 - when_positive)
                      for v in table["attributes"]]


# The usual spellings of the binary labels (case-insensitive), besides the numbers 0 and 1.
_SPELLINGS: dict[str, dict[str, float]] = {
    "gender": {"male": 0.0, "m": 0.0, "man": 0.0, "female": 1.0, "f": 1.0, "woman": 1.0},
    "smile": {"smile": 1.0, "smiling": 1.0, "yes": 1.0, "true": 1.0, "non_smile": 0.0, "no_smile": 0.0,
              "not_smiling": 0.0, "no": 0.0, "false": 0.0},
    "eyeglasses": {"eyeglasses": 1.0, "glasses": 1.0, "yes": 1.0, "true": 1.0, "no_eyeglasses": 0.0,
                   "no_glasses": 0.0, "no": 0.0, "false": 0.0},
}


def _binary_value(col: str, value) -> float:
    """gender / smile / eyeglasses -> 0.0 or 1.0 (NaN when missing). smile and eyeglasses also take CelebA's
    -1 for "no"; gender does not (CelebA's ±1 column is ``Male``, the opposite of our 1 = female)."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        text = value.strip()
        key = text.lower().replace("-", "_").replace(" ", "_")
        if not text:
            return math.nan
        if key in _SPELLINGS[col]:
            return _SPELLINGS[col][key]
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{col}: {value!r} is not one of 0, 1, {', '.join(sorted(_SPELLINGS[col]))}") from None
    else:
        try:
            number = float(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{col}: {value!r} is not a number") from err
    if math.isnan(number):
        return math.nan
    if number in (0.0, 1.0):
        return number
    if number == -1.0 and col != "gender":
        return 0.0
    hint = " (gender is 0 = male, 1 = female; CelebA's Male column is the opposite)" if col == "gender" else ""
    raise ValueError(f"{col}: {value!r} is not 0 or 1{hint}")


def text_of(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _manifest_value(col: str, value):
    if col in LIST_COLUMNS:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return None
            try:
                value = json.loads(text) if text.startswith("[") else text.replace(",", " ").split()
            except json.JSONDecodeError as err:
                raise ValueError(f"{col}: cannot parse {text[:40]!r}") from err
        values = [float(v) for v in list(value)]
        if col == "attributes" and len(values) != len(CELEBA_ATTRIBUTES):
            raise ValueError(f"attributes: expected {len(CELEBA_ATTRIBUTES)} values, got {len(values)}")
        if col == "landmarks" and len(values) % 2:
            raise ValueError(f"landmarks: expected x, y pairs, got {len(values)} values")
        if col in _LIST_SIZES and (len(values) != _LIST_SIZES[col] or not all(map(math.isfinite, values))):
            raise ValueError(f"{col}: expected {_LIST_SIZES[col]} finite numbers, got {text_of(value)}")
        if col == "face_box" and not (values[2] > values[0] and values[3] > values[1]):
            raise ValueError(f"face_box: expected x1 < x2 and y1 < y2, got {values}")
        return values
    if col in _SPELLINGS:
        return _binary_value(col, value)
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{col}: {value!r} is not a number") from err


_READERS = {
    "celeba": _read_celeba,
    "utkface": _read_utkface,
    "scut_fbp5500": _read_scut,
    "manifest": _read_manifest,
}
