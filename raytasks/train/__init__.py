"""The train program: Ray Train (TorchTrainer, DDP) over Ray Data shards of a labelled data set.

* job.py: the driver, :func:`run` (its docstring: the run folder, fault tolerance, resume) and
  :func:`prepare`; spec.py: :class:`TrainSpec`, :class:`TrainOutcome`, :class:`TrainError`;
* facerows.py: each row's face (detected, cached, or the data's landmarks) and the face template of photo data;
* resume.py: what a rerun finds in the run folder (refused when it is another run; where it goes on from);
* stages.py: a recipe's stages (models/recipes.py) as runs of job.py, in order, resumable, recorded;
* data.py: paths and labels -> decoded, augmented batches on Ray Data (one shard per worker);
* worker.py: :func:`train_worker`, one DDP worker's loop around core/engine.py's steps;
* collective.py: what the workers all-reduce and compare; history.py: history, progress lines, curves.
"""

from raytasks.train.spec import TrainError, TrainOutcome, TrainSpec  # noqa: F401 - the job's API

# The rest of the job's API is imported on first use (PEP 562), not here: Ray Data's coordinator actors
# (SplitCoordinator, DatasetManager) unpickle ``raytasks.train.data.decode_rows``, which imports this package
# first, and job.py would import torch and the whole model stack in each of them (start-up cost of Ray worker
# processes).
_LAZY = {"BatchSpec": "data", "decode_rows": "data", "prepare": "job", "run": "job"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
