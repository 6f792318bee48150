"""The report's contact sheet (core/report.py): thumbnails of flagged faces, cropped from the original
photos with each row's ``face_box``.

Photos are read the way the label job reads them (``facedata.reading.fetch_chunks``: only under the run's
``--allow-prefix``, regular files only,
size checked before reading, a timeout per read, at most :data:`MAX_CHUNK_BYTES` of files held at once)
and decoded with the project's limits (``models.imagebytes.open_image``: accepted formats only, pixel,
aspect, decode-memory and JPEG-scan limits checked on the header before any pixel; a large JPEG decoded
at a reduced DCT scale). Each photo is read and decoded once for all its flagged faces. A photo that
cannot be read or decoded (moved, deleted, not an image any more), a box that is not four finite numbers, or a
path longer than any file's gives a placeholder with the reason, never an exception.

Where photos may be read (:func:`allowed_photos`): the ``path`` column and the ``_summary.json`` next to it
are written by the same hand, so a summary's prefix is no more trusted than the paths: it is taken only when
it passes :func:`prefix_problem` (not a root, a top-level, system, hidden or home folder, nor a whole
bucket), the report says which prefix was used and from where, and ``--allow-prefix`` replaces it.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass

import storage
from core.report_scan import MAX_PATH_BYTES
from facedata import reading
from facedata.paths import _real, _s3_decoded, _under, default_allow_prefix, normalize_path
from models.imagebytes import ImageDecodeError, open_image
from models.photo import DEFAULT_PHOTO_SIDE

THUMB_PX = 128  # a thumbnail's longer side
MARGIN = 0.25  # of the box's size, added on each side of the face
MAX_CHUNK_BYTES = 64 * 1024 * 1024  # photo bytes held at once
MAX_BOX = 1e9  # of a face_box coordinate, in pixels: no photo is near it
MAX_ERROR_CHARS = 300  # of a placeholder's reason (a read error may quote the path)
MAX_PREFIXES = 16  # a summary's allow_prefix entries taken
# Folders whose files are the machine's, not a run's photos: a summary naming one (or a folder above it) is
# not followed. /var/lib and the like, not /var: data folders live under /var too.
SYSTEM = ("/etc", "/proc", "/sys", "/dev", "/boot", "/run", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
          "/libx32", "/var/lib", "/var/log", "/var/run", "/var/spool", "/var/mail", "/var/cache", "/snap")


def prefix_problem(prefix) -> str | None:
    """Why a prefix read from a summary is not taken as where photos may be read, or None: not a path, a
    relative one (relative to where the report runs, not the run), the filesystem root or a folder at its
    top, one inside a hidden folder (``~/.ssh``) or under :data:`SYSTEM`, the user's home folder or one above
    it, or a whole bucket. Checked as written and with links resolved (a link in the output to ``/`` is
    ``/``)."""
    if not isinstance(prefix, str) or not prefix or len(prefix) > MAX_PATH_BYTES or "\x00" in prefix:
        return "not a path"
    if storage.is_s3(prefix):
        bucket, _, key = _s3_decoded(normalize_path(prefix))[len("s3://"):].partition("/")
        return None if bucket and key.strip("/") else "a whole bucket"
    if not _absolute(prefix):
        return "not an absolute path"
    home = os.path.realpath(os.path.expanduser("~"))
    norm = normalize_path(prefix)
    for p in (norm, _real(norm)):
        parts = [c for c in p.split("/") if c]
        if len(parts) < 2:
            return "the filesystem root or a folder at its top"
        if any(c.startswith(".") for c in parts):
            return "inside a hidden folder"
        if any(_under(p, d) for d in SYSTEM):
            return "a system folder"
        if _under(home, p):
            return "the home folder or a folder above it"
    return None


def _absolute(path: str) -> bool:
    return (path[len("file://"):] if path.startswith("file://") else path).startswith("/")


def allowed_photos(summary: dict, allow: tuple[str, ...] = ()) -> tuple[tuple[str, ...], str]:
    """Where the contact sheet may read photos, and a sentence saying so (or why nowhere): ``allow`` when
    given (``--allow-prefix``); else what the label run was allowed to read (its summary's ``allow_prefix``,
    or the default for its ``input``) when every such prefix passes :func:`prefix_problem` (a relative
    ``input`` is refused as written, never resolved against where the report runs); else nowhere."""
    if allow:
        return tuple(allow), f"photos read only under {', '.join(allow)} (--allow-prefix)"
    recorded, inp = summary.get("allow_prefix"), summary.get("input")
    if isinstance(recorded, list) and recorded:
        source, found = "allow_prefix", recorded[:MAX_PREFIXES]
    elif isinstance(inp, str) and inp:
        source, found = "input", [inp]
        # a relative input names a folder of the run's machine and working directory, not of the reader's:
        # made absolute here, "." or "Private" would be the report's working directory (audit), so refused as is
        if storage.is_s3(inp) or _absolute(inp):
            try:
                found = [default_allow_prefix(inp[:MAX_PATH_BYTES + 1])]
            except (ValueError, OSError):
                pass
    else:
        return (), ("no thumbnails: the summary names no input and no --allow-prefix was given (pass the folder "
                    "or s3:// prefix the photos are under)")
    for p in found:
        why = prefix_problem(p)
        if why:
            return (), (f"no thumbnails: the summary's {source} {str(p)[:200]!r} is {why}, so no photo is read "
                        "(pass --allow-prefix with the folder or s3:// prefix the photos are under)")
    return tuple(found), (f"photos read only under {', '.join(found)}: the summary's {source} (pass "
                          "--allow-prefix to choose)")


@dataclass
class Thumb:
    path: str
    face: int | None
    reasons: list[str]
    jpeg: bytes | None = None  # None: see ``error``
    error: str | None = None
    row: str = ""  # "FILE row N": where the row is, whatever its path says

    @property
    def data_uri(self) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(self.jpeg or b"").decode()


def _crop(img, size: tuple[int, int], box, px: int) -> bytes:
    """The face (``box`` in original pixels; None: the whole image) with a margin, as a JPEG thumbnail."""
    from PIL import Image

    fx, fy = img.width / max(size[0], 1), img.height / max(size[1], 1)  # original -> decoded pixels
    if box is not None:  # None: a whole-image row
        # inf, nan or 1e308 has no pixel (int(inf) is an OverflowError; 1e308 - -1e308 is inf)
        if len(box) != 4 or not all(isinstance(v, (int, float)) and abs(v) <= MAX_BOX for v in box):
            raise ValueError(f"face_box {str(box)[:100]} is not four numbers of photo pixels")
        x1, y1, x2, y2 = (float(v) for v in box)
        mx, my = MARGIN * (x2 - x1), MARGIN * (y2 - y1)
        region = (max(0, int((x1 - mx) * fx)), max(0, int((y1 - my) * fy)),
                  min(img.width, int(round((x2 + mx) * fx))), min(img.height, int(round((y2 + my) * fy))))
        if region[2] - region[0] < 1 or region[3] - region[1] < 1:
            raise ValueError(f"face_box {box} is outside the {size[0]}x{size[1]} photo")
        img = img.crop(region)
    img = img.convert("RGB")
    scale = px / max(img.width, img.height)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _thumb(r: dict, error: str | None = None) -> Thumb:
    reasons = [str(x) for x in (r.get("review_reasons") or []) if x is not None]  # a null item is no reason
    return Thumb(r.get("path") or "", r.get("face"), reasons, error=error and error[:MAX_ERROR_CHARS],
                 row=r.get("row", ""))


def thumbnails(rows: list[dict], px: int = THUMB_PX, max_side: int = DEFAULT_PHOTO_SIDE,
               allow: tuple[str, ...] = (), why_not: str = "no folder to read photos from") -> list[Thumb]:
    """One :class:`Thumb` per row (``path``, ``path_bytes``, ``face``, ``face_box``, ``review_reasons``,
    ``row``: core/report_scan.py's flagged rows), sorted by path and face. Only photos under ``allow``
    (``facedata.paths.is_allowed``; :func:`allowed_photos`) are read: a ``path`` in the Parquet is data, and a
    report must not show a file the label job was never allowed to read. An empty ``allow`` reads nothing
    (every thumbnail says ``why_not``); nor does a path cut short by the scan (longer than any file's)."""
    rows = sorted(rows, key=lambda r: (r.get("path") or "", r.get("face") if r.get("face") is not None else -1))
    by_path: dict[str, list[dict]] = {}
    for r in rows:
        by_path.setdefault(r.get("path") or "", []).append(r)
    out: dict[str, list[Thumb]] = {}
    readable = []
    for path, rs in by_path.items():
        n = rs[0].get("path_bytes") or 0
        error = ("no path" if not path else
                 f"photo not read: its path is {n} bytes, longer than any file's" if n > MAX_PATH_BYTES else
                 None if allow else f"photo not read: {why_not}")
        if error:
            out[path] = [_thumb(r, error) for r in rs]
        else:
            readable.append(path)
    for chunk in reading.fetch_chunks(readable, max_batch_bytes=MAX_CHUNK_BYTES, allow=tuple(allow)) if readable else ():
        for i, (data, kind, message) in chunk:
            path = readable[i]
            thumbs = [_thumb(r) for r in by_path[path]]
            out[path] = thumbs
            if data is None:
                for t in thumbs:
                    t.error = f"photo not read: {kind}: {message}"[:MAX_ERROR_CHARS]
                continue
            try:
                img, size = open_image(data, draft_to=max_side)
            except ImageDecodeError as e:
                for t in thumbs:
                    t.error = f"photo not decoded: {e}"[:MAX_ERROR_CHARS]
                continue
            finally:
                del data
            for t, r in zip(thumbs, by_path[path]):
                try:
                    t.jpeg = _crop(img, size, r.get("face_box"), px)
                except (ValueError, OSError) as e:
                    t.error = f"no thumbnail: {e}"[:MAX_ERROR_CHARS]
            del img
    return [t for p in by_path for t in out.get(p, [])]
