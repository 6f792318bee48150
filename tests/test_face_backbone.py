"""The pretrained face backbone (models/dlib_resnet.py, models/backbones.FaceBackbone) and age_gender_race
built on it: the torch network reproduces dlib's own descriptors, the weights file is found in the installed
package and checked by hash, freezing freezes, a frozen trunk's outputs are cached, checkpoints round-trip,
and on real UTKFace faces the pretrained trunk beats a from-scratch one in the same budget.

Reference descriptors: computed once with dlib itself (``dlib-bin`` 20.0.1, never a dependency of the
project) on 2026-11-29, on the team machine, by

    python3 -m venv /tmp/dlibenv && /tmp/dlibenv/bin/pip install dlib-bin numpy pillow
    /tmp/dlibenv/bin/python ref.py .venv/lib/python3.11/site-packages/face_recognition_models/models/\
dlib_face_recognition_resnet_model_v1.dat ../shared/data/utkface

where ``ref.py`` is::

    import sys, json
    import numpy as np, dlib
    from PIL import Image
    def pattern(k):  # = _pattern below
        y, x = np.mgrid[0:150, 0:150].astype(np.int64)
        chans = [((x * (3 + k) + y * (5 + 2 * c) + 40 * c * k) ^ (x * y // (7 + k))) % 256 for c in range(3)]
        return np.ascontiguousarray(np.stack(chans, -1).astype(np.uint8))
    def utk(path):  # = _utk_chip below: the central 150x150 of a UTKFace chip
        a = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
        return np.ascontiguousarray(a[25:175, 25:175])
    rec = dlib.face_recognition_model_v1(sys.argv[1])
    out = {f"pattern{k}": list(rec.compute_face_descriptor(pattern(k))) for k in range(3)}
    for name in UTK_REFERENCE:
        out[name] = list(rec.compute_face_descriptor(utk(f"{sys.argv[2]}/{name}")))
    print(json.dumps(out))

(The patterns are integer arithmetic, so both sides see the same pixels; the two UTKFace faces need
``../shared/data``. Measured agreement of the torch network: cosine 1 - 3e-13, largest difference 3.1e-7.)
"""

from __future__ import annotations

import math
import shutil
import warnings

import numpy as np
import pytest
import torch

import models
from core import engine
from models import dlib_resnet
from models.backbones import FaceBackbone
from models.checkpoint import load_checkpoint, save_checkpoint
from tests.helpers import torch_threads

PATTERN_REFERENCE = {
    'pattern0': (-0.1060036, 0.1431000, 0.0834978, -0.0114841, -0.0575578, -0.0641503, -0.0443368, -0.0048420, 0.1159208, -0.0123236, 0.2613177, -0.0036083, -0.2256184, -0.0514183, -0.0077633, 0.1044361, -0.1720259, -0.0559279, -0.0722342, -0.1301078, 0.0217651, -0.0190767, -0.0215237, 0.0086238, -0.0863604, -0.2667203, -0.0590070, -0.1865540, 0.0965831, -0.1490290, 0.0409949, 0.0176720, -0.1659679, -0.0511267, -0.0281253, 0.0196158, 0.0257007, -0.0419577, 0.1562641, -0.0342541, -0.1126929, -0.0789428, -0.0193414, 0.2579885, 0.1835068, 0.0342152, 0.0126284, -0.0096100, 0.0321490, -0.2371534, -0.0037176, 0.1346306, 0.0548840, 0.0971827, 0.0422536, -0.1556488, 0.0398423, 0.0149508, -0.1495438, 0.0183311, 0.0396141, -0.1314447, -0.0614482, -0.0558668, 0.2733487, 0.0608780, -0.0607828, -0.1107383, 0.2044358, -0.1338438, -0.0240920, 0.0976632, -0.1072821, -0.1211605, -0.2151516, 0.1087253, 0.3584689, 0.1768639, -0.1408236, 0.0549133, -0.1508935, -0.0287192, 0.0185915, 0.0250505, -0.0435048, 0.0084237, -0.0734910, 0.0679749, 0.1652059, -0.0887362, 0.0202590, 0.1513652, -0.0596990, 0.0165079, 0.0002086, -0.0423483, -0.0479280, 0.0064595, -0.0545240, -0.0179810, 0.1330245, -0.1092733, 0.0238075, 0.0990523, -0.1692403, 0.0470027, -0.0027351, -0.0431590, 0.0106486, 0.0315545, -0.0458836, -0.0503818, 0.2281549, -0.2084126, 0.2947292, 0.2163359, 0.0070936, 0.1026192, 0.0277450, 0.1070898, -0.0341727, -0.0722864, -0.1241346, -0.0569263, 0.0168827, -0.0228507, -0.0200292, -0.0071616),
    'pattern1': (-0.0857470, 0.1300424, 0.0930689, 0.0136695, -0.0776264, -0.0569475, -0.0500127, 0.0268428, 0.1026357, 0.0093164, 0.2567064, -0.0125525, -0.2413982, -0.0211823, -0.0290790, 0.0782807, -0.1415744, -0.0393895, -0.0973829, -0.1147222, 0.0574695, -0.0037036, -0.0065342, 0.0384743, -0.1105708, -0.2729731, -0.0531281, -0.1470865, 0.0828360, -0.1877562, 0.0255702, 0.0010313, -0.1582788, -0.0449685, -0.0247453, 0.0121296, 0.0085525, -0.0631420, 0.1585418, -0.0332078, -0.1288183, -0.0612350, -0.0237498, 0.2727031, 0.1862842, 0.0522639, 0.0143974, -0.0477007, 0.0396067, -0.2702521, 0.0133648, 0.1728186, 0.0386941, 0.1011881, 0.0476200, -0.1446428, 0.0239242, 0.0496900, -0.1317519, 0.0301688, 0.0236821, -0.0935892, -0.0368667, -0.1080213, 0.2404252, 0.0549590, -0.0852391, -0.1044308, 0.1552889, -0.1655081, -0.0347885, 0.1182077, -0.0901127, -0.1571951, -0.2272288, 0.0992250, 0.3836554, 0.2005685, -0.1648632, 0.0369022, -0.1575869, -0.0296462, 0.0114272, 0.0262819, -0.0713853, 0.0268054, -0.0858469, 0.0898594, 0.1791591, -0.0824636, 0.0288731, 0.1834839, -0.0246336, 0.0191787, 0.0135589, -0.0129187, -0.0759321, 0.0111614, -0.0564687, -0.0039650, 0.1324539, -0.1095026, 0.0367197, 0.0883728, -0.1778427, 0.0868854, -0.0048480, -0.0496351, 0.0304510, 0.0234246, -0.0728833, -0.0507783, 0.2352594, -0.2354843, 0.2569015, 0.2073754, 0.0393940, 0.1098750, 0.0347684, 0.1238303, -0.0445637, -0.0677488, -0.1063749, -0.0391816, 0.0200805, -0.0324619, -0.0150023, -0.0211249),
    'pattern2': (-0.0633266, 0.1222267, 0.0905808, -0.0177232, -0.1066039, -0.0387647, -0.1030005, 0.0039796, 0.0853117, 0.0003752, 0.2307869, -0.0398202, -0.2520137, 0.0214297, -0.0422441, 0.1093449, -0.1441894, -0.0326185, -0.1235183, -0.1291640, 0.0407981, 0.0106116, 0.0032004, 0.0351309, -0.1170522, -0.2619395, -0.0600122, -0.1147233, 0.0927119, -0.1873453, 0.0140721, 0.0131856, -0.1587668, -0.0222663, 0.0034900, 0.0289952, 0.0058549, -0.1142970, 0.1511905, -0.0685797, -0.1509636, -0.0257518, 0.0259474, 0.2410149, 0.1654234, 0.0568874, 0.0303158, -0.0651622, 0.0678600, -0.2594822, 0.0332660, 0.1657509, 0.0289696, 0.1018931, 0.0614950, -0.1692249, 0.0238539, 0.1147196, -0.1359051, 0.0410917, 0.0313984, -0.0786619, -0.0219160, -0.1586082, 0.2304617, 0.0834197, -0.1070853, -0.1322265, 0.1346975, -0.1608875, -0.0219320, 0.1265227, -0.1001876, -0.1546825, -0.2530769, 0.0721707, 0.3671308, 0.1945909, -0.1472597, 0.0358078, -0.1053091, -0.0427876, -0.0148502, 0.0555948, -0.0720780, 0.0163559, -0.0557332, 0.0904892, 0.2119506, -0.0882028, 0.0437399, 0.1977578, -0.0214629, -0.0019873, -0.0373329, 0.0152577, -0.1130707, -0.0111488, -0.0309794, 0.0143628, 0.1011741, -0.1040497, 0.0282349, 0.1008873, -0.1816106, 0.0914899, -0.0253253, -0.0444861, 0.0210857, 0.0296520, -0.0469906, -0.0563086, 0.2364020, -0.2632607, 0.2341596, 0.2186741, 0.0575319, 0.1026698, 0.0265626, 0.1397194, -0.0214101, -0.0473355, -0.1177280, -0.0553148, 0.0259325, -0.0536883, -0.0278996, 0.0048831),
}
UTK_REFERENCE = {
    '26_0_0_20170102233359482.jpg.chip.jpg': (-0.1119841, 0.1084945, 0.0378580, -0.1045155, -0.0643487, 0.0628647, -0.0026684, -0.0391752, 0.1567993, -0.0956536, 0.1519054, -0.0723896, -0.2609170, -0.0981325, 0.0285722, 0.1540024, -0.2122268, -0.1604815, -0.0855055, -0.0488201, 0.0684923, 0.0400311, -0.0644572, 0.0613289, -0.1544777, -0.3202764, -0.0623158, -0.0615920, -0.0099718, -0.1436921, -0.0224672, 0.0459029, -0.1557033, -0.0285176, 0.0334976, 0.0866292, -0.1141996, -0.0683255, 0.1714427, 0.0478721, -0.1272521, 0.0071386, 0.0702791, 0.2795704, 0.1382362, 0.0497521, -0.0072859, -0.0759085, 0.1515410, -0.2859357, 0.0240759, 0.2020010, 0.1238481, 0.1321241, 0.0819375, -0.2138997, 0.0558354, 0.1579982, -0.2150104, 0.1074586, 0.0024401, -0.1247269, -0.0333484, -0.0236595, 0.1178410, 0.0588869, -0.0641094, -0.1850018, 0.1547135, -0.0757735, -0.0364785, 0.1027481, -0.1211352, -0.2756481, -0.1893870, 0.0496321, 0.3014641, 0.2075378, -0.1781808, 0.0064128, -0.0294610, -0.0393102, 0.0896826, 0.0683493, -0.0549598, -0.0506094, -0.0971058, 0.0963682, 0.1522136, -0.0455345, 0.0095113, 0.2233396, 0.0725973, 0.0315475, -0.0182659, -0.0632561, -0.0857193, 0.0864774, -0.1571731, -0.0329865, 0.0323135, -0.0424525, 0.0059606, 0.0674332, -0.1538322, 0.1826669, 0.0625282, -0.0615552, -0.1089988, -0.0591035, -0.1223518, 0.0399527, 0.1469948, -0.2824569, 0.1846344, 0.2521955, 0.0787890, 0.1556946, 0.0666385, 0.0054201, 0.0698593, -0.0917692, -0.1894615, -0.0160902, 0.1157661, 0.0065906, -0.0057458, -0.0062599),
    '35_1_3_20170104214457383.jpg.chip.jpg': (-0.1601915, 0.1188189, 0.0614295, -0.0759415, -0.1491028, -0.0616826, 0.0302135, -0.1504184, 0.1503436, 0.0001534, 0.2023259, -0.0485824, -0.2742945, -0.0096895, -0.0733819, 0.1447450, -0.1264151, -0.1327503, -0.1047905, 0.0107006, 0.0333638, -0.0340236, 0.0725423, 0.1403411, -0.0805859, -0.2699684, -0.0493435, -0.0869145, 0.0700627, -0.0686367, -0.0771108, 0.0025183, -0.2407284, -0.1011814, 0.0199909, 0.0917470, -0.0850788, -0.1205256, 0.1893192, -0.0813447, -0.2040397, -0.1008767, 0.0878173, 0.2310134, 0.2217206, 0.0196822, 0.0623151, -0.0984926, 0.1292168, -0.2577448, 0.0799593, 0.1131872, 0.1140765, 0.0242490, 0.0479288, -0.1945004, 0.0254435, 0.2163081, -0.1957676, 0.1040320, 0.0995666, -0.0311673, -0.0495413, -0.1001692, 0.1935138, 0.0680418, -0.1115227, -0.1229286, 0.2062566, -0.1690128, 0.0135440, 0.0971524, -0.1364906, -0.2573171, -0.2504446, 0.0092252, 0.3853599, 0.1987406, -0.1215564, 0.0080450, -0.0741781, 0.0047068, 0.0236643, 0.0457545, -0.0419701, 0.0065695, -0.1645124, 0.0474634, 0.2126406, -0.0606801, 0.0346003, 0.2554625, 0.0251917, -0.0643953, -0.0307466, 0.0520621, -0.1064395, 0.0572100, -0.1701312, 0.0148549, 0.0067709, -0.0392697, 0.0235777, 0.0839425, -0.1643615, 0.0525988, -0.0060353, 0.0126089, -0.0512064, -0.1134854, -0.1267747, -0.0838046, 0.1534539, -0.2072178, 0.1728217, 0.1775031, 0.0646210, 0.0935303, 0.0375328, 0.0320240, 0.1158557, -0.0562138, -0.1501850, -0.0201014, 0.1245571, -0.1043469, 0.0529554, 0.0462996),
}

needs_package = pytest.mark.skipif(dlib_resnet.package_file() is None,
                                   reason="face-recognition-models==0.3.0 is not installed (dlib's weights)")


def _pattern(k: int) -> np.ndarray:
    y, x = np.mgrid[0:150, 0:150].astype(np.int64)
    chans = [((x * (3 + k) + y * (5 + 2 * c) + 40 * c * k) ^ (x * y // (7 + k))) % 256 for c in range(3)]
    return np.stack(chans, -1).astype(np.uint8)


def _utk_chip(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)[25:175, 25:175]


def _dlib_input(rgb: np.ndarray) -> torch.Tensor:
    """What dlib's input layer does: subtract the stored means, divide by 256."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    return (x - torch.tensor(dlib_resnet.MEAN_RGB).view(1, 3, 1, 1)) / dlib_resnet.SCALE


def _check(net, images: dict, reference: dict) -> None:
    with torch.no_grad():
        got = net(torch.cat([_dlib_input(images[k]) for k in reference])).double()
    want = torch.tensor([reference[k] for k in reference], dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
    assert cos.min().item() >= 0.9999999, cos
    assert (got - want).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def dlib_net():
    if dlib_resnet.package_file() is None:
        pytest.skip("face-recognition-models==0.3.0 is not installed (dlib's weights)")
    net, loaded = dlib_resnet.dlib_face_resnet("package")
    assert loaded
    return net.eval()


# ----------------------------------------------------------------------------------- the network itself
def test_torch_network_equals_dlibs_descriptors(dlib_net):
    _check(dlib_net, {k: _pattern(int(k[-1])) for k in PATTERN_REFERENCE}, PATTERN_REFERENCE)
    # the same input through the model's own preprocessing (uint8 -> Preprocessing mean/std) gives the same
    pre = models.create_model("age_gender_race").preprocessing
    from models.preprocess import normalize

    u8 = torch.from_numpy(_pattern(0)).permute(2, 0, 1)[None]
    assert torch.allclose(normalize(u8, pre), _dlib_input(_pattern(0)), atol=1e-5)


def test_torch_network_equals_dlib_on_real_faces(dlib_net, shared_data):
    images = {k: _utk_chip(shared_data / "utkface" / k) for k in UTK_REFERENCE}
    _check(dlib_net, images, UTK_REFERENCE)
    with torch.no_grad():
        a, b = (dlib_net(_dlib_input(images[k])) for k in UTK_REFERENCE)
    # two different people (a man, 26, and a woman, 35): dlib's same-person threshold is a distance of 0.6
    assert (a - b).norm().item() > 0.6


@needs_package
def test_file_structure_as_documented():
    info, layers = dlib_resnet.parse(dlib_resnet.package_file().read_bytes())
    kinds = [ly["kind"] for ly in layers]
    assert kinds.count("con") == 29 and kinds.count("affine") == 29 and kinds.count("fc") == 1
    assert info["size"] == (150, 150) and info["means"] == pytest.approx(dlib_resnet.MEAN_RGB, abs=1e-3)
    convs = [ly for ly in layers if ly["kind"] == "con"]
    assert all((ly["pad_y"] == 0) == (ly["stride_y"] == 2) for ly in convs)  # stride 2 <=> no padding
    net = dlib_resnet.DlibFaceResNet()
    assert dlib_resnet.n_parameters(net) == 5_614_592
    with torch.no_grad():
        fmap = net.features(torch.zeros(1, 3, 150, 150))
    assert tuple(fmap.shape) == (1, 256, 2, 2)


def test_add_prev_zero_pads_the_smaller_tensor():
    a = torch.ones(1, 2, 3, 3)
    b = torch.full((1, 4, 4, 4), 2.0)
    s = dlib_resnet.add_prev(a, b)
    assert tuple(s.shape) == (1, 4, 4, 4)
    assert torch.all(s[:, :2, :3, :3] == 3) and torch.all(s[:, 2:] == 2) and torch.all(s[:, :, 3, :] == 2)


@needs_package
def test_loading_refuses_a_file_whose_hash_differs(tmp_path):
    bad = tmp_path / "dlib.dat"
    shutil.copyfile(dlib_resnet.package_file(), bad)
    with open(bad, "r+b") as f:  # one float of the first convolution changed
        f.seek(400)
        byte = f.read(1)
        f.seek(400)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(dlib_resnet.DlibFormatError, match="sha256"):
        dlib_resnet.load_weights(bad)
    with pytest.raises(dlib_resnet.DlibFormatError, match="sha256"):
        models.create_model("age_gender_race", backbone_weights=str(bad))
    # a truncated file read with its own hash is a clear format error, not a crash
    data = dlib_resnet.package_file().read_bytes()[:100_000]
    with pytest.raises(dlib_resnet.DlibFormatError, match="file ends"):
        dlib_resnet.parse(data)
    with pytest.raises(dlib_resnet.DlibFormatError, match="loss_metric_2"):
        dlib_resnet.parse(b"\x01\x01\x01\x04abcd")
    with pytest.raises(FileNotFoundError):
        dlib_resnet.load_weights(tmp_path / "absent.dat")


def test_model_builds_with_a_warning_when_the_package_is_absent(monkeypatch):
    monkeypatch.setattr(dlib_resnet, "package_file", lambda name=dlib_resnet.FILE: None)
    with pytest.warns(UserWarning, match="face-recognition-models"):
        m = models.create_model("age_gender_race")
    assert not m.backbone.pretrained
    with torch.no_grad():
        out = m(torch.randn(2, 3, 150, 150))
    assert tuple(out["age"].shape) == (2, 117)


# --------------------------------------------------------------------------------------- as a backbone
def test_defaults_template_and_preprocessing():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = models.create_model("age_gender_race")
    pre = m.preprocessing
    assert pre.size == (150, 150) and pre.resize == "stretch"
    assert isinstance(m.backbone, FaceBackbone) and m.backbone.out_features == 256
    # template: dlib's 150/0.25 chip; its eye centres sit between the eye corners of dlib's 5-point chip
    t = np.array(pre.template)
    corners = {"p0": (0.8595674595992, 0.2134981538014), "p1": (0.6460604764104, 0.2289674387677),
               "p2": (0.1205750620789, 0.2137274526848), "p3": (0.3340850613712, 0.2290642403242)}
    def chip(p):
        return (np.array(p) + 0.25) / 1.5 * 150
    assert np.allclose(t[0], (chip(corners["p2"]) + chip(corners["p3"])) / 2, atol=1.5)
    assert np.allclose(t[1], (chip(corners["p0"]) + chip(corners["p1"])) / 2, atol=1.5)
    assert t[0, 0] < t[2, 0] < t[1, 0] and t[1, 1] < t[2, 1] < t[3, 1]  # eyes, then nose, then mouth
    assert abs((t[0, 0] + t[1, 0]) / 2 - 75) < 1.5  # centred
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = models.create_model("age_gender_race", image_size=120)
    assert np.allclose(np.array(small.preprocessing.template), t * 120 / 150)
    with pytest.raises(ValueError, match="image_size"):
        models.create_model("age_gender_race", image_size=102)  # dlib_resnet.min_input_size()
    with pytest.raises(ValueError, match="backbone"):
        models.create_model("age_gender_race", backbone="vgg")
    with pytest.raises(ValueError, match="depth"):
        models.create_model("age_gender_race", backbone="dlib_resnet", depth=18)
    with pytest.raises(ValueError, match="backbone_freeze"):
        models.create_model("age_gender_race", backbone_freeze="some")
    resnet = models.create_model("age_gender_race", depth=18, image_size=64)  # the ResNet option stays
    assert resnet.preprocessing.size == (64, 64) and hasattr(resnet.backbone, "layer4")


def _trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_freezing_freezes_and_the_trunk_learns_slower():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = models.create_model("age_gender_race")
        part = models.create_model("age_gender_race", backbone_freeze=3, backbone_lr_scale=0.05)
        full = models.create_model("age_gender_race", backbone_freeze="none")
    assert _trainable(frozen.backbone) == 0
    opt = engine.make_optimizer(frozen, frozen.recipe)
    assert len(opt.param_groups) == 1 and sum(p.numel() for p in opt.param_groups[0]["params"]) == _trainable(frozen)

    net = part.backbone.net
    assert _trainable(net.conv1) == _trainable(net.level4) == _trainable(net.level3) == 0
    assert _trainable(net.level2) > 0 and _trainable(net.level0) > 0 and _trainable(net.fc) == 0  # fc unused
    opt = engine.make_optimizer(part, part.recipe)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 5e-5])
    assert full.backbone.trainable_parameters() and _trainable(full.backbone.net.conv1) > 0

    # one optimisation step: frozen weights do not move, the heads do
    batch = {"image": np.random.default_rng(0).integers(0, 255, (4, 3, 150, 150), dtype=np.uint8),
             "t:age": np.array([20, 30, 40, 50], np.float32), "t:gender": np.array([0, 1, 0, 1], np.float32),
             "t:race": np.array([0, 1, 2, 3], np.float32)}
    for m, moved in ((frozen, False), (part, True)):
        m.train()
        opt = engine.make_optimizer(m, m.recipe)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        engine.train_step(m, batch, opt, torch.device("cpu"))
        after = m.state_dict()
        assert torch.equal(before["backbone.net.conv1.weight"], after["backbone.net.conv1.weight"])
        assert not torch.equal(before["heads.age.weight"], after["heads.age.weight"])
        assert torch.equal(before["backbone.net.level0.0.conv1.weight"],
                           after["backbone.net.level0.0.conv1.weight"]) != moved


def test_frozen_trunk_outputs_are_cached():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = models.create_model("age_gender_race").train()
    bb = m.backbone
    x = torch.randn(6, 3, 150, 150)
    with torch.no_grad():
        m.eval()  # labeling and serving: never cached
        bb(x), bb(x)
        assert bb.cache_hits == bb.cache_misses == 0 and not bb._cache
        m.train()
        first = bb(x)
        assert (bb.cache_hits, bb.cache_misses) == (0, 6)
        again = bb(x[[4, 1]])
        assert (bb.cache_hits, bb.cache_misses) == (2, 6)
        mixed = bb(torch.cat([x[:1], torch.randn(1, 3, 150, 150)]))
        assert (bb.cache_hits, bb.cache_misses) == (3, 7)
        direct = bb.net.pooled(x)
    assert torch.allclose(first, direct, atol=1e-5) and torch.equal(again, first[[4, 1]])
    assert torch.equal(mixed[0], first[0])
    # new weights empty the cache: the same input is computed again, with the new weights
    sd = {k: v * 1.5 if k.endswith("level0.0.affine2.weight") else v for k, v in bb.state_dict().items()}
    bb.load_state_dict(sd)
    with torch.no_grad():
        changed = bb(x[:2])
    assert bb.cache_misses == 9 and not torch.allclose(changed, first[:2])
    # a trainable trunk is never cached
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ft = models.create_model("age_gender_race", backbone_freeze="none").backbone
    with torch.no_grad():
        ft(x[:2]), ft(x[:2])
    assert ft.cache_hits == ft.cache_misses == 0


@needs_package
def test_checkpoint_round_trips_and_labels_the_same(tmp_path, monkeypatch):
    torch.manual_seed(3)
    m = models.create_model("age_gender_race", backbone_freeze=5)
    with torch.no_grad():  # as if trained: heads and the trainable trunk layers moved
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    m.eval()
    uri = str(tmp_path / "agr_dlib.pt")
    save_checkpoint(m, uri)
    u8 = torch.from_numpy(np.stack([_pattern(k) for k in range(3)])).permute(0, 3, 1, 2)
    with torch.no_grad():
        want = m(m.prepare(u8))
    for absent in (False, True):  # with or without the package, the checkpoint's own weights are used
        if absent:
            monkeypatch.setattr(dlib_resnet, "package_file", lambda name=dlib_resnet.FILE: None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded, info = load_checkpoint(uri)
        with torch.no_grad():
            got = loaded(loaded.prepare(u8))
        assert all(torch.allclose(want[k], got[k], atol=1e-5) for k in want)
        assert loaded.to_columns(got) == m.to_columns(want)
        assert info.preprocessing["template"] is not None and tuple(info.preprocessing["size"]) == (150, 150)


@needs_package
@pytest.mark.slow
def test_short_training_on_utkface_beats_from_scratch(shared_data):
    """Same faces, same steps (3 epochs of 480 faces, batch 32), same recipe: the frozen pretrained face trunk
    against the project's from-scratch configuration (ResNet-18 at 64 px, docs/results.md). Measured on
    2026-11-29 (team machine, loaded): gender 78.1 % against 63.3 %, race 46.9 % against 48.0 %, age MAE 8.6
    against 7.5 (with 45 steps the 117-way age head on a fixed embedding is still far from trained; the full
    runs are in docs/results.md). The assertions keep a margin below those figures."""
    from facedata.datasets import read_dataset

    ds = read_dataset(f"utkface:{shared_data / 'utkface'}")
    train = ds.split("train").iloc[:480]
    test = ds.split("test").iloc[:256]
    results = {}
    with torch_threads(2):  # as when run alone: earlier tests set other counts, and so other float sums
        for name, kw in (("dlib", {}), ("scratch", {"depth": 18, "image_size": 64})):
            torch.manual_seed(0)
            m = models.create_model("age_gender_race", **kw)
            engine.fit(m, train, test.iloc[:32], epochs=3, batch_size=32, log_fn=None)
            results[name] = engine.evaluate_table(m, test, batch_size=64)
    dlib, scratch = results["dlib"], results["scratch"]
    print({k: {m: round(v, 4) for m, v in r.items() if m.endswith((".accuracy", ".mae", ".rmse"))}
           for k, r in results.items()})  # pytest -s shows the figures
    # 45 steps on 256 test faces are noisy: the same test gave dlib 78.1 % alone and 71.1 % inside the full
    # suite (other torch thread settings before it, so other float sums); the margins hold for both.
    assert dlib["gender.accuracy"] >= scratch["gender.accuracy"] + 0.05, results
    assert dlib["mean_accuracy"] >= scratch["mean_accuracy"] + 0.02, results
    assert math.isfinite(dlib["age.rmse"]) and dlib["age.mae"] < 15.0, results  # below the constant answer's 15.5


@needs_package
@pytest.mark.slow
def test_hmtnet_on_the_face_trunk_learns_beauty_on_real_scut_faces(shared_data):
    """hmtnet with dlib's trunk (frozen, its levels cached), 3 epochs of 320 SCUT-FBP5500 faces read whole, tested
    on 128 others: the beauty scores follow the raters'. The full run (docs/results.md, 2026-12-04) reached a
    test PC of 0.869 through detection; from random weights the VGG-M network reached 0.745 in 28 minutes."""
    from facedata.datasets import read_dataset

    ds = read_dataset(f"scut_fbp5500:{shared_data / 'scut_fbp5500'}")
    train, test = ds.split("train").iloc[:320], ds.split("test").iloc[:128]
    torch.manual_seed(0)
    with torch_threads(2):
        m = models.create_model("hmtnet", backbone="dlib_resnet", **ds.model_overrides("hmtnet"))
        engine.fit(m, train, test.iloc[:32], epochs=3, batch_size=32, lr=3e-4, log_fn=None)
    assert m.trunk.frozen and m.trunk.cache_hits > 0  # later epochs read the trunk's outputs from its cache
    result = engine.evaluate_table(m, test, batch_size=64)
    print({k: round(v, 4) for k, v in result.items() if k.startswith(("beauty.", "gender.acc", "race.acc"))})
    # measured 2026-12-04: PC 0.699 (gender 100 %, race 99.2 %; 12 s); a constant or untrained head gives about 0.
    # 3 epochs leave the scores' level off (MAE 0.59): the correlation is what this budget shows
    assert result["beauty.pearson"] >= 0.55, result


@pytest.mark.parametrize("name,kw,out", [("task_attention", {}, {"smile": (2, 2), "gender": (2, 2)}),
                                         ("dmm_cnn", {"num_landmarks": 0}, {"attributes": (2, 40)}),
                                         ("hmtnet", {}, {"gender": (2, 2), "race": (2, 2), "beauty": (2,)})])
def test_other_models_take_the_face_trunk(name, kw, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = models.create_model(name, backbone="dlib_resnet", image_size=150, **kw).eval()
    assert m.preprocessing.mean == pytest.approx(tuple(v / 255 for v in dlib_resnet.MEAN_RGB))
    with torch.no_grad():
        got = m(torch.randn(2, 3, 150, 150))
    assert {k: tuple(v.shape) for k, v in got.items()} == out
    if dlib_resnet.package_file() is not None:  # the trunk carries dlib's weights
        sd = dlib_resnet.load_weights()
        conv = next(mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d))
        assert torch.equal(conv.weight, sd["conv1.weight"])
    with pytest.raises(ValueError, match="at least 103"):
        models.create_model(name, backbone="dlib_resnet", image_size=64, **kw)
    with pytest.raises(ValueError, match="backbone"):
        models.create_model(name, backbone="vgg", **kw)
