"""Resume edges of the label job (audit of the resume, commit log and lease): a write that passed its fence
before its run stalled and was taken over (finding 1), inputs matched by file, not spelling (2), ``complete``
judged by paths (3), and the review thresholds of an output (4). In-process where possible; one small Ray run."""

from __future__ import annotations

import dataclasses
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facedata import inputs
from raytasks import label as L
from raytasks.label.lease import Lease, LeaseLost
from raytasks.label.output import PENDING_SUFFIX, all_labeled, labeled_spellings, unlabeled_inputs
from tests.helpers import read_rows
from tests.images import face_jpeg


def _rows(folder, name: str, paths: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"path": pa.array(paths, pa.string())}), str(folder / name))


def _listed(listing) -> list[str]:
    return sorted(pq.read_table(str(listing)).column("path").to_pylist())


# 1 ------------------------------------------------------------------------------------------------------
def test_a_write_whose_run_was_taken_over_deletes_its_files_instead_of_committing(tmp_path):
    """The write task's data file is written, then the lease is checked again before Ray's commit: the run
    was taken over meanwhile, so the task removes its data and pending files and fails (no duplicate rows, no
    data file that no commit names). A write of the holder commits as before."""
    import pyarrow.fs as pafs
    from ray.data._internal.execution.interfaces.task_context import TaskContext
    from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME

    from raytasks.label.stages import fenced_parquet_sink

    out, labels, commits = tmp_path / "out", tmp_path / "out" / "labels", tmp_path / "out" / "_checkpoint"
    commits.mkdir(parents=True)
    fs = pafs.LocalFileSystem()
    a = Lease(str(out), ttl_s=0.5, renew=False).acquire()
    sink = fenced_parquet_sink(str(labels), fs, 1, 10, "d", a.fence(), fs, str(commits))
    block = pa.table({"path": ["x.jpg", "y.jpg"]})

    def write(task_idx: int, fence_sink) -> str:
        ctx = TaskContext(task_idx=task_idx, op_name="Write", kwargs={WRITE_UUID_KWARG_NAME: "w"})
        prefix = os.path.splitext(fence_sink.filename_provider.get_filename_for_task("w", task_idx))[0]
        (commits / (prefix + PENDING_SUFFIX)).write_bytes(b"pending")  # as Ray's prepare step leaves it
        fence_sink.write([block], ctx)
        return prefix

    write(0, sink)  # the holder: its file stays for Ray's commit
    assert len(list(labels.iterdir())) == 1 and len(list(commits.iterdir())) == 1
    time.sleep(0.6)
    b = Lease(str(out), ttl_s=30.0, renew=False).acquire()  # A stalled past its ttl: B takes over
    assert b.takeover_grace_s() == pytest.approx(0.5)  # B waits A's ttl before recovering the output
    with pytest.raises(LeaseLost):
        write(1, sink)
    assert len(list(labels.iterdir())) == 1 and len(list(commits.iterdir())) == 1  # task 1's files are gone
    b.release()
    assert Lease(str(out), ttl_s=30.0, renew=False).acquire().takeover_grace_s() == 0  # released: no wait


# 2 ------------------------------------------------------------------------------------------------------
def test_a_manifest_respelled_with_absolute_paths_resumes_by_file(tmp_path):
    """Rows of ``face_0.jpg`` (a relative manifest row); the manifest rewritten with absolute paths lists the
    labeled files under their labeled spelling (so Ray's filter drops them) and the new ones as written."""
    folder = tmp_path / "set"
    folder.mkdir()
    _rows(tmp_path / "labels", "a.parquet", ["face_0.jpg", "face_0.jpg", "./face_1.jpg"])  # two faces of face_0
    (folder / "list.csv").write_text("path\n" + "".join(f"{folder}/face_{i}.jpg\n" for i in range(4)))
    respell = labeled_spellings(str(folder), str(tmp_path / "labels"))
    stats = inputs.write_manifest_listing(str(folder / "list.csv"), str(tmp_path / "listing"), str(folder),
                                          respell=respell)
    assert stats.inputs == 4
    assert _listed(tmp_path / "listing") == sorted(["face_0.jpg", "./face_1.jpg", f"{folder}/face_2.jpg",
                                                    f"{folder}/face_3.jpg"])
    assert unlabeled_inputs(str(tmp_path / "listing"), str(tmp_path / "labels")) == 2


def test_a_folder_given_through_a_symlink_resumes_by_file(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    for i in range(3):
        (real / f"f{i}.jpg").write_bytes(b"x")
    (tmp_path / "link").symlink_to(real)
    _rows(tmp_path / "labels", "a.parquet", [str(real / "f0.jpg"), str(real / "f1.jpg")])
    respell = labeled_spellings(None, str(tmp_path / "labels"))
    inputs.write_listing(str(tmp_path / "link"), str(tmp_path / "listing"), respell=respell)
    assert _listed(tmp_path / "listing") == sorted([str(real / "f0.jpg"), str(real / "f1.jpg"), str(tmp_path / "link/f2.jpg")])
    inputs.write_listing(str(tmp_path / "link"), str(tmp_path / "fresh"))  # a fresh run keeps the spelling
    assert _listed(tmp_path / "fresh") == [str(tmp_path / f"link/f{i}.jpg") for i in range(3)]


# 3 ------------------------------------------------------------------------------------------------------
def test_complete_is_judged_by_paths_not_counts(tmp_path):
    """Two labeled files removed from the input and two added, one of them labeled: as many rows as inputs,
    but one input has none."""
    _rows(tmp_path / "labels", "a.parquet", ["/d/a.jpg", "/d/b.jpg", "/d/gone1.jpg", "/d/gone2.jpg", "/d/new1.jpg"])
    _rows(tmp_path / "listing", "part-000000.parquet", ["/d/a.jpg", "/d/b.jpg", "/d/new1.jpg", "/d/new2.jpg"])
    assert unlabeled_inputs(str(tmp_path / "listing"), str(tmp_path / "labels")) == 1
    assert not all_labeled(str(tmp_path / "listing"), str(tmp_path / "labels"))


# 4 (and 2, 3 end to end) ----------------------------------------------------------------------------------
def test_a_resume_with_other_review_thresholds_is_refused(tmp_path, ray_session, hs_checkpoint):
    real = tmp_path / "photos"
    real.mkdir()
    for i in range(4):
        (real / f"f{i}.jpg").write_bytes(face_jpeg(200 + i))
    (tmp_path / "link").symlink_to(real)
    spec = L.LabelSpec(checkpoint=hs_checkpoint, input=str(real), output=str(tmp_path / "out"), faces={"mode": "whole"},
                       precision="fp32", batch_size=2, max_actors=1, limit=2)
    first = L.label(spec, echo=lambda *_: None)
    assert (first["images_total"], first["complete"], first["inputs_unlabeled"]) == (2, False, 2)
    with pytest.raises(L.LabelError, match="min_confidence.*use the same --review"):
        L.label(dataclasses.replace(spec, limit=None, review={"min_confidence": 0.0}), echo=lambda *_: None)
    # the same thresholds, the folder through a symlink: the two labeled files are not labeled again
    second = L.label(dataclasses.replace(spec, limit=None, input=str(tmp_path / "link"),
                                         allow_prefix=(str(tmp_path / "link"),)), echo=lambda *_: None)
    assert (second["images_total"], second["images_written"], second["complete"]) == (4, 2, True)
    paths = read_rows(spec.output).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 4
