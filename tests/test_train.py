"""Ray Train: `python -m jobs.train` on synthetic CelebA faces, CPU, 2 workers (gloo), a few steps.

One hard-sharing run on the moto S3 server (data, run storage and output all on s3://) carries most checks:
a worker process is killed in epoch 2 and the run still completes; the exported checkpoint loads in
jobs.evaluate; DDP really runs (both ranks step, read disjoint halves of the data and hold identical weights
after the first step); validation covers the whole split. Rerunning the same command with more epochs
resumes after the stored epoch. (Every test using the ``ray_session`` fixture is marked ``ray`` by
tests/conftest.py.) A DMM-CNN run checks that its dynamic weights and thresholds, updated every
P steps from the all-reduced validation statistics, are identical on both workers.
"""

from __future__ import annotations

import json

import pytest
import torch

from facedata import storage, synth
from facedata.datasets import read_dataset
from jobs import evaluate as evaluate_job
from jobs import train as train_job
from models.checkpoint import load_checkpoint

N_FACES = 100  # 80 train / 10 val / 10 test (synth's CelebA partition)
FACE_SIZE = "89x109"  # half of CelebA's 178x218: quicker to decode, same aspect


def _history(run_uri: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(run_uri, "history.json")))


def _last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def local_faces(tmp_path_factory):
    return synth.generate("celeba", N_FACES, str(tmp_path_factory.mktemp("celeba")), seed=3, size=FACE_SIZE)


def test_s3_run_survives_a_killed_worker_exports_and_resumes(ray_session, s3_bucket, capsys):
    _, bucket = s3_bucket
    data = synth.generate("celeba", N_FACES, f"s3://{bucket}/celeba", seed=3, size=FACE_SIZE)
    table = read_dataset(f"celeba:{data}").table
    n_train, n_val = int((table.split == "train").sum()), int((table.split == "val").sum())
    storage_uri, output = f"s3://{bucket}/runs", f"s3://{bucket}/models/hs.pt"
    run_uri = f"{storage_uri}/hs"
    argv = ["--model", "hard_sharing", "--data", f"celeba:{data}", "--workers", "2", "--storage", storage_uri,
            "--name", "hs", "--output", output, "--batch-size", "16", "--patience", "0", "--keep", "1"]

    # rank 1 exits after the first step of epoch 2 (first attempt only): Ray Train restarts the worker group from
    # the epoch-1 checkpoint and the run ends with the 2 epochs asked for.
    outcome = train_job.main(argv + ["--epochs", "2", "--max-failures", "1", "--inject-failure", "1:2:1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == output == outcome.output
    assert "a worker failed: the worker group restarted from the checkpoint of epoch 1" in out
    assert [line.split()[1] for line in out if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert storage.exists(f"{run_uri}/.injected-failure-rank1-epoch2")
    doc = _history(run_uri)
    assert [a["start_epoch"] for a in doc["attempts"]] == [1, 2]
    assert [e["epoch"] for e in doc["epochs"]] == [1, 2]
    for e in doc["epochs"]:
        ranks = e["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        # each worker streamed its own half of the training split, all of it, in steps of 8 images
        assert [r["samples"] for r in ranks] == [n_train // 2] * 2 and e["train_images"] == n_train
        assert all(r["steps"] == n_train // 16 for r in ranks)
        assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP: same weights on both workers
        # validation metrics are over the whole validation split, not over rank 0's shard
        assert e["val_images"] == n_val
        first = [r["first_step"] for r in ranks]
        assert first[0] == first[1] and first[0]["init"] != first[0]["after_first_step"]
    assert doc["epochs"][1]["lr"] == pytest.approx(doc["epochs"][0]["lr"] / 1.5)  # L0/i: 1e-3/2 -> 1e-3/3

    # the exported checkpoint is the project's format; jobs.evaluate loads it
    model, info = load_checkpoint(output)
    assert info.model == "hard_sharing" and info.extra["epoch"] in (1, 2)
    metrics = evaluate_job.main(["--checkpoint", output, "--data", f"celeba:{data}", "--split", "val"])
    assert metrics["n_images"] == n_val and 0 <= metrics["mean_accuracy"] <= 1
    assert storage.read_bytes(f"{run_uri}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    csv = storage.read_bytes(f"{run_uri}/history.csv").decode().splitlines()
    assert len(csv) == 3 and "val_loss" in csv[0]

    # the same command again, with one more epoch: it resumes after epoch 2 instead of starting over
    outcome = train_job.main(argv + ["--epochs", "3"])
    assert outcome.resumed_from == 2 and _last_line(capsys) == output
    doc = _history(run_uri)
    assert [a["start_epoch"] for a in doc["attempts"]] == [1, 2, 3]
    assert [e["epoch"] for e in doc["epochs"]] == [1, 2, 3]
    assert doc["epochs"][2]["step"] == 3 * (n_train // 16)  # the step count went on from the checkpoint
    assert doc["epochs"][2]["lr"] == pytest.approx(1e-3 / 4)  # scheduler state restored, not restarted


def test_dmm_weights_and_thresholds_identical_on_every_worker(ray_session, local_faces, tmp_path, capsys):
    output = str(tmp_path / "dmm.pt")
    outcome = train_job.main([
        "--model", "dmm_cnn", "--data", f"celeba:{local_faces}", "--workers", "2", "--image-size", "64",
        "--model-arg", "depth=18",  # the paper's ResNet-50 trunk has 3x the weights to all-reduce and save
        "--epochs", "1", "--batch-size", "8", "--steps-per-epoch", "4", "--validate-every", "2",
        "--storage", str(tmp_path / "runs"), "--name", "dmm", "--output", output, "--keep", "1",
    ])
    assert _last_line(capsys) == output
    (epoch,) = _history(outcome.run_uri)["epochs"]
    ranks = epoch["ranks"]
    assert [r["steps"] for r in ranks] == [4, 4]
    # λ and τ after each of the 2 every-P validations (steps 2 and 4), hashed on each worker before any
    # later DDP forward could copy rank 0's buffers over: identical, so both saw the same reduced stats
    assert len(ranks[0]["after_on_validation"]) == 2
    assert ranks[0]["after_on_validation"] == ranks[1]["after_on_validation"]
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["buffers"] == ranks[1]["buffers"]
    model, _ = load_checkpoint(output)
    assert not torch.equal(model.thresholds, torch.zeros_like(model.thresholds))  # Eq. 6 moved τ
    assert not torch.equal(model.attribute_weights, torch.ones_like(model.attribute_weights))  # Eq. 4 moved λ
    assert "dmm.threshold_mean" in outcome.best_metrics


def test_hmtnet_on_utkface_trains_with_ddp_and_a_shard_whose_last_batch_holds_one_image(ray_session, tmp_path,
                                                                                        capsys):
    # UTKFace has gender and race but no beauty score: HMTNet's ANet gets no gradient, which DDP refuses
    # unless it is told to look for unused parameters; the job must do that by itself.
    # Issue #11: 34 training images on 2 workers are 17 per shard; batches of 8 (4 per worker) leave one
    # image over on each worker, which HMTNet's BatchNorm refused ("Expected more than 1 value per channel
    # when training"). The remainder joins the worker's previous batch: 4 steps of 4, 4, 4, 5 images each.
    data = synth.generate("utkface", 60, str(tmp_path / "utk"), seed=5, size=(96, 96))
    output = str(tmp_path / "hmtnet.pt")
    outcome = train_job.main([
        "--model", "hmtnet", "--data", f"utkface:{data}", "--workers", "2", "--image-size", "96",
        "--model-arg", "anet_width=16", "--epochs", "1", "--batch-size", "8", "--limit", "34",
        "--storage", str(tmp_path / "runs"), "--name", "rem", "--output", output, "--keep", "1",
    ])
    assert _last_line(capsys) == output
    model, info = load_checkpoint(output)
    assert info.config["race_classes"] == 5 and model.outputs["race"].classes[0] == "White"
    (epoch,) = _history(outcome.run_uri)["epochs"]
    assert [(r["samples"], r["steps"]) for r in epoch["ranks"]] == [(17, 4), (17, 4)]
    assert epoch["train_images"] == 34 and epoch["ranks"][0]["weights"] == epoch["ranks"][1]["weights"]


def test_bad_flags_fail_before_ray_starts(local_faces, tmp_path, capsys):
    base = ["--data", f"celeba:{local_faces}", "--storage", str(tmp_path)]
    cases = [
        (["--model", "nope"] + base, "unknown model 'nope'"),
        (["--model", "age_gender_race"] + base, "cannot train model 'age_gender_race'"),
        (["--model", "hard_sharing", "--workers", "0"] + base, "--workers must be at least 1"),
        (["--model", "hard_sharing", "--batch-size", "2", "--workers", "3"] + base, "one image per worker"),
        (["--model", "hard_sharing", "--limit", "3", "--workers", "2"] + base, "every worker needs at least 2"),
        (["--model", "hard_sharing", "--data", "celeba:" + str(tmp_path / "missing"), "--storage", str(tmp_path)],
         "not found"),
        (["--model", "hard_sharing", "--model-arg", "colour=1"] + base, "accepted: tasks"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            train_job.main(argv)
        assert exc.value.code == 1
        assert message in capsys.readouterr().err, argv
