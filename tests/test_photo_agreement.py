"""A model trained on faces found in photos labels a face the same in another photo as in its own crop
(issue #19's tests: "learns from the faces, not the photo" and "labels the same faces in other photos as it
does their crops, within a stated margin").

Training photos are drawn faces (facedata/draw.py) pasted one each, at a random place, size (56-80 px wide)
and turn (up to 10 degrees), onto cluttered backgrounds (facedata/compose.py). The faces are found by the
train job's own driver path (`raytasks.train.job.prepare` with ``faces="detect"``: detection, cache,
canonical template) and the model is trained in this process by `core.engine.fit`, which runs the same
`train_step` and `load_batch` → `training_input` alignment as a Ray Train worker (Ray Train's part is
tests/test_train_faces.py's). The test photos hold two held-out faces each, elsewhere and at other sizes;
they and the faces' own crops (the drawn 178 x 218 images, as a data set would ship them) are labelled by
`core.annotator.Annotator`, the core of label and serve, through detection.

The attribute compared is race: the drawn skin tone is inside the aligned face, where a drawn face's gender
(hair behind the shoulders, a necktie) mostly is not. Margins, from 3 runs of this test (2026-12-03; the
training is not bit-for-bit repeatable on CPU): 31 of the 35 pasted faces found in both photo and crop; race
on the crops 0.71-0.81 against a majority share of 0.29; photo and crop give the same race for 0.94-0.97 of
the faces, and the crop's class a probability within 0.036-0.061 on average. The same model trained on the
photos whole (``faces="whole"``: the background and all) read 0.39 of the crops right and fails here.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core import engine
from core.annotator import Annotator
from facedata.compose import compose
from facedata.datasets import UTKFACE_RACES
from models.checkpoint import save_checkpoint
from raytasks.train.job import prepare
from raytasks.train.spec import TrainSpec
from tests.images import drawn_source

pytestmark = pytest.mark.slow  # a training run: ~20 s of CPU

N_TRAIN, N_VAL, N_TEST_PHOTOS = 200, 16, 20
DETECTOR = {"size": 320}  # photos of 200-360 px: the default 640 letterbox would only pad them
MODEL_ARGS = {"image_size": 64, "depth": 18}  # age_gender_race on a small ResNet from scratch (no dlib trunk)


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_a_model_trained_on_photos_labels_a_face_in_another_photo_as_in_its_crop(tmp_path):
    rows = []
    for i in range(N_TRAIN + N_VAL):
        src, lab = drawn_source(i)
        photo = compose([src], 1000 + i, n_faces=(1, 1), canvas=(200, 260), face_width=(56, 80), max_angle=10)
        path = tmp_path / f"train{i:03d}.jpg"
        path.write_bytes(_jpeg(photo.image))
        rows.append({"path": str(path), "race": lab["race"], "gender": lab["gender"], "age": lab["age"],
                     "split": "train" if i < N_TRAIN else "val"})
    pd.DataFrame(rows).to_csv(tmp_path / "photos.csv", index=False)

    # seeded: the weights' first draw decides how far 4 epochs get (unseeded, one suite run of five read 0.48 of
    # the crops right, the others 0.71-0.81)
    torch.manual_seed(0)
    model, recipe, train, val, faces = prepare(TrainSpec(
        model="age_gender_race", data=f"manifest:{tmp_path / 'photos.csv'}", storage=str(tmp_path / "runs"),
        name="photos", faces="detect", face_options={"detector": DETECTOR}, model_kwargs=MODEL_ARGS,
        recipe={"early_stopping_patience": 0}))
    report = faces["report"]
    assert report["detected"] == N_TRAIN + N_VAL and report["used"] >= 0.9 * (N_TRAIN + N_VAL), report
    model.recipe = recipe
    engine.fit(model, train, val, epochs=4, batch_size=16, log_fn=None)
    checkpoint = str(tmp_path / "agr.pt")
    save_checkpoint(model, checkpoint, extra={"faces": faces})

    annotator = Annotator(checkpoint, faces={"mode": "detect", "detector": DETECTOR})
    crops = {}  # held-out face -> its crop's row
    pairs = []  # (truth, photo row, crop row) per face pasted in a test photo and found there
    pasted = 0
    for j in range(N_TEST_PHOTOS):
        seeds = (500 + 2 * j, 501 + 2 * j)
        sources = [drawn_source(s) for s in seeds]
        photo = compose([s for s, _ in sources], 3000 + j, n_faces=(2, 2), canvas=(240, 360),
                        face_width=(50, 80), max_angle=10)
        found = [r for r in annotator.annotate_bytes([(f"test{j}.jpg", _jpeg(photo.image))]) if r["face"] is not None]
        for k, box in zip(photo.sources, photo.boxes):
            pasted += 1
            seed = seeds[k]
            if seed not in crops:
                crop_rows = annotator.annotate_bytes([(f"crop{seed}.jpg", _jpeg(sources[k][0].image))])
                assert len(crop_rows) == 1, crop_rows  # a crop is one face (or, missed, one row without)
                crops[seed] = crop_rows[0] if crop_rows[0]["face"] == 0 else None
            match = [r for r in found if _iou(r["face_box"], box) >= 0.5]
            if match and crops[seed] is not None:
                pairs.append((UTKFACE_RACES[sources[k][1]["race"]], match[0], crops[seed]))
    # the faces are found in the photos and in their crops (drawn faces: 31 of 35 at this size, measured)
    assert len(pairs) >= 0.8 * pasted, (len(pairs), pasted)

    truth = [t for t, _, _ in pairs]
    on_crop = np.mean([c["race"] == t for t, _, c in pairs])
    majority = max(truth.count(r) for r in set(truth)) / len(truth)
    # learned from the faces: the crops hold no background, and the model reads their race well above chance
    assert on_crop >= majority + 0.25, (on_crop, majority)
    agree = np.mean([p["race"] == c["race"] for _, p, c in pairs])
    # the stated margin: the same race for at least 80 % of the faces, and the crop's class gets on average
    # within 0.1 of the same probability in the photo
    gap = np.mean([abs(p["race_probs"][UTKFACE_RACES.index(c["race"])] - c["race_prob"]) for _, p, c in pairs])
    print({"on_crop": round(on_crop, 3), "majority": round(majority, 3), "agree": round(agree, 3), "gap": round(gap, 3),
           "pairs": len(pairs)})  # pytest -s shows the figures
    assert agree >= 0.8 and gap <= 0.1, (agree, gap)
