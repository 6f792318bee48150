"""The train program: Ray Train (TorchTrainer, DDP) over Ray Data shards of a labelled data set."""

from raytasks.train.job import (  # noqa: F401 - the job's API
    BatchSpec,
    TrainError,
    TrainOutcome,
    TrainSpec,
    decode_rows,
    prepare,
    run,
)
