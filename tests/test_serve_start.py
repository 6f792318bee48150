"""How ``python -m jobs.serve`` starts and stops (serve audit, 2026-12-07): a local Ray it starts gets the logical
CPUs the application's replicas ask for (``--model a --model b --set --embedding`` asks for 4; a 2-core laptop's
Ray had 2, and Serve waited for ever), a cluster it joins that is short is a ``warning:``, GPUs a local Ray lacks
an ``error:``; SIGINT and SIGTERM stop it while it deploys as while it serves: Serve and Ray shut down, a last
line, status 130 or 143.

The unit tests start no Ray. The two end-to-end tests run the job in a subprocess with a local Ray of its own
(not the session's), in a temporary folder of its own (RAY_TMPDIR), so that its processes can be told from other
Rays on the machine, and with a 2-CPU view of the machine (os.cpu_count and Ray's own count), whatever it has."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import RAY_TEST_ENV, ROOT, free_port, save_model

# the job under a 2-CPU view of the machine (the laptop of the audit): os.cpu_count and Ray's own CPU count
TWO_CPUS = ("import os, runpy, sys; import ray._private.utils as u; os.cpu_count = lambda: 2; "
            "u.get_num_cpus = lambda *a, **k: 2; sys.argv[0] = 'jobs.serve'; "
            "runpy.run_module('jobs.serve', run_name='__main__', alter_sys=True)")


def _demand(argv: list[str]) -> tuple[tuple[float, float], dict]:
    """``(CPUs, GPUs)`` and the per-deployment demand of the application ``python -m jobs.serve argv`` deploys."""
    from jobs.serve import build_args, parser
    from raytasks.serve import ServeArgs, build_app
    from raytasks.serve.app import start_demand, total_demand

    demand = start_demand(build_app(ServeArgs.model_validate(build_args(parser().parse_args(argv)))))
    return total_demand(demand), demand


TWO = ["--model", "agr=./agr.pt", "--model", "hs=./hs.pt"]


@pytest.mark.parametrize("argv,cpus,gpus", [
    (["--model", "dmm=./dmm.pt"], 2, 0),  # the model's replica and the HTTP ingress's
    (TWO, 3, 0),
    ([*TWO, "--set", "--embedding"], 4, 0),  # README's: the set is a deployment of its own
    ([*TWO, "--set", "--embedding", "--num-cpus", "0.5"], 2.5, 0),  # the ingress keeps its 1
    ([*TWO, "--set", "--num-cpus", "0.3"], 1.9, 0),
    ([*TWO, "--set", "--num-replicas", "2"], 7, 0),  # every model's and the set's replicas; one ingress
    ([*TWO, "--autoscale", "1:4"], 3, 0),  # at its start, min_replicas of each
    ([*TWO, "--autoscale", "0:4"], 1, 0),  # models scaled to zero: the ingress alone
    ([*TWO, "--set", "--num-gpus", "0.5"], 4, 1.5),
])
def test_the_cpus_an_application_asks_for(argv, cpus, gpus):
    assert _demand(argv)[0] == (cpus, gpus)


def test_the_demand_names_every_deployment():
    _, demand = _demand([*TWO, "--set", "--embedding", "--num-replicas", "2", "--num-cpus", "0.5"])
    assert demand == {"model-agr": (2, 0.5, 0.0), "model-hs": (2, 0.5, 0.0), "modelset": (2, 0.5, 0.0),
                      "FaceAttrAPI": (1, 1.0, 0.0)}


def test_a_short_ray_is_an_error_on_one_it_started_and_a_warning_on_one_it_joined():
    from jobs.serve_checks import check_resources

    _, demand = _demand([*TWO, "--set", "--num-gpus", "1"])
    assert check_resources(demand, {"CPU": 4.0, "GPU": 3.0}, started_here=True) is None
    with pytest.raises(SystemExit) as e:  # a laptop without a GPU: nothing will add one
        check_resources(demand, {"CPU": 8.0}, started_here=True)
    assert e.value.code.startswith("error: ") and "3 GPUs" in e.value.code and "--num-gpus" in e.value.code
    warning = check_resources(demand, {"CPU": 2.0, "GPU": 0.0}, started_here=False)  # an autoscaler may add nodes
    assert warning.startswith("warning: ") and "4 CPUs" in warning and "has 2" in warning
    assert "--num-cpus" in warning and "3 GPUs" in warning and "autoscaler" in warning


class _Inited(Exception):
    pass


@pytest.mark.parametrize("address,want", [(None, {"num_cpus": 4}), ("10.0.0.1:6379", {})])
def test_a_local_ray_is_started_with_the_cpus_the_application_asks_for(monkeypatch, capsys, tmp_path, address,
                                                                      want):
    """``--model a --model b --set --embedding`` on 2 cores: a local Ray of 4 logical CPUs, and a line that says
    so; a cluster it joins is joined as it is (ray.init takes no num_cpus there)."""
    import ray

    import jobs.serve as J
    from raytasks import reach

    calls = []

    def init(**kwargs):
        calls.append({k: v for k, v in kwargs.items() if k != "dashboard_port"})  # own_state_api's: tested apart
        raise _Inited

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(J.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(reach, "joined_address", lambda: address)
    for name in ("a", "b"):  # checkpoints (a missing one is refused before Ray starts)
        save_model(str(tmp_path / f"{name}.pt"), "hard_sharing", seed=0, hidden=8)
    with pytest.raises(_Inited):
        J.main(["--model", f"a={tmp_path / 'a.pt'}", "--model", f"b={tmp_path / 'b.pt'}", "--set", "--embedding",
                "--port", str(free_port())])
    assert calls == [want]
    out = capsys.readouterr().out
    assert ("4 logical CPUs" in out and "2 cores" in out) == (address is None), out


# ---- end to end: the job in a subprocess ---------------------------------------------------------------------
class _Job:
    """``python -m jobs.serve ARGV`` under :data:`TWO_CPUS`, in a session of its own, with a Ray temporary folder
    of its own; its output lines are collected by a thread."""

    def __init__(self, argv: list[str], **env_vars: str):
        self.tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths live under it
        env = {**os.environ, **RAY_TEST_ENV, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": self.tmp, **env_vars}
        for name in ("RAY_ADDRESS", "AWS_ENDPOINT_URL_S3"):  # a local Ray of its own: its processes stop with it
            env.pop(name, None)
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-c", TWO_CPUS, *argv], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, *starts: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            hit = next((ln for ln in self.lines if any(s in ln for s in starts)), None)
            if hit:
                return hit
            time.sleep(0.2)
        pytest.fail(f"no line with {starts} within {timeout:g} s:\n" + self.text()[-4000:])

    def stopped_by(self, signum: int, group: bool, timeout: float) -> float:
        """Send ``signum`` (to the job's process group: Ctrl-C in a terminal; or to the job alone: ``kill``), and
        the seconds it took to exit."""
        t = time.monotonic()
        (os.killpg if group else os.kill)(self.proc.pid, signum)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{signal.Signals(signum).name} ignored: still running {timeout:g} s later:\n"
                        + self.text()[-4000:])
        time.sleep(0.5)  # the reader thread's last lines
        return time.monotonic() - t

    def text(self) -> str:
        return "\n".join(self.lines)

    def ray_processes(self, wait: float = 10.0) -> list[str]:
        """The command lines of the processes of this job's Ray (they name its temporary folder) still there after
        ``wait`` seconds at most."""
        deadline = time.monotonic() + wait
        while True:
            left = []
            for d in Path("/proc").iterdir():
                try:
                    cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if d.name.isdigit() and self.tmp in cmd and int(d.name) != os.getpid():
                    left.append(f"{d.name} {cmd[:200]}")
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)

    def worker_environments(self) -> dict[int, dict[str, str]]:
        """The environment of each Ray worker process of this job's Ray (a process descended from the job's whose
        title starts with ``ray::``: the Serve replicas, the controller, idle workers; not Ray's two agents, which
        run no task or actor of anyone's), by pid."""
        parent = {}
        for d in Path("/proc").iterdir():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(") ", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        found = {}
        for pid in parent:
            p = pid
            while p > 1 and p != self.proc.pid:
                p = parent.get(p, 0)
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if p == self.proc.pid and cmd.startswith(b"ray::") and not cmd.split(b"\0")[0].endswith(b"Agent"):
                    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    found[pid] = dict(kv.decode(errors="replace").split("=", 1) for kv in pairs if b"=" in kv)
            except OSError:
                continue
        return found

    def close(self):
        """Whatever it left (the code before this fix ignored the signals and left Ray's processes behind)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for line in self.ray_processes(wait=0):
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def _last(text: str) -> str:
    return [ln for ln in text.splitlines() if ln.strip()][-1]


@pytest.mark.ray  # a Ray of its own
def test_two_models_a_set_and_the_embedding_serve_on_two_cpus_and_ctrl_c_stops(tmp_path):
    """README's multi-model command on a 2-CPU machine: ready (it asks for 4 CPUs: the code before this fix
    started a Ray of 2 and Serve waited for ever), answers GET /v1/models over a socket, and Ctrl-C (SIGINT to
    the process group, as a terminal sends it) stops it: status 130, a last line, none of its Ray's processes left."""
    a = save_model(str(tmp_path / "A.pt"), "hard_sharing", seed=1, hidden=8)
    b = save_model(str(tmp_path / "B.pt"), "hard_sharing", seed=2, hidden=8)
    port = free_port()
    job = _Job(["--model", f"a={a}", "--model", f"b={b}", "--set", "--embedding", "--port", str(port)])
    try:
        job.wait_line("serving a, b at", timeout=120)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/v1/models")
        r = conn.getresponse()
        body = json.loads(r.read())
        conn.close()
        assert r.status == 200, body
        assert [m["name"] for m in body["models"]] == ["a", "b"], body
        # Ray's State API, asked from inside this Ray (as Ray Train's PlacementGroupCleaner asks whether a run's
        # controller lives), asks this Ray's own dashboard, not the last `ray start` cluster or 127.0.0.1:8265
        # (raytasks/reach.py own_state_api): every worker process inherited its address
        dashboard = re.search(r"View the dashboard at \S*?(http://[\d.]+:\d+)", job.text())
        assert dashboard, job.text()[-4000:]
        workers = job.worker_environments()
        assert len(workers) >= 4, workers.keys()  # 2 models, the set and the ingress at least
        assert {env.get("RAY_API_SERVER_ADDRESS") for env in workers.values()} == {dashboard.group(1)}
        took = job.stopped_by(signal.SIGINT, group=True, timeout=30)
        text = job.text()
        assert (job.proc.returncode, _last(text)) == (130, "stopped by SIGINT: Serve shut down"), text[-4000:]
        assert "starting a local Ray with 4 logical CPUs" in text, text[-4000:]
        assert took < 30
        assert job.ray_processes() == []
    finally:
        job.close()


@pytest.mark.ray  # a Ray of its own
def test_sigterm_while_deploying_stops_at_once():
    """A deployment that does not become ready (the checkpoint is on an S3 endpoint that takes connections and
    never answers: its replica waits in the read, for up to 10 minutes): SIGTERM (``kill``, a pod's end) to the job
    alone stops it within seconds (the code before this fix only set a flag, read once deployed: it ignored the
    signal), status 143, a last line, and none of its Ray's processes left."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # never accepted, never answered
    job = _Job(["--model", "a=s3://bucket/a.pt", "--port", str(free_port())],
               AWS_ENDPOINT_URL=f"http://127.0.0.1:{silent.getsockname()[1]}", AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
    try:
        # ours, or (the code before this fix) Serve's own line once the controller deploys
        job.wait_line("deploying model-a", "Deploying new version of Deployment(name='model-a'", timeout=90)
        time.sleep(2)
        took = job.stopped_by(signal.SIGTERM, group=False, timeout=20)
        text = job.text()
        assert (job.proc.returncode, _last(text)) == (143, "stopped by SIGTERM: Serve shut down"), text[-4000:]
        assert "serving" not in text and "shutting down" in text
        assert took < 20
        assert job.ray_processes() == []
    finally:
        job.close()
        silent.close()


# --- a checkpoint that is not there, or not a checkpoint -------------------------------------------------------
def test_a_missing_local_checkpoint_is_refused_before_ray_starts(monkeypatch, tmp_path, capsys):
    """A mistyped path, a folder, a file that is not a checkpoint or not the pinned hash, on a Ray the job would
    start itself: one ``error:`` line and status 2 at once (before this, Ray started, Serve tried three replicas
    and the job ended with Serve's traceback, status 1, after about 20 s). Joining a cluster it is left to the
    replicas (their nodes may hold the file)."""
    import ray

    import jobs.serve as J
    import raytasks.reach as reach

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(reach, "joined_address", lambda: None)
    good = save_model(str(tmp_path / "hs.pt"), "hard_sharing", seed=0, hidden=8)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(2048))
    for model, said in ((f"b={tmp_path / 'nope.pt'}", f"--model b: checkpoint not found: {tmp_path / 'nope.pt'}"),
                        (f"b={tmp_path}", f"--model b: checkpoint refused: {tmp_path} is not a regular file"),
                        (f"b={bad}", f"--model b: {bad} is not a loadable checkpoint"),
                        (f"b={good}#sha256:{'0' * 64}", f"--model b: {good} is sha256:")):
        with pytest.raises(SystemExit) as e:
            J.main(["--model", f"a={good}", "--model", model])
        assert e.value.code == 2
        assert said in capsys.readouterr().err

    class Reached(Exception):
        pass

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr(J, "_serve", reached)  # the step after the checks: Ray and Serve
    monkeypatch.setattr(reach, "joined_address", lambda: "10.0.0.1:6379")
    with pytest.raises(Reached):
        J.main(["--model", f"b={tmp_path / 'nope.pt'}"])  # on a cluster: the replicas' nodes may hold it
    monkeypatch.setattr(reach, "joined_address", lambda: None)
    with pytest.raises(Reached):
        J.main(["--model", f"a={good}", "--model", "s=s3://bucket/m.pt", "--port", str(free_port())])  # on S3: the
        # replicas read it


def test_a_port_a_server_holds_is_refused_before_ray_starts(monkeypatch, tmp_path, capsys):
    """Another server on the port (another jobs.serve), on a Ray the job would start itself: one ``error:`` line and
    status 2 at once (before: Serve's "Failed to bind" traceback, status 1, after Ray had started); a port out of
    range is argparse's error. Where a joined cluster's proxy fails to bind, its error is one line too."""
    import ray

    import jobs.serve as J
    import raytasks.reach as reach
    from jobs.serve_checks import bind_failure

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(reach, "joined_address", lambda: None)
    good = save_model(str(tmp_path / "hs.pt"), "hard_sharing", seed=0, hidden=8)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            J.main(["--model", f"a={good}", "--port", str(port)])
        assert e.value.code == 2
        assert f"error: --port {port}: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    for bad in ("0", "70000", "http"):
        with pytest.raises(SystemExit) as e:
            J.main(["--model", f"a={good}", "--port", bad])
        assert e.value.code == 2
        assert "argument --port: must be a port number (1-65535)" in capsys.readouterr().err
    assert bind_failure(RuntimeError("ray::ProxyActor.ready() ... RuntimeError: Failed to bind to address "
                                        "'127.0.0.1:8000'.")) == "127.0.0.1:8000"
    assert bind_failure(RuntimeError("something else")) is None


def test_the_replicas_error_is_the_deploys_reason():
    from jobs.serve_checks import last_error_line

    tb = ("Traceback (most recent call last):\n  File \"x.py\", line 3, in f\n    raise CheckpointError(...)\n"
          "models.checkpoint_read.CheckpointError: /m.pt is not a loadable checkpoint (not a torch.save archive)\n")
    assert last_error_line(tb) == "CheckpointError: /m.pt is not a loadable checkpoint (not a torch.save archive)"
    assert last_error_line("The deployment failed to start 3 times in a row.") == \
        "The deployment failed to start 3 times in a row."


@pytest.mark.ray  # a Ray of its own
def test_a_file_that_is_not_a_checkpoint_fails_the_deploy_with_its_reason(s3_bucket):
    """The replicas read a checkpoint on S3 (or on a cluster's nodes), the driver does not: an object that is not
    one fails each replica; after Serve's three tries the job says which model and why in one line, status 2, no
    Python traceback, and none of its Ray's processes is left."""
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="bad.pt", Body=os.urandom(4096))
    bad = f"s3://{bucket}/bad.pt"
    job = _Job(["--model", f"m={bad}", "--port", str(free_port())])  # the moto server's AWS_* environment
    try:
        job.proc.wait(timeout=150)
        time.sleep(0.5)  # the reader thread's last lines
        text = job.text()
        assert job.proc.returncode == 2, text[-4000:]
        assert _last(text).startswith(f"error: deploying faceattr failed: model-m: CheckpointError: {bad} is not a "
                                      "loadable checkpoint"), text[-4000:]
        assert "Traceback (most recent call last)" not in text.split("shutting down")[-1], text[-4000:]
        assert job.ray_processes() == []
    finally:
        job.close()
