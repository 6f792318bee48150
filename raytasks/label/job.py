"""Bulk labeling with Ray Data: a folder, prefix or manifest of images -> one Parquet row per image.

    label(LabelSpec(checkpoint="s3://b/models/dmm.pt", input="s3://b/photos/", output="s3://b/labels/run-1/"))

The pipeline reads as a chain (see :func:`build_dataset`)::

    read_parquet(paths) -> [Ray's CheckpointFilter] -> map_batches(load_and_decode)      CPU tasks
                        -> map_batches(PredictorActor, ActorPoolStrategy(min, max))    one model per actor
                        -> write_parquet(OUTPUT/labels/)                               committed per file

What goes in
    ``--input`` is a folder or ``s3://`` prefix, read recursively, or a manifest: a ``.parquet`` or ``.csv``
    file with a ``path`` column (absolute paths or ``s3://`` URIs; relative ones are resolved against the
    manifest's folder). In a folder, an input image is

    * every file whose extension is an image extension (``facedata.storage.IMAGE_EXTENSIONS``), whatever it
      holds: a ``.jpg`` that is empty, text or truncated becomes an error row, not a silent skip;
    * every other file whose first bytes are a JPEG, PNG, GIF, BMP, WebP or TIFF signature (a photo saved
      without extension, ``IMG_0001.JPG.bak``). Other files (text, JSON, videos, our own Parquet) are not
      inputs and are only counted in the summary (``skipped_not_image``). Hidden names (``.x``) are skipped.

    A manifest's paths are all inputs, whatever their extension. The folder is listed by streaming
    (``os.walk`` locally, the S3 ``ListObjectsV2`` paginator for buckets: pyarrow's ``get_file_info`` and Ray's
    ``read_binary_files`` both build the whole listing in one process) into ``OUTPUT/_inputs/part-*.parquet``
    of at most ``LISTING_CHUNK`` paths each, so the driver never holds all paths; a manifest's ``path``
    column is streamed into the same listing, one row per distinct file: ``a.jpg``, ``./a.jpg`` and
    ``/abs/a.jpg`` are one file (``inputs.normalize_path``), labeled once under its first spelling, and the
    summary counts the other rows in ``duplicates``. Either way the pipeline starts from a dataset of paths, so a resumed
    run skips finished images without reading their bytes.

What comes out (the schema is ``Predictor.schema``, documented in docs/schema.md)
    ``OUTPUT/labels/*.parquet``: exactly one row per input image, error rows included, at most
    ``--max-rows-per-file`` rows per file (Ray Data's ``write_parquet``; bounded size).
    ``pandas.read_parquet(OUTPUT)`` reads the labels: pyarrow's dataset discovery ignores the ``_``-prefixed
    bookkeeping next to them: ``_checkpoint/`` (Ray Data's committed row ids), ``_inputs/`` (the listing of a
    folder input), ``_lease/`` (the lease of the run writing it) and ``_summary.json`` (the summary printed
    at the end).

Resumable and idempotent: Ray Data's row-level checkpointing (``DataContext.checkpoint_config``, Ray 2.60)
    with ``id_column="path"``. Every write task first writes a *pending* checkpoint file naming the paths it
    is about to write, then its Parquet file(s), then renames the pending file to *committed*. A run that
    is killed leaves committed files (complete data) and maybe pending ones (data possibly partial). The next
    run, before reading anything, deletes each pending checkpoint's data files and the pending file itself
    (Ray's ``_clean_pending_checkpoints``), loads the committed paths into the object store (not the driver),
    and drops those paths right after the read (a ``CheckpointFilter`` actor), so every path is written
    exactly once across all runs; a run over a finished output writes nothing. On S3 the rename is a copy
    then a delete; a kill between the two leaves both files, and the data file is complete (the commit only
    starts after it is written), so :func:`repair_checkpoints` deletes such pending files before Ray's
    cleanup would wrongly delete the data. The checkpoint is kept after success
    (``delete_checkpoint_on_success=False``): it is what makes a second run add nothing. The identity of a
    row is its path (a manifest's duplicates are dropped, see above), and files added to a folder after a run are
    labeled by the next run over the same output. Two runs on one output at the same time are refused: a run
    holds a lease on ``OUTPUT/_lease/`` (raytasks/label/lease.py: created atomically, renewed while it runs, taken
    over once expired when a run was killed).

    Ray's CheckpointFilter actor (present when the output already has rows) reserves one CPU; with CPU
    predictor actors the pipeline therefore needs their CPUs plus one for the decode and write tasks plus
    one for that filter (:func:`resolve_pool`). On a laptop the local Ray gets ``max(4, cores)`` logical CPUs.

Precision and devices: ``Predictor`` (core/predictor.py) loads the checkpoint once per actor and runs
    ``inference_mode``, ``channels_last`` and bf16 autocast (``--precision auto``: bf16 on CPUs and on GPUs
    that support it; ``fp32`` turns it off). ``--gpu-decode`` moves JPEG decoding into the GPU actor
    (``torchvision.io.decode_jpeg(device="cuda")``), see :func:`gpu_decode_batch`; it needs
    ``--gpus-per-actor > 0`` and fails with a clear error otherwise. It has not run on a GPU yet; the same
    code path (decode_jpeg and the resize in torch) is tested on the CPU.

One output holds the rows of one checkpoint: a run refuses an output whose rows came from another one.

Several models in one pass (core/modelset.py): ``--checkpoint`` given several times (``NAME=URI``), or
``--model-set FILE``, and/or ``--embedding``. Each photo is still listed, read, decoded and searched for faces
once; one actor holds every model of the set (and the embedding network) on its device, aligns each face once
per distinct face template and runs every model on its crop: one row per face with a struct column per model.
Batch sizes: ``--batch-size`` photos per decode task and per actor call; each model then runs all faces of
those photos in forward passes of at most 256 faces (``Predictor.max_batch``). With ``--faces whole`` the
decode tasks decode each image once per distinct preprocessing of the set. The rows' ``checkpoint`` is the
set's identity, so an output made with one set refuses another (a changed member, name, version or embedding).

What may be read: ``--allow-prefix`` (repeatable; default: the manifest's own folder or bucket prefix, or the
input folder or prefix). A manifest row outside every allowed prefix (``/etc/passwd``, ``/proc/self/environ``,
``../../x``, another bucket, a symlink out of the folder) is an error row ``forbidden`` that is the same
whether or not the file exists; the job never touches it with its credentials.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from core.predictor import GEOMETRY_KEYS, Predictor, decode_batch
from facedata import storage
from facedata.inputs import (
    InputError,
    check_manifest,
    default_allow_prefix,
    fetch_chunks,
    is_manifest,
    resolve_path,
    write_listing,
    write_manifest_listing,
)
from raytasks.label.gpu_decode import gpu_decode_batch, jpeg_for_gpu
from raytasks.label.output import (
    output_paths,
    output_provenance,
    output_stats,
    repair_checkpoints,
)
from raytasks.threads import runtime_env, torch_executor

log = logging.getLogger(__name__)


class LabelError(InputError):
    """A problem with the command (bad flag, missing input, cluster without the resources asked for)."""

DECODE_FILE_BYTES = 4 * 1024 * 1024  # a photo's bytes plus PIL's (draft-reduced) decode buffer, for decode_memory
DECODE_PROCESS_BYTES = 384 * 1024 * 1024  # the decode worker itself (Python, torch, pyarrow, PIL): ~250-380 MB RSS


@dataclasses.dataclass
class LabelSpec:
    checkpoint: str | tuple[str, ...]  # one URI, or several (each URI or NAME=URI): a set
    input: str
    output: str
    batch_size: int | None = None  # images per batch; default 64 with --faces whole, 16 with detection
    min_actors: int = 1
    max_actors: int | None = None  # default: what the cluster fits, see resolve_pool
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    precision: str = "auto"  # auto | bf16 | fp32
    gpu_decode: bool = False
    compile: bool = False  # torch.compile in each actor, for batches of batch_size (core/predictor.py)
    fold_bn: bool = True  # conv+bn folded (models/inference.py)
    max_rows_per_file: int = 50_000
    limit: int | None = None  # label at most this many new images in this run
    throttle_s: float = 0.0  # sleep after each predictor batch (to demonstrate and test kill + resume)
    allow_prefix: tuple[str, ...] = ()  # what may be read (default: inputs.default_allow_prefix of --input)
    faces: dict = dataclasses.field(default_factory=dict)  # faces.pipeline.FaceOptions: mode, max_side, detector
    model_set: str | None = None  # a --model-set file (core/modelset.py), instead of checkpoint
    embedding: bool = False  # a 128-D face embedding per face (models/embedding.py); makes the job a set

    def __post_init__(self):
        if self.batch_size is None:
            self.batch_size = 16 if self.face_options().detect else 64

    def face_options(self):
        from faces.pipeline import FaceOptions

        try:
            return FaceOptions.from_dict(self.faces)
        except (ValueError, TypeError) as e:
            raise LabelError(f"face settings: {e}") from None

    def models(self):
        """The checkpoint(s) as a :class:`core.modelset.ModelSet` (one checkpoint alone is not a set)."""
        from core.modelset import ModelSet, ModelSetError

        try:
            return ModelSet.parse(None if self.model_set else self.checkpoint, self.model_set, self.embedding)
        except ModelSetError as e:
            raise LabelError(str(e)) from None

    def validate(self) -> None:
        if self.batch_size < 1:
            raise LabelError("--batch-size must be >= 1")
        if self.min_actors < 1 or (self.max_actors is not None and self.max_actors < self.min_actors):
            raise LabelError("need 1 <= --min-actors <= --max-actors")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise LabelError("--gpus-per-actor must be >= 0 and --cpus-per-actor > 0")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise LabelError("--precision must be auto, bf16 or fp32")
        if self.gpu_decode and self.gpus_per_actor <= 0:
            raise LabelError("--gpu-decode decodes JPEGs on the predictor's GPU: it needs --gpus-per-actor > 0")
        if self.max_rows_per_file < 1:
            raise LabelError("--max-rows-per-file must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise LabelError("--limit must be >= 1")
        if self.gpu_decode and self.models().is_set:
            raise LabelError("--gpu-decode decodes to one model's input size: it takes a single --checkpoint")
        if self.gpu_decode and self.face_options().detect:
            raise LabelError("--gpu-decode decodes to the model's input size and needs --faces whole; with face "
                             "detection, photos are decoded on the CPU decode tasks at a bounded size")


# ------------------------------------------------------------------------------------------------------
# CPU stage: bytes -> decoded uint8 images (or, with --gpu-decode, JPEG bytes checked for the GPU)
# ------------------------------------------------------------------------------------------------------

def _row_arrays(cols: dict) -> dict[str, pa.Array]:
    """The per-image columns every decoded batch carries (path, outcome, original size)."""
    return {
        "path": pa.array([str(p) for p in cols["path"]], pa.string()),
        "ok": pa.array(np.asarray(cols["ok"], dtype=bool)),
        "error_kind": pa.array(list(cols["error_kind"]), pa.string()),
        "error_message": pa.array(list(cols["error_message"]), pa.string()),
        "width": pa.array(np.asarray(cols["width"], dtype=np.int32)),
        "height": pa.array(np.asarray(cols["height"], dtype=np.int32)),
    }


def _decoded_table(cols: dict, images: np.ndarray, data: list | None = None) -> pa.Table:
    from ray.data.extensions import ArrowTensorArray

    n = len(cols["path"])
    arrays = {
        **_row_arrays(cols),
        "geometry": ArrowTensorArray.from_numpy(np.asarray(cols["geometry"], dtype=np.float64).reshape(n, 4)),
        "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images)),
    }
    if data is not None:
        arrays["gpu_bytes"] = pa.array(data, pa.binary())
    return pa.table(arrays)


def _photos_table(cols: dict) -> pa.Table:
    """A decoded batch of whole photos (``faces.pipeline.decode_photos``): the images are of different sizes,
    so the column is one of Ray's variable-shaped tensor arrays (rows that failed hold a 0x0 image)."""
    from ray.data.extensions import ArrowTensorArray

    images = [im if im is not None else np.zeros((3, 0, 0), np.uint8) for im in cols["image"]]
    arr = np.empty(len(images), dtype=object)
    arr[:] = images
    return pa.table({**_row_arrays(cols), "scale": pa.array(np.asarray(cols["scale"], dtype=np.float64)),
                     "image": ArrowTensorArray.from_numpy(arr)})


def load_and_decode_photos(batch: pa.Table, max_side: int, base: str | None = None,
                           allow: tuple[str, ...] | None = None) -> pa.Table:
    """Map function of the CPU stage with face detection: a batch of ``path`` rows -> whole photos decoded at
    a bounded size (``faces.pipeline.decode_photos``), read a bounded chunk at a time
    (``inputs.fetch_chunks``); a file that cannot be read is an ``unreadable`` (or ``forbidden``) row."""
    from faces.pipeline import decode_photos

    paths = [p if p is not None else "" for p in batch.column("path").to_pylist()]
    n = len(paths)
    cols = {"path": paths, "ok": np.zeros(n, bool), "error_kind": [None] * n, "error_message": [None] * n,
            "width": np.zeros(n, np.int32), "height": np.zeros(n, np.int32), "scale": np.ones(n),
            "image": [None] * n}
    for chunk in fetch_chunks([resolve_path(p, base) for p in paths], allow=allow):
        read = [(i, data) for i, (data, kind, message) in chunk if kind is None]
        for i, (_, kind, message) in chunk:
            if kind is not None:  # the read failed: its reason, not decode's "empty"
                cols["error_kind"][i], cols["error_message"][i] = kind, message
        sub = decode_photos([paths[i] for i, _ in read], [d for _, d in read], max_side)
        for j, (i, _) in enumerate(read):
            for k in cols:
                if k != "path":
                    cols[k][i] = sub[k][j]
    return _photos_table(cols)


def load_and_decode(batch: pa.Table, pre_dict: dict, base: str | None = None, gpu_decode: bool = False,
                    allow: tuple[str, ...] | None = None) -> pa.Table:
    """Map function of the CPU stage: a batch of ``path`` rows -> a decoded batch (``decode_batch``'s
    columns), reading the files concurrently. A file that cannot be read becomes an ``unreadable`` row.
    With ``gpu_decode``, JPEGs that the GPU can take (RGB or grey, within the pixel limit: checked from the
    header) travel as bytes in ``gpu_bytes`` and are decoded in the actor; everything else is decoded here."""
    from models.preprocess import Preprocessing

    pre = Preprocessing.from_dict(pre_dict)
    paths = [p if p is not None else "" for p in batch.column("path").to_pylist()]
    n = len(paths)
    c, (h, w) = pre.channels, pre.size
    cols = {"path": paths, "ok": np.zeros(n, bool), "error_kind": [None] * n, "error_message": [None] * n,
            "width": np.zeros(n, np.int32), "height": np.zeros(n, np.int32), "geometry": np.zeros((n, 4))}
    images = np.zeros((n, c, h, w), np.uint8)
    gpu_bytes = [None] * n if gpu_decode else None
    # files are read a bounded chunk at a time (inputs.fetch_chunks) and decoded before the next is read
    for chunk in fetch_chunks([resolve_path(p, base) for p in paths], allow=allow):
        cpu = []
        for i, (data, kind, message) in chunk:
            if kind is not None:  # the read failed: its reason, not decode's "empty"
                cols["error_kind"][i], cols["error_message"][i] = kind, message
            elif gpu_decode and jpeg_for_gpu(data, pre):
                gpu_bytes[i] = data
            else:
                cpu.append((i, data))
        sub = decode_batch([paths[i] for i, _ in cpu], [d for _, d in cpu], pre)
        for j, (i, _) in enumerate(cpu):
            for k in ("ok", "width", "height", "geometry"):
                cols[k][i] = sub[k][j]
            cols["error_kind"][i], cols["error_message"][i] = sub["error_kind"][j], sub["error_message"][j]
            images[i] = sub["image"][j]
    return _decoded_table(cols, images, gpu_bytes)


def load_and_decode_set(batch: pa.Table, pre_dicts: list[dict], base: str | None = None,
                        allow: tuple[str, ...] | None = None) -> pa.Table:
    """``--faces whole`` with a set: each file read once and decoded once per distinct preprocessing of the
    set (``modelset.decode_for_set``: ``image_<k>``, ``geometry_<k>``)."""
    from ray.data.extensions import ArrowTensorArray

    from core.modelset import decode_for_set
    from models.preprocess import Preprocessing

    pres = [Preprocessing.from_dict(d) for d in pre_dicts]
    paths = [p if p is not None else "" for p in batch.column("path").to_pylist()]
    n = len(paths)
    cols = {"path": paths, "ok": np.zeros(n, bool), "error_kind": [None] * n, "error_message": [None] * n,
            "width": np.zeros(n, np.int32), "height": np.zeros(n, np.int32)}
    images = [np.zeros((n, p.channels, *p.size), np.uint8) for p in pres]
    geometry = [np.zeros((n, 4)) for _ in pres]
    for chunk in fetch_chunks([resolve_path(p, base) for p in paths], allow=allow):
        read = [(i, data) for i, (data, kind, message) in chunk if kind is None]
        for i, (_, kind, message) in chunk:
            if kind is not None:
                cols["error_kind"][i], cols["error_message"][i] = kind, message
        sub = decode_for_set([paths[i] for i, _ in read], [d for _, d in read], pres)
        for j, (i, _) in enumerate(read):
            for k in ("ok", "width", "height", "error_kind", "error_message"):
                cols[k][i] = sub[k][j]
            for k in range(len(pres)):
                images[k][i], geometry[k][i] = sub[f"image_{k}"][j], sub[f"geometry_{k}"][j]
    arrays = _row_arrays(cols)
    for k in range(len(pres)):
        arrays[f"image_{k}"] = ArrowTensorArray.from_numpy(images[k])
        arrays[f"geometry_{k}"] = ArrowTensorArray.from_numpy(geometry[k])
    return pa.table(arrays)


# ------------------------------------------------------------------------------------------------------
# The model stage
# ------------------------------------------------------------------------------------------------------

class PredictorActor:
    """``map_batches`` class: the checkpoint (``Predictor``) or every model of a set (``SetPredictor``)
    loaded once per actor; a decoded batch in, rows of the predictor's ``schema`` out (a ``pyarrow.Table``)."""

    def __init__(self, checkpoint: str | None, precision: str = "auto", device: str | None = None,
                 threads: int | None = None, gpu_decode: bool = False, throttle_s: float = 0.0,
                 compile_batch: int | None = None, fold_bn: bool = True, faces: dict | None = None,
                 detector_identity: str | None = None, checkpoint_hash: str | None = None,
                 model_set: dict | None = None):
        from core.modelset import SetPredictor
        from faces.pipeline import FaceFinder, FaceOptions

        # all torch work on one thread: Ray calls __init__ on the main thread and __call__ on another
        self._torch_thread = torch_executor("predictor")
        if model_set is not None:
            checkpoint = f"the model set {model_set.get('name')}"
            self.predictor = self._torch_thread.submit(
                SetPredictor, model_set, device=device, precision=precision, threads=threads, fold_bn=fold_bn,
                compile_batch=compile_batch).result()
        else:
            self.predictor = self._torch_thread.submit(
                Predictor, checkpoint, device=device, precision=precision, channels_last=True, threads=threads,
                fold_bn=fold_bn, compile_batch=compile_batch).result()
        if checkpoint_hash is not None and self.predictor.checkpoint_hash != checkpoint_hash:
            # the object at --checkpoint was replaced after the run resolved it: never mix two models' rows
            raise RuntimeError(f"{checkpoint} now holds {self.predictor.checkpoint_hash}, not the {checkpoint_hash} "
                               "this run started with (was it overwritten during the run?); rerun the job")
        options = FaceOptions.from_dict(faces)
        self.finder = None
        if options.detect:  # the detector next to the model: full images cross between processes once
            self.finder = self._torch_thread.submit(FaceFinder, options, self.predictor.device).result()
            if detector_identity is not None and self.finder.identity != detector_identity:
                raise RuntimeError(f"this actor's detector is {self.finder.identity}, the run's is {detector_identity}")
        self.gpu_decode = gpu_decode
        self.throttle_s = throttle_s
        if gpu_decode and self.predictor.device.type != "cuda":
            raise RuntimeError("--gpu-decode needs CUDA in the predictor actors, but this actor runs on "
                               f"{self.predictor.device} (torch.cuda.is_available() is False)")

    def __call__(self, batch: dict) -> pa.Table:
        return self._torch_thread.submit(self._predict, batch).result()

    def _predict(self, batch: dict) -> pa.Table:
        if self.finder is not None:
            cols = self.predictor.predict_photos(batch, self.finder)
        else:
            if self.gpu_decode:
                batch = self._decode_on_gpu(batch)
            cols = self.predictor.predict_decoded(batch)
        if self.throttle_s:
            time.sleep(self.throttle_s)
        return self.predictor.to_table(cols)

    def _decode_on_gpu(self, batch: dict) -> dict:
        import torch

        from models.preprocess import ImageDecodeError, decode

        pre, device = self.predictor.preprocessing, self.predictor.device
        batch = dict(batch)
        raw = batch.pop("gpu_bytes")
        idx = [i for i, d in enumerate(raw) if d is not None]
        if not idx:
            return batch
        images = torch.tensor(np.asarray(batch["image"]), device=device)  # the CPU-decoded rows, on the GPU
        for k in ("ok", "error_kind", "error_message", "width", "height", "geometry"):
            batch[k] = np.array(batch[k], copy=True)  # Ray's batch arrays may be read-only views
        for i, res in zip(idx, gpu_decode_batch([bytes(raw[i]) for i in idx], pre, device)):
            if isinstance(res, Exception):  # nvjpeg refused it: the CPU decoder gives the label or the error
                try:
                    t, g = decode(bytes(raw[i]), pre)
                    res = (t.to(device), g)
                except ImageDecodeError as e:
                    batch["ok"][i], batch["error_kind"][i], batch["error_message"][i] = False, e.kind, e.message
                    continue
            img, g = res
            images[i] = img
            batch["ok"][i] = True
            batch["width"][i], batch["height"][i] = g["width"], g["height"]
            batch["geometry"][i] = [g[k] for k in GEOMETRY_KEYS]
        batch["image"] = images  # stays on the GPU: Predictor.predict_decoded takes a tensor as it is
        return batch


# ------------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------------

_LOCAL_RAY = False  # whether ensure_ray started the Ray this process uses (no autoscaler can add nodes)


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster (``RAY_ADDRESS``, set by ``ray job submit``) or start a local Ray with at
    least four logical CPUs (Ray's checkpoint filter actor takes one, see the module docstring)."""
    import ray

    global _LOCAL_RAY
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=max(4, os.cpu_count() or 1))
        _LOCAL_RAY = True


def resolve_pool(spec: LabelSpec, resuming: bool = False, can_grow: bool | None = None,
                 warn=print) -> tuple[int, int]:
    """``(min_size, max_size)`` of the predictor pool from the cluster's resources now. CPU actors leave one
    CPU for the decode and write tasks and one for Ray's checkpoint filter actor, which is there when the
    output already has rows (``resuming``); the default maximum leaves that room on every run, so that a
    laptop's cores are not shared by more model threads than they have.

    When the pool does not fit: on a Ray this process started (``can_grow`` False) nothing will add
    resources, so it is an error; on a cluster it is a warning, since the autoscaler adds nodes as Ray Data
    asks for them (a cluster whose GPU workers scale from zero has no GPU when the job starts; give
    ``--max-actors`` there, the default is what fits now)."""
    import ray

    can_grow = (not _LOCAL_RAY) if can_grow is None else can_grow
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if spec.gpus_per_actor > 0:
        fit = default = int(gpus // spec.gpus_per_actor)
        short = f"--gpus-per-actor {spec.gpus_per_actor:g} but the Ray cluster has {gpus:g} GPUs"
    else:
        spare = 1 + int(resuming)
        fit = int((cpus - spare) // spec.cpus_per_actor)
        default = int((cpus - 2) // spec.cpus_per_actor)
        short = (f"the Ray cluster has {cpus:g} CPUs: {spec.min_actors} predictor actor(s) of --cpus-per-actor "
                 f"{spec.cpus_per_actor:g} plus {spare} for the other steps")
    if spec.min_actors > fit:
        if not can_grow:
            raise LabelError(short + (" (run with --gpus-per-actor 0 to label on CPUs)" if spec.gpus_per_actor
                                      else f" do not fit (at most {max(fit, 0)} actors)"))
        warn(f"warning: {short}{'' if spec.gpus_per_actor else ' do not fit'} now; waiting for the autoscaler "
             "to add nodes")
    return spec.min_actors, spec.max_actors if spec.max_actors is not None else max(spec.min_actors, min(fit, default))


def decode_memory(batch_size: int, pre_dict: dict) -> int:
    """Memory a decode task reserves: the worker process (``DECODE_PROCESS_BYTES``, what Ray Data measured
    it using) and per image the file and PIL's decode buffer (``DECODE_FILE_BYTES``) and three copies of
    the model input (numpy, Arrow, serialisation). Besides keeping Ray from starting more
    decode tasks than memory holds, a reservation the actors do not have keeps Ray Data from fusing the decode
    into the predictor actors (ray.data's operator fusion needs equal remote arguments), so decoding scales
    as CPU tasks, apart from the model."""
    h, w = pre_dict["size"]
    return int(DECODE_PROCESS_BYTES + batch_size * (DECODE_FILE_BYTES + 3 * pre_dict["channels"] * h * w))


def photo_decode_memory(batch_size: int, max_side: int) -> int:
    """What a decode task reserves with face detection: the worker process and per photo its file, PIL's
    decode buffer and three copies of the decoded picture (at most ``max_side`` on its longest side; a 4:3
    photo uses 3/4 of the square's bytes, and a file's bytes are a fraction of its pixels')."""
    return int(DECODE_PROCESS_BYTES + batch_size * (DECODE_FILE_BYTES + 3 * 3 * max_side * max_side * 3 // 4))


def build_dataset(spec: LabelSpec, model_set, paths_ds, pre_dicts: list[dict], base: str | None,
                  pool: tuple[int, int], detector_identity: str | None = None, checkpoint_hash: str | None = None):
    """paths -> decoded batches (CPU tasks) -> predictor actors -> rows. ``model_set``: ``spec.models()`` as
    the run resolved it (a set file is read once per run); ``pre_dicts``: the model's preprocessing, or a
    set's distinct ones."""
    import ray

    threads = max(1, int(spec.cpus_per_actor))
    options = spec.face_options()
    pre_dict = pre_dicts[0]
    if options.detect:
        ds = paths_ds.map_batches(load_and_decode_photos, batch_format="pyarrow", batch_size=spec.batch_size,
                                  fn_kwargs={"max_side": options.max_side, "base": base,
                                             "allow": spec.allow_prefix or None}, num_cpus=1,
                                  memory=photo_decode_memory(spec.batch_size, options.max_side))
    elif model_set.is_set:
        ds = paths_ds.map_batches(load_and_decode_set, batch_format="pyarrow", batch_size=spec.batch_size,
                                  fn_kwargs={"pre_dicts": pre_dicts, "base": base, "allow": spec.allow_prefix or None},
                                  num_cpus=1, memory=sum(decode_memory(spec.batch_size, d) for d in pre_dicts))
    else:
        ds = paths_ds.map_batches(load_and_decode, batch_format="pyarrow", batch_size=spec.batch_size,
                                  fn_kwargs={"pre_dict": pre_dict, "base": base, "gpu_decode": spec.gpu_decode,
                                             "allow": spec.allow_prefix or None},
                                  num_cpus=1, memory=decode_memory(spec.batch_size, pre_dict))
    if spec.limit is not None:
        ds = ds.limit(spec.limit)
    actor_args = {"checkpoint": None if model_set.is_set else model_set.members[0][1],
                  "model_set": model_set.to_dict() if model_set.is_set else None, "precision": spec.precision, "threads": threads,
                  "gpu_decode": spec.gpu_decode, "throttle_s": spec.throttle_s, "fold_bn": spec.fold_bn,
                  "compile_batch": spec.batch_size if spec.compile else None, "faces": options.to_dict(),
                  "detector_identity": detector_identity, "checkpoint_hash": checkpoint_hash}
    resources = {"num_gpus": spec.gpus_per_actor} if spec.gpus_per_actor > 0 else {"num_cpus": spec.cpus_per_actor}
    # the predictor actors get worker processes of their own (measured faster: raytasks/threads.py)
    return ds.map_batches(PredictorActor, fn_constructor_kwargs=actor_args, batch_format="numpy",
                          batch_size=spec.batch_size, runtime_env=runtime_env(),
                          compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]), **resources)


def label(spec: LabelSpec, echo=print) -> dict:
    """Run the label job (see the module docstring); returns the summary, also written to
    ``OUTPUT/_summary.json``. Holds a lease on ``--output`` for the whole run (raytasks/label/lease.py): a second
    live run on the same output is refused, naming the holder."""
    from raytasks.label.lease import Lease, LeaseError

    spec.validate()
    spec = dataclasses.replace(spec, allow_prefix=tuple(spec.allow_prefix) or (default_allow_prefix(spec.input),))
    lease = Lease(spec.output)
    try:
        lease.acquire()
    except LeaseError as e:
        raise LabelError(str(e)) from None
    try:
        summary = _label(spec, echo)
    except InputError as e:
        if isinstance(e, LabelError):
            raise
        raise LabelError(str(e)) from None
    finally:
        lease.release()
    if lease.lost:
        raise LabelError(f"this run lost its lease on {spec.output} (stalled past its expiry, another run took "
                         "over): its rows may overlap with that run's; run the same command again to check")
    return summary


def _label(spec: LabelSpec, echo=print) -> dict:
    import ray
    from ray.data.checkpoint import CheckpointConfig

    from core.modelset import ModelSetError, resolve_set
    from models.checkpoint import CheckpointError, load_checkpoint
    from models.embedding import EmbeddingUnavailable

    spec.validate()
    start = time.perf_counter()
    model_set = spec.models()
    members = None
    try:
        if model_set.is_set:  # every checkpoint read and hashed here: a bad one fails before any work
            resolved = resolve_set(model_set)
            identity, members = resolved.identity, resolved.describe()
            pre_dicts = [p.to_dict() for p in resolved.preprocessings]
            model_name, checkpoint_name = model_set.name, f"the model set {model_set.name}"
            parts = [n + "=" + a for n, a in zip(resolved.names, resolved.architectures)]
            what = f"the set {model_set.name!r} ({', '.join(parts + (['embedding'] if resolved.embedding else []))})"
        else:
            checkpoint_name = model_set.members[0][1]
            model, info = load_checkpoint(checkpoint_name)
            identity, model_name, pre_dicts = info.hash, info.model, [model.preprocessing.to_dict()]
            what = f"{info.model} {info.short_hash()}"
            del model
    except (CheckpointError, ModelSetError, EmbeddingUnavailable) as e:
        raise LabelError(str(e)) from None
    options = spec.face_options()
    detector = "whole"
    if options.detect:  # loads the detector's weights once here: a missing or altered package fails now
        from faces.pipeline import FaceFinder

        detector = FaceFinder(options).identity
    out = output_paths(spec.output)
    ensure_ray()
    ck_fs, ck_path = storage.filesystem(out["checkpoint"])
    resuming = any(i.type == pafs.FileType.File for i in
                   ck_fs.get_file_info(pafs.FileSelector(ck_path, allow_not_found=True)))
    pool = resolve_pool(spec, resuming, warn=echo)

    base = None
    listing = None
    if is_manifest(spec.input):
        check_manifest(spec.input)
        base = posixpath.dirname(spec.input) if storage.is_s3(spec.input) else os.path.dirname(os.path.abspath(spec.input))
        listing = write_manifest_listing(spec.input, out["inputs"], base)  # one row per distinct file
        inputs = listing.inputs
    else:
        if not storage.is_dir(spec.input):
            raise LabelError(f"--input {spec.input} is neither a folder/prefix nor a .parquet/.csv manifest")
        listing = write_listing(spec.input, out["inputs"])
        inputs = listing.inputs
    if inputs == 0:
        raise LabelError(f"no images in {spec.input}" + (f" ({listing.files} files, none an image)" if listing else ""))

    removed = repair_checkpoints(out["checkpoint"])
    if removed:
        echo(f"repaired {removed} checkpoint file(s) left by an interrupted commit")
    before = output_stats(out["labels"])
    if before.rows:
        previous, previous_detectors = output_provenance(out["labels"])
        if previous != {identity}:
            raise LabelError(f"{spec.output} holds rows of checkpoint(s) {', '.join(sorted(map(str, previous)))}; "
                             f"{checkpoint_name} is {identity}: label with another checkpoint (or set) into another "
                             "--output")
        if previous_detectors != {detector}:
            raise LabelError(f"{spec.output} holds rows whose faces were found by "
                             f"{', '.join(map(repr, sorted(map(str, previous_detectors))))}; this run finds them by "
                             f"{detector!r}: use the same --faces and detector settings, or another --output")
    echo(f"labeling {spec.input}: {inputs} images ({before.images} already labeled in {spec.output}) with "
         f"{what}, faces: {options.mode}, predictor actors {pool[0]}..{pool[1]}")

    ctx = ray.data.DataContext.get_current()
    labels_fs, labels_path = storage.filesystem(out["labels"])
    old_config, old_v2 = ctx.checkpoint_config, ctx.use_datasource_v2
    ctx.checkpoint_config = CheckpointConfig(id_column="path", checkpoint_path=ck_path,
                                             delete_checkpoint_on_success=False, override_filesystem=ck_fs)
    # Ray 2.60's V2 Parquet reader spends 5-10 s in its ListFiles step per dataset here (measured: a
    # read_parquet + map_batches of one small file takes 8-10 s with V2, 0.2 s with V1); our reads are a
    # few small path files, and the checkpoint filter supports both.
    ctx.use_datasource_v2 = False
    try:
        in_fs, in_path = storage.filesystem(out["inputs"])
        paths_ds = ray.data.read_parquet(in_path, filesystem=in_fs).select_columns(["path"])
        ds = build_dataset(spec, model_set, paths_ds, pre_dicts, base, pool, detector if options.detect else None,
                           identity)
        ds.write_parquet(labels_path, filesystem=labels_fs, max_rows_per_file=spec.max_rows_per_file,
                         min_rows_per_file=max(1, spec.max_rows_per_file // 2))
    finally:
        ctx.checkpoint_config, ctx.use_datasource_v2 = old_config, old_v2

    seconds = time.perf_counter() - start
    after = output_stats(out["labels"])
    written = after.images - before.images
    summary = {
        "input": spec.input, "output": spec.output, "labels": out["labels"],
        "checkpoint": checkpoint_name, "model": model_name, "checkpoint_hash": identity, "models": members,
        "faces_mode": options.mode, "detector": detector,
        "precision": spec.precision, "inputs": inputs,
        "files_listed": listing.files if not is_manifest(spec.input) else None,
        "skipped_not_image": listing.skipped_not_image if not is_manifest(spec.input) else None,
        "duplicates": listing.duplicates,
        "images_before": before.images, "images_written": written, "images_total": after.images,
        "ok_total": after.ok_images, "errors_by_kind": dict(sorted(after.errors.items())),
        "faces_total": after.faces if options.detect else None,
        "images_without_faces": after.without_faces if options.detect else None,
        "rows_before": before.rows, "rows_written": after.rows - before.rows, "rows_total": after.rows,
        "complete": after.images >= inputs, "seconds": round(seconds, 3),
        "images_per_s": round(written / seconds, 2) if seconds > 0 else None,
        "faces_per_s": round((after.faces - before.faces) / seconds, 2) if seconds > 0 and options.detect else None,
    }
    storage.write_bytes(out["summary"], (json.dumps(summary, indent=2) + "\n").encode())
    errors = ", ".join(f"{k} {v}" for k, v in summary["errors_by_kind"].items()) or "none"
    found = (f"{after.faces} faces ({after.without_faces} images without a face), " if options.detect else "")
    echo(f"labeled {written} images in {seconds:.1f} s ({summary['images_per_s']} images/s); output holds "
         f"{after.rows} rows for {after.images} of {inputs} inputs: {found}{after.ok_images} images read, "
         f"errors: {errors}")
    if after.images < inputs:
        echo(f"{inputs - after.images} inputs are not labeled yet: run the same command again to finish")
    echo(f"summary: {out['summary']}")
    return summary
