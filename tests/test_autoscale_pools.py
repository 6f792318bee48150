"""Jobs started on an autoscaling cluster (cluster.yaml: a head that offers ``CPU: 0``, GPU workers that scale
from zero to four) find none of the resources they ask for when they start. On a Ray the job started itself
(nothing adds nodes) that is an error; on a cluster it joined it is a warning and a wait for the autoscaler,
one rule for both jobs (raytasks.reach.started_here). No Ray is started here: ``ray.cluster_resources`` is
replaced by what cluster.yaml offers before its first GPU worker is up."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray

from raytasks.label import cluster as label_cluster
from raytasks.label.spec import LabelError, LabelSpec
from raytasks.train import job as train_job
from raytasks.train.spec import TrainError, TrainSpec

ROOT = Path(__file__).resolve().parents[1]
AT_START = {"CPU": 0.0, "memory": 3e10, "object_store_memory": 1e10}  # cluster.yaml: the head alone
ONE_GPU_WORKER = {"CPU": 8.0, "GPU": 1.0, "memory": 6e10}


@pytest.fixture
def resources(monkeypatch):
    """Set what ``ray.cluster_resources()`` answers (the jobs call it through the ``ray`` module)."""
    def set_to(res: dict):
        monkeypatch.setattr(ray, "cluster_resources", lambda: dict(res))
    return set_to


def _train_spec(tmp_path, **kw) -> TrainSpec:
    return TrainSpec(**{"model": "hard_sharing", "data": "celeba:s3://bucket/celeba", "storage": str(tmp_path),
                        "name": "r", "workers": 4, "use_gpu": True, **kw})


# --- jobs.train --------------------------------------------------------------------------------------------

def test_train_on_a_ray_it_started_refuses_what_is_missing(tmp_path, resources, monkeypatch):
    """A local Ray cannot grow: short GPUs or CPUs are an error naming both, as before."""
    resources(ONE_GPU_WORKER)
    # the default comes from the shared rule (raising=False: the code before the fix fails on its message)
    monkeypatch.setattr(train_job, "started_here", lambda: True, raising=False)
    with pytest.raises(TrainError, match="--gpu with 4 workers needs 4 GPUs; the cluster has 1") as e:
        train_job.check_resources(_train_spec(tmp_path))
    assert "nothing adds nodes" in str(e.value) and str(e.value).endswith("use fewer --workers, or a cluster with "
                                                                           "more GPUs")
    assert "CPUs" not in str(e.value)  # eight CPUs are enough for four workers and the decoding
    resources(AT_START)
    with pytest.raises(TrainError, match=r"the Ray cluster has 0 CPUs; 4 worker\(s\) x 1 CPU plus 1 for Ray "
                                         r"Data's decoding need 5.*needs 4 GPUs; the cluster has 0"):
        train_job.check_resources(_train_spec(tmp_path), can_grow=False)
    with pytest.raises(TrainError, match=r"need 5 \(.*\): use fewer --workers or --cpus-per-worker, or a bigger "
                                         r"cluster$"):
        train_job.check_resources(_train_spec(tmp_path, use_gpu=False), can_grow=False)


def test_train_on_a_cluster_that_may_grow_warns_and_goes_on(tmp_path, resources, monkeypatch, capsys):
    """The documented ``--workers 4 --gpu`` on cluster.yaml: Ray Train's placement group waits for the
    autoscaler, so the job goes on with a warning naming what is missing (the audit's
    'error: --gpu with 2 workers needs 2 GPUs; the cluster has 1')."""
    monkeypatch.setattr(train_job, "started_here", lambda: False, raising=False)  # a cluster this process joined
    resources(ONE_GPU_WORKER)
    train_job.check_resources(_train_spec(tmp_path))  # as _fit calls it: no error, a printed warning
    out = capsys.readouterr().out
    assert out.startswith("warning: --gpu with 4 workers needs 4 GPUs; the cluster has 1 now; Ray Train will wait")
    for res, missing in ((AT_START, ["has 0 CPUs", "need 5", "needs 4 GPUs; the cluster has 0"]),
                         (ONE_GPU_WORKER, ["needs 4 GPUs; the cluster has 1"])):
        resources(res)
        warnings: list[str] = []
        assert train_job.check_resources(_train_spec(tmp_path), warn=warnings.append) is None
        assert len(warnings) == 1 and warnings[0].startswith("warning: ")
        assert "Ray Train will wait for the autoscaler" in warnings[0]
        for part in missing:
            assert part in warnings[0]
    assert "CPUs" not in warnings[0]  # eight CPUs are enough for four workers and the decoding
    warnings = []  # explicit can_grow wins over the rule, as in the label job
    train_job.check_resources(_train_spec(tmp_path, workers=2), can_grow=True, warn=warnings.append)
    assert "--gpu with 2 workers needs 2 GPUs; the cluster has 1" in warnings[0]
    resources({"CPU": 40.0, "GPU": 4.0})  # enough now: nothing said, on either kind of Ray
    for grows in (True, False):
        warnings = []
        train_job.check_resources(_train_spec(tmp_path), can_grow=grows, warn=warnings.append)
        assert warnings == []


def test_train_and_label_share_one_rule():
    """No second copy of 'can this Ray grow': both jobs use raytasks.reach.started_here."""
    from raytasks import reach

    assert train_job.started_here is reach.started_here is label_cluster.started_here


# --- jobs.label --------------------------------------------------------------------------------------------

def _label_spec(**kw) -> LabelSpec:
    return LabelSpec(**{"checkpoint": "s3://bucket/models/dmm.pt", "input": "s3://bucket/photos/",
                        "output": "s3://bucket/labels/run-1/", "gpus_per_actor": 1, **kw})


def test_label_warning_names_max_actors_as_what_the_pool_grows_to(resources):
    resources(AT_START)
    warnings: list[str] = []
    assert label_cluster.resolve_pool(_label_spec(), can_grow=True, warn=warnings.append) == (1, 1)
    assert "waiting for the autoscaler" in warnings[0]
    assert "without --max-actors the pool grows to at most 1 actor(s)" in warnings[0]
    assert "--max-actors sets how many actors it may grow to" in warnings[0]
    warnings = []
    assert label_cluster.resolve_pool(_label_spec(max_actors=4), can_grow=True, warn=warnings.append) == (1, 4)
    assert "the pool may grow to --max-actors 4 actors" in warnings[0]
    warnings = []  # CPU actors on the same empty cluster say the same
    assert label_cluster.resolve_pool(_label_spec(gpus_per_actor=0, max_actors=3), can_grow=True,
                                      warn=warnings.append) == (1, 3)
    assert "do not fit now; waiting for the autoscaler" in warnings[0] and "--max-actors 3" in warnings[0]
    with pytest.raises(LabelError, match="has 0 GPUs"):  # a Ray this process started: still an error
        label_cluster.resolve_pool(_label_spec(max_actors=4), can_grow=False, warn=warnings.append)


def _readme_cluster_label_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Running on a cluster"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    words = shlex.split(block.replace("\\\n", " "))
    return words[words.index("jobs.label") + 1:]


def test_readme_cluster_label_example_grows_to_cluster_yaml_four_gpus(resources):
    """README's cluster example, parsed by jobs.label's own parser, gives a pool of 1..4 GPU actors on
    cluster.yaml before any GPU worker is up (docs/deploy.md's commands do the same)."""
    from jobs.label import build_parser

    args = build_parser().parse_args(_readme_cluster_label_command())
    spec = _label_spec(checkpoint=args.checkpoint[0], input=args.input, output=args.output,
                       min_actors=args.min_actors, max_actors=args.max_actors, gpus_per_actor=args.gpus_per_actor)
    resources(AT_START)
    assert label_cluster.resolve_pool(spec, can_grow=True, warn=lambda line: None) == (1, 4)
    assert "--max-actors 4" in (ROOT / "docs" / "deploy.md").read_text()
