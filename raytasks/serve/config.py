"""The serving application's configuration: the ``args:`` of jobs/serve.yaml (and of ``python -m jobs.serve``'s
flags), validated at deploy time so that a wrong setting fails the deploy, not a user's request.

Split from raytasks/serve/ingress.py (the HTTP API and the application builder; the deployments that compute are in
raytasks/serve/replicas.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from core.modelset import ModelSetError, check_name, check_set_name, check_set_version
from faces.finder import FaceOptions
from models.checkpoint import split_pin

API_KEY_ENV = "FACEATTR_API_KEY"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def check_key(key: str | None, where: str) -> str | None:
    """``key`` (an API or admin key, None for none) when a request can present it, else ValueError naming
    ``where`` it was read from (never the key). A header value reaches the ingress as bytes that Starlette
    decodes as latin-1 and that are compared with the key's UTF-8 bytes, so a non-ASCII key never matches
    whatever the client sends, and HTTP servers strip a value's surrounding spaces: such a key would refuse
    every request with 401, so it fails the deploy instead."""
    if key is None:
        return None
    if not all(" " <= c <= "~" for c in key):
        raise ValueError(f"the key in {where} holds non-ASCII or control characters, which no HTTP request can "
                         "send so that they match: use printable ASCII (python -c 'import secrets; "
                         "print(secrets.token_urlsafe(32))')")
    if key != key.strip():
        raise ValueError(f"the key in {where} starts or ends with a space, which HTTP servers strip from a "
                         "header: remove it")
    return key


class _Strict(BaseModel):
    # unknown keys and non-finite numbers (.inf, .nan: a count of CPUs, a timeout) fail the deploy
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _queue_limit(v: int | None) -> int | None:
    """Serve's own rule for ``max_queued_requests``: -1 (no limit) or at least 1 (0 would fail inside Serve)."""
    if v is not None and v != -1 and v < 1:
        raise ValueError(f"must be -1 (no limit) or a positive number of requests, got {v}")
    return v


def _autoscaling(v: dict | None) -> dict | None:
    """An ``autoscaling_config`` checked by Serve's own ``AutoscalingConfig`` (its bounds: max_replicas >=
    min_replicas, ...), refusing keys it does not know (Serve would ignore a misspelt one). Kept as given."""
    if v is None:
        return None
    from ray.serve.config import AutoscalingConfig

    unknown = sorted(set(v) - set(AutoscalingConfig.model_fields))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; Serve's autoscaling_config takes {sorted(AutoscalingConfig.model_fields)}")
    try:
        AutoscalingConfig.model_validate(v)
    except ValueError as e:
        errors = e.errors() if hasattr(e, "errors") else [{"loc": (), "msg": str(e)}]
        raise ValueError("; ".join(".".join(map(str, x["loc"])) + (": " if x["loc"] else "")
                                   + x["msg"].removeprefix("Value error, ") for x in errors)) from None
    return v


QueueLimit = Annotated[int, AfterValidator(_queue_limit)]
Autoscaling = Annotated[dict | None, AfterValidator(_autoscaling)]


def check_faces(v: dict) -> dict:
    """The ``faces:`` settings checked strictly (faces.finder.FaceOptions: ``mode``, ``max_side``,
    ``detector``; the detector's own settings refuse unknown keys there), as FaceOptions' dict. A misspelt or
    misplaced key (``threshold`` or ``min_face`` belong under ``detector``) or a wrong type is an error naming
    it, never silently dropped."""
    known = [f.name for f in dataclasses.fields(FaceOptions)]
    unknown = sorted(set(v) - set(known), key=str)
    if unknown:
        raise ValueError(f"faces: unknown setting(s) {unknown}; faces takes {known} (the detector's settings, such "
                         "as threshold, min_face, max_faces or size, go under faces.detector: docs/faces.md)")
    if "mode" in v and not isinstance(v["mode"], str):
        raise ValueError(f"faces.mode must be one of 'detect', 'whole', got {v['mode']!r}")
    if "max_side" in v and (isinstance(v["max_side"], bool) or not isinstance(v["max_side"], int)):
        raise ValueError(f"faces.max_side must be a whole number of pixels, got {v['max_side']!r}")
    if v.get("detector") is not None and not isinstance(v["detector"], dict):
        raise ValueError(f"faces.detector must be a mapping of detector settings, got {v['detector']!r}")
    return FaceOptions.from_dict(v).to_dict()  # unknown modes or detector settings fail at deploy


class _ReplicaSettings(_Strict):
    """Settings of a deployment that holds checkpoints (a model's or the model set's). Every field left out
    takes the application-wide value."""

    max_batch_size: int | None = Field(None, ge=1)
    batch_wait_timeout_s: float | None = Field(None, ge=0)
    num_replicas: int | None = Field(None, ge=1)
    autoscaling_config: Autoscaling = None
    num_cpus: float | None = Field(None, ge=0)
    num_gpus: float | None = Field(None, ge=0)
    threads: int | None = Field(None, ge=1)
    precision: Literal["auto", "bf16", "fp32"] | None = None
    device: str | None = None
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: QueueLimit | None = None


class DeploymentSpec(_ReplicaSettings):
    """Settings of one model's deployment. Every field left out takes the application-wide value."""

    checkpoint: str | None = None
    channels_last: bool | None = None


class IngressSpec(_Strict):
    """The FastAPI ingress deployment (CPU: auth, limits, decoding)."""

    num_replicas: int | None = Field(None, ge=1)
    autoscaling_config: Autoscaling = None
    num_cpus: float = Field(1.0, ge=0)
    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: QueueLimit = 256  # bounded: beyond it Serve answers 503 before any work
    max_decodes: int = Field(4, ge=1)  # images decoded at once per ingress replica (CPU and memory bound)
    # a request waits this long for a decode slot (or room in the budgets below), then 503; 0: no wait, 503 at
    # once when none is free
    decode_wait_s: float = Field(2.0, ge=0)
    request_timeout_s: float = Field(60.0, gt=0)  # a request's model call longer than this: 504
    # What one request may cost (issue #22), refused with 413 from the files' headers before any decoding:
    max_request_pixels: int = Field(200_000_000, ge=1)  # source pixels decoded per request (the decoder's CPU)
    max_request_decoded_bytes: int = Field(256 * 2**20, ge=1)  # decoded pixels one request holds (memory)
    # faces found in one request's photos (whole images: images), counted by the model replica after
    # detection: over it 413 before any attribute model runs on them (the models' CPU/GPU time)
    max_request_faces: int = Field(256, ge=1)
    # What one ingress replica holds at once, all requests together; over it a request waits decode_wait_s,
    # then 503 (Retry-After) before its memory is taken:
    max_decoded_bytes: int = Field(2 * 2**30, ge=1)  # decoded pixels in flight to the model replicas
    max_body_bytes: int = Field(512 * 2**20, ge=1)  # request bodies being read or held
    body_timeout_s: float = Field(30.0, gt=0)  # a body slower than this (slowloris) is answered 408


def _set_rule(check, v) -> str:
    """A rule of core/modelset.py (the same for a --model-set file), as pydantic's ValueError."""
    try:
        return check(v)
    except ModelSetError as e:
        raise ValueError(f"model_set: {e}") from None


class ModelSetSpec(_ReplicaSettings):
    """Served models answered together at ``POST /v1/predict``: every model of the set for every face of an
    image in one request, from one deployment ("modelset") whose replicas each hold every member's
    checkpoint (and the face embedding) in one process on one device (core/modelset.py). Per-model
    routes stay.

    ``models``: the served models in the set, by their name in ``models:`` (default: all, in that order),
    as a list (each model's column is its URL name) or as ``{URL name: column name}``. A member's column
    name must be lower case, ``^[a-z][a-z0-9_]*$`` and not a column of every row (Athena and Glue read
    nothing else); a URL name that is not one needs the mapping form. ``embedding``: also dlib's 128-D
    face embedding per face. ``name`` and ``version``: the set's, part of its identity (the rows' ``model``
    and ``checkpoint``), as in a ``--model-set`` file. The deployment settings default to the
    application-wide ones, as a model's do."""

    models: list[str] | dict[str, str] | None = None
    embedding: bool = False
    name: str = "set"
    version: str = "1"

    @field_validator("name", mode="before")
    @classmethod
    def _check_name(cls, v) -> str:
        return _set_rule(check_set_name, v)

    @field_validator("version", mode="before")
    @classmethod
    def _check_version(cls, v) -> str:
        return _set_rule(check_set_version, v)

    def members(self, served: list[str]) -> list[tuple[str, str]]:
        """``(column name, served model name)`` of every member, in order; refuses unknown models and bad or
        clashing column names, naming the fix."""
        if self.models is None:
            pairs = [(n, n) for n in served]
        elif isinstance(self.models, list):
            pairs = [(n, n) for n in self.models]
        else:
            pairs = [(column, n) for n, column in self.models.items()]
        unknown = [n for _, n in pairs if n not in served]
        if unknown:
            raise ValueError(f"model_set names models that are not served: {unknown} (served: {sorted(served)})")
        if not pairs and not self.embedding:
            raise ValueError("model_set holds no model: name served models (or leave models out for all), or "
                             "set embedding: true")
        seen: dict[str, str] = {}
        for column, n in pairs:
            try:
                check_name(column)
            except ModelSetError as e:
                how = ""
                if column == n:
                    good = re.sub("[^a-z0-9_]", "_", n.lower()).lstrip("0123456789_")[:50] or "m"
                    try:
                        check_name(good)
                    except ModelSetError:
                        good += "_model"  # a column of every row (path, model, ...)
                    how = (f"; give it a column name in the config (model_set: {{models: {{{n}: {good}, ...}}}}) "
                           f"or serve it under such a name (--model {good}=...)")
                raise ValueError(f"model_set: model {n!r} cannot be a column of the set's rows: {e}{how}") from None
            if column in seen:
                raise ValueError(f"model_set: models {seen[column]!r} and {n!r} would both be column {column!r}")
            seen[column] = n
        return pairs


class ServeArgs(_Strict):
    """Arguments of :func:`build_app` (the ``args:`` of jobs/serve.yaml).

    ``models`` maps the name used in URLs to a checkpoint (path or s3:// URI, optionally pinned to its
    content hash as ``URI#sha256:<hex>``: every replica then refuses any other file) or to a
    :class:`DeploymentSpec` with its own settings. The other fields are the defaults of every model's
    deployment, then the request limits and the ingress."""

    models: dict[str, str | DeploymentSpec]
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    num_replicas: int = Field(1, ge=1)
    autoscaling_config: Autoscaling = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    threads: int | None = Field(None, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: str | None = None
    channels_last: bool = True
    max_ongoing_requests: int | None = Field(None, ge=1)  # default: 2 * max_batch_size
    max_queued_requests: QueueLimit = 256
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1)
    max_files: int = Field(64, ge=1)
    api_key_env: str = API_KEY_ENV
    # Without an API key (FACEATTR_API_KEY, or the variable api_key_env names) the application refuses every
    # request (401 no_api_key) unless this says to serve openly: fail closed wherever it is deployed
    # (serve run, serve deploy, a RayService). python -m jobs.serve sets it for a server on loopback only.
    allow_no_auth: bool = False
    ingress: IngressSpec = Field(default_factory=IngressSpec)
    # faces.finder.FaceOptions: mode (detect | whole: the default of a request's ?faces=), max_side, detector
    # settings; every model replica loads the detector either way
    faces: dict = Field(default_factory=dict)
    # faces.quality.ReviewThresholds settings: when a face's row says review (docs/quality.md)
    review: dict = Field(default_factory=dict)
    # several served models answered together at POST /v1/predict (ModelSetSpec); None: no set, no such route
    model_set: ModelSetSpec | None = None

    @field_validator("faces")
    @classmethod
    def _check_faces(cls, v: dict) -> dict:
        return check_faces(v)

    @field_validator("review")
    @classmethod
    def _check_review(cls, v: dict) -> dict:
        from faces.quality import ReviewThresholds

        return ReviewThresholds.from_dict(v).to_dict()  # unknown or bad thresholds fail at deploy

    @field_validator("models")
    @classmethod
    def _check_models(cls, v: dict) -> dict:
        if not v:
            raise ValueError("at least one model is needed: models: {name: checkpoint URI}")
        for name, spec in v.items():
            if not re.match(MODEL_NAME_PATTERN, name):
                raise ValueError(f"model name {name!r} must match {MODEL_NAME_PATTERN} (it is part of the URL)")
            if not (spec if isinstance(spec, str) else spec.checkpoint or "").strip():
                raise ValueError(f"model {name!r}: checkpoint is required (a path or s3:// URI)")
            split_pin(spec if isinstance(spec, str) else spec.checkpoint)  # URI#sha256:<hex>: a malformed pin is refused
        return v

    @model_validator(mode="after")
    def _check_set(self) -> ServeArgs:
        if self.model_set is not None:
            self.model_set.members(list(self.models))
        return self

    def model_settings(self, name: str) -> dict:
        """The resolved settings of one model's deployment."""
        spec = self.models[name]
        return self._resolve(DeploymentSpec(checkpoint=spec) if isinstance(spec, str) else spec, DeploymentSpec.model_fields)

    def set_settings(self) -> dict:
        """The resolved settings of the model set's deployment (``model_set`` must be given)."""
        if self.model_set is None:
            raise ValueError("no model_set in the config")
        return self._resolve(self.model_set, _ReplicaSettings.model_fields)

    def _resolve(self, spec: DeploymentSpec | ModelSetSpec, keys) -> dict:
        out = {}
        for key in keys:
            own = getattr(spec, key)
            out[key] = own if own is not None else getattr(self, key, None)
        if spec.num_replicas is not None and spec.autoscaling_config is None:
            out["autoscaling_config"] = None  # the model's own fixed replica count beats a global autoscaling
        if out["max_ongoing_requests"] is None:
            out["max_ongoing_requests"] = 2 * out["max_batch_size"]
        if out["threads"] is None:
            out["threads"] = max(1, math.ceil(out["num_cpus"])) if not out["num_gpus"] else 1
        return out
