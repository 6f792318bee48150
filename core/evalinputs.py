"""What an evaluation reads from a labelled data set besides its images: which of its labels the checkpoint's
outputs can be scored against, and which face of a photo each row is about (``jobs.evaluate``).

* Class codes (:func:`class_disagreements`). A class-coded label column
  (``facedata.datasets.classcodes.CLASS_MEANINGS``: race) means different classes in different formats:
  UTKFace's race 0 is White, SCUT-FBP5500's is Asian. A checkpoint's output names its classes
  (``Categorical.classes``: age_gender_race's are UTKFace's five, an hmtnet's those of the data it was
  trained on). Scoring that output against codes of other classes would call Asian faces White (or crash on
  a code the head does not have), so such a column is left out of the evaluation, and the job says which
  and why. This is the rule training applies to a mix of sources, one function for both
  (``facedata.datasets.classcodes.class_mismatches``; ``FaceDataset._check_classes`` refuses the mix): a
  format's codes mean its ``CLASS_MEANINGS``; a manifest's have no stated meaning and are taken to be
  the model's classes when they are among its codes.
  Training refuses because leaving a source's labels out would change what the model learns; an evaluation
  measures the outputs that can be measured (as it scores a 40-attribute model on the attributes a data set
  labels) and names the one it cannot.
* Named faces (:class:`NamedFaces`). A manifest may label several people of one photo, each row naming its
  face by ``face_box`` or ``face_points``. Through detection, such a row is judged on the face it names, found
  exactly as training finds it (``faces.trainfaces.find_training_faces``: the detector, then the face the box
  overlaps most or the points are nearest, ``pick_face``) and aligned as training aligns it
  (``training_input``, through ``core.batches.load_batch``). A row whose named face is not found is left out
  and counted. Rows that name no face keep ``--face-pick`` (``faces.finder.decode_face``).
"""

from __future__ import annotations

import tempfile

import numpy as np
import pandas as pd

from facedata.datasets import FACE_SELECT_COLUMNS
from facedata.datasets.classcodes import CLASS_MEANINGS, class_mismatches, classes_text
from faces.facecache import DetectionCache
from faces.trainfaces import ALIGN_POINTS, ALIGN_SHA, FaceReport, find_training_faces
from models.outputs import Categorical

_ROW = "_eval_row"  # a row's position in the table given to NamedFaces.resolve, while its faces are found


def class_disagreements(ds, model) -> dict[str, str]:
    """``{column: why}`` for every class-coded label column of ``ds`` (each source of a mix) whose codes do not
    mean the classes of the ``model`` output scored against it
    (``facedata.datasets.classcodes.class_mismatches``, the rule training refuses a mix by; the first source
    that disagrees is named); empty when they all agree."""
    out: dict[str, str] = {}
    for o in model.outputs:
        col = o.target_column
        if not isinstance(o, Categorical) or col not in CLASS_MEANINGS:
            continue
        classes = tuple(o.classes)
        bad = class_mismatches(ds, col, classes)
        if not bad:
            continue
        first = bad[0]
        if first.meaning is not None:
            out[col] = (f"{first.source} codes {col} as {classes_text(first.meaning)}; the checkpoint's {o.name} "
                        f"output is {classes_text(classes)}")
        else:
            out[col] = (f"{first.source} has {col} {first.code:g}, which is none of the checkpoint's {o.name} "
                        f"classes ({classes_text(classes)})")
    return out


def has_named_faces(table: pd.DataFrame) -> bool:
    """Whether some row of ``table`` names its face (``face_box`` or ``face_points``)."""
    return any(c in table.columns and table[c].notna().any() for c in FACE_SELECT_COLUMNS)


class NamedFaces:
    """The faces the rows of a table name, found with ``finder`` as training finds them. Detections are kept
    for the life of the object (a folder of its own, removed with it), so that a calibration split and the
    evaluated one that share photos detect each photo once."""

    def __init__(self, finder):
        self.finder = finder
        self._folder = tempfile.TemporaryDirectory(prefix="faceattr-evaluate-faces-")
        self.cache = DetectionCache(self._folder.name, finder.identity)

    def resolve(self, table: pd.DataFrame) -> tuple[pd.DataFrame, FaceReport | None]:
        """``table`` with every row that names its face resolved: :data:`~faces.trainfaces.ALIGN_POINTS` and
        :data:`~faces.trainfaces.ALIGN_SHA` filled (``core.batches.load_batch`` then aligns it as in training),
        the rows whose named face is not found (or whose file cannot be read) left out, the others as they were
        (``ALIGN_POINTS`` None: read with ``--face-pick``). Row order is kept, re-indexed from 0. The report
        counts the named rows only; None when no row names a face (``table`` is returned as it is)."""
        if not has_named_faces(table):
            return table, None
        table = table.reset_index(drop=True).assign(**{_ROW: np.arange(len(table))})
        sel = [c for c in FACE_SELECT_COLUMNS if c in table.columns]
        named = table[sel].notna().any(axis=1).to_numpy()
        found, report = find_training_faces(table[named], self.finder, self.cache)
        rest = table[~named].drop(columns=sel).assign(**{ALIGN_POINTS: None, ALIGN_SHA: None})
        both = pd.concat([found, rest], ignore_index=True).sort_values(_ROW, kind="stable")
        return both.drop(columns=[_ROW]).reset_index(drop=True), report

    def close(self) -> None:
        self._folder.cleanup()


def face_parts(chunk: pd.DataFrame, positions: np.ndarray):
    """``(rows, positions)`` of a chunk of a table :meth:`NamedFaces.resolve` gave, in the two ways they are
    read: the rows with a resolved face (aligned as in training), then the others (``decode_fn``). A table
    without resolved faces is one part."""
    if ALIGN_POINTS not in chunk.columns:
        yield chunk, positions
        return
    resolved = chunk[ALIGN_POINTS].notna().to_numpy()
    if resolved.any():
        yield chunk[resolved], positions[resolved]
    if not resolved.all():
        yield chunk[~resolved].drop(columns=[ALIGN_POINTS, ALIGN_SHA]), positions[~resolved]
