"""The HTTP surface of the ingress: errors as JSON, the response models, the OpenAPI text, the budgets and the
bounded body stream (raytasks/serve/bodies.py reads bodies with them).

Errors (every 4xx body is JSON ``{"error": code, "detail": message, ...}``):

* 401 ``unauthorized`` when the request carries neither ``Authorization: Bearer <key>`` nor
  ``X-API-Key: <key>`` with the API key (environment variable ``FACEATTR_API_KEY``, or the one named by
  ``api_key_env``); ``no_api_key`` for every request when no key is configured and ``allow_no_auth`` is not
  set. ``/healthz``, ``/docs`` and ``/openapi.json`` stay open. 408 ``body_timeout`` when the body does not
  arrive within ``ingress.body_timeout_s``.
* 404 ``unknown_model``, or ``no_model_set`` (``/v1/predict``, ``/v1/set`` without a ``model_set``); 413
  ``too_large`` (body over ``max_request_bytes``: refused from ``Content-Length`` before reading or waiting
  for the body budget, or as soon as a streamed body passes the limit; an image whose header is over a limit
  of models/imagebytes.py; the request's images over its pixel or decoded-bytes budget), ``too_many_faces``
  (the request's photos hold more faces than ``ingress.max_request_faces``: refused after detection, before
  any attribute model runs; the body has ``faces`` and ``limit_faces``); 415
  ``unsupported_media_type``; 422 ``not_image`` / ``empty`` / ``truncated`` / ``decode_error`` /
  ``bad_form`` naming each bad file, ``model_error`` naming an image the detector or a model failed on alone,
  ``invalid_request`` for a query value the API does not take (``?faces=`` other than detect or whole; checked
  after the API key); 405 ``method_not_allowed`` for a wrong method on a route; 503 ``overloaded`` (with
  ``Retry-After``) when a model's replicas and their queue (``max_ongoing_requests``, ``max_queued_requests``)
  are full; 504 ``timeout`` past
  ``ingress.request_timeout_s``, after which the model replica runs no further model for the request. The
  service stays up: a rejected request costs nothing further.
"""


# No ``from __future__ import annotations``: FastAPI resolves the route methods' annotations at runtime.
import asyncio
import math
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException


# --- the HTTP API -------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None, **extra):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers, self.extra = status, code, detail, headers, extra


def _changed(name: str, what: str = "model") -> APIError:
    """Two replicas of one model (or set) disagree on the checkpoint (a rolling update, a replaced object):
    the request is answered 503, to be retried once the update is through, never 500."""
    return APIError(503, "checkpoint_changed", f"{what} {name!r} is being updated (its replicas hold different "
                    "checkpoints); retry shortly", headers={"Retry-After": "2"})


def _no_model_set() -> APIError:
    return APIError(404, "no_model_set", "this server has no model set: start it with --set (python -m jobs.serve) "
                    "or give model_set: in the config's args (serve run jobs/serve.yaml); per-model predictions "
                    "are at POST /v1/models/{name}/predict")


def _refused(bad: list[dict]) -> APIError:
    """The answer to a request some of whose files cannot be decoded (``bad``: one ``{file, error, detail}``
    each): 413 when any is too large, else 422 with their common kind (``not_image`` when they differ)."""
    if any(b["error"] == "too_large" for b in bad):
        return APIError(413, "too_large", "; ".join(f"{b['file']}: {b['detail']}" for b in bad), files=bad)
    return APIError(422, bad[0]["error"] if len({b["error"] for b in bad}) == 1 else "not_image",
                    "; ".join(f"{b['file']}: {b['error']}: {b['detail']}" for b in bad), files=bad)


def _refuse_model_errors(rows: list[dict]) -> None:
    """A request is all or nothing (docs/api.md): an image the detector or a model failed on alone
    (core/failures.py; a ``model_error`` row in the label job) refuses its request, 422 naming it. The other
    requests of its batch got their rows."""
    from core.failures import MODEL_ERROR

    bad = [{"file": r["path"], "error": MODEL_ERROR, "detail": r["error_message"]} for r in rows
           if r.get("error_kind") == MODEL_ERROR]
    if bad:
        raise _refused(bad)


class ErrorBody(BaseModel):
    error: str
    detail: str


class PredictResponse(BaseModel):
    model: str
    architecture: str
    checkpoint: str
    predictions: list[dict[str, Any]]


class SetPredictResponse(BaseModel):
    set: str
    checkpoint: str
    models: list[dict[str, Any]]
    detector: str | None = None
    images: list[dict[str, Any]] | None = None
    predictions: list[dict[str, Any]]


_IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "description": "One image as the body (image/jpeg, image/png, ..., application/octet-stream), or "
                       "multipart/form-data with one or more image files (any field name).",
        "content": {
            "image/*": _IMAGE_BODY,
            "application/octet-stream": _IMAGE_BODY,
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        },
    },
}
_ERRORS = {code: {"model": ErrorBody, "description": desc} for code, desc in {
    401: "API key missing or wrong (unauthorized), or none configured on the server (no_api_key)",
    404: "unknown model", 408: "the body did not arrive within ingress.body_timeout_s (body_timeout)",
    413: "body or image over the size limit, or more faces than the request's budget (too_many_faces)",
    415: "content type is neither an image nor multipart/form-data",
    422: "a file is not a decodable image, a multipart body is malformed (bad_form), the model failed on an image "
         "(model_error), or a query value is not one of the API's (invalid_request, e.g. ?faces=)",
    503: "the model's replicas and queue, or the decoders, are full, or the model is being updated; retry "
         "after Retry-After seconds", 504: "the model did not answer within the request timeout"}.items()}
_SET_ERRORS = {**_ERRORS, 404: {"model": ErrorBody, "description": "the server has no model set (no_model_set)"}}

app = FastAPI(
    redoc_url=None,  # one documentation page (/docs), no OAuth2 redirect page: nothing undocumented is open
    swagger_ui_oauth2_redirect_url=None,
    title="faceattr",
    version="1",
    description="Face attributes from the project's multi-task models. Each prediction has the fields of a "
                "Parquet row of the label job for the same checkpoint.",
)


def _error_response(status: int, code: str, detail: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail, **extra}, status_code=status, headers=headers)


@app.exception_handler(APIError)
async def _api_error(_: Request, e: APIError):
    return _error_response(e.status, e.code, e.detail, e.headers, **e.extra)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return _error_response(e.status_code, code, str(e.detail), getattr(e, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError):
    return _error_response(422, "invalid_request", "request does not match the API", errors=_json_safe(e.errors()))


def _json_safe(v):
    """JSON has no NaN or infinity: such values become null (a model that emits NaN for an image)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, np.generic):
        return _json_safe(v.item())
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    return str(v)


async def _call_model(name: str, response, what: str = "model"):
    """Await a call to a model (or set) deployment; a full queue or no replica becomes a JSON 503."""
    try:
        return await response
    except BackPressureError as e:
        retry = max(1, math.ceil(getattr(e, "retry_after_s", None) or 1))
        raise APIError(503, "overloaded", f"{what} {name!r} is at capacity; retry later",
                       headers={"Retry-After": str(retry)}) from None
    except DeploymentUnavailableError:
        raise APIError(503, "unavailable", f"{what} {name!r} has no running replica",
                       headers={"Retry-After": "5"}) from None


class Budget:
    """An amount of bytes shared by the requests of one ingress replica (bodies held, decoded pixels held):
    :meth:`acquire` waits up to ``timeout`` (0: not at all) for room, then answers 503 with ``Retry-After`` before the memory
    is taken; :meth:`release` gives it back when the request is answered."""

    def __init__(self, total: int, what: str):
        self.total, self.free, self.what = int(total), int(total), what
        self._cond = asyncio.Condition()

    async def acquire(self, n: int, timeout: float) -> int:
        n = min(int(n), self.total)  # one request alone always fits (its own limit is checked before)
        async with self._cond:
            try:
                if self.free < n:
                    if timeout <= 0:  # 0: no wait (asyncio.wait_for(..., 0) would refuse even free room on 3.10/3.11)
                        raise asyncio.TimeoutError
                    await asyncio.wait_for(self._cond.wait_for(lambda: self.free >= n), timeout)
            except asyncio.TimeoutError:
                raise APIError(503, "overloaded", f"{self.what} is saturated; retry later",
                               headers={"Retry-After": "1"}) from None
            self.free -= n
        return n

    async def release(self, n: int) -> None:
        async with self._cond:
            self.free += n
            self._cond.notify_all()


def _declared_length(request: Request, limit: int) -> int | None:
    """The body size a request declares (``Content-Length``; None without one), refused at once: 400 when it
    is not a number, 413 when it is over ``limit`` (before anything is read, or waited for)."""
    declared = request.headers.get("content-length")
    if not declared:
        return None
    try:
        size = int(declared)
    except ValueError:
        size = -1
    if size < 0:
        raise APIError(400, "bad_request", f"Content-Length {declared!r} is not a number of bytes")
    if size > limit:
        raise APIError(413, "too_large", f"body of {size} bytes is over the limit of {limit} bytes", limit_bytes=limit)
    return size


async def _bounded_stream(request: Request, limit: int):
    """The request body, chunk by chunk, refused with 413 as soon as it would pass ``limit`` bytes (a declared
    ``Content-Length`` was checked before, by :func:`_declared_length`)."""
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise APIError(413, "too_large", f"body is over the limit of {limit} bytes", limit_bytes=limit)
        yield chunk
