"""The training data on Ray Data: paths and labels -> decoded (and augmented) batches, one shard per worker."""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # no torch and no model code at module level: see decode_rows
    from models.outputset import OutputSet
    from models.preprocess import Preprocessing

ROWS_PER_BLOCK = 256  # paths per Ray Data block: one decode task handles one block
DECODE_CPUS = 1.0  # CPUs a Ray Data decode task asks for

# --- data ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchSpec:
    """What ``core.batches.load_batch`` needs from a model (its preprocessing and outputs), without its weights:
    this is what travels to the Ray Data decode tasks."""

    preprocessing: Preprocessing
    outputs: OutputSet
    augment: dict | None = None
    max_side: int | None = None  # photos are decoded at this longest side (--faces detect|landmarks); None:
    #                              models.photo.DEFAULT_PHOTO_SIDE


_reseeded = False


@functools.lru_cache(maxsize=4)
def _unpickled(spec: bytes) -> BatchSpec:
    return pickle.loads(spec)


def decode_rows(rows: pd.DataFrame, spec: BatchSpec | bytes, train: bool) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: dataset rows (path + labels, and each row's face with ``--faces
    detect|landmarks``) -> image/target arrays, reading bytes from a folder or S3 and decoding with the
    model's preprocessing (or aligning the row's face). A row that cannot be decoded stays, flagged
    ``skipped``, for the worker to drop and count (``core.batches.drop_failed``). The augmentation runs later, on
    the worker's device (core/augment.py); only HMTNet's random crop out of its margin happens here."""
    # imported here, not at the top: Ray Data's coordinator actors (SplitCoordinator, DatasetManager) import
    # this module to unpickle the plan and never decode; torch alone is ~1.6 s of CPU in each of them
    import torch

    from core.batches import load_batch
    from models.photo import DEFAULT_PHOTO_SIDE
    from models.preprocess import build_augmentation

    global _reseeded
    if isinstance(spec, bytes):  # pickled, as make_dataset passes it
        spec = _unpickled(spec)
    if train and not _reseeded:  # torch starts every process with the same seed: give each its own
        torch.seed()
        _reseeded = True
    augment = build_augmentation(spec.preprocessing, spec.augment) if train and spec.augment else None
    return load_batch(rows, spec, train=train, augment=augment, max_side=spec.max_side or DEFAULT_PHOTO_SIDE,
                      keep_failed=True)


def make_dataset(table: pd.DataFrame, spec: BatchSpec, train: bool):
    import ray.cloudpickle
    import ray.data

    parts = [table.iloc[i: i + ROWS_PER_BLOCK] for i in range(0, len(table), ROWS_PER_BLOCK)] or [table]
    ds = ray.data.from_pandas(parts)  # an empty table (a worker's empty share of the validation rows): no rows
    if train:
        ds = ds.random_shuffle()  # of the paths only, before decoding; a new order every epoch
    # the spec travels pickled, unpickled by the decode tasks only: the coordinator actors unpickle the plan,
    # and a Preprocessing and an OutputSet (an nn.Module) would import torch and the model code in each of them
    return ds.map_batches(decode_rows, fn_kwargs={"spec": ray.cloudpickle.dumps(spec), "train": train},
                          batch_format="pandas", batch_size=ROWS_PER_BLOCK, num_cpus=DECODE_CPUS)


def val_name(rank: int, world_size: int) -> str:
    """The name of worker ``rank``'s validation dataset (val_datasets)."""
    return "val" if world_size == 1 else f"val@{rank}"


def val_datasets(val: pd.DataFrame, workers: int, spec: BatchSpec) -> dict:
    """The validation rows as Ray Train datasets: ``{"val": all}`` for one worker, else one dataset per worker
    (``val_name``: every ``workers``-th row from the worker's rank), so that each row is evaluated exactly once
    without a split's coordinator actor: the rows are known before training, unlike a stream to balance. A
    worker whose share is empty (fewer rows than workers) validates nothing and adds zeros to the all-reduced
    statistics."""
    return {val_name(r, workers): make_dataset(val.iloc[r::workers], spec, train=False) for r in range(workers)}


def data_config():
    from ray.train import DataConfig

    class ShardConfig(DataConfig):
        """Train, on several workers: equal shards of one stream (``streaming_split``: every worker takes the
        same number of steps; the shuffled order is new every epoch). Equal shards leave out up to ``workers - 1``
        training images an epoch (Ray drops the rows that do not divide; which ones changes with the shuffled
        order, so no image is left out of every epoch): ``train_images`` in the history counts what was trained
        on. Unequal shards would need the workers with fewer batches to join DDP's steps without data. Any other dataset (one worker's
        validation rows, or anything on one worker): read by the worker itself (``Dataset.iterator``), without
        a split's coordinator actor, which would only cost a process and the hops through it. Ray Train calls
        this once per dataset; a dataset not in ``datasets_to_split`` is handed out without a barrier, so each
        worker asks for its own validation dataset only."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                if world_size > 1 and name in self._datasets_to_split:
                    for i, split in enumerate(ds.streaming_split(world_size, equal=True, locality_hints=hints)):
                        out[i][name] = split
                else:
                    for i in range(world_size):
                        out[i][name] = ds.iterator()
            return out

    return ShardConfig(datasets_to_split=["train"])


# --- collectives ---------------------------------------------------------------------------------------
