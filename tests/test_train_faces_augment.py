"""Augmentation for training on faces (core/augment.py): it runs in the aligned frame, on the device, moves the
landmark targets with the pixels (a flip swaps the image-left and image-right points), and never runs in
evaluation. How the faces themselves are found, cached and skipped: tests/test_train_faces.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

import models
from core import engine
from core.augment import FLIP_5, Augment
from core.evaluation import run_model
from facedata.datasets import read_dataset
from models.landmarks import Landmarks
from tests.images import face_photo, write_files


def _photos(folder, n: int) -> pd.DataFrame:
    """``n`` photos of one drawn face each (tests/test_train_faces.py's first ``n``) as a manifest's table."""
    files, rows = {}, []
    for i in range(n):
        data, found = face_photo([i], seed=i)
        files[f"p{i:02d}.jpg"] = data
        lab = found[0]["labels"]
        rows.append({"path": f"p{i:02d}.jpg", "gender": lab["gender"], "eyeglasses": lab["eyeglasses"],
                     "split": "train"})
    write_files(folder, files)
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return read_dataset(f"manifest:{folder / 'manifest.csv'}").table


DOTS = [(15, 20), (35, 20), (25, 32), (17, 45), (33, 45)]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


@pytest.mark.parametrize("scale", ["signed", "unit"])
def test_flip_and_jitter_move_landmarks_with_the_pixels(scale):
    H, W, n = 60, 50, 24
    img = torch.zeros(1, 3, H, W, dtype=torch.uint8)
    for (x, y), c in zip(DOTS, COLOURS):
        img[0, :, y - 2:y + 3, x - 2:x + 3] = torch.tensor(c, dtype=torch.uint8)[:, None, None]
    o = Landmarks("landmarks", points=5, scale=scale)
    pix = np.array([[v for x, y in DOTS for v in (x + 0.5, y + 0.5)]], dtype=np.float32)
    target = torch.tensor(o.normalise(pix, [{"sx": 1, "sy": 1, "tx": 0, "ty": 0, "input_w": W, "input_h": H}]))
    aug = Augment(hflip=0.5, rotation=12, scale=0.1, shift=0.06)
    out, moved = aug(img.expand(n, -1, -1, -1).contiguous(), {"landmarks": target.expand(n, -1).contiguous()}, [o],
                     torch.Generator().manual_seed(3))
    flips = 0
    for b in range(n):
        p = moved["landmarks"][b].reshape(5, 2).double()
        p = (p + 1) / 2 if scale == "signed" else p
        xs, ys = (p[:, 0] * W).long(), (p[:, 1] * H).long()
        seen = [tuple(out[b, :, y, x].tolist()) for x, y in zip(xs, ys)]
        flipped = seen == [COLOURS[i] for i in FLIP_5]
        flips += flipped
        assert flipped or seen == COLOURS, (b, seen)
        assert xs[0] < xs[1] and xs[3] < xs[4]  # point 0 stays the image-left eye
    assert 0 < flips < n


def test_flip_is_refused_for_landmarks_without_a_known_left_right_order():
    with pytest.raises(ValueError, match="68 points"):
        Augment(hflip=0.5).check([Landmarks("landmarks", points=68)])
    Augment(rotation=5).check([Landmarks("landmarks", points=68)])


def test_recipe_keys_expand_and_bad_ones_fail():
    a = Augment.from_recipe({"hflip": 0.5, "align_jitter": 1, "color_jitter": 0.2, "random_crop": True})
    assert (a.hflip, a.rotation, a.shift, a.scale) == (0.5, 3.0, 0.03, pytest.approx(0.07))
    assert (a.brightness, a.saturation, a.hue) == (0.2, 0.2, 0.05)
    with pytest.raises(ValueError, match="unknown augmentation"):
        Augment.from_recipe({"mixup": 0.2})
    with pytest.raises(ValueError, match="rotation"):
        Augment.from_recipe({"rotation": 400})
    assert not Augment.from_recipe({}).active


def test_photometric_augmentation_changes_pixels_and_keeps_shape():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    out, _ = Augment(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1, blur=1.0)(x, {}, [],
                                                                                      torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert (out.float() - x.float()).abs().mean() > 5
    assert out.float().std() < x.float().std()  # the blur smooths the noise


def test_erasing_fills_one_rectangle_per_chosen_image_with_its_mean_and_keeps_landmarks():
    n, H, W = 64, 40, 30
    x = torch.randint(0, 256, (n, 3, H, W), dtype=torch.uint8)
    pts = torch.rand(n, 10)
    o = Landmarks("landmarks", points=5, scale="unit")
    out, moved = Augment(erase=0.5, erase_area=0.3)(x, {"landmarks": pts}, [o], torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8 and torch.equal(moved["landmarks"], pts)
    mean = x.float().mean((2, 3)).round()
    erased = 0
    for b in range(n):
        changed = (out[b] != x[b]).any(0)  # (H, W)
        if not changed.any():
            continue
        erased += 1
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        patch = out[b, :, r0:r1, c0:c1].float()
        assert torch.equal(patch, mean[b].view(3, 1, 1).expand_as(patch))  # one rectangle, flat, the image's mean
        assert (r1 - r0) * (c1 - c0) <= 0.3 * H * W + H + W  # within erase_area (pixels cut at the border)
    assert 16 < erased < 48  # about half of 64
    assert not Augment.from_recipe({"erase_area": 0.2}).active  # a size alone turns nothing on
    assert Augment.from_recipe({"erase": 0.5}).active
    with pytest.raises(ValueError, match="erase_area"):
        Augment(erase=0.5, erase_area=0.01)


def test_evaluation_applies_no_augmentation(tmp_path, monkeypatch):
    table = _photos(tmp_path, 6)
    model = models.create_model("hard_sharing")
    model.recipe = dataclasses.replace(model.recipe, augment={"hflip": 1.0, "rotation": 30, "brightness": 0.5})
    before = run_model(model, table, batch_size=4)
    calls = []
    monkeypatch.setattr(Augment, "__call__", lambda self, *a, **k: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("augmentation in evaluation")))
    after = run_model(model, table, batch_size=4)
    assert not calls and all(torch.equal(before.raw[k], after.raw[k]) for k in before.raw)
    with pytest.raises(AssertionError, match="augmentation in evaluation"):  # training does call it
        engine.fit(model, table, table, epochs=1, batch_size=6, log_fn=None)
