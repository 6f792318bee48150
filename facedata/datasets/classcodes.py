"""What a label column's class codes mean, and the one rule that compares them: :data:`CLASS_MEANINGS`
(per class-coded column, the classes each format's codes 0, 1, ... mean; SCUT-FBP5500's: :data:`SCUT_RACES`),
:data:`MODEL_CLASSES` (a model head's fixed classes), :func:`class_mismatches` and its :class:`ClassMismatch`
records, :func:`classes_text`. Training refuses a mix whose sources' codes mean different classes
(``FaceDataset._check_classes``, facedata/datasets/base.py) and ``jobs.evaluate`` leaves such a column
unscored (``core.evalinputs.class_disagreements``). Split from facedata/datasets/base.py, which holds
:class:`~facedata.datasets.base.FaceDataset`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from models.age_gender_race import UTKFACE_RACES

if TYPE_CHECKING:
    from facedata.datasets.base import FaceDataset

SCUT_RACES = ("Asian", "Caucasian")  # what SCUT-FBP5500's race codes 0, 1 mean (UTKFace's: UTKFACE_RACES)

# The label columns whose numbers are class codes that mean different classes in different formats: column ->
# format -> the classes of codes 0, 1, ... A manifest's codes have no stated meaning (None): they are taken to be
# the model's classes. A model learns such a column from a mix only when all its sources mean the same classes
# (FaceDataset._check_classes; the rule: class_mismatches, which jobs.evaluate applies too).
CLASS_MEANINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "race": {"utkface": UTKFACE_RACES, "scut_fbp5500": SCUT_RACES},
}
# A model whose head for such a column has fixed classes (hmtnet takes its number of races from the data,
# ``race_classes``; age_gender_race always has UTKFace's five).
MODEL_CLASSES: dict[str, dict[str, tuple[str, ...]]] = {"age_gender_race": {"race": UTKFACE_RACES}}


def classes_text(names) -> str:
    """Classes as their codes name them: ``0=Asian, 1=Caucasian``."""
    return ", ".join(f"{i}={n}" for i, n in enumerate(names))


@dataclass(frozen=True)
class ClassMismatch:
    """A source of a data set whose codes in a class-coded column do not mean the classes they are compared with
    (:func:`class_mismatches`): its format's codes mean other classes (``meaning``), or, a manifest (its codes
    have no stated meaning), it has a ``code`` that is none of them."""

    source: str  # FORMAT:ROOT
    meaning: tuple[str, ...] | None  # the classes the format's codes mean; None for a manifest
    code: float | None = None  # a manifest's first code that is not one of the classes


def class_mismatches(ds: FaceDataset, column: str, classes) -> list[ClassMismatch]:
    """The sources of ``ds`` (each source of a mix, in order) that fill the class-coded ``column``
    (:data:`CLASS_MEANINGS`) with codes that do not mean ``classes`` (codes 0, 1, ...); empty when they all do.
    The one rule of what a source's codes mean: a format's codes mean its ``CLASS_MEANINGS``, which must be
    ``classes`` to the letter; a manifest's have no stated meaning and are taken to be ``classes`` when every
    one is a whole number below their count. Training refuses a mix that fails it
    (``FaceDataset.model_overrides``, against the model's classes); ``jobs.evaluate`` leaves such a column
    unscored (``core.evalinputs.class_disagreements``, against the checkpoint's)."""
    classes = tuple(classes)
    out: list[ClassMismatch] = []
    for part in ds.parts or (ds,):
        if not part._filled(column):
            continue
        name = f"{part.format}:{part.root}"
        meaning = CLASS_MEANINGS[column].get(part.format)
        if meaning is not None:
            if tuple(meaning) != classes:
                out.append(ClassMismatch(name, tuple(meaning)))
            continue
        codes = part.table[column].dropna().to_numpy(dtype=float)
        bad = codes[(codes < 0) | (codes >= len(classes)) | (codes != np.round(codes))]
        if len(bad):
            out.append(ClassMismatch(name, None, float(bad[0])))
    return out
