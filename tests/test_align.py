"""faces/align.py: the similarity fit, the warp, and the round trip "paste an aligned face into a photo at a
known place, scale and rotation, align it back" that the label and serve jobs rely on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from faces.align import align, default_template, input_to_crop, input_to_image, similarity, template_of
from models.preprocess import Preprocessing


def _rot(deg: float, scale: float, tx: float, ty: float) -> torch.Tensor:
    a = math.radians(deg)
    return torch.tensor([[scale * math.cos(a), -scale * math.sin(a), tx],
                         [scale * math.sin(a), scale * math.cos(a), ty], [0, 0, 1]], dtype=torch.float64)


def _apply(T: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    return (T[:2, :2] @ pts.double().T).T + T[:2, 2]


def test_similarity_recovers_a_known_transform_and_is_least_squares():
    src = torch.tensor(default_template(Preprocessing(size=(112, 112))), dtype=torch.float64)
    T = _rot(23.0, 2.7, 310.0, -45.0)
    got = similarity(src, _apply(T, src)[None])[0]
    assert torch.allclose(got, T, atol=1e-9)
    # noisy points: the fit is no worse than the true transform (least squares)
    noisy = _apply(T, src) + torch.tensor([[1.5, -2], [0.5, 1], [-1, 0.3], [2, 2], [-1.2, -0.7]], dtype=torch.float64)
    fit = similarity(src, noisy[None])[0]
    assert ((_apply(fit, src) - noisy) ** 2).sum() <= ((_apply(T, src) - noisy) ** 2).sum() + 1e-9
    # a mirrored point set is fitted with a rotation, never a reflection
    mirrored = src * torch.tensor([-1.0, 1.0], dtype=torch.float64)
    assert torch.linalg.det(similarity(src, mirrored[None])[0, :2, :2]) > 0


def _face(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB picture (so bilinear resampling of it is accurate)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.BICUBIC))


@pytest.mark.parametrize("angle,scale", [(0.0, 1.0), (30.0, 1.6), (-25.0, 0.8), (12.0, 3.0)])
def test_a_pasted_face_aligns_back_to_itself(angle, scale):
    """The crop the model trained on, pasted into a photo rotated and scaled, comes back from its 5 points
    equal to the original crop (within resampling error), on an RGB model with a stretched input."""
    crop = _face(109, 89)
    pre = Preprocessing(size=(109, 89), template=default_template(Preprocessing(size=(109, 89))))
    T = _rot(angle, scale, 900.0, 500.0)  # crop pixel -> photo pixel
    photo = torch.zeros((3, 1500, 2000), dtype=torch.uint8)
    # paste by inverse warping the crop into the photo
    pts = _apply(T, template_of(pre))
    inv = torch.linalg.inv(T)
    from faces.align import warp

    pasted = warp(torch.from_numpy(crop).permute(2, 0, 1).contiguous(), inv[None] @ torch.eye(3, dtype=torch.float64), (1500, 2000))[0]
    photo = pasted
    crops, maps = align(photo, pts[None], pre)
    assert crops.shape == (1, 3, 109, 89)
    assert torch.allclose(maps[0], T, atol=1e-6)
    inner = (slice(None), slice(8, -8), slice(8, -8))  # the border mixes with the black around the paste
    diff = (crops[0].float() - torch.from_numpy(crop).permute(2, 0, 1).float())[inner].abs()
    assert diff.mean() < (6.0 if scale < 1 else 3.0), diff.mean()


def test_stretched_training_crops_are_aligned_in_their_own_frame():
    """A model that stretched 89x109 crops to a square input: the warp is the similarity in the crop's frame
    followed by the same stretch, so the input is the stretched crop (not a similarity of it)."""
    crop = _face(109, 89, seed=3)
    tmpl_crop = torch.tensor(default_template(Preprocessing(size=(109, 89))), dtype=torch.float64)
    pre = Preprocessing(size=(50, 50), channels=1, mean=(0.0,), std=(1.0,), template_crop=(109, 89),
                        template=tuple(map(tuple, (tmpl_crop / torch.tensor([89 / 50, 109 / 50], dtype=torch.float64)).tolist())))
    G = input_to_crop(pre)
    assert torch.allclose(G, torch.tensor([[89 / 50, 0, 0], [0, 109 / 50, 0], [0, 0, 1]], dtype=torch.float64))
    T = _rot(0.0, 1.0, 0.0, 0.0)
    maps = input_to_image(_apply(T, tmpl_crop)[None], pre)
    assert torch.allclose(maps[0], G, atol=1e-9)
    crops, _ = align(torch.from_numpy(crop).permute(2, 0, 1).contiguous(), tmpl_crop[None], pre)
    want = np.asarray(Image.fromarray(crop).convert("L").resize((50, 50), Image.BILINEAR), dtype=np.float32)
    assert crops.shape == (1, 1, 50, 50)
    assert np.abs(crops[0, 0].numpy().astype(np.float32) - want)[3:-3, 3:-3].mean() < 4.0


def test_large_faces_are_area_averaged_not_aliased():
    """A 1000 px face to a 50 px input: the mip-map averages fine detail (here black-or-white pixel noise) to
    grey, as the area-averaging resize of the training crops does; plain bilinear sampling would keep the
    noise (a standard deviation near 64 levels instead of under 10)."""
    rng = np.random.default_rng(0)
    noise = torch.from_numpy((rng.integers(0, 2, (1000, 1000)) * 255).astype(np.uint8)).expand(3, -1, -1).contiguous()
    pre = Preprocessing(size=(50, 50))
    crops, _ = align(noise, (template_of(pre) * 20.3)[None], pre)
    inner = crops[0, :, 5:-5, 5:-5].float()
    assert inner.std() < 12, inner.std()
    assert (inner.mean() - 127.5).abs() < 10


def test_no_faces_gives_an_empty_batch():
    crops, maps = align(torch.zeros((3, 20, 20), dtype=torch.uint8), torch.zeros((0, 5, 2)), Preprocessing(size=(8, 8)))
    assert crops.shape == (0, 3, 8, 8) and maps.shape == (0, 3, 3)


def test_the_warp_reads_only_the_faces_region_and_gives_the_whole_photos_crops(monkeypatch):
    """A few faces in a large photo: ``warp`` converts and halves only the part of the photo their crops read
    (faces.align._region), and the crops equal those sampled from the whole photo (to one grey level where the
    float32 sampling grid rounds otherwise; on 576 crops of WIDER faces 1.7e-4 of the pixels differed, by 1) --
    a small face, a large one that needs pyramid levels, one cut by the photo's edge, and all of them at once."""
    import faces.align as A

    photo = torch.from_numpy(_face(1512, 2016, seed=5)).permute(2, 0, 1).contiguous()
    pre = Preprocessing(size=(150, 150), template=default_template(Preprocessing(size=(150, 150))))
    tmpl = template_of(pre)
    faces = {"small": _rot(10.0, 0.4, 300.0, 200.0), "large": _rot(-20.0, 5.0, 1000.0, 600.0),
             "edge": _rot(5.0, 1.2, 1930.0, 1400.0)}
    whole = lambda maps, size, hw, level: (0, 0, int(hw[1]), int(hw[0]))  # noqa: E731 - the warp before
    for name, T in list(faces.items()) + [("all", None)]:
        pts = torch.stack([_apply(t, tmpl) for t in faces.values()]) if T is None else _apply(T, tmpl)[None]
        maps = input_to_image(pts, pre)
        level = max(A.pyramid_levels(maps))
        x0, y0, x1, y1 = A._region(maps, pre.size, photo.shape[-2:], level)
        if name != "all":
            assert (x1 - x0) * (y1 - y0) < 0.5 * 2016 * 1512, name  # a part of the photo, not all of it
            assert x0 % 2 ** level == 0 and y0 % 2 ** level == 0
        got, _ = align(photo, pts, pre)
        monkeypatch.setattr(A, "_region", whole)
        want, _ = align(photo, pts, pre)
        monkeypatch.undo()
        d = (got.int() - want.int()).abs()
        assert d.max() <= 1 and (d > 0).float().mean() < 1e-3, (name, d.max(), (d > 0).float().mean())
