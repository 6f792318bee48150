"""The label job: a folder, prefix or manifest of photos -> Parquet, one row per face, on Ray Data.

* job.py: :func:`label` (the run: listing, lease, resume, summary; the module docstring says what goes in and
  comes out); spec.py: :class:`LabelSpec`, :class:`LabelError`; labeler.py: the checkpoint(s) and detector
  a run labels with; summary.py: the summary it ends with;
* stages.py: the Ray Data stages (read and decode, the annotator actor pool), listed in ``build_dataset``;
  decoding.py: the read-and-decode stage itself (its imports hold no torch);
* cluster.py: the Ray it runs on and the size of the actor pool; output.py: the output folder;
  lease.py: one run per output (its records' store: lease_store.py); gpu_decode.py: ``--gpu-decode``.
"""

from raytasks.label.cluster import check_decode_fits, ensure_ray, resolve_pool, started_here  # noqa: F401 - the job's API
from raytasks.label.decoding import read_and_decode  # noqa: F401
from raytasks.label.job import label  # noqa: F401
from raytasks.label.spec import LabelError, LabelSpec  # noqa: F401
from raytasks.label.stages import AnnotatorActor  # noqa: F401
