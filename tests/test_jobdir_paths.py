"""Relative local paths in a job sent with ``ray job submit --working-dir .``: the job runs in the copy of the
repository Ray unpacked (``<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>/``), so ``--storage runs``
(train's default), ``--output labels`` or ``--data celeba:data/x`` would be read and written in Ray's temporary
session folder, in a package folder a code change renames (audit: the checkpoint of ``ray job submit ... jobs.train``
landed in ``.../working_dir_files/_ray_pkg_af32.../runs/t1/best.pt``). Every entry point that takes local paths
refuses them there with one ``error:`` line (raytasks/reach.py job_dir_problem), takes absolute paths and s3://
URIs, and changes nothing outside such a folder. In-process ``main()`` up to the first step past the flags (a stub
that raises :class:`Reached`), no Ray, no data read; one subprocess runs ``python -m jobs.train`` as Ray does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raytasks import reach

ROOT = Path(__file__).resolve().parents[1]
PKG = "_ray_pkg_af32bbf8ffdf10ce"
# what Ray 2.60's job supervisor puts in a submitted entrypoint's environment (job_supervisor.py _get_driver_env_vars)
JOB_CONFIG = json.dumps({"runtime_env": {"working_dir": f"gcs://{PKG}.zip"},
                         "metadata": {"job_submission_id": "raysubmit_uv8jUwCje31Q6cMh"}})
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # ray/_private/runtime_env/constants.py
PIN = "#sha256:" + "0" * 64


class Reached(Exception):
    """The stub past the flags was reached: the paths were accepted."""


def _reached(*a, **k):
    raise Reached


def _main_until(monkeypatch, module, first_step: str, argv):
    """``module.main(argv)``, stopped at its first step past the flags (``module.<first_step>`` raises
    :class:`Reached`): call it to see whether the paths were accepted."""
    monkeypatch.setattr(module, first_step, _reached)
    return lambda: module.main(argv)


def _ray_dir(tmp_path: Path, resources: str = "runtime_resources") -> Path:
    d = tmp_path / "session_2026-12-06_21-01-37_800411_31103" / resources / "working_dir_files" / PKG
    d.mkdir(parents=True)
    return d


@pytest.fixture
def job_dir(tmp_path, monkeypatch) -> Path:
    """The cwd and environment of a ``ray job submit --working-dir .`` entrypoint."""
    d = _ray_dir(tmp_path)
    monkeypatch.chdir(d)
    monkeypatch.setenv(JOB_ENV, JOB_CONFIG)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return d


@pytest.fixture
def plain_dir(tmp_path, monkeypatch) -> Path:
    """A shell's folder: no Ray job."""
    d = tmp_path / "work"
    d.mkdir()
    monkeypatch.chdir(d)
    monkeypatch.delenv(JOB_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return d


def _refused(capsys, run, *names: str) -> str:
    """``run()`` exits with status 2 and one error line naming each of ``names``, why, and what to pass."""
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert "error:" in err and "relative path" in err and "working_dir_files" in err and PKG in err, err
    assert "absolute path" in err and "s3://" in err, err
    for name in names:
        assert name in err, (name, err)
    return err


# ---- the rule ----------------------------------------------------------------------------------------------------

def test_the_names_are_ray_260s():
    from ray._private.ray_constants import DEFAULT_RUNTIME_ENV_DIR_NAME
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    assert reach.JOB_CONFIG_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR == JOB_ENV
    assert reach.RUNTIME_RESOURCES == DEFAULT_RUNTIME_ENV_DIR_NAME


def test_job_working_dir_is_found_from_the_cwd_and_the_job_config(tmp_path):
    d = _ray_dir(tmp_path)
    (d / "jobs").mkdir()
    assert reach.job_working_dir(str(d), {}) == str(d)  # the cwd alone: Ray's default folder names
    assert reach.job_working_dir(str(d / "jobs"), {}) == str(d)  # a folder inside the copy
    env = {JOB_ENV: JOB_CONFIG}
    other = _ray_dir(tmp_path / "b", resources="my_resources")  # `ray start` given another runtime env dir name
    assert reach.job_working_dir(str(other), {}) is None
    assert reach.job_working_dir(str(other), env) == str(other)
    local = {JOB_ENV: json.dumps({"runtime_env": {"working_dir": "local:///srv/faceattr"}})}
    assert reach.job_working_dir(str(other), local) is None  # local:// is used where it is, not unpacked
    assert reach.job_working_dir(str(tmp_path), env) is None  # an entrypoint that did `cd /data && python -m ...`
    assert reach.job_working_dir(str(d.parent), {}) is None  # working_dir_files itself: no package
    assert reach.job_working_dir(str(tmp_path), {JOB_ENV: "not json"}) is None


def test_which_paths_are_relative():
    assert reach.is_relative_local("runs") and reach.is_relative_local("./runs") and reach.is_relative_local("~/runs")
    assert reach.is_relative_local("file://runs")
    assert not reach.is_relative_local("/data/runs") and not reach.is_relative_local("file:///data/runs")
    assert not reach.is_relative_local("s3://bucket/runs")
    assert reach.path_of("m.pt" + PIN) == "m.pt" and reach.path_of("dmm=/m/d.pt" + PIN, named=True) == "/m/d.pt"
    assert reach.path_of("/a/b=c.pt", named=True) == "/a/b=c.pt" and reach.path_of(None) is None
    assert reach.job_dir_problem([("--storage", "runs")], cwd="/home/me/faceattr", environ={}) is None


# ---- jobs.train ----------------------------------------------------------------------------------------------------

def _train(monkeypatch, argv: list[str]):
    """Run jobs.train.main up to RecipeRun (the first step that reads data or writes --storage); its spec."""
    from jobs import train

    seen = {}

    def stub(spec, recipe):
        seen["spec"] = spec
        raise Reached

    monkeypatch.setattr(train, "RecipeRun", stub)
    with pytest.raises(Reached):
        train.main(argv)
    return seen["spec"]


TRAIN = ["--model", "hard_sharing", "--recipe", "none"]


def test_train_refuses_its_relative_default_storage_in_a_ray_job_dir(job_dir, capsys, monkeypatch, tmp_path):
    from jobs import train

    monkeypatch.setattr(train, "RecipeRun", lambda *a: pytest.fail("went on with a relative --storage"))
    data = f"celeba:{tmp_path / 'celeba'}"
    err = _refused(capsys, lambda: train.main([*TRAIN, "--data", data]), "--storage (its default) 'runs'")
    assert "--data" not in err  # an absolute --data is not named
    _refused(capsys, lambda: train.main([*TRAIN, "--data", "celeba:data/synth-celeba", "--storage", "s3://b/runs",
                                         "--output", "best.pt", "--init-from", "tmtl.pt" + PIN]),
             "--data 'data/synth-celeba'", "--output 'best.pt'", "--init-from 'tmtl.pt'")
    assert not (job_dir / "runs").exists()


def test_train_takes_absolute_paths_in_a_ray_job_dir(job_dir, monkeypatch, tmp_path):
    storage = str(tmp_path / "runs")
    spec = _train(monkeypatch, [*TRAIN, "--data", f"celeba:{tmp_path / 'celeba'}", "--storage", storage,
                                "--output", str(tmp_path / "best.pt")])
    assert spec.storage == storage
    spec = _train(monkeypatch, [*TRAIN, "--data", "celeba:s3://b/celeba", "--storage", "s3://b/runs"])
    assert spec.storage == "s3://b/runs"


def test_train_outside_a_ray_job_resolves_relative_paths_as_before(plain_dir, monkeypatch):
    spec = _train(monkeypatch, [*TRAIN, "--data", "celeba:data/synth-celeba"])
    assert spec.storage == str(plain_dir / "runs") and spec.data == "celeba:data/synth-celeba"


def test_python_m_jobs_train_refuses_under_ray_job_submit(tmp_path):
    """As Ray 2.60 starts the entrypoint: cwd the unpacked copy, PYTHONPATH on it, the job config in the
    environment (no RAY_ADDRESS: the refusal comes before any connection, and the code before the fix, with no
    cluster to reach, failed reading the missing data instead of waiting for one)."""
    d = _ray_dir(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), JOB_ENV: JOB_CONFIG}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "jobs.train", *TRAIN, "--data", "celeba:data/synth-celeba",
                           "--name", "t1"], cwd=d, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("python -m jobs.train: error: --data 'data/synth-celeba'; --storage (its default) 'runs'")
    assert not (d / "runs").exists()


# ---- jobs.label, jobs.evaluate, jobs.serve, jobs.report, jobs.demo, jobs.synth -----------------------------------

def _label(monkeypatch, argv):
    from jobs import label

    return _main_until(monkeypatch, label, "input_is_manifest", argv)  # the first read, before Ray starts


def test_label_refuses_relative_input_and_output_in_a_ray_job_dir(job_dir, capsys, monkeypatch, tmp_path):
    _refused(capsys, _label(monkeypatch, ["--checkpoint", "dmm=models/dmm.pt", "--input", "photos",
                                          "--output", "labels/run-1", "--allow-prefix", "photos"]),
             "--checkpoint 'models/dmm.pt'", "--input 'photos'", "--output 'labels/run-1'", "--allow-prefix 'photos'")
    _refused(capsys, _label(monkeypatch, ["--model-set", "set.yaml", "--input", "s3://b/p/", "--output", "s3://b/l/"]),
             "--model-set 'set.yaml'")
    with pytest.raises(Reached):
        _label(monkeypatch, ["--checkpoint", f"dmm={tmp_path / 'dmm.pt'}{PIN}", "--input", str(tmp_path / "photos"),
                             "--output", "s3://b/labels/run-1/"])()


def test_label_outside_a_ray_job_takes_relative_paths(plain_dir, monkeypatch):
    with pytest.raises(Reached):
        _label(monkeypatch, ["--checkpoint", "dmm.pt", "--input", "photos", "--output", "labels"])()


def _evaluate(monkeypatch, argv):
    from jobs import evaluate

    return _main_until(monkeypatch, evaluate, "load_checkpoint", argv)


def test_evaluate_refuses_relative_paths_in_a_ray_job_dir(job_dir, capsys, monkeypatch, tmp_path):
    ckpt, data = str(tmp_path / "m.pt"), f"utkface:{tmp_path / 'utk'}"
    _refused(capsys, _evaluate(monkeypatch, ["--checkpoint", "m.pt", "--data", "utkface:data/utk", "--json", "m.json",
                                             "--report", "r.html", "--groups-json", "g.json", "--reliability", "r.png"]),
             "--checkpoint 'm.pt'", "--data 'data/utk'", "--json 'm.json'", "--report 'r.html'",
             "--groups-json 'g.json'", "--reliability 'r.png'")
    _refused(capsys, _evaluate(monkeypatch, ["--checkpoint", ckpt, "--data", data, "--calibrate-on", "val",
                                             "--save-calibrated", "cal.pt"]), "--save-calibrated 'cal.pt'")
    with pytest.raises(Reached):
        _evaluate(monkeypatch, ["--checkpoint", ckpt, "--data", data, "--json", "s3://b/m.json"])()


def test_evaluate_outside_a_ray_job_takes_relative_paths(plain_dir, monkeypatch):
    with pytest.raises(Reached):
        _evaluate(monkeypatch, ["--checkpoint", "m.pt", "--data", "utkface:data/utk", "--json", "m.json"])()


def test_evaluate_refuses_an_output_it_could_not_write_before_it_evaluates(plain_dir, capsys, monkeypatch, tmp_path):
    """Every file evaluate writes at the end (``--json``, ``--report``, ``--groups-json``, ``--reliability``,
    ``--save-calibrated``) is checked before the checkpoint is read (``storage.unwritable``): a folder or a path
    under a file is argparse's error, status 2 (it was a traceback after the evaluation)."""
    (tmp_path / "f").write_bytes(b"x")
    ckpt, data = str(tmp_path / "m.pt"), f"utkface:{tmp_path / 'utk'}"
    for flag, value, said in (("--json", str(tmp_path), "it is a folder"),
                              ("--report", str(tmp_path / "f" / "r.html"), f"{tmp_path / 'f'} is a file, not a folder"),
                              ("--groups-json", str(tmp_path / "f" / "g.json"), f"{tmp_path / 'f'} is a file, not a folder"),
                              ("--reliability", str(tmp_path), "it is a folder")):
        with pytest.raises(SystemExit) as e:
            _evaluate(monkeypatch, ["--checkpoint", ckpt, "--data", data, flag, value])()
        assert e.value.code == 2
        assert f"error: {flag} {value}: {said}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _evaluate(monkeypatch, ["--checkpoint", ckpt, "--data", data, "--calibrate-on", "val", "--save-calibrated",
                                str(tmp_path)])()
    assert f"error: --save-calibrated {tmp_path}: it is a folder" in capsys.readouterr().err
    with pytest.raises(Reached):  # folders still to be made are made when written
        _evaluate(monkeypatch, ["--checkpoint", ckpt, "--data", data, "--json", str(tmp_path / "new" / "m.json")])()


def _serve(monkeypatch, argv):
    from jobs import serve

    return _main_until(monkeypatch, serve, "_main", argv)


def test_serve_refuses_a_relative_checkpoint_in_a_ray_job_dir(job_dir, capsys, monkeypatch, tmp_path):
    _refused(capsys, _serve(monkeypatch, ["--model", "dmm=s3://b/dmm.pt", "--model", "agr=./agr.pt" + PIN]),
             "--model agr './agr.pt'")
    with pytest.raises(Reached):
        _serve(monkeypatch, ["--model", f"agr={tmp_path / 'agr.pt'}", "--model", "dmm=s3://b/dmm.pt"])()


def test_serve_outside_a_ray_job_takes_a_relative_checkpoint(plain_dir, monkeypatch):
    with pytest.raises(Reached):
        _serve(monkeypatch, ["--model", "agr=./agr.pt"])()


def _report(monkeypatch, argv):
    from jobs import report

    return _main_until(monkeypatch, report, "label_report", argv)


def test_report_refuses_relative_paths_in_a_ray_job_dir(job_dir, capsys, monkeypatch, tmp_path):
    _refused(capsys, _report(monkeypatch, ["labels", "--html", "r.html"]), "OUT 'labels'", "--html 'r.html'")
    with pytest.raises(Reached):
        _report(monkeypatch, [str(tmp_path / "labels"), "--allow-prefix", "s3://b/photos/"])()


def test_report_outside_a_ray_job_takes_relative_paths(plain_dir, monkeypatch):
    with pytest.raises(Reached):
        _report(monkeypatch, ["labels"])()


def _demo(monkeypatch, argv):
    import torch

    import facedata.synth
    from jobs import demo

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # demo sets the process's threads
    monkeypatch.setattr(facedata.synth, "generate", _reached)  # its first step
    return lambda: demo.main(argv)


def test_demo_refuses_its_relative_default_out_in_a_ray_job_dir(job_dir, capsys, monkeypatch, tmp_path):
    _refused(capsys, _demo(monkeypatch, []), "--out (its default) 'demo_out'")
    with pytest.raises(Reached):
        _demo(monkeypatch, ["--out", str(tmp_path / "demo")])()


def test_synth_refuses_a_relative_out_in_a_ray_job_dir(job_dir, capsys, monkeypatch, tmp_path):
    from jobs import synth

    _refused(capsys, lambda: synth.check_out(["--format", "celeba", "--n", "4", "--out", "data/synth-celeba"]),
             "--out 'data/synth-celeba'")
    synth.check_out(["--format", "celeba", "--n", "4", "--out", str(tmp_path / "c")])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(JOB_ENV)
    synth.check_out(["--out", "data/synth-celeba"])  # outside a Ray job: facedata.synth's as before
