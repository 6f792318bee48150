"""CPU time of every process on this machine while a piece of work runs, by what the process was doing
(Linux only: it reads /proc). Used by bench_faces.py's ``--cpu-accounting`` to say where the label job's CPU
goes beside the model: on a machine whose cores the job saturates, every CPU-second another process takes
comes out of the model's time.

A thread polls /proc every ``interval`` seconds and charges each process's CPU increase since the previous
poll to the process's command line at that poll. Ray renames a worker process after what it runs (``ray::IDLE``,
``ray::MapBatches(read_and_decode)``, ``ray::MapWorker(...).submit`` for an actor's method), so a process's
time lands on what it was doing. A process that starts and ends between two polls is missed, and one that
ends loses what it used after the last poll: a lower bound, accurate to a poll interval per process.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _name(cmdline: str) -> str:
    if cmdline.startswith("ray::"):
        return cmdline.split()[0]
    parts = cmdline.split()
    if not parts:
        return "(kernel or unnamed)"
    exe = parts[0].rsplit("/", 1)[-1]
    if exe.startswith("python") and len(parts) > 1:
        return "python " + parts[1].rsplit("/", 1)[-1]
    return exe


def process_titles() -> dict[int, str]:
    """pid -> the first word of its command line (a Ray worker's title: ``ray::ServeReplica:app:FaceAttrAPI``), for
    every process we may read."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out[int(pid)] = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:  # gone between listdir and open
            continue
    return out


def _snapshot() -> dict[tuple[str, str], tuple[int, str]]:
    """(pid, start time) -> (user + system ticks, command line) for every process we may read."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone between listdir and open
            continue
        out[(pid, fields[19])] = (int(fields[11]) + int(fields[12]), cmd)
    return out


class ProcessCPU:
    """``with ProcessCPU() as acct: work()`` then ``acct.by_name`` (name -> CPU seconds), ``acct.seconds``
    (wall) and ``acct.own_seconds`` (the poller's own CPU, charged to this process's line too)."""

    def __init__(self, interval: float = 0.25):
        if not os.path.isdir("/proc/self"):
            raise RuntimeError("CPU accounting reads /proc: Linux only")
        self.interval = interval
        self.by_name: dict[str, float] = defaultdict(float)
        self.processes: dict[str, set] = defaultdict(set)
        self.seconds = self.own_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-accounting", daemon=True)

    def _run(self) -> None:
        start = time.thread_time()
        last = {k: ticks for k, (ticks, _) in _snapshot().items()}
        while True:
            stopping = self._stop.wait(self.interval)
            for key, (ticks, cmd) in _snapshot().items():
                used = ticks - last.get(key, 0)  # a process born since the last poll: all it used
                last[key] = ticks
                if used > 0:
                    name = _name(cmd)
                    self.by_name[name] += used / TICKS
                    self.processes[name].add(key)
            if stopping:
                break
        self.own_seconds = time.thread_time() - start

    def __enter__(self) -> ProcessCPU:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self._t0

    @property
    def total(self) -> float:
        return sum(self.by_name.values())

    def table(self, per: int | None = None, top: int = 14) -> str:
        """The processes by CPU, largest first (``per``: also ms per item)."""
        rows = sorted(self.by_name.items(), key=lambda kv: -kv[1])
        lines = [f"{'CPU-s':>8}{'ms/item' if per else '':>9}  procs  what"]
        for name, cpu in rows[:top]:
            each = f"{1000 * cpu / per:9.1f}" if per else ""
            lines.append(f"{cpu:8.1f}{each}  {len(self.processes[name]):5d}  {name[:70]}")
        rest = sum(c for _, c in rows[top:])
        if rest:
            lines.append(f"{rest:8.1f}{'':9}         ({len(rows) - top} others)")
        cores = self.total / self.seconds if self.seconds else 0.0
        lines.append(f"{self.total:8.1f}  in all, over {self.seconds:.1f} s: {cores:.2f} of {os.cpu_count()} cores "
                     f"(the poller itself {self.own_seconds:.1f} CPU-s)")
        return "\n".join(lines)
