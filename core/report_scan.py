"""One streaming pass over a label output's Parquet for the report (core/report.py): what each column is,
running counts and fixed-size histograms, and a bounded sample of the flagged rows.

Memory grows neither with the rows nor with what a tampered output puts in them. The files are read in
batches of only the columns the report draws, within the limits of core/report_read.py (a row group is never
decoded whole, strings are read as dictionaries, a column chunk over the limits refuses the file). Every
histogram has a fixed number of bins (:class:`Hist`: fixed ranges for the known columns, a range that doubles
for the others, up to :data:`MAX_SPAN`), every count is a :class:`Tally` of at most :data:`MAX_DISTINCT`
values, each cut to ``MAX_LABEL_BYTES`` (the rest counted as ``other``), and the flagged rows kept for the
contact sheet are at most ``max_flagged`` (a uniform random sample: each flagged row gets a random key and the
rows with the smallest keys are kept, so that the sample does not depend on how the files are split), each
with its path cut to :data:`MAX_PATH_BYTES` and at most :data:`MAX_REASONS` reasons.

The known columns (core/rows.py) are read only when of the type this version writes: a wrong-typed one is
named in :attr:`Plan.missing` and not read (so that no Arrow kernel error stands for it), and one of another
type in a later file is read as empty there (:attr:`Scan.notes`). Past :data:`MAX_ATTRIBUTES` model output
columns the rest are not drawn (each is a chart panel).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.modelset import MEMBER_PROVENANCE
from core.report_read import MAX_LABEL_BYTES, batches, counts, texts
from core.rows import COMMON

MAX_DISTINCT = 1000  # values one Tally holds (a class, an error kind, a reason); the rest are ``other``
MAX_PATH_BYTES = 4096  # of a flagged row's path: PATH_MAX on Linux (an S3 key is at most 1,024 bytes)
MAX_REASONS = 32  # review reasons kept per flagged row (a real row has at most about ten)
MAX_ATTRIBUTES = 128  # model output columns read (a set of two models with CelebA's 40 has about 60)
POSE = ("pose_yaw", "pose_pitch", "pose_roll")
QUALITY = ("sharpness", "brightness", "face_size", "face_score")
REVIEW = ("review", "review_reasons")
FLAGGED = ("path", "face", "face_box", "review_reasons")  # what a contact-sheet thumbnail needs
# (lo, hi, bins, grows) of the columns whose range is known; any other number: a range that grows
RANGES = {"pose_yaw": (-90, 90, 36, False), "pose_pitch": (-90, 90, 36, False), "pose_roll": (-90, 90, 36, False),
          "sharpness": (0, 100, 40, False), "brightness": (0, 100, 40, False), "face_size": (0, 64, 32, True),
          "face_score": (0, 1, 50, False), "age": (0, 120, 60, False), "age_mode": (0, 120, 60, False),
          "beauty": (1, 5, 40, False)}
PROB_RANGE = (0, 1, 40, False)
MAX_SPAN = 1e300  # a growing range stops doubling here (1e308 doubled is inf, and no axis has inf limits)


class Tally(Counter):
    """A ``Counter`` of at most ``cap`` distinct values: a value first seen once it is full is counted in
    ``other`` (rows), so that a column of distinct strings costs ``cap`` keys, not one per row."""

    def __init__(self, cap: int = MAX_DISTINCT):
        super().__init__()
        self.cap, self.other = cap, 0

    def add(self, pairs) -> None:
        for k, n in pairs:
            if k in self or len(self) < self.cap:
                self[k] += n
            else:
                self.other += n


class Hist:
    """A histogram with a fixed number of bins. Fixed ranges put values outside into the end bins and count
    them (``outside``); a growing range doubles its span (merging bins in pairs) until every value fits, up
    to :data:`MAX_SPAN`, past which values are counted as outside too."""

    def __init__(self, lo: float, hi: float, bins: int, grows: bool = False):
        self.lo, self.hi, self.grows = float(lo), float(hi), grows
        self.counts = np.zeros(bins + (bins % 2 if grows else 0), dtype=np.int64)
        self.n = self.nan = self.outside = 0
        self.total = 0.0

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, len(self.counts) + 1)

    def _grow(self, vmin: float, vmax: float) -> None:
        while (vmin < self.lo or vmax >= self.hi) and 2 * (self.hi - self.lo) <= MAX_SPAN:
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
        self.outside += int(((v < self.lo) | (v > self.hi)).sum())
        k = len(self.counts)
        # clipped first: (v - lo) of two values near the float limit is inf, and inf has no integer bin
        idx = np.clip(((np.clip(v, self.lo, self.hi) - self.lo) / (self.hi - self.lo) * k).astype(np.int64), 0, k - 1)
        self.counts += np.bincount(idx, minlength=k)
        self.n += int(v.size)
        with np.errstate(over="ignore"):  # a sum past the float limit is an inf mean, said as such
            self.total += float(v.sum())

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan


def new_hist(name: str) -> Hist:
    base = name.rsplit(".", 1)[-1]
    return Hist(*(PROB_RANGE if base.endswith("_prob") else RANGES.get(base, (0, 1, 32, True))))


# --- what each column must be -----------------------------------------------------------------------------
def _is_str(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t)
            or (pa.types.is_dictionary(t) and _is_str(t.value_type)))


def _is_num(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def _list_of(item):
    return lambda t: ((pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
                      and item(t.value_type))


STRING, NUMBER = (_is_str, "a string"), (_is_num, "a number")
KNOWN = {"path": STRING, "error_kind": STRING, "model": STRING, "checkpoint": STRING, "detector": STRING,
         "ok": (pa.types.is_boolean, "a bool"), "review": (pa.types.is_boolean, "a bool"),
         "face": (pa.types.is_integer, "an integer"), "faces": (pa.types.is_integer, "an integer"),
         "face_box": (_list_of(_is_num), "a list of numbers"),
         "review_reasons": (_list_of(_is_str), "a list of strings"), **{c: NUMBER for c in POSE + QUALITY}}


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
    """What the report reads: ``columns`` (scan key -> (column path, type check, type)), the models' outputs, the
    known columns it can read (``has``), and what is missing or unreadable, in words."""

    columns: dict
    members: list[Member]
    has: set
    missing: list[str]


def _unique(fields) -> list[pa.Field]:
    """The fields whose name occurs once: a duplicated name cannot be told apart, so neither is read."""
    n = Counter(f.name for f in fields)
    return [f for f in fields if n[f.name] == 1]


def _member(name: str, fields: list[pa.Field], path) -> tuple[Member, dict]:
    m = Member(name)
    cols: dict = {}
    types = {f.name: f.type for f in fields}
    key = (lambda c: f"{name}.{c}") if name else (lambda c: c)
    for f in fields:
        c, t = f.name, f.type
        if c in MEMBER_PROVENANCE or (c.endswith("_prob") and c[:-5] in types):
            continue
        if _is_str(t):
            m.categorical.append(key(c))
            cols[key(c)] = (path(c), _is_str, t)
            if _is_num(types.get(f"{c}_prob", pa.null())):
                m.probs.append(key(f"{c}_prob"))
                cols[key(f"{c}_prob")] = (path(f"{c}_prob"), _is_num, types[f"{c}_prob"])
        elif pa.types.is_boolean(t):
            m.binary.append(key(c))
            cols[key(c)] = (path(c), pa.types.is_boolean, t)
        elif _is_num(t):
            m.numeric.append(key(c))
            cols[key(c)] = (path(c), _is_num, t)
    return m, cols


def _drop_taken(m: Member, c: dict, cols: dict, missing: list) -> None:
    """Leave out of ``m`` (and its columns ``c``) the keys another member already gives: a flat column named
    ``agr.age`` beside the struct ``agr``'s field ``age`` is the scan key ``agr.age`` twice (the struct's values
    were counted twice, the flat column's never)."""
    taken = [k for k in c if k in cols]
    if not taken:
        return
    for kind in (m.categorical, m.probs, m.numeric, m.binary):
        kind[:] = [k for k in kind if k not in taken]
    for k in taken:
        del c[k]
    names = ", ".join(k[:200] for k in taken[:5]) + (f" and {len(taken) - 5} more" if len(taken) > 5 else "")
    whose = f"struct {m.name[:200]}'s field(s)" if m.name else "flat column(s) whose name holds a dot"
    missing.append(f"{whose} {names}: the name of another column's field, which is read; these are not")


def plan(schema: pa.Schema) -> Plan:
    """Which columns the report reads from a label output of this schema, and what it lacks."""
    names = Counter(schema.names)
    fields = _unique(schema)
    missing, has = [], set()
    for c, (ok, what) in KNOWN.items():
        if names[c] > 1:
            missing.append(f"column {c} appears {names[c]} times: not read")
        elif c in names and not ok(schema.field(c).type):
            missing.append(f"column {c} is {schema.field(c).type}, not {what}: not read")
        elif c in names:
            has.add(c)
    cols: dict = {c: ((c,), KNOWN[c][0], schema.field(c).type) for c in has}
    found: list[tuple[Member, dict]] = []
    flat = [f for f in fields if f.name not in COMMON and not pa.types.is_struct(f.type)]
    if flat:
        found.append(_member("", flat, lambda sub: (sub,)))
    for f in fields:
        if pa.types.is_struct(f.type) and f.name not in COMMON:
            found.append(_member(f.name, _unique(f.type), lambda sub, n=f.name: (n, sub)))
    for m, c in sorted(found, key=lambda mc: not mc[0].name):  # the structs (the label job's layout) first
        _drop_taken(m, c, cols, missing)
        cols.update(c)
    members = [m for m, _ in found]
    attrs = [k for m in members for k in m.categorical + m.probs + m.numeric + m.binary]
    if len(attrs) > MAX_ATTRIBUTES:  # a chart per column: thousands of columns would be thousands of panels
        dropped = set(attrs[MAX_ATTRIBUTES:])
        for m in members:
            for kind in (m.categorical, m.probs, m.numeric, m.binary):
                kind[:] = [k for k in kind if k not in dropped]
        cols = {k: v for k, v in cols.items() if k not in dropped}
        missing.append(f"{len(dropped)} of {len(attrs)} model output columns (only the first {MAX_ATTRIBUTES} "
                       "are drawn)")
    for group, why in ((("path",), "every row's photo"), (("face", "faces"), "face counts"),
                       (("face_box",), "thumbnails of the flagged faces"), (POSE, "pose histograms"),
                       (("sharpness", "brightness", "face_size"), "quality histograms"),
                       (REVIEW, "review counts and the contact sheet")):
        gone = [c for c in group if c not in names]
        if gone:
            missing.append(f"columns {', '.join(gone)} ({why})")
    if not any(m.categorical or m.numeric or m.binary for m in members):
        missing.append("model output columns (attribute distributions)")
    return Plan(cols, members, has, missing)


@dataclass
class Scan:
    """Everything the report draws, accumulated batch by batch."""

    rows: int = 0
    images: int = 0
    faces: int = 0
    errors: Tally = field(default_factory=Tally)
    values: dict = field(default_factory=dict)  # column -> Tally of at most 10 values (model, checkpoint, detector)
    counts: dict = field(default_factory=dict)  # categorical key -> Tally of classes
    nulls: Counter = field(default_factory=Counter)  # categorical / binary key -> null rows among faces
    hists: dict = field(default_factory=dict)  # numeric key -> Hist
    shares: dict = field(default_factory=dict)  # binary key -> [true, non-null]
    review: int = 0
    reviewed: int = 0  # rows with a review value (faces, and whole images)
    reasons: Tally = field(default_factory=Tally)
    flagged_keys: np.ndarray = field(default_factory=lambda: np.zeros(0))
    flagged: list = field(default_factory=list)  # at most max_flagged dicts of FLAGGED columns
    notes: list = field(default_factory=list)  # columns of another type in some file, in words


def _np(a: pa.Array) -> np.ndarray:
    # not a safe cast: an int64 past 2**53 has no exact float, and a histogram needs none (it refused the report)
    return pc.fill_null(pc.cast(a, pa.float64(), safe=False), math.nan).to_numpy(zero_copy_only=False)


def scan(dataset, p: Plan, max_flagged: int, seed: int = 0) -> Scan:
    """Stream the files of ``dataset`` (a ``pyarrow.dataset.Dataset``) once; see the module docstring."""
    s = Scan()
    rng = np.random.default_rng(seed)
    numeric = [k for m in p.members for k in m.numeric + m.probs] + [c for c in POSE + QUALITY if c in p.has]
    for name, first, n, col in batches(dataset, p.columns, s.notes):
        s.rows += n
        if "face" in p.has:
            face = col["face"]
            s.faces += n - face.null_count
            s.images += face.null_count + (pc.sum(pc.equal(face, 0)).as_py() or 0)
        else:
            s.images += n
        if "error_kind" in p.has:
            s.errors.add(counts(col["error_kind"]))
        for c in ("model", "checkpoint", "detector"):
            if c in p.has:
                s.values.setdefault(c, Tally(10)).add(counts(col[c]))
        for m in p.members:
            for k in m.categorical:
                s.counts.setdefault(k, Tally()).add(counts(col[k]))
                s.nulls[k] += col[k].null_count
            for k in m.binary:
                share = s.shares.setdefault(k, [0, 0])
                share[0] += pc.sum(col[k]).as_py() or 0
                share[1] += n - col[k].null_count
        for k in numeric:
            s.hists.setdefault(k, new_hist(k)).add(_np(pc.drop_null(col[k])))
        if "review" in p.has and "review_reasons" in p.has:
            _scan_review(s, col, n, (name, first), rng, max_flagged)
    return s


def _flagged_rows(col: dict, idx: np.ndarray, where: tuple[str, int]) -> list[dict]:
    """The FLAGGED values of rows ``idx``, each bounded: the path cut to MAX_PATH_BYTES (its length kept),
    at most MAX_REASONS reasons cut to MAX_LABEL_BYTES, the box's first five numbers (four make a box)."""
    take = pa.array(idx)
    rows = [{"row": f"{where[0]} row {where[1] + int(i)}"} for i in idx]  # finds the row whatever its path
    if "path" in col:
        paths, lens = texts(col["path"].take(take), MAX_PATH_BYTES)
        for r, v, k in zip(rows, paths, lens):
            r["path"], r["path_bytes"] = v, k
    if "face" in col:
        for r, v in zip(rows, col["face"].take(take).to_pylist()):
            r["face"] = v
    if "face_box" in col:
        boxes = pc.list_slice(col["face_box"].take(take), 0, 5, return_fixed_size_list=False)
        for r, v in zip(rows, boxes.to_pylist()):
            r["face_box"] = v
    reasons = pc.list_slice(col["review_reasons"].take(take), 0, MAX_REASONS, return_fixed_size_list=False)
    flat = texts(pc.list_flatten(reasons), MAX_LABEL_BYTES)[0] if len(reasons) else []
    lengths = pc.fill_null(pc.list_value_length(reasons), 0).to_pylist()
    at = 0
    for r, k in zip(rows, lengths):
        r["review_reasons"] = [x for x in flat[at:at + k] if x is not None]
        at += k
    return rows


def _scan_review(s: Scan, col: dict, n: int, where: tuple[str, int], rng: np.random.Generator, max_flagged: int) -> None:
    review, reasons = col["review"], col["review_reasons"]
    s.reviewed += n - review.null_count
    s.review += pc.sum(review).as_py() or 0
    s.reasons.add(counts(pc.list_flatten(reasons)))
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
    new = _flagged_rows({k: col[k] for k in FLAGGED if k in col}, idx, where)
    allkeys = np.concatenate([s.flagged_keys, keys])
    rows = s.flagged + new
    if len(rows) > max_flagged:
        keep = np.sort(np.argpartition(allkeys, max_flagged - 1)[:max_flagged])
        allkeys, rows = allkeys[keep], [rows[i] for i in keep]
    s.flagged_keys, s.flagged = allkeys, rows
