"""What goes into the label job: a folder or prefix listed by streaming, or a manifest.

The rules (which files are inputs, how manifests are read, how paths resolve) are described in
raytasks/label/job.py's module docstring. Reading a manifest is facedata/manifest_inputs.py (its names the job
uses are re-exported here); which file a path names and whether it may be read is facedata/paths.py; reading
the bytes is facedata/reading.py.
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
from facedata.manifest_inputs import (  # noqa: F401 - check_manifest, manifest_rows: the job's, as they were here
    InputError,
    batch_paths,
    check_manifest,
    manifest_columns,
    manifest_path_batches,
    manifest_rows,
)
from facedata.paths import Forbidden, is_allowed, local_path, normalize_path, open_local, storable
from facedata.reading import FETCH_TIMEOUT_S, gather
from models.imagebytes import FOREIGN_EXTENSIONS, foreign_format

SKIPPED_EXTENSIONS_SHOWN = 10  # extensions of skipped files named in the summary
LISTING_CHUNK = 20_000  # paths per listing file (and at most this many paths in the driver at once)
MALFORMED_SHOWN = 5  # malformed manifest lines named (line number and text) in the summary
MALFORMED_TEXT_CHARS = 200  # of each such line's text
HIDDEN_SHOWN = 3  # hidden files or folders skipped in a folder input, named in the summary


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


def iter_folder(uri: str, allow: tuple[str, ...] | None = None, hidden=None) -> Iterator[str]:
    """Every non-hidden file under a local folder or ``s3://`` prefix, as a URI, streaming (sorted within
    each local directory; S3 lists keys in order). Locally, ``allow`` says which symlinked folders are followed
    and an unlistable folder is an :class:`InputError` (:func:`_walk_local`).

    Hidden entries (a name starting with ``.``: ``.DS_Store``, macOS's ``._IMG_0001.jpg``, a ``.thumbnails/``
    folder) are not inputs: they are almost all system, sync or thumbnail files (error rows, duplicate faces).
    Nor are they skipped without a word: each is given to ``hidden`` by its name relative to ``uri``
    (:meth:`Listing.hidden_entry` counts them and keeps a few), so that a user whose photos sit under a hidden
    folder is told why they have no rows. Locally a hidden folder is not listed (it may be huge): it is one
    entry, named with a trailing ``/``. On S3 (a flat listing) each key with a segment under the prefix
    starting with ``.`` is one (a folder marker, a key ending in ``/``, is not). This costs no extra request."""
    if storage.is_s3(uri):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        for page in _s3_pages(uri, bucket, prefix):
            for obj in page.get("Contents", ()):
                key = obj["Key"]
                rel = key[len(prefix):]
                if key.endswith("/"):
                    continue
                if any(part.startswith(".") for part in rel.split("/")):
                    if hidden is not None:
                        hidden(rel)
                    continue
                yield f"s3://{bucket}/{key}"
        return
    yield from _walk_local(storage.filesystem(uri)[1], allow, hidden)


def _s3_pages(uri: str, bucket: str, prefix: str) -> Iterator[dict]:
    """The ``ListObjectsV2`` pages of ``prefix``, each request retried by the client (``storage.s3_client``).
    A request that still fails (S3 throttling past the retries, no access, no such bucket, the endpoint gone) is
    an :class:`InputError` naming the prefix, not a traceback: the run stops before labeling anything missed."""
    from botocore.exceptions import BotoCoreError, ClientError

    pages = None
    while True:
        try:
            if pages is None:
                pages = iter(storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                                          Prefix=prefix))
            page = next(pages)
        except StopIteration:
            return
        except (BotoCoreError, ClientError) as e:
            again = "it may pass" if storage.is_transient(e) else "fix that (access, the bucket's name)"
            raise InputError(f"cannot list {uri} ({type(e).__name__}: {e}): the files under it would be missing "
                             f"from the run; {again}, and run the same command again") from None
        yield page


def _walk_local(root: str, allow: tuple[str, ...] | None, hidden=None) -> Iterator[str]:
    """Every non-hidden file under a local folder, each folder's files sorted by name before its subfolders (the
    order of ``os.walk``). A folder that cannot be listed is an :class:`InputError` naming it (``os.walk`` skips
    it without a word, and its files would be missing from a run that says it is complete). A symlink to a
    folder is followed when ``allow`` allows the link (:func:`is_allowed`: the rule a symlinked file's read
    follows), and is listed as a file otherwise, whose row is then ``forbidden``. Each real folder is listed
    once: a link back up is no loop, and a folder reached two ways is listed under the first. ``hidden``: see
    :func:`iter_folder` (given names relative to ``root``, in the order of the walk)."""
    if hidden is not None:
        report, hidden = hidden, lambda path: report(path[len(root):].lstrip(os.sep))
    seen: set[str] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        files, folders = _folder_entries(folder, allow, hidden)
        yield from files
        stack.extend(reversed(folders))


def _folder_entries(folder: str, allow: tuple[str, ...] | None, hidden=None) -> tuple[list[str], list[str]]:
    """The non-hidden files of one folder (a symlink to a folder that is not followed among them) and the
    subfolders to list (:func:`_walk_local`), each sorted by name. Each hidden entry is given to ``hidden``
    (its path, with a trailing ``/`` for a folder, which is not listed), in order of name."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        return [], []  # removed while the folder above it was listed: nothing in it is an input any more
    except OSError as e:
        raise InputError(f"cannot list the folder {storable(folder)} ({e.strerror or e}): the files in it would be "
                         "missing from the run; make it readable, or move it out of the input, and run again") from None
    files, folders = [], []
    for e in entries:
        path = os.path.join(folder, e.name)
        if e.name.startswith("."):
            if hidden is not None:
                hidden(path + os.sep if _is_hidden_folder(e) else path)
        elif _is_folder(e) and (allow is None or not _is_link(e) or is_allowed(path, allow)):
            folders.append(path)
        else:
            files.append(path)
    return files, folders


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # a symlink to a folder too
    except OSError:
        return False  # as os.walk: listed as a file, whose row says why it cannot be read


def _is_hidden_folder(entry: os.DirEntry) -> bool:
    """Whether a hidden entry is a folder, from what ``os.scandir`` read already (a symlink is not followed)."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _is_link(entry: os.DirEntry) -> bool:
    try:
        return entry.is_symlink()
    except OSError:
        return True  # then followed only where allowed


def _read_head(uri: str, n: int = 32, allow=None) -> bytes | None:
    """The first ``n`` bytes of a file; ``b""`` when it cannot be read; None when ``allow`` forbids it (by name,
    :func:`is_allowed`, as the job's read would: a symlink to a folder outside is such a file too)."""
    if allow is not None and not is_allowed(uri, allow):
        return None
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
    # hidden files or folders skipped (iter_folder), the first HIDDEN_SHOWN named relative to the input ("x/" a folder)
    skipped_hidden: int = 0
    hidden_examples: list = dataclasses.field(default_factory=list)

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

    def hidden_entry(self, name: str) -> None:
        """A hidden file or folder that the listing skipped (:func:`iter_folder`): counted, the first few named."""
        self.skipped_hidden += 1
        if len(self.hidden_examples) < HIDDEN_SHOWN:
            self.hidden_examples.append(storable(name))

    def hidden_text(self) -> str:
        """``"3 hidden files or folders skipped (names starting with '.': .DS_Store, ._IMG_0001.jpg, .thumbnails/)"``,
        or ``""`` when none was."""
        if not self.skipped_hidden:
            return ""
        more = ", ..." if self.skipped_hidden > len(self.hidden_examples) else ""
        what = "file or folder" if self.skipped_hidden == 1 else "files or folders"
        return (f"{self.skipped_hidden} hidden {what} skipped (names starting with '.': "
                f"{', '.join(self.hidden_examples)}{more})")

    def malformed_text(self) -> str:
        """``"2 manifest lines skipped, malformed (line 3: 3 fields, expected 2: 'b.jpg,2,x'; ...)"``, or ``""``."""
        if not self.malformed_lines:
            return ""
        shown = "; ".join(f"line {e['line']}: {e['fields']} fields, expected {e['expected']}: {e['text']!r}"
                          for e in self.malformed_examples)
        more = "; ..." if self.malformed_lines > len(self.malformed_examples) else ""
        s = "" if self.malformed_lines == 1 else "s"
        return f"{self.malformed_lines} manifest line{s} skipped, malformed ({shown}{more})"

    def malformed_line(self, row, line: int) -> None:
        """A CSV line that ``pyarrow.csv``'s ``invalid_row_handler`` skipped (``row``), at ``line`` in the file:
        it is counted and named (the first few)."""
        self.malformed_lines += 1
        if len(self.malformed_examples) < MALFORMED_SHOWN:
            self.malformed_examples.append({"line": line, "fields": row.actual_columns,
                                            "expected": row.expected_columns,
                                            "text": row.text[:MALFORMED_TEXT_CHARS]})


class _ListingParts:
    """A listing folder (``listing_uri``, emptied first) and its ``part-NNNNNN.parquet`` files, one ``path``
    column each: what both listings write and raytasks/label reads. ``respell`` (the label job's, on a resume)
    maps a path to the spelling under which its file is labeled already (raytasks/label/output.py
    ``labeled_spellings``), so that the resume matches it; other paths are kept as they are."""

    def __init__(self, listing_uri: str, respell=None):
        self.respell = respell
        self.fs, self.root = storage.filesystem(listing_uri)
        if self.fs.get_file_info(self.root).type != pafs.FileType.NotFound:
            self.fs.delete_dir_contents(self.root)
        self.fs.create_dir(self.root, recursive=True)
        self.parts = 0

    def write(self, paths: list[str]) -> None:
        if self.respell is not None:
            paths = [self.respell(p) for p in paths]
        pq.write_table(pa.table({"path": pa.array(paths, pa.string())}),
                       f"{self.root}/part-{self.parts:06d}.parquet", filesystem=self.fs)
        self.parts += 1


def write_listing(input_uri: str, listing_uri: str, chunk: int = LISTING_CHUNK,
                  allow: tuple[str, ...] | None = None, respell=None) -> Listing:
    """List ``input_uri`` into Parquet files of at most ``chunk`` paths under ``listing_uri`` (replaced).
    Files without an image extension are kept when their first bytes are an image signature (read
    concurrently, ``FETCH_THREADS`` at a time, confined to ``allow`` as the job's reads are). A file that
    ``allow`` forbids (a symlink out of the folder) is not read: it is kept as an input, whose row is then
    ``forbidden`` as for a link out with an image extension, whatever its target holds and whether or not
    that exists (skipping it would claim to know it is not an image). Hidden files and folders are skipped, counted
    in ``skipped_hidden`` and the first few named (:func:`iter_folder`). A folder that cannot be listed, or two
    files that would be listed under one path (:func:`_stored_paths`), are an :class:`InputError`. ``respell``:
    see :class:`_ListingParts`."""
    out = _ListingParts(listing_uri, respell)
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
            out.write(_stored_paths(keep, escaped, input_uri))

    escaped: dict[str, str] = {}
    for uri in iter_folder(input_uri, allow, hidden=stats.hidden_entry):
        stats.files += 1
        pending.append(uri)
        if len(pending) >= chunk:
            flush(pending)
            pending = []
    if pending:
        flush(pending)
    return stats


def _stored_paths(paths: list[str], escaped: dict[str, str], input_uri: str) -> list[str]:
    """``paths`` as the listing stores them (:func:`storable`: a name that is not UTF-8 with ``\\xNN`` escapes),
    refusing (:class:`InputError`) two files stored alike, a name that is not UTF-8 and a file named with its
    escapes (their rows would share one path, and both would read the second file). Only a stored path holding a
    backslash can be one of such a pair, so only those are kept, in ``escaped`` (stored path -> file)."""
    out = []
    for p in paths:
        stored = storable(p)
        if "\\" in stored and escaped.setdefault(stored, p) != p:
            raise InputError(
                f"in {input_uri}, the files {os.fsencode(escaped[stored])!r} and {os.fsencode(p)!r} would both be "
                f"listed as '{stored}': a name that is not UTF-8 is written with \\xNN escapes, and the other file "
                "has that very name; rename the one whose name is not UTF-8 and run again")
        out.append(stored)
    return out


def write_manifest_listing(uri: str, listing_uri: str, base: str | None, chunk: int = LISTING_CHUNK,
                           respell=None) -> Listing:
    """Stream a manifest's ``path`` column into Parquet files of at most ``chunk`` paths under
    ``listing_uri`` (replaced), one row per distinct file (:func:`normalize_path`): later rows naming a
    file an earlier row named are counted in ``duplicates`` and dropped. A CSV line with more or fewer fields
    than the header is skipped, counted in ``malformed_lines`` and, the first few, named in
    ``malformed_examples`` (the job prints them): one bad line does not stop a run over a million good ones.
    A row keeps the path as written in its first occurrence (the ``path`` column of the output is documented
    as the manifest's value).
    A row without a path is refused (:class:`InputError`). On a resume, ``respell`` (:class:`_ListingParts`) gives
    a file labeled already under another spelling that spelling, so the resume matches it.

    Memory: one 16-byte digest per distinct path in the driver (about 80 bytes with the set's overhead:
    80 MB for a million paths)."""
    import hashlib

    out = _ListingParts(listing_uri, respell)
    stats, seen, pending, empty = Listing(), set(), [], 0
    batches = manifest_path_batches(uri, stats)

    def flush() -> None:
        nonlocal pending
        out.write(pending)
        pending = []

    for batch in batches:
        for p in batch_paths(batch, uri):
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
