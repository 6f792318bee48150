"""Helpers shared by the test modules: checkpoints, the label job's output and its kill-after-the-first-commit
loop, the HTTP/ingress helpers of the serving tests, and comparisons of rows and faces. The images and photos
the tests are made of: tests/images.py. Fixtures that hold these (checkpoints, the detector, Ray, S3) are in
tests/conftest.py."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# The environment of the tests' Ray clusters (the session's, tests/conftest.py, and the notebook kernel's).
# Ray Train V2's controller collects the workers' reports, and sees a finished or dead worker, only when it
# polls them: every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default. Our workers wait for each epoch's
# checkpoint to be committed (raytasks/train/worker.py), so each epoch, start, end and restart of a run waits
# for the next poll; runs whose epochs take seconds poll more often here.
# RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0: each Ray Train run starts an actor that asks Ray every 5 s whether a
# node is being drained (spot instances); on one local node nothing is, and the actor's process (it imports
# ray.train and ray.data) cost 22 CPU-s over the suite's 7 runs (measured 2026-12-03, per-process CPU of a
# whole `make test`). A user's runs keep Ray's default (on).
# RAY_LOG_MONITOR_MANY_FILES_THRESHOLD=0: the log monitor (a process per cluster, started by ray.init from the
# driver's environment) lists the session's log folder every 0.1 s while it holds fewer files than this, else
# every 0.5 s (ray/_private/log_monitor.py); it took 22 CPU-s over the suite's three clusters (2026-12-03, per
# process). The tests' drivers do not print the workers' logs (log_to_driver=False) and read no log through it.
RAY_TEST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0"}


def lease_output(request, tmp_path) -> str:
    """A label output on a local folder or on the test S3 server (``request.param``: "local" or "s3"); the
    lease tests' fixture (``pytest.fixture(params=["local", "s3"])(lease_output)``)."""
    if request.param == "local":
        return str(tmp_path / "out")
    _, bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/labels/run-1/"


# --- checkpoints ----------------------------------------------------------------------------------------
def save_model(path: str, name: str, seed: int | None = None, **kwargs) -> str:
    """``models.create_model(name, **kwargs)`` saved at ``path`` (a file or an s3:// URI); returns ``path``."""
    import torch

    import models
    from models.checkpoint import save_checkpoint

    if seed is not None:
        torch.manual_seed(seed)
    save_checkpoint(models.create_model(name, **kwargs), path)
    return path


def copy_file(src: str, dst: Path) -> str:
    dst.write_bytes(Path(src).read_bytes())
    return str(dst)


# --- the label job's output --------------------------------------------------------------------------------
def read_rows(output: str):
    """The Parquet rows of a label output (local or s3://) as an Arrow table."""
    import pyarrow.parquet as pq

    import storage
    from raytasks.label.output import LABELS_DIR

    fs, path = storage.filesystem(storage.join(output, LABELS_DIR))
    return pq.read_table(path, filesystem=fs)


def kill_after_commits(argv: list[str], ray_session, committed, n: int = 1, throttle: float = 1.0,
                       timeout_s: float = 240) -> None:
    """Run ``python -m jobs.label argv --throttle`` against the test session's Ray, wait until
    ``committed()`` (how many commit files the output's commit log holds) reaches ``n``, then SIGKILL the
    job's whole process group (the driver, as a killed pod would lose it). Fails if the job ends or no
    commit comes before the deadline."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.label", *argv, "--throttle", str(throttle)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while committed() < n:
            assert proc.poll() is None, "the job ended before it was killed:\n" + proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"no {n} commits in {timeout_s} s"
            time.sleep(0.2)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    time.sleep(2)  # let Ray reap the killed job's workers


def put_all(client, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    """Each of ``files`` (name -> bytes) as the object ``prefix + name`` of ``bucket``."""
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}{name}", Body=data)


def s3_commits(client, bucket: str, prefix: str):
    """``committed`` for kill_after_commits on an s3:// output (``prefix``: the commit log's key prefix)."""
    def count() -> int:
        objs = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return sum(1 for o in objs if o["Key"].endswith(".parquet") and not o["Key"].endswith(".pending.parquet"))
    return count


def committed_rows(output: str) -> int:
    """The rows of a stopped or killed label run's output (local or s3://) whose writes were committed. A stop
    between a data file's write and its commit leaves the file (whole, cut, or 0 bytes) with a pending commit
    file of its prefix and no committed twin: the next run deletes it and labels those inputs again, so its
    ``rows_before`` counts only these rows. Read from the listing here, not with the product's cleanup."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    import storage
    from raytasks.label.output import COMMIT_LOG_DIR, LABELS_DIR, PENDING_SUFFIX

    def files(uri: str) -> list[str]:
        fs, root = storage.filesystem(uri)
        return [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
                if i.type == pafs.FileType.File]

    log = {p.rsplit("/", 1)[1] for p in files(storage.join(output, COMMIT_LOG_DIR))}
    uncommitted = tuple(n[: -len(PENDING_SUFFIX)] for n in log
                        if n.endswith(PENDING_SUFFIX) and n[: -len(PENDING_SUFFIX)] + ".parquet" not in log)
    fs, _ = storage.filesystem(storage.join(output, LABELS_DIR))
    return sum(pq.ParquetFile(p, filesystem=fs).metadata.num_rows for p in files(storage.join(output, LABELS_DIR))
               if not p.rsplit("/", 1)[1].startswith(uncommitted))


def assert_row_matches(got: dict, want: dict, fields) -> None:
    """Field by field: floats (and float lists) to 1e-4, the rest exactly."""
    import pytest

    for f in fields:
        a, b = got[f.name], want[f.name]
        if isinstance(b, float):
            assert a == pytest.approx(b, abs=1e-4), (got["path"], f.name)
        elif isinstance(b, list) and b and isinstance(b[0], float):
            assert np.allclose(a, b, atol=1e-4), (got["path"], f.name)
        else:
            assert a == b, (got["path"], f.name, a, b)


def plain(v, digits: int | None = 5):
    """A value as pandas or Arrow gives it -> plain Python (NaN -> None, arrays -> lists, floats rounded)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, np.ndarray):
        return [plain(x, digits) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [plain(x, digits) for x in v]
    if isinstance(v, dict):
        return {k: plain(x, digits) for k, x in v.items()}
    if isinstance(v, (np.floating, float)):
        return round(float(v), digits) if digits is not None else float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


# --- HTTP and the ingress ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_error(r, status: int, code: str | None = None) -> dict:
    """An httpx response is the JSON error ``status`` (``code``); returns its body."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["detail"], body
    if code:
        assert body["error"] == code, body
    return body


class FakeRequest:
    """What the ingress reads of a request: its headers and its body stream."""

    def __init__(self, headers: dict | None = None, body: bytes = b""):
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.body = body

    async def stream(self):
        yield self.body


def ingress(**limits):
    """The ingress object (``FaceAttrAPI``) without Serve, with API key ``k``: @serve.ingress wraps the class
    in an ASGI replica whose __init__ is a coroutine; ours is the plain one below it in the MRO."""
    import inspect

    from raytasks import serve as S

    wrapper = S.FaceAttrAPI.func_or_class
    ours = next(c for c in wrapper.__mro__ if c.__name__ == "FaceAttrAPI" and "__init__" in c.__dict__
                and not inspect.iscoroutinefunction(c.__dict__["__init__"]))
    api = object.__new__(wrapper)
    ours.__init__(api, {}, 1 << 20, 4, api_key="k", limits=S.IngressSpec(**limits))
    return api


def assert_same(got, want, where: str = "", tol: float = 1e-4) -> None:
    """Equal, floats to ``tol`` (relative or absolute: Parquet keeps float32, JSON and the core the float64
    of the same value; batches of other sizes sum in another order), recursively through structs and
    lists; a NaN expected is a None got (JSON has no NaN)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, set(got or {}) ^ set(want))
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}", tol)
    elif isinstance(want, (list, tuple, np.ndarray)):
        got = list(got) if isinstance(got, (tuple, np.ndarray)) else got
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]", tol)
    elif isinstance(want, (float, np.floating)) and not isinstance(want, bool):
        if math.isnan(want):
            assert got is None or (isinstance(got, float) and math.isnan(got)), (where, got)
        else:
            assert isinstance(got, (int, float, np.number)) and math.isclose(got, want, rel_tol=tol, abs_tol=tol), (
                where, got, want)
    else:
        assert got == want, (where, got, want)


def assert_same_faces(got, want) -> None:
    """Two ``faces.detect.Faces`` of one image are the same faces: count, boxes and points to 1e-3 px, scores
    to 1e-5 (a batch of other images sums in another order)."""
    import torch

    assert len(got) == len(want), (got.scores, want.scores)
    torch.testing.assert_close(got.boxes, want.boxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(got.points, want.points, atol=1e-3, rtol=0)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=0)


def detect_batched_and_alone(detector, images: list) -> list:
    """``detector``'s faces of ``images`` detected in one batch, each checked equal to the image detected alone."""
    together = detector.detect(images)
    for image, batched in zip(images, together):
        assert_same_faces(batched, detector.detect_one(image))
    return together


@contextmanager
def torch_threads(n: int = 2):
    """Run the block with ``n`` torch threads, then restore the count: a learning test's bar was measured with
    a thread count, another count sums floats in another order, and a test run earlier in the same xdist worker
    may have set one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_run_folder(spec, model, val):
    """raytasks.train.resume.check_folder with the recipe and face mode job.prepare resolves for ``spec`` (data
    that sets no model argument, CelebA's default face mode)."""
    import types

    from faces.trainfaces import default_mode
    from raytasks.train.job import resolve_model
    from raytasks.train.resume import check_folder

    no_overrides = types.SimpleNamespace(model_overrides=lambda name: {})
    return check_folder(spec, model, resolve_model(spec, no_overrides)[1], val, spec.faces or default_mode("celeba"))
