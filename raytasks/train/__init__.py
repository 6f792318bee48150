"""The train program: Ray Train (TorchTrainer, DDP) over Ray Data shards of a labelled data set.

* job.py: the driver, :func:`run` (its docstring: the run folder, fault tolerance, resume) and
  :func:`prepare`; spec.py: :class:`TrainSpec`, :class:`TrainOutcome`, :class:`TrainError`;
* stages.py: a recipe's stages (models/recipes.py) as runs of job.py, in order, resumable, recorded;
* data.py: paths and labels -> decoded, augmented batches on Ray Data (one shard per worker);
* worker.py: :func:`train_worker`, one DDP worker's loop around core/engine.py's steps;
* collective.py: what the workers all-reduce and compare; history.py: history, progress lines, curves.
"""

from raytasks.train.data import BatchSpec, decode_rows  # noqa: F401 - the job's API
from raytasks.train.job import prepare, run  # noqa: F401
from raytasks.train.spec import TrainError, TrainOutcome, TrainSpec  # noqa: F401
