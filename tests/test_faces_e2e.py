"""Photos with several faces through the product: one row per face, the same rows from the predictor, the
label job (Parquet, resumable) and the serving endpoint, an image without a face kept as one row."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import models
from core.predictor import Predictor
from facedata.synth import draw_face, encode_jpeg
from faces.finder import FaceFinder
from models.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def real_crops(n: int) -> list[Image.Image]:
    """Real aligned faces from ../shared/data when present (UTKFace chips), else drawn faces."""
    paths = sorted((SHARED / "utkface").glob("*.jpg"))[:n] if SHARED.is_dir() else []
    if paths:
        return [Image.open(p).convert("RGB") for p in paths]
    return [draw_face(np.random.default_rng([11, i]), (178, 218))[0] for i in range(n)]


def compose(crops: list[Image.Image], places: list[tuple[int, int, int]], size=(1200, 800), seed=0) -> bytes:
    """Paste each crop scaled to ``width`` at ``(x, y)`` on a textured background -> JPEG bytes."""
    rng = np.random.default_rng(seed)
    small = rng.integers(60, 200, (size[1] // 40 + 1, size[0] // 40 + 1, 3), dtype=np.uint8)
    canvas = Image.fromarray(small).resize(size, Image.BICUBIC)
    for crop, (x, y, width) in zip(crops, places):
        h = round(crop.height * width / crop.width)
        canvas.paste(crop.resize((width, h), Image.BILINEAR), (x, y))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


PLACES = {  # photo -> where its faces are pasted (x, y, width), 0 to 3 faces
    "none.jpg": [],
    "one.jpg": [(500, 250, 260)],
    "three.jpg": [(60, 80, 180), (480, 300, 240), (900, 120, 150)],
}


def photos() -> dict[str, bytes]:
    crops = real_crops(4)
    out = {}
    for i, (name, places) in enumerate(PLACES.items()):
        out[name] = compose(crops[i % 2: i % 2 + len(places)], places, seed=i)
    out["broken.jpg"] = b"\xff\xd8\xff\xe0 not really a jpeg"
    return out


def inside(box, place, crop_aspect=1.0) -> bool:
    x, y, w = place
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return x <= cx <= x + w and y <= cy <= y + w * 1.3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ckpt") / "hard_sharing.pt")
    save_checkpoint(models.create_model("hard_sharing"), path)
    return path


@pytest.fixture(scope="module")
def finder() -> FaceFinder:
    return FaceFinder()


def test_predictor_gives_one_row_per_face(ckpt, finder):
    pred = Predictor(ckpt, device="cpu", precision="fp32", threads=2)
    items = photos()
    rows = pred.predict_bytes(list(items.items()), finder=finder)
    by_path: dict[str, list[dict]] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    assert [r["path"] for r in rows] == [p for p in items for _ in by_path[p]]  # image order kept
    for name, places in PLACES.items():
        got = by_path[name]
        assert all(r["ok"] and r["faces"] == len(places) and r["detector"] == finder.identity for r in got)
        if not places:  # the image is still accounted for: one row, no face, no attributes
            assert len(got) == 1 and got[0]["face"] is None and got[0]["gender"] is None
            continue
        assert [r["face"] for r in got] == list(range(len(places)))
        scores = [r["face_score"] for r in got]
        assert scores == sorted(scores, reverse=True) and min(scores) >= finder.detector.config.threshold
        for place in places:  # every pasted face found once
            assert sum(inside(r["face_box"], place) for r in got) == 1, (name, place, [r["face_box"] for r in got])
        for r in got:
            assert r["gender"] in ("male", "female") and 0.0 <= r["gender_prob"] <= 1.0
            assert len(r["face_points"]) == 10 and len(r["face_box"]) == 4
            x1, y1, x2, y2 = r["face_box"]
            assert 0 <= x1 < x2 <= 1200 and 0 <= y1 < y2 <= 800
    (broken,) = by_path["broken.jpg"]
    assert not broken["ok"] and broken["error_kind"] in ("truncated", "decode_error", "not_image")
    assert broken["faces"] is None and broken["face"] is None


def test_a_face_in_a_photo_reads_like_its_crop(ckpt, finder):
    """The aligned face of a pasted crop gives the model nearly the input it gets from the crop alone."""
    import torch

    from faces.align import align
    from models.preprocess import decode_photo

    crop = real_crops(1)[0]
    photo = compose([crop], [(300, 200, crop.width)], size=(900, 700))  # pasted at its own size
    img, _, _ = decode_photo(photo)
    alone, _, _ = decode_photo(encode_jpeg(crop))
    f_photo = finder.find([img])[0]
    f_alone = finder.find([alone])[0]
    assert len(f_photo) == 1 and len(f_alone) == 1
    size = float(f_alone.boxes[0, 2] - f_alone.boxes[0, 0])  # the points agree within 3 % of the face's size
    assert torch.allclose(f_photo.points[0] - torch.tensor([300.0, 200.0]), f_alone.points[0], atol=0.03 * size)
    # A model trained on such crops has their points as its template (faces/templates.py): the face aligned
    # out of the photo is then the crop itself, as the model saw it in training.
    from models.preprocess import Preprocessing, decode

    h, w = crop.height, crop.width
    pre = Preprocessing(size=(64, 64), template_crop=(h, w),
                        template=tuple((x * 64 / w, y * 64 / h) for x, y in f_alone.points[0].tolist()))
    aligned, _ = align(img, f_photo.points, pre)
    whole, _ = decode(encode_jpeg(crop), pre)
    diff = (aligned[0].float() - whole.float()).abs().mean()
    other, _ = decode(encode_jpeg(real_crops(2)[1]), pre)  # another face, for scale
    # detection's few-pixel jitter and a second JPEG pass are all that separates them
    assert diff < 15.0 and diff < 0.4 * (other.float() - whole.float()).abs().mean(), diff


@pytest.mark.ray
def test_label_job_rows_per_face_survive_a_kill(tmp_path, ckpt, ray_session):
    """Kill the label job after its first committed file, run it again: every face of every image once,
    the no-face image once, the broken file once, and the rows equal the predictor's."""
    import pyarrow.parquet as pq

    items = photos()
    # more images than one batch so that the first commit comes before the end
    many = {f"{i:02d}_{name}": data for i in range(4) for name, data in items.items()}
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in many.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "out"
    argv = ["--checkpoint", ckpt, "--input", str(folder), "--output", str(out), "--batch-size", "2",
            "--max-rows-per-file", "4", "--precision", "fp32", "--max-actors", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.label", *argv, "--throttle", "1.0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list((out / "_checkpoint").glob("*.parquet")):
            time.sleep(0.2)
        assert list((out / "_checkpoint").glob("*.parquet")), "no commit before the deadline"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = pq.read_table(out / "labels").to_pandas() if (out / "labels").exists() else pd.DataFrame()
    assert 0 < len(partial) < sum(max(1, len(p)) for p in PLACES.values()) * 4 + 4, "not killed midway"
    time.sleep(2)  # let Ray reap the killed job's workers

    from jobs.label import main

    summary = main(argv)
    assert summary["complete"] and summary["images_total"] == len(many)
    table = pd.read_parquet(out / "labels")
    pred = Predictor(ckpt, device="cpu", precision="fp32", threads=2)
    want = pd.DataFrame(pred.predict_bytes([(str(folder / n), d) for n, d in many.items()], finder=FaceFinder()))
    assert len(table) == len(want)
    assert not table.duplicated(["path", "face"]).any()
    key = ["path", "face"]
    got = table.sort_values(key, na_position="first").reset_index(drop=True)
    want = want.sort_values(key, na_position="first").reset_index(drop=True)
    assert list(got["path"]) == list(want["path"]) and got["face"].fillna(-1).tolist() == want["face"].fillna(-1).tolist()
    assert np.allclose(got["gender_prob"].fillna(-1), want["gender_prob"].fillna(-1), atol=1e-4)
    assert summary["faces_total"] == sum(len(p) for p in PLACES.values()) * 4
    assert summary["images_without_faces"] == 4 and sum(summary["errors_by_kind"].values()) == 4
    again = main(argv)  # a finished output: nothing more
    assert again["rows_written"] == 0 and len(pd.read_parquet(out / "labels")) == len(want)


def test_a_24_megapixel_photo_is_decoded_small_and_answered_in_its_own_pixels(ckpt, finder):
    """A 6000x4000 JPEG is decoded with its longest side at 2048 px (JPEG draft mode), and the face's box and
    points come back in the 6000x4000 photo's pixels."""
    from models.preprocess import decode_photo

    crop = real_crops(1)[0]
    photo = compose([crop], [(3000, 1500, 600)], size=(6000, 4000), seed=5)
    img, (w, h), scale = decode_photo(photo)
    assert (w, h) == (6000, 4000) and max(img.shape[1:]) == 2048 and scale == pytest.approx(6000 / 2048, rel=1e-3)
    pred = Predictor(ckpt, device="cpu", precision="fp32", threads=2)
    (row,) = pred.predict_bytes([("big.jpg", photo)], finder=finder)
    assert (row["width"], row["height"], row["faces"]) == (6000, 4000, 1)
    x1, y1, x2, y2 = row["face_box"]
    assert 3000 <= (x1 + x2) / 2 <= 3600 and 1500 <= (y1 + y2) / 2 <= 1500 + 600 * crop.height / crop.width
    assert 0.4 * 600 < x2 - x1 < 1.1 * 600  # the face, not the whole pasted crop, in original pixels


def test_evaluate_through_detection(tmp_path):
    """jobs.evaluate --faces detect measures a model on its data through the detector: the same images, the
    same metrics, the images without a face counted (here: none of drawn faces is missed)."""
    from facedata.synth import generate
    from jobs import evaluate

    data = generate("celeba", 40, str(tmp_path / "celeba"), seed=4)
    ck = str(tmp_path / "hs.pt")
    save_checkpoint(models.create_model("hard_sharing"), ck)
    whole = evaluate.main(["--checkpoint", ck, "--data", f"celeba:{data}", "--split", "all"])
    detect = evaluate.main(["--checkpoint", ck, "--data", f"celeba:{data}", "--split", "all", "--faces", "detect"])
    assert whole["n_images"] == 40 and "images_without_face" not in whole
    assert detect["n_images"] + detect["images_without_face"] == 40
    assert detect["n_images"] >= 38, detect  # drawn faces are found
    assert set(whole) - {"images_without_face"} <= set(detect)
