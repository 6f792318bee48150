"""Crowds (#20): with --max-faces below the faces of a photo, the highest-scoring faces are kept and the row
says how many were left out (faces_dropped); the label summary adds them up."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import models
from core.annotator import Annotator
from facedata.compose import FaceSource
from facedata.draw import draw_face
from models.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def crowd() -> bytes:
    """A 1600x1200 photo of 24 drawn faces on a grid."""
    canvas = Image.new("RGB", (1600, 1200), (120, 130, 140))
    for k in range(24):
        img, lab = draw_face(np.random.default_rng([21, k]), (178, 218))
        src = FaceSource(np.asarray(img), [20, 30, 158, 200], np.asarray(lab["landmarks"], float).reshape(5, 2))
        face = Image.fromarray(src.image).resize((178, 218))
        canvas.paste(face, (40 + (k % 6) * 260, 40 + (k // 6) * 290))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_a_cap_keeps_the_highest_scoring_faces_and_counts_the_others(crowd, tmp_path):
    ckpt = str(tmp_path / "hs.pt")
    save_checkpoint(models.create_model("hard_sharing"), ckpt)
    every = Annotator(ckpt, faces={"detector": {"max_faces": 64}}, device="cpu").annotate_bytes([("c.jpg", crowd)])
    capped = Annotator(ckpt, faces={"detector": {"max_faces": 5}}, device="cpu").annotate_bytes([("c.jpg", crowd)])
    found = len(every)
    assert found >= 20 and every[0]["faces_dropped"] == 0
    assert len(capped) == 5 and all(r["faces"] == 5 and r["faces_dropped"] == found - 5 for r in capped)
    top = sorted((r["face_score"] for r in every), reverse=True)[:5]
    assert [r["face_score"] for r in capped] == pytest.approx(top)  # the highest scores, in order
    assert np.allclose([r["face_box"] for r in capped], [r["face_box"] for r in every[:5]])
