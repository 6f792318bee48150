"""The label report (core/report*.py, jobs/report.py) on outputs an audit found it mishandled (/tmp/audit_rep,
findings 4, 5 and 7-12): a lone surrogate in the summary, a relative ``input`` in it, a file cut short by an
interrupted run, ``--seed -1``, an output of no rows, an int64 past 2**53, a flat ``agr.age`` column beside the
struct ``agr``, and a summary of more than 50 models. Each gives a report that says what it left out, or one
line and exit status 2, never a traceback; each test failed on the code before its fix. Outputs are written
with pyarrow alone (no Ray, no model)."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_report_hostile import output, report, rows  # the same fake outputs


def section(doc: str, sid: str) -> str:
    """The text of section ``sid`` (tags and embedded images removed)."""
    body = re.search(rf'<section id="{sid}">(.*?)</section>', doc, re.S).group(1)
    return re.sub(r"<[^>]+>", " ", re.sub(r'src="data:[^"]*"', "", body))


# --- 4: a lone surrogate in the summary ---------------------------------------------------------------------
def test_a_lone_surrogate_in_the_summary_gives_a_report(tmp_path):
    summary = '{"input": "/data/photos-\\ud800", "inputs": "\\udcff", "models": [{"name": "m\\ud83d"}]}'
    doc, info = report(output(tmp_path, rows(2), summary), "--max-thumbnails", "0")
    assert info["rows"] == 2
    text = section(doc, "overview")
    assert "\\udcff" in text and "m\\ud83d" in text  # shown as its escape, not dropped


def test_the_command_line_with_a_surrogate_summary_exits_0_without_a_traceback(tmp_path):
    import os
    import subprocess
    import sys

    out = output(tmp_path, rows(2), '{"inputs": "\\ud800"}')
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "jobs.report", str(out), "--max-thumbnails", "0"], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(root)}, cwd=root, timeout=120)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "\\ud800" in (out / "_report.html").read_text(encoding="utf-8")


# --- 5: a relative input in the summary ---------------------------------------------------------------------
@pytest.mark.parametrize("inp", ["Private", ".", "file:Private"])
def test_a_relative_input_in_the_summary_reads_no_photo_where_the_report_runs(tmp_path, monkeypatch, inp):
    from PIL import Image

    here = tmp_path / "where_the_report_runs"
    (here / "Private").mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 50, 50)).save(here / "Private" / "passport.jpg")
    monkeypatch.chdir(here)
    out = output(tmp_path, rows(1, path=pa.array([str(here / "Private" / "passport.jpg")])), {"input": inp})
    doc, info = report(out)
    assert 'src="data:image/jpeg' not in doc and info["photos"] == ""
    assert any(f"the summary's input {inp!r} is not an absolute path" in m for m in info["missing"]), info["missing"]
    # the same photo under an absolute input is read, as before
    out = output(tmp_path, rows(1, path=pa.array([str(here / "Private" / "passport.jpg")])),
                 {"input": str(here / "Private")}, name="absolute")
    doc, info = report(out)
    assert 'src="data:image/jpeg' in doc and str(here / "Private") in info["photos"]


# --- 7: a file cut short by an interrupted run ---------------------------------------------------------------
@pytest.mark.parametrize("cut", ["half", "empty", "first"])
def test_a_truncated_file_is_left_out_and_named_and_the_rest_reported(tmp_path, cut):
    out = output(tmp_path, [rows(50), rows(40)], {})
    bad = out / "labels" / "part-1.parquet"
    data = bad.read_bytes()
    if cut == "first":  # listed before the good one: the dataset read its footer for the schema and failed
        bad.unlink()
        bad = out / "labels" / "a-part.parquet"
    bad.write_bytes(data[: len(data) // 2] if cut != "empty" else b"")
    doc, info = report(out, "--max-thumbnails", "0")
    assert info["rows"] == 50
    named = [m for m in info["missing"] if m.startswith(f"{bad.name} could not be read")]
    assert len(named) == 1 and "left out of every count" in named[0] and "label command again" in named[0]
    assert bad.name in section(doc, "missing")


def test_a_file_that_fails_part_way_keeps_the_rows_read_before(tmp_path):
    n = 2000
    out = output(tmp_path, rows(n, path=pa.array([f"/p/{i}.jpg" for i in range(n)])), {}, row_group_size=1000,
                 compression="snappy")
    f = out / "labels" / "part-0.parquet"
    c = pq.ParquetFile(f).metadata.row_group(1).column(0)
    start = c.dictionary_page_offset or c.data_page_offset
    data = bytearray(f.read_bytes())
    data[start:start + 40] = b"\xff" * 40  # the second row group's first page header
    f.write_bytes(bytes(data))
    _, info = report(out, "--max-thumbnails", "0")
    assert info["rows"] == 1000
    assert any(m.startswith("part-0.parquet could not be read") and "its rows from 1000 on are left out" in m
               for m in info["missing"]), info["missing"]


def test_an_output_of_which_no_file_can_be_read_exits_2_naming_one(tmp_path, capsys):
    out = output(tmp_path, [rows(5)], {})
    (out / "labels" / "part-0.parquet").write_bytes(b"PAR1 cut")
    (out / "labels" / "part-1.parquet").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        report(out)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "none of its 2 Parquet file(s) can be read (part-0.parquet: " in err


# --- 8: a negative --seed ------------------------------------------------------------------------------------
def test_a_negative_seed_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        report(output(tmp_path, rows(2), {}), "--seed", "-1")
    err = capsys.readouterr().err
    # the shared argparse type (jobs/_cli.py non_negative), as train's --patience and evaluate's --bootstrap
    assert e.value.code == 2 and "argument --seed: must be >= 0, got -1" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        report(output(tmp_path / "b", rows(2), {}), "--seed", "1.5")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --seed: must be a whole number >= 0, got '1.5'" in err


# --- 9: an output of no rows ---------------------------------------------------------------------------------
def test_an_output_of_no_rows_says_so_in_place_of_each_chart(tmp_path):
    t = rows(3, age=pa.array([30.0] * 3, pa.float32()), pose_yaw=pa.array([1.0] * 3, pa.float32()),
             smiling=pa.array([True] * 3)).slice(0, 0)
    doc, info = report(output(tmp_path, t, {}))
    assert info["rows"] == 0 and "could not be drawn" not in doc
    for sid in ("attributes", "confidence", "pose", "quality"):
        assert "no rows to draw" in section(doc, sid), sid
    assert "no row is flagged" in section(doc, "review")


# --- 10: an int64 past 2**53 -------------------------------------------------------------------------------
def test_an_int64_column_past_2_to_the_53_is_drawn(tmp_path):
    doc, info = report(output(tmp_path, rows(3, pixels=pa.array([1, 2, 2 ** 60], pa.int64())), {}))
    assert info["rows"] == 3 and "could not be drawn" not in doc
    assert 'alt="histograms of pixels"' in doc


# --- 11: a flat dotted column beside a struct's field ---------------------------------------------------------
def test_a_flat_dotted_column_beside_a_struct_field_is_named_not_counted_twice(tmp_path):
    import pyarrow.dataset as pads

    from core.report_scan import plan, scan

    n = 5
    agr = pa.StructArray.from_arrays([pa.array(["age_gender_race"] * n), pa.array([30.0] * n, pa.float32())],
                                     names=["model", "age"])
    t = rows(n, **{"agr.age": pa.array([70.0, 71, 72, 73, 74], pa.float32())}).append_column("agr", agr)
    out = output(tmp_path, t, {})
    ds = pads.dataset(out / "labels", format="parquet")
    p = plan(ds.schema)
    s = scan(ds, p, 0)
    assert s.hists["agr.age"].n == n and s.hists["agr.age"].mean == 30.0
    assert [k for m in p.members for k in m.numeric].count("agr.age") == 1
    assert any("agr.age" in m and "not" in m for m in p.missing), p.missing
    _, info = report(out, "--max-thumbnails", "0")
    assert any(m.startswith("flat column(s) whose name holds a dot agr.age") for m in info["missing"])


# --- 12: the summary's models past the table ------------------------------------------------------------------
def test_the_summarys_models_past_fifty_are_summed_in_one_row(tmp_path):
    models = [{"name": f"m{i:02d}", "model": "hard_sharing", "checkpoint": "sha256:0"} for i in range(60)]
    doc, _ = report(output(tmp_path, rows(2), {"models": models}), "--max-thumbnails", "0")
    text = section(doc, "overview")
    assert text.count("summary: model") == 51 and "(10 more models)" in text
    assert "m49" in text and "m50" not in text
