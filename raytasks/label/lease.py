"""A lease on a label job's output: one live run per ``--output``, a killed run's lease taken over safely.

Two runs on one output corrupt it (the second rewrites ``_inputs/`` while the first reads it, Ray's pending
checkpoint cleanup deletes the first run's in-flight files, both write the same paths), so
:func:`raytasks.label.label` holds a lease for the whole run.

The lease is a small JSON object under ``OUTPUT/_lease/``: ``{owner, host, pid, created, expires, output}``
(``expires``: Unix seconds, renewed every ``ttl_s / 4`` by a daemon thread, ``ttl_s`` = 120 s by default).
Every write that decides who holds it is a *create-if-absent*, atomic on both stores:

* locally, the record is written to a temporary file and ``os.link``-ed to its name (``link`` fails when the
  name exists, like ``O_EXCL``, and the record is complete the moment it appears);
* on S3, ``PutObject`` with ``If-None-Match: *`` (S3 answers 412 when the key exists; moto's server does too).

Objects are numbered generations, ``000000000001.json``, ``000000000002.json``, ... The live lease is the
highest one. To acquire, a run reads the highest generation ``n``: when it is unexpired, the run is refused
(:class:`LeaseHeld`, naming the holder); when there is none, or it has expired (its run was killed), or its
holder ran on this same host and that process is gone (pid and process start time no longer match: a
``kill -9`` followed by a rerun need not wait for the expiry), the run creates generation ``n + 1``. Two runs that take over the same stale lease at once both try to create the
same ``n + 1``; exactly one create succeeds, the other sees a live lease and is refused. The winner deletes
the older generations; a clean release deletes its own. Renewal rewrites the holder's own generation (only
the holder writes it) after checking that no newer generation exists; a holder that finds one (it was
stalled past its expiry and was taken over) marks the lease ``lost``.

Fencing: a run that was stalled past its expiry (a paused process, a long GC, a partition) and taken over must
not write beside its successor. Its writers check :class:`Fence` (its generation and expiry, read from the
store) right before each write, so it stops writing within one ttl of stalling, and its renewal thread,
which finds the newer generation, marks it ``lost``.

Expiry compares wall clocks of different machines: keep ``ttl_s`` well above their skew (NTP keeps it
under a second; the default allows 2 minutes of stall).
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

LEASE_DIR = "_lease"
DEFAULT_TTL_S = 120.0


class LeaseError(RuntimeError):
    """The lease could not be taken or was lost."""


class LeaseLost(LeaseError):
    """This run's lease expired or was taken over: it must not write again."""


class LeaseHeld(LeaseError):
    """Another live run holds the output."""

    def __init__(self, output: str, holder: dict):
        self.holder = holder
        left = max(0.0, float(holder.get("expires", 0)) - time.time())
        super().__init__(
            f"{output} is being written by another run (owner {holder.get('owner')}, host {holder.get('host')}, "
            f"pid {holder.get('pid')}, started {holder.get('created_iso', '?')}); its lease expires in {left:.0f} s "
            "unless renewed. Wait for it to finish, or stop it; a killed run's lease is taken over once it expires")


class _Store:
    """The four operations the lease needs, on a local folder or an s3:// prefix."""

    def __init__(self, root: str):
        self.root = root
        self.s3 = storage.is_s3(root)
        if self.s3:
            import boto3

            self.bucket, _, prefix = root[len("s3://"):].partition("/")
            self.prefix = prefix.strip("/") + "/"
            self.client = boto3.client("s3", endpoint_url=storage.s3_endpoint(),
                                       region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
        else:
            self.dir = os.path.abspath(root)

    def names(self) -> list[str]:
        if self.s3:
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                out += [o["Key"][len(self.prefix):] for o in page.get("Contents", ())]
            return out
        try:
            return os.listdir(self.dir)
        except FileNotFoundError:
            return []

    def create(self, name: str, body: bytes) -> bool:
        """Create ``name`` with ``body`` unless it exists; True when this call created it."""
        if self.s3:
            from botocore.exceptions import ClientError

            try:
                self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=body, IfNoneMatch="*")
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") \
                        or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                    return False
                raise
        os.makedirs(self.dir, exist_ok=True)
        tmp = os.path.join(self.dir, f".tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, os.path.join(self.dir, name))  # atomic, fails if the name exists (O_EXCL semantics)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def put(self, name: str, body: bytes) -> None:
        """Overwrite ``name`` (only its creator does)."""
        if self.s3:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=body)
            return
        tmp = os.path.join(self.dir, f".tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, os.path.join(self.dir, name))

    def get(self, name: str) -> bytes | None:
        if self.s3:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
            except self.client.exceptions.NoSuchKey:
                return None
        try:
            with open(os.path.join(self.dir, name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> None:
        if self.s3:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)
            return
        try:
            os.unlink(os.path.join(self.dir, name))
        except FileNotFoundError:
            pass


def _gen_name(gen: int) -> str:
    return f"{gen:012d}.json"


def _generations(store: _Store) -> list[int]:
    gens = []
    for name in store.names():
        stem, dot, ext = name.partition(".")
        if ext == "json" and stem.isdigit():
            gens.append(int(stem))
    return sorted(gens)


@dataclasses.dataclass(frozen=True)
class Fence:
    """The generation a run holds, checked by its writers (the label job's write tasks, in other processes)
    right before each write: :meth:`check` raises :class:`LeaseLost` when a newer generation exists (another
    run took the output over) or when the run's own lease has expired (it stalled: paused, swapped out,
    cut off from the store, and may be taken over at any moment). A stalled run therefore stops writing
    when it wakes, without waiting for its renewal thread, and never writes after another run took over
    but within the one write task that had already passed its check."""

    output: str
    owner: str
    gen: int

    def check(self) -> None:
        store = _Store(storage.join(self.output, LEASE_DIR))
        gens = _generations(store)
        if not gens or gens[-1] != self.gen:
            raise LeaseLost(f"{self.output}: this run's lease (generation {self.gen}) was taken over by generation "
                            f"{gens[-1] if gens else 'none'}: it stops writing")
        body = store.get(_gen_name(self.gen))
        try:
            rec = json.loads(body) if body is not None else {}
        except ValueError:
            rec = {}
        if rec.get("owner") != self.owner:
            raise LeaseLost(f"{self.output}: generation {self.gen} is no longer this run's lease: it stops writing")
        if float(rec.get("expires", 0)) <= time.time():
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


def _dead_here(rec: dict) -> bool:
    """Whether the lease's holder ran on this host and its process is gone (killed): its lease is stale
    now, not only when it expires. Holders on other hosts are judged by their expiry alone."""
    if rec.get("host") != socket.gethostname() or not os.path.isdir("/proc/self"):
        return False
    try:
        pid = int(rec.get("pid"))
    except (TypeError, ValueError):
        return False
    start = _start_ticks(pid)
    return start is None or (rec.get("pid_start") is not None and start != rec.get("pid_start"))


class Lease:
    """``with Lease(output):`` holds the output for the block (see the module docstring)."""

    def __init__(self, output: str, ttl_s: float = DEFAULT_TTL_S, renew: bool = True):
        self.output = output
        self.ttl_s = float(ttl_s)
        self.renew_enabled = renew
        self.store = _Store(storage.join(output, LEASE_DIR))
        self.owner = uuid.uuid4().hex
        self.gen: int | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created = time.time()

    # -- the record --------------------------------------------------------------------------------------
    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({
            "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": _start_ticks(os.getpid()), "output": self.output,
            "created": self._created,
            "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._created)),
            "expires": now + self.ttl_s, "ttl_s": self.ttl_s,
        }).encode()

    def _generations(self) -> list[int]:
        return _generations(self.store)

    def fence(self) -> Fence:
        """What this run's writers check before each write (see :class:`Fence`)."""
        if self.gen is None:
            raise LeaseError("the lease is not held")
        return Fence(self.output, self.owner, self.gen)

    def holder(self) -> dict | None:
        """The record of the live lease, or None when there is none (absent, released or expired)."""
        gens = self._generations()
        if not gens:
            return None
        body = self.store.get(_gen_name(gens[-1]))
        try:
            rec = json.loads(body) if body is not None else None
        except ValueError:
            rec = None  # not written by us (our writes are atomic): not a live lease
        if not isinstance(rec, dict) or float(rec.get("expires", 0)) <= time.time() or _dead_here(rec):
            return None
        return rec

    # -- acquire, renew, release -------------------------------------------------------------------------
    def acquire(self) -> Lease:
        for _ in range(8):
            gens = self._generations()
            top = gens[-1] if gens else 0
            if top:
                body = self.store.get(_gen_name(top))
                if body is None:
                    continue  # released or replaced while we looked: look again
                try:
                    rec = json.loads(body)
                except ValueError:
                    rec = {}
                if isinstance(rec, dict) and float(rec.get("expires", 0)) > time.time() and not _dead_here(rec):
                    raise LeaseHeld(self.output, rec)
            if self.store.create(_gen_name(top + 1), self._record()):
                self.gen = top + 1
                for g in gens:  # older generations are stale or released: only the newest one counts
                    self.store.delete(_gen_name(g))
                if self.renew_enabled:
                    self._thread = threading.Thread(target=self._renew_loop, name="label-lease", daemon=True)
                    self._thread.start()
                return self
            # another run created top + 1 first: the next look finds its live lease and refuses
        raise LeaseError(f"could not take the lease on {self.output}: it changed hands 8 times while we tried")

    def renew(self) -> bool:
        """Extend the expiry; False (and ``lost``) when another run took the lease over."""
        if self.gen is None or self.lost:
            return False
        newer = [g for g in self._generations() if g > self.gen]
        if newer or self.store.get(_gen_name(self.gen)) is None:
            self.lost = True
            return False
        self.store.put(_gen_name(self.gen), self._record())
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self.renew():
                    return
            except Exception:  # noqa: BLE001 - a failed renewal is retried; expiry leaves ttl_s of slack
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.gen is not None and not self.lost and not [g for g in self._generations() if g > self.gen]:
            self.store.delete(_gen_name(self.gen))
        self.gen = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
