"""The lease on a label output (raytasks/label/lease.py, issue #13 item 6): one live run per output, on a local
folder and on a real S3 endpoint (moto's server, If-None-Match honoured), a killed run's lease taken over by
exactly one of several runs racing for it, renewal, and label() refusing a second run before it touches
the output."""

from __future__ import annotations

import threading
import time

import pytest

from raytasks.label.lease import Lease, LeaseError, LeaseHeld
from tests.helpers import lease_output

output = pytest.fixture(params=["local", "s3"])(lease_output)


def test_second_live_run_is_refused_naming_the_holder(output):
    first = Lease(output).acquire()
    try:
        with pytest.raises(LeaseHeld) as e:
            Lease(output).acquire()
        msg = str(e.value)
        assert first.owner in msg and "pid" in msg and "being written by another run" in msg
    finally:
        first.release()
    Lease(output).acquire().release()  # released: the next run takes it


def test_stale_lease_is_taken_over_by_exactly_one_racer(output):
    killed = Lease(output, ttl_s=0.5, renew=False).acquire()  # never renewed, never released: a killed run
    time.sleep(0.7)
    racers = [Lease(output) for _ in range(6)]
    barrier = threading.Barrier(len(racers))
    results: list = [None] * len(racers)

    def race(i):
        barrier.wait()
        try:
            racers[i].acquire()
            results[i] = "won"
        except LeaseHeld:
            results[i] = "refused"
        except LeaseError as e:
            results[i] = f"error {e}"

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(racers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.count("won") == 1 and results.count("refused") == len(racers) - 1, results
    winner = racers[results.index("won")]
    assert Lease(output).holder()["owner"] == winner.owner
    assert not killed.renew() and killed.lost  # the killed run, if it wakes up, knows it lost the output
    winner.release()


def test_renewal_keeps_a_slow_run_alive(output):
    lease = Lease(output, ttl_s=1.0).acquire()
    try:
        time.sleep(2.0)  # twice the ttl: only renewal keeps it
        with pytest.raises(LeaseHeld):
            Lease(output).acquire()
    finally:
        lease.release()


def test_label_refuses_a_second_run_before_touching_the_output(tmp_path, monkeypatch):
    """Refused before it starts Ray (the code before started a local Ray, about 6 s, to refuse after it) and
    before it writes anything."""
    from raytasks import label as L
    from raytasks.label import job

    def no_ray():
        raise AssertionError("the refused run started Ray")

    monkeypatch.setattr(job, "ensure_ray", no_ray)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"not read")
    out = tmp_path / "out"
    holder = Lease(str(out)).acquire()
    try:
        spec = L.LabelSpec(checkpoint=str(tmp_path / "missing.pt"), input=str(photos), output=str(out))
        with pytest.raises(L.LabelError, match="being written by another run"):
            L.label(spec, echo=lambda *_: None)
        assert sorted(p.name for p in out.iterdir()) == ["_lease"]  # no _inputs/, no _checkpoint/
    finally:
        holder.release()


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = str(tmp_path / "out")
    code = ("import sys, time; from raytasks.label.lease import Lease; Lease(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, out], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld):  # alive: refused
            Lease(out).acquire()
    finally:
        proc.kill()
        proc.wait()
    lease = Lease(out).acquire()  # killed (kill -9), its lease unexpired: taken over without waiting
    lease.release()


def test_a_file_uri_output_and_its_plain_path_share_one_lease(tmp_path, monkeypatch):
    """``--output file:///X`` and ``--output /X`` (or X from another working folder) are one output: one lease
    (its store used ``os.path.abspath`` on the URI: a folder ``./file:/X/_lease`` under each working folder)."""
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    first = Lease(f"file://{out}").acquire()
    try:
        assert (out / "_lease").is_dir() and not (tmp_path / "file:").exists()
        for spelling in (str(out), "out", f"file://{out}"):
            with pytest.raises(LeaseHeld):
                Lease(spelling).acquire()
    finally:
        first.release()
