"""Several data sets as one (``jobs.train --data A --data B``): each source fills the labels it has.

GENKI-4K has smile and no gender; CelebA or a gender manifest has gender. Training ``task_attention`` on both
needs one table in which a GENKI row's gender and a CelebA row's smile are *missing*, not 0. :func:`mix` makes
it: the union of the sources' columns, a label a source does not have is NaN (None in a list column), and
every model output already leaves a missing label out of its loss and its metrics (models/outputs.py,
``Output.masked_loss``; ``stats`` skip rows without a target). Each row keeps the split its own reader gave
it (a source with a split of its own keeps it; the others get the seeded split of their file names), so the
held-out part of every source is what it would be alone, but for its files that an earlier source also lists.
A ``source`` column says where a row came from.

A file listed by several sources (GENKI-4K's photos and a manifest adding their gender) stays once per source,
each row with its own labels, with a warning; the readers split by different keys (a manifest by the path as
written, one key per file; GENKI-4K and UTKFace by the file name), so every row of such a file takes the split of the first
source that lists it: no file is in two splits, and the test faces are never trained on.

What does not mix, and is refused: sources whose labels mean different classes for one model (UTKFace's 5
races and SCUT-FBP5500's 2, for ``hmtnet`` and for ``age_gender_race``, which SCUT-FBP5500 alone cannot train:
every source that fills a label the model learns counts; see ``FaceDataset.model_overrides``) and sources with
landmark lists of different lengths.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from facedata.datasets.base import (
    FACE_SELECT_COLUMNS,
    LABEL_COLUMNS,
    LIST_COLUMNS,
    FaceDataset,
    missing,
)
from facedata.paths import normalize_path

log = logging.getLogger("facedata.datasets")

MIXED = "mixed"  # the format of a mix of sources of different formats
SOURCE = "source"  # column: the FORMAT:URI a row was read from


def source_name(ds: FaceDataset) -> str:
    return f"{ds.format}:{ds.root}"


def mix(parts: list[FaceDataset]) -> FaceDataset:
    """One :class:`FaceDataset` of ``parts`` (at least two): rows of every source, the union of their columns."""
    if len(parts) < 2:
        raise ValueError("mixing needs at least two data sets")
    points = {p.num_landmarks for p in parts if p.has_landmarks}
    if len(points) > 1:
        raise ValueError(f"the sources' landmarks have different numbers of points ({sorted(points)}): "
                         f"{', '.join(source_name(p) for p in parts if p.has_landmarks)}")
    present = {c for p in parts for c in p.table.columns}
    order = ["path", "split", *LABEL_COLUMNS, *FACE_SELECT_COLUMNS]
    columns = [c for c in order if c in present]
    columns += sorted(present - set(columns) - {SOURCE}) + [SOURCE]
    tables = [p.table.assign(**{SOURCE: source_name(p)}).reindex(columns=columns) for p in parts]
    table = pd.concat(tables, ignore_index=True)
    for col in columns:
        if col in LIST_COLUMNS:  # a source without the column: None, as the readers write a missing list
            table[col] = [None if missing(v) else v for v in table[col]]
    _one_split_per_file(table, np.repeat(np.arange(len(parts)), [len(p) for p in parts]))
    formats = {p.format for p in parts}
    fmt = formats.pop() if len(formats) == 1 else MIXED
    skipped = [(f"{source_name(p)}: {where}", reason) for p in parts for where, reason in p.skipped]
    num_points = points.pop() if points else 0
    return FaceDataset(fmt, " + ".join(source_name(p) for p in parts), table, skipped, bool(num_points),
                       num_points, parts=tuple(parts))


def _one_split_per_file(table: pd.DataFrame, part: np.ndarray) -> None:
    """Gives every row of a file that several sources list (``part``: each row's source) the split of its first
    row, in place. The first source's split, because the order is the user's (``--data A --data B``) and the
    same on every run, and the first source is the main one a later source adds labels to: its held-out part
    stays what it is alone, and its results compare with a run on it alone. A file that only one source lists,
    even twice (two faces of a group photo, a manifest's own split column), keeps its rows' splits: what the
    source says about its own files is the user's choice, as it would be without the mix."""
    keys = pd.Series([normalize_path(p) for p in table["path"]], index=table.index)
    shared = keys.map(pd.Series(part, index=table.index).groupby(keys).nunique()) > 1
    if not shared.any():
        return
    first = table["split"].groupby(keys).transform("first")
    moved = shared & (table["split"] != first)
    table.loc[shared, "split"] = first[shared]
    log.warning("mixed data: %d files are listed by more than one source (first: %s); each source's row is kept "
                "with its own labels, and all rows of such a file take the split of the first source that lists "
                "it (%d rows moved) so that no file is in two splits",
                keys[shared].nunique(), table.loc[shared, "path"].iloc[0], int(moved.sum()))
