"""A label run stopped before its first commit, and one stopped by a signal (operations audit, 2026-12-06):
an output whose ``labels/`` folder exists but holds no file yet (what Ray Data leaves when the write has started
and nothing committed: an empty folder locally, a marker object on S3) is an output with no rows, not an
unreadable one; SIGTERM (``ray job stop``) and SIGINT end ``python -m jobs.label`` with one last line and the
signal's exit status, and the same command run again labels every input exactly once.

The end-to-end test runs the job in subprocesses, each with a local Ray of its own (not the session's)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytasks.label.output import (
    all_labeled,
    labeled_spellings,
    output_provenance,
    output_stats,
    unlabeled_inputs,
)
from tests.helpers import RAY_TEST_ENV, ROOT, read_rows, save_model
from tests.images import face_jpeg

STOPPED = "stopped: the rows committed so far are kept; run the same command again to label the rest"


def _assert_nothing_labeled(inputs_uri: str, labels_uri: str, n: int) -> None:
    st = output_stats(labels_uri)
    assert (st.rows, st.images, st.faces) == (0, 0, 0)
    assert labeled_spellings(None, labels_uri) is None
    assert output_provenance(labels_uri) == (set(), set())
    assert not all_labeled(inputs_uri, labels_uri)
    assert unlabeled_inputs(inputs_uri, labels_uri) == n


def test_an_empty_labels_folder_is_an_output_with_no_rows(tmp_path):
    from raytasks.label.job import LabelError, _read_output

    listing = tmp_path / "_inputs"
    listing.mkdir()
    pq.write_table(pa.table({"path": ["/d/a.jpg", "/d/b.jpg", "/d/c.jpg"]}), str(listing / "part-000000.parquet"))
    (tmp_path / "labels" / "sub").mkdir(parents=True)  # no file at any depth
    _assert_nothing_labeled(str(listing), str(tmp_path / "labels"), 3)
    # a file there that is not Parquet is still refused, with the message that names it
    (tmp_path / "labels" / "x_000000.parquet").write_bytes(b"")
    with pytest.raises(LabelError, match="not a complete Parquet file.*move it out"):
        _read_output(output_stats, {"labels": str(tmp_path / "labels")})


def test_an_empty_labels_prefix_on_s3_is_an_output_with_no_rows(s3_bucket):
    client, bucket = s3_bucket
    buf = io.BytesIO()
    pq.write_table(pa.table({"path": ["s3://x/a.jpg", "s3://x/b.jpg"]}), buf)
    client.put_object(Bucket=bucket, Key="out/_inputs/part-000000.parquet", Body=buf.getvalue())
    client.put_object(Bucket=bucket, Key="out/labels/", Body=b"")  # the folder marker Ray Data's write makes
    _assert_nothing_labeled(f"s3://{bucket}/out/_inputs", f"s3://{bucket}/out/labels", 2)


def _job_env() -> dict:
    env = {**os.environ, **RAY_TEST_ENV, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own: its own processes, stopped with it
    return env


def _job(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "jobs.label", *argv]


def test_sigterm_stops_with_a_last_line_and_the_same_command_finishes(tmp_path):
    """The output starts as a run stopped before its first commit leaves it (``labels/`` made, empty): the
    job labels it as a fresh one. SIGTERM once the run is labeling (before or after its first commit): the last
    line says so and the status is 143; the same command then labels every image exactly once (the lease was
    released: a live one would refuse the second run)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(8):
        (photos / f"f{i}.jpg").write_bytes(face_jpeg(300 + i))
    out = tmp_path / "out"
    (out / "labels").mkdir(parents=True)
    ckpt = save_model(str(tmp_path / "hs.pt"), "hard_sharing", seed=7)
    argv = ["--checkpoint", ckpt, "--input", str(photos), "--output", str(out), "--faces", "whole",
            "--precision", "fp32", "--batch-size", "2", "--max-actors", "1", "--max-rows-per-file", "2"]

    proc = subprocess.Popen(_job([*argv, "--throttle", "2"]), cwd=ROOT, env=_job_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
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

    again = subprocess.run(_job(argv), cwd=ROOT, env=_job_env(), capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    paths = read_rows(str(out)).column("path").to_pylist()
    assert sorted(paths) == sorted(str(photos / f"f{i}.jpg") for i in range(8)), paths
