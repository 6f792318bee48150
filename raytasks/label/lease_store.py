"""Where the label job's lease lives (raytasks/label/lease.py): a local (or NFS) folder or an s3:// prefix,
with the four operations the lease needs. The only write that decides anything is :meth:`_Store.create`,
a create-if-absent that is atomic on both stores; records are never rewritten, only deleted once replaced."""

from __future__ import annotations

import os
import uuid

import storage


class _Store:
    """List, create-if-absent, read and delete small objects under a local folder or an s3:// prefix."""

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
            self.dir = storage.filesystem(root)[1]  # file:// stripped, made absolute, as every writer reads it

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
        """Create ``name`` with ``body`` unless it exists; True when this call created it.

        The caller's ``body`` must be unique to the call (the lease's records hold the run's owner id and the
        time of the write): a failed answer is checked against it, because a request the store carried out
        can still be answered "exists" when its reply was lost and the request sent again."""
        if self.s3:
            from botocore.exceptions import ClientError

            try:
                self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=body, IfNoneMatch="*")
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") \
                        or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                    # botocore resends a put whose reply was lost (a reset connection, a 5xx from a proxy): when
                    # the first one was stored, the resend is answered 412 although the object is this call's
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
    """The generation numbers present, in increasing order (temporary files and other names skipped)."""
    gens = []
    for name in store.names():
        stem, dot, ext = name.partition(".")
        if ext == "json" and stem.isdigit():
            gens.append(int(stem))
    return sorted(gens)
