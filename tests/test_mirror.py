"""Test-time mirror averaging (models/preprocess.py ``Preprocessing.mirror``): a checkpoint that says so is read
face and mirror image alike by label, serve (both through core/runner.py) and evaluate (core/evaluation.py), the
mirrored pass's landmarks mapped back; a flag turns it off or on for one evaluation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import models
from core.annotator import Annotator
from models.checkpoint import load_checkpoint
from models.landmarks import FLIP_5
from tests.helpers import save_model

SIZE = 64  # the image is the model's input size: a stretch to it is the identity, so mirroring it is exact


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _rows(checkpoint: str, arr: np.ndarray) -> list[dict]:
    ann = Annotator(checkpoint, faces={"mode": "whole"}, device="cpu", precision="fp32", threads=2)
    return ann.annotate_bytes([("face.png", _png(arr)), ("mirror.png", _png(np.ascontiguousarray(arr[:, ::-1])))])


def test_a_face_and_its_mirror_image_get_the_same_labels_and_mirrored_points(tmp_path):
    kw = {"depth": 18, "image_size": SIZE}  # DMM-CNN: 40 attributes and 5 landmarks
    on = save_model(str(tmp_path / "on.pt"), "dmm_cnn", seed=3, mirror=True, **kw)
    off = save_model(str(tmp_path / "off.pt"), "dmm_cnn", seed=3, **kw)
    model, info = load_checkpoint(on)
    assert model.preprocessing.mirror and info.preprocessing["mirror"] and info.config["mirror"] is True
    assert load_checkpoint(off)[0].preprocessing.mirror is False

    arr = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    (a, b), (a0, b0) = _rows(on, arr), _rows(off, arr)
    probs = [k for k in a if k.endswith("_prob")]
    assert len(probs) == 40
    # without it a random network reads the two ways differently (so the equalities below have teeth)
    assert max(abs(a0[k] - b0[k]) for k in probs) > 1e-3
    for k in probs:
        assert b[k] == pytest.approx(a[k], abs=1e-4), k  # the same labels whichever way the face is turned
    # the mean of the two passes' raw scores (each pass the plain checkpoint's reading of one image): DMM-CNN's
    # probability is its score mapped linearly from [-1, 1] (models/outputs.py, Binary), so the mean of theirs
    # where neither score was clipped to that range
    inside = [k for k in probs if 0 < a0[k] < 1 and 0 < b0[k] < 1]
    assert len(inside) >= 10
    for k in inside:
        assert a[k] == pytest.approx((a0[k] + b0[k]) / 2, abs=1e-4), k
    # the points of the mirror image are the face's points mirrored (x -> W - x), left and right swapped
    pa, pb = np.reshape(a["landmarks"], (5, 2)), np.reshape(b["landmarks"], (5, 2))
    want = np.stack([SIZE - pa[list(FLIP_5), 0], pa[list(FLIP_5), 1]], 1)
    np.testing.assert_allclose(pb, want, atol=1e-3)
    # and they are the mean of the face's own reading and of the mirror image's reading mapped back
    p0a, p0b = np.reshape(a0["landmarks"], (5, 2)), np.reshape(b0["landmarks"], (5, 2))
    back = np.stack([SIZE - p0b[list(FLIP_5), 0], p0b[list(FLIP_5), 1]], 1)
    np.testing.assert_allclose(pa, (p0a + back) / 2, atol=1e-3)


def test_unmirror_follows_the_pixels():
    """A point on a pixel's centre, in the output's units: after ``x.flip(-1)`` the pixel sits at the mirrored
    column, and ``unmirror`` of the point there (in the mirror's own left/right order) gives the point back."""
    W = 10
    for scale in ("signed", "unit"):
        o = models.create_model("dmm_cnn", depth=18, image_size=SIZE).outputs["landmarks"]
        o = type(o)(name=o.name, points=5, scale=scale)
        cols = np.array([1, 8, 4, 2, 7])
        img = torch.zeros(5, 1, W)
        img[torch.arange(5), 0, torch.as_tensor(cols)] = 1.0
        seen = img.flip(-1).argmax(-1).squeeze(1)  # the columns in the mirrored image
        unit = lambda c: (torch.as_tensor(c, dtype=torch.float64) + 0.5) / W  # noqa: E731 - pixel centre
        to_units = (lambda u: 2 * u - 1) if scale == "signed" else (lambda u: u)
        pts = torch.stack([to_units(unit(cols)), torch.linspace(-0.5, 0.5, 5, dtype=torch.float64)], 1)
        mirrored = torch.stack([to_units(unit(seen)), pts[:, 1]], 1)[list(FLIP_5)]  # its own order
        torch.testing.assert_close(o.unmirror(mirrored.reshape(1, -1)), pts.reshape(1, -1))


def test_landmarks_of_unknown_order_refuse_it_and_evaluate_can_turn_it_off(tmp_path, capsys):
    with pytest.raises(ValueError, match="left/right order"):
        models.create_model("dmm_cnn", depth=18, image_size=SIZE, num_landmarks=68, mirror=True)
    with pytest.raises(ValueError, match="mirror must be true or false"):
        models.create_model("hard_sharing", mirror="yes")

    from facedata.synth import generate
    from jobs import evaluate

    data = generate("celeba", 24, str(tmp_path / "celeba"), seed=2, size=(SIZE, SIZE))
    on = save_model(str(tmp_path / "on.pt"), "hard_sharing", seed=1, mirror=True)
    argv = ["--checkpoint", on, "--data", f"celeba:{data}", "--split", "all", "--faces", "whole"]
    as_saved, turned_off = evaluate.main(argv), evaluate.main(argv + ["--mirror", "off"])
    out = capsys.readouterr().out
    assert "mirror on" in out and "mirror off" in out
    assert as_saved["n_images"] == turned_off["n_images"] == 24
    assert as_saved["gender.loss"] != turned_off["gender.loss"]
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", save_model(str(tmp_path / "d68.pt"), "dmm_cnn", depth=18, image_size=SIZE,
                                                  num_landmarks=68), "--data", f"celeba:{data}", "--mirror", "on"])
    assert "left/right order" in capsys.readouterr().err
