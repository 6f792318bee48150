"""The label job's Ray Data stages, listed in one function (:func:`build_dataset`)::

    paths -> map_batches(read_and_decode)                        CPU tasks: read a bounded chunk, decode
          -> [limit]
          -> map_batches(AnnotatorActor, ActorPoolStrategy)      detector + every model, one device each
          -> rows (core/rows.py)                                 written by raytasks/label/job.py

Each stage declares what it reads and adds: ``read_and_decode`` reads ``path`` and adds a decoded batch's
columns (facedata/decode.py: photos, or whole images once per distinct preprocessing; with
``--gpu-decode`` or ``--actor-decode`` the JPEGs the actor can take travel as ``jpeg_bytes``); the actor reads
those and returns the rows of ``Annotator.schema``.
"""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.fs as pafs

from raytasks import heap
from raytasks.label.decoding import decode_memory, read_and_decode
from raytasks.label.gpu_decode import images_on_device, photos_on_device
from raytasks.threads import runtime_env, torch_executor


class AnnotatorActor:
    """``map_batches`` class: the run's models (``core.annotator.Annotator``: one checkpoint, or every
    model of a set, and the detector) loaded once per actor; a decoded batch in, rows out (Arrow). With
    ``gpu_decode`` (which needs CUDA) or ``actor_decode`` (photos, any device) the JPEGs the CPU stage passed
    on as bytes are decoded here, on the actor's device."""

    def __init__(self, model_set: dict, faces: dict, precision: str = "auto", device: str | None = None,
                 threads: int | None = None, gpu_decode: bool = False, throttle_s: float = 0.0,
                 compile_batch: int | None = None, fold_bn: bool = True, detector_identity: str | None = None,
                 identity: str | None = None, review: dict | None = None, actor_decode: bool = False,
                 gpu_share: float | None = None):
        from core.annotator import Annotator

        # all torch work on one thread: Ray calls __init__ on the main thread and __call__ on another
        self._torch_thread = torch_executor("predictor")
        # device None: core.runner.resolve_device, which gives an actor the GPU only when Ray assigned it one;
        # gpu_share (--gpus-per-actor) below 1 bounds its share of that GPU's memory
        self.annotator = self._on_torch(Annotator, model_set, faces=faces, device=device, precision=precision,
                                        threads=threads, fold_bn=fold_bn, compile_batch=compile_batch,
                                        review=review, gpu_share=gpu_share)
        a = self.annotator
        if identity is not None and a.identity != identity:
            # a checkpoint was replaced after the run resolved it: never mix two models' rows
            what = a.model_set.members[0][1] if a.flat else f"the model set {a.name}"
            raise RuntimeError(f"{what} now holds {a.identity}, not the {identity} this run started with (was it "
                               "overwritten during the run?); rerun the job")
        if a.face_options.detect:  # the detector next to the models: full images cross processes once
            found_by = self._on_torch(lambda: a.detector)
            if detector_identity is not None and found_by != detector_identity:
                raise RuntimeError(f"this actor's detector is {found_by}, the run's is {detector_identity}")
        self.decode_here = gpu_decode or actor_decode  # JPEG bytes arrive (jpeg_bytes) and are decoded here
        self.throttle_s = throttle_s
        self.batches = 0
        if gpu_decode and a.device.type != "cuda":
            raise RuntimeError("--gpu-decode needs CUDA in the annotator actors, but this actor runs on "
                               f"{a.device} (no GPU assigned to it by Ray, or torch.cuda.is_available() is False)")

    def _on_torch(self, fn, *args, **kwargs):
        return self._torch_thread.submit(fn, *args, **kwargs).result()

    def __call__(self, batch: dict) -> pa.Table:
        return self._on_torch(self._annotate, batch)

    def _annotate(self, batch: dict) -> pa.Table:
        if self.decode_here:
            batch = self._decode_here(batch)
        cols = self.annotator.annotate(batch)
        if self.throttle_s:
            time.sleep(self.throttle_s)
        table = self.annotator.to_table(cols)
        self.batches += 1
        if self.batches % heap.TRIM_EVERY_BATCHES == 0:
            heap.trim()  # a long-lived actor's freed pages back to the system (raytasks/heap.py)
        return table

    def _decode_here(self, batch: dict) -> dict:
        """``jpeg_bytes`` rows decoded on the actor's device (nvjpeg on a GPU) into ``image_0`` (whole images)
        or ``image`` (photos), which then stay there (raytasks/label/gpu_decode.py)."""
        batch = dict(batch)
        raw = batch.pop("jpeg_bytes")
        if all(d is None for d in raw):
            return batch
        a = self.annotator
        if "scale" in batch:
            return photos_on_device(batch, raw, a.face_options.max_side, a.device)
        (pre,) = a.preprocessings
        return images_on_device(batch, raw, pre, a.device)


def check_fence(batch: pa.Table, fence) -> pa.Table:
    """Map function right before the write (fused into the write task): the run still holds its output
    (raytasks/label/lease.py ``Fence``), else the task fails and nothing more is written."""
    fence.check()
    return batch


def commit_fence(fence, prefix: str, labels_fs, labels_root: str, commits_fs, commits_root: str) -> None:
    """The check of the lease at commit time, in the write task after its data file(s) are written and right
    before Ray renames its pending commit file to committed: when the run no longer holds its output (it stalled
    past its ttl and another run may have taken over, :class:`raytasks.label.lease.Fence`), the task deletes its
    own data files (``{prefix}*`` under ``labels_root``) and pending commit file and raises ``LeaseLost``, so a
    write that passed :func:`check_fence` before the stall leaves neither rows beside the other run's nor a data
    file that no commit names."""
    import posixpath

    from raytasks.label.lease import LeaseLost
    from raytasks.label.output import PENDING_SUFFIX

    try:
        fence.check()
    except LeaseLost:
        for info in labels_fs.get_file_info(pafs.FileSelector(labels_root, recursive=True, allow_not_found=True)):
            if info.type == pafs.FileType.File and posixpath.basename(info.path).startswith(prefix):
                labels_fs.delete_file(info.path)
        pending = posixpath.join(commits_root, prefix + PENDING_SUFFIX)
        if commits_fs.get_file_info(pending).type != pafs.FileType.NotFound:
            commits_fs.delete_file(pending)
        raise


def fenced_parquet_sink(path: str, filesystem, min_rows: int, max_rows: int, dataset_uuid: str | None, fence,
                        commits_fs, commits_root: str):
    """``Dataset.write_parquet``'s datasink with :func:`commit_fence` after each task's write (which Ray follows
    with the commit)."""
    from ray.data._internal.datasource.parquet_datasink import ParquetDatasink
    from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME
    from ray.data._internal.util import _validate_rows_per_file_args
    from ray.data.datasource.filename_provider import _split_base_and_ext

    lo, hi = _validate_rows_per_file_args(num_rows_per_file=None, min_rows_per_file=min_rows,
                                          max_rows_per_file=max_rows)

    class FencedParquetDatasink(ParquetDatasink):
        def write(self, blocks, ctx) -> None:
            super().write(blocks, ctx)
            name = self.filename_provider.get_filename_for_task(ctx.kwargs[WRITE_UUID_KWARG_NAME], ctx.task_idx)
            commit_fence(fence, _split_base_and_ext(name)[0], self.filesystem, self.path, commits_fs, commits_root)

    return FencedParquetDatasink(path, filesystem=filesystem, min_rows_per_file=lo, max_rows_per_file=hi,
                                 dataset_uuid=dataset_uuid)


def build_dataset(spec, labeler, paths_ds, base: str | None, pool: tuple[int, int], fence=None):
    """paths -> decoded batches (CPU tasks) -> annotator actors -> rows [-> the lease's fence, checked in the
    write task]. ``labeler``: what the run resolved (raytasks/label/labeler.py; its model set as read once per
    run, the distinct preprocessings, the detector's and the rows' identities)."""
    import ray

    faces = spec.face_options().to_dict()
    pre_dicts = labeler.pre_dicts
    ds = paths_ds.map_batches(read_and_decode, batch_format="pyarrow", batch_size=spec.batch_size,
                              fn_kwargs={"faces": faces, "pre_dicts": pre_dicts, "base": base,
                                         "jpegs_to_actor": spec.decode_in_actor(), "allow": spec.allow_prefix or None},
                              num_cpus=1, memory=decode_memory(spec.batch_size, faces, pre_dicts))
    if spec.limit is not None:
        ds = ds.limit(spec.limit)
    actor_args = {"model_set": labeler.model_set.to_dict(), "faces": faces, "precision": spec.precision,
                  "threads": max(1, int(spec.cpus_per_actor)), "gpu_decode": spec.gpu_decode,
                  "actor_decode": spec.actor_decode,
                  "throttle_s": spec.throttle_s, "fold_bn": spec.fold_bn,
                  "compile_batch": spec.batch_size if spec.compile else None,
                  "detector_identity": labeler.detector if labeler.options.detect else None,
                  "identity": labeler.identity,
                  "review": spec.review_thresholds().to_dict(), "gpu_share": spec.gpus_per_actor}
    resources = {"num_gpus": spec.gpus_per_actor} if spec.gpus_per_actor > 0 else {"num_cpus": spec.cpus_per_actor}
    # the actors get worker processes of their own (measured faster: raytasks/threads.py)
    ds = ds.map_batches(AnnotatorActor, fn_constructor_kwargs=actor_args, batch_format="numpy",
                        batch_size=spec.batch_size, runtime_env=runtime_env(),
                        compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]), **resources)
    if fence is not None:
        ds = ds.map_batches(check_fence, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                            fn_kwargs={"fence": fence})
    return ds
