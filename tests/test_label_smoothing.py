"""``--label-smoothing EPS`` (``Recipe.label_smoothing``): every categorical output trains against its label mixed
with EPS of the uniform distribution; the age distribution, binary attributes and points keep their own losses,
and validation reads the plain cross-entropy. Without Ray: the loss, one training step, the flag and its bounds."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import models
from core import engine
from core.batches import TARGET_PREFIX
from jobs import train as train_job
from raytasks.train.job import resolve_model
from raytasks.train.spec import TrainError, TrainSpec


def _agr_batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = models.create_model("age_gender_race", backbone="resnet", depth=18, image_size=64)
    raw = {"age": torch.randn(n, 117, generator=g), "gender": torch.randn(n, 2, generator=g),
           "race": torch.randn(n, 5, generator=g)}
    targets = {"age": torch.tensor([20.0, 35, 61, 8, 44, 27][:n]), "gender": torch.tensor([0.0, 1, 1, 0, 1, 0][:n]),
               "race": torch.tensor([0.0, 1, 2, 3, 4, float("nan")][:n])}  # the last row has no race
    return m, raw, targets


def test_smoothing_changes_the_categorical_losses_only_and_by_the_textbook_formula():
    m, raw, targets = _agr_batch()
    plain_total, plain = m.loss(raw, targets)
    total, parts = m.loss(raw, targets, label_smoothing=0.1)
    assert torch.equal(parts["age"], plain["age"])  # the 117-way age distribution: not smoothed
    for name, k in (("gender", 2), ("race", 5)):
        keep = ~torch.isnan(targets[name])
        logp = torch.log_softmax(raw[name][keep], 1)
        t = targets[name][keep].long()
        want = -((1 - 0.1) * logp.gather(1, t[:, None]).squeeze(1) + 0.1 / k * logp.sum(1)).mean()
        assert float(parts[name]) == pytest.approx(float(want), rel=1e-6)
        assert float(parts[name]) != pytest.approx(float(plain[name]), rel=1e-3)
    weights = {o.name: o.weight for o in m.outputs}
    assert float(total) == pytest.approx(sum(weights[k] * float(v) for k, v in parts.items()), rel=1e-6)
    assert float(total) != pytest.approx(float(plain_total), rel=1e-3)


def test_validation_statistics_are_the_plain_cross_entropy():
    m, raw, targets = _agr_batch()
    stats = m.stats(raw, targets)
    keep = ~torch.isnan(targets["race"])
    assert float(stats["race"]["loss_sum"]) == pytest.approx(
        float(F.cross_entropy(raw["race"][keep], targets["race"][keep].long(), reduction="sum")), rel=1e-6)


def test_a_training_step_uses_the_recipes_smoothing():
    """``train_step`` reports the loss it stepped on: with EPS 0.3 that of the smoothed targets, computed on the
    same weights before the step (hard_sharing: two categorical outputs, gender and eyeglasses)."""
    torch.manual_seed(0)
    m = models.create_model("hard_sharing")
    images = torch.randint(0, 256, (8, 1, 50, 50), dtype=torch.uint8)
    targets = {"gender": torch.tensor([0.0, 1] * 4), "eyeglasses": torch.tensor([0.0, 0, 1, 0] * 2)}
    batch = {"image": images.numpy(), **{TARGET_PREFIX + k: v.numpy() for k, v in targets.items()}}
    m.train()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        raw = m(m.prepare(images))
        _, want = m.loss(raw, targets, label_smoothing=0.3)
        _, plain = m.loss(raw, targets)
    m.load_state_dict(state)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    out = engine.train_step(m, batch, opt, torch.device("cpu"), label_smoothing=0.3)
    for name in ("gender", "eyeglasses"):
        assert out[f"loss.{name}"] == pytest.approx(float(want[name]), rel=1e-6)
        # an untrained network answers near 50/50, where smoothing moves the loss little, but far beyond rounding
        assert abs(out[f"loss.{name}"] - float(plain[name])) > 1e-5


def test_the_flag_sets_the_recipe_value_and_is_bounded(tmp_path):
    argv = ["--model", "hard_sharing", "--data", "celeba:/d", "--storage", str(tmp_path)]
    spec = train_job.spec_from_args(train_job.build_parser().parse_args(argv + ["--label-smoothing", "0.1"]))
    assert spec.recipe["label_smoothing"] == 0.1
    spec = train_job.spec_from_args(train_job.build_parser().parse_args(argv))
    assert "label_smoothing" not in spec.recipe  # the model's default, 0: off
    assert models.create_model("hard_sharing").recipe.label_smoothing == 0.0

    class Data:
        def model_overrides(self, name):
            return {}

    for bad in (1.0, -0.1, math.nan):
        s = TrainSpec(model="hard_sharing", data="celeba:/d", storage=str(tmp_path), name="x",
                      recipe={"label_smoothing": bad})
        with pytest.raises(TrainError, match="--label-smoothing must be at least 0 and below 1"):
            resolve_model(s, Data())
    s = TrainSpec(model="hard_sharing", data="celeba:/d", storage=str(tmp_path), name="x",
                  recipe={"label_smoothing": 0.2})
    _, recipe = resolve_model(s, Data())
    assert dataclasses.asdict(recipe)["label_smoothing"] == 0.2  # recorded with the recipe (history, checkpoint)


@pytest.mark.parametrize("field,bad", [("lr", math.nan), ("lr", math.inf), ("lr", -1e-3),
                                       ("weight_decay", math.nan), ("weight_decay", -1.0)])
def test_a_recipe_with_a_rate_that_is_not_a_finite_number_at_least_0_is_refused(tmp_path, field, bad):
    """A recipe's rate from the Python API or a stage (the flags refuse nan themselves): ``lr < 0`` let NaN
    through, and the run trained on NaN."""
    class Data:
        def model_overrides(self, name):
            return {}

    s = TrainSpec(model="hard_sharing", data="celeba:/d", storage=str(tmp_path), name="x", recipe={field: bad})
    with pytest.raises(TrainError, match="finite lr and weight decay >= 0"):
        resolve_model(s, Data())
