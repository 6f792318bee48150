"""The report (core/report*.py, jobs/report.py) on a label output written by someone else: every value of the
Parquet and of _summary.json is escaped, a tampered summary does not decide which photos are read, odd values
give a report that says what it lacks (never a traceback), memory and the page do not grow with distinct
values, long paths or huge row groups, and known columns of the wrong type are named. Also the YAML loader's
and the model-set format's refusals found in the same audit. Each test failed on the code before its fix.
Outputs are written with pyarrow alone (no Ray, no model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import report as report_job

ROOT = Path(__file__).resolve().parents[1]
# one value that would end a tag or an attribute (either quote) if it were not escaped
PAYLOAD = "<script>alert(1)</script>\"><img src=x onerror=alert(2)>' onmouseover='alert(3)"


def rows(n: int = 3, **over) -> pa.Table:
    """``n`` flagged faces of a label output's known columns (core/rows.py), with ``over`` replacing or adding
    columns (None drops one)."""
    cols = {"path": pa.array([f"/nowhere/p{i}.jpg" for i in range(n)]), "ok": pa.array([True] * n),
            "error_kind": pa.nulls(n, pa.string()), "face": pa.array(range(n), pa.int32()),
            "faces": pa.array([n] * n, pa.int32()), "face_box": pa.array([[0, 0, 10, 10]] * n, pa.list_(pa.float32())),
            "sharpness": pa.array([10.0] * n, pa.float32()), "review": pa.array([True] * n),
            "review_reasons": pa.array([["blurry"]] * n, pa.list_(pa.string())), "gender": pa.array(["f"] * n),
            "gender_prob": pa.array([0.9] * n, pa.float32())}
    cols.update(over)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def output(tmp_path, table: pa.Table | list, summary=None, name: str = "out", **write) -> Path:
    """OUT/labels/part-K.parquet (one per table) and OUT/_summary.json (``summary``: a dict, or text)."""
    out = tmp_path / name
    (out / "labels").mkdir(parents=True)
    for k, t in enumerate(table if isinstance(table, list) else [table]):
        pq.write_table(t, out / "labels" / f"part-{k}.parquet", **write)
    if summary is not None:
        (out / "_summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    return out


def report(out: Path, *args) -> tuple[str, dict]:
    html_path = out.parent / f"{out.name}.html"
    info = report_job.main([str(out), "--html", str(html_path), *args])
    return html_path.read_text(encoding="utf-8"), info


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text of each section by id."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: dict[str, str] = {}
        self._sid = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "section":
            self._sid = dict(attrs).get("id")

    def handle_data(self, data):
        if self._sid:
            self.text[self._sid] = self.text.get(self._sid, "") + data

    def figures(self) -> list[dict]:
        return [a for t, a in self.tags if t == "figure"]


# --- 1: every value is escaped -----------------------------------------------------------------------------
def test_every_summary_value_and_string_column_is_escaped(tmp_path):
    n = 3
    member = pa.StructArray.from_arrays([pa.array([PAYLOAD] * n), pa.array([PAYLOAD] * n),
                                         pa.array([PAYLOAD] * n), pa.array([0.5] * n, pa.float32())],
                                        names=["model", "checkpoint", "gender", "gender_prob"])
    table = rows(n, path=pa.array([PAYLOAD + str(i) for i in range(n)]), ok=pa.array([False] * n),
                 error_kind=pa.array([PAYLOAD] * n), model=pa.array([PAYLOAD] * n),
                 checkpoint=pa.array([PAYLOAD] * n), detector=pa.array([PAYLOAD] * n),
                 gender=pa.array([PAYLOAD] * n), review_reasons=pa.array([[PAYLOAD, "low_confidence:" + PAYLOAD]] * n),
                 pose_yaw=pa.array([1.0] * n, pa.float32()), **{PAYLOAD: pa.array([PAYLOAD] * n)})
    table = table.append_column(PAYLOAD + "set", member)
    thresholds = {k: PAYLOAD for k in ("min_face_size", "min_sharpness", "min_brightness", "min_detection_score",
                                       "max_yaw", "max_pitch_up", "max_pitch_down", "min_confidence")}
    summary = {k: PAYLOAD for k in ("input", "inputs", "images_total", "rows_total", "complete", "faces_mode",
                                    "seconds", "images_per_s", "review_rows", "output", "labels")}
    summary.update({"allow_prefix": [PAYLOAD], "models": [{"name": PAYLOAD, "model": PAYLOAD, "checkpoint": PAYLOAD}],
                    "review_by_reason": {PAYLOAD: PAYLOAD, "blurry": PAYLOAD},
                    "review_thresholds": {**thresholds, "per_output": {PAYLOAD: PAYLOAD, "gender": PAYLOAD},
                                          PAYLOAD: {PAYLOAD: [PAYLOAD]}}})
    doc, info = report(output(tmp_path, table, summary))
    assert "<script" not in doc.lower() and "<img src=x" not in doc and "' onmouseover='" not in doc
    page = Tags(doc)
    assert not [(t, a) for t, a in page.tags if any(k.startswith("on") for k in a)]
    assert {t for t, _ in page.tags} <= {"html", "head", "meta", "title", "style", "body", "header", "h1", "p", "nav",
                                         "a", "section", "h2", "h3", "table", "tr", "th", "td", "img", "ul", "li",
                                         "div", "figure", "figcaption", "br", "span"}
    assert all(a.get("src", "").startswith("data:image/") for t, a in page.tags if t == "img")
    # the attribute values came through whole: escaped, not cut at a quote
    assert sorted(f["data-path"] for f in page.figures()) == [PAYLOAD + str(i) for i in range(n)]
    assert all(PAYLOAD in f["data-reasons"] for f in page.figures())
    assert PAYLOAD in page.text["overview"] and PAYLOAD in page.text["review"] and info["rows"] == n
    assert "could not be drawn" not in doc


# --- 2: a tampered summary does not decide which photos are read ----------------------------------------
@pytest.fixture
def secret(tmp_path) -> Path:
    """A photo outside any run's input: the report must not embed it on the summary's word."""
    from PIL import Image

    (tmp_path / "private").mkdir()
    Image.new("RGB", (200, 200), (255, 0, 0)).save(tmp_path / "private" / "secret.jpg")
    return tmp_path / "private" / "secret.jpg"


@pytest.mark.parametrize("case", ["allow_root", "input_root", "one_of_two_is_root", "system", "hidden",
                                  "relative", "link_to_root", "home"])
def test_a_tampered_summary_cannot_widen_where_photos_are_read(case, tmp_path, secret, monkeypatch):
    out = tmp_path / "out"
    (out / "photos").mkdir(parents=True)
    os.symlink("/", out / "root")
    (tmp_path / "home" / "me").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "me"))
    summary = {"allow_root": {"allow_prefix": ["/"]}, "input_root": {"input": "/"},
               "one_of_two_is_root": {"allow_prefix": [str(out / "photos"), "/"]},
               "system": {"allow_prefix": ["/etc/ssl"]}, "hidden": {"allow_prefix": [str(tmp_path / ".x" / "y")]},
               "relative": {"allow_prefix": ["private"]}, "link_to_root": {"allow_prefix": [str(out / "root")]},
               "home": {"allow_prefix": [str(tmp_path / "home")]}}[case]
    # the path names the secret through the prefix the summary gives, so that only the prefix check stands
    path = {"link_to_root": str(out / "root") + str(secret), "hidden": str(secret)}.get(case, str(secret))
    (out / "labels").mkdir()
    pq.write_table(rows(1, path=pa.array([path]), face_box=pa.array([None], pa.list_(pa.float32()))),
                   out / "labels" / "part-0.parquet")
    (out / "_summary.json").write_text(json.dumps(summary))
    doc, info = report(out)
    assert "data:image/jpeg" not in doc and info["photos"] == ""
    assert any(m.startswith("no thumbnails: the summary's") for m in info["missing"]), info["missing"]


def test_a_reasonable_summary_prefix_is_used_and_said_and_allow_prefix_replaces_it(tmp_path, secret, capsys):
    table = rows(1, path=pa.array([str(secret)]), face_box=pa.array([None], pa.list_(pa.float32())))
    out = output(tmp_path, table, {"input": str(secret.parent)})
    doc, info = report(out)
    assert "data:image/jpeg" in doc and str(secret.parent) in info["photos"] and "summary's input" in info["photos"]
    assert str(secret.parent) in Tags(doc).text["overview"] and "note: photos read only under" in capsys.readouterr().err
    doc, info = report(out, "--allow-prefix", str(tmp_path / "elsewhere"))
    assert "data:image/jpeg" not in doc and "forbidden" in doc and "--allow-prefix" in info["photos"]


# --- 3: odd values give a report that says what it lacks --------------------------------------------------
CASES = {  # columns of one row (three for the numbers) and the summary (None: the photo's folder as input)
    "face_box_inf": (dict(face_box=pa.array([[0, 0, float("inf"), 10]], pa.list_(pa.float32()))), None),
    "face_box_huge": (dict(face_box=pa.array([[-1e308, 0, 1e308, 10]], pa.list_(pa.float64()))), None),
    "number_1e308": (dict(score=pa.array([1e308])), None),
    "numbers_pm_1e308": (dict(score=pa.array([1e308, -1e308, 0.0])), None),
    "null_reason": (dict(review_reasons=pa.array([["blurry", None]], pa.list_(pa.string()))), {}),
    "null_reason_thresholds": (dict(review_reasons=pa.array([["blurry", None]], pa.list_(pa.string()))),
                               {"review_thresholds": {"min_sharpness": 20}}),
    "models_int": ({}, {"models": 5}),
    "threshold_401_digits": (dict(pose_yaw=pa.array([1.0], pa.float32())),
                             '{"review_thresholds": {"min_sharpness": 1' + "0" * 400 + ', "max_yaw": 1'
                             + "0" * 400 + ', "min_confidence": true}}'),
    "mathtext_class": (dict(gender=pa.array(["$\\frac{$"])), None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_odd_values_give_a_report_not_a_traceback(case, tmp_path, secret):
    over, summary = CASES[case]
    n = len(next(iter(over.values()))) if over else 1
    table = rows(n, path=pa.array([str(secret)] * n), **over)
    doc, info = report(output(tmp_path, table, summary if summary is not None else {"input": str(secret.parent)}))
    page = Tags(doc)
    assert {"overview", "attributes", "review", "flagged"} <= set(page.text) and info["rows"] == len(table)
    assert "could not be drawn" not in doc  # each fixed at its place, not only caught
    if case.startswith("face_box"):
        assert "is not four numbers of photo pixels" in page.text["flagged"]
    if case.startswith("number"):
        assert sum(1 for t, a in page.tags if t == "img" and a.get("src", "").startswith("data:image/png")) >= 3


def test_a_section_that_fails_says_why_and_the_others_are_written(tmp_path, monkeypatch):
    from core import report_charts

    def broken(*a, **k):
        raise RuntimeError("a chart that breaks")

    monkeypatch.setattr(report_charts, "shares_png", broken)
    doc, _ = report(output(tmp_path, rows(3, smiling=pa.array([True, False, True])), {}))
    page = Tags(doc)
    assert "this section could not be drawn: RuntimeError: a chart that breaks" in page.text["attributes"]
    assert "could not be drawn" not in page.text["review"] + page.text["quality"] + page.text["overview"]


# --- 4: memory and the page do not grow with distinct values, long paths or big row groups --------------
def test_counters_keep_at_most_max_distinct_values_cut_short(tmp_path):
    import pyarrow.dataset as pads

    from core.report_scan import MAX_DISTINCT, plan, scan

    n = MAX_DISTINCT + 700
    out = output(tmp_path, rows(n, note=pa.array([f"{i}-" + "x" * 5000 for i in range(n)])), {},
                 row_group_size=500)
    ds = pads.dataset(out / "labels", format="parquet")
    s = scan(ds, plan(ds.schema), 10)
    assert len(s.counts["note"]) == MAX_DISTINCT and s.counts["note"].other == 700
    assert sum(s.counts["note"].values()) + s.counts["note"].other == n
    assert max(len(k.encode()) for k in s.counts["note"]) <= 210 and len(s.flagged) == 10


def test_tables_list_the_largest_kinds_and_reasons_and_at_most_ten_models(tmp_path):
    n = 600
    table = rows(n, ok=pa.array([False] * n), error_kind=pa.array([f"kind-{i}" for i in range(n)]),
                 model=pa.array([f"model-{i % 30}" for i in range(n)]),
                 review_reasons=pa.array([[f"reason-{i}"] for i in range(n)]))
    doc, _ = report(output(tmp_path, table, {}, row_group_size=n))
    page = Tags(doc)
    assert page.text["overview"].count("error: kind-") == 50 and "(550 more kinds)" in page.text["overview"]
    assert page.text["overview"].count("model-") == 10
    assert page.text["review"].count("reason-") == 50 and "(550 more reasons)" in page.text["review"]
    assert len(doc) < 400_000


def test_long_paths_are_shortened_on_the_page_and_their_rows_named(tmp_path):
    n, long = 20, "/p/" + "A" * 200_000
    doc, info = report(output(tmp_path, rows(n, path=pa.array([f"{long}{i}.jpg" for i in range(n)])), {}))
    figures = Tags(doc).figures()
    assert len(figures) == n == info["thumbnails"] and len(doc) < 400_000
    assert all(len(f["data-path"]) < 4200 and f["data-row"].startswith("part-0.parquet row ") for f in figures)
    assert sorted(int(f["data-row"].rsplit(" ", 1)[1]) for f in figures) == list(range(n))
    assert doc.count("longer than any file") == n


def test_a_row_group_over_the_limits_is_refused_by_name(tmp_path, monkeypatch, capsys):
    from core import report_read

    out = output(tmp_path, rows(2000, path=pa.array([f"/p/{i:08d}.jpg" for i in range(2000)])), {})
    monkeypatch.setattr(report_read, "MAX_ROW_GROUP_BYTES", 20_000)
    with pytest.raises(SystemExit) as e:
        report(out)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "part-0.parquet: row group 0 holds" in err and "Traceback" not in err
    monkeypatch.setattr(report_read, "MAX_ROW_GROUP_BYTES", 1 << 30)
    monkeypatch.setattr(report_read, "MAX_LIST_VALUES", 100)
    out = output(tmp_path, rows(1, face_box=pa.array([[1.0] * 1000], pa.list_(pa.float32()))), {}, name="lists")
    with pytest.raises(SystemExit):
        report(out)
    assert "column face_box.list.element: 1000 list items" in capsys.readouterr().err


PEAK = """
import resource, sys
from core.report import label_report
label_report(sys.argv[2], max_thumbnails=0)  # every import and lazy load done
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
label_report(sys.argv[1], max_thumbnails=0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_one_big_row_group_of_a_repeated_long_path_is_read_in_bounded_memory(tmp_path):
    """200,000 rows of one 2 KB path in one row group: a 50 KB file, 400 MB of strings decoded whole (the
    dataset scanner before the fix: +1.1 GB for 600,000 rows). Read a batch at a time as a dictionary."""
    n = 200_000
    path = pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int32()), pa.array(["/p/" + "x" * 2000]))
    big = output(tmp_path, pa.table({"path": path, "face": pa.array([0] * n, pa.int32()),
                                     "review": pa.array([False] * n),
                                     "review_reasons": pa.array([[]] * n, pa.list_(pa.string()))}), {}, name="big",
                 store_schema=False)  # no Arrow schema kept: a reader sees a plain string column
    small = output(tmp_path, rows(3), {}, name="small")
    # through a shell that forks it: Linux keeps a process's maxrss across exec (tests/test_report_scale.py)
    res = subprocess.run(["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, "-c", PEAK, str(big), str(small)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    grew = int(res.stdout.split()[-1])
    print(f"peak RSS growth {grew} MB")
    assert grew < 150, grew


# --- 6: known columns of the wrong type are named, not an Arrow kernel's message -------------------------
@pytest.mark.parametrize("column,value,words", [
    ("face", pa.array(["a", "b", "c"]), "column face is string, not an integer"),
    ("review", pa.array([1, 0, 1]), "column review is int64, not a bool"),
    ("review_reasons", pa.array(["blurry"] * 3), "column review_reasons is string, not a list of strings"),
    ("review_reasons", pa.array([[1]] * 3, pa.list_(pa.int64())), "not a list of strings"),
    ("sharpness", pa.array(["x"] * 3), "column sharpness is string, not a number"),
])
def test_a_known_column_of_the_wrong_type_is_named_as_unreadable(column, value, words, tmp_path):
    doc, info = report(output(tmp_path, rows(3, **{column: value}), {}))
    assert any(m.startswith("column " + column) and words in m for m in info["missing"]), info["missing"]
    assert "kernel" not in doc and info["rows"] == 3


def test_a_column_of_another_type_in_a_later_file_reads_as_empty_there(tmp_path):
    files = [rows(3), rows(2, sharpness=pa.array(["sharp", "blurry"]), face=None)]
    doc, info = report(output(tmp_path, files, {}))
    assert info["rows"] == 5 and info["faces"] == 3
    assert any("part-1.parquet: column sharpness is string: read as empty" in m for m in info["missing"])


# --- 5 and 7: YAML values the safe constructors refuse; a model set's format ---------------------------
@pytest.mark.parametrize("text,line", [("a: 1\nversion: 2001-13-45\n", 2), ("version: " + "1" * 5000, 1),
                                       ("x: [1]\nversion: " + "1:" * 3000 + "1\n", 2)])
def test_a_value_the_safe_loader_cannot_build_is_a_yaml_error(text, line, tmp_path):
    from core.modelset import ModelSetError, read_set_file
    from facedata.yamlsafe import YamlError, load_yaml

    with pytest.raises(YamlError) as e:
        load_yaml(text)
    assert str(e.value).startswith(f"line {line}: a value that cannot be read") and len(str(e.value)) < 300
    (tmp_path / "set.yaml").write_text("models: {a: x.pt}\n" + text.replace("x: [1]\n", "").replace("a: 1\n", ""))
    with pytest.raises(ModelSetError, match="set.yaml is not YAML or JSON"):
        read_set_file(str(tmp_path / "set.yaml"))


def test_a_model_set_with_format_true_is_refused(tmp_path):
    from core.modelset import ModelSetError, read_set_file

    (tmp_path / "set.yaml").write_text("format: true\nmodels: {a: x.pt}\n")
    with pytest.raises(ModelSetError, match="format True"):
        read_set_file(str(tmp_path / "set.yaml"))
    (tmp_path / "set.yaml").write_text("format: 1\nmodels: {a: x.pt}\n")
    assert read_set_file(str(tmp_path / "set.yaml")).members[0][0] == "a"
