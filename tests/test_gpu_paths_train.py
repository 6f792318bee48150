"""The Ray Train worker's GPU paths, on CPU: on a GPU the worker puts its model in channels_last
(raytasks/train/worker.py), and so the optimizer's buffers (SGD's momentum, Adam's moments) and the weight
averaging window's copies have that layout. The run's training state (STATE_FILE) holding them is read back on
every restart and rerun through ``torch_load_checked``, which refuses a tensor that is not contiguous: the worker
writes it contiguous (``worker.save_state``, core/averaging.py ``EpochAverage.push``) and a resume gets the same
values back."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import models
from core import engine
from core.averaging import EpochAverage
from models.checkpoint import checkpoint_bytes
from raytasks.train import worker
from raytasks.train.spec import MODEL_FILE, STATE_FILE


def _model(seed: int, channels_last: bool = True):
    torch.manual_seed(seed)
    model = models.create_model("hard_sharing")
    return model.to(memory_format=torch.channels_last) if channels_last else model  # as the worker on a GPU


def _step(model, opt) -> None:
    """One optimizer step with gradients in the parameters' own layout (as autograd gives a channels_last model)."""
    for p in model.parameters():
        p.grad = torch.randn_like(p)  # preserve_format: channels_last for a conv weight
    opt.step()


def _tensors(value, where=""):
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{where}[{i}]")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_channels_last_runs_training_state_is_saved_contiguous_and_resumes(tmp_path, optimizer):
    import pyarrow.fs

    model = _model(0)
    recipe = dataclasses.replace(model.recipe, optimizer=optimizer, momentum=0.9, average_epochs=2)
    average = EpochAverage(model, recipe.average_epochs)
    opt = engine.make_optimizer(model, recipe)
    sched = engine.make_scheduler(opt, recipe)
    for _ in range(2):  # two epochs: the window full
        _step(model, opt)
        average.push(model)
    laid_out = [w for w, t in _tensors(opt.state_dict()["state"]) if t.dim() and not t.is_contiguous()]
    assert laid_out, "the optimizer's buffers should have the channels_last layout of the parameters"
    assert all(t.is_contiguous() for w in average.state() for t in w.values())

    # the worker's own files of an epoch: the model (checkpoint_bytes) and the training state (save_state)
    data, _ = checkpoint_bytes(model, {}, {"epoch": 2})
    (tmp_path / MODEL_FILE).write_bytes(data)
    worker.save_state({"epoch": 2, "step": 2, "best": None, "best_epoch": 0, "since_best": 0, "stopped": False,
                       "history": [], "attempts": [], "optimizer": opt.state_dict(),
                       "average_window": average.state(),
                       "scheduler": sched.state_dict() if sched is not None else None},
                      str(tmp_path / STATE_FILE))

    # the worker's resume: _load_state (torch_load_checked), the window back, channels_last, the optimizer's state
    resumed = _model(1, channels_last=False)  # other weights: a fresh worker, before channels_last
    ckpt = SimpleNamespace(filesystem=pyarrow.fs.LocalFileSystem(), path=str(tmp_path))
    expect = {"model": resumed.name, "config": resumed.config, "data": None, "split_seed": 0}
    state = worker._load_state(resumed, ckpt, expect)
    assert state["epoch"] == 2
    again = EpochAverage(resumed, recipe.average_epochs)
    again.resume(resumed, state["average_window"])
    resumed = resumed.to(memory_format=torch.channels_last)
    opt2 = engine.make_optimizer(resumed, recipe)
    opt2.load_state_dict(state["optimizer"])
    worker.optimizer_layout_like_params(opt2)
    for p in resumed.parameters():  # the buffers back in their parameters' layout, as before the stop
        for v in opt2.state[p].values():
            if torch.is_tensor(v) and v.shape == p.shape:
                assert v.stride() == p.stride()

    assert len(again.state()) == len(average.state()) == 2
    for saved, back in zip(average.state(), again.state()):
        assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    mine, theirs = dict(_tensors(opt.state_dict()["state"])), dict(_tensors(opt2.state_dict()["state"]))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    # and training goes on alike: the same step from the saved run and from the resumed one
    torch.manual_seed(5)
    _step(model, opt)
    torch.manual_seed(5)
    _step(resumed, opt2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
