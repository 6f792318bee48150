"""The train job exports a calibrated checkpoint (#21): raytasks.train.job.calibrated_bytes fits the best
checkpoint's temperatures on the validation split, and the label columns read them. The export is made in
memory and written once (a recipe's record added to it in memory: models.checkpoint.with_extra, tests/test_recipes_runs.py)."""

from __future__ import annotations

import torch

import models
from facedata.datasets import read_dataset
from facedata.synth import generate
from models.calibration import calibration_status
from models.checkpoint import load_checkpoint, save_checkpoint
from raytasks.train.job import calibrated_bytes


def test_the_exported_checkpoint_is_calibrated_on_validation_and_says_so(tmp_path):
    data = generate("celeba", 48, str(tmp_path / "celeba"), seed=5)
    table = read_dataset(f"celeba:{data}").table
    path = str(tmp_path / "hs.pt")
    torch.manual_seed(0)  # an untrained model: with some weights the fit does not lower gender's ECE and is not kept
    save_checkpoint(models.create_model("hard_sharing"), path)
    raw, raw_info = load_checkpoint(path)
    assert calibration_status(raw)["calibrated"] is False
    lines: list[str] = []
    with open(path, "rb") as f:
        data = f.read()
    out = str(tmp_path / "export.pt")
    calibrated, digest = calibrated_bytes(data, out, table, 16, lines.append)
    assert not (tmp_path / "export.pt").exists()  # nothing written: the job writes the export once
    model, info = load_checkpoint(out, data=calibrated)
    assert info.hash == digest
    status = calibration_status(model)
    assert status["calibrated"] is True and status["outputs"]["gender"] is not None
    assert info.extra["calibration"]["split"] == "val" and info.extra["calibration"]["images"] == len(table)
    assert info.hash != raw_info.hash and "gender ECE" in lines[0]
