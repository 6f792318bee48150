"""HMTNet (gender, race, beauty) and the age/gender/race network: shapes, parameter counts, losses worked by
hand, decoding, task weights, aggregation variants and backbone weight loading."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

import models
from models.checkpoint import load_checkpoint, save_checkpoint
from models.losses import smooth_huber_loss

SMALL_HMT = {"image_size": 112, "anet_width": 32}  # fast CPU configuration


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _conv(cin, cout, k):
    return cin * cout * k * k + cout


def _bn(c):
    return 2 * c


# --------------------------------------------------------------------------------------------- HMTNet
def test_registry_lists_both_models():
    names = models.list_models()
    assert "hmtnet" in names and "age_gender_race" in names


def test_hmtnet_default_shapes_taps_and_parameter_count():
    m = models.create_model("hmtnet").eval()
    assert m.preprocessing.size == (224, 224) and m.preprocessing.resize_shorter == 227
    assert m.preprocessing.resize == "shorter_center_crop"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        taps = m.trunk(x)
        out = m(x)
    # Table 1: the input of GNet (relu3) and RNet (relu5) is 13 x 13 x 512 at 224 px.
    assert taps["relu3"].shape == taps["relu5"].shape == (2, 512, 13, 13)
    assert out["gender"].shape == (2, 2) and out["race"].shape == (2, 2) and out["beauty"].shape == (2,)
    assert all(torch.isfinite(v).all() for v in out.values())
    with pytest.raises(ValueError, match="image_size=112"):  # fc6 is 6x6: a 112 px input needs its own model
        m(torch.randn(1, 3, 112, 112))

    trunk = (_conv(3, 96, 7) + _bn(96) + _conv(96, 256, 5) + _bn(256) + _conv(256, 512, 3) + _bn(512)
             + 2 * (_conv(512, 512, 3) + _bn(512)))
    branch = lambda n: _conv(512, 256, 3) + _bn(256) + _conv(256, 128, 3) + _bn(128) + _conv(128, n, 1)  # noqa: E731
    anet = _conv(512, 4096, 6) + _bn(4096) + _conv(4096, 4096, 1) + _bn(4096) + _conv(4096, 1, 1)
    assert _n_params(m.trunk) == trunk == 6_532_416
    assert _n_params(m) == trunk + 2 * branch(2) + anet == 101_787_717


def test_hmtnet_smaller_input_and_too_small_input():
    m = models.create_model("hmtnet", image_size=112).eval()
    assert m.preprocessing.size == (112, 112) and m.preprocessing.resize_shorter == 114  # 227/224 kept
    with torch.no_grad():
        out = m(torch.randn(2, 3, 112, 112))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"gender": (2, 2), "race": (2, 2), "beauty": (2,)}
    assert m.anet.fc6.kernel_size == (2, 2)  # pool5 is 2x2 at 112 px
    with torch.no_grad():  # fully convolutional: a larger input works, a too small one is refused clearly
        assert m(torch.randn(1, 3, 160, 160))["beauty"].shape == (1,)
        with pytest.raises(ValueError, match="at least 96 px"):
            m(torch.randn(1, 3, 90, 90))
    with pytest.raises(ValueError, match="image_size"):
        models.create_model("hmtnet", image_size=64)


def test_hmtnet_race_classes():
    m5 = models.create_model("hmtnet", race_classes=5, **SMALL_HMT).eval()
    assert m5.outputs["race"].classes == ("White", "Black", "Asian", "Indian", "Others")
    with torch.no_grad():
        assert m5(torch.randn(2, 3, 112, 112))["race"].shape == (2, 5)
    assert models.create_model("hmtnet", **SMALL_HMT).outputs["race"].classes == ("Asian", "Caucasian")
    assert models.create_model("hmtnet", race_classes=3, **SMALL_HMT).outputs["race"].classes == (
        "race_0", "race_1", "race_2")
    with pytest.raises(ValueError, match="race_classes"):
        models.create_model("hmtnet", race_classes=1)


def test_hmtnet_average_aggregator_feeds_anet():
    """The beauty score is ANet applied to the mean of conv3, relu3 and relu5 (the default levels)."""
    m = models.create_model("hmtnet", **SMALL_HMT).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        taps = m.trunk(x)
        by_hand = m.anet((taps["conv3"] + taps["relu3"] + taps["relu5"]) / 3)
        assert torch.allclose(m(x)["beauty"], by_hand, atol=1e-5)
        assert not torch.allclose(m.anet(taps["relu5"]), by_hand, atol=1e-3)
        assert torch.allclose(m(x)["race"], m.rnet(taps["relu5"]), atol=1e-5)  # RNet after relu5
        assert torch.allclose(m(x)["gender"], m.gnet(taps["relu3"]), atol=1e-5)  # GNet after relu3


def test_hmtnet_concat_aggregation():
    m = models.create_model("hmtnet", aggregation="concat", rnet_from="aggregate", **SMALL_HMT).eval()
    assert m.anet.fc6.in_channels == 3 * 512  # conv3 | relu3 | relu5 stacked depth-wise
    assert m.rnet.body[0].in_channels == 3 * 512 and m.gnet.body[0].in_channels == 512
    assert m.anet.fc8.in_channels == 3 * 32  # second aggregator: fc6 | fc7 | relu7
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out = m(x)
        taps = m.trunk(x)
        by_hand = m.anet(torch.cat([taps["conv3"], taps["relu3"], taps["relu5"]], 1))
    assert out["beauty"].shape == (2,) and out["race"].shape == (2, 2)
    assert torch.allclose(out["beauty"], by_hand, atol=1e-5)
    with pytest.raises(ValueError, match="aggregation"):
        models.create_model("hmtnet", aggregation="max")
    with pytest.raises(ValueError, match="aggregate_levels"):
        models.create_model("hmtnet", aggregate_levels=("relu9",))


def _outer(err: float, delta: float = 0.6) -> float:
    """Smooth Huber beyond δ: log cosh(δ) + tanh(δ)(|x| − δ) (models/losses.py says why)."""
    return math.log(math.cosh(delta)) + math.tanh(delta) * (abs(err) - delta)


def test_smooth_huber_by_hand_on_both_sides_of_delta():
    t = torch.tensor([3.0])
    assert smooth_huber_loss(torch.tensor([3.5]), t).item() == pytest.approx(math.log(math.cosh(0.5)), rel=1e-6)
    assert smooth_huber_loss(torch.tensor([2.4]), t).item() == pytest.approx(math.log(math.cosh(0.6)), rel=1e-5)
    assert smooth_huber_loss(torch.tensor([4.0]), t).item() == pytest.approx(_outer(1.0), rel=1e-6)
    assert smooth_huber_loss(torch.tensor([1.8]), t).item() == pytest.approx(_outer(1.2), rel=1e-6)
    both = smooth_huber_loss(torch.tensor([3.5, 4.0]), torch.tensor([3.0, 3.0]))
    assert both.item() == pytest.approx((math.log(math.cosh(0.5)) + _outer(1.0)) / 2, rel=1e-6)


def test_hmtnet_loss_by_hand_and_task_weights():
    m = models.create_model("hmtnet", **SMALL_HMT)
    out = m.outputs["beauty"]
    assert (out.loss_type, out.delta, out.range) == ("smooth_huber", 0.6, (1.0, 5.0))
    assert [o.weight for o in m.outputs] == [1.0, 1.0, 2.0]
    raw = {"gender": torch.zeros(2, 2), "race": torch.zeros(2, 2), "beauty": torch.tensor([3.5, 4.0])}
    targets = {"gender": torch.tensor([0.0, 1.0]), "race": torch.tensor([1.0, 0.0]),
               "beauty": torch.tensor([3.0, 3.0])}
    total, parts = m.loss(raw, targets)
    b = (math.log(math.cosh(0.5)) + _outer(1.0)) / 2
    assert parts["gender"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert parts["race"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert parts["beauty"].item() == pytest.approx(b, rel=1e-6)
    assert total.item() == pytest.approx(2 * math.log(2) + 2 * b, rel=1e-6)

    # A missing beauty label (NaN) leaves only the labelled row in the beauty loss.
    targets["beauty"] = torch.tensor([3.0, float("nan")])
    _, parts = m.loss(raw, targets)
    assert parts["beauty"].item() == pytest.approx(math.log(math.cosh(0.5)), rel=1e-6)

    # On a real forward pass the total is g + r + 2 b, and every branch and the trunk get gradients.
    torch.manual_seed(1)
    x = torch.randn(2, 3, 112, 112)
    targets = {"gender": torch.tensor([0.0, 1.0]), "race": torch.tensor([1.0, 0.0]),
               "beauty": torch.tensor([2.5, 4.1])}
    total, parts = m.loss(m(x), targets)
    assert total.item() == pytest.approx((parts["gender"] + parts["race"] + 2 * parts["beauty"]).item(), rel=1e-5)
    total.backward()
    for mod in (m.trunk.conv1, m.gnet.classifier, m.rnet.classifier, m.anet.fc8):
        assert mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0


def test_hmtnet_decode_names_and_clamped_score():
    m = models.create_model("hmtnet", race_classes=5, **SMALL_HMT)
    raw = {"gender": torch.tensor([[2.0, -1.0], [-1.0, 2.0]]),
           "race": torch.tensor([[0.0, 0.0, 0.0, 3.0, 0.0], [0.0, 3.0, 0.0, 0.0, 0.0]]),
           "beauty": torch.tensor([7.0, 3.25])}
    cols = m.to_columns(raw)
    assert cols["gender"] == ["male", "female"] and cols["race"] == ["Indian", "Black"]
    assert cols["beauty"] == pytest.approx([5.0, 3.25])


def test_hmtnet_recipe_is_the_papers():
    r = models.create_model("hmtnet", **SMALL_HMT).recipe
    assert (r.optimizer, r.lr, r.weight_decay, r.batch_size, r.epochs) == ("sgd", 1e-3, 0.05, 32, 170)
    assert (r.schedule, r.schedule_args) == ("step", {"step_size": 50, "gamma": 0.1})
    assert r.augment == {"random_crop": True, "rotation": 30, "color_jitter": 0.2}


def test_hmtnet_backbone_weights_round_trip(tmp_path):
    torch.manual_seed(2)
    src = models.create_model("hmtnet", **SMALL_HMT)
    with torch.no_grad():
        src.trunk.bn51.running_mean.uniform_()  # buffers travel too
    path = tmp_path / "trunk.pt"
    torch.save(src.trunk.state_dict(), path)
    torch.manual_seed(3)
    m = models.create_model("hmtnet", backbone_weights=str(path), **SMALL_HMT)
    assert m.config["backbone_weights"] == str(path)
    assert torch.equal(m.trunk.conv3.weight, src.trunk.conv3.weight)
    assert torch.equal(m.trunk.bn51.running_mean, src.trunk.bn51.running_mean)
    assert not torch.equal(m.anet.fc6.weight, src.anet.fc6.weight)  # only the trunk came from the file
    assert m.backbone_report == {"trunk": len(src.trunk.state_dict()), "anet": 0}

    # A VGG-M-Face style file (flat names, fc6/fc7 for ANet, an identity classifier fc8 that is ignored).
    flat = dict(src.trunk.state_dict())
    flat.update({k: v for k, v in src.anet.state_dict().items() if k.split(".")[0] in ("fc6", "bn54", "fc7", "bn55")})
    flat["fc8.weight"], flat["fc8.bias"] = torch.zeros(2622, 32), torch.zeros(2622)
    torch.save(flat, tmp_path / "vggm.pt")
    m2 = models.create_model("hmtnet", backbone_weights=str(tmp_path / "vggm.pt"), **SMALL_HMT)
    assert torch.equal(m2.anet.fc7.weight, src.anet.fc7.weight) and m2.backbone_report["anet"] > 0

    # A file that is not this trunk is refused, naming what is wrong.
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match="does not fit the HMTNet"):
        models.create_model("hmtnet", backbone_weights=str(tmp_path / "resnet.pt"), **SMALL_HMT)


def test_hmtnet_checkpoint_round_trip(tmp_path):
    m = models.create_model("hmtnet", aggregation="concat", race_classes=5, **SMALL_HMT).eval()
    uri = str(tmp_path / "hmt.ckpt")
    save_checkpoint(m, uri)
    loaded, info = load_checkpoint(uri)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        a, b = m(x), loaded(x)
    assert info.model == "hmtnet" and loaded.outputs["race"].classes == m.outputs["race"].classes
    assert all(torch.allclose(a[k], b[k]) for k in a)


def test_hmtnet_on_the_face_trunk_reads_its_levels_and_trains_only_its_heads(tmp_path):
    """backbone="dlib_resnet": dlib's chip as input, GNet on level1, RNet on level0, ANet on the three levels
    concatenated, Table 1's widths on 1x1 maps; the trunk frozen (cached in training) unless told otherwise."""
    from models.backbones import LEVEL_WIDTHS, FaceBackbone
    from models.dlib_resnet import chip_template

    m = models.create_model("hmtnet", backbone="dlib_resnet", backbone_weights="random").eval()
    assert isinstance(m.trunk, FaceBackbone) and m.trunk.frozen and m.preprocessing.size == (150, 150)
    assert torch.allclose(torch.tensor(m.preprocessing.template), torch.tensor(chip_template(150)))
    branch = lambda cin, n: _conv(cin, 256, 1) + _bn(256) + _conv(256, 128, 1) + _bn(128) + _conv(128, n, 1)  # noqa: E731
    # concatenation is the aggregation of both aggregators (the paper's one choice): fc8 reads fc6, fc7 and relu7
    anet = _conv(640, 1024, 1) + _bn(1024) + _conv(1024, 1024, 1) + _bn(1024) + _conv(3 * 1024, 1, 1)
    assert sum(LEVEL_WIDTHS) == 640 and m.trunk.out_features == 640
    (heads,) = m.optimizer_groups(1e-3)  # a frozen trunk: only the heads learn
    assert sum(p.numel() for p in heads["params"]) == 2 * branch(256, 2) + anet
    # which level each head reads: the trunk's output replaced by chosen vectors, one slice moved at a time
    base, x = torch.randn(2, 640), torch.zeros(2, 3, 150, 150)
    feed = [base]
    m.trunk._compute = lambda _: feed[0]
    with torch.no_grad():
        ref, moved = m(x), {}
        for name, (lo, hi) in {"level2": (0, 128), "level1": (128, 384), "level0": (384, 640)}.items():
            feed[0] = base.clone()
            feed[0][:, lo:hi] += 1.0
            out = m(x)
            moved[name] = {k for k in out if not torch.allclose(out[k], ref[k])}
    assert moved == {"level2": {"beauty"}, "level1": {"gender", "beauty"}, "level0": {"race", "beauty"}}
    del m.trunk._compute

    # training: the frozen trunk runs once per distinct input; fine-tuned, it learns at backbone_lr_scale x lr
    m.train()
    x = torch.rand(3, 3, 150, 150)
    m(x), m(x)
    assert (m.trunk.cache_misses, m.trunk.cache_hits) == (3, 3)
    tuned = models.create_model("hmtnet", backbone="dlib_resnet", backbone_weights="random", backbone_freeze="none",
                                backbone_lr_scale=0.1)
    heads, trunk = tuned.optimizer_groups(1e-3)
    assert trunk["lr"] == pytest.approx(1e-4) and {id(p) for p in trunk["params"]} == {
        id(p) for n, p in tuned.trunk.net.named_parameters() if not n.startswith("fc.")}
    uri = str(tmp_path / "hmt_dlib.pt")
    save_checkpoint(m.eval(), uri)
    loaded, info = load_checkpoint(uri)
    with torch.no_grad():
        a, b = m(x), loaded(x)
    assert info.config["backbone"] == "dlib_resnet" and all(torch.allclose(a[k], b[k]) for k in a)
    for bad, message in (({"aggregation": "avg"}, "needs levels of one width"), ({"gnet_from": "relu3"}, "gnet_from"),
                         ({"aggregate_levels": ("conv3",)}, "aggregate_levels"), ({"image_size": 96}, "at least 103")):
        with pytest.raises(ValueError, match=message):
            models.create_model("hmtnet", backbone="dlib_resnet", backbone_weights="random", **bad)
    with pytest.raises(ValueError, match="backbone_freeze is for the dlib_resnet backbone"):
        models.create_model("hmtnet", backbone_freeze="all", **SMALL_HMT)
    one_width = models.create_model("hmtnet", backbone="dlib_resnet", backbone_weights="random", aggregation="avg",
                                    aggregate_levels=("level1", "level0"))
    assert one_width.anet.fc6.in_channels == 256


# ------------------------------------------------------------------------------------ age / gender / race
def test_agr_default_shapes_and_parameter_count():
    m = models.create_model("age_gender_race", backbone="resnet").eval()  # the default is the dlib face trunk
    assert m.preprocessing.size == (160, 160) and m.preprocessing.resize == "stretch"
    with torch.no_grad():
        out = m(torch.randn(2, 3, 160, 160))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"age": (2, 117), "gender": (2, 2), "race": (2, 5)}
    trunk = 25_557_032 - (2048 * 1000 + 1000)  # torchvision ResNet-50 without its ImageNet classifier
    fc = (2048 * 512 + 512) + (512 * 256 + 256)
    heads = (256 * 117 + 117) + (256 * 2 + 2) + (256 * 5 + 5)
    assert _n_params(m.backbone) == trunk == 23_508_032
    assert _n_params(m) == trunk + fc + heads == 24_720_316
    assert isinstance(m.fc[1], torch.nn.LeakyReLU) and m.fc[1].negative_slope == 0.3


def test_agr_small_size_and_bad_arguments():
    m = models.create_model("age_gender_race", depth=18, image_size=64, hidden=(64,)).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"age": (2, 117), "gender": (2, 2), "race": (2, 5)}
    assert m.heads["age"].in_features == 64
    with pytest.raises(ValueError, match="depth"):
        models.create_model("age_gender_race", depth=7)
    with pytest.raises(ValueError, match="hidden"):
        models.create_model("age_gender_race", depth=18, hidden=(0,))
    with pytest.raises(ValueError, match="image_size"):
        models.create_model("age_gender_race", depth=18, image_size=16)


def _peaked(ages: list[int], bins: int = 117) -> torch.Tensor:
    logits = torch.full((bins,), -1e4)
    logits[ages] = 5.0
    return logits


def test_agr_expected_age_and_decode():
    m = models.create_model("age_gender_race", depth=18, image_size=64)
    age = m.outputs["age"]
    logits = torch.stack([_peaked([30]), _peaked([20, 40])])
    assert age.expected(logits).tolist() == pytest.approx([30.0, 30.0], abs=1e-3)
    raw = {"age": logits, "gender": torch.tensor([[-1.0, 1.0], [1.0, -1.0]]),
           "race": torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0]])}
    cols = m.to_columns(raw)
    assert cols["age"] == pytest.approx([30.0, 30.0], abs=1e-3) and cols["age_mode"][0] == 30
    assert cols["gender"] == ["female", "male"] and cols["race"] == ["Indian", "White"]


def test_agr_loss_equal_weights_by_hand():
    m = models.create_model("age_gender_race", depth=18, image_size=64)
    assert [o.weight for o in m.outputs] == [1.0, 1.0, 1.0]
    raw = {"age": torch.zeros(2, 117), "gender": torch.zeros(2, 2), "race": torch.zeros(2, 5)}
    targets = {"age": torch.tensor([30.0, 71.0]), "gender": torch.tensor([0.0, 1.0]), "race": torch.tensor([4.0, 2.0])}
    total, parts = m.loss(raw, targets)
    assert parts["age"].item() == pytest.approx(math.log(117), rel=1e-6)
    assert parts["gender"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert parts["race"].item() == pytest.approx(math.log(5), rel=1e-6)
    assert total.item() == pytest.approx(math.log(117) + math.log(2) + math.log(5), rel=1e-6)

    peaked = {"age": torch.stack([_peaked([30]), _peaked([71])]), "gender": raw["gender"], "race": raw["race"]}
    _, parts = m.loss(peaked, targets)
    assert parts["age"].item() == pytest.approx(0.0, abs=1e-4)  # all mass on the right age

    x = torch.randn(2, 3, 64, 64)
    total, parts = m.loss(m(x), targets)
    assert total.item() == pytest.approx(sum(p.item() for p in parts.values()), rel=1e-5)
    total.backward()
    assert m.backbone.conv1.weight.grad.abs().sum() > 0


def test_agr_backbone_weights_round_trip_and_checkpoint(tmp_path):
    torch.manual_seed(4)
    src = models.create_model("age_gender_race", depth=18, image_size=64)
    path = tmp_path / "r18.pt"
    torch.save(src.backbone.state_dict(), path)  # no fc: the loader accepts a headless trunk
    torch.manual_seed(5)
    m = models.create_model("age_gender_race", depth=18, image_size=64, backbone_weights=str(path)).eval()
    assert torch.equal(m.backbone.conv1.weight, src.backbone.conv1.weight)
    assert torch.equal(m.backbone.layer4[1].bn2.running_var, src.backbone.layer4[1].bn2.running_var)
    assert not torch.equal(m.heads["age"].weight, src.heads["age"].weight)
    with pytest.raises(ValueError, match="resnet50"):
        models.create_model("age_gender_race", depth=50, backbone_weights=str(path))

    uri = str(tmp_path / "agr.ckpt")
    save_checkpoint(m, uri)
    loaded, info = load_checkpoint(uri)  # rebuilt without re-reading backbone_weights
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = m(x), loaded(x)
    assert info.model == "age_gender_race" and all(torch.allclose(a[k], b[k]) for k in a)
