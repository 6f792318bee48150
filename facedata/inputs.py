"""What goes into the label job: a folder or prefix listed by streaming, or a manifest.

The rules (which files are inputs, how manifests are read, how paths resolve) are described in
raytasks/label/job.py's module docstring. Which file a path names and whether it may be read is
facedata/paths.py; reading the bytes is facedata/reading.py.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import os
import posixpath
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import storage
from facedata.paths import Forbidden, local_path, normalize_path, open_local, storable
from facedata.reading import FETCH_TIMEOUT_S, gather
from models.imagebytes import FOREIGN_EXTENSIONS, foreign_format

SKIPPED_EXTENSIONS_SHOWN = 10  # extensions of skipped files named in the summary
LISTING_CHUNK = 20_000  # paths per listing file (and at most this many paths in the driver at once)
MALFORMED_SHOWN = 5  # malformed manifest lines named (line number and text) in the summary
MALFORMED_TEXT_CHARS = 200  # of each such line's text


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


def _read_head(uri: str, n: int = 32, allow=None) -> bytes | None:
    """The first ``n`` bytes of a file; ``b""`` when it cannot be read; None when ``allow`` forbids it."""
    try:
        local = local_path(uri)
        if local is not None:
            # confined as the reads of the job are (a symlink out of the folder is not opened); a FIFO or
            # device is not read (would block)
            with os.fdopen(open_local(local, allow), "rb") as f:
                return f.read(n)
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            return f.read(n)
    except Forbidden:
        return None
    except (OSError, ValueError, pa.ArrowException):
        return b""  # unreadable: not known to be an image; a file with an image extension is always an input


@dataclasses.dataclass
class Listing:
    files: int = 0  # files in the folder, or rows of the manifest
    inputs: int = 0
    skipped_not_image: int = 0
    duplicates: int = 0  # manifest rows naming a file an earlier row already named
    malformed_lines: int = 0  # CSV manifest lines skipped: more or fewer fields than the header
    # the first MALFORMED_SHOWN of them: {"line": physical line number (1 is the header), "fields", "expected", "text"}
    malformed_examples: list = dataclasses.field(default_factory=list)
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

    def malformed_text(self) -> str:
        """``"2 manifest lines skipped, malformed (line 3: 3 fields, expected 2: 'b.jpg,2,x'; ...)"``, or ``""``."""
        if not self.malformed_lines:
            return ""
        shown = "; ".join(f"line {e['line']}: {e['fields']} fields, expected {e['expected']}: {e['text']!r}"
                          for e in self.malformed_examples)
        more = "; ..." if self.malformed_lines > len(self.malformed_examples) else ""
        s = "" if self.malformed_lines == 1 else "s"
        return f"{self.malformed_lines} manifest line{s} skipped, malformed ({shown}{more})"

    def malformed_line(self, row) -> str:
        """A ``pyarrow.csv`` ``invalid_row_handler``: the line is counted, named (the first few) and skipped."""
        self.malformed_lines += 1
        if len(self.malformed_examples) < MALFORMED_SHOWN:
            self.malformed_examples.append({"line": row.number, "fields": row.actual_columns,
                                            "expected": row.expected_columns,
                                            "text": row.text[:MALFORMED_TEXT_CHARS]})
        return "skip"


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


def write_listing(input_uri: str, listing_uri: str, chunk: int = LISTING_CHUNK,
                  allow: tuple[str, ...] | None = None) -> Listing:
    """List ``input_uri`` into Parquet files of at most ``chunk`` paths under ``listing_uri`` (replaced).
    Files without an image extension are kept when their first bytes are an image signature (read
    concurrently, ``FETCH_THREADS`` at a time, confined to ``allow`` as the job's reads are). A file that
    ``allow`` forbids (a symlink out of the folder) is not read: it is kept as an input, whose row is then
    ``forbidden`` as for a link out with an image extension, whatever its target holds and whether or not
    that exists (skipping it would claim to know it is not an image)."""
    out = _ListingParts(listing_uri)
    stats = Listing()
    pending: list[str] = []

    def flush(paths: list[str]) -> None:
        unknown = [p for p in paths if not has_image_extension(p)]
        if unknown:
            heads = dict(zip(unknown, gather(lambda u: _read_head(u, allow=allow), unknown, FETCH_TIMEOUT_S)))
            heads = {k: v if isinstance(v, bytes) or v is None else b"" for k, v in heads.items()}
            keep = [p for p in paths if has_image_extension(p) or heads[p] is None or looks_like_image(heads[p])]
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


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _path_column(batch, uri: str):
    """The ``path`` column of a manifest batch as text or bytes: other types (numbers) as text, a dictionary
    decoded; a type that has no text (a list, a struct) is an :class:`InputError`."""
    col = batch.column(0)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_binary_view(col.type):
        col = col.cast(pa.large_binary())  # lossless; the functions used on bytes here take this type
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or _is_bytes(col.type):
        return col
    try:
        return col.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(f"manifest {uri}: its 'path' column is {col.type}, not text") from None


def _batch_paths(batch, uri: str = "") -> list[str | None]:
    """The ``path`` column of a manifest record batch as text; values whose bytes are not UTF-8 (a binary
    column, or a Parquet string column written by a tool that did not check) are kept, with ``\\xNN``
    escapes (:func:`storable`); a binary column is decoded, not cast (a cast refuses such bytes)."""
    col = _path_column(batch, uri)
    if not _is_bytes(col.type):
        try:
            return col.to_pylist()
        except UnicodeDecodeError:
            col = col.cast(pa.large_binary())
    return [None if v is None else v.decode("utf-8", "backslashreplace") for v in col.to_pylist()]


class _EscapeNonUtf8:
    """A ``pyarrow.TransformInputStream`` function: the bytes of a CSV as UTF-8, a byte that is not UTF-8 as
    the text ``\\xNN`` (the escapes :func:`_batch_paths` gives a Parquet manifest's), a leading BOM dropped
    (``utf-8-sig``: Excel's "CSV UTF-8"). Why not pyarrow's own ``check_utf8=False``: it keeps such bytes in
    the values, but pyarrow cannot hand a malformed line holding one to the ``invalid_row_handler`` (it
    decodes the line strictly, and fails the whole read), so one Latin-1 line with an extra comma would
    refuse the manifest instead of being skipped and reported."""

    def __init__(self):
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")("backslashreplace")

    def __call__(self, buf) -> bytes:
        return self.decoder.decode(buf, len(buf) == 0).encode("utf-8")


def _open_csv(fs, path: str, listing: Listing | None = None, columns: list[str] | None = None):
    """``pyarrow.csv`` streaming reader of a CSV manifest; the header check (:func:`manifest_columns`) and the
    read of the paths both use it, so they agree on the column names (a BOM, spaces, quotes). A line with more
    or fewer fields than the header is skipped and counted in ``listing`` (:meth:`Listing.malformed_line`).
    ``use_threads=False``: only then does pyarrow know each line's number, which the report names."""
    import pyarrow.csv as pacsv

    stream = pa.TransformInputStream(fs.open_input_stream(path), _EscapeNonUtf8())
    handler = listing.malformed_line if listing is not None else (lambda row: "skip")
    convert = (pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns})
               if columns else None)
    return stream, pacsv.open_csv(stream, read_options=pacsv.ReadOptions(use_threads=False),
                                  parse_options=pacsv.ParseOptions(invalid_row_handler=handler),
                                  convert_options=convert)


def manifest_path_batches(uri: str, listing: Listing | None = None):
    """The ``path`` column of a Parquet or CSV manifest, streamed in record batches (bounded memory). A CSV
    line with more or fewer fields than the header is skipped and counted in ``listing``; a file that cannot
    be read as a manifest is an :class:`InputError` (raised while iterating)."""
    fs, path = storage.filesystem(uri)
    is_parquet = uri.lower().endswith(".parquet")
    try:
        if is_parquet:
            with fs.open_input_file(path) as f:
                yield from pq.ParquetFile(f).iter_batches(columns=["path"], batch_size=1 << 16)
        else:
            stream, reader = _open_csv(fs, path, listing, ["path"])
            with stream:
                yield from reader
    except pa.ArrowKeyError:  # no column named exactly "path" (check_manifest says so first in the job)
        _no_path_column(uri, manifest_columns(uri))
    except pa.ArrowInvalid as e:
        raise InputError(f"manifest {uri} cannot be read as {'Parquet' if is_parquet else 'CSV'}: {e}") from None


def manifest_rows(uri: str) -> int:
    """Rows of a manifest, streaming its ``path`` column (bounded memory). A row without a path is refused:
    the path is the row's identity for resuming."""
    import pyarrow.compute as pc

    n = empty = 0
    for batch in manifest_path_batches(uri):
        col = _path_column(batch, uri)
        col = col if _is_bytes(col.type) else col.cast(pa.large_binary())  # bytes: not decoded
        n += batch.num_rows
        empty += col.null_count + (pc.sum(pc.equal(pc.binary_length(col), 0)).as_py() or 0)
    if empty:
        raise InputError(f"manifest {uri}: {empty} of {n} rows have no path")
    return n


def manifest_columns(uri: str) -> list[str]:
    """The column names of a manifest, as the reader of its rows sees them (:func:`_open_csv` for a CSV)."""
    fs, path = storage.filesystem(uri)
    kind = "Parquet" if uri.lower().endswith(".parquet") else "CSV"
    try:
        if kind == "Parquet":
            with fs.open_input_file(path) as f:
                return pq.read_schema(f).names
        stream, reader = _open_csv(fs, path)
        with stream:
            return reader.schema.names
    except pa.ArrowInvalid as e:
        raise InputError(f"manifest {uri} is not a {kind} file ({e})") from None


def _no_path_column(uri: str, names: list[str]):
    shown = ", ".join(repr(n) for n in names) or "none"  # repr: a space or a quote in a name shows
    raise InputError(f"manifest {uri} has no 'path' column (columns: {shown}); the name must be exactly 'path'")


def check_manifest(uri: str) -> None:
    """Refuse a manifest that is missing, unreadable, or without a column named exactly ``path``."""
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise InputError(f"manifest not found: {uri}")
    names = manifest_columns(uri)
    if "path" not in names:
        _no_path_column(uri, names)


def write_manifest_listing(uri: str, listing_uri: str, base: str | None, chunk: int = LISTING_CHUNK) -> Listing:
    """Stream a manifest's ``path`` column into Parquet files of at most ``chunk`` paths under
    ``listing_uri`` (replaced), one row per distinct file (:func:`normalize_path`): later rows naming a
    file an earlier row named are counted in ``duplicates`` and dropped. A CSV line with more or fewer fields
    than the header is skipped, counted in ``malformed_lines`` and, the first few, named in
    ``malformed_examples`` (the job prints them): one bad line does not stop a run over a million good ones.
    A row keeps the path as written in its first occurrence (the ``path`` column of the output is documented
    as the manifest's value).
    A row without a path is refused (:class:`InputError`): the path is the row's identity for resuming.

    Memory: one 16-byte digest per distinct path in the driver (about 80 bytes with the set's overhead:
    80 MB for a million paths)."""
    import hashlib

    out = _ListingParts(listing_uri)
    stats, seen, pending, empty = Listing(), set(), [], 0
    batches = manifest_path_batches(uri, stats)

    def flush() -> None:
        nonlocal pending
        out.write(pending)
        pending = []

    for batch in batches:
        for p in _batch_paths(batch, uri):
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
