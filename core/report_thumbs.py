"""The report's contact sheet (core/report.py): thumbnails of flagged faces, cropped from the original
photos with each row's ``face_box``.

Photos are read the way the label job reads them (``facedata.reading.fetch_chunks``: only under the run's
``--allow-prefix``, regular files only,
size checked before reading, a timeout per read, at most :data:`MAX_CHUNK_BYTES` of files held at once)
and decoded with the project's limits (``models.imagebytes.open_image``: accepted formats only, pixel,
aspect, decode-memory and JPEG-scan limits checked on the header before any pixel; a large JPEG decoded
at a reduced DCT scale). Each photo is read and decoded once for all its flagged faces. A photo that
cannot be read or decoded (moved, deleted, not an image any more) gives a placeholder with the reason,
never an exception.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from facedata import reading
from models.imagebytes import ImageDecodeError, open_image
from models.photo import DEFAULT_PHOTO_SIDE

THUMB_PX = 128  # a thumbnail's longer side
MARGIN = 0.25  # of the box's size, added on each side of the face
MAX_CHUNK_BYTES = 64 * 1024 * 1024  # photo bytes held at once


@dataclass
class Thumb:
    path: str
    face: int | None
    reasons: list[str]
    jpeg: bytes | None = None  # None: see ``error``
    error: str | None = None

    @property
    def data_uri(self) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(self.jpeg or b"").decode()


def _crop(img, size: tuple[int, int], box, px: int) -> bytes:
    """The face (``box`` in original pixels; None: the whole image) with a margin, as a JPEG thumbnail."""
    from PIL import Image

    fx, fy = img.width / max(size[0], 1), img.height / max(size[1], 1)  # original -> decoded pixels
    if box is not None and len(box) == 4:
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


def thumbnails(rows: list[dict], px: int = THUMB_PX, max_side: int = DEFAULT_PHOTO_SIDE,
               allow: tuple[str, ...] = ()) -> list[Thumb]:
    """One :class:`Thumb` per row (``path``, ``face``, ``face_box``, ``review_reasons``), sorted by path
    and face. Only photos under ``allow`` (``facedata.paths.is_allowed``) are read: a ``path`` in the
    Parquet is data, and a report must not show a file the label job was never allowed to read. An empty
    ``allow`` reads nothing (every thumbnail says why)."""
    rows = sorted(rows, key=lambda r: (str(r.get("path")), r.get("face") if r.get("face") is not None else -1))
    by_path: dict[str, list[dict]] = {}
    for r in rows:
        by_path.setdefault(str(r.get("path")), []).append(r)
    paths = list(by_path)
    out: dict[str, list[Thumb]] = {}
    if not allow:
        return [Thumb(p, r.get("face"), list(r.get("review_reasons") or []),
                      error="photo not read: no --allow-prefix and the summary names no input")
                for p in paths for r in by_path[p]]
    for chunk in reading.fetch_chunks(paths, max_batch_bytes=MAX_CHUNK_BYTES, allow=tuple(allow)):
        for i, (data, kind, message) in chunk:
            path = paths[i]
            thumbs = [Thumb(path, r.get("face"), list(r.get("review_reasons") or [])) for r in by_path[path]]
            out[path] = thumbs
            if data is None:
                for t in thumbs:
                    t.error = f"photo not read: {kind}: {message}"
                continue
            try:
                img, size = open_image(data, draft_to=max_side)
            except ImageDecodeError as e:
                for t in thumbs:
                    t.error = f"photo not decoded: {e}"
                continue
            finally:
                del data
            for t, r in zip(thumbs, by_path[path]):
                try:
                    t.jpeg = _crop(img, size, r.get("face_box"), px)
                except (ValueError, OSError) as e:
                    t.error = f"no thumbnail: {e}"
            del img
    return [t for p in paths for t in out.get(p, [])]
