"""The label job: a folder, prefix or manifest of photos -> Parquet, one row per face, on Ray Data."""

from raytasks.label.job import (  # noqa: F401 - the job's API
    LabelError,
    LabelSpec,
    PredictorActor,
    ensure_ray,
    label,
    load_and_decode,
    resolve_pool,
)
