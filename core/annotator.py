"""Decoded pictures -> faces -> every model -> rows: the one orchestrator of label and serve (evaluate does
not use it: it runs one model over a data set, core/evaluation.py, finding faces with the same finder).

    ann = Annotator(ModelSet.parse(["agr=agr.pt", "celeba=dmm.pt"], embedding=True), faces={"mode": "detect"})
    rows = ann.annotate_bytes([("team.jpg", data)])          # one row per face, every model's fields

As insightface's ``FaceAnalysis.get``: faces are found once per photo (``faces.finder.FaceFinder``), each
face is aligned once per distinct face template (models that share a preprocessing share the crop), and
every model adds its fields to the face's row; the face embedding is one more member. A single checkpoint
is a set of one whose rows keep the flat layout (its output fields as columns, ``model`` and
``checkpoint`` its architecture and hash); a set writes one struct column per model and its name and
identity (core/modelset.py, docs/schema.md). The columns are built in core/rows.py only.

Two inputs, both decoded batches of facedata/decode.py: photos (``scale`` and ``image``, faces found
here) or whole images (``image_<k>`` and ``geometry_<k>`` per entry of :attr:`preprocessings`: the image
is the face). The label job's actors and the serving replicas call :meth:`annotate`.

One image cannot fail its batch (core/failures.py): when the detector or a model raises on a batch, each image
is run again alone, and one that fails alone gets a ``model_error`` row.

On one device: a GPU holds the whole set (the five models are 3-100 MB of weights each, plus activations
of at most ``max_batch`` faces per forward pass); when it does not, loading fails naming each model's size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from core.failures import ImageFailed, concat_columns, failed_batch, image_by_image_on_failure
from core.modelset import MEMBER_PROVENANCE, ModelSet, ModelSetError, member_names, set_identity
from core.rows import (
    EMBEDDING_FIELDS,
    FACE_FIELDS,
    IMAGE_FIELDS,
    QUALITY_FIELDS,
    WHOLE,
    Face,
    build_rows,
    row_dicts,
)
from core.runner import ModelRunner, limit_gpu_memory, resolve_device
from facedata.decode import Photos, Whole, decode_batch
from faces.finder import FaceFinder, FaceOptions
from faces.quality import ReviewThresholds, face_quality, low_confidence_reasons, quality_crops
from models.outputs import Categorical
from models.photo import axis_scales
from models.preprocess import photo_tensor

CHECK_EVERY = 64  # with a ``check`` (serving), a model runs on this many faces between two checks


class Annotator:
    """Every model of a set (a single checkpoint is a set of one) and the detector, loaded once on one
    device. ``models``: a :class:`ModelSet`, its ``to_dict()``, or one checkpoint URI. ``faces``: how faces
    are found (``faces.finder.FaceOptions``); the detector is loaded on first use. ``gpu_share``: the
    fraction of a GPU this process was given (a label actor's ``--gpus-per-actor``, a replica's ``num_gpus``):
    below 1, torch may use that fraction of the GPU's memory (``core.runner.limit_gpu_memory``)."""

    def __init__(self, models: ModelSet | dict | str, faces: FaceOptions | dict | None = None,
                 device: str | None = None, precision: str = "auto", channels_last: bool = True,
                 threads: int | None = None, fold_bn: bool = True, compile_batch: int | None = None,
                 max_batch: int = 256, review: ReviewThresholds | dict | None = None,
                 gpu_share: float | None = None):
        if isinstance(models, str):
            models = ModelSet(((None, models),))
        self.model_set = models if isinstance(models, ModelSet) else ModelSet.from_dict(models)
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        # once, before anything of this process is on the device (the models below, the detector later)
        self.gpu_memory_limited = limit_gpu_memory(self.device, gpu_share)
        self.face_options = faces if isinstance(faces, FaceOptions) else FaceOptions.from_dict(faces)
        self.review = review if isinstance(review, ReviewThresholds) else ReviewThresholds.from_dict(review or {})
        self._finder: FaceFinder | None = None
        runners: list[ModelRunner] = []
        self.embedder = None
        try:
            for _, uri in self.model_set.members:
                runners.append(ModelRunner(uri, device=str(self.device), precision=precision,
                                           channels_last=channels_last, fold_bn=fold_bn,
                                           compile_batch=compile_batch, max_batch=max_batch))
            if self.model_set.embedding:
                from models.embedding import FaceEmbedder

                self.embedder = FaceEmbedder(self.device, batch=max_batch)
        except torch.OutOfMemoryError as e:
            sizes = ", ".join(f"{r.architecture} {r.parameter_bytes / 2**20:.0f} MB" for r in runners)
            raise ModelSetError(f"the set does not fit on {self.device} (loaded so far: {sizes or 'none'}): split it "
                                f"into two sets labelled by two jobs, or use a larger device ({str(e)[:200]})") from None
        self.flat = not self.model_set.is_set
        names = member_names(self.model_set, [r.architecture for r in runners])
        self.members: dict[str, ModelRunner] = dict(zip(names, runners))
        self.embedding_identity = self.embedder.identity if self.embedder else None
        if self.flat:
            (runner,) = runners
            self.name, self.identity = runner.architecture, runner.checkpoint_hash
            model_fields = list(runner.output_fields)
        else:
            self.name = self.model_set.name
            self.identity = set_identity(self.model_set.name, self.model_set.version,
                                         [(n, r.checkpoint_hash) for n, r in self.members.items()],
                                         self.embedding_identity)
            self.structs = {n: _member_struct(r) for n, r in self.members.items()}
            model_fields = [pa.field(n, t) for n, t in self.structs.items()]
            model_fields += EMBEDDING_FIELDS if self.embedder else []
        self.schema = pa.schema(IMAGE_FIELDS + FACE_FIELDS + QUALITY_FIELDS + model_fields)
        self.precision = runners[0].precision if runners else "fp32"
        self.preprocessings = []  # distinct, in member order then the embedder's: whole images decode once each
        for pre in [r.preprocessing for r in runners] + ([self.embedder.preprocessing] if self.embedder else []):
            if pre not in self.preprocessings:
                self.preprocessings.append(pre)
        # small_face: what these models need; low_detection_score: what this detector's scores mean
        self.review = self.review.resolve(self.preprocessings, self.face_options.detector_config().network)

    # -- what it is ---------------------------------------------------------------------------------------
    @property
    def finder(self) -> FaceFinder:
        """The detector, loaded on first use on the models' device."""
        if self._finder is None:
            self._finder = FaceFinder(self.face_options, self.device)
        return self._finder

    @property
    def detector(self) -> str:
        """The rows' ``detector`` for photos (``whole`` for whole images)."""
        return self.finder.identity

    def describe(self) -> list[dict]:
        """Name, architecture and checkpoint hash of every member, then the embedding's."""
        out = [{"name": n, "model": r.architecture, "checkpoint": r.checkpoint_hash} for n, r in self.members.items()]
        if self.embedding_identity:
            model, checkpoint = self.embedding_identity.split(" ", 1)
            out.append({"name": "embedding", "model": model, "checkpoint": checkpoint})
        return out

    def warm_up(self) -> None:
        """One forward pass of every network on a dummy batch, the detector's too when it is loaded, and each
        model's columns of it (its output heads and calibration): the kernels' plans (oneDNN, cuDNN) and the
        allocator's pools are built before the first request, not in it (a serving replica is ready only once
        they are: the first request after a deploy took 7.6 s when only the model was warmed, issue #22). Also
        the probe that tells a broken network from a bad image (:meth:`_healthy`)."""
        if self._finder is not None:
            side = min(640, self.face_options.max_side)
            self._finder.find([torch.zeros((3, side * 3 // 4, side), dtype=torch.uint8)], [1.0])
        for r in self.members.values():
            r.columns(torch.zeros((1, r.preprocessing.channels, *r.preprocessing.size), dtype=torch.uint8),
                      [{"sx": 1.0, "sy": 1.0, "tx": 0.0, "ty": 0.0}])
        if self.embedder is not None:
            pre = self.embedder.preprocessing
            self.embedder.embed(torch.zeros((1, pre.channels, *pre.size), dtype=torch.uint8))

    # -- rows ---------------------------------------------------------------------------------------------
    def annotate(self, batch: dict, check: Callable[[], None] | None = None) -> dict[str, list]:
        """A decoded batch (facedata/decode.py) -> the columns of :attr:`schema`: photos one row per face,
        whole images one row per image; a failed image keeps one row.

        ``check`` (a serving replica's: the requests' deadline) is called after detection, before each model
        and between chunks of :data:`CHECK_EVERY` faces; what it raises stops the work, so no further model
        runs. Photos whose faces were already found (:meth:`find`) carry them in ``batch["found"]``; an image
        whose entry is :class:`ImageFailed` gets its ``model_error`` row. An image that fails alone gets one
        too (module docstring)."""
        if "found" in batch:
            failed = {i: f.message for i, f in enumerate(batch["found"]) if isinstance(f, ImageFailed)}
            batch = failed_batch(batch, failed) if failed else batch
        run = self._photos if "scale" in batch else self._whole
        return image_by_image_on_failure(batch, run, check, concat_columns,
                                         lambda one, why, c: run(failed_batch(one, {0: why}), c),
                                         before_retry=self._release_device_memory, healthy=self._healthy)

    def find(self, batch: dict) -> list:
        """The faces of every picture of a decoded photo batch (``faces.detect.Faces``; None for a failed
        image, :class:`ImageFailed` for one the detector fails on alone), before any model runs: what a serving
        replica counts against a request's budget of faces, then gives back to :meth:`annotate` as
        ``batch["found"]``."""
        def run(b: dict, _check) -> list:
            keep, images, scales = _pictures(b)
            out: list = [None] * len(b["ok"])
            for i, f in zip(keep, self.finder.find(images, scales) if images else []):
                out[i] = f
            return out

        return image_by_image_on_failure(batch, run, None, lambda parts: [p[0] for p in parts],
                                         lambda one, why, c: [ImageFailed(why)],
                                         before_retry=self._release_device_memory, healthy=self._healthy)

    def _healthy(self) -> bool:
        """Whether every network still runs on a dummy input (:meth:`warm_up`): after a batch whose every image
        failed, this tells the images' fault from the models' or the device's (core/failures.py)."""
        try:
            self.warm_up()
        except Exception:  # noqa: BLE001 - any failure here is the networks', whatever its kind
            return False
        return True

    def _release_device_memory(self) -> None:
        """After a failed batch on a GPU (its memory, most often), before the images are tried alone."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _columns(self, r: ModelRunner, inputs: torch.Tensor, geometry: list[dict],
                 check: Callable[[], None] | None) -> dict[str, list]:
        """``r.columns``, in chunks of :data:`CHECK_EVERY` faces with ``check`` before each when given."""
        if check is None:
            return r.columns(inputs, geometry)
        parts = []
        for i in range(0, max(1, len(inputs)), CHECK_EVERY):
            check()
            parts.append(r.columns(inputs[i:i + CHECK_EVERY], geometry[i:i + CHECK_EVERY]))
        return concat_columns(parts)

    def _embed(self, inputs: torch.Tensor, check: Callable[[], None] | None) -> list:
        if check is not None:
            check()
        return self.embedder.embed(inputs).tolist() if len(inputs) else []

    def annotate_bytes(self, items: list[tuple[str, bytes]], faces: str | None = None) -> list[dict]:
        """``[(name, bytes)]`` -> row dicts (tests, scripts, notebooks): ``faces`` ``detect`` or ``whole``
        (default: the annotator's face options)."""
        mode = faces or self.face_options.mode
        target = Photos(self.face_options.max_side) if mode == "detect" else Whole(tuple(self.preprocessings))
        return row_dicts(self.annotate(decode_batch([p for p, _ in items], [d for _, d in items], target)))

    def to_table(self, cols: dict[str, list]) -> pa.Table:
        return pa.Table.from_pydict(cols, schema=self.schema)

    def confidences(self, outputs: dict[str, dict[str, list]], n: int) -> dict[str, torch.Tensor]:
        """Per face, the confidence of every categorical output (its ``<output>_prob``: the probability of
        the class given, calibrated when the checkpoint is), named ``<output>`` (``<member>.<output>`` in a
        set): what ``low_confidence:<name>`` review reasons read. DMM-CNN's 40 binary attributes are left
        out (a face has always some near 0.5): their ``<attribute>_prob`` columns are there to filter on."""
        out = {}
        for name, r in self.members.items():
            for o in r.model.outputs:
                if isinstance(o, Categorical):
                    values = outputs[name].get(f"{o.name}_prob") or [None] * n
                    out[o.name if self.flat else f"{name}.{o.name}"] = torch.tensor(
                        [float("nan") if v is None else float(v) for v in values], dtype=torch.float64)
        return out

    def _rows(self, batch: dict, detector: str, counts: list, slots: list, quality: dict[str, list],
              outputs: dict[str, dict[str, list]], embeddings: list | None) -> dict[str, list]:
        """Lay the models' outputs out (flat, or a struct per member) and build the rows."""
        if self.flat:
            (out,) = outputs.values()
            (runner,) = self.members.values()
            per_face = {f.name: out[f.name] for f in runner.output_fields}
            no_face = {f.name: None for f in runner.output_fields}
        else:
            per_face, no_face = {}, {}
            for name, r in self.members.items():
                fields = [f.name for f in r.output_fields]
                head = dict(zip(MEMBER_PROVENANCE, (r.architecture, r.checkpoint_hash)))
                n = len(next(iter(outputs[name].values()), []))
                per_face[name] = [{**head, **{f: outputs[name][f][j] for f in fields}} for j in range(n)]
                no_face[name] = {**head, **{f: None for f in fields}}
            if self.embedder is not None:
                per_face["embedding"] = embeddings
                per_face["embedding_model"] = [self.embedding_identity] * len(embeddings)
                no_face.update(embedding=None, embedding_model=self.embedding_identity)
        return build_rows(batch, self.schema.names, {"model": self.name, "checkpoint": self.identity}, detector,
                          counts, slots, quality, per_face, no_face)

    def _whole(self, batch: dict, check: Callable[[], None] | None = None) -> dict[str, list]:
        """Whole images: each ``ok`` image is one face; every model reads its own decoded input."""
        ok = np.asarray(batch["ok"], dtype=bool)
        idx = np.flatnonzero(ok)
        slots = [[] for _ in ok]
        for j, i in enumerate(idx):
            slots[i] = [(j, None)]
        outputs = {}
        for name, r in self.members.items():
            k = self.preprocessings.index(r.preprocessing)
            geometry = [dict(zip(("sx", "sy", "tx", "ty"), map(float, g))) for g in np.asarray(batch[f"geometry_{k}"])[idx]]
            outputs[name] = self._columns(r, _rows_of(batch[f"image_{k}"], idx), geometry, check)
        embeddings = None
        if self.embedder is not None:
            k = self.preprocessings.index(self.embedder.preprocessing)
            embeddings = self._embed(_rows_of(batch[f"image_{k}"], idx), check)
        # the image is the face: no points, so no size, pose or quality crop; only the models' confidence
        reasons = low_confidence_reasons(self.confidences(outputs, len(idx)), len(idx), self.review)
        quality = {f.name: [None] * len(idx) for f in QUALITY_FIELDS}
        quality.update(review=[bool(r) for r in reasons], review_reasons=reasons)
        return self._rows(batch, WHOLE, [None] * len(ok), slots, quality, outputs, embeddings)

    def _photos(self, batch: dict, check: Callable[[], None] | None = None) -> dict[str, list]:
        """Photos: detection once for the batch (unless ``batch["found"]`` has it), alignment once per
        distinct template, every model on its own crops of every face."""
        ok = np.asarray(batch["ok"], dtype=bool)
        keep, images, scales = _pictures(batch)
        axes = _axis_scales(batch, keep, images, scales)  # (sx, sy): decoded -> original, each axis its own
        finder = self.finder
        # Each picture crosses to the device once: detection, every alignment and the quality crops read it there.
        images = [im.to(finder.device) for im in images]
        found = [batch["found"][i] for i in keep] if "found" in batch else finder.find(images, scales)
        if check is not None:
            check()
        aligned = {pre: finder.aligned(images, found, pre, axes) for pre in self.preprocessings}
        outputs = {}
        for name, r in self.members.items():
            a = aligned[r.preprocessing]
            outputs[name] = self._columns(r, a.inputs, [{"affine": m[:2].reshape(-1).tolist()} for m in a.maps],
                                          check)
        embeddings = None
        if self.embedder is not None:
            embeddings = self._embed(aligned[self.embedder.preprocessing].inputs, check)
        order = next(iter(aligned.values()))  # every alignment lists the faces in one order
        counts: list = [None] * len(ok)
        slots: list = [[] for _ in ok]
        for o, i in enumerate(keep):
            counts[i] = (len(found[o]), found[o].dropped)
        for j, (o, k) in enumerate(zip(order.owner, order.index)):
            f, s = found[o], torch.tensor(axes[o], dtype=torch.float64)
            slots[keep[o]].append((j, Face(k, float(f.scores[k]), (f.boxes[k].double() * s.repeat(2)).tolist(),
                                           (f.points[k].double() * s).reshape(-1).tolist())))
        quality = self._quality(images, found, scales, axes, self.confidences(outputs, len(order.owner)))
        return self._rows(batch, finder.identity, counts, slots, quality, outputs, embeddings)

    def _quality(self, images: list[torch.Tensor], found: list, scales: list[float],
                 axes: list[tuple[float, float]], confidences: dict[str, torch.Tensor]) -> dict[str, list]:
        """Size, pose, sharpness, brightness and the review flags of every face (faces/quality.py), in the
        alignments' order (picture by picture, then by score), computed once per batch. ``images`` are the
        pictures already on the device (moved once, in :meth:`_photos`); the points go to original pixels by
        ``axes`` (as the rows' ``face_points``), ``small_face`` divides by ``scales``."""
        with_faces = [o for o in range(len(images)) if len(found[o])]
        if not with_faces:
            return {f.name: [] for f in QUALITY_FIELDS}
        crops = torch.cat([quality_crops(images[o], found[o].points) for o in with_faces])
        points = torch.cat([found[o].points.double().cpu() * torch.tensor(axes[o], dtype=torch.float64)
                            for o in with_faces])  # face_size: original px
        scores = torch.cat([found[o].scores.cpu() for o in with_faces])
        # small_face reads the decoded picture's pixels (the models' crops are warped from it): face_size / scale
        per_face = torch.cat([torch.full((len(found[o]),), float(scales[o]), dtype=torch.float64) for o in with_faces])
        q = face_quality(points, crops, scores, confidences, self.review, scales=per_face)
        out = {f.name: q[f.name].tolist() for f in QUALITY_FIELDS if f.name != "review_reasons"}
        out["review_reasons"] = q["review_reasons"]
        return out


def _pictures(batch: dict) -> tuple[list[int], list[torch.Tensor], list[float]]:
    """A photo batch's decoded pictures: the indices of its ``ok`` images, their pixels and scales."""
    keep = [int(i) for i in np.flatnonzero(np.asarray(batch["ok"], dtype=bool))]
    return keep, [photo_tensor(batch["image"][i]) for i in keep], [float(batch["scale"][i]) for i in keep]


def _axis_scales(batch: dict, keep: list[int], images: list[torch.Tensor],
                 scales: list[float]) -> list[tuple[float, float]]:
    """Per kept picture, ``(sx, sy)`` from its decoded pixels to the original's (``models.photo.axis_scales``:
    the original ``width`` / ``height`` over the picture's), where the rows map boxes and points back; its
    ``scale`` for both when the batch lacks the original's size."""
    out = []
    for o, i in enumerate(keep):
        w, h = (int(batch[k][i]) if k in batch else 0 for k in ("width", "height"))
        im = images[o]
        out.append(axis_scales((w, h), (int(im.shape[-1]), int(im.shape[-2]))) if w > 0 and h > 0
                   else (scales[o], scales[o]))
    return out


def _rows_of(images, idx: np.ndarray) -> torch.Tensor:
    """The rows ``idx`` of a batch's images as a uint8 tensor (a tensor already on the GPU stays there: the
    label job's ``--gpu-decode``)."""
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(idx, device=images.device)]
    return torch.from_numpy(np.ascontiguousarray(np.asarray(images)[idx]))


def _member_struct(runner: ModelRunner) -> pa.DataType:
    """A member's struct: ``model``, ``checkpoint``, then its output fields; names that clash
    case-insensitively (as Athena reads them) are refused."""
    fields = [pa.field(c, pa.string()) for c in MEMBER_PROVENANCE] + list(runner.output_fields)
    lower = [f.name.lower() for f in fields]
    clash = sorted({n for n in lower if lower.count(n) > 1})
    if clash:
        raise ModelSetError(f"{runner.architecture}: output fields {clash} collide (with each other or with the "
                            "struct's model/checkpoint fields, case-insensitively as Athena reads them)")
    return pa.struct(fields)
