"""Test photos with known faces: paste face crops onto larger canvases at known places, scales and angles.

A photo of the real world has faces of many sizes at any place, some turned in the image plane, over
clutter. :func:`compose` builds such photos from face crops whose box and 5 points are known, and returns
where every face and its points ended up, so a detector's recall, false positives and point error can be
measured against truth.

* :class:`FaceSource`: a crop (H x W x 3 uint8), its face box (x1, y1, x2, y2) and 5 points (image-left
  eye, image-right eye, nose tip, image-left mouth corner, image-right mouth corner) in the crop's pixels.
  For real crops (../shared/data) the box and points come from running the detector once on the crop; for
  drawn faces (:func:`facedata.draw.draw_face`) the points are the drawn ones. This module takes them as
  given (``facedata`` sits below ``faces`` and does not import the detector).
* :func:`compose`: one canvas (a background of noise, gradients and shapes) with 0-``max_faces`` faces,
  each scaled to a face width in ``face_width`` pixels, turned by up to ``max_angle`` degrees and pasted
  through a feathered elliptical mask (so the crop's rectangle does not show), never overlapping another
  face and always fully inside the canvas. Returns :class:`Composed`.

Where a choice was needed: the true box of a turned face is the axis-aligned box of the ellipse inscribed in
the source box, turned (half-widths ``sqrt((a cos t)^2 + (b sin t)^2)`` and ``sqrt((a sin t)^2 + (b cos t)^2)``)
rather than the box around the turned rectangle, which would be up to 1.37 times wider at 30 degrees than
the face a detector outlines. Without a turn it is the source box, scaled.

Deterministic: the same sources, settings and seed give the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass
class FaceSource:
    image: np.ndarray  # (H, W, 3) uint8 RGB crop
    box: np.ndarray  # (4,) x1, y1, x2, y2 of the face in the crop's pixels
    points: np.ndarray  # (5, 2) the face's 5 points in the crop's pixels

    def __post_init__(self):
        self.image = np.asarray(self.image)
        self.box = np.asarray(self.box, dtype=np.float64).reshape(4)
        self.points = np.asarray(self.points, dtype=np.float64).reshape(5, 2)
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"FaceSource.image must be (H, W, 3) uint8, got {self.image.shape} {self.image.dtype}")
        if not (self.box[2] > self.box[0] and self.box[3] > self.box[1]):
            raise ValueError(f"FaceSource.box must be x1 < x2, y1 < y2, got {self.box.tolist()}")


@dataclass
class Composed:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (K, 4) float x1, y1, x2, y2 of each pasted face in canvas pixels
    points: np.ndarray  # (K, 5, 2) float, the 5 points of each face in canvas pixels
    sources: list[int]  # index into the given sources of each pasted face
    angles: list[float]  # degrees each face was turned (counter-clockwise as seen)


def background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A cluttered background: a colour gradient, shapes (ellipses, rectangles, lines), pixel noise."""
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, width if rng.random() < 0.5 else height, dtype=np.float32)
    ramp = c0[None, :] * (1 - t[:, None]) + c1[None, :] * t[:, None]
    if ramp.shape[0] == width:
        arr = np.broadcast_to(ramp[None, :, :], (height, width, 3))
    else:
        arr = np.broadcast_to(ramp[:, None, :], (height, width, 3))
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 16))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w = int(rng.integers(max(2, width // 40), max(3, width // 3)))
        h = int(rng.integers(max(2, height // 40), max(3, height // 3)))
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            d.ellipse((x, y, x + w, y + h), fill=col)
        elif kind == 1:
            d.rectangle((x, y, x + w, y + h), fill=col)
        else:
            d.line((x, y, x + w, y + h), fill=col, width=int(rng.integers(1, max(2, min(width, height) // 60))))
    noise = rng.normal(0.0, float(rng.uniform(2, 12)), (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8), "RGB")


def _mask(src: FaceSource, margin: float) -> Image.Image:
    """Feathered ellipse around the face box (``margin`` times its size), in the crop's pixels."""
    h, w = src.image.shape[:2]
    x1, y1, x2, y2 = src.box
    cx, cy, a, b = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2 * margin, (y2 - y1) / 2 * margin
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).ellipse((cx - a, cy - b, cx + a, cy + b), fill=255)
    return m.filter(ImageFilter.GaussianBlur(radius=float(max(1.0, 0.04 * min(x2 - x1, y2 - y1)))))


def paste(canvas: Image.Image, src: FaceSource, centre: tuple[float, float], face_width: float, angle: float,
          margin: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``src`` so that its face box is ``face_width`` pixels wide, centred at ``centre`` and turned by
    ``angle`` degrees; returns the face's (4,) box and (5, 2) points in canvas pixels."""
    x1, y1, x2, y2 = src.box
    c_src = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    s = face_width / (x2 - x1)
    t = math.radians(angle)
    cos, sin = math.cos(t), math.sin(t)
    # Canvas y points down: (cos, sin; -sin, cos) turns counter-clockwise as seen.
    rot = np.array([[cos, sin], [-sin, cos]])
    a, b = (x2 - x1) / 2 * margin * s, (y2 - y1) / 2 * margin * s
    hx, hy = math.hypot(a * cos, b * sin), math.hypot(a * sin, b * cos)
    pw, ph = 2 * math.ceil(hx) + 4, 2 * math.ceil(hy) + 4
    ox, oy = round(centre[0] - pw / 2), round(centre[1] - ph / 2)
    c_patch = np.array([centre[0] - ox, centre[1] - oy])
    inv = rot.T / s  # patch -> crop
    off = c_src - inv @ c_patch
    data = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
    img = Image.fromarray(src.image, "RGB").transform((pw, ph), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)
    mask = _mask(src, margin).transform((pw, ph), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)
    canvas.paste(img, (ox, oy), mask)
    points = (src.points - c_src) @ (rot * s).T + np.asarray(centre)
    fa, fb = (x2 - x1) / 2 * s, (y2 - y1) / 2 * s
    bx, by = math.hypot(fa * cos, fb * sin), math.hypot(fa * sin, fb * cos)
    box = np.array([centre[0] - bx, centre[1] - by, centre[0] + bx, centre[1] + by])
    return box, points


def compose(sources: Sequence[FaceSource], seed: int, *, n_faces: tuple[int, int] = (0, 5),
            canvas: tuple[int, int] = (320, 4000), face_width: tuple[float, float] = (40, 400),
            max_angle: float = 30.0) -> Composed:
    """One photo with ``n_faces`` (inclusive range) faces drawn from ``sources`` (see the module docstring).
    The canvas's sides are drawn from ``canvas``; a face's width from ``face_width``, capped at a third of
    the canvas's shorter side; faces that find no free place after 50 tries are left out (``sources`` and
    the returned arrays say which were pasted)."""
    if n_faces[0] < 0 or n_faces[1] < n_faces[0]:
        raise ValueError(f"n_faces must be a range 0 <= lo <= hi, got {n_faces}")
    if n_faces[1] > 0 and not sources:
        raise ValueError("compose needs at least one face source to paste faces")
    if not (16 <= canvas[0] <= canvas[1]):
        raise ValueError(f"canvas must be a range of sides 16 <= lo <= hi, got {canvas}")
    if not (0 < face_width[0] <= face_width[1]):
        raise ValueError(f"face_width must be a range 0 < lo <= hi, got {face_width}")
    rng = np.random.default_rng(seed)
    W, H = (int(v) for v in rng.integers(canvas[0], canvas[1] + 1, 2))
    img = background(rng, W, H)
    n = int(rng.integers(n_faces[0], n_faces[1] + 1))
    boxes, points, used, angles, taken = [], [], [], [], []
    for _ in range(n):
        k = int(rng.integers(0, len(sources)))
        src = sources[k]
        fw = float(rng.uniform(face_width[0], min(face_width[1], max(face_width[0], min(W, H) / 3))))
        angle = float(rng.uniform(-max_angle, max_angle))
        aspect = (src.box[3] - src.box[1]) / (src.box[2] - src.box[0])
        r = 0.75 * 1.25 * fw * max(1.0, aspect)  # radius that holds the masked, turned face
        if W <= 2 * r or H <= 2 * r:
            continue
        for _try in range(50):
            cx, cy = float(rng.uniform(r, W - r)), float(rng.uniform(r, H - r))
            if all(math.hypot(cx - tx, cy - ty) > r + tr for tx, ty, tr in taken):
                box, pts = paste(img, src, (cx, cy), fw, angle)
                taken.append((cx, cy, r))
                boxes.append(box)
                points.append(pts)
                used.append(k)
                angles.append(angle)
                break
    return Composed(
        image=np.asarray(img, dtype=np.uint8).copy(),
        boxes=np.array(boxes, dtype=np.float64).reshape(-1, 4),
        points=np.array(points, dtype=np.float64).reshape(-1, 5, 2),
        sources=used,
        angles=angles,
    )
