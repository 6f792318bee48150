"""What a user names to label with: one checkpoint, or a set of them, and the rules for a set.

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
      version: "2026-11-29"      # the set's own version, the user's to bump, kept as written; default "1"
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

A single ``--checkpoint`` without ``--embedding`` is a set of one whose rows keep the flat layout: its
output fields as columns of their own, ``model`` and ``checkpoint`` its architecture and hash
(core/annotator.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import posixpath
import re

import storage
from core.rows import COMMON

SET_FORMAT = 1
SET_FILE_MAX_BYTES = 64 * 1024
SET_FILE_TIMEOUT_S = 30.0
MEMBER_NAME = r"^[a-z][a-z0-9_]{0,62}$"
SET_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
RESERVED = COMMON
MEMBER_PROVENANCE = ("model", "checkpoint")  # the first fields of every member's struct (flat layout: columns)


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


def check_set_name(name) -> str:
    """A set's name (the rows' ``model`` column): 1-64 letters, digits, ``_``, ``.``, ``-``. The one rule for
    a ``--model-set`` file and the serve configuration's ``model_set``."""
    if not isinstance(name, str) or not re.match(SET_NAME, name):
        raise ModelSetError(f"set name {str(name)[:80]!r} must match {SET_NAME} (1-64 letters, digits, '_', '.', '-')")
    return name


def check_set_version(version, written: str | None = None) -> str:
    """A set's own version, as text of 1-64 characters, kept exactly as written. YAML reads ``2`` as a number
    and ``2026-11-29`` as a date: both are kept as their text. Any other number (``1.10`` is the float 1.1,
    ``010`` the integer 8, ``1:30`` 90, ``0x1A`` 26) or a date and time would be rewritten, so it is refused,
    asking for quotes; ``written`` (the value as the file writes it, when unquoted:
    ``facedata.yamlsafe.plain_scalar_text``) tells ``2`` from ``+2`` or ``2026-1-9``. ``true`` and an empty
    value are refused."""
    if isinstance(version, (int, float, datetime.date)) and not isinstance(version, bool):
        text = None
        if isinstance(version, int) and -10 ** 64 < version < 10 ** 64:
            text = str(version)
        elif isinstance(version, datetime.date) and not isinstance(version, datetime.datetime):
            text = version.isoformat()
        if text is None or (written is not None and written != text):
            shown = written if written is not None else str(version)[:80]
            kind = {"int": "an integer", "float": "a number", "date": "a date", "datetime": "a date and time"}
            raise ModelSetError(f"set version {shown[:80]!r} is read by YAML as {kind[type(version).__name__]} "
                                f"({str(version)[:80]}), not as written: quote it (version: \"{shown[:80]}\")")
        version = text
    if not isinstance(version, str) or not version or len(version) > 64:
        raise ModelSetError(f"set version {str(version)[:80]!r} must be a string of 1-64 characters")
    return version


def read_set_file(uri: str) -> ModelSet:
    """A ``--model-set`` file (see the module docstring) -> a set; every problem is a :class:`ModelSetError`."""
    from facedata.yamlsafe import DuplicateKey, YamlError, load_yaml, plain_scalar_text

    try:  # a regular file or object, bounded in size and time (a FIFO or a stalled endpoint fails, never hangs)
        data = storage.read_bounded(uri, SET_FILE_MAX_BYTES, SET_FILE_TIMEOUT_S)
    except OSError as e:
        if "over the limit" in str(e):
            raise ModelSetError(f"{uri}: a model set file is at most {SET_FILE_MAX_BYTES} bytes ({e})") from None
        raise ModelSetError(f"cannot read the model set {uri}: {e}") from None
    try:  # no anchors or aliases, bounded nodes (a few hundred bytes cannot expand to gigabytes), no key twice
        text = data.decode("utf-8")
        doc = load_yaml(text)
    except DuplicateKey as e:
        raise ModelSetError(f"{uri}: {str(e)[:300]}") from None
    except (UnicodeDecodeError, YamlError) as e:
        raise ModelSetError(f"{uri} is not YAML or JSON: {str(e)[:300]}") from None
    if not isinstance(doc, dict):
        raise ModelSetError(f"{uri}: a model set is a mapping with 'models:', got {type(doc).__name__}")
    unknown = set(doc) - {"format", "name", "version", "embedding", "models"}
    if unknown:
        raise ModelSetError(f"{uri}: unknown keys {sorted(unknown)} (known: format, name, version, embedding, models)")
    fmt = doc.get("format", SET_FORMAT)
    if isinstance(fmt, bool) or fmt != SET_FORMAT:  # True == 1 in Python: "format: true" is not format 1
        raise ModelSetError(f"{uri}: format {fmt!r}; this version reads format {SET_FORMAT}")
    try:
        name = check_set_name(doc.get("name", "set"))
        version = doc.get("version", "1")
        version = check_set_version(version, None if isinstance(version, str) else plain_scalar_text(text, "version"))
    except ModelSetError as e:
        raise ModelSetError(f"{uri}: {e}") from None
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
        if storage.is_s3(uri) and not storage.is_s3(v) and (os.path.isabs(v) or v.startswith("file:")):
            # a file from a bucket names no path of the machine that reads it (/etc/..., /dev/..., a FIFO)
            raise ModelSetError(f"{uri}: model {n or v[:80]!r}: a set file read from S3 names s3:// checkpoints or "
                                f"paths relative to itself, not the local path {v[:200]!r}")
        if not storage.is_s3(v) and not os.path.isabs(v):
            v = posixpath.join(base, v) if storage.is_s3(uri) else os.path.join(base, v)
        members.append((n, v))
    return ModelSet(tuple(members), embedding, name, version, from_file=True)


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
    the distinct preprocessings (``--faces whole`` decodes once per entry), and what the rows' ``checkpoint``
    and ``model`` will hold (a set's identity and name; one checkpoint's hash and architecture)."""

    names: list[str]
    architectures: list[str]
    hashes: list[str]
    preprocessings: list
    embedding: str | None
    identity: str
    name: str

    def describe(self) -> list[dict]:
        out = [{"name": n, "model": a, "checkpoint": h} for n, a, h in zip(self.names, self.architectures, self.hashes)]
        if self.embedding:
            out.append({"name": "embedding", "model": self.embedding.split(" ")[0],
                        "checkpoint": self.embedding.split(" ", 1)[1]})
        return out


def resolve_set(model_set: ModelSet) -> ResolvedSet:
    """Load every member's checkpoint once (on the CPU, to read it and check its hash) and describe the set
    (the label job's driver does this before any work);
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
    if not model_set.is_set:  # one checkpoint: its own hash and architecture, as its flat rows say
        return ResolvedSet(names, archs, hashes, pres, None, hashes[0], archs[0])
    identity = set_identity(model_set.name, model_set.version, list(zip(names, hashes)), embedding)
    return ResolvedSet(names, archs, hashes, pres, embedding, identity, model_set.name)
