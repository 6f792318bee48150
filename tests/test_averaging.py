"""Weight averaging over epochs (core/averaging.py, ``Recipe.average_epochs``): what is averaged, the window,
the swap in and out, and ``engine.fit`` validating the average while training on from the latest weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from core.averaging import EpochAverage, averaged_keys
from core.engine import evaluate_table, fit
from facedata.datasets import read_dataset
from facedata.synth import generate


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 1))
    net.register_buffer("set_by_validation", torch.zeros(1))
    return net


def _step(net: nn.Module, value: float) -> None:
    """Every parameter and running statistic set to ``value``, the other buffers to ``-value``."""
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                v.fill_(-value if k == "set_by_validation" else value)


def test_parameters_and_batchnorm_statistics_are_averaged_other_buffers_are_the_latest():
    net = _net()
    assert set(averaged_keys(net)) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                                       "1.running_var", "3.weight", "3.bias"}
    avg = EpochAverage(net, 3)
    for value in (1.0, 2.0, 3.0, 4.0):  # four epochs, a window of three: 2, 3, 4
        avg.restore(net)
        _step(net, value)
        avg.push(net)
        avg.use_average(net)
    own = net.state_dict()
    assert all(torch.all(own[k] == 3.0) for k in averaged_keys(net))
    assert torch.all(own["set_by_validation"] == -4.0)  # the latest, not averaged
    assert own["1.num_batches_tracked"].dtype == torch.long  # integers are left alone
    avg.use_average(net)  # a second swap in is a no-op, not an average of an average
    assert torch.all(net.state_dict()["0.weight"] == 3.0)
    avg.restore(net)  # the latest weights back, to train on from
    assert all(torch.all(net.state_dict()[k] == 4.0) for k in averaged_keys(net))
    avg.restore(net)  # restoring twice changes nothing
    assert torch.all(net.state_dict()["3.bias"] == 4.0)


def test_the_window_survives_a_restart_and_one_epoch_is_off():
    net = _net()
    avg = EpochAverage(net, 2)
    for value in (1.0, 5.0):
        avg.restore(net)
        _step(net, value)
        avg.push(net)
        avg.use_average(net)
    saved_weights, saved_window = {k: v.clone() for k, v in net.state_dict().items()}, avg.state()
    assert torch.all(saved_weights["0.weight"] == 3.0)
    # a new process: the checkpoint's weights (the average) and the window from the training state
    again = _net()
    again.load_state_dict(saved_weights)
    resumed = EpochAverage(again, 2)
    resumed.resume(again, saved_window)
    assert torch.all(again.state_dict()["0.weight"] == 5.0)  # training goes on from the latest, not the mean
    _step(again, 7.0)
    resumed.push(again)
    resumed.use_average(again)
    assert torch.all(again.state_dict()["0.weight"] == 6.0)  # (5 + 7) / 2: the window went on
    with pytest.raises(ValueError, match="lacks"):
        EpochAverage(_net(), 2).resume(_net(), [{"0.weight": torch.zeros(2, 1, 3, 3)}])

    off = EpochAverage(net, 1)
    _step(net, 9.0)
    off.push(net)
    off.use_average(net)
    assert not off.active and off.state() == [] and torch.all(net.state_dict()["0.weight"] == 9.0)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="average_epochs"):
            EpochAverage(net, bad)


def test_fit_validates_the_mean_of_the_last_epochs_and_trains_on_from_the_latest(tmp_path):
    ds = read_dataset(f"celeba:{generate('celeba', 48, str(tmp_path / 'c'), seed=3, size=(72, 88))}",
                      val_fraction=0.25)
    train, val = ds.split("train"), ds.split("val")

    def trained(epochs: int, average: int | None):
        torch.manual_seed(0)
        m = models.create_model("hard_sharing", **ds.model_overrides("hard_sharing"))
        return m, fit(m, train, val, epochs=epochs, batch_size=8, log_fn=None, average_epochs=average)

    one, h_one = trained(1, None)
    two, _ = trained(2, None)
    averaged, history = trained(2, 2)
    assert any(not torch.equal(v, two.state_dict()[k]) for k, v in one.state_dict().items())
    # the same seed and order: the averaged run trained through the same weights as the plain runs
    for k, v in averaged.state_dict().items():
        assert torch.allclose(v, (one.state_dict()[k] + two.state_dict()[k]) / 2, atol=1e-6), k
    # what each epoch reported is the average's validation: epoch 1 alone, epoch 2 the mean of both
    assert history[0]["val_loss"] == pytest.approx(h_one[0]["val_loss"])
    assert history[-1]["gender.accuracy"] == pytest.approx(evaluate_table(averaged, val)["gender.accuracy"])
