"""Detector views and settings: tiles find a face cut by a tile border once with its whole box, a photo's
faces do not depend on the batch it arrives in, test-time flip keeps the points' order, the top-k cap keeps
NMS's input bounded without changing ordinary results, and the identity names every setting that changes
which faces are found (the default's exactly as before)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.ops import box_iou

from facedata.compose import FaceSource, background, paste
from faces import detect as detect_module
from faces.detect import TILE_MARGIN, DetectorConfig, FaceDetector, tile_starts, top_k_per_group
from tests.helpers import assert_same_faces
from tests.images import chw as _t
from tests.images import drawn_face_sources


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


@pytest.fixture(scope="module")
def sources(detector) -> list[FaceSource]:
    """Three drawn faces (178x218) with the box the default detector finds on each alone."""
    return drawn_face_sources(detector)


def _photo(sources, seed: int, size: tuple[int, int], places: list[tuple[int, float, float, float]]):
    """A cluttered ``size`` (w, h) photo with ``sources[k]`` pasted ``width`` px wide at (x, y) for each
    (k, x, y, width) of ``places``; returns the image and the pasted boxes."""
    canvas = background(np.random.default_rng(seed), *size)
    boxes = [paste(canvas, sources[k], (x, y), width, angle=0)[0] for k, x, y, width in places]
    return np.array(canvas), torch.tensor(np.array(boxes), dtype=torch.float32)


# --- tiles ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 300, 640, 641, 1000, 1400, 4000, 20000])
def test_tiles_cover_the_side_with_the_overlap(length):
    tile, overlap = 640, 128
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts == sorted(starts)
    if length <= tile:
        assert starts == [0]
        return
    assert starts[-1] + tile == length  # the last ends at the edge: no tile reaches past the image
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours overlap >= overlap
    assert len(starts) == int(np.ceil((length - overlap) / (tile - overlap)))  # and no more tiles than needed


def test_a_face_cut_by_a_tile_border_is_found_once_with_its_whole_box(sources):
    # 700 px wide: tiles of 320 start at x = 0, 190, 380, so x = 320 is tile 0's right border and x = 380
    # tile 2's left one. size=64 makes the letterboxed view too coarse to find a 50 px face (5 px there):
    # every face below is found by the tiles, and a border cuts the first two.
    assert tile_starts(700, 320, 96) == [0, 190, 380]
    places = [(1, 320, 150, 50), (0, 380, 260, 50), (2, 560, 100, 55)]
    photo, truth = _photo(sources, 5, (700, 350), places)
    tiled = FaceDetector(DetectorConfig(size=64, tile=320, tile_overlap=96, min_face=0)).detect_one(_t(photo))
    assert len(tiled) == len(places), tiled.boxes  # once each: no cut half beside the whole face
    iou = box_iou(truth, tiled.boxes)
    assert bool((iou.max(1).values >= 0.7).all()), iou  # the whole face's box, not the half in one tile
    # without tiles, the coarse view alone finds none of them: the tiles did the work
    assert len(FaceDetector(DetectorConfig(size=64, min_face=0)).detect_one(_t(photo))) == 0


def test_a_face_larger_than_the_overlap_on_a_border_comes_from_the_letterbox(sources):
    # a 130 px face across tile 0's right border (x = 320) fits in no tile's safe zone: the cut halves are
    # dropped, the 320 px letterbox (59 px there) finds it whole
    photo, truth = _photo(sources, 6, (700, 350), [(0, 320, 175, 130)])
    faces = FaceDetector(DetectorConfig(size=320, tile=320, tile_overlap=96)).detect_one(_t(photo))
    assert len(faces) == 1 and box_iou(truth, faces.boxes).item() >= 0.7


def test_tiles_are_not_used_when_the_letterbox_already_sees_full_resolution(detector, sources):
    photo, _ = _photo(sources, 7, (600, 500), [(0, 200, 250, 120), (1, 420, 250, 100)])
    plain = detector.detect_one(_t(photo))
    tiled = FaceDetector(DetectorConfig(tile=256, tile_overlap=64)).detect_one(_t(photo))
    assert len(plain) == 2
    torch.testing.assert_close(plain.boxes, tiled.boxes, atol=0, rtol=0)
    torch.testing.assert_close(plain.scores, tiled.scores, atol=0, rtol=0)


def test_a_photo_gets_the_same_faces_whatever_batch_it_arrives_in(sources):
    det = FaceDetector(DetectorConfig(size=320, tile=320, tile_overlap=64, min_face=0))
    big, _ = _photo(sources, 8, (750, 450), [(0, 320, 150, 45), (1, 600, 300, 60), (2, 150, 330, 100)])
    other, _ = _photo(sources, 9, (900, 300), [(1, 250, 150, 70)])
    small, _ = _photo(sources, 10, (300, 200), [(2, 150, 100, 60)])
    alone = det.detect_one(_t(big))
    assert len(alone) == 3
    for batch, max_batch in (([small, big, other], 16), ([other, big], 3), ([big, small], 1)):
        det.max_batch = max_batch  # chunks of views split differently
        together = det.detect([_t(a) for a in batch])[next(i for i, a in enumerate(batch) if a is big)]
        assert_same_faces(together, alone)


def test_flip_finds_the_same_faces_with_points_in_image_order(detector, sources):
    photo, truth = _photo(sources, 11, (900, 500), [(0, 200, 250, 120), (1, 650, 250, 140)])
    plain = detector.detect_one(_t(photo))
    flipped = FaceDetector(DetectorConfig(flip=True)).detect_one(_t(photo))
    assert len(plain) == len(flipped) == 2
    assert bool((box_iou(plain.boxes, flipped.boxes).max(1).values >= 0.8).all())
    assert bool((flipped.scores >= plain.scores.sort(descending=True).values - 1e-6).all())  # max of both
    p = flipped.points
    assert bool((p[:, 0, 0] < p[:, 1, 0]).all() and (p[:, 3, 0] < p[:, 4, 0]).all())  # image-left first
    # a face mirrored is found at the mirrored place
    mirror = FaceDetector(DetectorConfig(flip=True)).detect_one(_t(photo[:, ::-1]))
    back = mirror.boxes[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1, -1, 1]) + torch.tensor([900.0, 0, 900, 0])
    assert bool((box_iou(back, flipped.boxes).max(1).values >= 0.9).all())


# --- top-k before NMS ---------------------------------------------------------------------------------------


def test_top_k_per_group_keeps_the_highest_scores_of_each_image():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.7, 0.2, 0.95])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 0])
    assert top_k_per_group(scores, groups, 2).tolist() == [1, 3, 4, 6]  # ascending indices
    assert top_k_per_group(scores, groups, 4).tolist() == list(range(7))  # nothing over the cap


def test_thousands_of_candidates_reach_nms_capped_and_ordinary_photos_are_unchanged(monkeypatch, sources):
    calls = []
    real = torchvision.ops.batched_nms

    def spy(boxes, scores, idxs, iou):
        calls.append(len(boxes))
        return real(boxes, scores, idxs, iou)

    monkeypatch.setattr(torchvision.ops, "batched_nms", spy)
    noise = _t(np.random.default_rng(0).integers(0, 256, (320, 320, 3), dtype=np.uint8))
    # a threshold just above 0 lets (nearly) every one of the 4,200 anchors of a 320 canvas through, per image
    cap = DetectorConfig(size=320, threshold=1e-6, top_k=1000, min_face=0)
    found = FaceDetector(cap).detect([noise, noise])
    assert calls == [2 * 1000]  # NMS saw top_k candidates of each image, not 2 x ~4,200
    assert all(len(f) == 64 for f in found)  # max_faces still applies after NMS
    # an ordinary photo (fewer than k candidates): exactly the same faces with or without the cap
    photo, _ = _photo(sources, 12, (900, 600), [(0, 200, 250, 120), (1, 600, 300, 150)])
    calls.clear()
    a = FaceDetector(DetectorConfig(top_k=5000)).detect_one(_t(photo))
    b = FaceDetector(DetectorConfig(top_k=10**9)).detect_one(_t(photo))
    assert calls[0] < 5000 and len(a) == 2
    for x, y in ((a.boxes, b.boxes), (a.scores, b.scores), (a.points, b.points)):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


# --- settings and identity ------------------------------------------------------------------------------------


def test_the_first_versions_identity_is_kept_and_every_later_change_is_named(detector):
    old = ("retinaface-mobilenet0.25 sha256:b7a7acab55e1 size=640 threshold=0.7 nms_iou=0.4 min_face=16 "
           "max_faces=64")
    # the float resize is the first version's: its rows, hence its identity, are what they always were
    assert FaceDetector(DetectorConfig(resize="float")).identity == old
    assert FaceDetector(DetectorConfig(threshold=0.7, top_k=5000, flip=False, tile=0, resize="float")).identity == old
    # the default resizes 8-bit values since 2026-12-06: rows within rounding of the old, so named (a cache
    # of detections made the old way is not read for the new)
    assert detector.identity == old + " resize=uint8"
    assert FaceDetector(DetectorConfig.preset("portrait")).identity == old + " resize=uint8"
    tiled = FaceDetector(DetectorConfig(tile=640, tile_overlap=128, flip=True, top_k=1000, max_upscale=2.0))
    # tile_merge=2: tiles' part rule and size-scaled border since 2026-12-06 (faces/tiles.py): other rows with tiles
    assert tiled.identity == old + " max_upscale=2 tile=640 tile_overlap=128 tile_merge=2 flip top_k=1000 resize=uint8"
    event = DetectorConfig.preset("event")
    assert (event.size, event.threshold, event.max_faces, event.min_face) == (1024, 0.78, 256, 12.0)


def test_new_settings_are_checked_and_round_trip():
    for bad in ({"network": "yolo"}, {"tile": 100}, {"tile": 640, "tile_overlap": 400},
                {"tile_overlap": TILE_MARGIN}, {"flip": 1}, {"top_k": 0}, {"threshold": 0.0}, {"tile": True},
                {"resize": "nearest"}):
        with pytest.raises(ValueError, match="DetectorConfig"):
            DetectorConfig.from_dict(bad)
    with pytest.raises(ValueError, match="preset"):
        DetectorConfig.preset("crowded")
    cfg = DetectorConfig(network="centerface", tile=512, tile_overlap=96, flip=True, top_k=100, threshold=None)
    assert DetectorConfig.from_dict(cfg.to_dict()) == cfg
    assert DetectorConfig().threshold == 0.7 and cfg.threshold == 0.5  # None: the network's own, as a number
    assert DetectorConfig.preset("portrait", network="centerface").threshold == 0.5
    # a preset's threshold was measured on its own network's scores: another network takes its own threshold
    assert DetectorConfig.preset("event", network="centerface").threshold == 0.5
    assert DetectorConfig.preset("event", network="centerface", threshold=0.78).threshold == 0.78
    assert DetectorConfig.preset("event", max_faces=512).max_faces == 512
    assert detect_module.PRESETS["portrait"] == {}  # the fast preset is today's default
    scrfd = DetectorConfig.preset("event-scrfd")  # opt-in only: SCRFD's weights are non-commercial (docs/faces.md)
    assert (scrfd.network, scrfd.size, scrfd.threshold, scrfd.max_faces, scrfd.min_face) == ("scrfd", 1024, 0.47, 256, 8.0)
    assert DetectorConfig().network == "retinaface"


def test_grey_and_scaled_photos_work_with_tiles(sources):
    photo, truth = _photo(sources, 13, (700, 350), [(0, 320, 150, 50)])
    det = FaceDetector(DetectorConfig(size=64, tile=320, tile_overlap=96, min_face=0))
    grey = torch.from_numpy(np.array(Image.fromarray(photo).convert("L")))[None]
    assert len(det.detect_one(grey)) == 1
    scaled = det.detect_one(_t(photo), scale=2.0)  # coordinates in pixels of a photo twice as large
    assert len(scaled) == 1 and box_iou(truth * 2, scaled.boxes).item() >= 0.7
