"""What the label job leaves in its output folder, and what it reads back from it when it resumes.

Split from raytasks/label/job.py (the pipeline): the layout (``labels/``, ``_checkpoint/`` (Ray Data's commit log), ``_inputs/``,
``_summary.json``), the repair of an interrupted S3 commit, the removal of the files of writes that never
committed, the counts of rows, images and faces, and the provenance every row carries (checkpoint hash, detector).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections import Counter

import pyarrow.fs as pafs

import storage

LABELS_DIR = "labels"
COMMIT_LOG_DIR = "_checkpoint"  # Ray Data's row-level checkpoint: the commit log of written paths
INPUTS_DIR = "_inputs"
SUMMARY_FILE = "_summary.json"
# Ray Data's name for a commit file written before its data files and renamed once they are complete
# (ray.data.checkpoint.checkpoint_writer: f"{checkpoint_id}{PENDING_CHECKPOINT_SUFFIX}.parquet")
PENDING_SUFFIX = ".pending.parquet"


def output_paths(output: str) -> dict[str, str]:
    return {k: storage.join(output, v) for k, v in
            (("labels", LABELS_DIR), ("commits", COMMIT_LOG_DIR), ("inputs", INPUTS_DIR),
             ("summary", SUMMARY_FILE))}


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


def output_stats(labels_uri: str) -> OutputStats:
    """The :class:`OutputStats` of the Parquet under ``labels_uri``, streaming three columns."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, root = storage.filesystem(labels_uri)
    st = OutputStats()
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return st
    ds = pads.dataset(root, filesystem=fs, format="parquet")
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
            st.images += face.null_count + (pc.sum(pc.equal(face, 0)).as_py() or 0)
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


def all_labeled(inputs_uri: str, labels_uri: str) -> bool:
    """Whether every path of the input listing (Parquet with a ``path`` column) has a row under ``labels_uri``.
    A run that would label nothing stops here: on a cluster of 2 CPUs, Ray Data's checkpoint filter and the
    predictor actor take both, and the read of the listing would wait for a third (measured: a rerun of
    ``make demo`` hung)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    def paths(uri: str):
        fs, root = storage.filesystem(uri)
        if fs.get_file_info(root).type == pafs.FileType.NotFound:
            return None
        return pc.unique(pads.dataset(root, filesystem=fs, format="parquet").to_table(columns=["path"]).column("path"))

    wanted, have = paths(inputs_uri), paths(labels_uri)
    if wanted is None or have is None:
        return False
    return bool(pc.all(pc.is_in(wanted, value_set=have)).as_py())


def output_provenance(labels_uri: str) -> tuple[set, set]:
    """The distinct ``checkpoint`` hashes and ``detector`` values of every row under ``labels_uri`` (two
    dictionary-encoded columns, streamed): one output holds the rows of one checkpoint and one way of
    finding faces, and a resumed run checks every file, not only the first (a checkpoint object replaced
    during an earlier run would show here)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, root = storage.filesystem(labels_uri)
    ds = pads.dataset(root, filesystem=fs, format="parquet")
    has_detector = "detector" in ds.schema.names
    checkpoints, detectors = set(), set()
    for b in ds.to_batches(columns=["checkpoint", "detector"] if has_detector else ["checkpoint"],
                           batch_size=1 << 16):
        checkpoints.update(pc.unique(b.column(0)).to_pylist())
        detectors.update(pc.unique(b.column(1)).to_pylist() if has_detector else ["whole"])
    return checkpoints, detectors
