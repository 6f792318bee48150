"""Inference-only rewrites: batch norm folding (models/inference.py), torch.compile in a model runner
(core/runner.py), and the OpenMP environment and torch thread of model workers (raytasks/threads.py,
raytasks/label/stages.py's AnnotatorActor)."""

import pytest
import torch
from torch import nn

import models
from models.inference import fold_batchnorm
from raytasks import threads


def _example(model, n=2, seed=0):
    pre = model.preprocessing
    g = torch.Generator().manual_seed(seed)
    return model.prepare(torch.randint(0, 256, (n, pre.channels, *pre.size), dtype=torch.uint8, generator=g))


@pytest.mark.parametrize("name,kwargs", [("age_gender_race", {"depth": 18}), ("dmm_cnn", {"depth": 18}),
                                         ("task_attention", {"depth": 18})])
def test_folding_removes_every_conv_batchnorm_and_keeps_the_outputs(name, kwargs):
    torch.manual_seed(0)
    model = models.create_model(name, **kwargs).eval()
    for m in model.modules():  # non-trivial running statistics, so that a wrong fold would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    folded, names = fold_batchnorm(model, _example(model))
    assert names, "nothing was folded"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert type(folded) is type(model) and folded.outputs == model.outputs  # methods and description kept
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the original must not be modified"
    x = _example(model, n=3, seed=1)  # another input than the one the check used
    with torch.inference_mode():
        want, got = model(x), folded(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)


def test_folding_leaves_models_without_batchnorm_and_refuses_training_mode():
    model = models.create_model("hard_sharing").eval()
    same, names = fold_batchnorm(model, _example(model))
    assert same is model and names == []
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(models.create_model("dmm_cnn", depth=18).train(), torch.zeros(1, 3, 218, 178))


class _ReachesIn(nn.Module):
    """A parent that calls a child's submodules directly: folding the child would break it."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.block[1].running_mean.fill_(0.3)

    def forward(self, x):
        return {"y": self.block[1](self.block[0](x))}


def test_folding_falls_back_to_the_original_when_the_folded_model_breaks():
    model = _ReachesIn().eval()
    same, names = fold_batchnorm(model, torch.rand(2, 3, 8, 8))
    assert same is model and names == []


def test_model_workers_get_a_runtime_env_of_their_own_that_keeps_the_callers():
    env = threads.runtime_env({"env_vars": {"A": "1"}, "pip": ["x"]})
    assert env == {"env_vars": {**threads.MODEL_WORKER_ENV, "A": "1"}, "pip": ["x"]}
    assert threads.runtime_env(None) == {"env_vars": threads.MODEL_WORKER_ENV}
    assert threads.runtime_env({"env_vars": {"FACEATTR_MODEL_WORKER": "2"}})["env_vars"] == {"FACEATTR_MODEL_WORKER": "2"}


def _actor(ckpt: str, **kwargs):
    """A label job actor for one checkpoint on whole images, built as build_dataset builds it."""
    from core.modelset import ModelSet
    from raytasks.label import AnnotatorActor

    return AnnotatorActor(ModelSet(((None, ckpt),)).to_dict(), faces={"mode": "whole"}, precision="fp32", threads=1,
                          **kwargs)


def _whole_batch(ok: list[bool], image) -> dict:
    """A decoded batch of whole 50 px grey images (decode_batch's Whole columns): a row that is not ``ok``
    failed to decode (``empty``, size 0)."""
    import numpy as np

    return {"path": np.array([f"p{i}" for i in range(len(ok))], dtype=object), "ok": np.array(ok),
            "error_kind": np.array([None if k else "empty" for k in ok], dtype=object),
            "error_message": np.array([None if k else "x" for k in ok], dtype=object),
            "width": np.array([50 if k else 0 for k in ok], np.int32),
            "height": np.array([50 if k else 0 for k in ok], np.int32),
            "geometry_0": np.zeros((len(ok), 4)), "image_0": image}


@pytest.mark.slow  # over ~5 s of CPU: in the full suite, not the quick tier
def test_compiled_runner_pads_and_splits_to_its_batch_and_matches_eager(hs_checkpoint):
    import time

    from core.runner import ModelRunner

    eager = ModelRunner(hs_checkpoint, device="cpu", precision="fp32", threads=1)
    start = time.perf_counter()
    # built as the label job builds its actors (raytasks.label.stages.build_dataset's constructor arguments)
    (compiled,) = _actor(hs_checkpoint, compile_batch=4, fold_bn=True).annotator.members.values()
    assert compiled.compile_batch == 4 and compiled.forward_fn is not compiled.model, "compile fell back to eager"
    assert time.perf_counter() - start < 240
    x = torch.randint(0, 256, (7, 1, 50, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for n in (1, 4, 7):  # padded, exact, split + padded
        want, got = eager.forward_uint8(x[:n]), compiled.forward_uint8(x[:n])
        for k in want:
            assert got[k].shape == want[k].shape
            torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-3)


def test_compile_failure_leaves_a_working_eager_runner(hs_checkpoint, monkeypatch):
    from core.runner import ModelRunner

    def broken(model, **_):
        def run(x):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="torch.compile failed.*no C\\+\\+ compiler"):
        p = ModelRunner(hs_checkpoint, device="cpu", precision="fp32", threads=1, compile_batch=4)
    assert p.compile_batch is None and p.forward_fn is p.model
    assert p.forward_uint8(torch.zeros((3, 1, 50, 50), dtype=torch.uint8))["gender"].shape[0] == 3


def test_label_actor_does_all_torch_work_on_one_thread_that_is_not_the_callers(hs_checkpoint):
    # Ray calls an actor's __init__ on the main thread and __call__ on others: torch on both would make two
    # OpenMP pools (raytasks/threads.py). Every batch must run on the one torch thread.
    import threading

    import numpy as np

    actor = _actor(hs_checkpoint)  # whole images: decode_batch's Whole batches
    (runner,) = actor.annotator.members.values()
    seen = []
    real = runner.forward_uint8
    runner.forward_uint8 = lambda x: (seen.append(threading.current_thread().name), real(x))[1]
    batch = _whole_batch([True, False], np.zeros((2, 1, 50, 50), np.uint8))
    for _ in range(2):
        table = actor(batch)
        assert table.num_rows == 2 and table.column("ok").to_pylist() == [True, False]
    assert len(seen) == 2 and len(set(seen)) == 1 and seen[0].startswith("predictor")
    assert seen[0] != threading.current_thread().name


def test_label_actor_gives_freed_heap_back_every_few_batches(hs_checkpoint, monkeypatch):
    # a long-lived actor trims glibc's heap every TRIM_EVERY_BATCHES batches (raytasks/heap.py: freed batches
    # otherwise stay resident, 0.7-1.9 GB an actor measured), and the rows do not depend on it
    import numpy as np

    from raytasks import heap

    calls = []
    monkeypatch.setattr(heap, "trim", lambda: calls.append(1) or True)
    actor = _actor(hs_checkpoint)
    batch = _whole_batch([True, True], np.random.default_rng(0).integers(0, 256, (2, 1, 50, 50), dtype=np.uint8))
    n = heap.TRIM_EVERY_BATCHES
    tables = [actor(batch) for _ in range(2 * n + 1)]
    assert len(calls) == 2
    assert all(t.equals(tables[0]) for t in tables)


def test_auto_precision_is_bf16_only_on_a_cpu_that_computes_it_natively(monkeypatch):
    """--precision auto on a CPU: bf16 where the CPU has AVX-512 BF16 or AMX (about 3x fp32 there), fp32
    where oneDNN would emulate it (16x slower than fp32 on an AVX2-only EPYC); an explicit choice is kept."""
    from pathlib import Path

    from core import runner

    cpu = torch.device("cpu")
    flags = set()
    if Path("/proc/cpuinfo").exists():  # what the kernel says this CPU has, beside what torch says
        line = next((s for s in Path("/proc/cpuinfo").read_text().splitlines() if s.startswith("flags")), "")
        flags = set(line.split(":", 1)[-1].split())
    if flags:
        assert runner.cpu_has_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}), sorted(flags)
    for native, want in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(runner, "cpu_has_bf16", lambda native=native: native)
        assert runner.resolve_precision("auto", cpu) == want
        assert runner.resolve_precision("bf16", cpu) == torch.bfloat16
        assert runner.resolve_precision("fp32", cpu) is None
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        runner.resolve_precision("fp16", cpu)
