"""Guards of the train job, without Ray: ``--init-from`` reads its checkpoint as every checkpoint is read (hash and
pin), the metric that picks the best epoch is one the data can measure (hmtnet on UTKFace), a rerun of a --name on
other data or another split is refused, ``jobs.evaluate --limit`` draws at random, and a rerun decides whether the
run is complete from its committed checkpoint, not from history.json."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import models
from core import engine
from facedata.datasets import read_dataset
from facedata.synth import generate
from jobs import evaluate as evaluate_job
from models.checkpoint import checkpoint_bytes, save_checkpoint
from raytasks.train import worker
from raytasks.train.history import Progress, write_history
from raytasks.train.resume import committed_epoch, resume_point
from raytasks.train.spec import MODEL_FILE, STATE_FILE, TrainError, TrainSpec
from tests.helpers import check_run_folder

NAN = float("nan")


# --- 1. --init-from: the hash is checked and a pin is taken ------------------------------------------------
def test_init_from_refuses_a_tampered_checkpoint_and_takes_a_pinned_one(tmp_path):
    torch.manual_seed(1)
    source = models.create_model("hard_sharing")
    digest = save_checkpoint(source, str(tmp_path / "hs.pt"))
    obj = torch.load(tmp_path / "hs.pt", weights_only=True)
    key = next(k for k, v in obj["state_dict"].items() if v.is_floating_point())
    obj["state_dict"][key] = obj["state_dict"][key] + 100.0  # tampered, its hash left as it was
    torch.save(obj, tmp_path / "tampered.pt")

    target = models.create_model("hard_sharing")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(TrainError, match="--init-from: .*content hash mismatch"):
        worker._init_from(target, str(tmp_path / "tampered.pt"))
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing copied

    worker._init_from(target, f"{tmp_path / 'hs.pt'}#{digest}")  # URI#sha256:<hex>, as label and serve take it
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    other = "sha256:" + "0" * 64
    with pytest.raises(TrainError, match="not the pinned"):
        worker._init_from(models.create_model("hard_sharing"), f"{tmp_path / 'hs.pt'}#{other}")


def test_init_from_is_checked_by_the_driver_before_the_faces_and_the_workers(tmp_path, monkeypatch):
    """``prepare`` reads ``--init-from`` as the workers will: a file that is not there, not a checkpoint or that
    shares no tensor with the model fails there, before the data's faces are found (a detection pass) and before
    Ray Train starts workers (it was the workers' error, 35 s in, with a "rerun to resume" that could not help).
    A local file missing here while a cluster runs the workers elsewhere is left to them."""
    import raytasks.train.job as job
    from raytasks.train.job import prepare

    data = generate("celeba", 24, str(tmp_path / "celeba"), seed=3)

    def no_faces(*a, **k):
        raise AssertionError("the faces were looked for")

    monkeypatch.setattr(job, "resolve_faces", no_faces)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 512)
    agr = tmp_path / "agr.pt"
    save_checkpoint(models.create_model("age_gender_race", backbone="resnet", depth=18, image_size=64), str(agr))
    for uri, said in ((str(tmp_path / "nope.pt"), "--init-from: checkpoint not found"),
                      (str(bad), "is not a loadable checkpoint"),
                      (str(agr), f"--init-from {agr} \\(age_gender_race\\) shares no tensor with hard_sharing")):
        spec = TrainSpec(model="hard_sharing", data=f"celeba:{data}", storage=str(tmp_path / "runs"), name="x",
                         init_from=uri)
        with pytest.raises(TrainError, match=said):
            prepare(spec)
    monkeypatch.setattr("raytasks.reach.tasks_elsewhere", lambda: "its 2 nodes each run tasks")
    spec = TrainSpec(model="hard_sharing", data=f"celeba:{data}", storage=str(tmp_path / "runs"), name="x",
                     init_from=str(tmp_path / "nope.pt"))
    with pytest.raises(AssertionError, match="the faces were looked for"):  # past the check: the workers' disks
        prepare(spec)
    monkeypatch.setattr("raytasks.reach.tasks_elsewhere", lambda: None)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    write_history(str(tmp_path / "runs" / "x"), [{"epoch": 1}], [], {})  # a rerun resumes from its own checkpoint
    with pytest.raises(AssertionError, match="the faces were looked for"):
        prepare(spec)


# --- 2. the metric that picks the best epoch is one the data can measure ------------------------------------
def _hmtnet():
    return models.create_model("hmtnet", image_size=96, anet_width=16, race_classes=5)


def test_hmtnet_without_beauty_labels_selects_by_mean_accuracy_and_never_compares_nan():
    m = _hmtnet()
    utk = pd.DataFrame({"path": ["a", "b"], "gender": [0.0, 1.0], "race": [2.0, NAN]})
    sel = engine.choose_selection(m, utk)
    assert (sel.metric, sel.mode, sel.model_metric) == ("mean_accuracy", "max", "beauty.pearson")
    assert "beauty" in sel.reason and "mean_accuracy (max), not beauty.pearson" in sel.line()
    # a beauty column without a value (a mix whose beauty rows fell in train) cannot measure it either
    assert engine.choose_selection(m, utk.assign(beauty=NAN)).metric == "mean_accuracy"
    # data with beauty keeps the model's own metric
    assert engine.choose_selection(m, utk.assign(beauty=[3.0, NAN])) == engine.Selection.of_model(m)
    # a model ranked by mean_accuracy on data that labels only a regression (age): the validation loss, min
    agr = models.create_model("age_gender_race", backbone_weights="random")
    sel = engine.choose_selection(agr, pd.DataFrame({"path": ["a"], "age": [31.0], "gender": [NAN]}))
    assert (sel.metric, sel.mode, sel.model_metric) == ("val_loss", "min", "mean_accuracy")
    with pytest.raises(ValueError, match="no value of any label"):
        engine.choose_selection(m, pd.DataFrame({"path": ["a"], "beauty": [NAN]}))

    # epochs as UTKFace gives them: beauty.pearson never computed. The chosen metric ranks and stops.
    epochs = [{"mean_accuracy": 0.5}, {"mean_accuracy": 0.6}, {"mean_accuracy": 0.55}, {"mean_accuracy": NAN}]
    sel = engine.choose_selection(m, utk)
    best, since = None, []
    for row in epochs:
        v = sel.value(row)
        if sel.is_better(v, best):
            best, since = v, [*since, 0]
        else:
            since.append(since[-1] + 1)
    assert best == 0.6 and since == [0, 0, 1, 2]
    assert [sel.score(sel.value(r)) for r in epochs] == [0.5, 0.6, 0.55, -math.inf]
    assert not sel.is_better(NAN, None) and not sel.is_better(NAN, 0.1) and sel.is_better(0.1, NAN)
    loss = engine.Selection("val_loss", "min")
    assert loss.score(2.0) == -2.0 and loss.is_better(1.0, 2.0) and not loss.is_better(2.0, 2.0)
    with pytest.raises(ValueError, match="mode max or min"):
        engine.Selection.from_dict({"metric": "x", "mode": "up"})


def test_fit_of_hmtnet_on_utkface_does_not_stop_on_a_metric_it_never_computes(tmp_path):
    """engine.fit (the plain loop) with patience 1 on UTKFace: before the fallback, every epoch's beauty.pearson was
    NaN, so epoch 2 already counted as one without improvement and the run stopped there."""
    ds = read_dataset(f"utkface:{generate('utkface', 12, str(tmp_path / 'u'), seed=2, size=(48, 48))}")
    m = _hmtnet()
    m.recipe = dataclasses.replace(m.recipe, early_stopping_patience=1)
    accuracy = iter([0.4, 0.5, 0.6])
    real = m.metrics
    m.metrics = lambda stats: {**real(stats), "mean_accuracy": next(accuracy)}  # rising: never a reason to stop
    lines: list[str] = []
    history = engine.fit(m, ds.split("train").iloc[:4], ds.split("train").iloc[4:8], epochs=3, batch_size=4,
                         lr=0.0, log_fn=lines.append)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all("beauty.pearson" not in h for h in history)
    assert lines[0].startswith("best checkpoint and early stopping: mean_accuracy (max), not beauty.pearson")


# --- 3. a rerun of a --name on other data or another split is refused ---------------------------------------
def _spec(tmp_path, **kw) -> TrainSpec:
    return TrainSpec(**{"model": "hard_sharing", "data": "celeba:/d", "storage": str(tmp_path), "name": "r", **kw})


def test_a_rerun_with_other_data_or_another_split_seed_is_refused(tmp_path):
    m = models.create_model("hard_sharing")
    val = pd.DataFrame({"path": ["a"], "gender": [1.0], "eyeglasses": [0.0]})
    spec = _spec(tmp_path, split_seed=3)
    sel, previous = check_run_folder(spec, m, val)  # an empty folder: nothing to compare with
    assert previous is None and sel == engine.Selection.of_model(m)
    header = {"run": "r", "model": m.name, "config": m.config, "data": spec.data, "split_seed": 3,
              "primary_metric": sel.metric, "primary_mode": sel.mode, "selection": sel.to_dict()}
    write_history(spec.run_uri, [], [], header)
    assert check_run_folder(spec, m, val)[1]["split_seed"] == 3  # the same run goes on
    with pytest.raises(TrainError, match=r"--split-seed 3 -> 0.*use a new --name"):
        check_run_folder(dataclasses.replace(spec, split_seed=0), m, val)
    with pytest.raises(TrainError, match=r"--data celeba:/d -> \('celeba:/d', 'genki4k:/g'\).*use a new --name"):
        check_run_folder(dataclasses.replace(spec, data=("celeba:/d", "genki4k:/g")), m, val)
    assert sel.metric == "val_loss"  # hard_sharing's: the checkpoints of a run ranked otherwise do not compare
    write_history(spec.run_uri, [], [], {**header, "selection": {"metric": "mean_accuracy", "mode": "max"}})
    with pytest.raises(TrainError, match="ranked its checkpoints by mean_accuracy"):
        check_run_folder(spec, m, val)


def test_a_checkpoint_of_another_split_is_not_loaded_by_the_worker(tmp_path):
    """The worker's own check, from the checkpoint's extra: it covers runs whose history header predates the split
    seed (and any caller of the worker that skips the driver)."""
    import pyarrow.fs

    m = models.create_model("hard_sharing")
    data, _ = checkpoint_bytes(m, {}, {"epoch": 2, "data": ["celeba:/d"], "split_seed": 3})
    (tmp_path / MODEL_FILE).write_bytes(data)
    torch.save({"epoch": 2}, tmp_path / STATE_FILE)
    ckpt = SimpleNamespace(filesystem=pyarrow.fs.LocalFileSystem(), path=str(tmp_path))
    expect = {"model": m.name, "config": m.config, "data": ("celeba:/d",), "split_seed": 3}
    assert worker._load_state(models.create_model("hard_sharing"), ckpt, expect)["epoch"] == 2
    for changed in ({"split_seed": 0}, {"data": "celeba:/other"}):
        with pytest.raises(TrainError, match="use a new --name"):
            worker._load_state(models.create_model("hard_sharing"), ckpt, {**expect, **changed})


# --- 4. jobs.evaluate --limit draws at random with a fixed seed ----------------------------------------------
def test_evaluate_limits_draw_rows_at_random_with_a_fixed_seed(tmp_path, monkeypatch, capsys):
    data = generate("celeba", 30, str(tmp_path / "c"), seed=4, size=(40, 48))
    ckpt = str(tmp_path / "hs.pt")
    save_checkpoint(models.create_model("hard_sharing"), ckpt)
    seen: list[list[str]] = []
    real = evaluate_job.run_model

    def recording(model, table, *a, **kw):
        seen.append(list(table["path"]))
        return real(model, table, *a, **kw)

    monkeypatch.setattr(evaluate_job, "run_model", recording)
    argv = ["--checkpoint", ckpt, "--data", f"celeba:{data}", "--split", "all", "--faces", "whole"]
    metrics = evaluate_job.main([*argv, "--limit", "5", "--calibrate-on", "all", "--calibrate-limit", "24"])
    evaluate_job.main([*argv, "--limit", "5"])
    table = read_dataset(f"celeba:{data}").table
    first = list(table["path"])
    assert len(seen[0]) == 24 and len(seen[1]) == 5 and metrics["n_images"] == 5
    assert seen[0] == list(engine.sample_rows(table, 24, evaluate_job.LIMIT_SEED)["path"]) != first[:24]
    assert seen[1] == list(engine.sample_rows(table, 5, evaluate_job.LIMIT_SEED)["path"]) != first[:5]
    assert seen[2] == seen[1]  # the same rows every run
    capsys.readouterr()
    with pytest.raises(SystemExit):
        evaluate_job.main(["--help"])
    assert "drawn at random with the fixed seed 0" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        evaluate_job.main([*argv, "--limit", "0"])


# --- 5. a rerun decides completion from the committed checkpoint, not from history.json -----------------------
def test_a_rerun_is_complete_only_when_the_last_epochs_checkpoint_was_committed():
    history = {"epochs": [{"epoch": 1, "stopped": 0}, {"epoch": 2, "stopped": 0}, {"epoch": 3, "stopped": 0}]}
    # history.json has epoch 3 (written first) but the job died before its checkpoint was committed
    assert resume_point(history, 2, 3) == (2, False, False)
    assert resume_point(history, 3, 3) == (3, True, False)
    stopped = {"epochs": [{"epoch": 1, "stopped": 0}, {"epoch": 2, "stopped": 1}, {"epoch": 3, "stopped": 0}]}
    assert resume_point(stopped, 2, 5) == (2, True, True)
    assert resume_point(stopped, 1, 5) == (1, False, False)
    assert resume_point(None, 4, 5) == (4, False, False) and resume_point(history, None, 3) == (None, False, False)
    assert committed_epoch(SimpleNamespace(metrics={"epoch": 2, "score": 0.5})) == 2
    assert committed_epoch(SimpleNamespace(metrics=None)) is None


def test_progress_does_not_print_the_uncommitted_row_of_an_earlier_attempt(tmp_path):
    """The driver's epoch lines on such a rerun: history.json still holds epoch 3 of the attempt that died before
    committing it; the line printed for epoch 3 is the one this trainer trains."""
    m = models.create_model("hard_sharing")
    lines: list[str] = []

    def row(epoch, attempt, loss):
        return {"epoch": epoch, "attempt": attempt, "train_loss": loss, "val_loss": loss, "samples_per_s": 1.0,
                "stopped": 0}

    header = {"primary_metric": "val_loss"}
    write_history(str(tmp_path), [row(1, 1, 0.9), row(2, 1, 0.8), row(3, 1, 0.7)], [{"start_epoch": 1}], header)
    progress = Progress(str(tmp_path), m, m.recipe, lines.append, after_epoch=2, every_s=600)
    progress.start()
    progress.stop()
    assert lines == []
    write_history(str(tmp_path), [row(1, 1, 0.9), row(2, 1, 0.8), row(3, 2, 0.5)],
                  [{"start_epoch": 1}, {"start_epoch": 3}], header)
    progress.poll()
    assert len(lines) == 1 and lines[0].startswith("epoch 3/") and "val_loss=0.5000" in lines[0]


def test_a_resume_refuses_a_run_folder_changed_since_it_was_written(tmp_path):
    """The worker reads its run's model.pt as every checkpoint is read: a tensor changed in the run folder (whose
    recorded hash then no longer matches) or a training state that is not a safe archive stops the resume."""
    import io

    import pyarrow.fs

    m = models.create_model("hard_sharing")
    data, _ = checkpoint_bytes(m, {}, {"epoch": 2})
    (tmp_path / MODEL_FILE).write_bytes(data)
    torch.save({"epoch": 2}, tmp_path / STATE_FILE)
    ckpt = SimpleNamespace(filesystem=pyarrow.fs.LocalFileSystem(), path=str(tmp_path))
    expect = {"model": m.name, "config": m.config, "data": None, "split_seed": 0}
    assert worker._load_state(models.create_model("hard_sharing"), ckpt, expect)["epoch"] == 2

    obj = torch.load(io.BytesIO(data), weights_only=True)
    key = next(iter(obj["state_dict"]))
    obj["state_dict"][key] = obj["state_dict"][key] + 100  # the weights changed, the recorded hash not
    buf = io.BytesIO()
    torch.save(obj, buf)
    (tmp_path / MODEL_FILE).write_bytes(buf.getvalue())
    with pytest.raises(TrainError, match="content hash mismatch"):
        worker._load_state(models.create_model("hard_sharing"), ckpt, expect)

    (tmp_path / MODEL_FILE).write_bytes(data)
    (tmp_path / STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(TrainError, match="cannot resume from"):
        worker._load_state(models.create_model("hard_sharing"), ckpt, expect)


def test_an_output_that_could_not_be_written_is_refused_before_training(tmp_path):
    """``--output`` a folder, or under a file: refused by ``prepare`` before the faces and the workers (it was a
    traceback after training); a path under folders still to be made, and an s3:// URI, pass."""
    from raytasks.train.job import check_output

    (tmp_path / "f.pt").write_bytes(b"x")
    with pytest.raises(TrainError, match="is a folder"):
        check_output(str(tmp_path))
    with pytest.raises(TrainError, match=f"{tmp_path / 'f.pt'} is a file, not a folder"):
        check_output(str(tmp_path / "f.pt" / "sub" / "m.pt"))
    check_output(str(tmp_path / "new" / "deeper" / "m.pt"))  # write_bytes makes the folders
    check_output(str(tmp_path / "f.pt"))  # replaced at the end, as before
    check_output("s3://bucket/models/m.pt")
    check_output(None)
    assert not (tmp_path / "new").exists()  # nothing made here
