"""Several data sets as one (``jobs.train --data A --data B``): each source fills the labels it has.

GENKI-4K has smile and no gender; CelebA or a gender manifest has gender. Training ``task_attention`` on both
needs one table in which a GENKI row's gender and a CelebA row's smile are *missing*, not 0. :func:`mix` makes
it: the union of the sources' columns, a label a source does not have is NaN (None in a list column), and
every model output already leaves a missing label out of its loss and its metrics (models/outputs.py,
``Output.masked_loss``; ``stats`` skip rows without a target). Each row keeps the split its own reader gave
it (a source with a split of its own keeps it; the others get the seeded split of their file names), so the
held-out part of every source is what it would be alone. A ``source`` column says where a row came from.

What does not mix, and is refused: sources whose labels mean different classes for one model (UTKFace's 5
races and SCUT-FBP5500's 2 for ``hmtnet``, see ``FaceDataset.model_overrides``) and sources with landmark
lists of different lengths. A file listed by two sources stays twice (one row per source and its labels), with
a warning.
"""

from __future__ import annotations

import logging

import pandas as pd

from facedata.datasets.base import FACE_SELECT_COLUMNS, LABEL_COLUMNS, LIST_COLUMNS, FaceDataset, missing

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
    twice = table["path"].duplicated(keep=False)
    if twice.any():
        log.warning("mixed data: %d files are listed by more than one source (first: %s); each source's row "
                    "is kept with its own labels", int(twice.sum()) // 2 or 1, table.loc[twice, "path"].iloc[0])
    formats = {p.format for p in parts}
    fmt = formats.pop() if len(formats) == 1 else MIXED
    skipped = [(f"{source_name(p)}: {where}", reason) for p in parts for where, reason in p.skipped]
    num_points = points.pop() if points else 0
    return FaceDataset(fmt, " + ".join(source_name(p) for p in parts), table, skipped, bool(num_points),
                       num_points, parts=tuple(parts))
