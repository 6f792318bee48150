"""Bytes -> tensors -> named outputs, shared by the label job (Ray Data) and the serving endpoint (Ray Serve).

Two halves, so that the label job can run them in different processes:

* :func:`decode_batch` (CPU, needs only the model's ``Preprocessing``): image bytes -> a uint8 image array
  plus per-row ``ok`` / ``error_kind`` / ``error_message`` / ``width`` / ``height`` and the geometry that
  maps model-input pixels back to the original image. A bad image becomes an error row, never an exception.
* :class:`Predictor` (where the model is, loaded once): a decoded batch -> the full rows, one per input,
  with the columns derived from the model's output description (``row_schema``).

A row is the same whether it lands in Parquet or in a JSON answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np
import pyarrow as pa
import torch

from faces.detect import Faces
from faces.pipeline import WHOLE, AlignedFaces, FaceFinder, decode_photos
from models.checkpoint import load_checkpoint
from models.inference import fold_batchnorm
from models.preprocess import ImageDecodeError, Preprocessing, decode

GEOMETRY_KEYS = ("sx", "sy", "tx", "ty")

BASE_FIELDS = [
    pa.field("path", pa.string()),
    pa.field("ok", pa.bool_()),
    pa.field("error_kind", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("model", pa.string()),
    pa.field("checkpoint", pa.string()),
]

# One row per face (faces/pipeline.py): where the face is, in pixels of the original image, and how it was
# found. An image without a face keeps one row with ``faces`` 0 and ``face`` null; ``--faces whole`` rows
# (the image is the face) have null face columns and ``detector`` "whole".
FACE_FIELDS = [
    pa.field("detector", pa.string()),
    pa.field("faces", pa.int32()),
    pa.field("face", pa.int32()),
    pa.field("face_score", pa.float32()),
    pa.field("face_box", pa.list_(pa.float32())),
    pa.field("face_points", pa.list_(pa.float32())),
]


def decode_batch(paths: list[str], datas: list[bytes], pre: Preprocessing) -> dict[str, np.ndarray]:
    """Decode a batch of image bytes with the model's preprocessing. Rows that fail keep a zero image
    and carry their error; the batch always has one row per input."""
    n = len(paths)
    c, (h, w) = pre.channels, pre.size
    images = np.zeros((n, c, h, w), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    kinds: list[str | None] = [None] * n
    messages: list[str | None] = [None] * n
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)
    geo = np.zeros((n, 4), dtype=np.float64)
    for i, data in enumerate(datas):
        try:
            t, g = decode(bytes(data) if data is not None else b"", pre)
        except ImageDecodeError as e:
            kinds[i], messages[i] = e.kind, e.message
            continue
        except Exception as e:  # noqa: BLE001 - a decoder bug must not kill a 10-hour job
            kinds[i], messages[i] = "decode_error", f"{type(e).__name__}: {e}"
            continue
        images[i] = t.numpy()
        ok[i] = True
        width[i], height[i] = g["width"], g["height"]
        geo[i] = [g[k] for k in GEOMETRY_KEYS]
    return {
        "path": np.array(paths, dtype=object),
        "ok": ok,
        "error_kind": np.array(kinds, dtype=object),
        "error_message": np.array(messages, dtype=object),
        "width": width,
        "height": height,
        "image": images,
        "geometry": geo,
    }


def resolve_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """``fp32`` -> None (no autocast); ``bf16`` -> bfloat16; ``auto`` -> bf16 on a GPU that supports it and
    on CPUs (measured about 3x faster here, see docs/benchmarks.md), fp32 otherwise."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError("precision must be auto, bf16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16


class Predictor:
    """A checkpoint loaded once, ready to turn decoded batches (or bytes) into rows."""

    def __init__(self, checkpoint: str, device: str | None = None, precision: str = "auto",
                 channels_last: bool = True, threads: int | None = None, fold_bn: bool = True,
                 compile_batch: int | None = None, max_batch: int = 256):
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.model, self.info = load_checkpoint(checkpoint)
        self.model.to(self.device).eval()
        self.folded: list[str] = []
        if fold_bn:  # conv+bn folded: same outputs, fewer kernels (models/inference.py)
            pre = self.model.preprocessing
            example = torch.randint(0, 256, (2, pre.channels, *pre.size), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(0))
            self.model, self.folded = fold_batchnorm(self.model, self.model.prepare(example.to(self.device)))
        self.channels_last = channels_last and self.device.type in ("cuda", "cpu")
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.preprocessing = self.model.preprocessing
        self.output_fields = self.model.outputs.fields()
        self.schema = pa.schema(BASE_FIELDS + FACE_FIELDS + self.output_fields)
        self.model_name = self.info.model
        self.checkpoint_hash = self.info.hash
        self.compile_batch = compile_batch
        # the most images of one forward pass: the faces of a batch of photos (up to batch x max_faces) run in
        # chunks of this many, which bounds the activations' memory on a GPU whatever the photos hold
        self.max_batch = int(max_batch)
        self.forward_fn = self.model
        if compile_batch:
            self._compile(compile_batch)

    def _compile(self, batch: int) -> None:
        """``torch.compile`` (Inductor, with weight freezing) for batches of exactly ``batch`` images: smaller
        ones are padded and bigger ones split (:meth:`forward_uint8`), so it compiles once. The compile runs
        here, on a zero batch (about 30 s for a ResNet-50 on 2 CPU cores), not in the first real batch. It
        needs a C++ compiler (CPU) or Triton (GPU); when it fails the predictor stays eager and says so.
        Measured on the 2-core CPU (dmm_cnn, batch 32, bf16, batch norm folded): 61.3 -> 94.3 images/s
        (``python bench/bench_inference.py``, docs/benchmarks.md)."""
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # constant-fold the weights: inference only, process-wide
        compiled = torch.compile(self.model, dynamic=False)
        pre = self.preprocessing
        zeros = torch.zeros((batch, pre.channels, *pre.size), dtype=torch.uint8)
        try:
            self.forward_fn = compiled
            self.forward_uint8(zeros)
        except Exception as e:  # noqa: BLE001 - no compiler, unsupported op, ...: eager still works
            import warnings

            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); running eager", stacklevel=2)
            self.forward_fn, self.compile_batch = self.model, None

    @property
    def precision(self) -> str:
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def forward_uint8(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B, C, H, W) -> raw outputs (float32, on the CPU)."""
        size, n = self.compile_batch, len(images)
        if size and n != size:  # the compiled graph takes exactly `size` images: pad to a multiple, split
            padded = torch.cat([images, images.new_zeros((-n % size, *images.shape[1:]))])
            parts = [self.forward_uint8(padded[i:i + size]) for i in range(0, len(padded), size)]
            return {k: torch.cat([p[k] for p in parts])[:n] for k in parts[0]}
        if not size and n > self.max_batch:
            parts = [self.forward_uint8(images[i:i + self.max_batch]) for i in range(0, n, self.max_batch)]
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        x = images.to(self.device, non_blocking=True)
        x = self.model.prepare(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            raw = self.forward_fn(x)
        return {k: v.float().cpu() for k, v in raw.items()}

    def predict_decoded(self, batch: dict) -> dict[str, list]:
        """A batch from :func:`decode_batch` -> columns of the row schema (one entry per input row)."""
        n = len(batch["path"])
        ok = np.asarray(batch["ok"], dtype=bool)
        cols = whole_image_columns(batch, self.model_name, self.checkpoint_hash)
        for f in self.output_fields:
            cols[f.name] = [None] * n
        idx = np.flatnonzero(ok)
        if len(idx):
            images = batch["image"]
            if isinstance(images, torch.Tensor):  # already a tensor (the label job's GPU decode keeps it on the GPU)
                images = images[torch.as_tensor(idx, device=images.device)]
            else:
                images = torch.from_numpy(np.ascontiguousarray(np.asarray(images)[idx]))
            raw = self.forward_uint8(images)
            geo = np.asarray(batch["geometry"])[idx]
            h, w = self.preprocessing.size
            geometry = [dict(zip(GEOMETRY_KEYS, map(float, g)), input_w=w, input_h=h) for g in geo]
            decoded = self.model.decode(raw, geometry)
            for name, values in decoded.items():
                col = cols[name]
                for j, i in enumerate(idx):
                    col[i] = values[j]
        return cols

    def face_outputs(self, photos: DetectedPhotos, finder: FaceFinder,
                     aligned: AlignedFaces | None = None) -> tuple[AlignedFaces, dict[str, list]]:
        """Every face of a detected batch aligned to this model's template (or ``aligned``, crops already cut
        for the same preprocessing), and the model's decoded outputs for them (one list entry per face, in
        ``aligned.owner`` order)."""
        if aligned is None:
            aligned = finder.aligned(photos.images, photos.found, self.preprocessing, photos.scales)
        decoded: dict[str, list] = {}
        if len(aligned.owner):
            raw = self.forward_uint8(aligned.inputs)
            h, w = self.preprocessing.size
            geometry = [{"affine": m[:2].reshape(-1).tolist(), "input_w": w, "input_h": h} for m in aligned.maps]
            decoded = self.model.decode(raw, geometry)
        return aligned, decoded

    def predict_photos(self, batch: dict, finder: FaceFinder) -> dict[str, list]:
        """A batch from :func:`faces.pipeline.decode_photos` -> columns of the row schema, one row per face
        (in image order, then by detection score), one row for an image without a face or that failed.
        Detection runs once for the batch, then every face is aligned to this model's template and the model
        runs once over all faces."""
        photos = detect_photos(batch, finder)
        aligned, decoded = self.face_outputs(photos, finder)
        per_face = {f.name: decoded.get(f.name) for f in self.output_fields}
        return photo_rows(batch, photos, aligned, finder.identity, [f.name for f in self.schema],
                          {"model": self.model_name, "checkpoint": self.checkpoint_hash}, per_face,
                          {f.name: None for f in self.output_fields})

    def predict_bytes(self, items: list[tuple[str, bytes]], finder: FaceFinder | None = None,
                      max_side: int | None = None) -> list[dict]:
        """Convenience for tests and scripts: ``[(name, bytes)]`` -> row dicts; with a ``finder``, one row
        per face (``predict_photos``), else one per image (``predict_decoded``)."""
        paths, datas = [p for p, _ in items], [d for _, d in items]
        if finder is not None:
            cols = self.predict_photos(decode_photos(paths, datas, max_side or finder.options.max_side), finder)
        else:
            cols = self.predict_decoded(decode_batch(paths, datas, self.preprocessing))
        return [{k: cols[k][i] for k in cols} for i in range(len(cols["path"]))]

    def to_table(self, cols: dict[str, list]) -> pa.Table:
        return pa.Table.from_pydict(cols, schema=self.schema)


def whole_image_columns(batch: dict, model: str, checkpoint: str) -> dict[str, list]:
    """The common columns of one row per image (``--faces whole``) from a decoded batch: the image's outcome
    and size, ``model`` and ``checkpoint``, ``detector`` "whole" and null face columns."""
    n = len(batch["path"])
    ok = np.asarray(batch["ok"], dtype=bool)
    cols: dict[str, list] = {
        "path": [str(p) for p in batch["path"]],
        "ok": ok.tolist(),
        "error_kind": list(batch["error_kind"]),
        "error_message": list(batch["error_message"]),
        "width": [int(v) if o else None for v, o in zip(batch["width"], ok)],
        "height": [int(v) if o else None for v, o in zip(batch["height"], ok)],
        "model": [model] * n,
        "checkpoint": [checkpoint] * n,
        "detector": [WHOLE] * n,
    }
    for f in FACE_FIELDS[1:]:
        cols[f.name] = [None] * n
    return cols


@dataclasses.dataclass
class DetectedPhotos:
    """A decoded batch of photos after one detection: the pictures that were read (``keep``: their rows in
    the batch), their decoded -> original ``scales`` and their faces, in decoded pixels."""

    ok: np.ndarray
    keep: list[int]
    images: list[torch.Tensor]
    scales: list[float]
    found: list[Faces]


def detect_photos(batch: dict, finder: FaceFinder) -> DetectedPhotos:
    """A batch from :func:`faces.pipeline.decode_photos` -> its faces, found in one batched detection."""
    ok = np.asarray(batch["ok"], dtype=bool)
    images, keep, scales = [], [], []
    for i in np.flatnonzero(ok):
        img = batch["image"][i]
        images.append(img if isinstance(img, torch.Tensor) else torch.from_numpy(np.array(img, copy=True)))
        keep.append(int(i))
        scales.append(float(batch["scale"][i]))
    return DetectedPhotos(ok, keep, images, scales, finder.find(images, scales))


def photo_rows(batch: dict, photos: DetectedPhotos, aligned: AlignedFaces, detector: str, names: list[str],
               constants: dict, per_face: dict[str, list | None], no_face: dict) -> dict[str, list]:
    """The rows of a detected batch, one per face (image order, then detection score), one for an image
    without a face or that failed. ``names``: the schema's columns; ``constants``: values of every row
    (``model``, ``checkpoint``); ``per_face``: column -> one value per face in ``aligned`` order; ``no_face``:
    those columns' values on a row without a face."""
    ok, keep, n = photos.ok, photos.keep, len(photos.ok)
    per_image: dict[int, list[int]] = {}
    for j, o in enumerate(aligned.owner):
        per_image.setdefault(keep[o], []).append(j)
    face_of = {keep[o]: photos.found[o] for o in range(len(keep))}
    scale_of = dict(zip(keep, photos.scales))
    cols: dict[str, list] = {name: [] for name in names}
    for i in range(n):
        for j in (per_image.get(i, [None]) if ok[i] else [None]):
            cols["path"].append(str(batch["path"][i]))
            cols["ok"].append(bool(ok[i]))
            cols["error_kind"].append(batch["error_kind"][i])
            cols["error_message"].append(batch["error_message"][i])
            cols["width"].append(int(batch["width"][i]) if ok[i] else None)
            cols["height"].append(int(batch["height"][i]) if ok[i] else None)
            for name, value in constants.items():
                cols[name].append(value)
            cols["detector"].append(detector)
            cols["faces"].append(len(face_of[i]) if ok[i] else None)
            if j is None:
                for name in ("face", "face_score", "face_box", "face_points"):
                    cols[name].append(None)
                for name, value in no_face.items():
                    cols[name].append(value)
                continue
            k, s, found_here = aligned.index[j], scale_of[i], face_of[i]
            cols["face"].append(k)
            cols["face_score"].append(float(found_here.scores[k]))
            cols["face_box"].append((found_here.boxes[k].double() * s).tolist())
            cols["face_points"].append((found_here.points[k].double() * s).reshape(-1).tolist())
            for name, values in per_face.items():
                cols[name].append(values[j])
    return cols


def default_threads() -> int:
    return max(1, (os.cpu_count() or 1))


def rows_per_image(cols: dict[str, list], n_images: int) -> list[list[dict]]:
    """Columns from :meth:`Predictor.predict_photos` -> per image its row dicts. An image has ``faces`` rows
    when faces were found, else one row (no face, or an error)."""
    out: list[list[dict]] = []
    r = 0
    for _ in range(n_images):
        k = max(1, cols["faces"][r] or 0)
        out.append([{name: cols[name][r + j] for name in cols} for j in range(k)])
        r += k
    if r != len(cols["path"]):
        raise RuntimeError(f"{len(cols['path'])} rows do not split into {n_images} images")
    return out
