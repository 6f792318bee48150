"""The images and photos the tests are made of: single images (faces, odd and broken files), photos with several
real or drawn faces pasted at known places, training photos, and the drawn faces the detector tests paste. Built
in memory, never copied from ../shared/data into the project."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import SHARED


# --- single images ----------------------------------------------------------------------------------------
def face_jpeg(i: int, size=(56, 56)) -> bytes:
    """A drawn face (seeded by ``i``) as JPEG bytes."""
    from facedata.draw import draw_face
    from facedata.synth import encode_jpeg

    return encode_jpeg(draw_face(np.random.default_rng([7, i]), size)[0])


def png_bytes(img: Image.Image | None = None) -> bytes:
    """``img`` (default: an 8x8 RGB square) as PNG bytes."""
    img = img if img is not None else Image.new("RGB", (8, 8), (10, 20, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def huge_png(w: int = 10_000, h: int = 10_000) -> bytes:
    """A PNG whose header says w x h (over the 40 MP limit); only the header is ever read."""
    data = bytearray(png_bytes(Image.new("L", (8, 8))))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", w, h)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def odd_images() -> dict[str, bytes]:
    """Formats that must be labeled correctly (CMYK JPEG, 16-bit and palette PNG, no extension)."""
    from facedata.draw import draw_face

    face = draw_face(np.random.default_rng([7, 999]), (56, 56))[0]
    cmyk = io.BytesIO()
    face.convert("CMYK").save(cmyk, format="JPEG")
    grey16 = Image.fromarray(np.asarray(face.convert("L"), dtype=np.uint16) * 257)
    return {"odd/cmyk.jpg": cmyk.getvalue(), "odd/grey16.png": png_bytes(grey16),
            "odd/palette.png": png_bytes(face.convert("P", palette=Image.ADAPTIVE, colors=64)),
            "odd/IMG_0042": face_jpeg(4242)}  # no extension: an image by its content


BAD = {  # name -> expected error kind
    "bad/empty.jpg": "empty", "bad/text.jpg": "not_image", "bad/truncated.jpg": "truncated",
    "bad/huge.png": "too_large", "bad/IMG_0001.HEIC": "not_image", "bad/avif_without_extension": "not_image",
}
# the start of an iPhone's HEIC file: an ISO base media "ftyp" box of brand heic (the rest is not read)
HEIC_HEAD = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"


def avif_image() -> bytes:
    """A real AVIF file (Pillow writes it; it is not among the formats decoded here)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buf, "AVIF")
    return buf.getvalue()


def bad_files() -> dict[str, bytes]:
    full = face_jpeg(5000, (120, 120))
    return {"bad/empty.jpg": b"", "bad/text.jpg": b"these are not the pixels you are looking for\n",
            "bad/truncated.jpg": full[: len(full) // 2], "bad/huge.png": huge_png(),
            "bad/IMG_0001.HEIC": HEIC_HEAD + bytes(200), "bad/avif_without_extension": avif_image()}


NOT_INPUTS = {"notes.txt": b"a text file next to the photos\n", "meta/info.json": b"{}",
              ".hidden.jpg": face_jpeg(1),
              "clip.mp4": b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + bytes(64)}  # a video


def real_faces(n_utk: int = 3, n_celeba: int = 2) -> dict[str, bytes]:
    """Real UTKFace and CelebA files from ../shared/data (empty when absent)."""
    if not SHARED.is_dir():
        return {}
    utk = sorted((SHARED / "utkface").glob("*.jpg"))[:n_utk]
    celeba = sorted((SHARED / "celeba" / "img_align_celeba").glob("*.jpg"))[:n_celeba]
    return {f"real/{p.name}": p.read_bytes() for p in utk + celeba}


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


# --- photos with several faces ----------------------------------------------------------------------------
def real_crops(n: int) -> list[Image.Image]:
    """Real aligned faces from ../shared/data when present (UTKFace chips), else drawn faces."""
    from facedata.draw import draw_face

    paths = sorted((SHARED / "utkface").glob("*.jpg"))[:n] if SHARED.is_dir() else []
    if paths:
        return [Image.open(p).convert("RGB") for p in paths]
    return [draw_face(np.random.default_rng([11, i]), (178, 218))[0] for i in range(n)]


def compose(crops: list[Image.Image], places: list[tuple[int, int, int]], size=(1200, 800), seed=0) -> bytes:
    """Paste each crop scaled to ``width`` at ``(x, y)`` on a textured background -> JPEG bytes."""
    rng = np.random.default_rng(seed)
    small = rng.integers(60, 200, (size[1] // 40 + 1, size[0] // 40 + 1, 3), dtype=np.uint8)
    canvas = Image.fromarray(small).resize(size, Image.BICUBIC)
    for crop, (x, y, width) in zip(crops, places):
        h = round(crop.height * width / crop.width)
        canvas.paste(crop.resize((width, h), Image.BILINEAR), (x, y))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


PLACES = {  # photo -> where its faces are pasted (x, y, width), 0 to 3 faces
    "none.jpg": [],
    "one.jpg": [(500, 250, 260)],
    "three.jpg": [(60, 80, 180), (480, 300, 240), (900, 120, 150)],
}
ROWS_PER_PHOTOS = sum(max(1, len(p)) for p in PLACES.values()) + 1  # rows of photos(): faces, no face, broken
FACES_PER_PHOTOS = sum(len(p) for p in PLACES.values())


def photos() -> dict[str, bytes]:
    """none.jpg, one.jpg, three.jpg (PLACES) and a broken file."""
    crops = real_crops(4)
    out = {}
    for i, (name, places) in enumerate(PLACES.items()):
        out[name] = compose(crops[i % 2: i % 2 + len(places)], places, seed=i)
    out["broken.jpg"] = b"\xff\xd8\xff\xe0 not really a jpeg"
    return out


def many_photos(folder: Path | None = None, copies: int = 4) -> dict[str, bytes]:
    """``copies`` times photos() under prefixed names (more images than one batch), written to ``folder`` if
    one is given."""
    items = photos()
    many = {f"{i:02d}_{name}": data for i in range(copies) for name, data in items.items()}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        write_files(folder, many)
    return many


def inside(box, place) -> bool:
    x, y, w = place
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return x <= cx <= x + w and y <= cy <= y + w * 1.3


# --- training photos: drawn faces pasted at known places (jobs.train --faces detect) --------------------------
def drawn_source(seed: int, stream: int = 19):
    """A drawn face (facedata/draw.py) as a compose.FaceSource (its drawn points and a box around them),
    with its labels; drawn from the random stream ``[stream, seed]``."""
    from facedata.compose import FaceSource
    from facedata.draw import draw_face

    img, lab = draw_face(np.random.default_rng([stream, seed]), (178, 218))
    pts = np.asarray(lab["landmarks"], dtype=np.float64).reshape(5, 2)
    iod = float(np.linalg.norm(pts[1] - pts[0]))
    box = [pts[:, 0].min() - 0.9 * iod, pts[:, 1].min() - iod, pts[:, 0].max() + 0.9 * iod, pts[:, 1].max() + 0.8 * iod]
    return FaceSource(np.asarray(img), box, pts), lab


def face_photo(seeds: list[int], size=(320, 240), width: float = 110, seed: int = 0) -> tuple[bytes, list[dict]]:
    """A JPEG photo with the drawn faces ``seeds`` side by side on a cluttered background; returns its bytes
    and, per face, ``{"box", "points", "labels"}`` in the photo's pixels."""
    from facedata.compose import background, paste

    canvas = background(np.random.default_rng([23, seed]), *size)
    faces = []
    for k, s in enumerate(seeds):
        src, lab = drawn_source(s)
        centre = (size[0] * (k + 1) / (len(seeds) + 1), size[1] / 2)
        box, points = paste(canvas, src, centre, width / max(1, len(seeds)) ** 0.5, 0.0)
        faces.append({"box": box.tolist(), "points": points.reshape(-1).tolist(), "labels": lab})
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=92)
    return buf.getvalue(), faces


def blank_photo(seed: int = 5, size=(320, 240)) -> bytes:
    """A JPEG photo of clutter without a face."""
    from facedata.compose import background

    buf = io.BytesIO()
    background(np.random.default_rng([29, seed]), *size).save(buf, format="JPEG")
    return buf.getvalue()


def bad_training_files() -> dict[str, bytes]:
    """A truncated JPEG, a zero-byte file and a 1 x 40000 PNG (refused for its aspect ratio), by name."""
    full, _ = face_photo([900])
    return {"truncated.jpg": full[: len(full) // 2], "empty.jpg": b"",
            "strip.png": png_bytes(Image.new("L", (1, 40_000), 128))}



def chw(a: np.ndarray):
    """An HWC uint8 array as the detector's CHW uint8 tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous()


def drawn_face_sources(detector, n: int = 3) -> list:
    """``n`` drawn faces (178x218, seeds [3, i]) as ``facedata.compose.FaceSource``: each with the box ``detector``
    finds on it alone and its drawn points (tests/test_detect.py, tests/test_tiles.py)."""
    from facedata.compose import FaceSource
    from facedata.draw import draw_face

    drawn = [draw_face(np.random.default_rng([3, i]), (178, 218)) for i in range(n)]
    images = [np.array(im) for im, _ in drawn]
    found = detector.detect([chw(a) for a in images])
    assert [len(f) for f in found] == [1] * n
    return [FaceSource(a, f.boxes[0].numpy(), np.reshape(lab["landmarks"], (5, 2)))
            for a, f, (_, lab) in zip(images, found, drawn)]
