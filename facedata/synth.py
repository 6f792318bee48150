"""Drawn faces with known attributes, written in the datasets' own formats.

``generate("celeba" | "utkface" | "scut_fbp5500", n, out, seed)`` writes ``n`` faces drawn with
``PIL.ImageDraw`` into ``out`` (a folder or an ``s3://`` prefix) exactly as the real dataset lays them out,
so :func:`facedata.datasets.read_dataset` loads them like the real thing:

* celeba - ``img_align_celeba/NNNNNN.jpg`` (178x218), ``list_attr_celeba.txt``,
  ``list_landmarks_align_celeba.txt`` (left eye, right eye, nose, left and right mouth corner, integer
  pixels: exactly the iris centres, the nose tip and the ends of the drawn mouth line) and
  ``list_eval_partition.txt`` (the first 80 % train, the next 10 % val, the rest test, as CelebA orders it).
* utkface - ``[age]_[gender]_[race]_[date&time].jpg.chip.jpg`` (200x200).
* scut_fbp5500 - ``Images/{A,C}{F,M}N.jpg`` (350x350, Asian / White skin only) and
  ``train_test_files/All_labels.txt`` with the beauty score.

Every face is drawn independently from ``numpy.random.default_rng([seed, index])``: the same seed gives the
same bytes, and image ``i`` does not depend on ``n``. :func:`facedata.draw.draw_face` draws one face in memory, and
:func:`iter_faces` yields ``(file name, image, labels)`` exactly as :func:`generate` writes them.

What is drawn: facedata/draw.py; how each label is set: facedata/traits.py.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import numpy as np
from PIL import Image

import storage
from facedata.datasets import (
    CELEBA_ATTR_FILE,
    CELEBA_ATTRIBUTES,
    CELEBA_IMAGES,
    CELEBA_LANDMARK_FILE,
    CELEBA_PARTITION_FILE,
    SCUT_IMAGES,
    SCUT_LABELS,
    SCUT_RACES,
)
from facedata.draw import draw_face

FORMATS = ("celeba", "utkface", "scut_fbp5500")
DEFAULT_SIZES = {"celeba": (178, 218), "utkface": (200, 200), "scut_fbp5500": (350, 350)}
JPEG_QUALITY = 90
LANDMARK_HEADER = (
    "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
)


def _parse_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, str):
        w, _, h = size.lower().partition("x")
        size = (int(w), int(h or w))
    w, h = (int(v) for v in size)
    if w < 32 or h < 32:
        raise ValueError(f"image size {w}x{h} is too small to draw a face (at least 32x32)")
    return w, h


def iter_faces(
    format: str, n: int, seed: int = 0, size: tuple[int, int] | str | None = None
) -> Iterator[tuple[str, Image.Image, dict]]:
    """Yield ``(file name, image, labels)`` for the ``n`` faces :func:`generate` writes. For scut_fbp5500 the
    ``race`` label is a :data:`SCUT_RACES` index (0 Asian, 1 Caucasian), otherwise a UTKFace index."""
    if format not in FORMATS:
        raise ValueError(f"unknown synthetic format {format!r}; expected one of {', '.join(FORMATS)}")
    wh = _parse_size(size) or DEFAULT_SIZES[format]
    counters: dict[str, int] = {}
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        if format == "scut_fbp5500":
            img, labels = draw_face(rng, wh, races=(0, 2))
            asian = labels["race"] == 2
            labels["race"] = SCUT_RACES.index("Asian" if asian else "Caucasian")
            prefix = ("A" if asian else "C") + ("F" if labels["gender"] == 1 else "M")
            counters[prefix] = counters.get(prefix, 0) + 1
            name = f"{prefix}{counters[prefix]}.jpg"
        elif format == "utkface":
            img, labels = draw_face(rng, wh)
            name = f"{labels['age']}_{labels['gender']}_{labels['race']}_{20170101000000000 + i}.jpg.chip.jpg"
        else:
            img, labels = draw_face(rng, wh)
            name = f"{i + 1:06d}.jpg"
        yield name, img, labels


def encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def generate(format: str, n: int, out: str, seed: int = 0, size: tuple[int, int] | str | None = None) -> str:
    """Write ``n`` drawn faces into ``out`` (folder or s3:// prefix) in ``format``'s own layout; returns out."""
    out = str(out)
    faces = []
    image_dir = {"celeba": CELEBA_IMAGES, "utkface": "", "scut_fbp5500": SCUT_IMAGES}[format]
    for name, img, labels in iter_faces(format, n, seed, size):
        target = storage.join(out, image_dir, name) if image_dir else storage.join(out, name)
        storage.write_bytes(target, encode_jpeg(img))
        faces.append((name, labels))
    if format == "celeba":
        attr = [str(n), " ".join(CELEBA_ATTRIBUTES)]
        attr += [f"{name} " + " ".join(f"{v:2d}" for v in lab["attributes"]) for name, lab in faces]
        marks = [str(n), LANDMARK_HEADER]
        marks += [f"{name} " + " ".join(f"{v:4d}" for v in lab["landmarks"]) for name, lab in faces]
        n_train, n_val = int(round(0.8 * n)), int(round(0.9 * n))
        part = [f"{name} {0 if i < n_train else 1 if i < n_val else 2}" for i, (name, _) in enumerate(faces)]
        for fname, lines in ((CELEBA_ATTR_FILE, attr), (CELEBA_LANDMARK_FILE, marks), (CELEBA_PARTITION_FILE, part)):
            storage.write_bytes(storage.join(out, fname), ("\n".join(lines) + "\n").encode())
    elif format == "scut_fbp5500":
        lines = [f"{name} {lab['beauty']:.6f}" for name, lab in faces]
        storage.write_bytes(storage.join(out, SCUT_LABELS), ("\n".join(lines) + "\n").encode())
    return out


def main(argv: list[str] | None = None) -> str:
    import argparse

    parser = argparse.ArgumentParser(description="Write drawn faces with known labels in a dataset's format.")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--n", type=int, required=True, help="number of faces")
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default=None, help="WxH, default: the dataset's own size")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    generate(args.format, args.n, args.out, seed=args.seed, size=args.size)
    print(f"wrote {args.n} {args.format} faces to {args.out} in {time.perf_counter() - start:.1f} s")
    return args.out
