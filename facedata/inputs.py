"""What goes into the label job: a folder or prefix listed by streaming, or a manifest, and the files' bytes.

Split from raytasks/label/job.py (the pipeline) along the line between *which files and how they are read* and
*what is done with them*. The rules (which files are inputs, how manifests are read, how paths resolve) are
described in raytasks/label/job.py's module docstring.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import errno
import os
import posixpath
import stat
from collections.abc import Iterator
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from facedata import storage

LISTING_CHUNK = 20_000  # paths per listing file (and at most this many paths in the driver at once)
MAX_FILE_BYTES = 128 * 1024 * 1024  # bigger files are an error row ("too_large"), not read: see fetch
MAX_BATCH_BYTES = 256 * 1024 * 1024  # file bytes a decode task reads at once (fetch_chunks)
FETCH_TIMEOUT_S = 60.0  # each stat and read of a batch: a hung mount or endpoint is an error row, not a stuck task
MANIFEST_SUFFIXES = (".parquet", ".csv")
FETCH_THREADS = 16  # concurrent reads per decode task (S3 latency)


class InputError(ValueError):
    """An input that cannot be used as a whole: a manifest that is missing, not a table, or without paths."""


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
    try:
        local = _local_path(uri)
        if local is not None:
            with os.fdopen(_open_local(local), "rb") as f:  # a FIFO or device is not read (would block)
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
            heads = dict(zip(unknown, _gather(_read_head, unknown, FETCH_TIMEOUT_S)))
            heads = {k: v if isinstance(v, bytes) else b"" for k, v in heads.items()}
            keep = [p for p in paths if has_image_extension(p) or looks_like_image(heads[p])]
        else:
            keep = paths
        stats.skipped_not_image += len(paths) - len(keep)
        stats.inputs += len(keep)
        if keep:
            pq.write_table(pa.table({"path": pa.array([storable(p) for p in keep], pa.string())}),
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


def storable(path: str) -> str:
    """``path`` as valid UTF-8 text, for a Parquet string column: a file name whose bytes are not UTF-8
    (``os.walk`` gives them as surrogate escapes) or a lone surrogate is written with ``\\xNN`` (``\\uNNNN``)
    escapes. Such a row is then an ``unreadable`` row that says so (:func:`fetch`), not a listing that fails."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        try:
            return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return path.encode("utf-8", "backslashreplace").decode("utf-8")


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


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


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


def resolve_path(path: str, base: str | None) -> str:
    """A manifest entry -> a readable URI: absolute paths and s3:// URIs as they are, relative paths
    against the manifest's folder."""
    if not path or not base or storage.is_s3(path) or path.startswith("file://") or os.path.isabs(path):
        return path
    return storage.join(base, path)


def normalize_path(path: str, base: str | None = None) -> str:
    """The identity of the file a manifest entry names: an ``s3://bucket/key`` URI with ``.``, ``..`` and
    empty segments collapsed (``posixpath.normpath``: S3 keys are literal, but HTTP clients remove dot
    segments from the request path, so ``a/../b`` reaches ``b``), or a local absolute path
    (``os.path.normpath`` of the path resolved against ``base``, ``file://`` stripped). ``a.jpg``,
    ``./a.jpg`` and ``/abs/a.jpg`` in a manifest in ``/abs`` are one file. Symlinks are not resolved here
    (the allow-prefix check in :func:`fetch_chunks` resolves them)."""
    uri = resolve_path(path, base)
    if storage.is_s3(uri):
        bucket, _, key = uri[len("s3://"):].partition("/")
        key = posixpath.normpath("/" + key).lstrip("/") if key else ""
        return f"s3://{bucket}/{key}"
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return os.path.normpath(os.path.abspath(uri))


FORBIDDEN = ("forbidden", "path is outside the allowed prefixes (--allow-prefix)")


def default_allow_prefix(input_uri: str) -> str:
    """What a run may read when ``--allow-prefix`` is not given: the manifest's own folder or bucket prefix,
    or the input folder or prefix itself."""
    if is_manifest(input_uri):
        if storage.is_s3(input_uri):
            return posixpath.dirname(input_uri.rstrip("/")) + "/"
        return os.path.dirname(normalize_path(input_uri))
    return normalize_path(input_uri.rstrip("/") or "/") + ("/" if storage.is_s3(input_uri) else "")


def _real(uri: str) -> str:
    """``realpath`` of a local path; the path itself when it cannot be resolved (a NUL byte, a lone
    surrogate, a link changing while it is read): the read then opens it confined (:func:`_open_local`)."""
    if storage.is_s3(uri):
        return uri
    try:
        return os.path.realpath(uri)
    except (OSError, ValueError):
        return uri


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip(os.sep) + os.sep)


def _s3_decoded(norm: str) -> str:
    """An ``s3://`` URI with its key percent-decoded (until it no longer changes) and dot segments removed:
    what a server or proxy that decodes ``%2e%2e/`` before resolving the path would reach."""
    bucket, _, key = norm[len("s3://"):].partition("/")
    for _ in range(4):
        decoded = unquote(key)
        if decoded == key:
            break
        key = decoded
    return f"s3://{bucket}/" + posixpath.normpath("/" + key).lstrip("/")


def is_allowed(uri: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    """Whether ``uri`` (normalised; for local files also with symlinks resolved, so a link inside the
    folder to ``/etc/passwd`` is outside) lies under one of ``prefixes``. Decided from the names alone
    (``realpath`` reads links, never the file), so the answer for a path outside is the same whether or not
    that file exists. An S3 key must be inside both as written and percent-decoded (``%2e%2e/`` is ``..``
    to some servers). An empty path is never allowed. Never raises.

    This is the check on names; a local read is also confined on the descriptor it reads from
    (:func:`fetch` with ``allow``), so a link swapped in after this check does not escape."""
    if not uri:
        return False
    norm = normalize_path(uri)
    for prefix in prefixes:
        p = normalize_path(prefix)
        if storage.is_s3(p) != storage.is_s3(norm):
            continue
        if storage.is_s3(p):
            pre = p if p.endswith("/") else p + "/"  # "s3://b/photos" does not allow "s3://b/photos2/x"
            if norm.startswith(pre) and _s3_decoded(norm).startswith(pre):
                return True
            continue
        if _under(norm, p) and _under(_real(norm), _real(p)):
            return True
    return False


def write_manifest_listing(uri: str, listing_uri: str, base: str | None, chunk: int = LISTING_CHUNK) -> Listing:
    """Stream a manifest's ``path`` column into Parquet files of at most ``chunk`` paths under
    ``listing_uri`` (replaced), one row per distinct file (:func:`normalize_path`): later rows naming a
    file an earlier row named are counted in ``duplicates`` and dropped. A row keeps the path as written
    in its first occurrence (the ``path`` column of the output is documented as the manifest's value).
    A row without a path is refused (:class:`InputError`): the path is the row's identity for resuming.

    Memory: one 16-byte digest per distinct path in the driver (about 80 bytes with the set's overhead:
    80 MB for a million paths)."""
    import hashlib

    fs, root = storage.filesystem(listing_uri)
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir_contents(root)
    fs.create_dir(root, recursive=True)
    batches = manifest_path_batches(uri)
    stats, seen, pending, part, empty = Listing(), set(), [], 0, 0

    def flush() -> None:
        nonlocal part, pending
        pq.write_table(pa.table({"path": pa.array(pending, pa.string())}), f"{root}/part-{part:06d}.parquet",
                       filesystem=fs)
        part, pending = part + 1, []

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


# ------------------------------------------------------------------------------------------------------
# Reading files: size checked before reading, only regular files, bounded per batch, with a timeout
# ------------------------------------------------------------------------------------------------------

class _DaemonPool:
    """A fixed set of daemon threads running submitted calls. Unlike ``ThreadPoolExecutor`` (whose threads
    are joined at interpreter exit), a read stuck on a hung filesystem cannot keep the process alive; after
    a timeout the pool is replaced (:func:`_pool`), so stuck threads do not starve later reads."""

    def __init__(self, n: int):
        import queue
        import threading

        self._q: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(n):
            threading.Thread(target=self._work, name=f"label-fetch-{i}", daemon=True).start()

    def _work(self) -> None:
        while True:
            fn, fut = self._q.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                fut.set_exception(e)

    def submit(self, fn, *args) -> cf.Future:
        fut: cf.Future = cf.Future()
        self._q.put((lambda: fn(*args), fut))
        return fut


_POOL: _DaemonPool | None = None


def _pool(replace: bool = False) -> _DaemonPool:
    global _POOL
    if _POOL is None or replace:
        _POOL = _DaemonPool(FETCH_THREADS)
    return _POOL


def _local_path(uri: str) -> str | None:
    if storage.is_s3(uri):
        return None
    return os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


class _Forbidden(Exception):
    """A local read that resolved, or was opened, outside the allowed prefixes."""


def _allowed_roots(allow) -> tuple[str, ...]:
    """The real paths of the local prefixes of ``allow`` (a prefix that is itself a link is followed)."""
    return tuple(_real(normalize_path(p)) for p in allow if p and not storage.is_s3(p))


def _fd_path(fd: int, opened: str, st: os.stat_result) -> str | None:
    """The real path of the file open on ``fd``: ``/proc/self/fd/N`` where there is one; elsewhere ``opened``
    when it still names that very file (same device and inode) and has no link left in it; else None."""
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
        return where if where.startswith("/") and not where.endswith(" (deleted)") else None
    except OSError:
        pass
    try:
        now = os.stat(opened, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) and os.path.realpath(opened) == opened:
            return opened
    except (OSError, ValueError):
        pass
    return None


def _open_local(path: str, allow=None) -> int:
    """An fd of a regular file, opened without blocking (a FIFO would block ``open`` forever) and checked
    with ``fstat`` on the opened file (no window between a check and the open).

    With ``allow``, the read is confined to those prefixes on the descriptor itself: the path is resolved
    (``realpath``), refused when that is outside, opened without following a final link (``O_NOFOLLOW``:
    a link swapped in since is ``ELOOP``), and the opened file's own path (``/proc/self/fd/N``) must be
    inside too (a folder swapped for a link since is caught there). Raises :class:`_Forbidden`."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    roots = None
    if allow is not None:
        roots = _allowed_roots(allow)
        path = os.path.realpath(path)
        if not any(_under(path, r) for r in roots):
            raise _Forbidden
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError("not a regular file")
        if roots is not None:
            where = _fd_path(fd, path, st)
            if where is None or not any(_under(where, r) for r in roots):
                raise _Forbidden
    except BaseException:
        os.close(fd)
        raise
    return fd


_MESSAGE_CHARS = 160


def _short(text: str) -> str:
    """A message for a row: valid UTF-8, at most :data:`_MESSAGE_CHARS` characters."""
    text = storable(str(text))
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS - 3] + "..."


def _error(e: BaseException, uri: str = "") -> tuple[None, str, str]:
    """A read's exception -> an error row. Messages never echo the path (it is in the row already, and a
    5,000-character one would drown the reason)."""
    if isinstance(e, _Forbidden):
        return (None, *FORBIDDEN)
    if isinstance(e, FileNotFoundError):
        if "\\x" in uri or "\\u" in uri:
            return None, "unreadable", "file not found (a name that was not valid UTF-8 is written with \\xNN escapes)"
        return None, "unreadable", "file not found"
    if isinstance(e, NotADirectoryError):
        return None, "unreadable", "file not found (a parent is not a folder)"
    if isinstance(e, PermissionError):
        return None, "unreadable", "permission denied"
    if isinstance(e, IsADirectoryError):
        return None, "unreadable", "not a regular file"
    if isinstance(e, UnicodeError):
        return None, "unreadable", "path is not valid UTF-8"
    if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
        return None, "unreadable", "file name too long"
    if isinstance(e, OSError) and e.errno == errno.ELOOP:
        return None, "unreadable", "a symlink changed while the file was opened, or too many symlinks"
    if isinstance(e, ValueError) and "null" in str(e):
        return None, "unreadable", "path contains a NUL byte"
    if isinstance(e, OSError) and e.strerror:
        return None, "unreadable", _short(f"{type(e).__name__}: {e.strerror}")
    return None, "unreadable", _short(f"{type(e).__name__}: {e}")


def _check_uri(uri: str) -> tuple[None, str, str] | None:
    """An error row for a URI that names no file whatever the filesystem holds, or None. Touches nothing."""
    if not uri:
        return None, "unreadable", "empty path"
    if "\x00" in uri:
        return None, "unreadable", "path contains a NUL byte"
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:
        return None, "unreadable", "path is not valid UTF-8"
    if storage.is_s3(uri):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket or not key.strip("/"):
            return None, "unreadable", "not an s3://bucket/key URI"
    return None


def _refused(uri: str, allow: tuple[str, ...] | None) -> tuple[None, str, str] | None:
    """The error row of a URI that is malformed (:func:`_check_uri`) or, with ``allow``, outside those
    prefixes (:data:`FORBIDDEN`); None when it may be opened. Never raises."""
    bad = _check_uri(uri)
    if bad is not None:
        return bad
    try:
        if allow is not None and not is_allowed(uri, allow):
            return (None, *FORBIDDEN)
    except Exception as e:  # noqa: BLE001 - never raises: any failure is this row's error
        return _error(e, uri)
    return None


def _stored_file(uri: str):
    """``((filesystem, path, size), None)`` of a regular file on a store (S3), or ``(None, error row)``."""
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None, (None, "unreadable", "file not found")
    if info.type != pafs.FileType.File:
        return None, (None, "unreadable", "not a regular file")
    return (fs, path, info.size), None


def file_size(uri: str, allow: tuple[str, ...] | None = None) -> tuple[int | None, str | None, str | None]:
    """``(size, None, None)`` of a regular file, or ``(None, kind, message)``; never raises, reads nothing.
    With ``allow``, a file outside those prefixes (:func:`is_allowed`; locally, also the file actually
    opened: :func:`_open_local`) is :data:`FORBIDDEN`."""
    bad = _refused(uri, allow)
    if bad is not None:
        return bad
    try:
        local = _local_path(uri)
        if local is not None:
            fd = _open_local(local, allow)
            try:
                return os.fstat(fd).st_size, None, None
            finally:
                os.close(fd)
        obj, bad = _stored_file(uri)
        return bad if bad is not None else (obj[2], None, None)
    except Exception as e:  # noqa: BLE001 - never raises: any failure is this row's error
        return _error(e, uri)


def _read_fd(fd: int, max_bytes: int) -> tuple[bytes | None, str | None, str | None]:
    """Size (``fstat``) and bytes from one open descriptor, which is closed."""
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            return None, "too_large", f"file is {size} bytes, over the limit of {max_bytes}"
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew after the size check
        return None, "too_large", f"file is over {max_bytes} bytes"
    return data, None, None


def fetch(uri: str, max_bytes: int = MAX_FILE_BYTES,
          allow: tuple[str, ...] | None = None) -> tuple[bytes | None, str | None, str | None]:
    """Read a file -> ``(bytes, None, None)`` or ``(None, error kind, message)``; never raises. Only regular
    files are read (a FIFO, ``/dev/zero`` or a directory is ``unreadable``), and the size is checked before
    reading: a file over ``max_bytes`` is ``too_large`` without a byte read.

    A local file is opened once; its size and bytes come from that descriptor. With ``allow``, a file
    outside those prefixes is :data:`FORBIDDEN`; locally the check is made on the opened descriptor too
    (:func:`_open_local`), so swapping the name for a symlink while it is read does not reach outside."""
    bad = _refused(uri, allow)
    if bad is not None:
        return bad
    try:
        local = _local_path(uri)
        if local is not None:
            return _read_fd(_open_local(local, allow), max_bytes)
        obj, bad = _stored_file(uri)
        if bad is not None:
            return bad
        fs, path, size = obj
        if size is not None and size > max_bytes:
            return None, "too_large", f"file is {size} bytes, over the limit of {max_bytes}"
        with fs.open_input_stream(path) as f:
            data = f.read(max_bytes + 1)
    except Exception as e:  # noqa: BLE001 - never raises: any failure is this row's error
        return _error(e, uri)
    if len(data) > max_bytes:  # it grew after the size check
        return None, "too_large", f"file is over {max_bytes} bytes"
    return data, None, None


def _gather(fn, uris: list[str], timeout: float) -> list:
    """``fn(uri)`` for every URI on the daemon pool; a call not done within ``timeout`` seconds (of this
    batch's wait) is an ``unreadable`` "timed out" result."""
    futures = [_pool().submit(fn, u) for u in uris]
    done, pending = cf.wait(futures, timeout=timeout)
    if pending:
        _pool(replace=True)  # the stuck threads stay stuck; later reads get fresh ones
    out = []
    for f in futures:
        if f in done:
            out.append(f.result())
        else:
            f.cancel()
            out.append((None, "unreadable", f"read timed out after {timeout:g} s"))
    return out


def fetch_chunks(uris: list[str], max_bytes: int = MAX_FILE_BYTES, max_batch_bytes: int = MAX_BATCH_BYTES,
                 timeout: float = FETCH_TIMEOUT_S,
                 allow: tuple[str, ...] | None = None) -> Iterator[list[tuple[int, tuple]]]:
    """:func:`fetch` for every URI, ``FETCH_THREADS`` at a time, yielded in chunks of ``(index, result)``
    whose files add up to at most ``max_batch_bytes`` (one file over it goes alone): sizes are read first,
    so a batch of big files is read, and must be consumed, a chunk at a time. Every stat and every read
    has ``timeout`` seconds. With ``allow``, a URI outside those prefixes (:func:`is_allowed`) is never
    touched: its result is :data:`FORBIDDEN`, the same whether the file exists or not; a local file is also
    confined on the descriptor it is read from (:func:`fetch`). A path that names no file (empty, a NUL
    byte, not UTF-8, an ``s3://`` URI without bucket or key) is an ``unreadable`` row; nothing raises."""
    uris = list(uris)
    sizes: list = [_check_uri(u) for u in uris]  # paths that name no file: an error row, nothing touched
    if allow is not None:
        for i, u in enumerate(uris):
            if sizes[i] is None and not is_allowed(u, allow):
                sizes[i] = (None, *FORBIDDEN)
    todo = [i for i in range(len(uris)) if sizes[i] is None]
    for i, res in zip(todo, _gather(lambda u: file_size(u, allow), [uris[i] for i in todo], timeout)):
        sizes[i] = res
    chunk: list[int] = []
    held = 0
    errors: list[tuple[int, tuple]] = []
    for i, (size, kind, message) in enumerate(sizes):
        if kind is not None:
            errors.append((i, (None, kind, message)))
        elif size > max_bytes:
            errors.append((i, (None, "too_large", f"file is {size} bytes, over the limit of {max_bytes}")))
        else:
            if chunk and held + size > max_batch_bytes:
                yield list(zip(chunk, _gather(lambda u: fetch(u, max_bytes, allow), [uris[j] for j in chunk], timeout)))
                chunk, held = [], 0
            chunk.append(i)
            held += size
    if chunk:
        yield list(zip(chunk, _gather(lambda u: fetch(u, max_bytes, allow), [uris[j] for j in chunk], timeout)))
    if errors:
        yield errors


def fetch_all(uris: list[str], **kw) -> list[tuple[bytes | None, str | None, str | None]]:
    """:func:`fetch_chunks` gathered into one list, in order (holds every file of the batch at once)."""
    out: list = [None] * len(uris)
    for chunk in fetch_chunks(uris, **kw):
        for i, res in chunk:
            out[i] = res
    return out
