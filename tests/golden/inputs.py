"""Deterministic inputs for the before/after equality test of the redesign (issue #18).

The photos, crops and checkpoints are made here from seeds, with nothing but APIs that the redesign does not
touch (facedata.synth, facedata.compose, models.create_model, models.checkpoint.save_checkpoint), so that
``record.py`` (run once on the code before the move) and ``tests/test_golden.py`` (run on the code after it)
see the same bytes and weights. The detector settings are pinned here too: a later change of the defaults
must not look like a change of behaviour.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch

# the detector's defaults at the time the rows were recorded (faces/detect.py, 2026-12-02)
DETECTOR = {"size": 640, "threshold": 0.7, "nms_iou": 0.4, "min_face": 16.0, "max_faces": 64, "max_upscale": 1.0,
            "resize": "float"}  # the resize the rows were recorded with (the default's is "uint8" since 2026-12-06)
MAX_SIDE = 2048
MODELS = {"hs": ("hard_sharing", {}), "dmm": ("dmm_cnn", {"depth": 18, "image_size": 64})}


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _sources():
    from facedata.compose import FaceSource
    from facedata.draw import draw_face

    out = []
    for i in range(3):
        img, lab = draw_face(np.random.default_rng([11, i]), (178, 218))
        pts = np.asarray(lab["landmarks"], dtype=np.float64).reshape(5, 2)
        iod = float(np.linalg.norm(pts[1] - pts[0]))
        box = [pts[:, 0].min() - 0.9 * iod, pts[:, 1].min() - iod, pts[:, 0].max() + 0.9 * iod,
               pts[:, 1].max() + 0.8 * iod]
        out.append(FaceSource(np.asarray(img), box, pts))
    return out


def photos() -> list[tuple[str, bytes]]:
    """Four photos (two with faces, one without, one broken file) for the detect path."""
    from PIL import Image

    from facedata.compose import compose

    src = _sources()
    items = []
    for k, (seed, n) in enumerate([(5, (3, 3)), (6, (2, 2)), (7, (0, 0))]):
        c = compose(src, seed, n_faces=n, canvas=(500, 800), face_width=(70, 150), max_angle=20)
        items.append((f"photo{k}.jpg", _jpeg(Image.fromarray(c.image))))
    items.append(("broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"))
    return items


def crops() -> list[tuple[str, bytes]]:
    """Three aligned face crops and a broken file for the whole-image path (``--faces whole``)."""
    from facedata.draw import draw_face

    items = [(f"crop{i}.jpg", _jpeg(draw_face(np.random.default_rng([12, i]), (178, 218))[0])) for i in range(3)]
    items.append(("empty.jpg", b""))
    return items


def checkpoints(folder: str) -> dict[str, str]:
    """Seeded random models saved as checkpoints: name -> path."""
    import models
    from models.checkpoint import save_checkpoint

    out = {}
    for i, (name, (arch, kw)) in enumerate(MODELS.items()):
        torch.manual_seed(100 + i)
        path = os.path.join(folder, f"{name}.pt")
        save_checkpoint(models.create_model(arch, **kw), path)
        out[name] = path
    return out


def eval_data(folder: str) -> str:
    """A small synthetic CelebA-format folder for ``jobs.evaluate``; returns ``FORMAT:PATH``."""
    from facedata.synth import generate

    path = os.path.join(folder, "celeba")
    generate("celeba", 24, path, seed=3)
    return f"celeba:{path}"
