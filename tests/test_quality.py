"""Per-face pose, image quality, face size and review flags (faces/pose.py, faces/quality.py).

Fast (no Ray): the pose tests project a 3-D face at known angles or use drawn faces with known points; the
quality tests blur and darken a drawn face by known amounts. One test runs the detector on GENKI-4K photos
and skips without ../shared/data.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from facedata.compose import FaceSource, background, paste
from facedata.draw import draw_face
from faces.align import align
from faces.pose import face_3d, head_pose
from faces.quality import (
    QUALITY_PREPROCESSING,
    REASONS,
    ReviewThresholds,
    brightness,
    face_quality,
    face_size,
    quality_crops,
    review_flags,
    sharpness,
)

GENKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "genki4k"


def _rot(yaw: float, pitch: float, roll: float) -> torch.Tensor:
    """R = Rz(roll) Ry(-yaw) Rx(-pitch), degrees (faces.pose's convention)."""
    a, b, g = (math.radians(v) for v in (-pitch, -yaw, roll))
    Rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]], dtype=torch.float64)
    Ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]], dtype=torch.float64)
    Rz = torch.tensor([[math.cos(g), -math.sin(g), 0], [math.sin(g), math.cos(g), 0], [0, 0, 1]], dtype=torch.float64)
    return Rz @ Ry @ Rx


def _project(yaw: float, pitch: float, roll: float, scale: float = 50.0) -> torch.Tensor:
    X = face_3d()
    return scale * (_rot(yaw, pitch, roll) @ X.T).T[:, :2] + torch.tensor([200.0, 150.0], dtype=torch.float64)


def _mirror(points: torch.Tensor, width: float = 400.0) -> torch.Tensor:
    """The points of the mirrored image, in the detector's order (image-left first)."""
    m = points.clone()
    m[..., 0] = width - m[..., 0]
    return m[..., [1, 0, 2, 4, 3], :]


def _drawn(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    img, labels = draw_face(np.random.default_rng(seed), (178, 218))
    return np.asarray(img), np.asarray(labels["landmarks"], dtype=np.float64).reshape(5, 2)


def _crop(image: np.ndarray, points: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    crops, _ = align(t, torch.from_numpy(points)[None].float(), QUALITY_PREPROCESSING)
    return crops


# --- pose -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("yaw,pitch,roll", [(0, 0, 0), (25, 0, 0), (-40, 10, 5), (0, -20, 0), (15, 30, -25),
                                            (60, 0, 0)])
def test_pose_recovers_the_angles_of_a_projected_generic_face(yaw, pitch, roll):
    out = head_pose(_project(yaw, pitch, roll)[None])
    assert set(out) == {"pose_yaw", "pose_pitch", "pose_roll"}
    assert all(v.dtype == torch.float32 and v.shape == (1,) for v in out.values())
    assert out["pose_yaw"].item() == pytest.approx(yaw, abs=1e-3)
    assert out["pose_pitch"].item() == pytest.approx(pitch, abs=1e-3)
    assert out["pose_roll"].item() == pytest.approx(roll, abs=1e-3)


def test_positive_yaw_moves_the_nose_to_the_image_right_and_positive_pitch_up():
    front = _project(0, 0, 0)
    right = _project(20, 0, 0)
    up = _project(0, 20, 0)
    assert right[2, 0] > front[2, 0]  # nose towards the image's right
    assert (up[2, 1] - up[0, 1]) < (front[2, 1] - front[0, 1])  # nose closer to the eye line: face up


def test_roll_is_clockwise_positive_for_a_drawn_face_turned_in_the_image():
    image, points = _drawn()
    box = np.array([points[:, 0].min() - 30, points[:, 1].min() - 40, points[:, 0].max() + 30, points[:, 1].max() + 30])
    src = FaceSource(image, box, points)
    found = []
    for angle in (-10.0, 0.0, 10.0):
        canvas = background(np.random.default_rng(0), 400, 400)
        _, pts = paste(canvas, src, (200.0, 200.0), 120.0, angle)  # angle: counter-clockwise as seen
        found.append(pts)
    base = head_pose(torch.tensor(points)[None])["pose_roll"].item()
    roll = head_pose(torch.tensor(np.stack(found)))["pose_roll"]
    # +10 degrees counter-clockwise (compose's convention) is -10 in ours: clockwise positive
    assert roll.tolist() == pytest.approx([base + 10.0, base, base - 10.0], abs=0.05)


def test_a_mirrored_face_has_the_opposite_yaw_and_roll_and_the_same_pitch():
    pts = torch.stack([_project(25, 10, 8), _project(-12, -5, -3)])
    a, b = head_pose(pts), head_pose(_mirror(pts))
    assert b["pose_yaw"].tolist() == pytest.approx((-a["pose_yaw"]).tolist(), abs=1e-3)
    assert b["pose_roll"].tolist() == pytest.approx((-a["pose_roll"]).tolist(), abs=1e-3)
    assert b["pose_pitch"].tolist() == pytest.approx(a["pose_pitch"].tolist(), abs=1e-3)
    # and a drawn face (asymmetric points, not the model's) mirrors the same way
    _, drawn = _drawn(5)
    d = torch.tensor(drawn)[None]
    c, m = head_pose(d), head_pose(_mirror(d, 178.0))
    assert m["pose_yaw"].item() == pytest.approx(-c["pose_yaw"].item(), abs=1e-3)
    assert m["pose_roll"].item() == pytest.approx(-c["pose_roll"].item(), abs=1e-3)


def test_pose_of_degenerate_points_is_finite_and_zero():
    pts = torch.stack([torch.zeros(5, 2), torch.full((5, 2), float("nan")), torch.full((5, 2), 7.0),
                       torch.tensor([[1.0, 1], [1, 1], [1, 1], [1, 1], [1, 2]])])
    out = head_pose(pts)
    for v in out.values():
        assert torch.isfinite(v).all()
    assert out["pose_yaw"][:3].tolist() == [0.0, 0.0, 0.0]
    assert out["pose_roll"][:3].tolist() == [0.0, 0.0, 0.0]
    empty = head_pose(torch.zeros(0, 5, 2))
    assert all(v.shape == (0,) for v in empty.values())
    with pytest.raises(ValueError):
        head_pose(torch.zeros(3, 4, 2))


@pytest.mark.skipif(not (GENKI / "labels.csv").exists(), reason="needs ../shared/data/genki4k (research data, absent)")
def test_yaw_sign_agrees_with_genki_labels_on_turned_faces():
    import pandas as pd
    from torchvision.io import decode_jpeg, read_file

    from faces.detect import DetectorConfig, FaceDetector

    labels = pd.read_csv(GENKI / "labels.csv")
    turned = labels[np.degrees(labels.yaw).abs() > 20].head(12)
    det = FaceDetector(DetectorConfig(size=256))
    images = [decode_jpeg(read_file(str(GENKI / f))) for f in turned.file]
    images = [im.expand(3, -1, -1).contiguous() if im.shape[0] == 1 else im for im in images]
    faces = det.detect(images)
    pts = torch.stack([f.points[0] for f in faces])
    yaw = head_pose(pts)["pose_yaw"].numpy()
    agree = np.mean(np.sign(yaw) == np.sign(turned.yaw.to_numpy()))
    assert agree >= 0.9, (agree, list(zip(yaw.round(1), np.degrees(turned.yaw).round(1))))


# --- image quality ----------------------------------------------------------------------------------------


def test_sharpness_falls_with_known_blur_and_ignores_darkening():
    image, points = _drawn()
    pil = Image.fromarray(image)
    crops = torch.cat([_crop(np.asarray(pil.filter(ImageFilter.GaussianBlur(s))) if s else image, points)
                       for s in (0, 1, 2, 4)])
    s = sharpness(crops)
    assert s.dtype == torch.float32 and ((s >= 0) & (s <= 100)).all()
    assert s[0] > s[1] > s[2] > s[3], s
    dark = (crops[:1].float() * 0.5).round().to(torch.uint8)
    assert abs(sharpness(dark).item() - s[0].item()) < 10


def test_brightness_falls_with_known_darkening():
    image, points = _drawn()
    crops = torch.cat([_crop(np.clip(image.astype(np.float32) * f, 0, 255).round().astype(np.uint8), points)
                       for f in (1.0, 0.7, 0.4, 0.2)])
    b = brightness(crops)
    assert b[0] > b[1] > b[2] > b[3], b
    assert (b[1:] / b[0]).tolist() == pytest.approx([0.7, 0.4, 0.2], abs=0.02)  # the mean luma is linear
    grey = torch.full((1, 3, 64, 64), 128, dtype=torch.uint8)
    assert brightness(grey).item() == pytest.approx(100 * 128 / 255, abs=0.01)
    assert brightness(grey[:, :1]).item() == pytest.approx(100 * 128 / 255, abs=0.01)  # grey crops too


def test_quality_of_black_flat_and_empty_crops_is_finite():
    black = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    assert sharpness(black).tolist() == [0.0, 0.0]
    assert brightness(black).tolist() == [0.0, 0.0]
    flat = torch.full((1, 3, 64, 64), 200, dtype=torch.uint8)
    assert sharpness(flat).item() == 0.0
    tiny = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    assert torch.isfinite(sharpness(tiny)).all() and torch.isfinite(brightness(tiny)).all()
    assert sharpness(torch.zeros(0, 3, 64, 64, dtype=torch.uint8)).shape == (0,)
    with pytest.raises(ValueError):
        sharpness(torch.zeros(3, 64, 64, dtype=torch.uint8))


def test_face_size_is_the_inter_ocular_distance():
    pts = torch.tensor([[[10.0, 20], [40, 60], [0, 0], [0, 0], [0, 0]]])
    assert face_size(pts).tolist() == [50.0]
    assert face_size(torch.full((1, 5, 2), float("nan"))).tolist() == [0.0]
    assert face_size(torch.zeros(0, 5, 2)).shape == (0,)


# --- review -----------------------------------------------------------------------------------------------


def _row(**kw):
    base = dict(face_size=60.0, pose_yaw=0.0, pose_pitch=0.0, sharpness=80.0, brightness=50.0, detection_score=0.99)
    base.update(kw)
    return base


def _flags(rows, confidences=None, thresholds=None):
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    return review_flags(cols["face_size"], cols["pose_yaw"], cols["pose_pitch"], cols["sharpness"],
                        cols["brightness"], cols["detection_score"], confidences, thresholds)


def test_each_reason_fires_on_its_own_and_in_the_documented_order():
    th = ReviewThresholds()
    rows = [
        _row(),
        _row(face_size=th.face_size_limit() - 1),
        _row(pose_yaw=-(th.max_yaw + 1)),
        _row(pose_pitch=th.max_pitch_up + 1),
        _row(pose_pitch=-(th.max_pitch_down + 1)),
        _row(pose_pitch=-(th.max_pitch_down - 1)),  # 29 degrees down: fine (30 down, 45 up)
        _row(pose_pitch=th.max_pitch_up - 1),
        _row(sharpness=th.min_sharpness - 1),
        _row(brightness=th.min_brightness - 1),
        _row(detection_score=th.detection_score_limit() - 0.01),
        _row(face_size=5.0, pose_yaw=80.0, sharpness=1.0, brightness=1.0, detection_score=0.75),
        _row(sharpness=float("nan")),
    ]
    review, reasons = _flags(rows)
    assert reasons == [[], ["small_face"], ["extreme_pose"], ["extreme_pose"], ["extreme_pose"], [], [],
                       ["blurry"], ["dark"], ["low_detection_score"], list(REASONS), ["blurry"]]
    assert review.dtype == torch.bool and review.tolist() == [bool(r) for r in reasons]


def test_low_confidence_per_output_in_the_callers_order():
    rows = [_row(), _row(), _row(face_size=1.0)]
    conf = {"gender": torch.tensor([0.9, 0.55, 0.3]), "age": np.array([0.2, 0.99, float("nan")])}
    review, reasons = _flags(rows, conf)
    assert reasons == [["low_confidence:age"], ["low_confidence:gender"], ["small_face", "low_confidence:gender"]]
    th = ReviewThresholds(min_confidence=0.5, per_output={"age": 0.1})
    _, reasons = _flags(rows, conf, th)
    assert reasons == [[], [], ["small_face", "low_confidence:gender"]]
    with pytest.raises(ValueError):
        _flags(rows, {"gender": [0.9]})


def test_thresholds_validate_and_round_trip():
    th = ReviewThresholds(min_face_size=32, per_output={"smile": 0.7})
    assert ReviewThresholds.from_dict(th.to_dict()) == th
    for bad in ({"min_face_size": "big"}, {"max_yaw": float("nan")}, {"per_output": {"a": "x"}}, {"nope": 1}):
        with pytest.raises(ValueError):
            ReviewThresholds.from_dict({**ReviewThresholds().to_dict(), **bad})


def test_face_quality_gives_every_column_for_a_batch():
    image, points = _drawn()
    clean = _crop(image, points)
    blurred = _crop(np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(8))), points)
    crops = torch.cat([clean, blurred, torch.zeros_like(clean)])
    pts = torch.tensor(np.stack([points, points, np.zeros((5, 2))]))
    out = face_quality(pts, crops, torch.tensor([0.99, 0.99, 0.8]), {"gender": torch.tensor([0.9, 0.9, 0.9])})
    for k in ("pose_yaw", "pose_pitch", "pose_roll", "sharpness", "brightness", "face_size"):
        assert out[k].dtype == torch.float32 and out[k].shape == (3,) and torch.isfinite(out[k]).all(), k
    assert out["review"].tolist() == [False, True, True]
    assert out["review_reasons"][1] == ["blurry"]
    assert out["review_reasons"][2] == ["small_face", "blurry", "dark", "low_detection_score"]
    assert out["face_size"][0].item() == pytest.approx(float(np.linalg.norm(points[1] - points[0])), abs=1e-4)
    empty = face_quality(torch.zeros(0, 5, 2), torch.zeros(0, 3, 64, 64, dtype=torch.uint8), torch.zeros(0))
    assert empty["review"].shape == (0,) and empty["review_reasons"] == []


def test_quality_crops_are_the_aligned_crops_of_the_faces():
    image, points = _drawn()
    canvas = np.zeros((400, 500, 3), np.uint8)
    canvas[100:318, 200:378] = image  # a face inside a larger photo, and one cut by its edge
    pts = np.stack([points + [200, 100], points + [-60, 0]])
    t = torch.from_numpy(canvas).permute(2, 0, 1).contiguous()
    ref, _ = align(t, torch.from_numpy(pts).float(), QUALITY_PREPROCESSING)
    got = quality_crops(t, torch.from_numpy(pts).float())
    assert got.shape == ref.shape == (2, 3, 64, 64) and got.dtype == torch.uint8
    assert (got.float() - ref.float()).abs().mean() < 2.0
    assert quality_crops(t, torch.zeros(0, 5, 2)).shape == (0, 3, 64, 64)
