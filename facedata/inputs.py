"""What goes into the label job: a folder or prefix listed by streaming, or a manifest.

The rules (which files are inputs, how manifests are read, how paths resolve) are described in
raytasks/label/job.py's module docstring. Which file a path names and whether it may be read is
facedata/paths.py; reading the bytes is facedata/reading.py.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import posixpath
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import storage
from facedata.paths import local_path, normalize_path, open_local, storable
from facedata.reading import FETCH_TIMEOUT_S, gather
from models.imagebytes import FOREIGN_EXTENSIONS, foreign_format

SKIPPED_EXTENSIONS_SHOWN = 10  # extensions of skipped files named in the summary
LISTING_CHUNK = 20_000  # paths per listing file (and at most this many paths in the driver at once)


class InputError(ValueError):
    """An input that cannot be used as a whole: a manifest that is missing, not a table, or without paths."""


def has_image_extension(path: str) -> bool:
    """An extension of a format we decode (``storage.IMAGE_EXTENSIONS``) or of a photo format we do not
    (``FOREIGN_EXTENSIONS``: HEIC, AVIF, RAW, ...; such a file is an input that becomes an error row naming its
    format, not a file skipped without a word)."""
    return path.lower().endswith(storage.IMAGE_EXTENSIONS) or _extension(path) in FOREIGN_EXTENSIONS


def _extension(path: str) -> str:
    """``.jpg`` for ``a/b.JPG``; ``""`` for a name without one."""
    return posixpath.splitext(path)[1].lower()


def looks_like_image(head: bytes) -> bool:
    """Whether the first bytes of a file are the signature of an image format PIL decodes here, or of a photo
    format it does not (``models.imagebytes.foreign_format``: its file gets an error row naming the format)."""
    if foreign_format(head):
        return True
    if head.startswith(b"\xff\xd8\xff") or head.startswith(b"\x89PNG\r\n\x1a\n"):
        return True
    if head[:6] in (b"GIF87a", b"GIF89a") or head[:4] in (b"II*\x00", b"MM\x00*"):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    # BMP: "BM" is common at the start of text, so also ask for a known DIB header size
    return head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124)


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
    try:
        local = local_path(uri)
        if local is not None:
            with os.fdopen(open_local(local), "rb") as f:  # a FIFO or device is not read (would block)
                return f.read(n)
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            return f.read(n)
    except (OSError, ValueError, pa.ArrowException):
        return b""  # unreadable: not known to be an image; a file with an image extension is always an input


@dataclasses.dataclass
class Listing:
    files: int = 0  # files in the folder, or rows of the manifest
    inputs: int = 0
    skipped_not_image: int = 0
    duplicates: int = 0  # manifest rows naming a file an earlier row already named
    # the skipped files by extension ("" for none), the most common SKIPPED_EXTENSIONS_SHOWN of them
    skipped_by_extension: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def skipped_extensions(self) -> dict[str, int]:
        return dict(self.skipped_by_extension.most_common(SKIPPED_EXTENSIONS_SHOWN))

    def skipped_text(self) -> str:
        """``"3 files skipped, not images (.txt 2, .mov 1)"``, or ``""`` when none was."""
        if not self.skipped_not_image:
            return ""
        shown = ", ".join(f"{e or '(no extension)'} {n}" for e, n in self.skipped_extensions().items())
        more = ", ..." if len(self.skipped_by_extension) > SKIPPED_EXTENSIONS_SHOWN else ""
        s = "" if self.skipped_not_image == 1 else "s"
        return f"{self.skipped_not_image} file{s} skipped, not images ({shown}{more})"


class _ListingParts:
    """A listing folder (``listing_uri``, emptied first) and its ``part-NNNNNN.parquet`` files, one ``path``
    column each: what both listings write and raytasks/label reads."""

    def __init__(self, listing_uri: str):
        self.fs, self.root = storage.filesystem(listing_uri)
        if self.fs.get_file_info(self.root).type != pafs.FileType.NotFound:
            self.fs.delete_dir_contents(self.root)
        self.fs.create_dir(self.root, recursive=True)
        self.parts = 0

    def write(self, paths: list[str]) -> None:
        pq.write_table(pa.table({"path": pa.array(paths, pa.string())}),
                       f"{self.root}/part-{self.parts:06d}.parquet", filesystem=self.fs)
        self.parts += 1


def write_listing(input_uri: str, listing_uri: str, chunk: int = LISTING_CHUNK) -> Listing:
    """List ``input_uri`` into Parquet files of at most ``chunk`` paths under ``listing_uri`` (replaced).
    Files without an image extension are kept when their first bytes are an image signature (read
    concurrently, ``FETCH_THREADS`` at a time)."""
    out = _ListingParts(listing_uri)
    stats = Listing()
    pending: list[str] = []

    def flush(paths: list[str]) -> None:
        unknown = [p for p in paths if not has_image_extension(p)]
        if unknown:
            heads = dict(zip(unknown, gather(_read_head, unknown, FETCH_TIMEOUT_S)))
            heads = {k: v if isinstance(v, bytes) else b"" for k, v in heads.items()}
            keep = [p for p in paths if has_image_extension(p) or looks_like_image(heads[p])]
        else:
            keep = paths
        stats.skipped_not_image += len(paths) - len(keep)
        if len(keep) < len(paths):
            kept = set(keep)
            stats.skipped_by_extension.update(_extension(p) for p in paths if p not in kept)
        stats.inputs += len(keep)
        if keep:
            out.write([storable(p) for p in keep])

    for uri in iter_folder(input_uri):
        stats.files += 1
        pending.append(uri)
        if len(pending) >= chunk:
            flush(pending)
            pending = []
    if pending:
        flush(pending)
    return stats


def _batch_paths(batch) -> list[str | None]:
    """The ``path`` column of a manifest record batch as text; values whose bytes are not UTF-8 (a CSV, or a
    Parquet file written by a tool that did not check) are kept, with ``\\xNN`` escapes (:func:`storable`)."""
    col = batch.column(0)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    try:
        return col.to_pylist()
    except UnicodeDecodeError:
        return [None if v is None else v.decode("utf-8", "backslashreplace")
                for v in col.cast(pa.large_binary()).to_pylist()]


def manifest_path_batches(uri: str):
    """The ``path`` column of a Parquet or CSV manifest, streamed in record batches (bounded memory)."""
    fs, path = storage.filesystem(uri)
    if uri.lower().endswith(".parquet"):
        return pq.ParquetFile(fs.open_input_file(path)).iter_batches(columns=["path"], batch_size=1 << 16)
    import pyarrow.csv as pacsv

    return pacsv.open_csv(fs.open_input_stream(path), convert_options=pacsv.ConvertOptions(
        include_columns=["path"], column_types={"path": pa.string()}, check_utf8=False))  # see _batch_paths


def manifest_rows(uri: str) -> int:
    """Rows of a manifest, streaming its ``path`` column (bounded memory). A row without a path is refused:
    the path is the row's identity for resuming."""
    import pyarrow.compute as pc

    n = empty = 0
    for batch in manifest_path_batches(uri):
        col = batch.column(0)
        col = col.cast(pa.large_binary() if pa.types.is_string(col.type) else pa.string())  # not decoded
        n += batch.num_rows
        empty += col.null_count + (pc.sum(pc.equal(pc.binary_length(col), 0)).as_py() or 0)
    if empty:
        raise InputError(f"manifest {uri}: {empty} of {n} rows have no path")
    return n


def check_manifest(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise InputError(f"manifest not found: {uri}")
    if uri.lower().endswith(".parquet"):
        try:
            names = pq.read_schema(fs.open_input_file(path)).names
        except pa.ArrowInvalid as e:
            raise InputError(f"{uri} is not a Parquet file ({e})") from None
    else:
        with fs.open_input_stream(path) as f:
            header = f.read(64 * 1024).split(b"\n", 1)[0].decode("utf-8", "replace")
        names = [c.strip().strip('"') for c in header.rstrip("\r").split(",")]
    if "path" not in names:
        raise InputError(f"manifest {uri} has no 'path' column (columns: {', '.join(names) or 'none'})")


def write_manifest_listing(uri: str, listing_uri: str, base: str | None, chunk: int = LISTING_CHUNK) -> Listing:
    """Stream a manifest's ``path`` column into Parquet files of at most ``chunk`` paths under
    ``listing_uri`` (replaced), one row per distinct file (:func:`normalize_path`): later rows naming a
    file an earlier row named are counted in ``duplicates`` and dropped. A row keeps the path as written
    in its first occurrence (the ``path`` column of the output is documented as the manifest's value).
    A row without a path is refused (:class:`InputError`): the path is the row's identity for resuming.

    Memory: one 16-byte digest per distinct path in the driver (about 80 bytes with the set's overhead:
    80 MB for a million paths)."""
    import hashlib

    out = _ListingParts(listing_uri)
    batches = manifest_path_batches(uri)
    stats, seen, pending, empty = Listing(), set(), [], 0

    def flush() -> None:
        nonlocal pending
        out.write(pending)
        pending = []

    for batch in batches:
        for p in _batch_paths(batch):
            stats.files += 1
            if not p:
                empty += 1
                continue
            digest = hashlib.blake2b(normalize_path(p, base).encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if digest in seen:
                stats.duplicates += 1
                continue
            seen.add(digest)
            pending.append(p)
            stats.inputs += 1
            if len(pending) >= chunk:
                flush()
    if empty:
        raise InputError(f"manifest {uri}: {empty} of {stats.files} rows have no path")
    if pending:
        flush()
    return stats
