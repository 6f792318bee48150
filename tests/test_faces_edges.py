"""Edges of finding faces that an audit found wrong (2026-12-06):

* tiles counted one face as two or three rows: a tile that holds only part of a large face, or the half of a face
  its border cuts with a box stopping just short of the border margin, reported that part as a face of its own,
  and NMS (IoU 0.25-0.40 against the whole face) kept both (faces/tiles.py);
* ``--det-preset event --det-network scrfd`` kept the preset's RetinaFace threshold (jobs/_cli.py,
  faces.detect.preset_settings);
* ``--det-tile`` below 256 could not be used (``tile_overlap`` stayed 128);
* a photo shrunk to ``max_side`` mapped y back with x's factor (models.photo.axis_scales).

No Ray; drawn faces, drawn squares and a stand-in network where the real network's behaviour is the thing
reproduced, real LFW portraits where present."""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import batched_nms, box_iou

from faces import detect as detect_module
from faces import tiles
from faces.detect import DetectorConfig, FaceDetector, Faces, tile_starts
from tests.images import chw as _t

# --- 1. tiles: a face is one row, never its parts ---------------------------------------------------------------


class _Squares:
    """A stand-in for the detector network (``FaceDetector.network``), to reproduce what RetinaFace does with
    tiles on real photos (docs/faces.md, "Tiles") with a white square for the face: on each canvas it finds the
    square whole (score 0.99) where the canvas holds all of it, and where a canvas edge cuts it, the part it sees
    as a face of its own (score 0.93), its box stopping 6 px short of each cut (2 px beyond ``TILE_MARGIN``): the
    lower half of a face in WIDER's 15_Stock_Market_15_286 stopped 5-6 px inside its tile's border."""

    NAME, DEFAULT_THRESHOLD, SHORT = "squares", 0.7, 6

    @staticmethod
    def to_input(rgb: torch.Tensor) -> torch.Tensor:
        return rgb / 255

    @classmethod
    def candidates(cls, outputs, height: int, width: int):
        (canvas,) = outputs
        n = canvas.shape[0]
        boxes, scores, points = torch.zeros(n, 1, 4), torch.zeros(n, 1), torch.zeros(n, 1, 5, 2)
        for v in range(n):
            ys, xs = torch.nonzero(canvas[v, 0] > 0.5, as_tuple=True)
            if len(xs) == 0:
                continue
            x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
            cut = (x0 == 0, y0 == 0, x1 == width, y1 == height)
            d = cls.SHORT
            box = torch.tensor([x0 + d * cut[0], y0 + d * cut[1], x1 - d * cut[2], y1 - d * cut[3]])
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            boxes[v, 0], scores[v, 0] = box, 0.93 if any(cut) else 0.99
            cx, cy, w, h = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]
            points[v, 0] = torch.tensor([[cx - w / 4, cy - h / 6], [cx + w / 4, cy - h / 6], [cx, cy],
                                         [cx - w / 5, cy + h / 4], [cx + w / 5, cy + h / 4]])
        return boxes, scores, points


def _squares_detector(config: DetectorConfig) -> FaceDetector:
    det = FaceDetector(config)
    det.network, det.model = _Squares, lambda batch: (batch,)
    return det


def _square_photo(size: tuple[int, int], square: tuple[int, int, int, int]) -> torch.Tensor:
    w, h = size
    a = np.full((h, w, 3), 40, np.uint8)
    x0, y0, x1, y1 = square
    a[y0:y1, x0:x1] = 255
    return _t(a)


def test_a_cut_half_that_stops_short_of_the_border_margin_is_not_a_second_face():
    # tiles of 320 over 700 px start at x = 0, 190, 380: tile 1 holds the 80 px square [295, 375) whole, tile 0's
    # border x = 320 cuts it, and tile 0 reports the cut part [295, 314), 6 px inside its border (the margin is 4):
    # IoU 0.24 with the whole face, under nms_iou, so NMS alone kept both (the audit's 15_286 and 16_305)
    assert tile_starts(700, 320, 96) == [0, 190, 380]
    square = (295, 135, 375, 215)
    det = _squares_detector(DetectorConfig(size=320, tile=320, tile_overlap=96, min_face=0))
    faces = det.detect_one(_square_photo((700, 350), square))
    assert len(faces) == 1, faces.boxes
    assert box_iou(torch.tensor([square], dtype=torch.float32), faces.boxes).item() >= 0.9
    assert faces.scores.item() == pytest.approx(0.99)  # the whole face's, not the part's


def test_a_face_larger_than_a_tile_is_one_face_not_its_parts():
    # a 400 px face under tiles of 256: every tile over it holds a part (a side, a corner, or its middle with all
    # four edges cut); the 640 letterbox holds it whole (256 px there). Before: the letterbox's face plus 11 parts.
    square = (300, 200, 700, 600)
    det = _squares_detector(DetectorConfig(tile=256, tile_overlap=64))
    faces = det.detect_one(_square_photo((1000, 800), square))
    assert len(faces) == 1, faces.boxes
    assert box_iou(torch.tensor([square], dtype=torch.float32), faces.boxes).item() >= 0.9


def test_the_part_rule_merges_across_views_in_score_order():
    boxes = torch.tensor([[0, 0, 100, 100], [10, 50, 60, 95],  # a face and a part inside it (another view)
                          [200, 0, 300, 100], [210, 50, 260, 95],  # the same, but the part from the face's view
                          [400, 0, 500, 100], [410, 50, 460, 95],  # the part scores higher than the face
                          [600, 0, 700, 100], [660, 40, 740, 90]], dtype=torch.float32)  # 50 % inside: two faces
    scores = torch.tensor([0.99, 0.9, 0.99, 0.9, 0.8, 0.9, 0.99, 0.9])
    views = torch.tensor([0, 1, 0, 0, 0, 2, 0, 3])
    keep = tiles.merge(boxes, scores, torch.zeros(8, dtype=torch.int64), views, 0.4)
    assert sorted(keep.tolist()) == [0, 2, 3, 4, 5, 6, 7]  # only box 1 goes
    assert keep.tolist() == sorted(keep.tolist(), key=lambda i: -float(scores[i]))  # highest score first, as NMS
    # another image's face does not remove a part of this one
    other = tiles.merge(boxes[:2], scores[:2], torch.tensor([0, 1]), views[:2], 0.4)
    assert sorted(other.tolist()) == [0, 1]


def test_without_tiles_the_faces_are_exactly_what_nms_keeps(monkeypatch):
    # tiles off (flip or not), every candidate of an image comes from one view: the part rule never applies
    from facedata.compose import background, paste
    from tests.images import drawn_face_sources

    plain = FaceDetector()
    sources = drawn_face_sources(plain)
    canvas = background(np.random.default_rng(3), 900, 600)
    for k, (x, y, w) in enumerate([(200, 250, 120), (600, 300, 150), (420, 120, 60)]):
        paste(canvas, sources[k], (x, y), w, 0)
    photo = _t(np.array(canvas))
    for det in (plain, FaceDetector(DetectorConfig(flip=True))):
        merged = det.detect_one(photo)
        monkeypatch.setattr(detect_module, "merge", lambda b, s, i, v, iou: batched_nms(b, s, i, iou))
        nms_only = det.detect_one(photo)
        monkeypatch.undo()
        assert len(merged) == 3
        for a, b in ((merged.boxes, nms_only.boxes), (merged.scores, nms_only.scores), (merged.points, nms_only.points)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


# LFW portraits enlarged to 1000 px, where RetinaFace on tiles of 320 found parts of the face as faces (audit:
# 20 portraits at 2000 px with tiles of 640 gave 70 faces, 27 of them lying 80 % or more inside another)
PORTRAITS = {"Anne_Cavers_0001.jpg": 3, "Conchita_Martinez_0002.jpg": 2, "Ester_Canadas_0001.jpg": 2,
             "Liu_Xiaoqing_0001.jpg": 2}  # -> faces found before the part rule


def test_real_portraits_larger_than_a_tile_are_one_face_each(shared_data):
    found = []
    det = FaceDetector(DetectorConfig(tile=320, tile_overlap=96))
    letterbox = FaceDetector()
    for name in PORTRAITS:
        path = shared_data / "lfw_gender" / name
        if not path.is_file():
            pytest.skip(f"{path} not found")
        photo = _t(np.array(Image.open(path).convert("RGB").resize((1000, 1000), Image.BICUBIC)))
        tiled, whole = det.detect_one(photo), letterbox.detect_one(photo)
        found.append(len(tiled))
        assert len(whole) == 1 and len(tiled) >= 1
        assert box_iou(whole.boxes, tiled.boxes[:1]).item() >= 0.7  # the face found is the whole face
    assert found == [1] * len(PORTRAITS), dict(zip(PORTRAITS, found))


# --- 2. a preset's threshold goes with its network ------------------------------------------------------------


def _cli(*argv: str):
    from faces.finder import FaceOptions
    from jobs._cli import add_face_args, face_options

    p = argparse.ArgumentParser()
    add_face_args(p)
    return FaceOptions.from_dict(face_options(p.parse_args(list(argv)))).detector_config()


def test_a_preset_with_another_network_takes_that_networks_own_threshold():
    event_scrfd = _cli("--det-preset", "event", "--det-network", "scrfd")
    assert (event_scrfd.network, event_scrfd.threshold) == ("scrfd", 0.5)  # SCRFD's own, not RetinaFace's 0.78
    assert (event_scrfd.size, event_scrfd.max_faces, event_scrfd.min_face) == (1024, 256, 12.0)  # the rest stays
    assert _cli("--det-preset", "event-scrfd", "--det-network", "retinaface").threshold == 0.7
    assert _cli("--det-preset", "event", "--det-network", "centerface").threshold == 0.5
    # the preset's own network, or a threshold given, keep what was asked
    assert _cli("--det-preset", "event", "--det-network", "retinaface").threshold == 0.78
    assert _cli("--det-preset", "event-scrfd", "--det-network", "scrfd").threshold == 0.47
    assert _cli("--det-preset", "event", "--det-network", "scrfd", "--det-threshold", "0.6").threshold == 0.6
    assert _cli("--det-preset", "event").threshold == 0.78
    # the Python API says the same
    assert DetectorConfig.preset("event", network="scrfd").threshold == 0.5
    assert DetectorConfig.preset("event", network="scrfd", threshold=0.78).threshold == 0.78


# --- 3. tiles below 256 from the command line -------------------------------------------------------------------


def test_a_tile_below_256_can_be_used_from_the_command_line():
    assert _cli("--det-tile", "192").tile_overlap == 96  # half the tile
    assert _cli("--det-tile", "64").tile_overlap == 32
    assert _cli("--det-tile", "640").tile_overlap == 128  # as before: the same identity and rows
    assert _cli("--det-tile", "192", "--det-tile-overlap", "64").tile_overlap == 64
    with pytest.raises(ValueError, match="tile_overlap"):
        _cli("--det-tile", "192", "--det-tile-overlap", "120")
    assert DetectorConfig().tile_overlap == 128 and DetectorConfig(tile=256).tile_overlap == 128
    cfg = DetectorConfig(tile=224)
    assert cfg.tile_overlap == 112 and DetectorConfig.from_dict(cfg.to_dict()) == cfg
    # and it finds a face: a 50 px face cut by the border of two tiles of 192 (the 64 px letterbox sees nothing)
    from facedata.compose import background, paste
    from tests.images import drawn_face_sources

    sources = drawn_face_sources(FaceDetector())
    canvas = background(np.random.default_rng(5), 400, 300)
    box, _ = paste(canvas, sources[0], (192, 150), 50, 0)
    faces = FaceDetector(DetectorConfig(size=64, tile=192, min_face=0)).detect_one(_t(np.array(canvas)))
    assert len(faces) == 1 and box_iou(torch.tensor(box[None], dtype=torch.float32), faces.boxes).item() >= 0.7


# --- 4. each axis its own decode scale ------------------------------------------------------------------------------


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _band_strip(w: int, h: int, y0: int, y1: int) -> bytes:
    a = np.zeros((h, w, 3), np.uint8)
    a[y0:y1] = 255
    return _png(a)


def _band_centre(column: np.ndarray) -> float:
    c = column.astype(np.float64)
    return float((c * (np.arange(len(c)) + 0.5)).sum() / c.sum())


def test_a_shrunk_strip_maps_y_back_with_its_own_factor():
    from models.photo import axis_scales, decode_photo_pixels

    # 4000 x 300 at max_side 512: 512 x 38, x 7.8125 but y 7.8947 (the short side rounds to whole pixels)
    arr, size, scale = decode_photo_pixels(_band_strip(4000, 300, 270, 296), 512)
    assert arr.shape[:2] == (38, 512) and scale == pytest.approx(4000 / 512)
    sx, sy = axis_scales(size, (arr.shape[1], arr.shape[0]))
    assert (sx, sy) == (4000 / 512, 300 / 38)
    centre = _band_centre(arr[:, 256, 0])
    assert abs(centre * sy - 283.0) < 0.5  # the band's centre, back in the original's rows
    assert abs(centre * scale - 283.0) > 2.0  # what one factor for both axes gave
    # a photo decoded at its own size, or by an exact JPEG scale, keeps one factor, as before
    assert axis_scales((640, 480), (640, 480)) == (1.0, 1.0)
    assert axis_scales((4000, 3000), (2000, 1500)) == (2.0, 2.0)


def test_rows_map_boxes_and_points_back_with_each_axis_factor(hs_annotator):
    from core.rows import row_dicts
    from facedata.decode import Photos, decode_batch

    # a strip shrunk to 512 x 38 and a photo at its own size, with one face each "found" at known decoded pixels
    strip, small = _band_strip(4000, 300, 270, 296), _png(np.zeros((120, 160, 3), np.uint8))
    batch = decode_batch(["strip.png", "small.png"], [strip, small], Photos(512))
    box = torch.tensor([[100.0, 10.0, 130.0, 30.0]])
    points = torch.tensor([[[105.0, 15.0], [125.0, 15.0], [115.0, 20.0], [108.0, 25.0], [122.0, 25.0]]])
    batch["found"] = [Faces(box, torch.tensor([0.9]), points), Faces(box, torch.tensor([0.9]), points)]
    rows = {r["path"]: r for r in row_dicts(hs_annotator.annotate(batch))}
    fx, fy = 4000 / 512, 300 / 38
    np.testing.assert_allclose(rows["strip.png"]["face_box"], (box[0] * torch.tensor([fx, fy, fx, fy])).tolist(),
                               rtol=0, atol=1e-4)
    np.testing.assert_allclose(rows["strip.png"]["face_points"],
                               (points[0] * torch.tensor([fx, fy])).reshape(-1).tolist(), rtol=0, atol=1e-4)
    # not shrunk: the decoded pixels are the original's, to the last bit
    assert rows["small.png"]["face_box"] == box[0].double().tolist()
    assert rows["small.png"]["face_points"] == points[0].double().reshape(-1).tolist()


def test_an_aligned_crop_samples_where_its_map_says_on_a_shrunk_strip():
    from faces.finder import face_input
    from models.preprocess import Preprocessing

    # the band is a face's eyes' row, near the bottom of a 4000 x 300 strip that decodes at 512 x 38: face_input
    # warps the face from there, and the crop's band, taken back through the geometry's affine, must land on the
    # band in the original (one factor for both axes put it 2.8 px higher)
    data = _band_strip(4000, 300, 262, 278)
    eyes = 270.0
    points = [[1900, eyes], [2000, eyes], [1950, eyes + 30], [1910, eyes + 60], [1990, eyes + 60]]
    crop, geom = face_input(data, Preprocessing(size=(64, 64), channels=3), points, max_side=512)
    a = np.asarray(geom["affine"], dtype=np.float64).reshape(2, 3)
    centre = _band_centre(crop[0, :, 32].numpy())
    y_back = a[1, 0] * 32.5 + a[1, 1] * centre + a[1, 2]
    assert abs(y_back - eyes) < 1.0, (y_back, eyes)


def test_the_face_finders_maps_take_a_factor_per_axis():
    from faces.finder import _to_original

    m = torch.eye(3, dtype=torch.float64)
    assert _to_original(m, 1.0) is m and _to_original(m, (1.0, 1.0)) is m
    assert torch.equal(_to_original(m, 2.0), _to_original(m, (2.0, 2.0)))
    assert torch.equal(_to_original(m, (2.0, 3.0)), torch.diag(torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64)))

