"""DDP without Ray: two gloo processes on 127.0.0.1 run the steps a Ray Train worker runs
(raytasks/train/worker.py), at a twentieth of a Ray Train run's CPU:

* HMTNet with UTKFace's labels (gender and race, no beauty score): its ANet gets no gradient, which DDP refuses
  at the second step unless it looks for unused parameters; the train job turns that on by itself when the data
  lacks a head's labels (`core.batches.unlabelled_columns`, raytasks/train/job.py).
* DMM-CNN's every-P validations: each worker validates its own half, the statistics are all-reduced
  (`raytasks.train.collective.reduce_stats`) and `on_validation` moves λ (Eq. 4) and τ (Eq. 6) identically on
  both workers; from each worker's own statistics they would differ.

Ray Train's own part (workers, shards, the remainder of a shard joining its last batch, the every-P validations
inside an epoch, resume and restart) is checked by tests/test_recipes_runs.py's Ray Train run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import models
from core.batches import unlabelled_columns
from facedata.synth import generate
from raytasks.train.job import prepare
from raytasks.train.spec import TrainSpec
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import hashlib, json, sys
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import models
    from core import engine
    from core.batches import load_batch, unlabelled_columns
    from facedata.datasets import read_dataset

    rank, port, data, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ds = read_dataset(f"utkface:{data}")
    train = ds.split("train")

    def hmtnet():
        torch.manual_seed(0)  # the same initial weights on both ranks, as DDP's broadcast would make them anyway
        return models.create_model("hmtnet", **{**ds.model_overrides("hmtnet"), "image_size": 96, "anet_width": 16})

    def sha(model):
        h = hashlib.sha256()
        for p in model.parameters():
            h.update(p.detach().numpy().tobytes())
        return h.hexdigest()

    find_unused = bool(unlabelled_columns(hmtnet(), train.columns))
    report = {"find_unused": find_unused, "steps": [], "error": None}
    for mode in (find_unused, False):  # the job's choice, then without it: the refusal the choice avoids
        model = hmtnet()
        ddp = DDP(model, find_unused_parameters=mode)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        try:
            for step in range(2):
                rows = train.iloc[8 * step + 4 * rank: 8 * step + 4 * rank + 4]  # disjoint halves of 8
                out_ = engine.train_step(ddp, load_batch(rows, model, train=True), opt, torch.device("cpu"))
                if mode == find_unused:
                    report["steps"].append({"loss": out_["loss"], "weights": sha(model)})
        except RuntimeError as e:
            report["error"] = str(e).splitlines()[0]
    with open(out, "w") as f:
        json.dump(report, f)
""")


WORKER_DMM = textwrap.dedent("""
    import copy, json, sys
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import models
    from core import engine
    from core.batches import load_batch
    from facedata.datasets import read_dataset
    from raytasks.train.collective import reduce_stats, state_buffers_sha, weights_sha

    rank, port, data, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ds = read_dataset(f"celeba:{data}")
    train, val = ds.split("train"), ds.split("val")
    torch.manual_seed(0)
    model = models.create_model("dmm_cnn", image_size=64, depth=18)
    before = state_buffers_sha(model)
    ddp = DDP(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cpu = torch.device("cpu")
    half = val.iloc[rank::2]  # each worker validates its own half, as its Ray Data shard
    report = {"reduced": [], "local": [], "n": [], "weights": []}
    local_model = None
    for step in range(2):  # a validation after every step: P = 1, Algorithm 1's lines 4-6 twice
        rows = train.iloc[8 * step + 4 * rank: 8 * step + 4 * rank + 4]
        engine.train_step(ddp, load_batch(rows, model, train=True), opt, cpu)
        stats = engine.evaluate_batches(model, [load_batch(half, model)], cpu)
        if local_model is None:
            local_model = copy.deepcopy(model)
        local_model.on_validation(stats, 1)  # this worker's statistics alone: what the reduction avoids
        reduced = reduce_stats(stats, cpu)
        model.on_validation(reduced, 1)
        report["reduced"].append(state_buffers_sha(model))
        report["local"].append(state_buffers_sha(local_model))
        report["n"].append([float(stats["attributes"]["n"]), float(reduced["attributes"]["n"])])
        report["weights"].append(weights_sha(model))
    report["moved"] = [before != report["reduced"][-1],
                       not torch.equal(model.thresholds, torch.zeros_like(model.thresholds)),  # Eq. 6 moved τ
                       not torch.equal(model.attribute_weights, torch.ones_like(model.attribute_weights))]  # Eq. 4
    with open(out, "w") as f:
        json.dump(report, f)
""")


def _run_pair(tmp_path, source: str, data: str) -> tuple[dict, dict]:
    """``source`` as rank 0 and rank 1 of a gloo group; their JSON reports."""
    script = tmp_path / "worker.py"
    script.write_text(source)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, data, str(tmp_path / f"rank{r}.json")],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    return r0, r1


def test_hmtnet_without_beauty_labels_steps_under_ddp_with_equal_weights(tmp_path):
    data = generate("utkface", 40, str(tmp_path / "utk"), seed=5, size=(96, 96))
    # the train job's driver resolves HMTNet for UTKFace: its 5 races, and beauty without labels
    model, _, train, _, _ = prepare(TrainSpec(model="hmtnet", data=f"utkface:{data}", storage=str(tmp_path / "runs"),
                                              name="r", faces="whole", template_images=0,
                                              model_kwargs={"anet_width": 16}))
    assert model.config["race_classes"] == 5 and model.outputs["race"].classes[0] == "White"
    assert unlabelled_columns(model, train.columns) == ["beauty"]
    assert unlabelled_columns(models.create_model("hard_sharing"), ["path", "gender", "eyeglasses"]) == []

    r0, r1 = _run_pair(tmp_path, WORKER, data)
    assert r0["find_unused"] and r1["find_unused"]
    assert len(r0["steps"]) == len(r1["steps"]) == 2  # both steps ran with the job's choice
    for a, b in zip(r0["steps"], r1["steps"]):
        assert a["weights"] == b["weights"]  # gradients all-reduced: identical weights after every step
        assert a["loss"] != b["loss"]  # ... from different halves of the batch
    assert r0["steps"][0]["weights"] != r0["steps"][1]["weights"]
    # without find_unused_parameters, DDP stops at the second step over the ANet that got no gradient
    assert "finished reduction in the prior iteration" in (r0["error"] or ""), r0["error"]


def test_dmm_weights_and_thresholds_move_identically_on_every_worker_from_reduced_statistics(tmp_path):
    data = generate("celeba", 60, str(tmp_path / "celeba"), seed=3, size=(96, 96))  # 48 train, 6 val, 6 test
    r0, r1 = _run_pair(tmp_path, WORKER_DMM, data)
    # each worker validated 3 of the 6 validation faces; the reduced statistics count all 6 on both
    assert r0["n"] == r1["n"] == [[3.0, 6.0]] * 2
    assert r0["weights"] == r1["weights"]  # DDP: the same weights after every step
    # λ and τ hashed right after each on_validation: identical, so both saw the same statistics ...
    assert r0["reduced"] == r1["reduced"] and len(set(r0["reduced"])) == 2
    assert r0["moved"] == r1["moved"] == [True, True, True]
    # ... which they would not have from their own halves
    assert r0["local"][0] != r1["local"][0] and r0["local"][-1] != r1["local"][-1]
