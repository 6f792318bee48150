"""The label job's fixes from the audit of 2026-12 (one test or more per finding), without Ray: a run killed
mid-write resumes (the driver removes uncommitted files by Ray Data's rule before it reads ``labels/``), CSV
manifests with malformed lines, a BOM or a header that is not exactly ``path``, binary Parquet paths,
``file://`` manifests, the actor's CPU decode fallback, ``--throttle`` below 0, and the folder listing's
sniff confined to ``--allow-prefix``."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facedata import inputs, paths, reading
from raytasks.label.spec import LabelError, LabelSpec

JPEG_HEAD = b"\xff\xd8\xff\xe0" + b"\x00" * 60  # a JPEG signature: what the listing's sniff looks for


def _listed(listing_dir) -> list[str]:
    return [p for f in sorted(os.listdir(listing_dir)) for p in pq.read_table(os.path.join(listing_dir, f))
            .column("path").to_pylist()]


# --------------------------------------------------------------------------------------------------------
# 1. a run killed during a Parquet write resumes
# --------------------------------------------------------------------------------------------------------

def _rows(names: list[str]) -> pa.Table:
    """Label rows as output_stats and output_provenance read them (--faces whole: one row per image)."""
    n = len(names)
    return pa.table({"path": names, "ok": [True] * n, "error_kind": pa.array([None] * n, pa.string()),
                     "checkpoint": ["sha256:x"] * n, "detector": ["whole"] * n})


def _killed_output(root) -> dict:
    """An output as Ray Data's two-phase commit leaves it when a run is killed (names as Ray gives them:
    ``{write_uuid}_{task:06}`` for the commit file, ``{write_uuid}_{task:06}_{block:06}.parquet`` for data)."""
    from raytasks.label.output import output_paths

    out = output_paths(str(root))
    os.makedirs(out["labels"])
    os.makedirs(out["commits"])
    L, C = out["labels"], out["commits"]

    def commit_file(name, ids):
        pq.write_table(pa.table({"path": ids}), os.path.join(C, name))

    # committed: data and commit file
    pq.write_table(_rows(["a", "b"]), os.path.join(L, "w1_000000_000000.parquet"))
    commit_file("w1_000000.parquet", ["a", "b"])
    # an S3 commit killed between its copy and its delete: both commit files, the data complete and kept
    pq.write_table(_rows(["d"]), os.path.join(L, "w1_000003_000000.parquet"))
    commit_file("w1_000003.parquet", ["d"])
    commit_file("w1_000003.pending.parquet", ["d"])
    # killed after its data was written, before the commit: complete files, never committed
    pq.write_table(_rows(["c"]), os.path.join(L, "w2_000001_000000.parquet"))
    pq.write_table(_rows(["e"]), os.path.join(L, "w2_000001_000001.parquet"))
    commit_file("w2_000001.pending.parquet", ["c", "e"])
    # killed during the write: the data file cut short (pyarrow cannot read it)
    pq.write_table(_rows(["f", "g"]), os.path.join(L, "w2_000002_000000.parquet"))
    with open(os.path.join(L, "w2_000002_000000.parquet"), "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    open(os.path.join(L, "w2_000004_000000.parquet"), "wb").close()  # a 0-byte one
    commit_file("w2_000002.pending.parquet", ["f", "g"])
    commit_file("w2_000004.pending.parquet", ["h"])
    return out


def _files(folder) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}


def test_a_run_killed_mid_write_resumes_and_counts_only_committed_rows(tmp_path):
    from raytasks.label.job import recover_output
    from raytasks.label.output import all_labeled, output_provenance, output_stats

    out = _killed_output(tmp_path / "out")
    with pytest.raises(pa.ArrowInvalid, match="magic bytes|size is 0"):  # what the job crashed on
        output_stats(out["labels"])
    said = []
    recover_output(out, said.append)
    assert _files(out["labels"]) == {"w1_000000_000000.parquet", "w1_000003_000000.parquet"}
    assert _files(out["commits"]) == {"w1_000000.parquet", "w1_000003.parquet"}
    assert said == ["repaired 1 commit file(s) left by an interrupted commit",
                    "removed 4 data file(s) of 3 write(s) that a killed run never committed: "
                    "their images are labeled again"]
    # the job's "before": only committed rows, so after - before is what the resumed run wrote
    before = output_stats(out["labels"])
    assert (before.rows, before.images) == (3, 3)
    assert output_provenance(out["labels"]) == ({"sha256:x"}, {"whole"})
    pq.write_table(pa.table({"path": list("abcdefgh")}), tmp_path / "inputs.parquet")
    assert not all_labeled(str(tmp_path / "inputs.parquet"), out["labels"])
    # the resumed pipeline writes the uncommitted images again, once (their paths are not in the commit log)
    pq.write_table(_rows(list("cefgh")), os.path.join(out["labels"], "w3_000000_000000.parquet"))
    after = output_stats(out["labels"])
    assert (after.images - before.images, after.rows - before.rows) == (5, 5)
    assert sorted(pq.read_table(out["labels"]).column("path").to_pylist()) == list("abcdefgh")  # none twice
    recover_output(out, said.append)  # nothing left to do
    assert len(said) == 2


def test_the_driver_cleanup_matches_ray_datas_own(tmp_path):
    """The same folder cleaned by Ray Data's function (called in this process, no Ray started) and by ours:
    the same files remain. Fails when a Ray upgrade changes the rule or the names of the pending files."""
    import pyarrow.fs as pafs
    from ray.data.checkpoint.checkpoint_filter import _clean_pending_checkpoints_task
    from ray.data.checkpoint.checkpoint_writer import PENDING_CHECKPOINT_SUFFIX

    from raytasks.label.output import PENDING_SUFFIX, clean_uncommitted, repair_commit_log

    assert PENDING_SUFFIX == PENDING_CHECKPOINT_SUFFIX + ".parquet"
    ours = _killed_output(tmp_path / "ours")
    shutil.copytree(tmp_path / "ours", tmp_path / "ray")
    from raytasks.label.output import output_paths

    theirs = output_paths(str(tmp_path / "ray"))
    for out in (ours, theirs):
        assert repair_commit_log(out["commits"]) == 1
    assert clean_uncommitted(ours["commits"], ours["labels"]) == (3, 4)
    fs = pafs.LocalFileSystem()
    assert _clean_pending_checkpoints_task._function(theirs["commits"], fs, theirs["labels"], fs) == 3
    assert _files(tmp_path / "ours") == _files(tmp_path / "ray")


def test_a_file_no_commit_names_is_a_clear_error(tmp_path):
    from raytasks.label.job import _read_output, recover_output
    from raytasks.label.output import output_stats

    out = _killed_output(tmp_path / "out")
    recover_output(out, lambda line: None)
    with open(os.path.join(out["labels"], "copied-by-hand.parquet"), "wb") as f:
        f.write(b"not parquet")
    with pytest.raises(LabelError, match="not a complete Parquet file .* move it out"):
        _read_output(output_stats, out)


# --------------------------------------------------------------------------------------------------------
# 2-4. CSV manifests: malformed lines, a BOM, a header that is not exactly "path"
# --------------------------------------------------------------------------------------------------------

def test_malformed_csv_lines_are_skipped_and_reported(tmp_path):
    m = tmp_path / "m.csv"
    m.write_bytes(b"path,label\na.jpg,1\nb.jpg,2,extra\nc.jpg\nd\xe9.jpg,4,x\ne.jpg,5\n")
    stats = inputs.write_manifest_listing(str(m), str(tmp_path / "listing"), str(tmp_path))
    assert _listed(tmp_path / "listing") == ["a.jpg", "e.jpg"]
    assert (stats.files, stats.inputs, stats.malformed_lines) == (2, 2, 3)
    # a line that is not UTF-8 is skipped too (pyarrow cannot hand its text to the handler as it is)
    assert stats.malformed_examples == [
        {"line": 3, "fields": 3, "expected": 2, "text": "b.jpg,2,extra"},
        {"line": 4, "fields": 1, "expected": 2, "text": "c.jpg"},
        {"line": 5, "fields": 3, "expected": 2, "text": "d\\xe9.jpg,4,x"}]
    assert stats.malformed_text().startswith("3 manifest lines skipped, malformed (line 3: 3 fields, expected 2: ")
    many = tmp_path / "many.csv"
    many.write_text("path,label\n" + "".join(f"x{i}.jpg,{i},extra\n" for i in range(8)) + "ok.jpg,1\n")
    stats = inputs.write_manifest_listing(str(many), str(tmp_path / "l2"), str(tmp_path))
    assert stats.malformed_lines == 8 and len(stats.malformed_examples) == inputs.MALFORMED_SHOWN
    assert stats.malformed_text().endswith("; ...)") and stats.inputs == 1


def test_a_csv_manifest_that_cannot_be_read_is_an_input_error(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(inputs.InputError, match="is not a CSV file"):
        inputs.check_manifest(str(empty))
    with pytest.raises(inputs.InputError, match="cannot be read as CSV"):
        inputs.manifest_rows(str(empty))
    huge = tmp_path / "huge.csv"  # a value over pyarrow's block size: its own ArrowInvalid
    huge.write_bytes(b'path\n"' + b"x" * (3 << 20) + b'"\n')
    with pytest.raises(inputs.InputError, match="cannot be read as CSV"):
        inputs.write_manifest_listing(str(huge), str(tmp_path / "l"), str(tmp_path))


def test_a_csv_manifest_with_a_bom_is_read(tmp_path):
    for name, header in (("bom.csv", b"path"), ("bomq.csv", b'"path",label')):
        m = tmp_path / name
        m.write_bytes(b"\xef\xbb\xbf" + header + b"\na.jpg" + (b",1" if b"," in header else b"") + b"\n")
        inputs.check_manifest(str(m))
        stats = inputs.write_manifest_listing(str(m), str(tmp_path / f"l-{name}"), str(tmp_path))
        assert stats.inputs == 1 and _listed(tmp_path / f"l-{name}") == ["a.jpg"]


def test_the_header_check_and_the_reader_agree_on_the_path_column(tmp_path):
    m = tmp_path / "m.csv"
    m.write_bytes(b"path ,label\na.jpg,1\n")
    with pytest.raises(inputs.InputError, match=r"no 'path' column \(columns: 'path ', 'label'\)"):
        inputs.check_manifest(str(m))
    with pytest.raises(inputs.InputError, match="no 'path' column"):  # the reader alone says the same
        inputs.write_manifest_listing(str(m), str(tmp_path / "l"), str(tmp_path))
    quoted = tmp_path / "q.csv"  # a quoted header is the CSV's own quoting: the column is "path"
    quoted.write_bytes(b'"path","label"\n"a,b.jpg",1\n')
    inputs.check_manifest(str(quoted))
    assert inputs.write_manifest_listing(str(quoted), str(tmp_path / "lq"), str(tmp_path)).inputs == 1
    assert _listed(tmp_path / "lq") == ["a,b.jpg"]


# --------------------------------------------------------------------------------------------------------
# 5. a Parquet manifest with a binary path column
# --------------------------------------------------------------------------------------------------------

def test_binary_parquet_paths_are_kept_with_escapes(tmp_path):
    values = [b"a.jpg", b"b\xff.jpg", b"a.jpg"]
    for name, col in (("bin", pa.array(values, pa.binary())), ("large", pa.array(values, pa.large_binary())),
                      ("dict", pa.array(values, pa.binary()).dictionary_encode())):
        m = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"path": col}), m)
        inputs.check_manifest(str(m))
        stats = inputs.write_manifest_listing(str(m), str(tmp_path / f"l-{name}"), str(tmp_path))
        assert _listed(tmp_path / f"l-{name}") == ["a.jpg", "b\\xff.jpg"] and stats.duplicates == 1
        assert inputs.manifest_rows(str(m)) == 3
    nested = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"path": pa.array([["a.jpg"]])}), nested)
    with pytest.raises(inputs.InputError, match="'path' column is list"):
        inputs.write_manifest_listing(str(nested), str(tmp_path / "ln"), str(tmp_path))


# --------------------------------------------------------------------------------------------------------
# 6. a manifest given as file:///...
# --------------------------------------------------------------------------------------------------------

def test_a_file_uri_manifest_resolves_relative_rows_inside_its_folder(tmp_path):
    from raytasks.label.job import manifest_base

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"JPEG")
    (folder / "m.csv").write_text("path\na.jpg\n")
    uri = f"file://{folder}/m.csv"
    base = manifest_base(uri)
    assert base == str(folder) == manifest_base(str(folder / "m.csv"))
    allow = (paths.default_allow_prefix(uri),)
    inputs.write_manifest_listing(uri, str(tmp_path / "l"), base)
    (row,) = _listed(tmp_path / "l")
    assert reading.fetch_all([paths.resolve_path(row, base)], allow=allow) == [(b"JPEG", None, None)]


# --------------------------------------------------------------------------------------------------------
# 7. the actor's CPU decode fallback
# --------------------------------------------------------------------------------------------------------

def test_a_decoder_bug_in_the_actor_is_an_error_row(monkeypatch):
    import torch

    import models.preprocess
    from models.imagebytes import ImageDecodeError
    from raytasks.label.gpu_decode import photos_on_device

    def decode_photo(data, max_side):
        if data == b"bug":
            raise ZeroDivisionError("a decoder bug")
        if data == b"cut":
            raise ImageDecodeError("truncated", "image file is truncated")
        return torch.zeros(3, 4, 5, dtype=torch.uint8), (5, 4), 1.0

    monkeypatch.setattr(models.preprocess, "decode_photo", decode_photo)
    n = 3
    batch = {"path": ["bug", "cut", "ok"], "ok": np.zeros(n, bool), "width": np.zeros(n, np.int32),
             "height": np.zeros(n, np.int32), "scale": np.ones(n), "error_kind": [None] * n,
             "error_message": [None] * n, "image": [None] * n}
    out = photos_on_device(batch, [b"bug", b"cut", b"ok"], 2048, "cpu", torch_decode=False)
    assert list(out["ok"]) == [False, False, True]
    assert out["error_kind"] == ["decode_error", "truncated", None]
    assert out["error_message"][0] == "ZeroDivisionError: a decoder bug"
    assert tuple(out["image"][2].shape) == (4, 5, 3) and (out["width"][2], out["height"][2]) == (5, 4)


# --------------------------------------------------------------------------------------------------------
# 8. --throttle below 0
# --------------------------------------------------------------------------------------------------------

def test_a_negative_throttle_is_refused_before_anything_runs(tmp_path, capsys):
    from jobs.label import build_parser

    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--checkpoint", "c.pt", "--input", str(tmp_path), "--output",
                                       str(tmp_path / "o"), "--throttle", bad])
        assert "--throttle" in capsys.readouterr().err
    assert build_parser().parse_args(["--checkpoint", "c.pt", "--input", "i", "--output", "o",
                                      "--throttle", "0"]).throttle == 0.0
    for bad in (-1.0, float("nan")):
        with pytest.raises(LabelError, match="--throttle must be a number of seconds >= 0"):
            LabelSpec("c.pt", str(tmp_path), str(tmp_path / "o"), throttle_s=bad).validate()
    LabelSpec("c.pt", str(tmp_path), str(tmp_path / "o"), throttle_s=0.5).validate()


def test_a_checkpoint_that_is_not_there_or_not_one_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    """The checkpoints are read and hashed, and ``--input`` is found to be a folder or a manifest, before Ray
    starts: a mistyped path or a file that is not a checkpoint is one ``error:`` line and status 2 at once
    (before, the job started Ray first, about 8 s here)."""
    import ray

    from jobs.label import main

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", no_ray)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(2048))
    for ckpt, said in ((str(tmp_path / "nope.pt"), f"error: checkpoint not found: {tmp_path / 'nope.pt'}"),
                       (str(bad), f"error: {bad} is not a loadable checkpoint")):
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", ckpt, "--input", str(tmp_path), "--output", str(tmp_path / "out")])
        assert e.value.code == 2
        assert capsys.readouterr().err.startswith(said)
    with pytest.raises(SystemExit) as e:  # an --input that is neither a folder nor a manifest: the same
        main(["--checkpoint", str(bad), "--input", str(tmp_path / "photos"), "--output", str(tmp_path / "out")])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: --input {tmp_path / 'photos'} is neither a folder/prefix")
    assert not (tmp_path / "out").exists()  # nothing written: no lease, no listing


# --------------------------------------------------------------------------------------------------------
# 9. the folder listing's sniff is confined to --allow-prefix
# --------------------------------------------------------------------------------------------------------

def test_the_listing_does_not_open_a_symlink_out_of_the_folder(tmp_path, monkeypatch):
    folder, outside = tmp_path / "photos", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("not for this job")
    (folder / "link_out").symlink_to(outside / "secret.txt")  # no image extension: would be sniffed
    (folder / "IMG_0001.JPG.bak").write_bytes(JPEG_HEAD)  # sniffed: an image
    (folder / "link_in").symlink_to(folder / "IMG_0001.JPG.bak")  # inside: sniffed as well
    (folder / "notes.txt").write_text("text")
    opened = []
    real_open = os.open

    def spy(path, *args, **kwargs):
        opened.append(os.path.realpath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    allow = (paths.default_allow_prefix(str(folder)),)
    stats = inputs.write_listing(str(folder), str(tmp_path / "listing"), allow=allow)
    monkeypatch.setattr(os, "open", real_open)
    assert not [p for p in opened if p.startswith(str(outside))]
    listed = sorted(os.path.basename(p) for p in _listed(tmp_path / "listing"))
    # the link out is an input, as it would be with an image extension; its row is then "forbidden"
    assert listed == ["IMG_0001.JPG.bak", "link_in", "link_out"] and stats.skipped_not_image == 1
    res = reading.fetch_all([str(folder / "link_out")], allow=allow)
    assert res == [(None, *paths.FORBIDDEN)]
