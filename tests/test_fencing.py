"""Fencing of the label job's lease (issue #22): a run that stalled past its lease and was taken over stops
writing, checked by its writers right before each write (raytasks/label/lease.py ``Fence``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from raytasks.label.lease import Lease, LeaseLost
from raytasks.label.stages import check_fence

ROOT = Path(__file__).resolve().parents[1]


def test_a_stalled_run_is_fenced_by_expiry_then_by_the_newer_generation(tmp_path):
    out = str(tmp_path / "out")
    a = Lease(out, ttl_s=1.0, renew=False).acquire()  # renew=False: the run is stalled from the start
    fence = a.fence()
    fence.check()  # held and unexpired: writes go on
    table = pa.table({"path": ["x.jpg"]})
    assert check_fence(table, fence) is table
    time.sleep(1.2)
    with pytest.raises(LeaseLost, match="expired"):  # stalled past its ttl: it stops before anyone took over
        fence.check()
    b = Lease(out, ttl_s=30.0, renew=False).acquire()
    with pytest.raises(LeaseLost, match="taken over"):
        check_fence(table, fence)
    assert a.renew() is False and a.lost  # the renewal finds the newer generation too
    b.fence().check()  # the new holder writes
    b.release()


WRITER = textwrap.dedent("""
    import os, sys, time
    from raytasks.label.lease import Lease, LeaseLost
    out, folder = sys.argv[1], sys.argv[2]
    fence = Lease(out, ttl_s=2.0).acquire().fence()
    i = 0
    while True:
        try:
            fence.check()
        except LeaseLost:
            sys.exit(3)
        with open(os.path.join(folder, f"a-{i:05d}"), "w") as f:
            f.write(str(time.time()))
        i += 1
        time.sleep(0.05)
""")


def test_a_paused_run_writes_nothing_after_another_run_took_over(tmp_path):
    """Two real processes: A writes through its fence; A is paused (SIGSTOP) past its ttl; B takes the
    output over; A is resumed (SIGCONT) and stops at its next check, having written at most the one file
    whose check it had passed before the pause."""
    out, folder = tmp_path / "out", tmp_path / "writes"
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    a = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(folder)], env=env)
    try:
        deadline = time.time() + 60
        while len(list(folder.iterdir())) < 3:
            assert a.poll() is None and time.time() < deadline, "writer did not start"
            time.sleep(0.05)
        a.send_signal(signal.SIGSTOP)
        time.sleep(2.5)  # past A's ttl of 2 s
        b = Lease(str(out), ttl_s=30.0).acquire()  # A's lease expired: B takes over (generation 2)
        took_over = time.time()
        a.send_signal(signal.SIGCONT)
        assert a.wait(timeout=30) == 3  # A stopped on LeaseLost, by itself
        late = [p for p in folder.iterdir() if float(p.read_text()) >= took_over]
        assert len(late) <= 1, f"A wrote {len(late)} files after B took over"
        b.fence().check()
        b.release()
    finally:
        if a.poll() is None:
            a.send_signal(signal.SIGCONT)
            a.kill()
