"""The single-process training loop (core/engine.py, core/batches.py) on what an audit of the training runtime
found: a diverged epoch (its train loss not finite, its weights NaN) ranked best by its accuracies, and HMTNet
random-cropped in the single-process loop with no augmentation asked, where the Ray workers decode as
evaluation does. Each test failed on the code before its fix; no Ray."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

import models
from core.batches import iter_batches
from core.engine import Selection
from facedata.datasets import read_dataset
from facedata.synth import generate
from raytasks.train.data import BatchSpec, decode_rows


def test_a_diverged_epoch_is_never_the_best_whatever_its_accuracies():
    sel = Selection("mean_accuracy", "max")
    sane = {"train_loss": 0.7, "val_loss": 0.6, "mean_accuracy": 0.68}
    diverged = {"train_loss": float("nan"), "val_loss": float("nan"), "mean_accuracy": 0.77}  # NaN logits: class 0
    best = sel.value(sane)
    assert best == 0.68 and math.isnan(sel.value(diverged))
    assert not sel.is_better(sel.value(diverged), best) and sel.score(sel.value(diverged)) == float("-inf")
    assert math.isnan(sel.value({**sane, "train_loss": float("inf")}))
    assert sel.value({"mean_accuracy": 0.5}) == 0.5  # a metrics dict without a train loss is judged by its metric


def test_without_augmentation_both_training_loops_read_what_evaluation_reads(tmp_path):
    ds = read_dataset(f"scut_fbp5500:{generate('scut_fbp5500', 10, str(tmp_path / 's'), seed=3, size=(96, 96))}",
                      val_fraction=0.2)
    m = models.create_model("hmtnet", **ds.model_overrides("hmtnet"))
    m.recipe = dataclasses.replace(m.recipe, augment={})  # jobs.train --no-augment
    rows = ds.split("train").iloc[:4].reset_index(drop=True)
    evaluated = next(iter_batches(rows, m, 4, train=False))["image"]
    torch.manual_seed(0)
    single = next(iter_batches(rows, m, 4, train=True, epoch=1))["image"]  # core.engine.fit's batches
    ray = decode_rows(rows, BatchSpec(m.preprocessing, m.outputs, m.recipe.augment or None), train=True)["image"]
    assert np.array_equal(ray, evaluated) and np.array_equal(single, evaluated)
