"""A recipe's runs (raytasks/train/stages.py, models/recipes.py): which stage a rerun trains (the run folder's
checks), the record in the checkpoint, and a two-stage recipe (age_gender_race-utkface's first two stages) trained
with Ray Train (age_gender_race on synthetic UTKFace on the moto S3 server, a random dlib trunk at 112 px, a few
images, 2 DDP workers) in which a worker dies in the second stage, the rerun resumes it, and a worker killed in the
resumed stage is restarted by Ray Train: the project's one Ray Train test of dying, resuming, restarting, DDP
(shards, the remainder of a shard, validations inside an epoch) and exporting (tests/test_ddp.py checks DDP's
model-specific rules without Ray). What a recipe plans before anything trains: tests/test_recipes.py."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
import torch

import models
import storage
from facedata import synth
from facedata.datasets import read_dataset
from jobs import evaluate as evaluate_job
from jobs import train as train_job
from models.checkpoint import checkpoint_info, load_checkpoint, save_checkpoint, with_extra
from models.recipes import RECIPES, RECORD_KEY, get_recipe, record_lines
from raytasks.train import TrainError
from raytasks.train.collective import tensors_sha, weights_sha
from raytasks.train.spec import MODEL_FILE, STATE_FILE
from raytasks.train.stages import first_to_train, plan


def _history(run_uri: str) -> dict:
    return json.loads(storage.read_bytes(f"{run_uri}/history.json"))


def _spec(argv):
    args = train_job.build_parser().parse_args(argv)
    return args, train_job.spec_from_args(args)


def test_the_run_folder_must_hold_what_the_recipe_trains(tmp_path):
    recipe = get_recipe("age_gender_race-utkface")
    _, spec = _spec(["--model", "age_gender_race", "--data", "utkface:/d", "--storage", str(tmp_path), "--name", "r"])
    runs = plan(spec, recipe)
    ckpt = [str(tmp_path / f"{k}.pt") for k in range(3)]
    for c in ckpt[:2]:
        storage.write_bytes(c, b"x")

    def done(k, epochs_done, stopped=False):
        return {"index": k + 1, "identity": runs[k].identity, "status": "done", "output": ckpt[k],
                "stopped": stopped, "epochs_done": epochs_done, "train_values": {"epochs": 99}}

    state = {"recipe": recipe.name, "version": recipe.version, "stages": [done(0, 8), done(1, 1, stopped=True)]}
    assert first_to_train(runs, recipe, state, "RUN", False) == 2  # stage 3 is next
    state["stages"].append({"index": 3, "identity": runs[2].identity, "status": "training"})
    assert first_to_train(runs, recipe, state, "RUN", False) == 2  # stage 3 resumes
    assert first_to_train(runs, recipe, None, "RUN", False) == 0
    # a larger --epochs goes on with the last stage (job.run resumes it after its last epoch, as after a failure)
    # when the stages before it stopped early: those are done whatever --epochs says
    storage.write_bytes(ckpt[2], b"x")
    ended = {**state, "stages": [done(0, 2, stopped=True), done(1, 1, stopped=True), done(2, 2)]}
    assert first_to_train(plan(dataclasses.replace(spec, recipe={"epochs": 3}), recipe), recipe, ended, "RUN",
                          False) == 2

    changed = plan(dataclasses.replace(spec, recipe={"lr": 0.5}), recipe)
    with pytest.raises(TrainError, match=r"stage 1/3 frozen in RUN was trained with other values \(train: .*0.5"):
        first_to_train(changed, recipe, state, "RUN", False)
    more = plan(dataclasses.replace(spec, recipe={"epochs": 9}), recipe)  # stage 1 would train on after stage 2
    with pytest.raises(TrainError, match="stage 1/3 frozen in RUN would train again .* stage 2 already started"):
        first_to_train(more, recipe, state, "RUN", False)
    (tmp_path / "1.pt").unlink()  # stage 2's checkpoint is gone: it is not done
    with pytest.raises(TrainError, match="stage 2/3 finetune in RUN would train again"):
        first_to_train(runs, recipe, state, "RUN", False)
    v = recipe.version
    with pytest.raises(TrainError, match=f"holds recipe age_gender_race-utkface v{v}, not age_gender_race-utkface v{v + 1}"):
        first_to_train(runs, dataclasses.replace(recipe, version=v + 1), state, "RUN", False)
    with pytest.raises(TrainError, match="rerun with --recipe age_gender_race-utkface to resume"):
        first_to_train(plan(spec, None), None, state, "RUN", False)
    with pytest.raises(TrainError, match="holds a run trained without a recipe: rerun with --recipe none"):
        first_to_train(runs, recipe, None, "RUN", True)


def test_the_recipe_record_is_added_to_a_checkpoint_without_touching_the_model(tmp_path):
    model = models.create_model("hard_sharing")
    uri = str(tmp_path / "hs.pt")
    old = save_checkpoint(model, uri, {"val_loss": 0.5}, {"epoch": 3})
    assert record_lines(checkpoint_info(uri).extra) == []  # a checkpoint from before recipes loads and says so
    record = {"name": "hard_sharing-celeba", "version": 1, "stages": [
        {"index": 1, "name": "train", "epochs_done": 4, "stopped": True, "best_epoch": 2,
         "primary_metric": "val_loss", "best_metrics": {"val_loss": 0.25},
         "train_values": {"epochs": 10}, "overrides": {"epochs": 10, "lr": 0.01}}]}
    with open(uri, "rb") as f:
        before = f.read()
    data, new = with_extra(uri, {RECORD_KEY: record}, data=before)
    with open(uri, "rb") as f:
        assert f.read() == before  # made in memory: the export writes it once
    with open(uri, "wb") as f:
        f.write(data)
    loaded, info = load_checkpoint(uri)  # the hash was computed again: it loads
    assert info.hash == new != old and info.extra == {"epoch": 3, RECORD_KEY: record}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert record_lines(info.extra) == [
        "recipe hard_sharing-celeba v1",
        "  stage 1 train: 4 of 10 epochs (stopped early), best epoch 2, val_loss 0.2500; epochs=10, lr=0.01"]
    # a recipe (or a flag) that chose the faces: the record says how the training images became faces
    faces = {"mode": "detect", "options": {"detector": {"size": 256}}}
    assert record_lines({RECORD_KEY: {**record, "faces": faces}})[1] == "  faces: detect (detector size=256)"


def test_recipe_on_s3_dies_resumes_restarts_a_worker_with_ddp_and_is_exported_and_recorded(ray_session, s3_bucket,
                                                                                           capsys, monkeypatch):
    # One recipe on the moto S3 server (data, run storage and output all s3://), 2 DDP workers, 3 Ray Train runs:
    # run 1 trains stage 1 and dies in stage 2's epoch 2 with no restart left; run 2 resumes stage 2 after its
    # epoch 1, a worker is killed in that first epoch of the resumed attempt, and Ray Train restarts the worker
    # group from epoch 1's checkpoint, which does not hold the killed attempt: history.json lists it all the same
    # (every attempt records itself there when it starts) and the driver says that the group restarted.
    # The recipe is age_gender_race-utkface's first two stages (frozen trunk, then the whole net at a lower trunk
    # rate), registered for this test under a name of its own and chosen with --recipe: two stages show a stage
    # starting from the previous one's best checkpoint and a finished stage skipped by the rerun; the recipe's
    # third stage would add a fourth Ray Train run (about 60 CPU-s, measured alone) that shows nothing more (its
    # values: tests/test_recipes.py, test_a_flag_replaces_the_value_in_every_stage).
    # The DDP, data-sharding, validation, step-count and scheduler checks are made on every stage's history.
    # --schedule hard_sharing (L0/i, a rate that changes every epoch; the recipe's plateau would not move in 2
    # epochs) makes a scheduler restarted on resume or restart visible in the recorded learning rates. --optimizer
    # sgd: its state is one momentum buffer per weight where Adam's is two (the dlib trunk's 24 MB), a smaller
    # training state to write and read back on every resume and restart.
    # Stage 1 trains 1 epoch and stage 2 two (the stages' own epochs, no --epochs flag): stage 2 shows the
    # epochs, the step count and the schedule going on across a resume and a restart; a second epoch of stage 1
    # would show nothing more (about 8 s of the suite).
    agr = get_recipe("age_gender_race-utkface")
    stages = tuple(dataclasses.replace(s, train={**s.train, "epochs": e}) for s, e in zip(agr.stages[:2], (1, 2)))
    two = dataclasses.replace(agr, name="age_gender_race-utkface-first-two", formats=(), stages=stages)
    monkeypatch.setitem(RECIPES, two.name, two)
    _, bucket = s3_bucket
    data = synth.generate("utkface", 40, f"s3://{bucket}/utk", seed=4, size=(96, 96))
    n_val = int((read_dataset(f"utkface:{data}").table.split == "val").sum())  # 4: 2 on each worker
    runs, output = f"s3://{bucket}/runs", f"s3://{bucket}/models/agr.pt"
    # --limit 10 on 2 workers: 5 images each, in batches of 2 (batch 4): the last batch of one would stop BatchNorm
    # ("Expected more than 1 value per channel when training", issue #11) and joins the one before: 2 steps of
    # 2 and 3 per epoch. --validate-every 2: an every-P validation inside each epoch, at its second step (DMM-CNN's
    # P; their all-reduced statistics and λ, τ: tests/test_ddp.py; P = 1 would start 2 more validation passes an
    # epoch, about 40 s more in the suite)
    n_train, steps = 10, 2
    argv = ["--model", "age_gender_race", "--data", f"utkface:{data}", "--workers", "2", "--threads", "1",
            "--recipe", two.name, "--faces", "whole",  # the recipe's detector on drawn chips: tests/test_train_faces.py
            "--storage", runs, "--name", "agr", "--output", output, "--keep", "1", "--template-images", "0",
            "--model-arg", "backbone_weights=random", "--image-size", "112",  # the recipe's trunk, small and quick
            "--batch-size", "4", "--limit", str(n_train), "--patience", "0", "--validate-every", "2",
            "--schedule", "hard_sharing", "--optimizer", "sgd", "--average-epochs", "2"]
    folders = [f"{runs}/agr/stage-1-frozen", f"{runs}/agr/stage-2-finetune"]

    # rank 0 dies in stage 2's second epoch and the run has no restart left: stage 1 is done, stage 2 has the
    # checkpoint of its first epoch
    with pytest.raises(SystemExit):
        train_job.main(argv + ["--max-failures", "0", "--inject-failure", "0:2:1@2"])
    out = capsys.readouterr()
    assert "rerun the same command" in out.err and ".injected-failure-rank0-epoch2" not in out.err, out.err[-3000:]
    assert storage.exists(f"{folders[1]}/.injected-failure-rank0-epoch2")
    assert "  stage 2/2 finetune: backbone_freeze=none, backbone_lr_scale=0.01, backbone_weights=random (flag)" in out.out
    assert "  faces in every stage: whole (flags)" in out.out
    state = json.loads(storage.read_bytes(f"{runs}/agr/recipe.json"))
    assert [(e["name"], e["status"]) for e in state["stages"]] == [("frozen", "done"), ("finetune", "training")]
    assert [e["epoch"] for e in _history(folders[1])["epochs"]] == [1]

    # the same command again, now with a restart left and rank 1 killed after the first step of stage 2's epoch 2:
    # stage 1 is skipped, stage 2 resumes after its epoch 1, survives the kill and ends with its 2 epochs
    writes, write = [], storage.write_bytes  # the driver's writes (the export is made in this process)
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (writes.append(uri), write(uri, data))[1])
    outcome = train_job.main(argv + ["--max-failures", "1", "--inject-failure", "1:2:1@2"])
    assert writes.count(output) == 1  # the calibrated export with the recipe's record, written once
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == output == outcome.output
    assert any(line.startswith("stage 1/2 frozen: done (1 epochs, best epoch") for line in lines)
    assert f"resuming run agr/stage-2-finetune from {folders[1]} after epoch 1" in lines
    assert lines.count("a worker failed: the worker group restarted from the checkpoint of epoch 1") == 1
    # every epoch trained shows once: stage 2's second (once, although trained twice)
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["2/2"]
    assert storage.exists(f"{folders[1]}/.injected-failure-rank1-epoch2")
    h1, h2 = (_history(f) for f in folders)
    assert [a["start_epoch"] for a in h1["attempts"]] == [1]
    assert [a["start_epoch"] for a in h2["attempts"]] == [1, 2, 2]  # resumed by the rerun, restarted by Ray Train
    assert all(a["world_size"] == 2 for h in (h1, h2) for a in h["attempts"])
    # in order, stage 2 from stage 1's best checkpoint: its weights are stage 2's first weights
    times = [a["time"] for h in (h1, h2) for a in h["attempts"]]
    assert times == sorted(times) and len(set(times)) == 4
    best, _ = load_checkpoint(f"{folders[0]}/best.pt")
    assert h2["epochs"][0]["ranks"][0]["first_step"]["init"] == weights_sha(best)
    assert [h["config"]["backbone_freeze"] for h in (h1, h2)] == ["all", "none"]
    assert [h["recipe"]["lr"] for h in (h1, h2)] == [1e-3, 1e-3]
    assert all((h["recipe"]["schedule"], h["recipe"]["optimizer"]) == ("hard_sharing", "sgd") for h in (h1, h2))
    for folder, h, epochs in zip(folders, (h1, h2), (1, 2)):
        assert [e["epoch"] for e in h["epochs"]] == list(range(1, epochs + 1))
        for e in h["epochs"]:
            ranks = e["ranks"]
            assert [r["rank"] for r in ranks] == [0, 1]
            # each worker streamed its own half of the training images, all of them, in steps of 2 images
            assert [r["samples"] for r in ranks] == [n_train // 2] * 2 and e["train_images"] == n_train
            assert [r["steps"] for r in ranks] == [steps] * 2
            assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP: same weights on both workers
            assert ranks[0]["buffers"] == ranks[1]["buffers"]  # and the same model state
            assert len(ranks[0]["after_on_validation"]) == 1  # the every-P validation (P = 2 = steps)
            assert ranks[0]["after_on_validation"] == ranks[1]["after_on_validation"]
            # validation metrics are over the whole validation split, not over rank 0's shard
            assert e["val_images"] == n_val
            # the step count and the L0/i schedule go on across the resume and the restart (stage 2): a new
            # count would say `steps`, a new scheduler lr/2 (the rate recorded is the next epoch's)
            assert e["step"] == e["epoch"] * steps
            assert e["lr"] == pytest.approx(h["recipe"]["lr"] / (e["epoch"] + 1))
            first = [r["first_step"] for r in ranks]  # the weights around an attempt's first step
            if h["attempts"][e["attempt"] - 1]["start_epoch"] == e["epoch"]:
                assert first[0] == first[1] and first[0]["init"] != first[0]["after_first_step"]
                if e["epoch"] > 1:  # a resumed or restarted attempt starts from the previous epoch's weights
                    assert first[0]["init"] == h["epochs"][e["epoch"] - 2]["ranks"][0]["weights"]
            else:
                assert first == [None, None]
        assert storage.read_bytes(f"{folder}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
        csv = storage.read_bytes(f"{folder}/history.csv").decode().splitlines()
        assert len(csv) == 1 + epochs and "val_loss" in csv[0]
    assert [e["attempt"] for e in h2["epochs"]] == [1, 3]  # epoch 2 as the restarted worker group trained it
    # --average-epochs 2 (core/averaging.py): an epoch's checkpoint and recorded weights are the mean of the last
    # two epochs' weights; the training state keeps that window (its last entry: the weights a resume trains on
    # from), and its first entry is epoch 1's weights
    assert h2["recipe"]["average_epochs"] == 2
    kept = [e for e in (1, 2) if storage.exists(f"{folders[1]}/epoch_{e:04d}/{STATE_FILE}")]
    assert kept
    for e in kept:
        window = torch.load(io.BytesIO(storage.read_bytes(f"{folders[1]}/epoch_{e:04d}/{STATE_FILE}")),
                            weights_only=True)["average_window"]
        saved = torch.load(io.BytesIO(storage.read_bytes(f"{folders[1]}/epoch_{e:04d}/{MODEL_FILE}")),
                           weights_only=True)["state_dict"]
        assert len(window) == e and tensors_sha(window[0].items()) == h2["epochs"][0]["ranks"][0]["weights"]
        assert all(torch.allclose(saved[k], sum(w[k] for w in window) / e, atol=1e-6) for k in window[0])
        assert tensors_sha((k, saved[k]) for k in window[0]) == h2["epochs"][e - 1]["ranks"][0]["weights"]
        if e == 2:
            assert tensors_sha(window[1].items()) != h2["epochs"][1]["ranks"][0]["weights"]

    # the exported checkpoint (the last stage's best, calibrated) records the recipe and every stage
    _, info = load_checkpoint(output)
    assert outcome.output_hash == info.hash  # what the job says it exported, record included
    assert info.model == "age_gender_race" and info.extra["epoch"] in (1, 2) and info.extra["faces"]
    assert info.extra["split_seed"] == 0  # the split jobs.evaluate reads by default
    record = info.extra[RECORD_KEY]
    assert (record["name"], record["version"]) == (two.name, agr.version)
    state = json.loads(storage.read_bytes(f"{runs}/agr/recipe.json"))
    assert state["stages"][-1]["output_hash"] == info.hash and state["stages"][-1]["status"] == "done"
    assert [{k: v for k, v in e.items() if k not in ("identity", "status", "output_hash")}
            for e in state["stages"]] == record["stages"]  # the record is the run folder's account
    assert [s["name"] for s in record["stages"]] == ["frozen", "finetune"]
    for s, h in zip(record["stages"], (h1, h2)):
        assert s["train_values"] == h["recipe"] and s["model_config"] == h["config"]
        top = max(e["score"] for e in h["epochs"])
        assert s["best_epoch"] in [e["epoch"] for e in h["epochs"] if e["score"] == top]
        assert s["best_metrics"]["mean_accuracy"] == h["epochs"][s["best_epoch"] - 1]["mean_accuracy"]
    metrics = evaluate_job.main(["--checkpoint", output, "--data", f"utkface:{data}", "--split", "val"])
    shown = capsys.readouterr().out
    assert metrics["n_images"] == n_val and 0 <= metrics["mean_accuracy"] <= 1
    assert f"recipe {two.name} v{agr.version}\n  faces: whole\n  stage 1 frozen: 1 of 1 epochs" in shown

    # a rerun with another value is refused before anything trains
    with pytest.raises(SystemExit):
        train_job.main(argv + ["--lr", "0.01"])
    assert "stage 1/2 frozen in " in (err := capsys.readouterr().err) and "was trained with other values" in err
