"""How the label job reads its input files: only regular files, the size checked before a byte is read,
confined to the allowed prefixes (facedata/paths.py), at most ``MAX_BATCH_BYTES`` per chunk, every stat and
read with a timeout on daemon threads. A file that cannot be read is an error row ``(None, kind, message)``;
nothing here raises. A read that failed for a reason of the moment (S3 throttling, a server error, a connection
reset or timed out, a read over its timeout: :func:`storage.is_transient`) is a ``transient`` row, which a later run may
read; a missing file, access denied and the like stay ``unreadable``.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import os
import re
import time
from collections.abc import Iterator

import pyarrow.fs as pafs

import storage
from facedata.paths import FORBIDDEN, Forbidden, is_allowed, local_path, open_local, storable

MAX_FILE_BYTES = 128 * 1024 * 1024  # bigger files are an error row ("too_large"), not read: see fetch
MAX_BATCH_BYTES = 256 * 1024 * 1024  # file bytes a decode task reads at once (fetch_chunks)
FETCH_TIMEOUT_S = 60.0  # each stat and read of a batch: a hung mount or endpoint is an error row, not a stuck task
FETCH_THREADS = 16  # concurrent reads per decode task (S3 latency)


class _DaemonPool:
    """A fixed set of daemon threads running submitted calls. Unlike ``ThreadPoolExecutor`` (whose threads
    are joined at interpreter exit), a read stuck on a hung filesystem cannot keep the process alive; after
    a timeout the pool is replaced (:func:`_pool`) and the old one retired, so stuck threads do not starve
    later reads, and every thread of the old pool exits once it is free (none waits forever on its queue)."""

    def __init__(self, n: int):
        import queue
        import threading

        self._n = n
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(n):
            threading.Thread(target=self._work, name=f"label-fetch-{i}", daemon=True).start()

    def _work(self) -> None:
        while True:
            item = self._q.get()
            if item is None:  # retired: this thread ends
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            fut.started_at = time.monotonic()  # read by gather: each call's own deadline runs from here
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                fut.set_exception(e)

    def submit(self, fn, *args) -> cf.Future:
        fut: cf.Future = cf.Future()
        fut.started_at = None
        self._q.put((lambda: fn(*args), fut))
        return fut

    def retire(self) -> None:
        """One stop per thread, behind the calls already queued: idle threads end now, stuck ones when
        their call returns."""
        for _ in range(self._n):
            self._q.put(None)


_POOL: _DaemonPool | None = None


def _pool(replace: bool = False) -> _DaemonPool:
    global _POOL
    if replace and _POOL is not None:
        _POOL.retire()
        _POOL = None
    if _POOL is None:
        _POOL = _DaemonPool(FETCH_THREADS)
    return _POOL


_MESSAGE_CHARS = 160
# pyarrow's S3 client refuses a key with an empty segment (ArrowInvalid "Empty path component"), though S3 holds
# such objects; no other client reads the photos, so such an object is an error row that says what to do
EMPTY_SEGMENT = ("S3 key with an empty segment ('//' or a leading '/'), which this job's S3 client cannot read: "
                 "copy the object to a key without it")


def _short(text: str) -> str:
    """A message for a row: valid UTF-8, at most :data:`_MESSAGE_CHARS` characters."""
    text = storable(str(text))
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS - 3] + "..."


TRANSIENT = "transient"  # the error kind of a read that failed for a reason of the moment, not of the file
AGAIN = "may succeed if run again"  # ends every transient row's message
_AWS = re.compile(r"^AWS Error (.+?) during (\w+) operation: ?")  # "S3 GetObject: SLOW_DOWN: ..." in a row: shorter


def transient(reason: str) -> tuple[None, str, str]:
    """The error row of a read that failed for a reason of the moment (:func:`storage.is_transient`); its message ends
    with :data:`AGAIN`, whatever the length of ``reason``."""
    tail = f" ({AGAIN})"
    return None, TRANSIENT, _short(reason)[:_MESSAGE_CHARS - len(tail)] + tail


def _detail(e: BaseException) -> str:
    """An exception's text; pyarrow's S3 errors without the object's name ("When reading information for key '…'
    in bucket '…': ") and as "S3 GetObject: SLOW_DOWN: Please reduce your request rate."."""
    if not isinstance(e, OSError) or e.strerror is not None:
        return str(e)
    return _AWS.sub(r"S3 \2: \1: ", storage.KEY_CONTEXT.sub("", str(e))).replace("; Details: ", "; ").rstrip(": ")


def _error(e: BaseException, uri: str = "") -> tuple[None, str, str]:
    """A read's exception -> an error row. Messages never echo the path (it is in the row already, and a
    5,000-character one would drown the reason)."""
    if isinstance(e, Forbidden):
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
    if storage.is_transient(e):
        return transient(_detail(e))
    if isinstance(e, OSError) and e.strerror:
        return None, "unreadable", _short(f"{type(e).__name__}: {e.strerror}")
    return None, "unreadable", _short(f"{type(e).__name__}: {_detail(e)}")


def _check_uri(uri: str) -> tuple[None, str, str] | None:
    """An error row for a URI that names no file whatever the filesystem holds, or that names an object this job
    cannot read (an S3 key with an empty segment: :data:`EMPTY_SEGMENT`), or None. Touches nothing."""
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
        if "//" in "/" + key.rstrip("/"):
            return None, "unreadable", EMPTY_SEGMENT
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
    """``(file, None)``: a regular file on a store (S3) opened for random access, or ``(None, error row)``.
    Opening an object is its one HEAD request (pyarrow's ``open_input_file``): ``file.size()`` is then known
    and no byte is read yet, so the size is checked before the one GET that reads it (:func:`_read_stored`). A
    missing key is looked up once more, on that miss only, to tell a "folder" (a prefix) from nothing."""
    fs, path = storage.filesystem(uri)
    try:
        return fs.open_input_file(path), None
    except FileNotFoundError:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            return None, (None, "unreadable", "not a regular file")
        return None, (None, "unreadable", "file not found")


def _opened(uri: str, allow, local, stored) -> tuple:
    """The one way a file is opened for :func:`file_size` and :func:`fetch`: a malformed or refused URI is its
    error row; a local file is opened confined (:func:`open_local`) and ``local(fd)`` answers (it closes
    ``fd``); a stored one (S3) is opened (:func:`_stored_file`) and ``stored(file)`` answers (it closes
    ``file``, or hands it on). Never raises."""
    bad = _refused(uri, allow)
    if bad is not None:
        return bad
    try:
        path = local_path(uri)
        if path is not None:
            return local(open_local(path, allow))
        f, bad = _stored_file(uri)
        return bad if bad is not None else stored(f)
    except Exception as e:  # noqa: BLE001 - never raises: any failure is this row's error
        return _error(e, uri)


def _fd_size(fd: int) -> tuple[int, None, None]:
    try:
        return os.fstat(fd).st_size, None, None
    finally:
        os.close(fd)


def file_size(uri: str, allow: tuple[str, ...] | None = None) -> tuple[int | None, str | None, str | None]:
    """``(size, None, None)`` of a regular file, or ``(None, kind, message)``; never raises, reads nothing.
    With ``allow``, a file outside those prefixes (:func:`is_allowed`; locally, also the file actually
    opened: :func:`open_local`) is :data:`FORBIDDEN`."""
    return _opened(uri, allow, _fd_size, _stored_size)


def _stored_size(f) -> tuple[int, None, None]:
    with f:
        return f.size(), None, None


def _sized(uri: str, allow: tuple[str, ...] | None) -> tuple:
    """:func:`file_size` plus, for an S3 object, the object opened (or None): ``(size, kind, message, file)``.
    :func:`fetch_chunks` reads the object through that file, so that its HEAD is made once, here."""
    res = _opened(uri, allow, lambda fd: (*_fd_size(fd), None), lambda f: (f.size(), None, None, f))
    return res if len(res) == 4 else (*res, None)


def _too_large(size: int | None, max_bytes: int) -> tuple[None, str, str]:
    if size is None:  # it grew after the size check
        return None, "too_large", f"file is over {max_bytes} bytes"
    return None, "too_large", f"file is {size} bytes, over the limit of {max_bytes}"


def _read_fd(fd: int, max_bytes: int) -> tuple[bytes | None, str | None, str | None]:
    """Size (``fstat``) and bytes from one open descriptor, which is closed."""
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            return _too_large(size, max_bytes)
        data = f.read(max_bytes + 1)
    return (data, None, None) if len(data) <= max_bytes else _too_large(None, max_bytes)


def _read_stored(f, max_bytes: int) -> tuple[bytes | None, str | None, str | None]:
    """The bytes of an S3 object opened by :func:`_stored_file`, which is closed: its size (known from the open's
    HEAD) checked first, then one GET of the whole object."""
    with f:
        size = f.size()
        if size > max_bytes:
            return _too_large(size, max_bytes)
        data = f.read(size + 1)  # pyarrow asks for at most the object's size, in one ranged GET
    return (data, None, None) if len(data) <= max_bytes else _too_large(None, max_bytes)


def fetch(uri: str, max_bytes: int = MAX_FILE_BYTES,
          allow: tuple[str, ...] | None = None) -> tuple[bytes | None, str | None, str | None]:
    """Read a file -> ``(bytes, None, None)`` or ``(None, error kind, message)``; never raises. Only regular
    files are read (a FIFO, ``/dev/zero`` or a directory is ``unreadable``), and the size is checked before
    reading: a file over ``max_bytes`` is ``too_large`` without a byte read.

    A local file is opened once; its size and bytes come from that descriptor. With ``allow``, a file
    outside those prefixes is :data:`FORBIDDEN`; locally the check is made on the opened descriptor too
    (:func:`open_local`), so swapping the name for a symlink while it is read does not reach outside. An S3
    object costs one HEAD (its size) and one GET (:func:`_stored_file`). A read that failed for a reason of the
    moment (S3 throttling, a 5xx, a connection reset or timed out: :func:`storage.is_transient`) is a ``transient`` row."""
    return _opened(uri, allow, lambda fd: _read_fd(fd, max_bytes), lambda f: _read_stored(f, max_bytes))


def gather(fn, uris: list[str], timeout: float) -> list:
    """``fn(uri)`` for every URI on the daemon pool, ``FETCH_THREADS`` at a time. Each call has ``timeout``
    seconds from when it starts, not from when the batch was handed in: a call still waiting for a thread is
    not timed out while the pool gets on (a call starts or ends), only when the pool made no progress for
    ``timeout`` seconds (every thread stuck). A call over its time is a ``transient`` "timed out" result: a hung
    mount or endpoint says nothing about the file, and the read may succeed when run again."""
    futures = [_pool().submit(fn, u) for u in uris]
    pending = set(futures)
    timed_out: set = set()
    progress = time.monotonic()  # the last time a call of this batch started or ended
    while pending:
        started = [f.started_at for f in futures if f.started_at is not None]
        progress = max([progress, *started])
        deadlines = [f.started_at + timeout for f in pending if f.started_at is not None]
        deadlines.append(progress + timeout)
        done, pending = cf.wait(pending, timeout=max(0.0, min(deadlines) - time.monotonic()),
                                return_when=cf.FIRST_COMPLETED)
        now = time.monotonic()
        if done:
            progress = now
        for f in list(pending):
            if now - (f.started_at if f.started_at is not None else progress) >= timeout:
                pending.discard(f)
                timed_out.add(f)
    if any(f.started_at is not None for f in timed_out):
        _pool(replace=True)  # the stuck threads stay stuck; later reads get fresh ones
    out = []
    for f in futures:
        if f in timed_out:
            f.cancel()  # a call that never started is skipped by the thread that takes it
            out.append(transient(f"read timed out after {timeout:g} s"))
        else:
            out.append(f.result())
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
    byte, not UTF-8, an ``s3://`` URI without bucket or key) or an S3 key with an empty segment (``a//b.jpg``:
    :data:`EMPTY_SEGMENT`) is an ``unreadable`` row; nothing raises. An S3 object costs one HEAD, made while
    the sizes are read (the object is opened then, and read through that file), and one GET."""
    uris = list(uris)
    sizes: list = [_check_uri(u) for u in uris]  # paths that name no file: an error row, nothing touched
    if allow is not None:
        for i, u in enumerate(uris):
            if sizes[i] is None and not is_allowed(u, allow):
                sizes[i] = (None, *FORBIDDEN)
    todo = [i for i in range(len(uris)) if sizes[i] is None]
    # an S3 object is opened once, here (its one HEAD), and read through that file in its chunk (its one GET)
    files: dict[int, object] = {}

    def read(i: int) -> tuple:
        f = files.pop(i, None)
        if f is None:
            return fetch(uris[i], max_bytes, allow)
        try:
            return _read_stored(f, max_bytes)
        except Exception as e:  # noqa: BLE001 - never raises: any failure is this row's error
            return _error(e, uris[i])

    try:
        for i, res in zip(todo, gather(lambda u: _sized(u, allow), [uris[i] for i in todo], timeout)):
            sizes[i] = res[:3]
            if len(res) == 4 and res[3] is not None:
                files[i] = res[3]
        chunk: list[int] = []
        held = 0
        errors: list[tuple[int, tuple]] = []
        for i, (size, kind, message) in enumerate(sizes):
            if kind is not None:
                errors.append((i, (None, kind, message)))
            elif size > max_bytes:
                errors.append((i, _too_large(size, max_bytes)))
            else:
                if chunk and held + size > max_batch_bytes:
                    yield list(zip(chunk, gather(read, chunk, timeout)))
                    chunk, held = [], 0
                chunk.append(i)
                held += size
        if chunk:
            yield list(zip(chunk, gather(read, chunk, timeout)))
        if errors:
            yield errors
    finally:  # files not read (too large, a read timed out before it began, the caller stopped early)
        for f in list(files.values()):
            f.close()


def fetch_all(uris: list[str], **kw) -> list[tuple[bytes | None, str | None, str | None]]:
    """:func:`fetch_chunks` gathered into one list, in order (holds every file of the batch at once)."""
    out: list = [None] * len(uris)
    for chunk in fetch_chunks(uris, **kw):
        for i, res in chunk:
            out[i] = res
    return out
