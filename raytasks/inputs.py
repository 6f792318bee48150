"""What goes into the label job: a folder or prefix listed by streaming, or a manifest, and the files' bytes.

Split from raytasks/label.py (the pipeline) along the line between *which files and how they are read* and
*what is done with them*. The rules (which files are inputs, how manifests are read, how paths resolve) are
described in raytasks/label.py's module docstring.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from facedata import storage

LISTING_CHUNK = 20_000  # paths per listing file (and at most this many paths in the driver at once)
MAX_FILE_BYTES = 256 * 1024 * 1024  # bigger files are an error row ("too_large") without being read whole
MANIFEST_SUFFIXES = (".parquet", ".csv")
FETCH_THREADS = 16  # concurrent reads per decode task (S3 latency)


class LabelError(ValueError):
    """A problem with the command (bad flag, missing input, cluster without the resources asked for)."""


# ------------------------------------------------------------------------------------------------------
# What counts as an image
# ------------------------------------------------------------------------------------------------------

def has_image_extension(path: str) -> bool:
    return path.lower().endswith(storage.IMAGE_EXTENSIONS)


def looks_like_image(head: bytes) -> bool:
    """Whether the first bytes of a file are the signature of an image format PIL decodes."""
    if head.startswith(b"\xff\xd8\xff") or head.startswith(b"\x89PNG\r\n\x1a\n"):
        return True
    if head[:6] in (b"GIF87a", b"GIF89a") or head[:4] in (b"II*\x00", b"MM\x00*"):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    # BMP: "BM" is common at the start of text, so also ask for a known DIB header size
    return head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124)


# ------------------------------------------------------------------------------------------------------
# Input: streaming listing of a folder or prefix, or a manifest
# ------------------------------------------------------------------------------------------------------

def iter_folder(uri: str) -> Iterator[str]:
    """Every non-hidden file under a local folder or ``s3://`` prefix, as a URI, streaming (sorted within
    each local directory; S3 lists keys in order)."""
    if storage.is_s3(uri):
        import boto3

        bucket, _, prefix = uri[len("s3://"):].partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        client = boto3.client("s3", endpoint_url=storage.s3_endpoint(),
                              region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", ()):
                key = obj["Key"]
                rel = key[len(prefix):]
                if key.endswith("/") or any(part.startswith(".") for part in rel.split("/")):
                    continue
                yield f"s3://{bucket}/{key}"
        return
    _, root = storage.filesystem(uri)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield os.path.join(dirpath, name)


def _read_head(uri: str, n: int = 32) -> bytes:
    fs, path = storage.filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            return f.read(n)
    except OSError:
        return b""  # unreadable: not known to be an image; a file with an image extension is always an input


@dataclasses.dataclass
class Listing:
    files: int = 0
    inputs: int = 0
    skipped_not_image: int = 0


def write_listing(input_uri: str, listing_uri: str, chunk: int = LISTING_CHUNK) -> Listing:
    """List ``input_uri`` into Parquet files of at most ``chunk`` paths under ``listing_uri`` (replaced).
    Files without an image extension are kept when their first bytes are an image signature (read
    concurrently, ``FETCH_THREADS`` at a time)."""
    fs, root = storage.filesystem(listing_uri)
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir_contents(root)
    fs.create_dir(root, recursive=True)
    stats = Listing()
    pending: list[str] = []
    part = 0

    def flush(paths: list[str]) -> None:
        nonlocal part
        unknown = [p for p in paths if not has_image_extension(p)]
        if unknown:
            with cf.ThreadPoolExecutor(FETCH_THREADS) as pool:
                heads = dict(zip(unknown, pool.map(_read_head, unknown)))
            keep = [p for p in paths if has_image_extension(p) or looks_like_image(heads[p])]
        else:
            keep = paths
        stats.skipped_not_image += len(paths) - len(keep)
        stats.inputs += len(keep)
        if keep:
            pq.write_table(pa.table({"path": pa.array(keep, pa.string())}),
                           f"{root}/part-{part:06d}.parquet", filesystem=fs)
            part += 1

    for uri in iter_folder(input_uri):
        stats.files += 1
        pending.append(uri)
        if len(pending) >= chunk:
            flush(pending)
            pending = []
    if pending:
        flush(pending)
    return stats


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


def manifest_rows(uri: str) -> int:
    """Rows of a manifest, streaming its ``path`` column (bounded memory). A row without a path is refused:
    the path is the row's identity for resuming."""
    import pyarrow.compute as pc

    fs, path = storage.filesystem(uri)
    if uri.lower().endswith(".parquet"):
        batches = pq.ParquetFile(fs.open_input_file(path)).iter_batches(columns=["path"], batch_size=1 << 16)
    else:
        import pyarrow.csv as pacsv

        batches = pacsv.open_csv(fs.open_input_stream(path), convert_options=pacsv.ConvertOptions(
            include_columns=["path"], column_types={"path": pa.string()}))
    n = empty = 0
    for batch in batches:
        col = batch.column(0).cast(pa.string())
        n += batch.num_rows
        empty += col.null_count + (pc.sum(pc.equal(col, "")).as_py() or 0)
    if empty:
        raise LabelError(f"manifest {uri}: {empty} of {n} rows have no path")
    return n


def check_manifest(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise LabelError(f"manifest not found: {uri}")
    if uri.lower().endswith(".parquet"):
        try:
            names = pq.read_schema(fs.open_input_file(path)).names
        except pa.ArrowInvalid as e:
            raise LabelError(f"{uri} is not a Parquet file ({e})") from None
    else:
        with fs.open_input_stream(path) as f:
            header = f.read(64 * 1024).split(b"\n", 1)[0].decode("utf-8", "replace")
        names = [c.strip().strip('"') for c in header.rstrip("\r").split(",")]
    if "path" not in names:
        raise LabelError(f"manifest {uri} has no 'path' column (columns: {', '.join(names) or 'none'})")


def resolve_path(path: str, base: str | None) -> str:
    """A manifest entry -> a readable URI: absolute paths and s3:// URIs as they are, relative paths
    against the manifest's folder."""
    if not path or not base or storage.is_s3(path) or path.startswith("file://") or os.path.isabs(path):
        return path
    return storage.join(base, path)



# ------------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------------

_POOL: cf.ThreadPoolExecutor | None = None


def _pool() -> cf.ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = cf.ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="label-fetch")
    return _POOL


def fetch(uri: str, max_bytes: int = MAX_FILE_BYTES) -> tuple[bytes | None, str | None, str | None]:
    """Read a file -> ``(bytes, None, None)`` or ``(None, error kind, message)``; never raises."""
    if not uri:
        return None, "unreadable", "empty path"
    try:
        fs, path = storage.filesystem(uri)
        with fs.open_input_stream(path) as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None, "unreadable", "file not found"
    except PermissionError:
        return None, "unreadable", "permission denied"
    except (OSError, ValueError, pa.ArrowException) as e:
        return None, "unreadable", f"{type(e).__name__}: {e}"
    if len(data) > max_bytes:
        return None, "too_large", f"file is over {max_bytes} bytes"
    return data, None, None


def fetch_all(uris: list[str]) -> list[tuple[bytes | None, str | None, str | None]]:
    """:func:`fetch` for every URI, ``FETCH_THREADS`` at a time, in order."""
    return list(_pool().map(fetch, uris))
