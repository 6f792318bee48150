"""A lease on a label job's output: one live run per ``--output``, a killed run's lease taken over safely.

Two runs on one output corrupt it (the second rewrites ``_inputs/`` while the first reads it, Ray's pending
checkpoint cleanup deletes the first run's in-flight files, both write the same paths), so
:func:`raytasks.label.label` holds a lease for the whole run.

The lease is a series of numbered *generations* under ``OUTPUT/_lease/``, ``000000000001.json``,
``000000000002.json``, ..., each a small JSON record ``{owner, host, pid, pid_start, boot_id, pidns, created,
expires, ttl_s, released, output}`` (``owner``: a random id per run; ``expires``: Unix seconds, ``ttl_s`` =
120 s by default). A generation is written once, by a *create-if-absent* (raytasks/label/lease_store.py: a
temporary file ``os.link``-ed to its name locally and on NFS, ``PutObject`` with ``If-None-Match: *`` on S3),
and never rewritten. The highest generation, *the top*, is the lease; it is free when its record says
``released``, when it has expired (its run was killed or stalled), or when its holder died on this machine
(below). Every change of the lease is the creation of the generation above the top:

* acquire: a run reads the top ``n``; when it is held the run is refused (:class:`LeaseHeld`, naming the holder);
  when there is none or it is free, the run creates ``n + 1``. Of two runs taking over the same stale lease at
  once exactly one create succeeds; the other looks again, sees a live lease and is refused;
* renew (every ``ttl_s / 4``, a daemon thread): while the top is still the run's own ``n`` (its number and its
  owner id), the run creates ``n + 1``, its record with a fresh expiry. Creating ``n + 1`` fails when another
  run took over (that run created ``n + 1``): the run is then ``lost`` and never writes to the store again;
* release: the run creates ``n + 1`` as a *tombstone* (``released``, free) instead of deleting its lease, so
  the numbering never goes back: a later run takes ``n + 2``, never a number a stalled run still holds;
* after each create the generations below it are deleted (only the top counts); the top is never deleted.

Why renewal creates a generation rather than rewriting its record: a rewrite is a check ("still mine?")
followed by a write, and a run that stalls between the two would write over, or bring back, a lease another
run took over. S3 could make the rewrite conditional (``If-Match`` on the ETag read), but a folder, local or
NFS, has no conditional overwrite (``rename`` replaces whatever is there), while create-if-absent is atomic
on both. With creates only, each generation number has one creator and the top only grows, so a run that was
taken over can hold the top again only by creating above the other run's generation, which it never does: it
creates just ``n + 1``, which the other run holds; and when its late create lands in a number freed by the
deletion of old generations, the generation is not the top (checked right after the create, the create
undone, the run ``lost``). The same check backs acquire.

Holder died on this machine: a ``kill -9`` followed by a rerun need not wait for the expiry. The record holds
the holder's host name, pid and process start time, the kernel's boot id and the holder's pid namespace;
the shortcut is taken only when all of the machine's identity matches this process's (two containers with
host networking share a host name but not their pids) and that pid is gone or is another process now.
Otherwise, or when any of it cannot be read, the lease is judged by its expiry alone.

Fencing: a run that was stalled past its expiry (a paused process, a long GC, a partition) and taken over must
not write beside its successor. Its writers check :class:`Fence` (the top is still the run's, unexpired, read
from the store) right before each write and again right before each commit (a write whose run lost the lease
meanwhile deletes its own files), so it stops writing within one ttl of stalling, and its renewal
thread marks it ``lost``. A run taking over an expired lease waits one ttl of the old run before touching the
output (:meth:`Lease.takeover_grace_s`); the window left is docs/deploy.md's. Once a fence has seen another
run's generation above its own it fails for good in
that process, whatever the store shows later.

The lease relies on the store's listing showing every finished create (S3's listing is strongly consistent;
an NFS client can cache a folder's listing for its ``acdirmin``..``acdirmax`` seconds: keep ``ttl_s`` well
above them). Expiry compares wall clocks of different machines: keep ``ttl_s`` well above their skew (NTP
keeps it under a second; the default allows 2 minutes of stall).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
import uuid

import storage
from raytasks.label.lease_store import _gen_name, _generations, _Store

LEASE_DIR = "_lease"
DEFAULT_TTL_S = 120.0
_READ_TRIES = 8
_CLAIM_TRIES = 8  # takeovers lost to other runs before acquire gives up

# (output, owner) of the runs whose fence, in this process, saw another run's generation above its own
_TAKEN_OVER: set[tuple[str, str]] = set()


class LeaseError(RuntimeError):
    """The lease could not be taken or was lost."""


class LeaseLost(LeaseError):
    """This run's lease expired or was taken over: it must not write again."""


class LeaseHeld(LeaseError):
    """Another live run holds the output."""

    def __init__(self, output: str, holder: dict):
        self.holder = holder
        left = max(0.0, _expires(holder) - time.time())
        super().__init__(
            f"{output} is being written by another run (owner {holder.get('owner')}, host {holder.get('host')}, "
            f"pid {holder.get('pid')}, started {holder.get('created_iso', '?')}); its lease expires in {left:.0f} s "
            "unless renewed. Wait for it to finish, or stop it; a killed run's lease is taken over once it expires")


def _expires(rec: dict) -> float:
    try:
        return float(rec.get("expires", 0))
    except (TypeError, ValueError):
        return 0.0  # not written by us (our records are complete when they appear): not a live lease


def _read_top(store: _Store) -> tuple[int, dict | None]:
    """The top generation and its record (``{}`` when it is not a lease record), or ``(0, None)`` when there
    is no generation at all."""
    for _ in range(_READ_TRIES):
        gens = _generations(store)
        if not gens:
            return 0, None
        body = store.get(_gen_name(gens[-1]))
        if body is None:
            continue  # replaced by a newer generation and deleted between the listing and the read: look again
        try:
            rec = json.loads(body)
        except ValueError:
            rec = {}
        return gens[-1], rec if isinstance(rec, dict) else {}
    raise LeaseError(f"{store.root}: the lease changed hands {_READ_TRIES} times while it was read")


def _free(rec: dict) -> bool:
    """Whether a top record leaves the output free: released, expired, or its holder died on this machine."""
    return rec.get("released") is True or _expires(rec) <= time.time() or _dead_here(rec)


@dataclasses.dataclass(frozen=True)
class Fence:
    """The lease a run holds, checked by its writers (the label job's write tasks, in other processes) right
    before each write: :meth:`check` raises :class:`LeaseLost` when the top generation is not the run's (another
    run took the output over) or when the run's lease has expired (it stalled: paused, swapped out, cut off from
    the store, and may be taken over at any moment). A stalled run therefore stops writing when it wakes,
    without waiting for its renewal thread. A write task that had already passed its check checks again after
    writing its data, before its commit (raytasks/label/stages.py ``commit_fence``), and on failure deletes its
    data and pending commit files instead of committing; a run that took over an expired lease waits its ttl
    (:meth:`Lease.takeover_grace_s`) before it cleans up, for such writes to end. ``gen`` is the generation the
    run acquired; its renewals
    create the ones above it under the same ``owner``."""

    output: str
    owner: str
    gen: int
    # how long the check retries a store that fails transiently (lease_store._Store) before it answers "lost":
    # a quarter of the lease's ttl (Lease.fence)
    retry_s: float = DEFAULT_TTL_S / 4

    def check(self) -> None:
        taken = LeaseLost(f"{self.output}: this run's lease (generation {self.gen}) was taken over by another "
                          "run: it stops writing")
        if (self.output, self.owner) in _TAKEN_OVER:
            raise taken
        try:
            top, rec = _read_top(_Store(storage.join(self.output, LEASE_DIR), retry_s=self.retry_s))
        except LeaseError as e:  # cannot tell whether the run still holds it: the safe answer is no
            raise LeaseLost(f"{e}: this run stops writing") from None
        except Exception as e:  # noqa: BLE001 - the store failing past its retries (S3 throttling, no access, ...)
            raise LeaseLost(f"{self.output}: this run's lease cannot be read ({type(e).__name__}: {e}), retried for "
                            f"{self.retry_s:g} s: the run stops writing; run the same command again to finish") from None
        if rec is None or top < self.gen or rec.get("owner") != self.owner:
            if top > self.gen:
                # another run's generation above ours: never ours again (a listing that later lacks it, a folder
                # someone emptied, must not let this run write beside the run that took over)
                _TAKEN_OVER.add((self.output, self.owner))
            raise taken
        if rec.get("released") is True:
            raise LeaseLost(f"{self.output}: this run released its lease (generation {top}): it stops writing")
        if _expires(rec) <= time.time():
            raise LeaseLost(f"{self.output}: this run's lease expired (the run stalled past its ttl of "
                            f"{rec.get('ttl_s')} s): it stops writing; run the same command again to finish")


def _start_ticks(pid: int) -> int | None:
    """The start time of a local process (clock ticks since boot), or None when it does not exist. With
    the pid it identifies one process: a pid reused by another process has another start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _machine() -> tuple[str, str] | None:
    """``(boot id, pid namespace)`` of this process: processes with equal ones see the same pids. None when
    either cannot be read, or when the /proc mounted here belongs to another pid namespace (its pids are not
    ours, so the holder's pid cannot be looked up there)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pidns = os.readlink("/proc/self/ns/pid")
        if os.readlink("/proc/self") != str(os.getpid()):
            return None
    except OSError:
        return None
    return (boot, pidns) if boot and pidns else None


def _dead_here(rec: dict) -> bool:
    """Whether the lease's holder ran on this machine, in this pid namespace, and its process is gone (killed):
    its lease is stale now, not only when it expires. Other holders are judged by their expiry alone: the host
    name alone does not tell (containers with host networking share it, each with pids of its own)."""
    here = _machine()
    if here is None or rec.get("host") != socket.gethostname() or (rec.get("boot_id"), rec.get("pidns")) != here:
        return False
    try:
        pid = int(rec.get("pid"))
    except (TypeError, ValueError):
        return False
    start = _start_ticks(pid)
    return start is None or (rec.get("pid_start") is not None and start != rec.get("pid_start"))


def refuse_if_held(output: str) -> None:
    """Raise :class:`LeaseHeld` when a live run holds ``output``: one read of its lease, no write and no retry,
    so that a second run is refused at once, before it starts (or joins) Ray. A lease that cannot be read now is
    left to :meth:`Lease.acquire`, which the run reaches after its checks and which says why."""
    try:
        rec = _live_holder(_Store(storage.join(output, LEASE_DIR), retry_s=0))
    except Exception:  # noqa: BLE001 - see above: the run's own acquire reports it
        return
    if rec is not None:
        raise LeaseHeld(output, rec)


def _live_holder(store: _Store) -> dict | None:
    """The record of the live lease in ``store``, or None when there is none (absent, released or expired)."""
    _, rec = _read_top(store)
    return None if rec is None or _free(rec) else rec


class Lease:
    """``with Lease(output):`` holds the output for the block (see the module docstring)."""

    def __init__(self, output: str, ttl_s: float = DEFAULT_TTL_S, renew: bool = True):
        self.output = output
        self.ttl_s = float(ttl_s)
        self.renew_enabled = renew
        # a store failing transiently is retried for a quarter of the ttl, here and in the fences: well before the
        # lease can expire, a fence check that cannot complete answers "lost" (Fence.check)
        self.retry_s = self.ttl_s / 4
        self.store = _Store(storage.join(output, LEASE_DIR), retry_s=self.retry_s)
        self.owner = uuid.uuid4().hex
        self.gen: int | None = None  # the generation this run created last (the top while it holds the lease)
        self.lost = False
        self._lock = threading.Lock()  # one change at a time: the renewal thread against release()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created = time.time()
        self.taken_from: dict | None = None  # the record of the expired lease this run took over, if it did

    # -- the record --------------------------------------------------------------------------------------
    def _record(self, released: bool = False) -> bytes:
        now = time.time()
        boot_id, pidns = _machine() or (None, None)
        return json.dumps({
            "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": _start_ticks(os.getpid()), "boot_id": boot_id, "pidns": pidns, "output": self.output,
            "created": self._created,
            "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._created)),
            "expires": now + self.ttl_s, "ttl_s": self.ttl_s, "released": released,
        }).encode()

    def fence(self) -> Fence:
        """What this run's writers check before each write (see :class:`Fence`)."""
        if self.gen is None:
            raise LeaseError("the lease is not held")
        return Fence(self.output, self.owner, self.gen, self.retry_s)

    def takeover_grace_s(self) -> float:
        """How long this run waits, holding the lease, before it touches the output, when it took the lease over
        from a run that stopped renewing it (``taken_from``): that run's ttl. A write task of the stalled run
        that had passed its fence before the stall and wakes within it finds the lease gone at its commit-time
        check (raytasks/label/stages.py ``commit_fence``), deletes its own data and pending files, and does not
        commit; the wait lets that happen before this run's recovery reads the output. 0 otherwise (a released
        lease, a holder dead on this machine, no lease)."""
        if not self.taken_from:
            return 0.0
        try:
            return max(0.0, float(self.taken_from.get("ttl_s", self.ttl_s)))
        except (TypeError, ValueError):
            return self.ttl_s

    def holder(self) -> dict | None:
        """The record of the live lease, or None when there is none (absent, released or expired)."""
        return _live_holder(self.store)

    # -- acquire, renew, release -------------------------------------------------------------------------
    def _claim(self, gen: int, released: bool = False) -> bool:
        """Create generation ``gen`` with this run's record; True when it is the top now. A create that landed
        below a newer generation (late, in a number freed by the deletion of replaced generations) is undone
        and False: only the top is the lease."""
        if not self.store.create(_gen_name(gen), self._record(released)):
            return False
        gens = _generations(self.store)
        if gens and gens[-1] > gen:
            self.store.delete(_gen_name(gen))
            return False
        for g in gens:
            if g < gen:
                self.store.delete(_gen_name(g))  # replaced: only the top counts
        return True

    def acquire(self) -> Lease:
        for _ in range(_CLAIM_TRIES):
            top, rec = _read_top(self.store)
            if rec is not None and not _free(rec):
                raise LeaseHeld(self.output, rec)
            if self._claim(top + 1):
                self.gen = top + 1
                # taken over from a run that stopped renewing (not one that released, nor one dead here): its
                # write tasks may still be in flight (see takeover_grace_s)
                self.taken_from = rec if rec and rec.get("owner") and rec.get("released") is not True \
                    and not _dead_here(rec) else None
                if self.renew_enabled:
                    self._thread = threading.Thread(target=self._renew_loop, name="label-lease", daemon=True)
                    self._thread.start()
                return self
            # another run created top + 1 first (or above it): the next look finds its live lease and refuses
        raise LeaseError(f"could not take the lease on {self.output}: it changed hands {_CLAIM_TRIES} times while we tried")

    def renew(self) -> bool:
        """Extend the expiry by creating the next generation; False (and ``lost``) when another run took the
        lease over. Writes nothing unless the top is this run's own record."""
        with self._lock:
            if self.gen is None or self.lost:
                return False
            top, rec = _read_top(self.store)
            if top != self.gen or rec is None or rec.get("owner") != self.owner or not self._claim(top + 1):
                self.lost = True
                return False
            self.gen = top + 1
            return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self.renew():
                    return
            except Exception:  # noqa: BLE001 - a failed renewal is retried; expiry leaves ttl_s of slack
                continue

    def release(self) -> None:
        """Leave a tombstone above this run's generation (see the module docstring); ``lost`` when another
        run had taken the lease over. Raises what the store raises past its retries: the lease is then left to
        expire (its ttl), and the run's caller says so without hiding its own outcome (raytasks/label/job.py)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            try:
                if self.gen is not None and not self.lost:
                    top, rec = _read_top(self.store)
                    if top != self.gen or rec is None or rec.get("owner") != self.owner \
                            or not self._claim(top + 1, released=True):
                        self.lost = True
            finally:  # a store that fails past its retries raises here; the lease then expires within its ttl
                self.gen = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
