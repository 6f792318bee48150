"""What every reader of facedata.datasets shares: the canonical label columns and the names of the formats'
files, :class:`FaceDataset` (one table of paths, splits and labels), the ``FORMAT:URI`` spec, the seeded
split, and the small helpers the readers use to list images and report skipped entries. What a class-coded
column's codes mean (``CLASS_MEANINGS``, ``MODEL_CLASSES``, ``SCUT_RACES``) and the rule comparing them
(``class_mismatches``, ``ClassMismatch``, ``classes_text``), which ``FaceDataset._check_classes`` applies, are
in facedata/datasets/classcodes.py."""

from __future__ import annotations

import hashlib
import logging
import math
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

import storage
from facedata.datasets.classcodes import (
    CLASS_MEANINGS,
    MODEL_CLASSES,
    SCUT_RACES,
    class_mismatches,
    classes_text,
)

# the label values the models predict are defined once, with the models (models/ sits below facedata/)
from models.age_gender_race import UTKFACE_RACES
from models.dmm_cnn import CELEBA_ATTRIBUTES

log = logging.getLogger("facedata.datasets")

CELEBA_LANDMARKS = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")

FORMATS = ("celeba", "utkface", "scut_fbp5500", "genki4k", "manifest")
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
    "genki4k": ("task_attention",),  # smile only: trained with gender from another source (mixed.py)
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

# The CelebA attributes that are canonical label columns of their own: column -> (attribute, the column's value
# when the attribute is +1). gender is 0 for a man, so Male +1 -> gender 0. The one place the two meet: the
# CelebA and manifest readers fill the columns from the attributes (:func:`columns_from_attributes`), and a
# model with CelebA's 40 attributes reads data that labels only gender, smile or eyeglasses (GENKI-4K, UTKFace,
# LFW, a user's manifest) through :func:`attributes_from_columns`.
ATTRIBUTE_COLUMNS: dict[str, tuple[str, float]] = {
    "gender": ("Male", 0.0), "smile": ("Smiling", 1.0), "eyeglasses": ("Eyeglasses", 1.0),
}


def missing(value) -> bool:
    """How the readers write a missing label: None (a list column) or a float NaN (a scalar column)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def columns_from_attributes(values) -> dict[str, float]:
    """The canonical columns of one row's 40 attributes (+1 / -1, CelebA's order): ``{"gender": ..., ...}``. An
    attribute that is not labelled (NaN) leaves its column missing (NaN), which the losses and metrics leave
    out, as they leave out the attribute itself: it is no class (``NaN > 0`` would have made it female)."""
    out = {}
    for col, (attr, when_positive) in ATTRIBUTE_COLUMNS.items():
        value = float(values[CELEBA_ATTRIBUTES.index(attr)])
        out[col] = math.nan if math.isnan(value) else when_positive if value > 0 else 1.0 - when_positive
    return out


def attributes_from_columns(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with an ``attributes`` list for every row that has none but has one of the columns of
    :data:`ATTRIBUTE_COLUMNS`: those attributes +1 / -1, the other 37 missing (NaN), which the attribute
    output leaves out of its loss and its metrics label by label (models/outputs.py ``Binary``). A row with
    its own attributes keeps them. So ``jobs.evaluate`` scores a 40-attribute model's ``Smiling`` on GENKI-4K
    and its ``Male`` on LFW, and ``jobs.train --data celeba:... --data genki4k:...`` teaches DMM-CNN's
    ``Smiling`` from both. Returns ``table`` itself when it has none of the columns."""
    have = [c for c in ATTRIBUTE_COLUMNS if c in table.columns]
    if not have:
        return table
    index = {c: CELEBA_ATTRIBUTES.index(ATTRIBUTE_COLUMNS[c][0]) for c in have}
    old = table["attributes"] if "attributes" in table.columns else pd.Series([None] * len(table), index=table.index)
    values = {c: table[c].to_numpy(dtype=float) for c in have}
    out = []
    for i, v in enumerate(old):
        if not missing(v):
            out.append(v)
            continue
        vec = [float("nan")] * len(CELEBA_ATTRIBUTES)
        for c in have:
            x = values[c][i]
            if not np.isnan(x):
                vec[index[c]] = 1.0 if x == ATTRIBUTE_COLUMNS[c][1] else -1.0
        out.append(None if all(np.isnan(vec)) else vec)
    return table.assign(attributes=out)


def labelled_rows(table: pd.DataFrame, column: str) -> int | np.ndarray:
    """How many rows of ``table`` have a value in the label ``column``: a number, or for ``attributes`` one per
    attribute (CELEBA_ATTRIBUTES' order)."""
    values = table[column] if column in table.columns else pd.Series([], dtype=object)
    if column == "attributes":
        per = np.zeros(len(CELEBA_ATTRIBUTES), dtype=np.int64)
        for v in values:
            if not missing(v):
                per += np.isfinite(np.asarray(v, dtype=float))
        return per
    if column in LIST_COLUMNS:
        return int(sum(not missing(v) for v in values))
    return int(values.notna().sum())


def label_line(train: pd.DataFrame, val: pd.DataFrame, columns) -> str:
    """What each label learns from, as rows of the training / validation split: ``labels (train / val rows):
    smile 3,143 / 394; gender 6,438 / 786``; CelebA's attributes grouped by their counts (a mix with GENKI-4K:
    ``attributes: Smiling 9,581 / 1,180, the other 39 6,438 / 786``)."""
    parts = []
    for c in columns:
        t, v = labelled_rows(train, c), labelled_rows(val, c)
        if c != "attributes":
            parts.append(f"{c} {t:,} / {v:,}")
            continue
        groups: dict[tuple[int, int], list[str]] = {}
        for name, a, b in zip(CELEBA_ATTRIBUTES, t.tolist(), v.tolist()):
            groups.setdefault((a, b), []).append(name)
        most = max(groups, key=lambda k: len(groups[k]))
        shown = [f"{' and '.join(names)} {a:,} / {b:,}" for (a, b), names in groups.items() if (a, b) != most]
        rest = len(groups[most])
        shown.append(f"{'all ' + str(rest) if not shown else f'the other {rest}'} {most[0]:,} / {most[1]:,}")
        parts.append(f"attributes: {', '.join(shown)}")
    return "labels (train / val rows): " + "; ".join(parts)


CELEBA_IMAGES = "img_align_celeba"
CELEBA_ATTR_FILE = "list_attr_celeba.txt"
CELEBA_LANDMARK_FILE = "list_landmarks_align_celeba.txt"
CELEBA_PARTITION_FILE = "list_eval_partition.txt"
SCUT_IMAGES = "Images"
SCUT_LABELS = "train_test_files/All_labels.txt"
SCUT_SPLIT_DIR = "train_test_files/split_of_60%training and 40%testing"

UTKFACE_AGE_RANGE = (0, 116)  # also the ages age_gender_race's 117 age bins can learn (ages 0-116)
SCUT_BEAUTY_RANGE = (1.0, 5.0)  # SCUT-FBP5500's raters' scale, the only beauty labels the models learn
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
    parts: tuple[FaceDataset, ...] = ()  # the sources of a mixed data set (facedata/datasets/mixed.py)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def label_columns(self) -> tuple[str, ...]:
        return tuple(c for c in LABEL_COLUMNS if c in self.table.columns)

    def for_labels(self, columns: Iterable[str]) -> FaceDataset:
        """This data set as a model that learns from the label ``columns`` reads it: for CelebA's 40
        ``attributes``, a row without them takes those of its gender, smile and eyeglasses
        (:func:`attributes_from_columns`). ``jobs.train`` and ``jobs.evaluate`` read data through it."""
        if "attributes" not in columns:
            return self
        table = attributes_from_columns(self.table)
        return self if table is self.table else replace(self, table=table)

    def split(self, name: str) -> pd.DataFrame:
        """The rows of split ``name`` ("train", "val" or "test"), re-indexed from 0."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return self.table[self.table["split"] == name].reset_index(drop=True)

    def compatible_models(self) -> tuple[str, ...]:
        if self.parts:  # a model that any source can train (the others' rows leave its tasks out)
            found = {m for p in self.parts for m in p.compatible_models()}
            return tuple(m for m in MODEL_LABELS if m in found)
        known = DATASET_MODELS.get(self.format, ())
        if known:
            return known
        return tuple(m for m, cols in MODEL_LABELS.items() if any(self._filled(c) for c in cols))

    def model_overrides(self, model_name: str) -> dict:
        """Constructor overrides that fit ``model_name`` to this dataset's labels, e.g. utkface + hmtnet ->
        ``{"race_classes": 5}``. Raises ValueError naming the compatible models when it cannot train it, when
        its class codes are not among the model's classes (a manifest's race 5 for age_gender_race's 0-4), and
        for a mixed data set when its sources need different ones or code a column the model learns with
        different classes (UTKFace's 5 races and SCUT's 2 are not the same classes), even from a source that
        could not train the model alone (SCUT-FBP5500's race in a mix for age_gender_race)."""
        compatible = self.compatible_models()
        if model_name not in compatible:
            raise ValueError(
                f"a {self.format} dataset ({self.root}) cannot train model {model_name!r}; "
                f"compatible models: {', '.join(compatible) or 'none (no usable label columns)'}"
            )
        if self.parts:
            merged = self._merged_overrides(model_name)
            self._check_classes(model_name)
            return merged
        self._check_classes(model_name)
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

    def _merged_overrides(self, model_name: str) -> dict:
        merged: dict = {}
        origin: dict = {}
        for part in self.parts:
            if model_name not in part.compatible_models():
                continue  # its labels for the model are checked by _check_classes
            for key, value in part.model_overrides(model_name).items():
                if key == "num_landmarks":
                    continue  # the points of the sources that have them (checked when mixing)
                if key in merged and merged[key] != value:
                    raise ValueError(
                        f"{model_name}: {origin[key]} needs {key}={merged[key]} and {part.format}:{part.root} "
                        f"needs {key}={value}; their labels do not mean the same classes, train on one of them")
                merged[key], origin[key] = value, f"{part.format}:{part.root}"
        if model_name == "dmm_cnn":
            merged["num_landmarks"] = self.num_landmarks
        return merged

    def _check_classes(self, model_name: str) -> None:
        """ValueError when a class-coded column the model learns (:data:`CLASS_MEANINGS`) would put codes of
        different classes into one head: every source that fills the column counts, not only those that can
        train the model alone (in a mix with UTKFace, SCUT-FBP5500's race 0 = Asian would teach
        age_gender_race's 0 = White). The classes are the model's own (:data:`MODEL_CLASSES`), else those of the
        first source whose format names them; the sources are compared with them by :func:`class_mismatches`,
        the rule ``jobs.evaluate`` applies to a checkpoint's classes. Refusing, not dropping the column of one
        source: which labels to leave out is the user's choice (train on one source, or a manifest without its
        race column)."""
        for col in MODEL_LABELS.get(model_name, ()):
            if col not in CLASS_MEANINGS:
                continue
            fixed = MODEL_CLASSES.get(model_name, {}).get(col)
            named = [(f"{p.format}:{p.root}", CLASS_MEANINGS[col][p.format]) for p in self.parts or (self,)
                     if p.format in CLASS_MEANINGS[col] and p._filled(col)]
            want = fixed if fixed is not None else named[0][1] if named else None
            if want is None:
                continue  # only manifests, and a model that takes its classes from them (hmtnet)
            bad = class_mismatches(self, col, want)
            if not bad:
                continue
            agree = next((n for n, m in named if m == want), None)
            model = f"{model_name} learns {col} as {classes_text(want)}"
            code = next((b for b in bad if b.meaning is None), None)  # a code the head lacks, named first
            if code is not None:
                ref = model if fixed is not None else f"{agree} codes {col} as {classes_text(want)}"
                raise ValueError(f"{ref}; {code.source} has {col} {code.code:g}, which is none of them")
            ref = f"{agree} codes {col} as {classes_text(want)}" if agree else model
            raise ValueError(
                f"{model_name}: the sources' {col} labels mean different classes: {ref} but {bad[0].source} codes "
                f"it as {classes_text(bad[0].meaning)}; training on both would teach one class from the other's "
                "faces. Train on one of them.")

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
