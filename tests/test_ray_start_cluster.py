"""The jobs on one machine after ``ray start --head`` (docs/deploy.md: one machine): a plain ``ray.init()`` finds
the cluster ``ray start`` recorded (``ray_current_cluster`` in Ray's temporary folder) and joins it, and Ray refuses
``num_cpus`` when joining ("When connecting to an existing cluster, num_cpus and num_gpus must not be provided").
The code before this fix gave ``num_cpus`` to every ``ray.init`` made without RAY_ADDRESS (label, train, demo): each
job failed there. Every job now starts or joins Ray through ``raytasks.reach.init_ray``.

The unit tests start no Ray (Ray's lookup and ``ray.init`` are stood in for). The end-to-end test first stops a
label job on a Ray of the job's own with SIGTERM (moved here from tests/test_ops_stop_label.py: one job start and
one Ray start fewer in the suite), then starts a ``ray start --head`` cluster of its own, where the same command
finishes the job, in a temporary folder of its own (``--temp-dir``, and RAY_TMPDIR for the
lookup of the jobs it runs), so that no other test's ``ray.init()`` finds it: the record in the default
``/tmp/ray`` is left as it was. It is stopped by signalling its ``ray start --block`` process, not by ``ray stop``,
which stops every Ray on the machine and removes the default record."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import RAY_TEST_ENV, ROOT, committed_rows, free_port, read_rows, save_model
from tests.images import face_jpeg

RECORDED = "127.0.0.1:6379"  # what Ray's lookup answers after `ray start --head` on this machine


class _Inited(Exception):
    pass


@pytest.fixture
def lookup(monkeypatch):
    """Ray's lookup of the cluster a plain ``ray.init()`` joins, answering ``set(address)``; ``ray.init``
    recording its arguments (``calls``) and raising :class:`_Inited`: no Ray starts."""
    import ray
    from ray._private import services

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    answer = {"address": None}
    monkeypatch.setattr(services, "canonicalize_bootstrap_address", lambda addr, temp_dir=None: answer["address"])
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    calls: list[dict] = []

    def init(**kwargs):
        calls.append(_state_api_env(kwargs))
        raise _Inited

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    return answer, calls


def _state_api_env(kwargs: dict) -> dict:
    """``ray.init``'s arguments as a fake ``ray.init`` got them, with ``dashboard_port`` replaced by whether the
    environment it was called in pointed Ray's State API at that port (``"own"``; raytasks/reach.py
    own_state_api)."""
    kwargs = dict(kwargs)
    if "dashboard_port" in kwargs:
        port = kwargs.pop("dashboard_port")
        named = os.environ.get("RAY_API_SERVER_ADDRESS") == f"http://127.0.0.1:{port}"
        kwargs["state_api"] = "own" if named else os.environ.get("RAY_API_SERVER_ADDRESS")
    return kwargs


@pytest.mark.parametrize("env,recorded,want", [
    # no cluster: a Ray of this process's own, its State API pointed at its own dashboard's port
    (None, None, {"num_cpus": 6, "log_to_driver": False, "state_api": "own"}),
    (None, RECORDED, {"log_to_driver": False}),  # `ray start --head` on this machine: joined as it is
    ("10.0.0.1:6379", None, {"log_to_driver": False}),  # `ray job submit`
])
def test_init_ray_gives_num_cpus_only_to_a_ray_it_starts(lookup, monkeypatch, env, recorded, want):
    from raytasks import reach

    answer, calls = lookup
    answer["address"] = recorded
    if env:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert reach.joined_address() == (env or recorded)
    with pytest.raises(_Inited):
        reach.init_ray(6, log_to_driver=False)
    assert calls == [want]
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # only the started Ray's processes inherit it


def test_a_state_api_address_the_user_set_is_replaced_for_the_started_ray_only(lookup, monkeypatch):
    """RAY_API_SERVER_ADDRESS set for ``ray job submit`` to a remote cluster: a Ray started here still asks its own
    dashboard (the remote cluster knows none of its actors), and this process keeps the user's address."""
    from raytasks import reach

    _, calls = lookup
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.1:8265")
    with pytest.raises(_Inited):
        reach.init_ray(2)
    assert calls == [{"num_cpus": 2, "state_api": "own"}]
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://10.0.0.1:8265"


def test_the_dashboard_port_is_the_callers_or_a_free_one():
    """Not Ray's 8265, which another Ray starting at the same time may take; the caller's own choice as it is; the
    State API's address names the port the dashboard gets."""
    from raytasks.reach import own_state_api

    kwargs, env = own_state_api({"include_dashboard": False})
    port = kwargs["dashboard_port"]
    assert port != 8265 and kwargs["include_dashboard"] is False
    assert env == {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    assert own_state_api({"dashboard_port": 9999}) == ({"dashboard_port": 9999},
                                                        {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:9999"})


def test_init_ray_joins_when_ray_finds_a_cluster_its_lookup_did_not(monkeypatch):
    """A Ray whose private lookup answers nothing while ``ray.init`` finds a cluster: joined, not an error."""
    import ray

    from raytasks import reach

    calls: list[dict] = []

    def init(**kwargs):
        calls.append(_state_api_env(kwargs))
        if "num_cpus" in kwargs:
            raise ValueError("When connecting to an existing cluster, num_cpus and num_gpus must not be provided.")

    monkeypatch.setattr(reach, "joined_address", lambda: None)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "init", init)
    assert reach.init_ray(4) is True
    assert calls == [{"num_cpus": 4, "state_api": "own"}, {}]  # joined as it is


def _label(tmp_path):
    from raytasks.label.cluster import ensure_ray

    ensure_ray()


def _train(tmp_path):
    from jobs.train import main

    main(["--model", "hard_sharing", "--data", f"celeba:{tmp_path / 'celeba'}", "--storage", str(tmp_path / "runs"),
          "--epochs", "1"])


def _demo(tmp_path):
    from jobs.demo import main

    main(["--out", str(tmp_path / "demo"), "--n", "4", "--epochs", "1"])


@pytest.mark.parametrize("job,want", [(_label, {}), (_train, {"log_to_driver": False}),
                                      (_demo, {"include_dashboard": False, "log_to_driver": False})])
def test_every_job_joins_the_cluster_ray_start_recorded_without_num_cpus(lookup, monkeypatch, tmp_path, job, want):
    """label's ensure_ray, train (before prepare(), as on any cluster) and the demo, with a ``ray start`` cluster
    recorded on this machine and no RAY_ADDRESS: ``ray.init`` without ``num_cpus``."""
    import torch

    answer, calls = lookup
    answer["address"] = RECORDED
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the demo's, in this test process
    with pytest.raises(_Inited):
        job(tmp_path)
    assert calls == [want]


# ---- end to end: `ray start --head`, then the label job ----------------------------------------------------------
def _record_state(path: Path):
    """``(mtime, contents)`` of a record file, or None when there is none."""
    try:
        return path.stat().st_mtime_ns, path.read_text()
    except FileNotFoundError:
        return None


def _processes_naming(text: str) -> list[int]:
    """The processes whose command line names ``text`` (this test's Ray folder), other than this one."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                out.append(int(d.name))
        except OSError:
            continue
    return out


def _ray_start_head(tmp: str, env: dict) -> subprocess.Popen:
    """``ray start --head --block`` with its folder under ``tmp``, once it has recorded its cluster there. Ray
    2.60 gives a starting node's raylet a fixed 30 s to register with the GCS (ray/_private/node.py:
    ``raylet_start_wait_time_s``, no setting); on a 2-core machine under the suite's load it once took longer
    ("The current node timed out during startup", a fresh clone's run, 2026-12-07), so such a start is tried
    once more, after the processes of the first are gone. Any other failure fails the test."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # SIGTERM stops `ray start --block` at once: no drain wait for a node that serves nothing (Ray waits 30 s)
    head_env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    record = Path(tmp) / "ray" / "ray_current_cluster"  # where `ray start --temp-dir` records it
    for attempt in (1, 2):
        head = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", "--num-cpus", "4", "--disable-usage-stats", "--temp-dir",
             f"{tmp}/ray", "--port", str(free_port()), "--ray-client-server-port", str(free_port()),
             "--include-dashboard", "false", "--dashboard-agent-listen-port", str(free_port())],
            cwd=ROOT, env=head_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        deadline = time.monotonic() + 90
        while not record.exists():
            if head.poll() is not None:
                said = head.stdout.read()
                if attempt == 2 or "timed out during startup" not in said:
                    pytest.fail(f"ray start ended:\n{said[-4000:]}")
                for pid in _processes_naming(tmp):  # the first start's GCS and daemons
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(1)
                break
            assert time.monotonic() < deadline, "ray start recorded no cluster in 90 s"
            time.sleep(0.2)
        else:
            return head
    raise AssertionError("unreachable")


N = 8  # images of the label runs below
STOPPED = "stopped: the rows committed so far are kept; run the same command again to label the rest"


@pytest.mark.ray  # a Ray of its own, then a `ray start --head` cluster of its own
def test_sigterm_stops_a_job_on_its_own_ray_and_the_same_command_finishes_on_a_ray_start_cluster(tmp_path):
    """Two things a user does with one label job (one test: each run costs a Ray start and a job's start):

    * SIGTERM (``ray job stop``, a pod's end) once the run is labeling, before or after its first commit, on a
      Ray the job started: its last line says so, the status is 143, and none of that Ray's processes is left.
      Its output starts as a run stopped before its first commit leaves it (``labels/`` made, empty): the job
      labels it as a fresh one.
    * docs/deploy.md's one machine: ``ray start --head --num-cpus 4``, then the same command with no RAY_ADDRESS:
      it joins that cluster (the code before this fix raised Ray's ValueError), labels every image exactly once
      (the first run released its lease: a live one would refuse it) and writes its summary, with progress lines
      of the committed images before it (``--progress-every 1``); a plain ``ray.init()`` there is on a cluster it
      did not start (``started_here()`` False) with the cluster's 4 CPUs."""
    default_record = Path("/tmp/ray/ray_current_cluster")  # what every other test's ray.init() reads
    before = _record_state(default_record)
    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, **RAY_TEST_ENV, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": tmp}
    env.pop("RAY_ADDRESS", None)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(N):
        (photos / f"f{i}.jpg").write_bytes(face_jpeg(500 + i))
    want = sorted(str(photos / f"f{i}.jpg") for i in range(N))
    ckpt = save_model(str(tmp_path / "hs.pt"), "hard_sharing", seed=7, hidden=8)
    out = tmp_path / "out"
    (out / "labels").mkdir(parents=True)
    # 2 images a batch and a file, 2 s a batch: commits land one by one, and a progress line every second
    # (raytasks/label/progress.py) shows them, its stdout a pipe as under `ray job submit`
    job = [sys.executable, "-m", "jobs.label", "--checkpoint", ckpt, "--input", str(photos), "--output", str(out),
           "--faces", "whole", "--precision", "fp32", "--batch-size", "2", "--max-actors", "1",
           "--max-rows-per-file", "2", "--throttle", "2", "--progress-every", "1"]

    # 1: SIGTERM on a Ray of the job's own (no cluster recorded under RAY_TMPDIR yet)
    proc = subprocess.Popen(job, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    lines = []
    guard = threading.Timer(150, os.killpg, (proc.pid, signal.SIGKILL))  # a job that hangs silently ends too
    guard.start()
    try:
        for line in proc.stdout:  # until the run has started labeling (8 images, 2 s per batch of 2 at least)
            lines.append(line.rstrip("\n"))
            if line.startswith("labeling "):
                break
        else:
            pytest.fail("the job ended before it labeled:\n" + "\n".join(lines[-40:]))
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=90)
    finally:
        guard.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = "\n".join(lines) + "\n" + rest
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    assert (proc.returncode, last) == (143, STOPPED), text[-4000:]
    assert "SIGTERM received" not in text, text[-4000:]
    deadline = time.monotonic() + 10
    while _processes_naming(tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_naming(tmp) == [], "processes of the stopped job's Ray left"
    committed = committed_rows(str(out))  # a stop may cut a write between its file and its commit

    # 2: `ray start --head`, then the same command joins it and finishes
    head = None
    try:
        head = _ray_start_head(tmp, env)
        proc = subprocess.run(job, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        text = proc.stdout + proc.stderr
        assert proc.returncode == 0, text[-4000:]
        assert "Connecting to existing Ray cluster" in text, text[-4000:]
        assert sorted(read_rows(str(out)).column("path").to_pylist()) == want  # each image once
        lines = proc.stdout.splitlines()
        summary = next(i for i, ln in enumerate(lines) if ln.startswith(f"labeled {N - committed} images in "))
        assert f"output holds {N} rows for {N} of {N} inputs" in lines[summary], lines[summary]
        progress = [ln for ln in lines if ln.startswith("progress: ")]
        assert progress and all(lines.index(ln) < summary for ln in progress), proc.stdout
        counts = [int(re.match(rf"progress: (\d+) of {N} images labeled \(", ln).group(1)) for ln in progress]
        assert counts == sorted(counts) and counts[0] >= committed, (committed, proc.stdout)
        partial = [ln for ln, c in zip(progress, counts) if committed < c < N]  # this run half done, as committed
        assert partial, (committed, proc.stdout)
        assert re.search(r"images/s over the last \d+ s, about \d+ (s|min) left; \d+ rows, errors 0$", partial[-1]), \
            partial
        assert (out / "_summary.json").is_file()
        probe = subprocess.run(
            [sys.executable, "-c", "import ray; from raytasks.reach import init_ray, started_here; "
             "print(init_ray(2, log_to_driver=False), started_here(), ray.cluster_resources()['CPU'])"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert probe.stdout.split() == ["True", "False", "4.0"], (probe.stdout + probe.stderr)[-4000:]
    finally:
        if head is not None and head.poll() is None:
            head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started, and only them
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
        deadline = time.monotonic() + 10
        while _processes_naming(tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _processes_naming(tmp)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    assert left == [], "processes of this test's Ray left after it stopped"
    assert _record_state(default_record) == before, "the default /tmp/ray record changed"
