"""The HTML report (core/report.py, jobs/report.py, jobs.evaluate --report): built from a label output of
composed photos labelled without Ray (core.annotator.Annotator), every section present by its element id,
the thumbnails those of flagged rows, bounded memory for 100,000 rows, bad input answered without a
traceback, and a headless Chromium screenshot when Chromium is installed."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import report as report_job

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"overview", "attributes", "confidence", "pose", "quality", "review", "flagged"}
MEMORY_BOUND_MB = 250  # peak RSS growth allowed from 1,000 to 100,000 rows (reading them whole: about 390 MB)


class Page(HTMLParser):
    """Section ids, thumbnails (their data-* attributes and image), every image source, and scripts."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: list[str] = []
        self.thumbs: list[dict] = []
        self.srcs: list[str] = []
        self.scripts = 0
        self.missing_items: list[str] = []
        self._in_missing = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.ids.append(a.get("id"))
            self._in_missing = a.get("id") == "missing"
        if tag == "figure" and "thumb" in (a.get("class") or ""):
            self.thumbs.append({"path": a["data-path"], "face": a["data-face"], "reasons": a["data-reasons"],
                                "src": None})
        if tag == "img":
            self.srcs.append(a.get("src", ""))
            if self.thumbs and self.thumbs[-1]["src"] is None and a.get("src", "").startswith("data:image/jpeg"):
                self.thumbs[-1]["src"] = a["src"]
        if tag == "script":
            self.scripts += 1

    def handle_data(self, data):
        if self._in_missing and data.strip():
            self.missing_items.append(data.strip())

    def handle_endtag(self, tag):
        if tag == "section":
            self._in_missing = False


def _drawn_sources():
    from facedata.compose import FaceSource
    from facedata.draw import draw_face

    sources = []
    for i in range(3):
        img, lab = draw_face(np.random.default_rng([3, i]), (178, 218))
        pts = np.asarray(lab["landmarks"], dtype=np.float64).reshape(5, 2)
        iod = float(np.linalg.norm(pts[1] - pts[0]))
        box = [pts[:, 0].min() - 0.9 * iod, pts[:, 1].min() - iod, pts[:, 0].max() + 0.9 * iod,
               pts[:, 1].max() + 0.8 * iod]
        sources.append(FaceSource(np.asarray(img), box, pts))
    return sources


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
    sources = _drawn_sources()
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


def _run(out, tmp_path, *args) -> tuple[Page, dict]:
    html_path = tmp_path / "report.html"
    info = report_job.main([str(out), "--html", str(html_path), *args])
    return Page(html_path.read_text(encoding="utf-8")), info


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
    page, _ = _run(out, tmp_path, "--max-thumbnails", "2")
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
    page, _ = _run(gone, tmp_path, "--allow-prefix", str(tmp_path))
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


def lists(values: np.ndarray, width: int) -> pa.Array:
    """(k, width) numbers -> a list<float32> column."""
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1).astype(np.float32)), width).cast(
        pa.list_(pa.float32()))


def synthetic_output(out, n: int, photos: list[str], drop: tuple[str, ...] = (), chunk: int = 50_000) -> None:
    """A label output of ``n`` rows with a model set's layout (an ``agr`` struct: age, gender, race; a
    ``celeba`` struct: the 40 CelebA attributes and landmarks; the 128-D embedding), made with pyarrow alone,
    every row a face of one of ``photos`` at a fixed box; ``drop``: columns left out (an older version)."""
    from core.rows import FACE_FIELDS, IMAGE_FIELDS, QUALITY_FIELDS
    from facedata.datasets import CELEBA_ATTRIBUTES

    rng = np.random.default_rng(0)
    races = ["White", "Black", "Asian", "Indian", "Others"]
    reason_sets = [[]] * 6 + [["blurry"], ["dark", "low_confidence:agr.gender"], ["small_face"],
                              ["extreme_pose", "low_detection_score"]]
    os.makedirs(os.path.join(out, "labels"), exist_ok=True)
    for part, start in enumerate(range(0, n, chunk)):
        k = min(chunk, n - start)

        def f32(lo, hi, size=None, k=k):
            return rng.uniform(lo, hi, size or k).astype(np.float32)

        probs = rng.dirichlet(np.ones(5), k).astype(np.float32)
        g = f32(0.5, 1.0)
        agr = pa.StructArray.from_arrays(
            [pa.array(["age_gender_race"] * k), pa.array(["sha256:0"] * k), pa.array(f32(1, 90)),
             pa.array(rng.integers(1, 90, k).astype(np.int16)), pa.array(rng.choice(["male", "female"], k)),
             pa.array(g), lists(np.stack([g, 1 - g], 1), 2), pa.array(np.array(races)[probs.argmax(1)]),
             pa.array(probs.max(1)), lists(probs, 5)],
            names=["model", "checkpoint", "age", "age_mode", "gender", "gender_prob", "gender_probs", "race",
                   "race_prob", "race_probs"])
        attr_p = f32(0, 1, (k, len(CELEBA_ATTRIBUTES)))
        celeba = pa.StructArray.from_arrays(
            [pa.array(["dmm_cnn"] * k), pa.array(["sha256:1"] * k)]
            + [a for j in range(len(CELEBA_ATTRIBUTES)) for a in (pa.array(attr_p[:, j] > 0.5), pa.array(attr_p[:, j]))]
            + [lists(f32(0, 400, (k, 10)), 10)],
            names=["model", "checkpoint"] + [x for a in CELEBA_ATTRIBUTES for x in (a, f"{a}_prob")] + ["landmarks"])
        reasons = [reason_sets[i] for i in rng.integers(0, len(reason_sets), k)]
        face = np.arange(start, start + k) % 4
        cols = {
            "path": pa.array([photos[i % len(photos)] for i in range(start, start + k)]),
            "ok": pa.array(np.ones(k, bool)), "error_kind": pa.nulls(k, pa.string()),
            "error_message": pa.nulls(k, pa.string()), "width": pa.array(np.full(k, 640, np.int32)),
            "height": pa.array(np.full(k, 480, np.int32)), "model": pa.array(["set"] * k),
            "checkpoint": pa.array(["set-sha256:0"] * k), "detector": pa.array(["retinaface"] * k),
            "faces": pa.array(np.full(k, 4, np.int32)), "faces_dropped": pa.array(np.zeros(k, np.int32)), "face": pa.array(face.astype(np.int32)),
            "face_score": pa.array(f32(0.7, 1)), "face_box": lists(np.tile(np.float32([40, 40, 160, 180]), (k, 1)), 4),
            "face_points": lists(f32(40, 160, (k, 10)), 10), "face_size": pa.array(f32(8, 120)),
            "pose_yaw": pa.array(f32(-60, 60)), "pose_pitch": pa.array(f32(-40, 50)),
            "pose_roll": pa.array(f32(-30, 30)), "sharpness": pa.array(f32(0, 100)),
            "brightness": pa.array(f32(0, 100)), "review": pa.array([bool(r) for r in reasons]),
            "review_reasons": pa.array(reasons, pa.list_(pa.string())), "agr": agr, "celeba": celeba,
            "embedding": lists(f32(-1, 1, (k, 128)), 128), "embedding_model": pa.array(["dlib"] * k)}
        names = [f.name for f in IMAGE_FIELDS + FACE_FIELDS + QUALITY_FIELDS] + ["agr", "celeba", "embedding",
                                                                                  "embedding_model"]
        table = pa.table({c: cols[c] for c in names if c not in drop})
        pq.write_table(table, os.path.join(out, "labels", f"part-{part}.parquet"), row_group_size=10_000)


def test_a_model_set_output_gets_every_members_charts(label_output, tmp_path):
    out, _ = label_output
    photos = [str(p) for p in sorted((out / "photos").glob("photo-*.jpg"))]
    synthetic_output(tmp_path / "set", 2000, photos)
    page, info = _run(tmp_path / "set", tmp_path, "--max-thumbnails", "40", "--allow-prefix", str(out / "photos"))
    text = (tmp_path / "report.html").read_text()
    assert SECTIONS <= set(page.ids) and len(page.thumbs) == 40 and all(t["src"] for t in page.thumbs)
    assert "agr (a model of the set)" in text and "celeba (a model of the set)" in text
    assert "low_confidence:agr.gender" in text and info["rows"] == 2000


PEAK_SCRIPT = """
import json, resource, sys
from jobs import report
allow = ["--allow-prefix", sys.argv[4]]
small = report.main([sys.argv[1], "--html", sys.argv[3] + ".small.html", *allow])  # every import and lazy load done
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
big = report.main([sys.argv[2], "--html", sys.argv[3], *allow])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_mb": before / 1024, "peak_mb": peak / 1024, "small": small, "big": big}))
"""


@pytest.mark.slow  # over ~5 s of CPU: in the full suite, not the quick tier
def test_100000_rows_stay_within_bounded_memory(label_output, tmp_path):
    """Peak RSS growth of one process reporting 100,000 rows after reporting 1,000 rows of the same layout (a
    model set: 40 attributes, landmarks, embeddings; 100 MB uncompressed in Arrow), which loads every import
    and draws the same charts and 300 thumbnails. Reading the 100,000 rows whole instead
    (pyarrow.parquet.read_table) adds about 390 MB: the bound is below that and well above the measured
    growth (about 100 MB, mostly the allocator's pools filling once, then flat: 300,000 rows add about 50 MB
    more)."""
    out, _ = label_output
    photos = [str(p) for p in sorted((out / "photos").glob("photo-*.jpg"))]
    synthetic_output(tmp_path / "small", 1_000, photos)
    synthetic_output(tmp_path / "big", 100_000, photos)
    # Started by a shell that forks it ("; exit": not exec'd in place): Linux keeps a process's maxrss across
    # exec, so a child spawned straight from this test process (vfork + exec) would report this process's own
    # peak (detector and model loaded) as its own.
    res = subprocess.run(["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, "-c", PEAK_SCRIPT,
                          str(tmp_path / "small"), str(tmp_path / "big"), str(tmp_path / "big.html"), str(out / "photos")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    growth = m["peak_mb"] - m["before_mb"]
    print(f"peak RSS {m['before_mb']:.0f} MB after 1,000 rows, {m['peak_mb']:.0f} MB after 100,000 rows: "
          f"+{growth:.0f} MB")
    assert m["big"]["rows"] == 100_000 and m["big"]["thumbnails"] == 300 and m["small"]["rows"] == 1_000
    assert growth < MEMORY_BOUND_MB, m


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
    page, info = _run(old, tmp_path)
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
    page, _ = _run(moved, tmp_path)
    assert len(page.thumbs) == n_flagged and all(t["src"] is None for t in page.thumbs)
    assert "forbidden" in (tmp_path / "report.html").read_text()
    page, _ = _run(moved, tmp_path, "--allow-prefix", str(outside))  # the user says where they are
    assert len(page.thumbs) == n_flagged and all(t["src"] for t in page.thumbs)
    (moved / "_summary.json").unlink()  # no summary, no flag: nothing is read, and the report says why
    page, info = _run(moved, tmp_path)
    assert all(t["src"] is None for t in page.thumbs) and any("no thumbnails" in m for m in info["missing"])
