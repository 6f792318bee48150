"""The serving application's configuration: the ``args:`` of jobs/serve.yaml (and of ``python -m jobs.serve``'s
flags), validated at deploy time so that a wrong setting fails the deploy, not a user's request.

Split from raytasks/serve.py (the deployments and the HTTP API).
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from faces.pipeline import FaceOptions
from models.checkpoint import split_pin

API_KEY_ENV = "FACEATTR_API_KEY"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeploymentSpec(_Strict):
    """Settings of one model's deployment. Every field left out takes the application-wide value."""

    checkpoint: str | None = None
    max_batch_size: int | None = Field(None, ge=1)
    batch_wait_timeout_s: float | None = Field(None, ge=0)
    num_replicas: int | None = Field(None, ge=1)
    autoscaling_config: dict | None = None
    num_cpus: float | None = Field(None, ge=0)
    num_gpus: float | None = Field(None, ge=0)
    threads: int | None = Field(None, ge=1)
    precision: Literal["auto", "bf16", "fp32"] | None = None
    device: str | None = None
    channels_last: bool | None = None
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int | None = Field(None, ge=-1)


class IngressSpec(_Strict):
    """The FastAPI ingress deployment (CPU: auth, limits, decoding)."""

    num_replicas: int | None = Field(None, ge=1)
    autoscaling_config: dict | None = None
    num_cpus: float = Field(1.0, ge=0)
    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(256, ge=-1)  # bounded: beyond it Serve answers 503 before any work
    max_decodes: int = Field(4, ge=1)  # images decoded at once per ingress replica (CPU and memory bound)
    decode_wait_s: float = Field(2.0, ge=0)  # a request waits this long for a decode slot, then 503
    request_timeout_s: float = Field(60.0, gt=0)  # a request's model call longer than this: 504


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
    autoscaling_config: dict | None = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    threads: int | None = Field(None, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: str | None = None
    channels_last: bool = True
    max_ongoing_requests: int | None = Field(None, ge=1)  # default: 2 * max_batch_size
    max_queued_requests: int = Field(256, ge=-1)
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1)
    max_files: int = Field(64, ge=1)
    api_key_env: str = API_KEY_ENV
    ingress: IngressSpec = Field(default_factory=IngressSpec)
    # faces.pipeline.FaceOptions: mode (detect | whole: the default of a request's ?faces=), max_side, detector
    # settings; every model replica loads the detector either way
    faces: dict = Field(default_factory=dict)

    @field_validator("faces")
    @classmethod
    def _check_faces(cls, v: dict) -> dict:
        return FaceOptions.from_dict(v).to_dict()  # unknown modes or detector settings fail at deploy

    @field_validator("models")
    @classmethod
    def _check_models(cls, v: dict) -> dict:
        if not v:
            raise ValueError("at least one model is needed: models: {name: checkpoint URI}")
        for name, spec in v.items():
            if not re.match(MODEL_NAME_PATTERN, name):
                raise ValueError(f"model name {name!r} must match {MODEL_NAME_PATTERN} (it is part of the URL)")
            if isinstance(spec, DeploymentSpec) and not spec.checkpoint:
                raise ValueError(f"model {name!r}: checkpoint is required")
            split_pin(spec if isinstance(spec, str) else spec.checkpoint)  # URI#sha256:<hex>: a malformed pin is refused
        return v

    def model_settings(self, name: str) -> dict:
        """The resolved settings of one model's deployment."""
        spec = self.models[name]
        spec = DeploymentSpec(checkpoint=spec) if isinstance(spec, str) else spec
        out = {}
        for key in DeploymentSpec.model_fields:
            own = getattr(spec, key)
            out[key] = own if own is not None else getattr(self, key, None)
        if spec.num_replicas is not None and spec.autoscaling_config is None:
            out["autoscaling_config"] = None  # the model's own fixed replica count beats a global autoscaling
        if out["max_ongoing_requests"] is None:
            out["max_ongoing_requests"] = 2 * out["max_batch_size"]
        if out["threads"] is None:
            out["threads"] = max(1, math.ceil(out["num_cpus"])) if not out["num_gpus"] else 1
        return out
