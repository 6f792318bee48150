"""The departures of issue #11, each pinned to the words of its source text (../shared/seeds/).

Single process, no Ray: the remainder batch (item 0), the attention network's split (2), the hard-sharing
CNN's early stopping and learning-rate readings (3), HMTNet's Smooth Huber loss (4) and input size without
augmentation (5), DMM-CNN's landmark scale. Item 1 (manifests) is in tests/test_datasets.py, the Ray Train
remainder in tests/test_recipes_runs.py's Ray Train run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from core import engine
from core.batches import fold_remainder, iter_batches, load_batch
from facedata.datasets import read_dataset
from facedata.synth import generate
from models.landmarks import Landmarks
from models.losses import log_cosh, smooth_huber_loss
from models.outputs import Regression
from models.task_attention import shared_conv_layers
from raytasks.train import BatchSpec, decode_rows

SMALL_HMT = {"image_size": 96, "anet_width": 16}


@pytest.fixture(scope="module")
def scut(tmp_path_factory):
    root = generate("scut_fbp5500", 24, str(tmp_path_factory.mktemp("scut")), seed=4, size=(96, 96))
    return read_dataset(f"scut_fbp5500:{root}").table


@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    root = generate("celeba", 12, str(tmp_path_factory.mktemp("celeba")), seed=5, size=(64, 80))
    return read_dataset(f"celeba:{root}").table


# --- 0. a last batch of one image ---------------------------------------------------------------------
def _batches(*sizes):
    start = 0
    for n in sizes:
        yield {"image": np.arange(start, start + n), "t:x": np.zeros(n, np.float32)}
        start += n


@pytest.mark.parametrize("sizes, expected", [
    ((4, 4, 1), [4, 5]),  # the remainder joins the batch before it
    ((4, 1, 4), [4, 5]),  # a short batch in the middle (undecodable images) joins the next one
    ((4, 4, 2), [4, 4, 2]),  # two images are enough for BatchNorm: nothing to fold
    ((1, 1, 1), [3]),  # one image per worker and step: batches of at least two
    ((1,), []),  # a single image and nothing to fold it into: dropped (with a warning)
    ((), []),
])
def test_fold_remainder_keeps_every_image_and_no_batch_of_one(sizes, expected):
    out = list(fold_remainder(_batches(*sizes)))
    assert [len(b["image"]) for b in out] == expected
    if expected:  # every image once, in order, labels kept alongside
        assert np.concatenate([b["image"] for b in out]).tolist() == list(range(sum(sizes)))
        assert all(len(b["t:x"]) == len(b["image"]) for b in out)


@pytest.mark.slow  # over ~5 s of CPU: in the full suite, not the quick tier
def test_hmtnet_trains_an_epoch_whose_last_batch_holds_one_image(scut):
    # The run: 33 images in batches of 8 left one over and ANet's BatchNorm (1x1 map) refused it
    # ("Expected more than 1 value per channel when training"). Here 9 images in batches of 8.
    torch.manual_seed(0)
    m = models.create_model("hmtnet", **SMALL_HMT)
    train = scut.iloc[:9].reset_index(drop=True)
    assert [len(b["image"]) for b in iter_batches(train, m, 8, train=True)] == [9]
    history = engine.fit(m, train, scut.iloc[9:12], epochs=1, batch_size=8, log_fn=None)
    assert math.isfinite(history[0]["train_loss"])
    # evaluation keeps a batch of one: BatchNorm uses its running statistics there
    assert [len(b["image"]) for b in iter_batches(train, m, 8)] == [8, 1]
    assert engine.evaluate_table(m, train, batch_size=8)["n_images"] == 9


# --- 5. HMTNet without augmentation -------------------------------------------------------------------
def test_hmtnet_trains_and_evaluates_on_the_same_input_size_without_augmentation(scut):
    m = models.create_model("hmtnet", **SMALL_HMT)
    rows = scut.iloc[:3]
    size = tuple(m.preprocessing.size)
    assert m.preprocessing.resize_shorter > size[0]  # the 227/224 margin, scaled to 96 px
    evaluation = load_batch(rows, m, train=False)["image"]
    plain = load_batch(rows, m, train=True, augment=None)["image"]  # --no-augment
    assert plain.shape[-2:] == evaluation.shape[-2:] == size
    assert np.array_equal(plain, evaluation)  # the same centre crop
    # the Ray Data decode task of the train job, with and without the recipe's augmentation
    for augment in (None, m.recipe.augment):
        batch = decode_rows(rows, BatchSpec(m.preprocessing, m.outputs, augment), train=True)
        assert batch["image"].shape[-2:] == size


@pytest.mark.slow  # over ~5 s of CPU: in the full suite, not the quick tier
# --- 2. the attention network's split -----------------------------------------------------------------
def test_attention_shares_the_first_46_layers_and_copies_res5c_per_task():
    # "We share the parameters from its first 46 layers for all the tasks ... We attach a fully connected
    # layer FCS ... and a fully connected layer FCG ... respectively to 'res5c1' and 'res5c2'".
    m = models.create_model("task_attention")
    assert m.task_blocks == 1
    assert shared_conv_layers(m.shared) == 46  # conv1 + 3x3 + 4x3 + 6x3 + 2x3 (res5a, res5b)
    for branch in (m.res5_smile, m.res5_gender):
        assert len(branch) == 1 and shared_conv_layers(branch) == 3  # res5c
    # 46 shared + res5c's 3 + the FC layer where ResNet-50's fc was = the 50 layers
    assert shared_conv_layers(m.shared) + shared_conv_layers(m.res5_smile) + 1 == 50
    assert m.res5_smile[0] is not m.res5_gender[0]
    assert m.res5_smile[0].conv1.weight.data_ptr() != m.res5_gender[0].conv1.weight.data_ptr()

    whole = models.create_model("task_attention", task_blocks=3)  # the previous split: all of res5 per task
    assert shared_conv_layers(whole.shared) == 40 and shared_conv_layers(whole.res5_smile) == 9

    def count(mod):
        return sum(p.numel() for p in mod.parameters())
    extra = count(whole) - count(m)
    assert 10.4e6 < extra < 10.6e6  # res5a and res5b, once more for the second task
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = m.eval()(x)
    assert out["smile"].shape == out["gender"].shape == (2, 2)
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ValueError, match="task_blocks"):
            models.create_model("task_attention", task_blocks=bad)
    assert shared_conv_layers(models.create_model("task_attention", depth=18).shared) == 15  # 1 + 2*2*3 + 2


# --- 3. the hard-sharing CNN: early stopping and the learning-rate rule ------------------------------
def _scripted_fit(celeba, script, epochs):
    """engine.fit on hard_sharing with the validation metrics of each epoch taken from ``script``."""
    m = models.create_model("hard_sharing")
    rows = iter(script)
    real = m.metrics

    def metrics(stats):
        out = real(stats)
        out.update(next(rows))
        return out

    m.metrics = metrics
    return m, engine.fit(m, celeba.iloc[:4], celeba.iloc[4:6], epochs=epochs, batch_size=4, lr=0.0, log_fn=None)


def test_hard_sharing_stops_when_the_validation_loss_stops_falling(celeba):
    # "when the loss function of validation set stops falling in more than two epochs, we manually terminate
    # this training"
    m = models.create_model("hard_sharing")
    assert (m.primary_metric, m.primary_mode, m.recipe.early_stopping_patience) == ("val_loss", "min", 2)

    def row(loss, acc):
        return {"gender.loss": loss, "eyeglasses.loss": loss, "mean_accuracy": acc}

    # accuracy keeps rising but the loss stopped falling after epoch 2 (a tie is not a fall): stop after 4
    _, h = _scripted_fit(celeba, [row(0.5, 0.6), row(0.4, 0.7), row(0.4, 0.8), row(0.45, 0.9), row(0.1, 0.95)], 5)
    assert [e["val_loss"] for e in h] == pytest.approx([1.0, 0.8, 0.8, 0.9])
    # the loss keeps falling while the accuracy stalls: no stop
    _, h = _scripted_fit(celeba, [row(0.5, 0.7), row(0.45, 0.7), row(0.4, 0.7), row(0.35, 0.7)], 4)
    assert len(h) == 4
    assert engine.Selection.of_model(m).is_better(0.79, 0.8) and not engine.Selection.of_model(m).is_better(0.8, 0.8)


@pytest.mark.parametrize("reading, rates", [
    ("keep", [1e-3, 1e-3 / 2, 1e-3 / 3, 1e-3 / 4]),  # epoch 1 at L0, then L_i = L_{i-1}(1 - 1/i)
    ("decay", [1e-3 / 2, 1e-3 / 3, 1e-3 / 4, 1e-3 / 5]),  # the rule from the first epoch, Epoch counted from 2
])
def test_hard_sharing_learning_rate_rule_both_readings(reading, rates):
    # "L_i = L_{i-1} (1 - 1/Epoch_i), L_0 = 0.001"
    m = models.create_model("hard_sharing", lr_first_epoch=reading)
    opt = engine.make_optimizer(m, m.recipe)
    sched = engine.make_scheduler(opt, m.recipe)
    seen = []
    for _ in rates:
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(rates)
    for a, b, i in zip(seen, seen[1:], range(2 if reading == "keep" else 3, 99)):
        assert b == pytest.approx(a * (1 - 1 / i))  # the rule itself, with that reading's Epoch_i
    with pytest.raises(ValueError, match="lr_first_epoch"):
        models.create_model("hard_sharing", lr_first_epoch="zero")


# --- 4. HMTNet's Smooth Huber loss --------------------------------------------------------------------
def _loss_and_grad(err: float, delta: float = 0.6):
    x = torch.tensor([err], dtype=torch.float32, requires_grad=True)
    loss = smooth_huber_loss(x, torch.zeros(1), delta)
    loss.backward()
    return loss.item(), x.grad.item()


def test_smooth_huber_is_continuous_robust_and_stable():
    # "It follows a Huber fashion, but it's smoother ... and is more robust to outliers", δ = 0.6
    d, eps = 0.6, 1e-4
    inside, g_in = _loss_and_grad(d - eps)
    outside, g_out = _loss_and_grad(d + eps)
    assert inside == pytest.approx(math.log(math.cosh(d - eps)), rel=1e-5)
    assert abs(outside - inside) <= 2 * eps * math.tanh(d) + 1e-6  # no jump at δ (the literal one: 0.165 -> 0.6)
    assert g_in == pytest.approx(math.tanh(d), abs=1e-3) and g_out == pytest.approx(math.tanh(d), abs=1e-5)
    # no sample gets more gradient than one at δ; the gradient never falls as the error grows
    grads = [_loss_and_grad(e)[1] for e in (0.05, 0.3, 0.59, 0.61, 1.0, 5.0, 100.0, -100.0)]
    assert max(map(abs, grads)) <= math.tanh(d) + 1e-6
    assert all(a <= b + 1e-7 for a, b in zip(grads[:-1], grads[1:-1]))
    assert grads[-1] == pytest.approx(-math.tanh(d))
    # outside δ: Huber's straight line, slope tanh(δ), starting from log cosh(δ)
    assert _loss_and_grad(2.0)[0] == pytest.approx(math.log(math.cosh(d)) + math.tanh(d) * 1.4, rel=1e-6)
    # near 0 it is ½x², like Huber's quadratic piece
    assert _loss_and_grad(0.01)[0] == pytest.approx(0.5e-4, rel=1e-3)
    # errors far above 89 (where cosh overflows float32) keep finite values and gradients
    for err in (89.0, 200.0, 1e4):
        value, grad = _loss_and_grad(err)
        assert math.isfinite(value) and math.isfinite(grad)
    assert log_cosh(torch.tensor([1000.0])).item() == pytest.approx(1000 - math.log(2))


def test_hmtnet_beauty_loss_and_delta_are_model_arguments():
    pred, target = torch.tensor([3.2, 1.0, 4.9]), torch.tensor([3.0, 2.5, 4.0])
    expected = {"smooth_huber": smooth_huber_loss(pred, target, 0.3), "mse": F.mse_loss(pred, target),
                "l1": F.l1_loss(pred, target), "smooth_l1": F.smooth_l1_loss(pred, target, beta=0.3)}
    default = models.create_model("hmtnet", **SMALL_HMT).outputs["beauty"]
    assert (default.loss_type, default.delta) == ("smooth_huber", 0.6)
    for name, value in expected.items():  # Table 4: MSE, L1, Smooth L1, Smooth Huber
        m = models.create_model("hmtnet", beauty_loss=name, delta=0.3, **SMALL_HMT)
        out = m.outputs["beauty"]
        assert (out.loss_type, out.delta) == (name, 0.3)
        assert out.loss(pred, target).item() == pytest.approx(value.item(), rel=1e-6)
        assert m.describe()["outputs"][2]["loss"] == name
    with pytest.raises(ValueError, match="beauty_loss must be one of"):
        models.create_model("hmtnet", beauty_loss="huber", **SMALL_HMT)
    for bad in (0, -1.0, "x", float("nan")):
        with pytest.raises(ValueError, match="delta"):
            models.create_model("hmtnet", delta=bad, **SMALL_HMT)
    with pytest.raises(ValueError, match="unknown loss"):
        Regression("beauty", loss_type="logcosh")


# --- DMM-CNN: the scale β = 0.5 assumes ---------------------------------------------------------------
def test_dmm_landmarks_on_the_scale_of_the_attribute_targets(celeba):
    # Eq. 3: "L = Σ_j λ_t^j L_FAC^j + β L_FLD ... β is the regularization parameter (we empirically set β to
    # 0.5)"; Eq. 2 regresses every attribute score on a ±1 label, so the coordinates are put on [-1, 1] too.
    m = models.create_model("dmm_cnn", num_landmarks=1, image_size=64, depth=18)
    lm = m.outputs["landmarks"]
    assert lm.scale == "signed" and lm.weight == m.beta == 0.5
    geo = [{"input_w": 100, "input_h": 50, "sx": 2.0, "sy": 4.0, "tx": 10.0, "ty": 0.0}]
    corners = np.array([[10.0, 0.0], [210.0, 200.0], [110.0, 100.0]], np.float32)  # left-top, right-bottom, centre
    units = np.concatenate([lm.normalise(c[None], geo) for c in corners])
    assert units.tolist() == [[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]
    back = [lm.to_columns(torch.tensor(u[None]), geo)["landmarks"][0] for u in units]
    assert np.allclose(back, corners)
    # the same error weighs 4x what it weighed on [0, 1] (the previous scale); mean_error stays in input units
    unit = Landmarks("landmarks", points=1, scale="unit")
    target = torch.tensor(unit.normalise(corners[2:], geo))
    pred = target + torch.tensor([[0.1, 0.0]])
    signed_t = torch.tensor(lm.normalise(corners[2:], geo))
    signed_p = signed_t + torch.tensor([[0.2, 0.0]])  # the same pixel error on [-1, 1]
    assert lm.loss(signed_p, signed_t).item() == pytest.approx(4 * unit.loss(pred, target).item())
    s1, s2 = unit.stats(pred, target), lm.stats(signed_p, signed_t)
    assert unit.metrics(s1)["landmarks.mean_error"] == pytest.approx(lm.metrics(s2)["landmarks.mean_error"])
    # a training batch carries the targets in these units
    rows = celeba.iloc[:2].copy()
    rows["landmarks"] = [[-10.0, -10.0], [1e6, 1e6]]
    batch = load_batch(rows, m)
    assert (batch["t:landmarks"][0] < -1).all() and (batch["t:landmarks"][1] > 1).all()  # outside the crop
    with pytest.raises(ValueError, match="landmark_scale"):
        models.create_model("dmm_cnn", landmark_scale="pixels", depth=18)
    assert "ReLU between the fully connected layers" in models.dmm_cnn.__doc__


def test_attention_weights_of_another_split_say_which_task_blocks_they_need():
    old = models.create_model("task_attention", depth=18, task_blocks=2)  # the whole res5 per task, as before
    new = models.create_model("task_attention", depth=18)
    with pytest.raises(ValueError, match="build it with task_blocks=2"):
        new.load_state_dict(old.state_dict())
    models.create_model("task_attention", depth=18, task_blocks=2).load_state_dict(old.state_dict())
