"""Several checkpoints as one: every model of a set on every face, in one pass (issue #14).

A user who wants age, gender, race, the 40 CelebA attributes, smile and a beauty score for every face of a
bucket names a *set* of checkpoints; the label job and the serving endpoint then list, read, decode and
detect each photo once, align each face once per distinct face template, run every model on its own crop,
and give one row per face that holds every model's columns.

How a set is named (:meth:`ModelSet.parse`)

* ``--checkpoint`` given several times, each ``URI`` or ``NAME=URI`` (``NAME``: the column the model's
  outputs go to; default the model's architecture, e.g. ``dmm_cnn``; two checkpoints of one architecture
  need names);
* or ``--model-set FILE`` (YAML or JSON, local or ``s3://``; at most 64 KB)::

      format: 1                  # this file's format
      name: faces                # the set's name (the rows' ``model`` column); default "set"
      version: "2026-11-29"      # the set's own version, the user's to bump; default "1"
      embedding: true            # also a 128-D face embedding per face (models/embedding.py)
      models:                    # NAME: URI (relative paths: against the file's folder), or a list of URIs
        agr: s3://bucket/models/agr.pt#sha256:...
        celeba: s3://bucket/models/dmm.pt

* ``--embedding`` adds the embedding to either.

What a set's rows look like (docs/schema.md). The per-image and per-face columns are the single-model
job's (``path`` ... ``face_points``); then **one struct column per model**, named by the member's name, whose
fields are ``model`` (architecture), ``checkpoint`` (its content hash) and the model's outputs; then, with
the embedding, ``embedding`` (list of 128 float32) and ``embedding_model``. Struct columns, not
``model.field`` names, because that is what the readers users have in mind read natively: DuckDB
(``SELECT agr.age, celeba."Smiling" FROM 'labels/*.parquet'``), Spark (``df.select("agr.age")``),
Athena/Trino/Glue (``SELECT agr.age``: their column names may only hold lower-case letters, digits and
``_``, so member names are held to that) and pyarrow; pandas gets dicts in one column, and
``pyarrow.parquet.read_table(...).flatten().to_pandas()`` gives flat ``agr.age`` columns. The rows'
``model`` column holds the set's name and ``checkpoint`` its identity (:func:`set_identity`, a hash over
every member's name and checkpoint hash, the embedding network and the set's name and version), so an
output made with one set refuses another, exactly as a single checkpoint's does.

A single ``--checkpoint`` without ``--embedding`` is not a set: its rows keep the flat columns of
core/predictor.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import posixpath
import re

import numpy as np
import pyarrow as pa
import torch

from core.predictor import (
    BASE_FIELDS,
    FACE_FIELDS,
    GEOMETRY_KEYS,
    Predictor,
    detect_photos,
    photo_rows,
    resolve_device,
    whole_image_columns,
)
from facedata import storage
from faces.pipeline import FaceFinder

SET_FORMAT = 1
SET_FILE_MAX_BYTES = 64 * 1024
MEMBER_NAME = r"^[a-z][a-z0-9_]{0,62}$"
EMBEDDING_FIELDS = [pa.field("embedding", pa.list_(pa.float32())), pa.field("embedding_model", pa.string())]
RESERVED = {f.name for f in BASE_FIELDS + FACE_FIELDS + EMBEDDING_FIELDS}
MEMBER_PROVENANCE = ("model", "checkpoint")  # the first fields of every member's struct


class ModelSetError(ValueError):
    """A set that cannot be used: a bad file, a name that collides, a missing checkpoint."""


@dataclasses.dataclass(frozen=True)
class ModelSet:
    """What the user named: ``members`` as ``(name or None, checkpoint URI)``, the embedding, and the set's
    own name and version. Plain data: it travels to actors and replicas as :meth:`to_dict`."""

    members: tuple[tuple[str | None, str], ...]
    embedding: bool = False
    name: str = "set"
    version: str = "1"
    from_file: bool = False

    @property
    def is_set(self) -> bool:
        """Whether rows take the set's layout (a struct per model); one checkpoint alone keeps the flat one."""
        return len(self.members) > 1 or self.embedding or self.from_file

    def to_dict(self) -> dict:
        return {"members": [list(m) for m in self.members], "embedding": self.embedding, "name": self.name,
                "version": self.version, "from_file": self.from_file}

    @classmethod
    def from_dict(cls, d: dict) -> ModelSet:
        return cls(tuple((m[0], m[1]) for m in d["members"]), bool(d.get("embedding")), d.get("name", "set"),
                   str(d.get("version", "1")), bool(d.get("from_file")))

    @classmethod
    def parse(cls, checkpoints: str | list[str] | tuple[str, ...] | None = None, set_file: str | None = None,
              embedding: bool = False) -> ModelSet:
        """``--checkpoint`` values (``URI`` or ``NAME=URI``) and/or a ``--model-set`` file -> a set."""
        if isinstance(checkpoints, str):
            checkpoints = [checkpoints] if checkpoints else []
        checkpoints = list(checkpoints or [])
        if set_file and checkpoints:
            raise ModelSetError("give either --checkpoint (one or more) or --model-set, not both")
        if set_file:
            s = read_set_file(set_file)
            return dataclasses.replace(s, embedding=s.embedding or embedding)
        if not checkpoints and not embedding:
            raise ModelSetError("no model: give --checkpoint URI (repeatable, NAME=URI), --model-set FILE or "
                                "--embedding")
        return cls(tuple(split_member(c) for c in checkpoints), embedding=embedding)


def split_member(text: str) -> tuple[str | None, str]:
    """``NAME=URI`` -> ``(NAME, URI)``; a bare URI (which may itself hold ``=``) -> ``(None, URI)``."""
    name, sep, rest = text.partition("=")
    if sep and re.match(r"^[A-Za-z0-9_.-]+$", name) and rest:
        check_name(name)
        return name, rest
    return None, text


def check_name(name: str) -> str:
    if not re.match(MEMBER_NAME, name):
        raise ModelSetError(f"model name {name!r} must match {MEMBER_NAME}: it becomes a column name, and Athena, "
                            "Glue and Hive take only lower-case letters, digits and '_'")
    if name in RESERVED:
        raise ModelSetError(f"model name {name!r} is a column of every row ({', '.join(sorted(RESERVED))}): "
                            "choose another")
    return name


def read_set_file(uri: str) -> ModelSet:
    """A ``--model-set`` file (see the module docstring) -> a set; every problem is a :class:`ModelSetError`."""
    import yaml

    try:
        fs, path = storage.filesystem(uri)
        size = fs.get_file_info(path).size
        if size is not None and size > SET_FILE_MAX_BYTES:
            raise ModelSetError(f"{uri}: {size} bytes; a model set file is at most {SET_FILE_MAX_BYTES} bytes")
        data = storage.read_bytes(uri)
    except OSError as e:
        raise ModelSetError(f"cannot read the model set {uri}: {e}") from None
    if len(data) > SET_FILE_MAX_BYTES:
        raise ModelSetError(f"{uri}: {len(data)} bytes; a model set file is at most {SET_FILE_MAX_BYTES} bytes")
    try:
        doc = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ModelSetError(f"{uri} is not YAML or JSON: {str(e)[:300]}") from None
    if not isinstance(doc, dict):
        raise ModelSetError(f"{uri}: a model set is a mapping with 'models:', got {type(doc).__name__}")
    unknown = set(doc) - {"format", "name", "version", "embedding", "models"}
    if unknown:
        raise ModelSetError(f"{uri}: unknown keys {sorted(unknown)} (known: format, name, version, embedding, models)")
    if doc.get("format", SET_FORMAT) != SET_FORMAT:
        raise ModelSetError(f"{uri}: format {doc.get('format')!r}; this version reads format {SET_FORMAT}")
    name = str(doc.get("name", "set"))
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", name):
        raise ModelSetError(f"{uri}: set name {name!r} must be 1-64 letters, digits, '_', '.', '-'")
    version = doc.get("version", "1")  # YAML reads 2026-11-29 as a date: kept as its ISO text
    if not isinstance(version, (str, int, float, datetime.date)) or len(str(version)) > 64:
        raise ModelSetError(f"{uri}: version must be a short string")
    embedding = doc.get("embedding", False)
    if not isinstance(embedding, bool):
        raise ModelSetError(f"{uri}: embedding must be true or false")
    models = doc.get("models")
    if isinstance(models, dict):
        items = [(check_name(str(k)), v) for k, v in models.items()]
    elif isinstance(models, list):
        items = [(None, v) for v in models]
    else:
        raise ModelSetError(f"{uri}: 'models' must map names to checkpoint URIs (or list URIs)")
    if not items and not embedding:
        raise ModelSetError(f"{uri}: the set names no model")
    base = posixpath.dirname(uri) if storage.is_s3(uri) else os.path.dirname(os.path.abspath(uri))
    members = []
    for n, v in items:
        if not isinstance(v, str) or not v:
            raise ModelSetError(f"{uri}: model {n or v!r}: a checkpoint URI is a non-empty string")
        if not storage.is_s3(v) and not os.path.isabs(v):
            v = posixpath.join(base, v) if storage.is_s3(uri) else os.path.join(base, v)
        members.append((n, v))
    return ModelSet(tuple(members), embedding, name, str(version), from_file=True)


def member_names(model_set: ModelSet, architectures: list[str]) -> list[str]:
    """The column name of every member: its own, or its architecture's; a clash is an error naming both."""
    names = []
    for (given, _uri), arch in zip(model_set.members, architectures):
        names.append(given or check_name(arch))
    seen: dict[str, str] = {}
    for n, (_, uri) in zip(names, model_set.members):
        if n.lower() in seen:
            raise ModelSetError(f"two models would be column {n!r} ({seen[n.lower()]} and {uri}): name them with "
                                f"--checkpoint NAME=URI (or a mapping in the --model-set file)")
        seen[n.lower()] = uri
    return names


def set_identity(name: str, version: str, members: list[tuple[str, str]], embedding: str | None) -> str:
    """The set's identity: a hash over its name, version, every member's ``(name, checkpoint hash)`` in
    order and the embedding network's identity (or None)."""
    doc = {"format": SET_FORMAT, "name": name, "version": version, "members": [list(m) for m in members],
           "embedding": embedding}
    return "set-sha256:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class ResolvedSet:
    """A set read by the driver before a run: each member's column name, architecture and checkpoint hash,
    the distinct preprocessings (``--faces whole`` decodes once per entry), and the set's identity."""

    names: list[str]
    architectures: list[str]
    hashes: list[str]
    preprocessings: list
    embedding: str | None
    identity: str

    def describe(self) -> list[dict]:
        out = [{"name": n, "model": a, "checkpoint": h} for n, a, h in zip(self.names, self.architectures, self.hashes)]
        if self.embedding:
            out.append({"name": "embedding", "model": self.embedding.split(" ")[0],
                        "checkpoint": self.embedding.split(" ", 1)[1]})
        return out


def resolve_set(model_set: ModelSet) -> ResolvedSet:
    """Load every member's checkpoint once (on the CPU, to read it and check its hash) and describe the set;
    a missing or bad checkpoint, a name clash or a missing embedding network fails here, before any work."""
    from models.checkpoint import load_checkpoint
    from models.embedding import FaceEmbedder, embedding_identity

    archs, hashes, pres = [], [], []
    for _, uri in model_set.members:
        model, info = load_checkpoint(uri)
        archs.append(info.model)
        hashes.append(info.hash)
        if model.preprocessing not in pres:
            pres.append(model.preprocessing)
        del model
    names = member_names(model_set, archs)
    embedding = None
    if model_set.embedding:
        emb = FaceEmbedder("cpu")  # refuses when the package is absent
        embedding = embedding_identity()
        if emb.preprocessing not in pres:
            pres.append(emb.preprocessing)
    identity = set_identity(model_set.name, model_set.version, list(zip(names, hashes)), embedding)
    return ResolvedSet(names, archs, hashes, pres, embedding, identity)


def member_struct(predictor: Predictor) -> pa.DataType:
    fields = [pa.field("model", pa.string()), pa.field("checkpoint", pa.string())] + list(predictor.output_fields)
    lower = [f.name.lower() for f in fields]
    clash = sorted({n for n in lower if lower.count(n) > 1})
    if clash:
        raise ModelSetError(f"{predictor.model_name}: output fields {clash} collide (with each other or with the "
                            "struct's model/checkpoint fields, case-insensitively as Athena reads them)")
    return pa.struct(fields)


class SetPredictor:
    """Every model of a set (and the embedding network) loaded once, in one process on one device: a decoded
    batch in, one row per face with every model's columns out. The same interface as :class:`Predictor`
    for the label job's actors and the serving replicas (``predict_photos``, ``predict_decoded``,
    ``to_table``, ``schema``, ``checkpoint_hash``, ``device``).

    On one device: a GPU holds the whole set (the five models are 3-100 MB of weights each, plus
    activations of at most ``max_batch`` faces per forward pass); when it does not, loading fails with
    a message naming each model's size, and the way out is two sets in two jobs (each still one pass)."""

    def __init__(self, model_set: ModelSet | dict, device: str | None = None, precision: str = "auto",
                 threads: int | None = None, fold_bn: bool = True, compile_batch: int | None = None,
                 max_batch: int = 256):
        self.model_set = model_set if isinstance(model_set, ModelSet) else ModelSet.from_dict(model_set)
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        predictors = []
        try:
            for _, uri in self.model_set.members:
                predictors.append(Predictor(uri, device=str(self.device), precision=precision, fold_bn=fold_bn,
                                            compile_batch=compile_batch, max_batch=max_batch))
            self.embedder = None
            if self.model_set.embedding:
                from models.embedding import FaceEmbedder

                self.embedder = FaceEmbedder(self.device, batch=max_batch)
        except torch.OutOfMemoryError as e:
            sizes = ", ".join(f"{p.model_name} {sum(t.numel() * t.element_size() for t in p.model.parameters()) / 2**20:.0f} MB"
                              for p in predictors)
            raise ModelSetError(f"the set does not fit on {self.device} (loaded so far: {sizes or 'none'}): split it "
                                f"into two sets labelled by two jobs, or use a larger device ({str(e)[:200]})") from None
        self.names = member_names(self.model_set, [p.model_name for p in predictors])
        self.members = dict(zip(self.names, predictors))
        self.model_name = self.model_set.name
        self.embedding_identity = self.embedder.identity if self.embedder else None
        self.checkpoint_hash = set_identity(self.model_set.name, self.model_set.version,
                                            [(n, p.checkpoint_hash) for n, p in self.members.items()],
                                            self.embedding_identity)
        self.structs = {n: member_struct(p) for n, p in self.members.items()}
        self.schema = pa.schema(BASE_FIELDS + FACE_FIELDS + [pa.field(n, t) for n, t in self.structs.items()]
                                + (EMBEDDING_FIELDS if self.embedder else []))
        self.precision = predictors[0].precision if predictors else "fp32"
        self.folded = {n: p.folded for n, p in self.members.items()}

    # -- what the set is ----------------------------------------------------------------------------------
    def describe(self) -> list[dict]:
        """Name, architecture and checkpoint hash of every member (the summary's and the API's ``models``)."""
        return ResolvedSet(list(self.members), [p.model_name for p in self.members.values()],
                           [p.checkpoint_hash for p in self.members.values()], self.preprocessings(),
                           self.embedding_identity, self.checkpoint_hash).describe()

    def preprocessings(self) -> list:
        """The distinct preprocessings of the members and the embedder, in order: with ``--faces whole`` the
        CPU stage decodes each image once per entry (``image_<k>`` / ``geometry_<k>``)."""
        out = []
        for pre in [p.preprocessing for p in self.members.values()] + ([self.embedder.preprocessing] if self.embedder else []):
            if pre not in out:
                out.append(pre)
        return out

    def _empty(self, name: str) -> dict:
        p = self.members[name]
        return {"model": p.model_name, "checkpoint": p.checkpoint_hash, **{f.name: None for f in p.output_fields}}

    def _structs(self, name: str, decoded: dict[str, list], n: int) -> list[dict]:
        p = self.members[name]
        fields = [f.name for f in p.output_fields]
        return [{"model": p.model_name, "checkpoint": p.checkpoint_hash, **{f: decoded[f][j] for f in fields}}
                for j in range(n)]

    # -- photos: detect once, align per template, every model ----------------------------------------------
    def predict_photos(self, batch: dict, finder: FaceFinder) -> dict[str, list]:
        photos = detect_photos(batch, finder)
        per_face: dict[str, list] = {}
        aligned_by_pre: dict = {}
        aligned = None
        for name, p in self.members.items():
            aligned, decoded = self._aligned_outputs(p, photos, finder, aligned_by_pre)
            per_face[name] = self._structs(name, decoded, len(aligned.owner))
        no_face = {name: self._empty(name) for name in self.members}
        if self.embedder:
            pre = self.embedder.preprocessing
            aligned = aligned_by_pre.get(pre) or finder.aligned(photos.images, photos.found, pre, photos.scales)
            per_face["embedding"] = self.embedder.embed(aligned.inputs).tolist()
            per_face["embedding_model"] = [self.embedding_identity] * len(aligned.owner)
            no_face.update(embedding=None, embedding_model=self.embedding_identity)
        if aligned is None:  # pragma: no cover - a set has a model or the embedding
            raise ModelSetError("empty set")
        return photo_rows(batch, photos, aligned, finder.identity, self.schema.names,
                          {"model": self.model_name, "checkpoint": self.checkpoint_hash}, per_face, no_face)

    @staticmethod
    def _aligned_outputs(p: Predictor, photos, finder: FaceFinder, cache: dict):
        """A member's outputs on its own crops; members with the same preprocessing (template, size) share
        one alignment."""
        aligned, decoded = p.face_outputs(photos, finder, cache.get(p.preprocessing))
        cache[p.preprocessing] = aligned
        return aligned, decoded

    # -- whole images (--faces whole): one decode per distinct preprocessing, done by the CPU stage ---------
    def predict_decoded(self, batch: dict) -> dict[str, list]:
        """A batch with ``image_<k>`` / ``geometry_<k>`` for every entry of :meth:`preprocessings` -> rows,
        one per image."""
        pres = self.preprocessings()
        n = len(batch["path"])
        cols = whole_image_columns(batch, self.model_name, self.checkpoint_hash)
        for name, p in self.members.items():
            k = pres.index(p.preprocessing)
            sub = {**{c: batch[c] for c in ("path", "ok", "error_kind", "error_message", "width", "height")},
                   "image": batch[f"image_{k}"], "geometry": batch[f"geometry_{k}"]}
            own = p.predict_decoded(sub)
            fields = [f.name for f in p.output_fields]
            cols[name] = [{"model": p.model_name, "checkpoint": p.checkpoint_hash,
                           **{f: own[f][i] for f in fields}} for i in range(n)]
        if self.embedder:
            k = pres.index(self.embedder.preprocessing)
            ok = np.asarray(batch["ok"], dtype=bool)
            idx = np.flatnonzero(ok)
            emb = [None] * n
            if len(idx):
                images = torch.from_numpy(np.ascontiguousarray(np.asarray(batch[f"image_{k}"])[idx]))
                for i, v in zip(idx, self.embedder.embed(images).tolist()):
                    emb[i] = v
            cols["embedding"] = emb
            cols["embedding_model"] = [self.embedding_identity] * n
        return {name: cols[name] for name in self.schema.names}

    def to_table(self, cols: dict[str, list]) -> pa.Table:
        return pa.Table.from_pydict(cols, schema=self.schema)


def decode_for_set(paths: list[str], datas: list[bytes], pres: list) -> dict:
    """``--faces whole`` for a set: the bytes of each image decoded once per distinct preprocessing
    (``image_<k>``, ``geometry_<k>``); a row fails (with the first reason) when any decode fails."""
    from core.predictor import decode_batch

    out: dict = {}
    for k, pre in enumerate(pres):
        b = decode_batch(paths, datas, pre)
        if k == 0:
            out = {c: b[c] for c in ("path", "ok", "error_kind", "error_message", "width", "height")}
            out["ok"] = np.array(b["ok"], copy=True)
        else:
            for i in np.flatnonzero(out["ok"] & ~np.asarray(b["ok"], dtype=bool)):
                out["ok"][i] = False
                out["error_kind"][i], out["error_message"][i] = b["error_kind"][i], b["error_message"][i]
        out[f"image_{k}"] = b["image"]
        out[f"geometry_{k}"] = b["geometry"]
    return out


__all__ = ["ModelSet", "ModelSetError", "SetPredictor", "decode_for_set", "set_identity", "GEOMETRY_KEYS"]
