"""Photos with several faces through the product: one row per face, the same rows from the core (the
annotator) and the label job (Parquet, resumable), an image without a face kept as one row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from facedata.synth import encode_jpeg
from tests.images import (
    FACES_PER_PHOTOS,
    PLACES,
    ROWS_PER_PHOTOS,
    compose,
    inside,
    many_photos,
    photos,
    real_crops,
)


def test_annotator_gives_one_row_per_face(hs_annotator, finder):
    items = photos()
    rows = hs_annotator.annotate_bytes(list(items.items()), faces="detect")
    by_path: dict[str, list[dict]] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    assert [r["path"] for r in rows] == [p for p in items for _ in by_path[p]]  # image order kept
    assert hs_annotator.detector == finder.identity
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


def test_a_face_in_a_photo_reads_like_its_crop(finder):
    """The aligned face of a pasted crop gives the model nearly the input it gets from the crop alone."""
    import torch

    from faces.align import align
    from models.preprocess import Preprocessing, decode, decode_photo

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
    h, w = crop.height, crop.width
    pre = Preprocessing(size=(64, 64), template_crop=(h, w),
                        template=tuple((x * 64 / w, y * 64 / h) for x, y in f_alone.points[0].tolist()))
    aligned, _ = align(img, f_photo.points, pre)
    whole, _ = decode(encode_jpeg(crop), pre)
    diff = (aligned[0].float() - whole.float()).abs().mean()
    other, _ = decode(encode_jpeg(real_crops(2)[1]), pre)  # another face, for scale
    # detection's few-pixel jitter and a second JPEG pass are all that separates them
    assert diff < 15.0 and diff < 0.4 * (other.float() - whole.float()).abs().mean(), diff


def test_label_job_rows_per_face_resume_after_a_limited_run(tmp_path, hs_checkpoint, hs_annotator, ray_session):
    """A run stopped after part of the photos (``--limit``), then the same command again: every face of
    every image once, the no-face image once, the broken file once, and the rows equal the annotator's.
    (A run killed by SIGKILL resumes the same way: tests/test_label.py, tests/test_modelset.py.)"""
    from jobs.label import main

    folder = tmp_path / "photos"
    many = many_photos(folder)  # more images than one batch, so that the limited run stops midway
    out = tmp_path / "out"
    argv = ["--checkpoint", hs_checkpoint, "--input", str(folder), "--output", str(out), "--batch-size", "2",
            "--max-rows-per-file", "4", "--precision", "fp32", "--max-actors", "1"]
    first = main([*argv, "--limit", "6"])
    partial = pd.read_parquet(out / "labels")
    assert not first["complete"] and 0 < len(partial) < ROWS_PER_PHOTOS * 4, "not stopped midway"

    summary = main(argv)
    assert summary["complete"] and summary["images_total"] == len(many)
    assert summary["rows_before"] == len(partial)
    table = pd.read_parquet(out / "labels")
    want = pd.DataFrame(hs_annotator.annotate_bytes([(str(folder / n), d) for n, d in many.items()], faces="detect"))
    assert len(table) == len(want) == ROWS_PER_PHOTOS * 4
    assert not table.duplicated(["path", "face"]).any()
    key = ["path", "face"]
    got = table.sort_values(key, na_position="first").reset_index(drop=True)
    want = want.sort_values(key, na_position="first").reset_index(drop=True)
    assert list(got["path"]) == list(want["path"]) and got["face"].fillna(-1).tolist() == want["face"].fillna(-1).tolist()
    assert np.allclose(got["gender_prob"].fillna(-1), want["gender_prob"].fillna(-1), atol=1e-4)
    assert summary["faces_total"] == FACES_PER_PHOTOS * 4
    assert summary["images_without_faces"] == 4 and sum(summary["errors_by_kind"].values()) == 4
    again = main(argv)  # a finished output: nothing more
    assert again["rows_written"] == 0 and len(pd.read_parquet(out / "labels")) == len(want)


def test_a_24_megapixel_photo_is_decoded_small_and_answered_in_its_own_pixels(hs_annotator):
    """A 6000x4000 JPEG is decoded with its longest side at 2048 px (JPEG draft mode), and the face's box and
    points come back in the 6000x4000 photo's pixels."""
    from models.preprocess import decode_photo

    crop = real_crops(1)[0]
    photo = compose([crop], [(3000, 1500, 600)], size=(6000, 4000), seed=5)
    img, (w, h), scale = decode_photo(photo)
    assert (w, h) == (6000, 4000) and max(img.shape[1:]) == 2048 and scale == pytest.approx(6000 / 2048, rel=1e-3)
    (row,) = hs_annotator.annotate_bytes([("big.jpg", photo)], faces="detect")
    assert (row["width"], row["height"], row["faces"]) == (6000, 4000, 1)
    x1, y1, x2, y2 = row["face_box"]
    assert 3000 <= (x1 + x2) / 2 <= 3600 and 1500 <= (y1 + y2) / 2 <= 1500 + 600 * crop.height / crop.width
    assert 0.4 * 600 < x2 - x1 < 1.1 * 600  # the face, not the whole pasted crop, in original pixels


def test_a_phone_photo_decodes_at_half_size_and_photo_size_says_what_every_jpeg_decodes_to():
    """A 12 MP phone photo (4032 x 3024, 4000 x 3000) decodes at JPEG's 1/2 scale (2016 / 2000 px, 4.5x
    faster than whole and shrunk to 2048 px), since a draft may leave the longest side down to 31/32 of
    ``max_side``; a photo just longer than that window decodes whole and is shrunk as before.
    ``photo_size`` (which the GPU decoder shrinks to) is the size ``decode_photo`` gives, upright or not."""
    import io

    from PIL import Image

    from models.imagebytes import draft_request, jpeg_draft_size
    from models.photo import jpeg_draft_side, photo_size
    from models.preprocess import decode_photo

    assert jpeg_draft_side(2048) == 1984 and jpeg_draft_side(640) == 620
    ramp = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8)
    cases = {(4032, 3024): (2016, 1512), (3024, 4032): (1512, 2016), (4000, 3000): (2000, 1500),
             (3968, 2976): (1984, 1488), (3966, 2976): (2048, 1537), (6000, 4000): (2048, 1365),
             (2100, 900): (2048, 878), (1000, 700): (1000, 700), (8000, 420): (2000, 105)}
    for (w, h), want in cases.items():
        buf = io.BytesIO()
        Image.fromarray(ramp).convert("RGB").resize((w, h)).save(buf, "JPEG", quality=70)
        img, size, scale = decode_photo(buf.getvalue())
        assert size == (w, h) and (img.shape[2], img.shape[1]) == want == photo_size(w, h), (w, h, img.shape)
        assert scale == pytest.approx(max(w, h) / max(want))
    for max_side in (640, 1024, 2048):  # the rule against Pillow's own choice, over many sizes
        for w in range(900, 9000, 37):
            h = (w * 3) // 4
            assert photo_size(w, h, max_side)[0] <= max_side
            drafted = jpeg_draft_size(w, h, draft_request(w, h, jpeg_draft_side(max_side)))[0]
            assert drafted >= min(w, jpeg_draft_side(max_side)) and (drafted == w or drafted < 2 * max_side)


def test_a_decoded_photo_stays_in_pillows_layout_and_labels_as_a_planar_copy_does(hs_annotator):
    """A decoded batch holds Pillow's own ``(h, w, 3)`` pixels (no copy: read-only), the label stage's Arrow
    column carries them as they are, and detection reads them as a channels-last ``(3, h, w)`` view: the
    faces and rows are those of a planar (CHW) copy of the same pixels, the layout decoded before
    (docs/benchmarks.md, "Camera-sized photos": the copies this saves)."""
    import torch

    from core.rows import row_dicts
    from facedata.decode import Photos, decode_batch
    from models.preprocess import decode_photo, photo_tensor
    from raytasks.label.decoding import to_arrow

    crops = real_crops(2)
    photo = compose(crops, [(300, 200, 240), (1000, 260, 200)], size=(1600, 900), seed=7)
    batch = decode_batch(["p.jpg", "bad.jpg"], [photo, b"not an image"], Photos(1024))
    im = batch["image"][0]
    assert im.shape == (576, 1024, 3) and im.dtype == np.uint8 and not im.flags.writeable
    assert batch["image"][1] is None and list(batch["ok"]) == [True, False]
    t = photo_tensor(im)
    assert t.shape == (3, 576, 1024) and t[None].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(t, decode_photo(photo, 1024)[0])
    (carried, empty) = to_arrow(batch).column("image").chunk(0).to_numpy()
    assert carried.shape == im.shape and np.array_equal(carried, im) and empty.size == 0

    rows = row_dicts(hs_annotator.annotate(batch))
    planar = torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1)))  # (3, h, w) contiguous
    assert photo_tensor(planar.permute(1, 2, 0)).is_contiguous()
    before = row_dicts(hs_annotator.annotate(dict(batch, image=[planar.permute(1, 2, 0), None])))
    assert sum(r["face"] is not None for r in rows) == 2 and rows == before


def test_the_label_jobs_decode_stage_never_imports_torch(tmp_path, group_photo):
    """A decode worker runs raytasks.label.decoding alone: it reads and decodes photos (a bad file an error row)
    into Ray's Arrow column with no torch imported, which would cost each worker 1.7 s of CPU and about 265 MB
    of private memory (docs/benchmarks.md, "Camera-sized photos"). A fresh process, as a Ray worker is."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    data, _ = group_photo
    (tmp_path / "group.jpg").write_bytes(data)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    code = f"""
import sys
import pyarrow as pa
from raytasks.label.decoding import read_and_decode
paths = [{str(tmp_path / "group.jpg")!r}, {str(tmp_path / "bad.jpg")!r}]
t = read_and_decode(pa.table({{"path": paths}}), {{"mode": "detect", "max_side": 2048}}, [])
assert t.column("ok").to_pylist() == [True, False], t.column("error_kind").to_pylist()
assert t.column("image").chunk(0).to_numpy()[0].shape == (640, 900, 3)
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, loaded[:5]
print("decoded without torch")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "decoded without torch" in proc.stdout, proc.stderr[-2000:]


def test_evaluate_through_detection(tmp_path, hs_checkpoint, capsys):
    """jobs.evaluate --faces detect measures a model on its data through the detector: the same images, the
    same metrics, the images without a face counted (here: none of drawn faces is missed)."""
    from facedata.synth import generate
    from jobs import evaluate

    data = generate("celeba", 40, str(tmp_path / "celeba"), seed=4)
    whole = evaluate.main(["--checkpoint", hs_checkpoint, "--data", f"celeba:{data}", "--split", "all"])
    detect = evaluate.main(["--checkpoint", hs_checkpoint, "--data", f"celeba:{data}", "--split", "all",
                            "--faces", "detect"])
    assert whole["n_images"] == 40 and "images_without_face" not in whole
    assert detect["n_images"] + detect["images_without_face"] == 40
    assert detect["n_images"] >= 38, detect  # drawn faces are found
    assert set(whole) - {"images_without_face"} <= set(detect)
    # images_without_face counts the images that gave no face (here a text file), not those without a label
    drawn = sorted((tmp_path / "celeba").rglob("*.jpg"))[:5]
    (tmp_path / "text.jpg").write_bytes(b"not a photo")
    pd.DataFrame({"path": [str(p) for p in drawn] + [str(tmp_path / "text.jpg")],
                  "gender": ["female", "male", "female", None, None, "male"], "split": "test"}
                 ).to_csv(tmp_path / "some.csv", index=False)
    some = evaluate.main(["--checkpoint", hs_checkpoint, "--data", f"manifest:{tmp_path / 'some.csv'}",
                          "--faces", "detect"])
    assert (some["n_images"], some["images_without_face"]) == (3, 1), some
    # data without any of the model's labels is refused, naming what it has
    pd.DataFrame({"path": [str(p) for p in drawn], "smile": 1, "split": "test"}).to_csv(tmp_path / "smiles.csv",
                                                                                         index=False)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", hs_checkpoint, "--data", f"manifest:{tmp_path / 'smiles.csv'}"])
    assert e.value.code == 2
    assert "has none of the labels hard_sharing predicts (eyeglasses, gender; it has smile)" in capsys.readouterr().err
    # the split of data without one of its own is the one the checkpoint was trained on (jobs.train --split-seed)
    from models.checkpoint import checkpoint_bytes, load_checkpoint

    model, info = load_checkpoint(hs_checkpoint)
    (tmp_path / "split3.pt").write_bytes(checkpoint_bytes(model, info.metrics, {**info.extra, "split_seed": 3})[0])
    evaluate.main(["--checkpoint", str(tmp_path / "split3.pt"), "--data", f"celeba:{data}"])
    assert "split seed 3 (the one the checkpoint was trained with)" in capsys.readouterr().err


def test_the_face_picked_in_a_photo_of_several_is_the_one_the_rule_names(finder):
    """jobs.evaluate --face-pick: a data set that labels one face per photo (LFW: the one in the middle) is
    judged on that face, not on whichever neighbour the detector scores highest."""
    import torch

    from faces.detect import Faces
    from faces.finder import decode_face, pick_index
    from models.preprocess import Preprocessing

    big, middle = (40, 60, 330), (520, 280, 190)  # (x, y, width): large in the corner, smaller in the middle
    data = compose(real_crops(2), [big, middle], size=(1200, 800), seed=5)
    pre = Preprocessing(size=(112, 112))
    for rule, place in (("largest", big), ("center", middle)):
        crop, geometry = decode_face(data, pre, finder, pick=rule)
        assert crop.shape == (3, 112, 112)
        a = np.asarray(geometry["affine"]).reshape(2, 3)  # input pixels -> the photo's pixels
        cx, cy = a @ np.array([56.0, 56.0, 1.0])  # the crop's centre lands on the picked face
        x, y, w = place
        assert x <= cx <= x + w and y <= cy <= y + 1.3 * w, (rule, cx, cy, place)
    # the default is the detector's most confident face: index 0 of faces sorted by score
    faces = Faces(torch.tensor([[0.0, 0, 10, 10], [40, 40, 60, 60], [0, 0, 50, 50]]), torch.tensor([0.9, 0.8, 0.7]),
                  torch.zeros(3, 5, 2))
    assert [pick_index(faces, 100, 100, r) for r in ("score", "largest", "center")] == [0, 2, 1]
    with pytest.raises(ValueError, match="unknown face pick 'middle'"):
        pick_index(faces, 100, 100, "middle")
    with pytest.raises(ValueError, match="no face"):
        pick_index(Faces.empty(), 100, 100, "center")


def test_evaluate_refuses_a_face_pick_without_detection(tmp_path, hs_checkpoint, capsys):
    from facedata.synth import generate
    from jobs import evaluate

    data = generate("celeba", 10, str(tmp_path / "celeba"), seed=4)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", hs_checkpoint, "--data", f"celeba:{data}", "--faces", "whole",
                       "--face-pick", "center"])
    assert exc.value.code == 2 and "--face-pick chooses among detected faces" in capsys.readouterr().err
