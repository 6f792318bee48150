"""Where the label job's lease lives (raytasks/label/lease.py): a local (or NFS) folder or an s3:// prefix,
with the four operations the lease needs. The only write that decides anything is :meth:`_Store.create`,
a create-if-absent that is atomic on both stores; records are never rewritten, only deleted once replaced."""

from __future__ import annotations

import os
import random
import time
import uuid

import storage

# S3 requests of the lease: each is sent once by botocore and retried here, on a transient error (throttling, 5xx,
# a reset or timed-out connection: storage.is_transient), with exponential backoff and jitter from BACKOFF_S up to
# MAX_BACKOFF_S, until ``retry_s`` has passed (the lease passes a quarter of its ttl: Lease, Fence). The bound is
# the point: a fence check that cannot read the lease within it answers "lost" (raytasks/label/lease.py
# Fence.check) long before the lease could expire and be taken over. Attempts start within ``retry_s``; one
# attempt adds at most CONNECT_TIMEOUT_S + READ_TIMEOUT_S (the records are a few hundred bytes).
DEFAULT_RETRY_S = 30.0
BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0


class _Store:
    """List, create-if-absent, read and delete small objects under a local folder or an s3:// prefix.

    On S3 each operation is retried on a transient error for ``retry_s`` seconds (backoff from ``backoff_s``);
    the error is raised after that, as are errors that are not transient (no access, no such bucket)."""

    def __init__(self, root: str, retry_s: float = DEFAULT_RETRY_S, backoff_s: float | None = None):
        self.root = root
        self.s3 = storage.is_s3(root)
        self.retry_s, self.backoff_s = float(retry_s), float(BACKOFF_S if backoff_s is None else backoff_s)
        if self.s3:
            self.bucket, _, prefix = root[len("s3://"):].partition("/")
            self.prefix = prefix.strip("/") + "/"
            # one attempt per call: the retries are _retrying's, bounded in time (botocore's are not)
            self.client = storage.s3_client(max_attempts=1, connect_timeout=CONNECT_TIMEOUT_S,
                                            read_timeout=READ_TIMEOUT_S)
        else:
            self.dir = storage.filesystem(root)[1]  # file:// stripped, made absolute, as every writer reads it

    def _retrying(self, op, *args, **kwargs):
        """``op(*args, **kwargs)``, sent again after a transient error until ``retry_s`` has passed."""
        deadline = time.monotonic() + self.retry_s
        delay = self.backoff_s
        while True:
            try:
                return op(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - only transient ones are retried, the rest raised at once
                pause = delay * random.uniform(0.5, 1.0)
                if not storage.is_transient(e) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            delay = min(delay * 2, MAX_BACKOFF_S)

    def names(self) -> list[str]:
        if self.s3:
            return self._retrying(self._s3_names)
        try:
            return os.listdir(self.dir)
        except FileNotFoundError:
            return []

    def create(self, name: str, body: bytes) -> bool:
        """Create ``name`` with ``body`` unless it exists; True when this call created it.

        The caller's ``body`` must be unique to the call (the lease's records hold the run's owner id and the
        time of the write): a failed answer is checked against it, because a request the store carried out
        can still be answered "exists" when its reply was lost and the request sent again."""
        if self.s3:
            from botocore.exceptions import ClientError

            try:
                self._retrying(self.client.put_object, Bucket=self.bucket, Key=self.prefix + name, Body=body,
                               IfNoneMatch="*")
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") \
                        or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                    # a put whose reply was lost (a reset connection, a 5xx from a proxy) is sent again
                    # (_retrying): when the first one was stored, the resend is answered 412 although the object is
                    # this call's
                    return self.get(name) == body
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
            # On NFS a LINK the server carried out but whose reply was lost is sent again and answered EEXIST.
            # The temporary file's name is ours alone, so a second link to it can only be the one this call made
            # (the check open(2) gives for O_EXCL on NFS).
            return os.stat(tmp).st_nlink == 2
        finally:
            os.unlink(tmp)

    def get(self, name: str) -> bytes | None:
        if self.s3:
            return self._retrying(self._s3_get, name)
        try:
            with open(os.path.join(self.dir, name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> None:
        if self.s3:
            self._retrying(self.client.delete_object, Bucket=self.bucket, Key=self.prefix + name)
            return
        try:
            os.unlink(os.path.join(self.dir, name))
        except FileNotFoundError:
            pass


    def _s3_names(self) -> list[str]:
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            out += [o["Key"][len(self.prefix):] for o in page.get("Contents", ())]
        return out

    def _s3_get(self, name: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None


def _gen_name(gen: int) -> str:
    return f"{gen:012d}.json"


def _generations(store: _Store) -> list[int]:
    """The generation numbers present, in increasing order (temporary files and other names skipped)."""
    gens = []
    for name in store.names():
        stem, dot, ext = name.partition(".")
        if ext == "json" and stem.isdigit():
            gens.append(int(stem))
    return sorted(gens)
