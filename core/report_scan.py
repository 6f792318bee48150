"""One streaming pass over a label output's Parquet for the report (core/report.py): what each column is,
running counts and fixed-size histograms, and a bounded sample of the flagged rows.

Memory does not grow with the number of rows: the files are read as record batches of
:data:`BATCH_ROWS` rows holding only the columns the report draws (``pyarrow.dataset``'s projection; a
model set's struct fields are projected one by one, the embedding is never read), every histogram has a
fixed number of bins (:class:`Hist`: fixed ranges for the known columns, a range that doubles for the
others), every count is a ``Counter`` of class names or review reasons, and the flagged rows kept for the
contact sheet are at most ``max_flagged`` (a uniform random sample: each flagged row gets a random key and
the rows with the smallest keys are kept, so that the sample does not depend on how the files are split).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.rows import COMMON

BATCH_ROWS = 1 << 14
POSE = ("pose_yaw", "pose_pitch", "pose_roll")
QUALITY = ("sharpness", "brightness", "face_size", "face_score")
REVIEW = ("review", "review_reasons")
FLAGGED = ("path", "face", "face_box", "review_reasons")  # what a contact-sheet thumbnail needs
OVERVIEW = ("ok", "error_kind", "face", "faces", "model", "checkpoint", "detector")
# (lo, hi, bins, grows) of the columns whose range is known; any other number: a range that grows
RANGES = {"pose_yaw": (-90, 90, 36, False), "pose_pitch": (-90, 90, 36, False), "pose_roll": (-90, 90, 36, False),
          "sharpness": (0, 100, 40, False), "brightness": (0, 100, 40, False), "face_size": (0, 64, 32, True),
          "face_score": (0, 1, 50, False), "age": (0, 120, 60, False), "age_mode": (0, 120, 60, False),
          "beauty": (1, 5, 40, False)}
PROB_RANGE = (0, 1, 40, False)


class Hist:
    """A histogram with a fixed number of bins. Fixed ranges put values outside into the end bins and count
    them (``outside``); a growing range doubles its span (merging bins in pairs) until every value fits."""

    def __init__(self, lo: float, hi: float, bins: int, grows: bool = False):
        self.lo, self.hi, self.grows = float(lo), float(hi), grows
        self.counts = np.zeros(bins + (bins % 2 if grows else 0), dtype=np.int64)
        self.n = self.nan = self.outside = 0
        self.total = 0.0

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, len(self.counts) + 1)

    def _grow(self, vmin: float, vmax: float) -> None:
        while vmin < self.lo or vmax >= self.hi:
            span = self.hi - self.lo
            merged = self.counts.reshape(-1, 2).sum(1)
            zeros = np.zeros_like(merged)
            if vmin < self.lo:
                self.counts, self.lo = np.concatenate([zeros, merged]), self.lo - span
            else:
                self.counts, self.hi = np.concatenate([merged, zeros]), self.hi + span

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(v)
        self.nan += int(v.size - finite.sum())
        v = v[finite]
        if not v.size:
            return
        if self.grows:
            self._grow(float(v.min()), float(v.max()))
        else:
            self.outside += int(((v < self.lo) | (v > self.hi)).sum())
        k = len(self.counts)
        idx = np.clip(((v - self.lo) / (self.hi - self.lo) * k).astype(np.int64), 0, k - 1)
        self.counts += np.bincount(idx, minlength=k)
        self.n += int(v.size)
        self.total += float(v.sum())

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan


def new_hist(name: str) -> Hist:
    base = name.rsplit(".", 1)[-1]
    return Hist(*(PROB_RANGE if base.endswith("_prob") else RANGES.get(base, (0, 1, 32, True))))


@dataclass
class Member:
    """The outputs of one model: its categorical (string) columns, numbers and binary attributes, named as
    the scan's keys (``gender``, or ``agr.gender`` in a set)."""

    name: str  # "" for a flat output
    model: str = ""
    categorical: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    binary: list[str] = field(default_factory=list)
    probs: list[str] = field(default_factory=list)  # the categorical outputs' <x>_prob


@dataclass
class Plan:
    """What the report reads: ``columns`` (scan key -> dataset expression), the models' outputs, and what
    is missing (column -> why it matters)."""

    columns: dict
    members: list[Member]
    has: set
    missing: list[str]


def _is_num(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def _member(name: str, fields: list[pa.Field], ref) -> tuple[Member, dict]:
    m = Member(name)
    cols: dict = {}
    types = {f.name: f.type for f in fields}
    key = (lambda c: f"{name}.{c}") if name else (lambda c: c)
    for f in fields:
        c, t = f.name, f.type
        if c in ("model", "checkpoint") or (c.endswith("_prob") and c[:-5] in types):
            continue
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            m.categorical.append(key(c))
            cols[key(c)] = ref(c)
            if _is_num(types.get(f"{c}_prob", pa.null())):
                m.probs.append(key(f"{c}_prob"))
                cols[key(f"{c}_prob")] = ref(f"{c}_prob")
        elif pa.types.is_boolean(t):
            m.binary.append(key(c))
            cols[key(c)] = ref(c)
        elif _is_num(t):
            m.numeric.append(key(c))
            cols[key(c)] = ref(c)
    return m, cols


def plan(schema: pa.Schema) -> Plan:
    """Which columns the report reads from a label output of this schema, and what it lacks."""
    names = set(schema.names)
    cols: dict = {c: pc.field(c) for c in OVERVIEW + POSE + QUALITY + REVIEW + FLAGGED if c in names}
    members: list[Member] = []
    flat = [f for f in schema if f.name not in COMMON and not pa.types.is_struct(f.type)]
    if flat:
        m, c = _member("", flat, pc.field)
        members.append(m)
        cols.update(c)
    for f in schema:
        if pa.types.is_struct(f.type) and f.name not in COMMON:
            m, c = _member(f.name, list(f.type), lambda sub, n=f.name: pc.field(n, sub))
            members.append(m)
            cols.update(c)
    missing = []
    for group, why in ((("path",), "every row's photo"), (("face", "faces"), "face counts"),
                       (("face_box",), "thumbnails of the flagged faces"), (POSE, "pose histograms"),
                       (("sharpness", "brightness", "face_size"), "quality histograms"),
                       (REVIEW, "review counts and the contact sheet")):
        gone = [c for c in group if c not in names]
        if gone:
            missing.append(f"columns {', '.join(gone)} ({why})")
    if not any(m.categorical or m.numeric or m.binary for m in members):
        missing.append("model output columns (attribute distributions)")
    return Plan(cols, members, names, missing)


@dataclass
class Scan:
    """Everything the report draws, accumulated batch by batch."""

    rows: int = 0
    images: int = 0
    faces: int = 0
    errors: Counter = field(default_factory=Counter)
    values: dict = field(default_factory=dict)  # column -> distinct values seen (model, checkpoint, detector)
    counts: dict = field(default_factory=dict)  # categorical key -> Counter of classes
    nulls: Counter = field(default_factory=Counter)  # categorical / binary key -> null rows among faces
    hists: dict = field(default_factory=dict)  # numeric key -> Hist
    shares: dict = field(default_factory=dict)  # binary key -> [true, non-null]
    review: int = 0
    reviewed: int = 0  # rows with a review value (faces, and whole images)
    reasons: Counter = field(default_factory=Counter)
    flagged_keys: np.ndarray = field(default_factory=lambda: np.zeros(0))
    flagged: list = field(default_factory=list)  # at most max_flagged dicts of FLAGGED columns


def _np(a: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.cast(a, pa.float64()), math.nan).to_numpy(zero_copy_only=False)


def scan(dataset, p: Plan, max_flagged: int, seed: int = 0) -> Scan:
    """Stream ``dataset`` (a ``pyarrow.dataset.Dataset``) once; see the module docstring."""
    s = Scan()
    rng = np.random.default_rng(seed)
    numeric = [k for m in p.members for k in m.numeric + m.probs] + [c for c in POSE + QUALITY if c in p.has]
    for batch in dataset.to_batches(columns=p.columns, batch_size=BATCH_ROWS, batch_readahead=2, fragment_readahead=1):
        n = batch.num_rows
        s.rows += n
        col = batch.column
        if "face" in p.has:
            face = col("face")
            s.faces += n - face.null_count
            s.images += face.null_count + (pc.sum(pc.equal(face, 0)).as_py() or 0)
        else:
            s.images += n
        if "error_kind" in p.has:
            s.errors.update({d["values"]: d["counts"] for d in pc.value_counts(col("error_kind")).to_pylist()
                             if d["values"] is not None})
        for c in ("model", "checkpoint", "detector"):
            if c in p.has and len(s.values.setdefault(c, set())) < 10:
                s.values[c].update(v for v in pc.unique(col(c)).to_pylist() if v is not None)
        for m in p.members:
            for k in m.categorical:
                a = col(k)
                s.counts.setdefault(k, Counter()).update(
                    {d["values"]: d["counts"] for d in pc.value_counts(a).to_pylist() if d["values"] is not None})
                s.nulls[k] += a.null_count
            for k in m.binary:
                a = col(k)
                share = s.shares.setdefault(k, [0, 0])
                share[0] += pc.sum(a).as_py() or 0
                share[1] += len(a) - a.null_count
        for k in numeric:
            s.hists.setdefault(k, new_hist(k)).add(_np(pc.drop_null(col(k))))
        if "review" in p.has and "review_reasons" in p.has:
            _review(s, batch, rng, max_flagged)
    return s


def _review(s: Scan, batch: pa.RecordBatch, rng: np.random.Generator, max_flagged: int) -> None:
    review = batch.column("review")
    s.reviewed += len(review) - review.null_count
    s.review += pc.sum(review).as_py() or 0
    s.reasons.update({d["values"]: d["counts"] for d in
                      pc.value_counts(pc.list_flatten(batch.column("review_reasons"))).to_pylist()})
    idx = np.flatnonzero(pc.fill_null(review, False).to_numpy(zero_copy_only=False))
    if not len(idx) or max_flagged <= 0:
        return
    keys = rng.random(len(idx))
    if len(s.flagged) >= max_flagged:  # only rows that beat the largest key kept so far can enter
        room = keys < s.flagged_keys.max()
        idx, keys = idx[room], keys[room]
    if len(idx) > max_flagged:
        best = np.argpartition(keys, max_flagged - 1)[:max_flagged]
        idx, keys = idx[best], keys[best]
    if not len(idx):
        return
    names = [c for c in FLAGGED if c in batch.schema.names]
    new = batch.select(names).take(pa.array(idx)).to_pylist()
    allkeys = np.concatenate([s.flagged_keys, keys])
    rows = s.flagged + new
    if len(rows) > max_flagged:
        keep = np.sort(np.argpartition(allkeys, max_flagged - 1)[:max_flagged])
        allkeys, rows = allkeys[keep], [rows[i] for i in keep]
    s.flagged_keys, s.flagged = allkeys, rows
