"""Online queries: the label job's checkpoints behind an HTTP API on Ray Serve.

    serve run jobs/serve.yaml
    python -m jobs.serve --model dmm=s3://bucket/models/dmm.pt --model agr=./agr.pt --port 8000 [--set]

One Serve application, built by :func:`build_app` from plain arguments (:class:`ServeArgs`)::

    HTTP proxy -> FaceAttrAPI (FastAPI ingress, this module): API key, size limit, content type, decoding
                      |  one DeploymentHandle per model (and one for the set); uint8 images travel, as in
                      v  the label job
                  ModelServer "model-<name>" (one deployment per model): the checkpoint loaded once per
                  replica (core.predictor.Predictor), @serve.batch dynamic batching, rows out
                  SetServer "modelset" (only with a ``model_set`` in the config): every model of the set in
                  one replica (core.modelset.SetPredictor), for POST /v1/predict

The deployments that compute are in raytasks/serve/replicas.py; the configuration is raytasks/serve/config.py.

The answer for an image is the label job's Parquet row for it: both go through
``Predictor.predict_decoded`` on a batch from ``decode_batch`` (or ``predict_photos`` with the same
detector), so the columns (``path``, ``ok``, ..., ``model``, ``checkpoint``, then the fields of the model's
output description) and values are the same. For the set, both go through ``SetPredictor``: one row per
face with one struct column per model, as the label job writes for the same set.

**One deployment per model, not model multiplexing.** Multiplexing (``@serve.multiplexed``) pays when there
are many more models than fit in a replica's memory: replicas load models on demand and evict them LRU. Here
the models are the few named in the config, and they differ in what a replica needs: input size and cost
(hard-sharing at 50 px grayscale against DMM-CNN's ResNet-50), hence batch size, replica count or
autoscaling, and ``num_gpus``. A deployment per model gives each its own settings, keeps every batch one
model at one input shape (``@serve.batch`` would otherwise mix model ids in a batch), loads every checkpoint
at deploy time (a bad URI fails the deploy, not a user's first request) and never evicts (no multi-second
reload of a 350 MB checkpoint from S3 in the middle of traffic).

**The set is one deployment, not a fan-out to the model deployments.** ``POST /v1/predict`` answers every
model for every face; fanning out would send the photo to each model replica and detect its faces once per
model. The set replica holds every member (3-100 MB of weights each) and the detector in one process on one
device, so the photo crosses the process boundary once, is searched for faces once and each face is aligned
once per distinct template. It loads the same checkpoints (same URIs and ``#sha256:`` pins) as the
per-model deployments, which stay for per-model routes.

**Decoding happens in the ingress**, not in the model replicas: it is CPU work that scales with the
ingress's replicas while model replicas (GPUs) do only batched forward passes; a body that is not an image
is answered 415/422 without queueing behind the model; and what a model replica receives is the uint8
input at the model's size, as in the label job (the set: once per distinct preprocessing). The ingress
learns each model's preprocessing from the model's deployment (``describe``) and sends the checkpoint hash
(the set: its identity) it decoded for; a replica that holds another refuses the batch and the ingress
re-reads the description once.

Errors (every 4xx body is JSON ``{"error": code, "detail": message, ...}``):

* 401 ``unauthorized`` when an API key is configured (environment variable ``FACEATTR_API_KEY``, or the one
  named by ``api_key_env``) and the request carries neither ``Authorization: Bearer <key>`` nor
  ``X-API-Key: <key>``. ``/healthz``, ``/docs`` and ``/openapi.json`` stay open.
* 404 ``unknown_model``, or ``no_model_set`` (``/v1/predict``, ``/v1/set`` without a ``model_set``); 413
  ``too_large`` (body over ``max_request_bytes``: refused from ``Content-Length`` before reading, or as soon
  as a streamed body passes the limit; or an image over the preprocessing's pixel limit); 415
  ``unsupported_media_type``; 422 ``not_image`` / ``empty`` / ``truncated`` / ``decode_error`` /
  ``bad_form`` naming each bad file; 503 ``overloaded`` (with ``Retry-After``) when a model's replicas and
  their queue (``max_ongoing_requests``, ``max_queued_requests``) are full. The service stays up: a rejected
  request costs nothing further.
"""

# No ``from __future__ import annotations`` here: FastAPI resolves the route methods' annotations at runtime
# after @serve.ingress has moved them off the class, and string annotations would not resolve.
import asyncio
import hmac
import math
import os
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.modelset import ModelSet, decode_for_set
from core.predictor import decode_batch
from facedata import storage
from faces.pipeline import FaceOptions, decode_photos
from models.preprocess import Preprocessing
from raytasks.serve.config import (  # noqa: F401 - the app's API
    API_KEY_ENV,
    DeploymentSpec,
    IngressSpec,
    ModelSetSpec,
    ServeArgs,
)
from raytasks.serve.replicas import CheckpointChanged, ModelServer, SetServer
from raytasks.threads import runtime_env

SET_DEPLOYMENT = "modelset"  # the model set's deployment (model deployments are "model-<name>")
ADMIN_KEY_ENV = "FACEATTR_ADMIN_KEY"  # who may see checkpoint URIs, devices and threads (GET /v1/models)
PRIVATE_FIELDS = ("device", "threads", "batchnorm_folded")  # besides checkpoint.uri: operators only
RAW_TYPES = ("application/octet-stream",)  # besides image/*: what `curl --data-binary` users send


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
    401: "API key missing or wrong", 404: "unknown model", 413: "body or image over the size limit",
    415: "content type is neither an image nor multipart/form-data", 422: "a file is not a decodable image",
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


async def _bounded_stream(request: Request, limit: int):
    """The request body, chunk by chunk, refused with 413 as soon as it would pass ``limit`` bytes (and
    before reading anything when ``Content-Length`` already says so)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise APIError(400, "bad_request", f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise APIError(413, "too_large", f"body of {size} bytes is over the limit of {limit} bytes",
                           limit_bytes=limit)
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise APIError(413, "too_large", f"body is over the limit of {limit} bytes", limit_bytes=limit)
        yield chunk


@serve.deployment
@serve.ingress(app)
class FaceAttrAPI:
    """The HTTP front: checks, reads and decodes; the model deployments compute. ``model_set``: the set's
    deployment (``SetServer``), or None when the config has no ``model_set``."""

    def __init__(self, handles: dict[str, DeploymentHandle], max_request_bytes: int, max_files: int, api_key_env: str = API_KEY_ENV,
                 api_key: str | None = None, faces: dict | None = None, limits: "IngressSpec | None" = None,
                 model_set: DeploymentHandle | None = None, set_name: str = "set"):
        self.handles = handles
        self.set_handle, self.set_name = model_set, set_name
        self.face_options = FaceOptions.from_dict(faces)
        self.max_request_bytes = max_request_bytes
        self.max_files = max_files
        key = api_key or os.environ.get(api_key_env) or None
        self._api_key = key.encode() if key else None
        admin = os.environ.get(ADMIN_KEY_ENV) or None
        self._admin_key = admin.encode() if admin else None
        # Back-pressure before decoding: at most max_decodes images are decoded at once, on threads of their
        # own; a request that cannot get a slot within decode_wait_s is answered 503 before any work.
        from concurrent.futures import ThreadPoolExecutor

        self.limits = limits or IngressSpec()
        self._decoders = ThreadPoolExecutor(self.limits.max_decodes, thread_name_prefix="decode")
        self._decode_slots = asyncio.Semaphore(self.limits.max_decodes)
        self._described: dict[str | None, dict] = {}  # model name -> description; None -> the set's
        self._locks: dict[str | None, asyncio.Lock] = {}

    # -- checks --------------------------------------------------------------------------------------
    def _is_admin(self, request: Request) -> bool:
        given = request.headers.get("x-admin-key")
        return self._admin_key is not None and given is not None and hmac.compare_digest(given.encode(), self._admin_key)

    def _visible(self, desc: dict, request: Request) -> dict:
        """A model's description as this caller may see it: where the checkpoint lives and how the replica
        runs (device, threads) only for the operator's admin key (``FACEATTR_ADMIN_KEY``), not for holders
        of the inference key."""
        if self._is_admin(request):
            return desc
        out = {k: v for k, v in desc.items() if k not in PRIVATE_FIELDS}
        out["checkpoint"] = {"hash": desc["checkpoint"]["hash"]}
        return out

    def _visible_set(self, desc: dict, request: Request) -> dict:
        """The set's description as this caller may see it: each member's checkpoint URI, the device, the
        threads and the folded layers only for the admin key, as for a model."""
        if self._is_admin(request):
            return desc
        out = {k: v for k, v in desc.items() if k not in PRIVATE_FIELDS}
        out["models"] = [{k: v for k, v in m.items() if k != "uri"} for m in desc["models"]]
        return out

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), self._api_key):
            raise APIError(401, "unauthorized",
                           "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                           headers={"WWW-Authenticate": "Bearer"})

    def _handle(self, name: str) -> DeploymentHandle:
        if name not in self.handles:
            raise APIError(404, "unknown_model", f"no model named {name!r}", models=sorted(self.handles))
        return self.handles[name]

    def _set(self) -> DeploymentHandle:
        if self.set_handle is None:
            raise _no_model_set()
        return self.set_handle

    async def _describe(self, name: str, refresh: bool = False) -> dict:
        """The model's description (preprocessing, checkpoint hash), fetched once and shared by the
        requests that arrive meanwhile."""
        return await self._cached_description(name, self._handle(name), refresh)

    async def _describe_set(self, refresh: bool = False) -> dict:
        """The set's description (its identity, members, distinct preprocessings), as :meth:`_describe`."""
        return await self._cached_description(None, self._set(), refresh, name=self.set_name, what="model set")

    async def _cached_description(self, key: str | None, handle: DeploymentHandle, refresh: bool,
                                  name: str | None = None, what: str = "model") -> dict:
        lock = self._locks.setdefault(key, asyncio.Lock())  # key None: the set (model names are strings)
        async with lock:
            if refresh or key not in self._described:
                self._described[key] = await _call_model(name or key, handle.describe.remote(), what)
        return self._described[key]

    async def _decode(self, fn, *args):
        """Run a decode on the ingress's decode threads, at most ``max_decodes`` requests at a time; 503 with
        ``Retry-After`` when no slot frees within ``decode_wait_s`` (the request has cost nothing yet)."""
        try:
            await asyncio.wait_for(self._decode_slots.acquire(), timeout=self.limits.decode_wait_s)
        except asyncio.TimeoutError:
            raise APIError(503, "overloaded", "image decoding is saturated; retry later",
                           headers={"Retry-After": "1"}) from None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._decoders, fn, *args)
        finally:
            self._decode_slots.release()

    async def _model_call(self, name: str, response, what: str = "model"):
        """A model (or set) call bounded by ``request_timeout_s``: 504 beyond it."""
        try:
            return await asyncio.wait_for(_call_model(name, response, what), timeout=self.limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(504, "timeout", f"{what} {name!r} did not answer within {self.limits.request_timeout_s:g} s",
                           headers={"Retry-After": "5"}) from None

    # -- reading ---------------------------------------------------------------------------------------
    async def _read_items(self, request: Request, filename: str) -> list[tuple[str, bytes]]:
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        if media == "multipart/form-data":
            return await self._read_multipart(request)
        if media.startswith("image/") or media in RAW_TYPES:
            body = b"".join([c async for c in _bounded_stream(request, self.max_request_bytes)])
            return [(filename, body)]
        raise APIError(415, "unsupported_media_type",
                       f"content type {ctype or '(none)'!r} is not an image: send the image as the body with "
                       "Content-Type image/jpeg, image/png, ... or as multipart/form-data files")

    async def _read_multipart(self, request: Request) -> list[tuple[str, bytes]]:
        from starlette.formparsers import MultiPartException, MultiPartParser

        parser = MultiPartParser(Headers(raw=request.headers.raw), _bounded_stream(request, self.max_request_bytes),
                                 max_files=self.max_files, max_fields=self.max_files)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise APIError(422, "bad_form", f"multipart/form-data body could not be parsed: {e}") from None
        try:
            items, fields = [], []
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    items.append((value.filename or key, await value.read()))
                else:
                    fields.append(key)
        finally:
            await form.close()
        if fields:
            raise APIError(422, "bad_form", f"form fields {fields} are not files: send each image as a file part "
                           "(curl -F 'file=@face.jpg')")
        if not items:
            raise APIError(422, "bad_form", "multipart/form-data body holds no file")
        return items

    # -- routes --------------------------------------------------------------------------------------
    @app.get("/healthz", summary="Liveness of the HTTP front")
    async def healthz(self) -> dict:
        return {"status": "ok"}  # open to anyone: says nothing about the models

    @app.get("/v1/models", summary="The served models: outputs, preprocessing, metrics, checkpoint hash",
             responses={401: _ERRORS[401]})
    async def list_models(self, request: Request) -> dict:
        self._authorize(request)
        names = sorted(self.handles)
        described = await asyncio.gather(*(_call_model(n, self._handle(n).describe.remote()) for n in names))
        for n, d in zip(names, described):
            self._described[n] = d
        return _json_safe({"models": [self._visible(d, request) for d in described]})

    @app.get("/v1/models/{name}", summary="One served model", responses={k: _ERRORS[k] for k in (401, 404)})
    async def get_model(self, name: str, request: Request) -> dict:
        self._authorize(request)
        return _json_safe(self._visible(await self._describe(name, refresh=True), request))

    @app.post("/v1/models/{name}/predict", summary="Predict the attributes of one or more face images",
              response_model=PredictResponse, openapi_extra=PREDICT_OPENAPI,
              responses={k: _ERRORS[k] for k in (401, 404, 413, 415, 422, 503, 504)})
    async def predict(self, name: str, request: Request, filename: str = "image",
                      faces: Literal["detect", "whole"] | None = None) -> JSONResponse:
        """The image as the body, or several as multipart files; ``filename`` names a raw body's image in
        the answer's ``path`` field (multipart files keep their own names). ``faces``: ``detect`` (the
        default unless the server runs with ``faces: whole``) finds every face and answers, per image, one
        row per face (``images[i].faces``; ``predictions`` lists the same rows as the label job's Parquet);
        ``whole`` treats each image as one aligned face crop (one row per image). The server's ``faces.mode``
        is the default."""
        self._authorize(request)
        handle = self._handle(name)
        items = await self._read_items(request, filename)
        if (faces or self.face_options.mode) == "detect":
            return await self._predict_photos(name, handle, items)
        return await self._predict_whole(name, handle, items)

    async def _consistent(self, name: str, call, describe=None, what: str = "model") -> tuple[dict, Any]:
        """``await call(description)`` against the model's current checkpoint: when a replica holds another
        one (an update under way), the description is read again and the call made once more; a second
        mismatch is a 503, never a 500. ``describe(refresh)``: the description (default: model ``name``'s)."""
        for attempt in (0, 1):
            refresh = attempt > 0
            desc = await (describe(refresh) if describe else self._describe(name, refresh=refresh))
            try:
                return desc, await call(desc)
            except CheckpointChanged:
                if attempt:
                    raise _changed(name, what) from None
        raise AssertionError("unreachable")

    async def _predict_whole(self, name: str, handle: DeploymentHandle, items: list[tuple[str, bytes]]) -> JSONResponse:
        async def call(desc: dict):  # decoded for the checkpoint's own preprocessing
            pre = Preprocessing.from_dict(desc["preprocessing"])
            batch = await self._decode(decode_batch, [p for p, _ in items], [d for _, d in items], pre)
            self._reject_bad_images(batch)
            payload = [{"path": batch["path"][i], "width": int(batch["width"][i]), "height": int(batch["height"][i]),
                        "image": batch["image"][i], "geometry": batch["geometry"][i]} for i in range(len(items))]
            return await self._model_call(name, handle.predict.remote(payload, desc["checkpoint"]["hash"]))

        desc, rows = await self._consistent(name, call)
        return JSONResponse(_json_safe({"model": name, "architecture": desc["architecture"],
                                        "checkpoint": desc["checkpoint"]["hash"], "predictions": rows}))

    async def _predict_photos(self, name: str, handle: DeploymentHandle, items: list[tuple[str, bytes]]) -> JSONResponse:
        payload = await self._decode_photos(items)
        desc, per_image = await self._consistent(name, lambda desc: self._model_call(
            name, handle.predict_photos.remote(payload, desc["checkpoint"]["hash"])))
        return JSONResponse(_json_safe({
            "model": name, "architecture": desc["architecture"], "checkpoint": desc["checkpoint"]["hash"],
            "detector": (desc.get("faces") or {}).get("detector"), **self._per_face(payload, per_image)}))

    async def _decode_photos(self, items: list[tuple[str, bytes]]) -> list[dict]:
        """Photos decoded once for detection (longest side at most ``faces.max_side``), one dict each."""
        batch = await self._decode(decode_photos, [p for p, _ in items], [d for _, d in items],
                                   self.face_options.max_side)
        self._reject_bad_images(batch)
        return [{"path": batch["path"][i], "width": int(batch["width"][i]), "height": int(batch["height"][i]),
                 "scale": float(batch["scale"][i]), "image": batch["image"][i]} for i in range(len(items))]

    @staticmethod
    def _per_face(payload: list[dict], per_image: list[list[dict]]) -> dict:
        """``images`` (per photo, its rows with a face) and ``predictions`` (every row, as in Parquet)."""
        images = [{"path": p["path"], "width": p["width"], "height": p["height"],
                   "faces": [r for r in rows if r["face"] is not None]} for p, rows in zip(payload, per_image)]
        return {"images": images, "predictions": [r for rows in per_image for r in rows]}

    # -- the model set -------------------------------------------------------------------------------------
    @app.post("/v1/predict", summary="Every model of the set on every face of one or more images",
              response_model=SetPredictResponse, openapi_extra=PREDICT_OPENAPI,
              responses={k: _SET_ERRORS[k] for k in (401, 404, 413, 415, 422, 503, 504)})
    async def predict_set(self, request: Request, filename: str = "image",
                          faces: Literal["detect", "whole"] | None = None) -> JSONResponse:
        """Every model of the server's model set (and the face embedding when the set has it) on every face,
        in one request: each image is read and decoded once and searched for faces once, and each face
        gets one row holding one object per model (``{"model", "checkpoint", ...its outputs}``), the same
        row as the label job's Parquet for the same set. The body and ``filename`` as for
        ``/v1/models/{name}/predict``; ``faces=whole``: one row per image. 404 ``no_model_set`` when the
        server runs without a set."""
        self._authorize(request)
        handle = self._set()
        items = await self._read_items(request, filename)
        if (faces or self.face_options.mode) == "detect":
            return await self._predict_set_photos(handle, items)
        return await self._predict_set_whole(handle, items)

    @app.get("/v1/set", summary="The model set answered at POST /v1/predict: identity, members, fields",
             responses={k: _SET_ERRORS[k] for k in (401, 404)})
    async def get_set(self, request: Request) -> dict:
        self._authorize(request)
        return _json_safe(self._visible_set(await self._describe_set(refresh=True), request))

    async def _set_call(self, call) -> tuple[dict, Any]:
        """``await call(desc)`` against the set's current identity, as :meth:`_consistent` for a model."""
        return await self._consistent(self.set_name, call, describe=self._describe_set, what="model set")

    async def _set_remote(self, response):
        """A call to the set's deployment, bounded by ``request_timeout_s`` (504), 503 when it is full."""
        return await self._model_call(self.set_name, response, "model set")

    @staticmethod
    def _set_head(desc: dict) -> dict:
        return {"set": desc["name"], "checkpoint": desc["checkpoint"],
                "models": [{k: m[k] for k in ("name", "model", "checkpoint")} for m in desc["models"]]}

    async def _predict_set_photos(self, handle: DeploymentHandle, items: list[tuple[str, bytes]]) -> JSONResponse:
        payload = await self._decode_photos(items)
        desc, per_image = await self._set_call(
            lambda desc: self._set_remote(handle.predict_photos.remote(payload, desc["checkpoint"])))
        return JSONResponse(_json_safe({**self._set_head(desc), "detector": desc["faces"]["detector"],
                                        **self._per_face(payload, per_image)}))

    async def _predict_set_whole(self, handle: DeploymentHandle, items: list[tuple[str, bytes]]) -> JSONResponse:
        async def call(desc: dict):  # each image decoded once per distinct preprocessing of the set
            pres = [Preprocessing.from_dict(d) for d in desc["preprocessings"]]
            batch = await self._decode(decode_for_set, [p for p, _ in items], [d for _, d in items], pres)
            self._reject_bad_images(batch)
            arrays = [f"{kind}_{k}" for k in range(len(pres)) for kind in ("image", "geometry")]
            payload = [{"path": batch["path"][i], "width": int(batch["width"][i]), "height": int(batch["height"][i]),
                        **{a: batch[a][i] for a in arrays}} for i in range(len(items))]
            return await self._set_remote(handle.predict.remote(payload, desc["checkpoint"]))

        desc, rows = await self._set_call(call)
        return JSONResponse(_json_safe({**self._set_head(desc), "predictions": rows}))

    @staticmethod
    def _reject_bad_images(batch: dict) -> None:
        bad = [{"file": str(p), "error": k, "detail": m}
               for p, ok, k, m in zip(batch["path"], batch["ok"], batch["error_kind"], batch["error_message"]) if not ok]
        if not bad:
            return
        if any(b["error"] == "too_large" for b in bad):
            raise APIError(413, "too_large", "; ".join(f"{b['file']}: {b['detail']}" for b in bad), files=bad)
        raise APIError(422, bad[0]["error"] if len({b["error"] for b in bad}) == 1 else "not_image",
                       "; ".join(f"{b['file']}: {b['error']}: {b['detail']}" for b in bad), files=bad)


# --- the application builder ----------------------------------------------------------------------------
def deployment_options(settings: dict) -> dict:
    """Serve options of a model (or the set's) deployment from its resolved settings."""
    opts: dict = {
        "max_ongoing_requests": settings["max_ongoing_requests"],
        "max_queued_requests": settings["max_queued_requests"],
        # a worker process of its own, as the label job's predictor actors (raytasks/threads.py)
        "ray_actor_options": {"num_cpus": settings["num_cpus"], "num_gpus": settings["num_gpus"],
                              "runtime_env": runtime_env()},
        "user_config": {"max_batch_size": settings["max_batch_size"],
                        "batch_wait_timeout_s": settings["batch_wait_timeout_s"]},
    }
    if settings["autoscaling_config"]:
        opts["autoscaling_config"] = settings["autoscaling_config"]
    else:
        opts["num_replicas"] = settings["num_replicas"]
    return opts


def build_app(args: ServeArgs) -> serve.Application:
    """The Serve application (``import_path: raytasks.serve:build_app``). ``args`` is a dict or
    :class:`ServeArgs`; the API key is read from the environment variable ``args.api_key_env`` here and,
    failing that, in the ingress replica."""
    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    handles, uris = {}, {}
    for name in args.models:
        s = args.model_settings(name)
        if not storage.is_s3(s["checkpoint"]):  # replicas may run in another working directory
            s["checkpoint"] = os.path.abspath(s["checkpoint"].removeprefix("file://"))
        uris[name] = s["checkpoint"]
        handles[name] = ModelServer.options(name=f"model-{name}", **deployment_options(s)).bind(
            name, s["checkpoint"], s["device"], s["precision"], s["channels_last"], s["threads"], args.faces)
    set_handle, set_name = None, "set"
    if args.model_set is not None:  # the same checkpoints (URIs and pins) as the per-model deployments
        spec, s = args.model_set, args.set_settings()
        members = spec.members(list(args.models))
        model_set = ModelSet(tuple((column, uris[name]) for column, name in members), embedding=spec.embedding,
                             name=spec.name, version=spec.version)
        set_name = spec.name
        set_handle = SetServer.options(name=SET_DEPLOYMENT, **deployment_options(s)).bind(
            model_set.to_dict(), {column: name for column, name in members}, s["device"], s["precision"],
            s["threads"], args.faces)
    ing = args.ingress
    ing_opts: dict = {"max_ongoing_requests": ing.max_ongoing_requests, "max_queued_requests": ing.max_queued_requests,
                      "ray_actor_options": {"num_cpus": ing.num_cpus}}
    if ing.autoscaling_config:
        ing_opts["autoscaling_config"] = ing.autoscaling_config
    else:
        ing_opts["num_replicas"] = ing.num_replicas or 1
    return FaceAttrAPI.options(name="FaceAttrAPI", **ing_opts).bind(
        handles, args.max_request_bytes, args.max_files, args.api_key_env,
        os.environ.get(args.api_key_env) or None, args.faces, ing, set_handle, set_name)


__all__ = ["ServeArgs", "DeploymentSpec", "IngressSpec", "ModelSetSpec", "ModelServer", "SetServer", "FaceAttrAPI",
           "app", "build_app"]
