"""DMM-CNN (source 001) and the cross-task attention network (source 002): shapes, the paper's equations on
worked examples, the state that travels in checkpoints, and TMTL -> attention initialisation."""

from __future__ import annotations

import pytest
import torch

import models
from facedata.datasets import CELEBA_ATTRIBUTES
from models.checkpoint import load_checkpoint, save_checkpoint
from models.dmm_cnn import (
    OBJECTIVE_ATTRIBUTES,
    SUBJECTIVE_ATTRIBUTES,
    adaptive_thresholds,
    dynamic_weights,
    stabilise_weights,
)
from models.task_attention import TaskAttentionNet, context_attention, context_attention_reference, from_tmtl

J = len(CELEBA_ATTRIBUTES)


@pytest.fixture(scope="module")
def dmm():
    torch.manual_seed(0)
    return models.create_model("dmm_cnn").eval()


@pytest.fixture(scope="module")
def attention_model():
    torch.manual_seed(1)
    return models.create_model("task_attention").eval()


def _reset(m):
    m.attribute_weights.fill_(1.0)
    m.thresholds.fill_(0.0)
    m.prev_val_loss.fill_(float("nan"))


def _stats(loss_per_image, fp, fn, n, n_label=None):
    """Binary stats as the caller passes them: summed over the validation set (``n_label``: the images that
    have each attribute; default: all ``n``)."""
    per = torch.full((J,), float(n), dtype=torch.float64) if n_label is None else torch.tensor(n_label, dtype=torch.float64)
    return {"attributes": {
        "n": torch.tensor(float(n), dtype=torch.float64),
        "n_label": per,
        "loss_sum": torch.tensor(loss_per_image, dtype=torch.float64) * per,
        "fp": torch.tensor(fp, dtype=torch.float64), "fn": torch.tensor(fn, dtype=torch.float64),
        "tp": torch.zeros(J, dtype=torch.float64), "correct": torch.zeros(J, dtype=torch.float64),
    }}


# ------------------------------------------------------------------------------------------- DMM-CNN


def test_dmm_forward_shapes_at_two_input_sizes_and_celeba_order(dmm):
    assert dmm.preprocessing.size == (218, 178)
    maps = []
    hook = dmm.trunk.register_forward_hook(lambda mod, inp, out: maps.append(out))
    try:
        for h, w in ((96, 96), (128, 112)):
            maps.clear()
            with torch.no_grad():
                out = dmm(torch.randn(2, 3, h, w))
                assert out["attributes"].shape == (2, J)
                assert out["landmarks"].shape == (2, 10)
                # The objective branch's scores land on their CelebA columns, the subjective ones on theirs.
                obj = dmm.objective_head(dmm.spp_objective(maps[0]))
                subj = dmm.subjective_head(dmm.spp_subjective(maps[0]))
            obj_cols = [CELEBA_ATTRIBUTES.index(a) for a in dmm.objective]
            subj_cols = [CELEBA_ATTRIBUTES.index(a) for a in dmm.subjective]
            torch.testing.assert_close(out["attributes"][:, obj_cols], obj)
            torch.testing.assert_close(out["attributes"][:, subj_cols], subj)
    finally:
        hook.remove()
    assert dmm.outputs["attributes"].labels == tuple(CELEBA_ATTRIBUTES)
    assert dmm.outputs["attributes"].loss_type == "mse_pm1"
    r = dmm.recipe
    assert (r.optimizer, r.lr, r.batch_size, r.epochs, r.schedule) == ("sgd", 1e-3, 64, 15, "plateau")
    assert r.schedule_args == {"factor": 0.1, "patience": 1} and r.validate_every == 1000


def test_spp_feature_sizes(dmm):
    for side in (3, 4, 7):  # res5 maps of 96 px, 128 px and 224 px inputs
        fmap = torch.randn(1, 2048, side, side + 1)
        assert dmm.spp_objective(fmap).shape == (1, 2048)
        assert dmm.spp_subjective(fmap).shape == (1, 28_672)
    # level 2 of the 3-level SPP: the max over each quadrant of a 4x4 map
    fmap = torch.arange(16.0).reshape(1, 1, 4, 4)
    from models.dmm_cnn import SpatialPyramidPooling

    assert SpatialPyramidPooling((1, 2)).forward(fmap).tolist() == [[15.0, 5.0, 7.0, 13.0, 15.0]]
    assert dmm.objective_head[0].in_features == 2048 and dmm.landmark_head[0].in_features == 2048
    assert dmm.subjective_head[0].in_features == 28_672
    assert [m.out_features for m in dmm.subjective_head if isinstance(m, torch.nn.Linear)] == [2048, 1024, 18]
    assert [m.out_features for m in dmm.objective_head if isinstance(m, torch.nn.Linear)] == [1024, 22]


def test_attribute_split_is_22_plus_18_distinct_celeba_names(dmm):
    assert len(OBJECTIVE_ATTRIBUTES) == 22 and len(SUBJECTIVE_ATTRIBUTES) == 18
    assert len(set(OBJECTIVE_ATTRIBUTES) | set(SUBJECTIVE_ATTRIBUTES)) == 40
    assert set(OBJECTIVE_ATTRIBUTES) | set(SUBJECTIVE_ATTRIBUTES) == set(CELEBA_ATTRIBUTES)
    # Fig. 1, and §4.2's "MouthOpen" (objective) and "Young" (subjective)
    assert {"Eyeglasses", "Bangs", "Wearing_Hat", "Mouth_Slightly_Open"} <= set(OBJECTIVE_ATTRIBUTES)
    assert {"Smiling", "Pointy_Nose", "Big_Lips", "Young", "Bushy_Eyebrows"} <= set(SUBJECTIVE_ATTRIBUTES)
    assert set(dmm.objective) == set(OBJECTIVE_ATTRIBUTES)
    with pytest.raises(ValueError, match="not CelebA attribute names"):
        models.create_model("dmm_cnn", objective=("Eyeglasses", "Sunglasses"))
    with pytest.raises(ValueError, match="num_landmarks"):
        models.create_model("dmm_cnn", num_landmarks=-1)


def test_eq4_dynamic_weights_worked_example():
    loss = torch.tensor([0.5, 0.8, 0.3, 0.4])
    prev = torch.tensor([1.0, 0.8, 0.2, 0.0])
    # |0.5-1.0|/1.0 = 0.5 ; |0.8-0.8|/0.8 = 0 ; |0.3-0.2|/0.2 = 0.5 ; previous loss 0 -> 0
    raw = dynamic_weights(loss, prev)
    torch.testing.assert_close(raw, torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(stabilise_weights(raw, "raw"), raw)
    torch.testing.assert_close(stabilise_weights(raw, "floor", 1e-3),
                               torch.tensor([0.5, 0.001, 0.5, 0.001], dtype=torch.float64))
    # renormalised to mean 1: sum 1.0 over 4 attributes -> x4
    torch.testing.assert_close(stabilise_weights(raw, "renormalise"),
                               torch.tensor([2.0, 0.0, 2.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(stabilise_weights(torch.zeros(3), "renormalise"), torch.ones(3))
    with pytest.raises(ValueError, match="weight_mode"):
        stabilise_weights(raw, "softmax")


def test_eq6_adaptive_thresholds_worked_example():
    tau = torch.tensor([0.0, 0.1, -0.2])
    fp, fn = torch.tensor([30.0, 5.0, 10.0]), torch.tensor([10.0, 25.0, 10.0])
    # γ l (FP - FN) / V with γ = 0.01, l = 3, V = 200: 0.03·20/200 = 0.003, 0.03·(-20)/200 = -0.003, 0
    new = adaptive_thresholds(tau, fp, fn, n=200, epoch=3, gamma=0.01)
    torch.testing.assert_close(new, torch.tensor([0.003, 0.097, -0.2], dtype=torch.float64))
    with pytest.raises(ValueError, match="V > 0"):
        adaptive_thresholds(tau, fp, fn, n=0, epoch=1)


def test_thresholds_are_applied_when_decoding(dmm):
    _reset(dmm)
    raw = {"attributes": torch.zeros(1, J), "landmarks": torch.full((1, 10), 0.5)}
    raw["attributes"][0, 0] = 0.2
    try:
        dmm.thresholds[0] = 0.1
        assert dmm.to_columns(raw)["5_o_Clock_Shadow"] == [True]
        dmm.thresholds[0] = 0.3
        assert dmm.to_columns(raw)["5_o_Clock_Shadow"] == [False]
        # evaluation statistics use the same thresholds: target +1, score 0.2 <= 0.3 -> a false negative
        st = dmm.stats(raw, {"attributes": torch.ones(1, J)})["attributes"]
        assert st["fn"][0] == 1 and st["tp"][0] == 0
    finally:
        _reset(dmm)


def test_on_validation_updates_lambda_and_tau_identically_on_two_models(dmm):
    _reset(dmm)
    assert dmm.weight_mode == "renormalise"  # the default; this worked example uses the floor mode
    dmm.weight_mode = "floor"
    other = models.create_model("dmm_cnn", num_landmarks=0, weight_mode="floor")  # a second worker (and DMM-FAC)
    assert "landmarks" not in other.outputs.names()
    with torch.no_grad():
        assert set(other(torch.randn(1, 3, 64, 64))) == {"attributes"}
    fp, fn = [0.0] * J, [0.0] * J
    fp[0], fn[1] = 40.0, 20.0
    first = _stats([1.0] * J, fp, fn, n=400)
    loss2 = [1.0] * J
    loss2[0], loss2[1], loss2[2] = 0.75, 1.0, 1.2
    second = _stats(loss2, [0.0] * J, [0.0] * J, n=400)
    for m in (dmm, other):
        m.on_validation(first, epoch=1)
        # τ: 0.01·1·40/400 = 0.001 and 0.01·1·(-20)/400 = -0.0005; λ kept at 1 (no L(t-1) yet)
        assert m.thresholds[0].item() == pytest.approx(0.001)
        assert m.thresholds[1].item() == pytest.approx(-0.0005)
        assert torch.equal(m.attribute_weights, torch.ones(J))
        logs = m.on_validation(second, epoch=2)
        # λ: |0.75-1|/1 = 0.25, |1-1|/1 = 0 -> floor 0.001, |1.2-1|/1 = 0.2
        assert m.attribute_weights[0].item() == pytest.approx(0.25)
        assert m.attribute_weights[1].item() == pytest.approx(0.001)
        assert m.attribute_weights[2].item() == pytest.approx(0.2)
        assert logs["dmm.raw_weights_zero"] == J - 2
        assert m.thresholds[0].item() == pytest.approx(0.001)  # FP = FN = 0: unchanged
    for name in ("attribute_weights", "thresholds", "prev_val_loss"):
        assert torch.equal(getattr(dmm, name), getattr(other, name))
    dmm.weight_mode = "renormalise"
    dmm.on_validation(first, epoch=3)  # rates |1-0.75|/0.75 = 1/3, 0, |1-1.2|/1.2 = 1/6, 0... -> mean 1
    assert dmm.attribute_weights.mean().item() == pytest.approx(1.0)
    assert dmm.attribute_weights[0].item() == pytest.approx((1 / 3) * J / 0.5, rel=1e-5)
    with pytest.raises(ValueError, match="epoch counts from 1"):
        other.on_validation(second, epoch=0)
    with pytest.raises(ValueError, match="no image with attribute labels"):
        other.on_validation(_stats([1.0] * J, fp, fn, n=0), epoch=1)
    with pytest.raises(ValueError, match="summed stats"):
        other.on_validation({"landmarks": {"n": torch.tensor(3.0)}}, epoch=1)
    _reset(dmm)


def test_on_validation_leaves_attributes_without_validation_values_alone(dmm):
    """A mix (CelebA's 40 attributes + GENKI-4K's smile + a gender manifest) can have a validation part in
    which some attributes have no value at all: Eq. 4 and 6 have nothing to read for them, so their λ and τ
    stay; the others move exactly as with complete data."""
    _reset(dmm)
    dmm.weight_mode = "floor"
    fp, fn = [0.0] * J, [0.0] * J
    fp[0], fp[1] = 40.0, 40.0
    seen = [400.0] * J
    seen[1] = 0.0  # attribute 1 has no validation value (and so no FP either in real stats)
    fp[1] = 0.0
    dmm.on_validation(_stats([1.0] * J, fp, fn, n=400, n_label=seen), epoch=1)
    assert dmm.thresholds[0].item() == pytest.approx(0.001)
    assert dmm.thresholds[1].item() == 0.0
    assert torch.isnan(dmm.prev_val_loss[1]) and dmm.prev_val_loss[0].item() == pytest.approx(1.0)
    loss2 = [1.0] * J
    loss2[0], loss2[1] = 0.75, 5.0  # attribute 1's "loss" is 0 / 0: must not be read
    dmm.on_validation(_stats(loss2, [0.0] * J, [0.0] * J, n=400, n_label=seen), epoch=2)
    assert dmm.attribute_weights[0].item() == pytest.approx(0.25)
    assert dmm.attribute_weights[1].item() == 1.0  # kept, not floored to 0.001
    assert dmm.attribute_weights[2].item() == pytest.approx(0.001)
    assert torch.isnan(dmm.prev_val_loss[1])
    dmm.weight_mode = "renormalise"
    _reset(dmm)


def test_lambda_weights_the_attribute_losses(dmm):
    _reset(dmm)
    torch.manual_seed(3)
    scores = torch.randn(3, J, requires_grad=True)
    target = torch.where(torch.rand(3, J) > 0.5, 1.0, -1.0)
    target[2] = float("nan")  # an image without attribute labels is left out
    pts = torch.rand(3, 10, requires_grad=True)
    pts_target = torch.rand(3, 10)
    lam = torch.linspace(0.0, 2.0, J)
    dmm.attribute_weights.copy_(lam)
    try:
        total, parts = dmm.loss({"attributes": scores, "landmarks": pts},
                                {"attributes": target, "landmarks": pts_target})
        s, y, p, q = scores.tolist(), target.tolist(), pts.tolist(), pts_target.tolist()
        fac = sum(lam[j].item() * sum((s[i][j] - y[i][j]) ** 2 for i in range(2)) / 2 for j in range(J))
        fld = sum(sum((p[i][k] - q[i][k]) ** 2 for k in range(10)) for i in range(3)) / 3
        assert total.item() == pytest.approx(fac + 0.5 * fld, rel=1e-5)
        assert parts["attributes"].item() == pytest.approx(fac, rel=1e-5)
        assert parts["landmarks"].item() == pytest.approx(fld, rel=1e-5)
        total.backward()
        assert torch.all(scores.grad[:, 0] == 0)  # λ_0 = 0: the first attribute gets no gradient
        assert torch.all(scores.grad[2] == 0) and scores.grad[:2, 1:].abs().sum() > 0
    finally:
        _reset(dmm)


def test_dmm_checkpoint_round_trip_keeps_thresholds_and_outputs(dmm, tmp_path):
    _reset(dmm)
    torch.manual_seed(4)
    dmm.thresholds.copy_(torch.randn(J) * 0.1)
    dmm.attribute_weights.copy_(torch.rand(J))
    dmm.prev_val_loss.copy_(torch.rand(J))
    try:
        path = str(tmp_path / "dmm.ckpt")
        digest = save_checkpoint(dmm, path, metrics={"mean_accuracy": 0.5})
        loaded, info = load_checkpoint(path)
        assert info.hash == digest and info.model == "dmm_cnn"
        for name in ("thresholds", "attribute_weights", "prev_val_loss"):
            assert torch.equal(getattr(loaded, name), getattr(dmm, name))
        x = torch.randn(2, 3, 96, 80)
        with torch.no_grad():
            a, b = dmm(x), loaded(x)
        for k in a:
            assert torch.equal(a[k], b[k])
        assert loaded.to_columns(b) == dmm.to_columns(a)
        torch.testing.assert_close(loaded.column_context()["attributes"]["thresholds"], dmm.thresholds)
    finally:
        _reset(dmm)


# ------------------------------------------------------------------------------- cross-task attention


@pytest.mark.parametrize("shared", [False, True])
def test_vectorised_attention_equals_the_per_unit_loop(shared):
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(3, 64, generator=g, dtype=torch.float64), torch.randn(3, 64, generator=g, dtype=torch.float64)
    n = 1 if shared else 64
    wx, wc = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(context_attention(x, c, wx, wc), context_attention_reference(x, c, wx, wc),
                               atol=1e-6, rtol=0)


def test_attention_forward_follows_eq_3_to_12(attention_model):
    m = attention_model
    assert m.preprocessing.size == (224, 224)
    r = m.recipe
    assert (r.optimizer, r.lr, r.batch_size, r.epochs, r.schedule) == ("adam", 1e-3, 64, 30, "milestones")
    assert r.schedule_args == {"milestones": [25], "gamma": 0.1} and r.augment == {"hflip": 0.5, "shift": 0.1}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = m(x)
        xs, xg = m.task_units(x)
    assert out["smile"].shape == (2, 2) and out["gender"].shape == (2, 2)
    assert m.att_smile.w_x.shape == (64,) and m.att_gender.w_c.shape == (64,)
    # smile units attended with the gender context (Eq. 3-6), gender units with the smile context (Eq. 9-12)
    s_hat = context_attention_reference(xs, xg, m.att_smile.w_x.detach(), m.att_smile.w_c.detach())
    g_hat = context_attention_reference(xg, xs, m.att_gender.w_x.detach(), m.att_gender.w_c.detach())
    with torch.no_grad():
        torch.testing.assert_close(out["smile"], m.head_smile(s_hat.float()), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["gender"], m.head_gender(g_hat.float()), atol=1e-5, rtol=1e-5)
    assert m.outputs["gender"].classes == ("male", "female")
    assert m.outputs["smile"].classes == ("non_smile", "smile")


def test_tmtl_has_no_attention_and_initialises_the_attention_model(attention_model, tmp_path):
    torch.manual_seed(6)
    tmtl = models.create_model("task_attention", attention=False).eval()
    assert tmtl.recipe.epochs == 40
    assert not [k for k, _ in tmtl.named_parameters() if k.startswith(("att_smile", "att_gender"))]
    n_att = sum(p.numel() for p in attention_model.parameters())
    assert n_att - sum(p.numel() for p in tmtl.parameters()) == 4 * 64
    with torch.no_grad():  # TMTL: FCS / FCG straight into the softmax layers
        x = torch.randn(1, 3, 64, 64)
        xs, xg = tmtl.task_units(x)
        torch.testing.assert_close(tmtl(x)["smile"], tmtl.head_smile(xs))

    path = str(tmp_path / "tmtl.ckpt")
    save_checkpoint(tmtl, path)
    model = TaskAttentionNet.from_tmtl(path)
    assert model.attention and model.config["attention"] is True
    tmtl_state, new_state = tmtl.state_dict(), model.state_dict()
    assert set(new_state) - set(tmtl_state) == {"att_smile.w_x", "att_smile.w_c", "att_gender.w_x", "att_gender.w_c"}
    for k, v in tmtl_state.items():
        assert torch.equal(new_state[k], v), k
    assert all(torch.isfinite(new_state[k]).all() for k in set(new_state) - set(tmtl_state))
    # the same from a model object; a TMTL with other units does not fit
    assert torch.equal(from_tmtl(tmtl).state_dict()["fc_smile.weight"], tmtl_state["fc_smile.weight"])
    with pytest.raises(ValueError, match="do not fit"):
        from_tmtl(tmtl_state, units=32)


def test_dmm_trunk_learns_at_its_own_rate():
    """``trunk_lr_scale``: a pretrained trunk (dlib's) learns slower than the new SPP branches; the default
    keeps the paper's one rate in one group (so runs from before resume with the same optimizer state)."""
    from core.engine import make_optimizer
    from models.base import Recipe

    one = models.create_model("dmm_cnn", depth=18, image_size=64, num_landmarks=0)
    assert [g["lr"] for g in make_optimizer(one, Recipe(optimizer="adam", lr=1e-3)).param_groups] == [1e-3]
    m = models.create_model("dmm_cnn", depth=18, image_size=64, num_landmarks=0, trunk_lr_scale=0.01)
    heads, trunk = make_optimizer(m, Recipe(optimizer="adam", lr=1e-3)).param_groups
    assert heads["lr"] == 1e-3 and trunk["lr"] == pytest.approx(1e-5)
    assert {id(p) for p in trunk["params"]} == {id(p) for p in m.trunk.parameters()}
    assert len(heads["params"]) + len(trunk["params"]) == len(list(m.parameters()))
    with pytest.raises(ValueError, match="trunk_lr_scale"):
        models.create_model("dmm_cnn", depth=18, trunk_lr_scale=-1)
