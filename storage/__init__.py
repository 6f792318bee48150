"""One way to reach bytes: a local path or an ``s3://`` URI, through ``pyarrow.fs``.

S3 settings come from the usual AWS environment (credentials chain, ``AWS_REGION``) plus
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for an S3-compatible endpoint (MinIO, moto's server in
the tests). The same filesystem object is what Ray Data is handed, so the jobs and the tests read and
write through one code path.
"""

from __future__ import annotations

import functools
import os
import posixpath
from collections.abc import Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


# Retries and timeouts of every S3 client the product makes, boto3's (:func:`s3_client`) and pyarrow's
# (:func:`_s3_filesystem`). S3 answers a burst of requests on one prefix with 503 SlowDown for seconds while it
# scales; botocore's and the AWS C++ SDK's default of 3 attempts gave up within about 2 s of such a burst (an
# audit with a fault-injecting proxy, 2026-12: a listing, a lease check, a read failed). 10 attempts with the
# SDKs' exponential backoff and jitter (botocore's "standard" mode: up to 1, 2, 4, 8, 16, 20... s for a throttling
# answer) ride out a burst of tens of seconds. "standard", not "adaptive": adaptive's client-side rate limiter is
# marked experimental by AWS and is per client, while here every Ray worker makes its own. AWS_MAX_ATTEMPTS,
# where set, is the number of attempts instead (for boto3 and pyarrow alike).
S3_MAX_ATTEMPTS = 10
S3_CONNECT_TIMEOUT_S = 10.0  # botocore's default is 60 s, the C++ SDK's 1 s
S3_READ_TIMEOUT_S = 60.0  # a silent connection, per socket read (a whole 96 MB object takes one request)


def s3_max_attempts() -> int:
    try:
        n = int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS)
    except ValueError:
        n = S3_MAX_ATTEMPTS
    return max(1, n)


def s3_client(max_attempts: int | None = None, connect_timeout: float = S3_CONNECT_TIMEOUT_S,
              read_timeout: float = S3_READ_TIMEOUT_S):
    """A boto3 S3 client on the endpoint and region of :func:`filesystem`, with the product's retry settings
    (``max_attempts``, default :func:`s3_max_attempts`; botocore's standard retry mode) and timeouts. Every boto3
    client the product makes comes from here."""
    import boto3
    from botocore.config import Config

    # total_max_attempts counts the first request too (botocore's max_attempts counts only the retries)
    config = Config(retries={"mode": "standard", "total_max_attempts": max_attempts or s3_max_attempts()},
                    connect_timeout=connect_timeout, read_timeout=read_timeout)
    return boto3.client("s3", endpoint_url=s3_endpoint(), config=config,
                        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))


from storage.errors import KEY_CONTEXT, is_transient  # noqa: E402,F401 - the one rule of what may pass if sent again


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None, max_attempts: int = S3_MAX_ATTEMPTS) -> pafs.S3FileSystem:
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
                    "connect_timeout": S3_CONNECT_TIMEOUT_S,
                    "request_timeout": S3_READ_TIMEOUT_S}  # pyarrow uses it on Windows and macOS only
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    kwargs["region"] = region or "us-east-1"
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path inside it)`` for a local path or an ``s3://bucket/key`` URI."""
    uri = str(uri)
    if is_s3(uri):
        # not urlparse: a key is literal text, and '#' or '?' in it are not a fragment or a query (urlparse
        # made "s3://b/x#/../photos/y" read "b/x" while the allow-prefix check saw "b/photos/y")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _s3_filesystem(s3_endpoint(), region, s3_max_attempts()), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3 URI."""
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The inverse of :func:`filesystem`: a path inside ``fs`` back to a user-facing URI."""
    if isinstance(fs, pafs.S3FileSystem):
        return f"s3://{path}"
    return path


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return read_all(fs, path)


def read_all(fs: pafs.FileSystem, path: str) -> bytes:
    """A whole file or S3 object, in one request after the HEAD that opening an object makes.

    Opened as a random-access file, whose size is known, so ``read()`` asks for all of it at once. A stream's
    ``read()`` with no size reads an S3 object in ranged GETs of 256 KB: 16 requests for 4 MB, 384 for a
    96 MB checkpoint, each a round trip to S3 (measured against moto's server on 2026-12-05: a 96 MB object in
    27 s that way, 0.25 s in one request: bench/bench_s3_read.py; tests/test_core.py counts the requests)."""
    with fs.open_input_file(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically where the filesystem allows it (local: temp file + rename; S3 PUT is atomic).

    The local temporary file is created next to the target with a random name, exclusively and without
    following a link (``O_CREAT | O_EXCL | O_NOFOLLOW``): a link planted at a predictable name cannot make
    the write land in another file. The file gets the usual permissions (``0o666`` less the umask)."""
    import secrets

    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        for _ in range(100):
            tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{secrets.token_hex(8)}")
            try:
                fd = os.open(tmp, flags, 0o666)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"no free temporary name next to {path}")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


class BoundedReadError(OSError):
    """A bounded read refused: not a regular file, over its size limit, or too slow."""


_READ_CHUNK = 1 << 20
# An S3 object is read in ranged GETs of this size: each chunk is one request (a round trip), and the chunk is
# how often an abandoned read checks that it should stop
_S3_READ_CHUNK = 16 << 20


def read_bounded(uri: str, max_bytes: int, timeout_s: float) -> bytes:
    """The bytes of a regular file or S3 object of at most ``max_bytes``, read within ``timeout_s`` seconds;
    for files whose name comes from configuration (checkpoints, model-set files and their members).

    Refuses (:class:`BoundedReadError`, an ``OSError``) a local path that is not a regular file (a FIFO is
    opened without blocking and refused at once; so are devices and folders), a file or object whose size is
    over ``max_bytes`` (before a byte is read; one that grows while read is cut at ``max_bytes + 1`` and
    refused) and a read not done within ``timeout_s`` (a hung mount or a slow endpoint: the read runs on a
    daemon thread that is abandoned and stops at its next chunk). A missing file is ``FileNotFoundError``."""
    import stat
    import threading

    box: dict = {}
    cancelled = threading.Event()

    def read_chunks(f, what: str, chunk: int = _READ_CHUNK) -> bytes:
        chunks, n = [], 0
        while n <= max_bytes:
            if cancelled.is_set():
                raise BoundedReadError(f"{what}: read abandoned")
            b = f.read(min(chunk, max_bytes + 1 - n))
            if not b:
                break
            chunks.append(b)
            n += len(b)
        if n > max_bytes:
            raise BoundedReadError(f"{what} is over the limit of {max_bytes} bytes (it grew while read)")
        return b"".join(chunks)

    def work() -> None:
        try:
            if is_s3(uri):
                fs, path = filesystem(uri)
                info = fs.get_file_info(path)
                if info.type == pafs.FileType.NotFound:
                    raise FileNotFoundError(f"{uri} not found")
                if info.type != pafs.FileType.File:
                    raise BoundedReadError(f"{uri} is not a regular file")
                if info.size is not None and info.size > max_bytes:
                    raise BoundedReadError(f"{uri} is {info.size} bytes, over the limit of {max_bytes}")
                with fs.open_input_file(path) as f:  # random access: one ranged GET a chunk
                    box["data"] = read_chunks(f, uri, _S3_READ_CHUNK)
                return
            _, path = filesystem(uri)
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise BoundedReadError(f"{uri} is not a regular file (a FIFO, device or folder is not read)")
                if st.st_size > max_bytes:
                    raise BoundedReadError(f"{uri} is {st.st_size} bytes, over the limit of {max_bytes}")
            except BaseException:
                os.close(fd)
                raise
            with os.fdopen(fd, "rb", buffering=0) as f:
                box["data"] = read_chunks(f, uri)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=work, name="read-bounded", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        cancelled.set()
        raise BoundedReadError(f"{uri}: read not done within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["data"]


def unwritable(uri: str) -> str | None:
    """Why :func:`write_bytes` could not write the local file ``uri`` (a folder there, the nearest existing parent
    a file or not writable), or None; nothing is created. An s3:// URI is None: only a write can tell."""
    if is_s3(uri):
        return None
    path = os.path.abspath(filesystem(uri)[1])
    if os.path.isdir(path):
        return "it is a folder (name the file to write)"
    parent = os.path.dirname(path)
    while not os.path.exists(parent):  # the folders write_bytes would make
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def iter_files(uri: str, extensions: tuple[str, ...] | None = None) -> Iterator[tuple[str, int]]:
    """Yield ``(uri, size)`` of every file under a folder or prefix, recursively, in sorted order per
    listing. ``extensions`` filters by lower-cased suffix. Hidden files (``.name``) are skipped."""
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=False)
    infos = fs.get_file_info(selector)
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File:
            continue
        if info.base_name.startswith("."):
            continue
        if extensions and not info.base_name.lower().endswith(extensions):
            continue
        yield to_uri(fs, info.path), info.size
