"""Ray Train: `python -m jobs.train` on synthetic faces, CPU, 2 workers (gloo), a few steps: the runs that need a
model of their own. A DMM-CNN run checks that its dynamic weights and thresholds, updated every P steps from the
all-reduced validation statistics, are identical on both workers, and that a worker shard whose last batch holds
one image trains (the remainder joins the batch before it). (Every test using the ``ray_session`` fixture is
marked ``ray`` by tests/conftest.py.) DDP with a head that gets no gradient (HMTNet on UTKFace) is checked without
Ray, in two gloo processes: tests/test_ddp.py.

A worker killed in a run and restarted by Ray Train, a rerun that resumes, DDP (both ranks step, read disjoint
halves of the data and hold identical weights), validation over the whole split, the step count and learning-rate
schedule going on across both, data, run storage and output on S3 and the export that jobs.evaluate loads are
checked on one recipe trained with Ray Train: tests/test_recipes.py
``test_recipe_on_s3_dies_resumes_restarts_a_worker_with_ddp_and_is_exported_and_recorded``. The L0/i schedule of
hard_sharing: tests/test_papers.py ``test_hard_sharing_learning_rate_rule_both_readings``.
"""

from __future__ import annotations

import json

import pytest
import torch

import storage
from facedata import synth
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


def test_dmm_weights_and_thresholds_identical_on_every_worker_and_a_last_batch_of_one_joins_the_one_before(
        ray_session, local_faces, tmp_path, capsys):
    # Issue #11: 34 training images on 2 workers are 17 per shard; batches of 8 (4 per worker) leave one image
    # over on each worker, which BatchNorm refused ("Expected more than 1 value per channel when training").
    # The remainder joins the worker's previous batch: 4 steps of 4, 4, 4, 5 images each.
    output = str(tmp_path / "dmm.pt")
    outcome = train_job.main([
        "--model", "dmm_cnn", "--data", f"celeba:{local_faces}", "--workers", "2", "--image-size", "64",
        "--model-arg", "depth=18",  # the paper's ResNet-50 trunk has 3x the weights to all-reduce and save
        "--epochs", "1", "--batch-size", "8", "--limit", "34", "--validate-every", "2",
        "--storage", str(tmp_path / "runs"), "--name", "dmm", "--output", output, "--keep", "1",
    ])
    assert _last_line(capsys) == output
    (epoch,) = _history(outcome.run_uri)["epochs"]
    ranks = epoch["ranks"]
    assert [(r["samples"], r["steps"]) for r in ranks] == [(17, 4), (17, 4)] and epoch["train_images"] == 34
    # λ and τ after each of the 2 every-P validations (steps 2 and 4), hashed on each worker before any
    # later DDP forward could copy rank 0's buffers over: identical, so both saw the same reduced stats
    assert len(ranks[0]["after_on_validation"]) == 2
    assert ranks[0]["after_on_validation"] == ranks[1]["after_on_validation"]
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["buffers"] == ranks[1]["buffers"]
    model, _ = load_checkpoint(output)
    assert not torch.equal(model.thresholds, torch.zeros_like(model.thresholds))  # Eq. 6 moved τ
    assert not torch.equal(model.attribute_weights, torch.ones_like(model.attribute_weights))  # Eq. 4 moved λ
    assert "dmm.threshold_mean" in outcome.best_metrics


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
