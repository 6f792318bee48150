"""`python -m jobs.train`'s flags and data are checked before Ray starts, each with a clear message.

Where the rest of the train job is checked: one recipe trained with Ray Train (a worker killed in a run and
restarted by Ray Train, a rerun that resumes, DDP: both ranks step, read disjoint halves of the data, fold a
shard's last batch of one into the batch before it, validate inside an epoch, and hold identical weights and
state; validation over the whole split, the step count and learning-rate schedule going on across both, data,
run storage and output on S3, and the export that jobs.evaluate loads): tests/test_recipes_runs.py
``test_recipe_on_s3_dies_resumes_restarts_a_worker_with_ddp_and_is_exported_and_recorded``. DDP's
model-specific rules without Ray, in two gloo processes (HMTNet's head that gets no gradient, DMM-CNN's dynamic
weights and thresholds moved identically on both workers from all-reduced statistics): tests/test_ddp.py.
Training through face detection: tests/test_train_faces.py. The L0/i schedule of hard_sharing:
tests/test_papers.py ``test_hard_sharing_learning_rate_rule_both_readings``.
"""

from __future__ import annotations

import pytest

from facedata import synth
from jobs import train as train_job

N_FACES = 100  # 80 train / 10 val / 10 test (synth's CelebA partition)
FACE_SIZE = "89x109"  # half of CelebA's 178x218: quicker to decode, same aspect


@pytest.fixture(scope="module")
def local_faces(tmp_path_factory):
    return synth.generate("celeba", N_FACES, str(tmp_path_factory.mktemp("celeba")), seed=3, size=FACE_SIZE)


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
