"""What the label job leaves in its output folder, and what it reads back from it when it resumes.

Split from raytasks/label/job.py (the pipeline): the layout (``labels/``, ``_checkpoint/`` (Ray Data's commit log), ``_inputs/``,
``_summary.json``, ``_settings.json``), the resume's matching of inputs by file (:func:`labeled_spellings`), the
repair of an interrupted S3 commit, the removal of the files of writes that never
committed, the counts of rows, images and faces, and the provenance every row carries (checkpoint hash, detector).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import posixpath
from collections import Counter

import pyarrow.fs as pafs

import storage
from facedata.paths import _real as resolved_path  # realpath, or the path when it cannot be resolved
from facedata.paths import normalize_path

LABELS_DIR = "labels"
COMMIT_LOG_DIR = "_checkpoint"  # Ray Data's row-level checkpoint: the commit log of written paths
INPUTS_DIR = "_inputs"
SUMMARY_FILE = "_summary.json"
SETTINGS_FILE = "_settings.json"  # what the rows were made with beyond their own columns: the review thresholds
# Ray Data's name for a commit file written before its data files and renamed once they are complete
# (ray.data.checkpoint.checkpoint_writer: f"{checkpoint_id}{PENDING_CHECKPOINT_SUFFIX}.parquet")
PENDING_SUFFIX = ".pending.parquet"


def output_paths(output: str) -> dict[str, str]:
    return {k: storage.join(output, v) for k, v in
            (("labels", LABELS_DIR), ("commits", COMMIT_LOG_DIR), ("inputs", INPUTS_DIR),
             ("summary", SUMMARY_FILE), ("settings", SETTINGS_FILE))}


def repair_commit_log(commits_uri: str) -> int:
    """Delete pending commit files whose committed twin exists (an S3 rename killed between its copy and
    its delete: the data is complete). Returns how many were removed."""
    fs, root = storage.filesystem(commits_uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    names = {i.base_name for i in infos if i.type == pafs.FileType.File}
    removed = 0
    for name in names:
        if name.endswith(PENDING_SUFFIX) and name[: -len(PENDING_SUFFIX)] + ".parquet" in names:
            fs.delete_file(posixpath.join(root, name) if storage.is_s3(commits_uri) else os.path.join(root, name))
            removed += 1
    return removed


def clean_uncommitted(commits_uri: str, labels_uri: str) -> tuple[int, int]:
    """Delete the data files of every write whose commit never happened, then its pending commit file; returns
    ``(pending commit files, data files)`` removed. Run after :func:`repair_commit_log` (whose pending files
    have complete, committed data) and before anything reads ``labels_uri``.

    Ray Data writes each Parquet file straight to its final name under ``labels/``, after a pending commit file
    named by the file's prefix: a run killed mid-write leaves a truncated (or 0-byte) file there, which
    pyarrow cannot read ("Parquet magic bytes not found"). Ray removes such files itself, but only inside the
    next pipeline, after this job has read ``labels/`` for its counts and provenance; so the driver does it
    first, by Ray's own rule, which mirrors ``_clean_pending_checkpoints_task`` in
    ray/data/checkpoint/checkpoint_filter.py (Ray 2.60): the pending files are the non-recursive listing of the
    commit log ending in ``.pending.parquet``; a data file, listed recursively, is deleted when its base name
    starts with a pending file's base name less that suffix (``PrefixTrie.has_prefix_of``: one write task may
    write several files ``{prefix}_NNNNNN.parquet``); then every pending file is deleted. A complete data file
    of an uncommitted write goes too, as Ray would delete it: its paths are not in the commit log, so the
    next pipeline labels them again, and keeping the file would write those rows twice. Ray's own cleanup then
    finds nothing left to do."""
    cfs, croot = storage.filesystem(commits_uri)
    pending = [i.path for i in cfs.get_file_info(pafs.FileSelector(croot, recursive=False, allow_not_found=True))
               if i.type == pafs.FileType.File and i.path.endswith(PENDING_SUFFIX)]
    if not pending:
        return 0, 0
    prefixes = tuple(posixpath.basename(p)[: -len(PENDING_SUFFIX)] for p in pending)
    lfs, lroot = storage.filesystem(labels_uri)
    deleted = 0
    for info in lfs.get_file_info(pafs.FileSelector(lroot, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File and posixpath.basename(info.path).startswith(prefixes):
            lfs.delete_file(info.path)
            deleted += 1
    for path in pending:  # last, as Ray: a kill before this point leaves them, and the next run does it again
        cfs.delete_file(path)
    return len(pending), deleted


def parquet_dataset(uri: str):
    """The Parquet dataset under ``uri`` (``labels/``, or the input listing), or None when nothing is there
    yet: no such folder, or a folder that holds no file. The one check of every reader below. Ray Data makes
    ``labels/`` when the write starts (locally an empty folder; on S3 a marker object, ``labels/``, that is no
    file), so a run stopped before its first commit (an actor start-up takes minutes on a big model) leaves
    it empty: that output has no row yet, and resumes as a fresh one. A file there that is not Parquet (a
    0-byte or cut file) still fails here, as ``pyarrow.lib.ArrowInvalid`` (job.py ``_read_output``)."""
    import pyarrow.dataset as pads

    fs, root = storage.filesystem(uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return None
    ds = pads.dataset(root, filesystem=fs, format="parquet")
    return ds if ds.files else None


@dataclasses.dataclass
class OutputStats:
    """What an output holds: ``rows`` (one per face, or per image without a face or that failed), the
    ``images`` they cover, how many of those were read (``ok_images``), the ``faces`` found, the images
    ``without_faces`` and the error rows by kind."""

    rows: int = 0
    images: int = 0
    ok_images: int = 0
    faces: int = 0
    without_faces: int = 0
    errors: Counter = dataclasses.field(default_factory=Counter)
    dropped: int = 0  # faces found beyond --max-faces and left out, over all images
    review: int = 0  # rows flagged for review
    reasons: Counter = dataclasses.field(default_factory=Counter)  # flagged rows per review reason


def images_in(face) -> int:
    """The images among rows whose ``face`` column is ``face`` (an Arrow array): each image has exactly one row
    with face 0 (its first face) or null (no face found, or an error row)."""
    import pyarrow.compute as pc

    return face.null_count + (pc.sum(pc.equal(face, 0)).as_py() or 0)


def output_stats(labels_uri: str) -> OutputStats:
    """The :class:`OutputStats` of the Parquet under ``labels_uri``, streaming three columns."""
    import pyarrow.compute as pc

    st = OutputStats()
    ds = parquet_dataset(labels_uri)
    if ds is None:
        return st
    face_cols = "face" in ds.schema.names
    review_cols = ["review", "review_reasons"] if "review_reasons" in ds.schema.names else []
    review_cols += ["faces_dropped"] if "faces_dropped" in ds.schema.names else []
    for b in ds.to_batches(columns=(["error_kind", "face", "faces"] if face_cols else ["error_kind"]) + review_cols,
                           batch_size=1 << 16):
        st.rows += b.num_rows
        for item in pc.value_counts(b.column(0)).to_pylist():
            if item["values"] is not None:
                st.errors[item["values"]] += item["counts"]
        if face_cols:
            face = b.column(1)
            st.faces += len(face) - face.null_count
            st.images += images_in(face)
            st.without_faces += pc.sum(pc.equal(b.column(2), 0)).as_py() or 0
        else:
            st.images += b.num_rows
        if "faces_dropped" in review_cols:  # a per-image value: counted on each image's first row
            first = pc.or_kleene(pc.is_null(b.column("face")), pc.equal(b.column("face"), 0))
            st.dropped += pc.sum(pc.filter(b.column("faces_dropped"), pc.fill_null(first, True))).as_py() or 0
        if "review" in review_cols:
            st.review += pc.sum(b.column("review")).as_py() or 0
            for item in pc.value_counts(pc.list_flatten(b.column("review_reasons"))).to_pylist():
                st.reasons[item["values"]] += item["counts"]
    st.ok_images = st.images - sum(st.errors.values())
    return st


def _unique_paths(uri: str):
    import pyarrow.compute as pc

    ds = parquet_dataset(uri)
    return None if ds is None else pc.unique(ds.to_table(columns=["path"]).column("path"))


def unlabeled_inputs(inputs_uri: str, labels_uri: str) -> int:
    """How many paths of the input listing (Parquet with a ``path`` column) have no row under ``labels_uri``.
    Rows of files that are no longer inputs do not count (the summary's ``complete`` and the "not labeled yet"
    line are this, not a comparison of counts). The listing spells a file labeled earlier as its rows do
    (:func:`labeled_spellings`)."""
    import pyarrow.compute as pc

    wanted = _unique_paths(inputs_uri)
    if wanted is None:
        return 0
    have = _unique_paths(labels_uri)
    if have is None:
        return len(wanted)
    return len(wanted) - (pc.sum(pc.is_in(wanted, value_set=have)).as_py() or 0)


def all_labeled(inputs_uri: str, labels_uri: str) -> bool:
    """Whether every path of the input listing (Parquet with a ``path`` column) has a row under ``labels_uri``.
    A run that would label nothing stops here: on a cluster of 2 CPUs, Ray Data's checkpoint filter and the
    predictor actor take both, and the read of the listing would wait for a third (measured: a rerun of
    ``make demo`` hung)."""
    if _unique_paths(inputs_uri) is None or _unique_paths(labels_uri) is None:
        return False
    return unlabeled_inputs(inputs_uri, labels_uri) == 0


@functools.lru_cache(maxsize=4096)
def input_identity(path: str, base: str | None = None, real_folder=None) -> str:
    """The file an input path names, whatever its spelling: :func:`facedata.paths.normalize_path` (relative
    paths resolved against ``base``, ``./`` and ``file://`` dropped, S3 dot segments removed), and locally the
    folder it is in resolved (``os.path.realpath``, or ``real_folder``: :func:`labeled_spellings` passes one that
    resolves each folder once for a whole listing): a folder given through a symlink and the real folder
    name one file. The file's own name is not resolved: two symlinks in a folder to one image are two inputs,
    as the listing has them."""
    try:
        n = normalize_path(path, base)
    except (ValueError, OSError):
        return path
    if storage.is_s3(n):
        return n
    folder, name = os.path.split(n)
    return os.path.join((real_folder or resolved_path)(folder), name)


def _digest(identity: str) -> bytes:
    return hashlib.blake2b(identity.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def labeled_spellings(base: str | None, labels_uri: str):
    """A function that maps an input path to the spelling under which its file (:func:`input_identity`) is
    labeled already under ``labels_uri``, and any other path to itself; None when nothing is labeled. The
    listing of a resumed run is written through it (facedata/inputs.py ``respell``), so that Ray's checkpoint
    filter, which compares the ``path`` strings of the commit log, drops a file labeled before under another
    spelling (a manifest rewritten with absolute paths, a folder given through a symlink) instead of labeling
    it again. Paths not labeled yet keep their spelling: the ``path`` column stays what the input says.

    Memory in the driver: a 16-byte digest per labeled file whose spelling is its identity (absolute paths in
    a real folder, URIs), plus the spelling itself for the others (relative manifest rows, symlinked folders)."""
    ds = parquet_dataset(labels_uri)
    if ds is None:
        return None
    same: set[bytes] = set()
    other: dict[bytes, str] = {}
    # the files of a folder share its resolution: one realpath (an lstat per path component) per folder, not
    # per labeled file and per input, for this run's listing
    real_folder = functools.lru_cache(maxsize=1 << 16)(resolved_path)
    if "path" not in ds.schema.names:
        return None
    import pyarrow.compute as pc

    for b in ds.to_batches(columns=["path"], batch_size=1 << 16):
        for p in pc.unique(b.column(0)).to_pylist():
            if p is None:
                continue
            ident = input_identity(p, base, real_folder)
            d = _digest(ident)
            if ident == p:
                same.add(d)
            else:
                other.setdefault(d, p)
    if not same and not other:
        return None

    def respell(path: str) -> str:
        ident = input_identity(path, base, real_folder)
        d = _digest(ident)
        if d in other:
            return other[d]
        return ident if d in same else path

    return respell


def read_settings(settings_uri: str) -> dict | None:
    """``_settings.json`` of an output (what its rows were made with: ``review_thresholds``); None when there
    is none (an output written before it existed) or it is not a JSON object."""
    if not storage.exists(settings_uri):
        return None
    try:
        rec = json.loads(storage.read_bytes(settings_uri))
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def output_provenance(labels_uri: str) -> tuple[set, set]:
    """The distinct ``checkpoint`` hashes and ``detector`` values of every row under ``labels_uri`` (two
    dictionary-encoded columns, streamed): one output holds the rows of one checkpoint and one way of
    finding faces, and a resumed run checks every file, not only the first (a checkpoint object replaced
    during an earlier run would show here)."""
    import pyarrow.compute as pc

    checkpoints, detectors = set(), set()
    ds = parquet_dataset(labels_uri)
    if ds is None:
        return checkpoints, detectors
    has_detector = "detector" in ds.schema.names
    for b in ds.to_batches(columns=["checkpoint", "detector"] if has_detector else ["checkpoint"],
                           batch_size=1 << 16):
        checkpoints.update(pc.unique(b.column(0)).to_pylist())
        detectors.update(pc.unique(b.column(1)).to_pylist() if has_detector else ["whole"])
    return checkpoints, detectors
