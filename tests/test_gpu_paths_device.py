"""The GPU-only choices of core/runner.py, checked on a CPU with torch.cuda (and Ray's worker context) mocked:
which device a label actor or a serving replica loads its models on when it was given no GPU, which GPUs
``--precision auto`` picks bf16 on, and the memory bound of a worker given a fraction of a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from core import runner

# --------------------------------------------------------------------------------------------------------
# the default device: a Ray worker given no GPU stays on the CPU (Ray leaves it CUDA_VISIBLE_DEVICES)
# --------------------------------------------------------------------------------------------------------

@pytest.fixture
def cuda_visible(monkeypatch):
    """torch sees a GPU (as every process on a GPU node does, Ray's zero-GPU workers included)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def _in_ray(monkeypatch, gpu_ids: list | None, mode: str = "worker") -> None:
    """This process as a Ray worker (``mode="worker"``: a task, actor or Serve replica) or driver (``"driver"``)
    to which Ray assigned the GPUs ``gpu_ids``; ``gpu_ids`` None: Ray is not initialised at all."""
    import ray
    from ray._private import worker

    monkeypatch.setattr(ray, "is_initialized", lambda: gpu_ids is not None)
    monkeypatch.setattr(worker.global_worker, "mode",
                        worker.WORKER_MODE if mode == "worker" else worker.SCRIPT_MODE, raising=False)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: list(gpu_ids or []))


def test_a_ray_worker_given_no_gpu_loads_on_the_cpu(monkeypatch, cuda_visible):
    _in_ray(monkeypatch, [])
    assert runner.resolve_device(None) == torch.device("cpu")  # was cuda: GPU 0, unreserved
    assert runner.resolve_device("cuda") == torch.device("cuda")  # an explicit device is kept


def test_a_ray_worker_given_a_gpu_loads_on_it(monkeypatch, cuda_visible):
    _in_ray(monkeypatch, [0])
    assert runner.resolve_device(None) == torch.device("cuda")
    assert runner.resolve_device("cpu") == torch.device("cpu")


def test_outside_a_ray_worker_the_default_is_unchanged(monkeypatch, cuda_visible):
    _in_ray(monkeypatch, None)  # a plain script, a bench, the tests
    assert runner.resolve_device(None) == torch.device("cuda")
    _in_ray(monkeypatch, [], mode="driver")  # a Ray driver running models itself
    assert runner.resolve_device(None) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _in_ray(monkeypatch, [0])
    assert runner.resolve_device(None) == torch.device("cpu")


def test_label_actors_and_replicas_leave_the_device_to_resolve_device(monkeypatch, cuda_visible, hs_checkpoint):
    """Neither the label job's actors nor the serving replicas name a device by default: the Annotator's
    resolve_device picks it, so a zero-GPU actor in a (simulated) Ray worker runs on the CPU."""
    from core.annotator import Annotator
    from raytasks.serve import ServeArgs

    _in_ray(monkeypatch, [])
    assert ServeArgs.model_validate({"models": {"a": "a.pt"}}).model_settings("a")["device"] is None
    assert Annotator(hs_checkpoint, faces={"mode": "whole"}, precision="fp32", threads=1).device.type == "cpu"


# --------------------------------------------------------------------------------------------------------
# bf16 on a GPU: native only (compute capability 8.0 and up), not the emulation of a V100 or T4
# --------------------------------------------------------------------------------------------------------

def _gpu(monkeypatch, major: int, minor: int = 0) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(major=major, minor=minor, name=f"sm_{major}{minor}"))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("major,minor", [(7, 0), (7, 5)])  # V100, T4: torch emulates bf16 there
def test_auto_precision_is_fp32_on_a_gpu_that_only_emulates_bf16(monkeypatch, major, minor):
    _gpu(monkeypatch, major, minor)
    cuda = torch.device("cuda")
    assert torch.cuda.is_bf16_supported()  # what the old rule read: True here, by emulation
    assert runner.resolve_precision("auto", cuda) is None
    assert runner.gpu_has_bf16() is False and runner.gpu_has_bf16(cuda) is False
    assert runner.resolve_precision("bf16", cuda) == torch.bfloat16  # asked for: kept, as on a CPU
    assert runner.resolve_precision("fp32", cuda) is None


@pytest.mark.parametrize("major", [8, 9])  # A100, H100
def test_auto_precision_is_bf16_on_a_gpu_that_computes_it(monkeypatch, major):
    _gpu(monkeypatch, major)
    assert runner.gpu_has_bf16(torch.device("cuda")) is True
    assert runner.resolve_precision("auto", torch.device("cuda")) == torch.bfloat16


def test_no_gpu_has_no_gpu_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runner.gpu_has_bf16() is False


# --------------------------------------------------------------------------------------------------------
# a fraction of a GPU: that fraction of its memory, set before the models load
# --------------------------------------------------------------------------------------------------------

@pytest.fixture
def fractions(monkeypatch) -> list:
    """The calls of torch.cuda.set_per_process_memory_fraction, as (fraction, device)."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: calls.append((fraction, device)))
    return calls


def _annotator_on_cuda(monkeypatch, events: list, **kw):
    """``Annotator`` on ``cuda`` with its models built on the CPU (no GPU here), noting when each loads."""
    import core.annotator as A

    real = A.ModelRunner

    def runner_on_cpu(uri, device=None, **kwargs):
        events.append(("runner", device))
        return real(uri, device="cpu", **{k: v for k, v in kwargs.items() if k != "precision"}, precision="fp32")

    monkeypatch.setattr(A, "ModelRunner", runner_on_cpu)
    return A.Annotator(kw.pop("checkpoint"), faces={"mode": "whole"}, device="cuda", threads=1, **kw)


def test_a_fraction_of_a_gpu_bounds_its_memory_before_the_models_load(monkeypatch, fractions, hs_checkpoint):
    events: list = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: events.append(("fraction", fraction, device)))
    ann = _annotator_on_cuda(monkeypatch, events, checkpoint=hs_checkpoint, gpu_share=0.5)
    assert events[0] == ("fraction", 0.5, torch.device("cuda"))  # once, first
    assert [e[0] for e in events[1:]] == ["runner"]
    assert ann.gpu_memory_limited


@pytest.mark.parametrize("share", [None, 0, 1, 2])
def test_a_whole_gpu_or_none_sets_no_bound(monkeypatch, fractions, hs_checkpoint, share):
    _annotator_on_cuda(monkeypatch, [], checkpoint=hs_checkpoint, gpu_share=share)
    assert fractions == []


def test_a_fraction_on_the_cpu_sets_no_bound(fractions, hs_checkpoint):
    from core.annotator import Annotator

    Annotator(hs_checkpoint, faces={"mode": "whole"}, device="cpu", precision="fp32", threads=1, gpu_share=0.5)
    runner.ModelRunner(hs_checkpoint, device="cpu", precision="fp32", threads=1, gpu_share=0.5)
    assert fractions == []


def test_a_model_runner_given_a_fraction_bounds_the_memory_before_loading(monkeypatch, fractions, hs_checkpoint):
    class Loaded(Exception):
        pass

    def load(*a, **k):
        raise Loaded  # the checkpoint is read after the bound is set: stop there (no GPU to load it on)

    monkeypatch.setattr(runner, "load_checkpoint", load)
    with pytest.raises(Loaded):
        runner.ModelRunner(hs_checkpoint, device="cuda", gpu_share=0.25)
    assert fractions == [(0.25, torch.device("cuda"))]


class _Stop(Exception):
    pass


def test_the_label_actors_and_the_replicas_pass_their_gpu_share_down(monkeypatch, tmp_path, hs_checkpoint):
    """--gpus-per-actor reaches each actor's Annotator, a deployment's num_gpus each replica's."""
    import core.annotator as A
    from raytasks.label import stages
    from raytasks.label.labeler import resolve_labeler
    from raytasks.label.spec import LabelSpec
    from raytasks.serve import replicas

    seen: list = []

    def annotator(*a, **k):
        seen.append(k.get("gpu_share"))
        raise _Stop

    monkeypatch.setattr(A, "Annotator", annotator)
    monkeypatch.setattr(replicas, "Annotator", annotator)

    class Dataset:  # records build_dataset's map_batches calls
        def __init__(self):
            self.calls = []

        def map_batches(self, fn, **kw):
            self.calls.append((fn, kw))
            return self

        def limit(self, n):
            return self

    spec = LabelSpec(hs_checkpoint, str(tmp_path), str(tmp_path / "o"), gpus_per_actor=0.5)
    ds = Dataset()
    stages.build_dataset(spec, resolve_labeler(spec), ds, None, (1, 1))
    (kw,) = [kw for fn, kw in ds.calls if fn is stages.AnnotatorActor]
    assert kw["num_gpus"] == 0.5 and kw["fn_constructor_kwargs"].get("device") is None  # resolve_device picks
    with pytest.raises(_Stop):
        stages.AnnotatorActor(**kw["fn_constructor_kwargs"])
    assert seen == [0.5]

    with pytest.raises(_Stop):
        replicas.AnnotatorServer.func_or_class("m", hs_checkpoint, None, "auto", True, 1, gpu_share=0.25)
    assert seen == [0.5, 0.25]


def test_build_app_gives_each_replica_its_deployments_gpu_share(monkeypatch):
    from ray.serve._private.build_app import build_app as build_serve_app

    from raytasks.serve import SET_DEPLOYMENT, ServeArgs, build_app

    monkeypatch.setenv("FACEATTR_TEST_GPU_KEY", "k")
    args = ServeArgs.model_validate({"models": {"a": "s3://b/a.pt", "b": {"checkpoint": "s3://b/b.pt", "num_gpus": 1}},
                                     "num_gpus": 0.5, "model_set": {"name": "s", "num_gpus": 0.25},
                                     "api_key_env": "FACEATTR_TEST_GPU_KEY"})
    built = {d.name: d for d in build_serve_app(build_app(args), name="faceattr").deployments}
    share = {n: d.init_kwargs.get("gpu_share") for n, d in built.items() if n != "FaceAttrAPI"}
    assert share == {"model-a": 0.5, "model-b": 1, SET_DEPLOYMENT: 0.25}
    assert built["model-a"].ray_actor_options["num_gpus"] == 0.5
