"""Which file a path names, and whether it may be read: the identity of a manifest entry
(:func:`normalize_path`), the ``--allow-prefix`` check on names (:func:`is_allowed`) and the confined open of
a local file (:func:`open_local`: ``O_NOFOLLOW``, checked again on the opened descriptor).

Split from facedata/inputs.py (what is listed) and facedata/reading.py (how it is read), which both use it.
"""

from __future__ import annotations

import os
import posixpath
import stat
from urllib.parse import unquote

import storage

MANIFEST_SUFFIXES = (".parquet", ".csv")


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


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


def resolve_path(path: str, base: str | None) -> str:
    """A manifest entry -> a readable URI: absolute paths and s3:// URIs as they are, relative paths
    against the manifest's folder."""
    if not path or not base or storage.is_s3(path) or path.startswith("file://") or os.path.isabs(path):
        return path
    return storage.join(base, path)


def normalize_path(path: str, base: str | None = None) -> str:
    """The identity of the file a manifest entry names: an ``s3://bucket/key`` URI with its dot segments removed
    (:func:`_s3_key`: ``a/./b`` and ``a/x/../b`` are ``a/b``, but ``a//b`` is another object), or a local
    absolute path (``os.path.normpath`` of the path resolved against ``base``, ``file://`` stripped). ``a.jpg``,
    ``./a.jpg`` and ``/abs/a.jpg`` in a manifest in ``/abs`` are one file. Symlinks are not resolved here
    (the allow-prefix check in :func:`fetch_chunks` resolves them; a look-up per path component of every row
    would cost a large table dearly).

    The one spelling of a file's key: the labelled data sets' readers use it too (facedata/datasets/mixed.py and manifest.py:
    a mix's one split per file, a manifest's split key of a file written several ways), so a file is one file
    to training, evaluation and the label job alike."""
    uri = resolve_path(path, base)
    if storage.is_s3(uri):
        bucket, _, key = uri[len("s3://"):].partition("/")
        return f"s3://{bucket}/{_s3_key(key)}"
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return os.path.normpath(os.path.abspath(uri))


def _s3_key(key: str) -> str:
    """An S3 key as the object it names: ``.`` and ``..`` segments removed, as HTTP clients remove them from a
    request's path (RFC 3986, 5.2.4: ``a/x/../b`` reaches ``a/b``), and a trailing ``/`` dropped. Nothing else:
    S3 keys are literal, so an empty segment is part of the key (``a//b.jpg`` and ``/b.jpg`` are other objects
    than ``a/b.jpg`` and ``b.jpg``; ``posixpath.normpath`` would merge them)."""
    out: list[str] = []
    for segment in (key.rstrip("/").split("/") if key.strip("/") else []):
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    return "/".join(out)


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
    surrogate, a link changing while it is read): the read then opens it confined (:func:`open_local`)."""
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


def local_path(uri: str) -> str | None:
    if storage.is_s3(uri):
        return None
    return os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


class Forbidden(Exception):
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


def open_local(path: str, allow=None) -> int:
    """An fd of a regular file, opened without blocking (a FIFO would block ``open`` forever) and checked
    with ``fstat`` on the opened file (no window between a check and the open).

    With ``allow``, the read is confined to those prefixes on the descriptor itself: the path is resolved
    (``realpath``), refused when that is outside, opened without following a final link (``O_NOFOLLOW``:
    a link swapped in since is ``ELOOP``), and the opened file's own path (``/proc/self/fd/N``) must be
    inside too (a folder swapped for a link since is caught there). Raises :class:`Forbidden`."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    roots = None
    if allow is not None:
        roots = _allowed_roots(allow)
        path = os.path.realpath(path)
        if not any(_under(path, r) for r in roots):
            raise Forbidden
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError("not a regular file")
        if roots is not None:
            where = _fd_path(fd, path, st)
            if where is None or not any(_under(where, r) for r in roots):
                raise Forbidden
    except BaseException:
        os.close(fd)
        raise
    return fd
