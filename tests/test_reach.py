"""A path on the driver's own disk is refused where the cluster runs the job's tasks on other nodes
(raytasks/reach.py): the label job before its lease or any read, the train job before any Ray Train run. On a Ray
the process started, or a one-node cluster with CPUs (the suite's own), local paths are used as always: every
label and training test of the suite runs on local folders.

The cluster's shape is what Ray's own ``ray.nodes()`` and runtime context say, given here as a two-node cluster
and as a head that offers no CPU; the mounts are ``/proc/self/mounts`` lines for folders of the test's own."""

from __future__ import annotations

import pytest
import ray

from raytasks import reach
from tests.helpers import free_port, save_model


@pytest.fixture
def mounts(tmp_path) -> tuple[str, dict[str, str]]:
    """A mount table (``/proc/self/mounts`` text) with a folder of each kind, and those folders."""
    kinds = {"nfs": "nfs4", "efs data": "nfs4", "bucket": "fuse.s3fs", "overlay": "fuse.fuse-overlayfs",
             "lustre": "lustre"}
    folders = {}
    lines = ["/dev/sda1 / ext4 rw,relatime 0 0", "tmpfs /tmp tmpfs rw 0 0"]
    for name, fstype in kinds.items():
        folder = tmp_path / name
        (folder / "photos").mkdir(parents=True)
        folders[name] = str(folder)
        lines.append(f"server:/x {str(folder).replace(' ', chr(92) + '040')} {fstype} rw 0 0")
    lines.append(f"/dev/sdb1 {tmp_path / 'nfs' / 'photos'} ext4 rw 0 0")  # a local disk mounted inside the share
    return "\n".join(lines) + "\n", folders


def test_a_path_is_reachable_from_every_node_only_on_s3_or_a_network_filesystem(mounts, tmp_path):
    text, f = mounts
    assert reach.mount_of(f["nfs"] + "/new/labels", text) == (f["nfs"], "nfs4")  # created later: its folder's
    assert reach.mount_of(f["efs data"] + "/photos", text) == (f["efs data"], "nfs4")  # an escaped space
    assert reach.mount_of(f["nfs"] + "/photos/a.jpg", text)[1] == "ext4"  # the innermost mount wins
    reachable = [("--output", "s3://bucket/labels"), ("--input", f["nfs"] + "/labels"),
                 ("--data", f"file://{f['bucket']}/photos"), ("--storage", f["lustre"] + "/runs"), ("--init-from", None)]
    assert reach.local_paths(reachable, text) == []
    local = [("--output", f["overlay"] + "/labels"), ("--storage", f["nfs"] + "/photos/runs"),
             ("--input", str(tmp_path))]
    assert reach.local_paths(local, text) == [
        f"--output {f['overlay']}/labels (fuse.fuse-overlayfs at {f['overlay']})",
        f"--storage {f['nfs']}/photos/runs (ext4 at {f['nfs']}/photos)",
        f"--input {tmp_path} ({reach.mount_of(str(tmp_path), text)[1]} at {reach.mount_of(str(tmp_path), text)[0]})"]


def _cluster(monkeypatch, nodes: list[dict], here: str = "head") -> None:
    """Ray's answers for a cluster this process connected to (not one it started)."""
    monkeypatch.setattr(reach, "started_here", lambda: False)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)

    class Context:
        def get_node_id(self):
            return here

    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())


def test_tasks_run_elsewhere_on_several_nodes_or_from_a_head_without_cpus(monkeypatch):
    head = {"NodeID": "head", "Alive": True, "Resources": {"CPU": 8.0, "memory": 1e10}}
    worker = {"NodeID": "w1", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}
    _cluster(monkeypatch, [head])
    assert reach.tasks_elsewhere() is None  # `ray start --head` on one machine: its local paths are fine
    _cluster(monkeypatch, [head, {**worker, "Alive": False}])
    assert reach.tasks_elsewhere() is None  # a node that died is not where tasks run
    _cluster(monkeypatch, [head, worker])
    assert reach.tasks_elsewhere() == "its 2 nodes each run tasks"
    _cluster(monkeypatch, [{**head, "Resources": {"CPU": 0.0, "memory": 1e10}}])  # cluster.yaml's head, no worker yet
    assert "no CPU and no GPU" in reach.tasks_elsewhere()
    assert reach.tasks_elsewhere() is not None
    monkeypatch.setattr(reach, "started_here", lambda: True)
    assert reach.tasks_elsewhere() is None  # a Ray this process started runs everything here
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert reach.tasks_elsewhere() is None  # not connected yet: the job starts a Ray of its own
    _cluster(monkeypatch, [{"NodeID": "head", "Alive": True}, worker])  # entries without every key
    assert reach.tasks_elsewhere() == "its 2 nodes each run tasks"
    _cluster(monkeypatch, [{"NodeID": "head", "Alive": True}])
    assert "no CPU and no GPU" in reach.tasks_elsewhere()


def test_writes_to_a_local_path_are_refused_and_reads_from_one_are_warned_about(monkeypatch, tmp_path):
    """What a job writes would land on each node's own disk: refused. What it reads may be on every node (baked
    into the container image): a warning naming it."""
    warned = []
    monkeypatch.setattr(reach, "tasks_elsewhere", lambda: "its 2 nodes each run tasks")
    with pytest.raises(ValueError, match=f"--output {tmp_path / 'labels'} .*each write to their own disk"):
        reach.check_reachable([("--output", str(tmp_path / "labels"))], [("--input", str(tmp_path))], warn=warned.append)
    assert warned == []  # refused before any warning
    reach.check_reachable([("--output", "s3://bucket/labels/")], [("--input", str(tmp_path)), ("--data", "s3://b/x")],
                          warn=warned.append)
    (line,) = warned
    assert line.startswith(f"warning: --input {tmp_path} (") and "baked into the container image" in line
    monkeypatch.setattr(reach, "tasks_elsewhere", lambda: None)
    reach.check_reachable([("--output", str(tmp_path / "labels"))], [("--input", str(tmp_path))], warn=warned.append)
    assert len(warned) == 1  # one machine: nothing to say


def test_the_label_job_refuses_a_local_output_before_its_lease_or_any_read(monkeypatch, tmp_path):
    from raytasks.label import job
    from raytasks.label.spec import LabelError, LabelSpec

    monkeypatch.setattr(job, "ensure_ray", lambda: None)
    monkeypatch.setattr(reach, "tasks_elsewhere", lambda: "its 3 nodes each run tasks")
    (tmp_path / "photos").mkdir()
    spec = LabelSpec(checkpoint="s3://bucket/models/hs.pt", input=str(tmp_path / "photos"),
                     output=str(tmp_path / "labels"))
    with pytest.raises(LabelError) as e:
        job.label(spec, echo=lambda line: None)
    message = str(e.value)
    assert message.startswith(f"--output {tmp_path / 'labels'} (") and "its 3 nodes each run tasks" in message
    assert not (tmp_path / "labels").exists()  # no lease, no listing: nothing written


def test_the_train_job_refuses_a_local_run_storage_before_it_writes_anything(monkeypatch, tmp_path, capsys):
    """Checked first in prepare(), which jobs.train runs after connecting to a cluster: before the data is read
    and before the detection cache is written under --storage (a whole detection pass, with --faces detect)."""
    import jobs.train
    from facedata.synth import generate

    data = generate("celeba", 24, str(tmp_path / "celeba"), seed=3)
    monkeypatch.setattr(reach, "tasks_elsewhere", lambda: "its 2 nodes each run tasks")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # connected (the check is what is tested here)
    with pytest.raises(SystemExit):
        jobs.train.main(["--model", "hard_sharing", "--data", f"celeba:{data}", "--faces", "detect",
                         "--storage", str(tmp_path / "runs"), "--recipe", "none", "--epochs", "1"])
    err = capsys.readouterr().err
    assert err.startswith(f"error: --storage {tmp_path / 'runs'} (") and "its 2 nodes each run tasks" in err
    assert not (tmp_path / "runs").exists()  # no detection cache, no run folder


def test_the_serve_command_warns_about_a_local_checkpoint_before_deploying(monkeypatch, tmp_path, capsys):
    from ray import serve

    import jobs.serve

    monkeypatch.setattr(ray, "init", lambda *a, **kw: None)
    monkeypatch.setattr(ray, "shutdown", lambda *a, **kw: None)
    monkeypatch.setattr(reach, "tasks_elsewhere", lambda: "its 2 nodes each run tasks")
    monkeypatch.setenv("FACEATTR_API_KEY", "k3y")

    class Deploying(Exception):
        pass

    def start(**kw):
        raise Deploying

    monkeypatch.setattr(serve, "start", start)
    monkeypatch.setattr(serve, "shutdown", lambda: None)
    # no Serve runs on the (not started) Ray: asking Ray would fail unless an earlier test left one connected
    monkeypatch.setattr(jobs.serve, "_running_serve", lambda: None)
    save_model(str(tmp_path / "hs.pt"), "hard_sharing", seed=0, hidden=8)  # a missing one is refused before Ray
    with pytest.raises(Deploying):
        jobs.serve.main(["--model", f"hs={tmp_path / 'hs.pt'}", "--model", "agr=s3://bucket/models/agr.pt",
                         "--port", str(free_port())])
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert any(w.startswith(f"warning: --model hs {tmp_path / 'hs.pt'} (") for w in warnings), out
    assert not any("agr" in w for w in warnings), out  # its checkpoint is on S3
