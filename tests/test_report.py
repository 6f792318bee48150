"""The HTML report (core/report.py, jobs/report.py, jobs.evaluate --report): built from a label output of
composed photos labelled without Ray (core.annotator.Annotator), every section present by its element id,
the thumbnails those of flagged rows, photos read only where the run could read, bad input answered without a
traceback, and a headless Chromium screenshot when Chromium is installed. A model set's layout and 100,000 rows:
tests/test_report_scale.py."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import report as report_job
from tests.images import drawn_source
from tests.report_page import SECTIONS, Page, run_report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def label_output(tmp_path_factory):
    """OUT/labels/part-0.parquet and OUT/_summary.json of 5 composed photos (one blurred, one darkened, one
    without a face) and a file that is not an image, labelled by a random hard_sharing checkpoint; the
    photos lie under OUT/photos/ (their ``path``). Returns ``(OUT, rows)``."""
    from PIL import Image, ImageEnhance, ImageFilter

    import models
    from core.annotator import Annotator
    from facedata.compose import compose
    from models.checkpoint import save_checkpoint

    out = tmp_path_factory.mktemp("label_output")
    (out / "labels").mkdir()
    (out / "photos").mkdir()
    ckpt = str(out / "hs.pt")
    save_checkpoint(models.create_model("hard_sharing"), ckpt)
    sources = [drawn_source(i, stream=3)[0] for i in range(3)]
    items = []
    for k, (n_faces, edit) in enumerate([((2, 3), None), ((2, 3), "blur"), ((2, 2), "dark"), ((0, 0), None),
                                         ((2, 3), None)]):
        c = compose(sources, 10 + k, n_faces=n_faces, canvas=(480, 640), face_width=(80, 140), max_angle=10)
        im = Image.fromarray(c.image)
        if edit == "blur":
            im = im.filter(ImageFilter.GaussianBlur(5))
        elif edit == "dark":
            im = ImageEnhance.Brightness(im).enhance(0.2)
        path = out / "photos" / f"photo-{k}.jpg"
        im.save(path, quality=90)
        items.append((str(path), path.read_bytes()))
    (out / "photos" / "notes.jpg").write_bytes(b"not an image")
    items.append((str(out / "photos" / "notes.jpg"), b"not an image"))
    # a random model's probabilities sit near 0.5: low_confidence would flag every face, so it is off here
    ann = Annotator(ckpt, faces={"mode": "detect"}, review={"min_confidence": 0.0})
    rows = ann.annotate_bytes(items)
    pq.write_table(ann.to_table({n: [r[n] for r in rows] for n in ann.schema.names}), out / "labels" / "part-0.parquet")
    flagged = [r for r in rows if r["review"]]
    reasons: dict[str, int] = {}
    for r in flagged:
        for x in r["review_reasons"]:
            reasons[x] = reasons.get(x, 0) + 1
    (out / "_summary.json").write_text(json.dumps({
        "input": str(out / "photos"), "inputs": len(items), "images_total": len(items), "rows_total": len(rows), "complete": True,
        "faces_mode": "detect", "review_rows": len(flagged), "review_by_reason": reasons,
        "review_thresholds": ann.review.to_dict()}))
    assert 0 < len(flagged) < sum(r["face"] is not None for r in rows), "the fixture needs flagged and clean faces"
    return out, rows


def _key(path, face, reasons):
    return (str(path), "" if face is None else str(face), ",".join(reasons or []))


@pytest.fixture(scope="module")
def default_report(label_output, tmp_path_factory):
    """The report of :func:`label_output` with the default settings: ``(Page, info, html path)``."""
    out, _ = label_output
    html_path = tmp_path_factory.mktemp("report") / "report.html"
    info = report_job.main([str(out), "--html", str(html_path)])
    return Page(html_path.read_text(encoding="utf-8")), info, html_path


def test_report_has_every_section_and_thumbnails_of_the_flagged_rows(label_output, default_report):
    from PIL import Image

    _, rows = label_output
    page, info, _ = default_report
    assert SECTIONS <= set(page.ids) and "missing" not in page.ids, page.ids
    flagged = {_key(r["path"], r["face"], r["review_reasons"]) for r in rows if r["review"]}
    assert len(page.thumbs) == min(len(flagged), 300) == info["thumbnails"]
    assert {_key(t["path"], t["face"], t["reasons"].split(",")) for t in page.thumbs} == flagged
    for t in page.thumbs:  # each one a JPEG thumbnail cropped from its photo
        im = Image.open(io.BytesIO(base64.b64decode(t["src"].split(",", 1)[1])))
        assert im.format == "JPEG" and max(im.size) == 128
    # self-contained: every image is embedded, nothing is fetched, nothing runs
    assert page.srcs and all(s.startswith("data:image/") for s in page.srcs) and page.scripts == 0
    assert len(page.srcs) >= 8  # attributes, confidence, pose, quality, reasons, and the thumbnails
    assert info["faces"] == sum(r["face"] is not None for r in rows) and info["rows"] == len(rows)


def test_max_thumbnails_caps_the_contact_sheet_with_flagged_rows(label_output, tmp_path):
    out, rows = label_output
    flagged = {_key(r["path"], r["face"], r["review_reasons"]) for r in rows if r["review"]}
    page, _ = run_report(out, tmp_path, "--max-thumbnails", "2")
    assert len(page.thumbs) == 2
    assert {_key(t["path"], t["face"], t["reasons"].split(",")) for t in page.thumbs} <= flagged


def test_a_photo_gone_gives_a_placeholder_not_an_error(label_output, tmp_path):
    out, rows = label_output
    gone = tmp_path / "gone"
    (gone / "labels").mkdir(parents=True)
    t = pq.read_table(out / "labels" / "part-0.parquet")
    t = t.set_column(0, "path", pa.array([p.replace(str(out), str(tmp_path / "nowhere")) for p in
                                          t.column("path").to_pylist()]))
    pq.write_table(t, gone / "labels" / "part-0.parquet")
    page, _ = run_report(gone, tmp_path, "--allow-prefix", str(tmp_path))
    assert len(page.thumbs) == sum(bool(r["review"]) for r in rows) and all(t["src"] is None for t in page.thumbs)
    assert "file not found" in (tmp_path / "report.html").read_text()


def test_an_output_on_s3_with_photos_on_s3(label_output, s3_bucket):
    out, rows = label_output
    client, bucket = s3_bucket
    t = pq.read_table(out / "labels" / "part-0.parquet")
    paths = [p.replace(str(out), f"s3://{bucket}") for p in t.column("path").to_pylist()]
    for local, remote in set(zip(t.column("path").to_pylist(), paths)):
        client.put_object(Bucket=bucket, Key=remote.split("/", 3)[3], Body=Path(local).read_bytes())
    buf = io.BytesIO()
    pq.write_table(t.set_column(0, "path", pa.array(paths)), buf)
    client.put_object(Bucket=bucket, Key="out/labels/part-0.parquet", Body=buf.getvalue())
    client.put_object(Bucket=bucket, Key="out/_summary.json", Body=(out / "_summary.json").read_bytes())
    info = report_job.main([f"s3://{bucket}/out", "--allow-prefix", f"s3://{bucket}/photos/"])
    assert info["html"] == f"s3://{bucket}/out/_report.html" and info["missing"] == []
    page = Page(client.get_object(Bucket=bucket, Key="out/_report.html")["Body"].read().decode())
    assert len(page.thumbs) == sum(bool(r["review"]) for r in rows) and all(t["src"] for t in page.thumbs)
    assert all(t["path"].startswith(f"s3://{bucket}/photos/") for t in page.thumbs)


@pytest.mark.parametrize("case", ["no_folder", "no_labels", "empty_labels", "corrupt"])
def test_an_output_without_readable_labels_exits_2_with_a_message(case, tmp_path, capsys):
    out = tmp_path / "out"
    if case != "no_folder":
        out.mkdir()
    if case in ("empty_labels", "corrupt"):
        (out / "labels").mkdir()
    if case == "corrupt":
        (out / "labels" / "part-0.parquet").write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(SystemExit) as e:
        report_job.main([str(out), "--html", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error:" in err and "Traceback" not in err
    assert {"no_folder": "no such folder", "no_labels": "no labels/ folder", "empty_labels": "no Parquet file",
            "corrupt": "cannot read the labels"}[case] in err
    assert not (tmp_path / "r.html").exists()


def test_an_older_output_without_quality_columns_or_summary_says_what_is_missing(label_output, tmp_path):
    out, rows = label_output
    old = tmp_path / "old"
    (old / "labels").mkdir(parents=True)
    t = pq.read_table(out / "labels" / "part-0.parquet")
    keep = [c for c in t.column_names if c not in ("face_size", "pose_yaw", "pose_pitch", "pose_roll", "sharpness",
                                                   "brightness", "review", "review_reasons")]
    pq.write_table(t.select(keep), old / "labels" / "part-0.parquet")
    page, info = run_report(old, tmp_path)
    assert SECTIONS <= set(page.ids) and "missing" in page.ids and page.thumbs == []
    text = " ".join(page.missing_items)
    for what in ("_summary.json", "pose_yaw", "sharpness", "review_reasons", "older version"):
        assert what in text, (what, text)
    assert info["rows"] == len(rows)


def test_the_command_line_exits_2_without_a_traceback(tmp_path):
    (tmp_path / "out").mkdir()
    res = subprocess.run([sys.executable, "-m", "jobs.report", str(tmp_path / "out")], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "no labels/ folder" in res.stderr


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on PATH (apt-get install chromium): the report's "
                                                  "rendering in a browser is not checked here")
def test_the_report_renders_in_headless_chromium(default_report, tmp_path):
    from PIL import Image

    browser = _chromium()

    _, _, html_path = default_report
    shot = tmp_path / "report.png"
    res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--window-size=1280,4200", f"--screenshot={shot}", html_path.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert shot.exists(), res.stderr[-2000:]
    if os.environ.get("FACEATTR_REPORT_SCREENSHOT"):  # to look at it
        shutil.copy(shot, os.environ["FACEATTR_REPORT_SCREENSHOT"])
    px = np.asarray(Image.open(shot).convert("RGB"))
    assert px.shape[1] == 1280
    drawn = (px < 250).any(axis=2)  # not white
    rows_drawn = np.flatnonzero(drawn.any(axis=1))
    assert rows_drawn[-1] - rows_drawn[0] > 2000, "the page should be long: charts and thumbnails"
    assert drawn.mean() > 0.05 and len(np.unique(px.reshape(-1, 3)[::97], axis=0)) > 200


def test_evaluate_report_has_reliability_confusion_and_groups(tmp_path):
    import models
    from facedata.synth import generate
    from jobs import evaluate
    from models.checkpoint import save_checkpoint

    data = generate("utkface", 60, str(tmp_path / "utk"), seed=1)
    ckpt = str(tmp_path / "hs.pt")
    save_checkpoint(models.create_model("hard_sharing"), ckpt)
    html_path = tmp_path / "eval.html"
    evaluate.main(["--checkpoint", ckpt, "--data", f"utkface:{data}", "--split", "all", "--by", "gender,race",
                   "--bootstrap", "20", "--min-group", "5", "--report", str(html_path)])
    page = Page(html_path.read_text())
    assert {"metrics", "reliability", "confusion", "groups"} <= set(page.ids)
    assert len(page.srcs) == 4 and all(s.startswith("data:image/png") for s in page.srcs) and page.scripts == 0
    text = html_path.read_text()
    assert "by gender" in text and "by race" in text and "gender.accuracy" in text


def test_thumbnails_are_read_only_where_the_label_run_could_read(label_output, tmp_path):
    """A ``path`` in the Parquet is data: the contact sheet opens a photo only under the run's allowed prefix
    (its summary's ``allow_prefix`` or ``input``, or ``--allow-prefix``), never a file outside it."""
    out, rows = label_output
    outside = tmp_path / "private"
    outside.mkdir()
    moved = tmp_path / "moved"
    (moved / "labels").mkdir(parents=True)
    t = pq.read_table(out / "labels" / "part-0.parquet")
    photos = str(out / "photos")
    for p in {p for p in t.column("path").to_pylist()}:  # the same photos, now outside the run's input
        (outside / Path(p).name).write_bytes(Path(p).read_bytes())
    t = t.set_column(0, "path", pa.array([p.replace(photos, str(outside)) for p in t.column("path").to_pylist()]))
    pq.write_table(t, moved / "labels" / "part-0.parquet")
    summary = json.loads((out / "_summary.json").read_text())
    (moved / "_summary.json").write_text(json.dumps({**summary, "allow_prefix": [photos]}))
    n_flagged = sum(bool(r["review"]) for r in rows)
    page, _ = run_report(moved, tmp_path)
    assert len(page.thumbs) == n_flagged and all(t["src"] is None for t in page.thumbs)
    assert "forbidden" in (tmp_path / "report.html").read_text()
    page, _ = run_report(moved, tmp_path, "--allow-prefix", str(outside))  # the user says where they are
    assert len(page.thumbs) == n_flagged and all(t["src"] for t in page.thumbs)
    (moved / "_summary.json").unlink()  # no summary, no flag: nothing is read, and the report says why
    page, info = run_report(moved, tmp_path)
    assert all(t["src"] is None for t in page.thumbs) and any("no thumbnails" in m for m in info["missing"])
