"""Online queries: the label job's checkpoints behind an HTTP API on Ray Serve.

    serve run jobs/serve.yaml
    python -m jobs.serve --model dmm=s3://bucket/models/dmm.pt --model agr=./agr.pt --port 8000

One Serve application, built by :func:`build_app` from plain arguments (:class:`ServeArgs`)::

    HTTP proxy -> FaceAttrAPI (FastAPI ingress): API key, size limit, content type, image decoding
                      |  one DeploymentHandle per model; uint8 images travel, as in the label job
                      v
                  ModelServer "model-<name>" (one deployment per model): the checkpoint loaded once per
                  replica (raytasks.predictor.Predictor), @serve.batch dynamic batching, rows out

The answer for an image is the label job's Parquet row for it: both go through
``Predictor.predict_decoded`` on a batch from ``decode_batch``, so the columns (``path``, ``ok``, ...,
``model``, ``checkpoint``, then the fields of the model's output description) and values are the same.

**One deployment per model, not model multiplexing.** Multiplexing (``@serve.multiplexed``) pays when there
are many more models than fit in a replica's memory: replicas load models on demand and evict them LRU. Here
the models are the few named in the config, and they differ in what a replica needs: input size and cost
(hard-sharing at 50 px grayscale against DMM-CNN's ResNet-50), hence batch size, replica count or
autoscaling, and ``num_gpus``. A deployment per model gives each its own settings, keeps every batch one
model at one input shape (``@serve.batch`` would otherwise mix model ids in a batch), loads every checkpoint
at deploy time (a bad URI fails the deploy, not a user's first request) and never evicts (no multi-second
reload of a 350 MB checkpoint from S3 in the middle of traffic).

**Decoding happens in the ingress**, not in the model replicas: it is CPU work that scales with the
ingress's replicas while model replicas (GPUs) do only batched forward passes; a body that is not an image
is answered 415/422 without queueing behind the model; and what a model replica receives is the uint8
input at the model's size, as in the label job. The ingress learns each model's preprocessing from the
model's deployment (``describe``) and sends the checkpoint hash it decoded for; a replica that holds another
checkpoint refuses the batch and the ingress re-reads the preprocessing once.

Errors (every 4xx body is JSON ``{"error": code, "detail": message, ...}``):

* 401 ``unauthorized`` when an API key is configured (environment variable ``FACEATTR_API_KEY``, or the one
  named by ``api_key_env``) and the request carries neither ``Authorization: Bearer <key>`` nor
  ``X-API-Key: <key>``. ``/healthz``, ``/docs`` and ``/openapi.json`` stay open.
* 404 ``unknown_model``; 413 ``too_large`` (body over ``max_request_bytes``: refused from
  ``Content-Length`` before reading, or as soon as a streamed body passes the limit; or an image over the
  preprocessing's pixel limit); 415 ``unsupported_media_type``; 422 ``not_image`` / ``empty`` /
  ``truncated`` / ``decode_error`` / ``bad_form`` naming each bad file; 503 ``overloaded`` (with
  ``Retry-After``) when a model's replicas and their queue (``max_ongoing_requests``,
  ``max_queued_requests``) are full. The service stays up: a rejected request costs nothing further.
"""

# No ``from __future__ import annotations`` here: FastAPI resolves the route methods' annotations at runtime
# after @serve.ingress has moved them off the class, and string annotations would not resolve.
import asyncio
import hmac
import math
import os
import threading
from collections import Counter
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from facedata import storage
from faces.pipeline import FaceFinder, FaceOptions, decode_photos
from models.preprocess import Preprocessing
from raytasks.predictor import Predictor, decode_batch, rows_per_image
from raytasks.serve_config import API_KEY_ENV, DeploymentSpec, IngressSpec, ServeArgs  # noqa: F401 - the app's API
from raytasks.threads import runtime_env, torch_executor

ADMIN_KEY_ENV = "FACEATTR_ADMIN_KEY"  # who may see checkpoint URIs, devices and threads (GET /v1/models)
PRIVATE_FIELDS = ("device", "threads", "batchnorm_folded")  # besides checkpoint.uri: operators only
RAW_TYPES = ("application/octet-stream",)  # besides image/*: what `curl --data-binary` users send


# --- the model deployment -----------------------------------------------------------------------------
class CheckpointChanged(RuntimeError):
    """The ingress decoded for another checkpoint than the replica holds (the deployment was updated)."""


@serve.deployment
class ModelServer:
    """One model: its checkpoint loaded once per replica, images batched across requests."""

    def __init__(self, name: str, checkpoint: str, device: str | None, precision: str,
                 channels_last: bool, threads: int, faces: dict | None = None):
        self.name = name
        # Every torch call of the replica runs on this one thread: each thread that calls torch gets its own
        # OpenMP pool, and with more OpenMP threads than cores libgomp throttles them (raytasks/threads.py).
        self._torch_thread = torch_executor(f"model-{name}")
        self.predictor = self._torch_thread.submit(
            Predictor, checkpoint, device=device, precision=precision, channels_last=channels_last,
            threads=threads).result()
        self.face_options = FaceOptions.from_dict(faces)
        # The detector next to the model, loaded once per replica (0.4 M parameters), whatever the default mode:
        # a request may ask for either (?faces=), and a photo crosses processes once.
        self.finder = self._torch_thread.submit(FaceFinder, self.face_options, self.predictor.device).result()
        self.checkpoint_uri = checkpoint
        self.threads = threads
        self.max_batch_size, self.batch_wait_timeout_s = 16, 0.01  # @serve.batch's; reconfigure sets the config's
        self.batch_sizes: Counter[int] = Counter()
        self.requests = 0
        self.images = 0
        self._lock = threading.Lock()
        pre = self.predictor.preprocessing
        # The first forward pass builds the kernels' plans (oneDNN, cuDNN); pay for it before traffic.
        self._torch_thread.submit(self.predictor.forward_uint8,
                                  torch.zeros((1, pre.channels, *pre.size), dtype=torch.uint8)).result()

    def reconfigure(self, user_config: dict) -> None:
        """``user_config`` carries the batching knobs, so changing them in the config does not restart
        replicas (Serve calls this on deploy and on every config update)."""
        self.max_batch_size = int(user_config["max_batch_size"])
        self.batch_wait_timeout_s = float(user_config["batch_wait_timeout_s"])
        for method in (self.infer, self.infer_photo):
            method.set_max_batch_size(self.max_batch_size)
            method.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    def describe(self) -> dict:
        p = self.predictor
        info = p.info
        return {
            "name": self.name,
            "architecture": info.model,
            "checkpoint": {"uri": self.checkpoint_uri, "hash": info.hash},
            "config": info.config,
            "outputs": info.outputs,
            "fields": [{"name": f.name, "type": str(f.type)} for f in p.schema],
            "preprocessing": p.preprocessing.to_dict(),
            "metrics": info.metrics,
            "device": str(p.device),
            "precision": p.precision,
            "batchnorm_folded": p.folded,
            "threads": self.threads,
            "faces": {**self.face_options.to_dict(), "detector": self.finder.identity},
            "batching": {"max_batch_size": self.max_batch_size,
                         "batch_wait_timeout_s": self.batch_wait_timeout_s},
            "stats": self.stats(),
        }

    def stats(self) -> dict:
        """Counters of the replica that answers (one of possibly several)."""
        with self._lock:
            sizes = dict(sorted(self.batch_sizes.items()))
            return {"requests": self.requests, "images": self.images, "batches": sum(sizes.values()),
                    "max_batch_size_seen": max(sizes, default=0), "batch_sizes": sizes}

    async def predict(self, items: list[dict], checkpoint_hash: str) -> list[dict]:
        """One HTTP request's decoded images -> their rows. Each image joins the replica's batch queue
        separately, so images of concurrent requests share forward passes."""
        if checkpoint_hash != self.predictor.checkpoint_hash:
            raise CheckpointChanged(f"decoded for {checkpoint_hash}, replica holds {self.predictor.checkpoint_hash}")
        with self._lock:
            self.requests += 1
        return list(await asyncio.gather(*(self.infer(item) for item in items)))

    async def predict_photos(self, items: list[dict], checkpoint_hash: str) -> list[list[dict]]:
        """One HTTP request's decoded photos -> per photo its rows (one per face, or one saying no face)."""
        if checkpoint_hash != self.predictor.checkpoint_hash:
            raise CheckpointChanged(f"decoded for {checkpoint_hash}, replica holds {self.predictor.checkpoint_hash}")
        with self._lock:
            self.requests += 1
        return list(await asyncio.gather(*(self.infer_photo(item) for item in items)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer_photo(self, items: list[dict]) -> list[list[dict]]:
        with self._lock:
            self.batch_sizes[len(items)] += 1
            self.images += len(items)
        return await asyncio.get_running_loop().run_in_executor(self._torch_thread, self._run_photos, items)

    def _run_photos(self, items: list[dict]) -> list[list[dict]]:
        n = len(items)
        batch = {"path": [it["path"] for it in items], "ok": np.ones(n, dtype=bool), "error_kind": [None] * n,
                 "error_message": [None] * n, "width": [it["width"] for it in items],
                 "height": [it["height"] for it in items], "scale": [it["scale"] for it in items],
                 "image": [it["image"] for it in items]}
        return rows_per_image(self.predictor.predict_photos(batch, self.finder), n)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer(self, items: list[dict]) -> list[dict]:
        with self._lock:
            self.batch_sizes[len(items)] += 1
            self.images += len(items)
        # Off the event loop: new requests keep joining the next batch while this one runs.
        return await asyncio.get_running_loop().run_in_executor(self._torch_thread, self._run, items)

    def _run(self, items: list[dict]) -> list[dict]:
        n = len(items)
        batch = {
            "path": np.array([it["path"] for it in items], dtype=object),
            "ok": np.ones(n, dtype=bool),
            "error_kind": np.array([None] * n, dtype=object),
            "error_message": np.array([None] * n, dtype=object),
            "width": np.array([it["width"] for it in items], dtype=np.int32),
            "height": np.array([it["height"] for it in items], dtype=np.int32),
            "image": np.stack([it["image"] for it in items]),
            "geometry": np.stack([it["geometry"] for it in items]),
        }
        cols = self.predictor.predict_decoded(batch)
        return [{k: cols[k][i] for k in cols} for i in range(n)]


def _changed(name: str) -> "APIError":
    """Two replicas of one model disagree on the checkpoint (a rolling update, a replaced object): the
    request is answered 503, to be retried once the update is through, never 500."""
    return APIError(503, "checkpoint_changed", f"model {name!r} is being updated (its replicas hold different "
                    "checkpoints); retry shortly", headers={"Retry-After": "2"})


# --- the HTTP API -------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None, **extra):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers, self.extra = status, code, detail, headers, extra


class ErrorBody(BaseModel):
    error: str
    detail: str


class PredictResponse(BaseModel):
    model: str
    architecture: str
    checkpoint: str
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


async def _call_model(name: str, response):
    """Await a call to a model deployment; a full queue or no replica becomes a JSON 503."""
    try:
        return await response
    except BackPressureError as e:
        retry = max(1, math.ceil(getattr(e, "retry_after_s", None) or 1))
        raise APIError(503, "overloaded", f"model {name!r} is at capacity; retry later",
                       headers={"Retry-After": str(retry)}) from None
    except DeploymentUnavailableError:
        raise APIError(503, "unavailable", f"model {name!r} has no running replica",
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
    """The HTTP front: checks, reads and decodes; the model deployments compute."""

    def __init__(self, handles: dict[str, DeploymentHandle], max_request_bytes: int, max_files: int, api_key_env: str = API_KEY_ENV,
                 api_key: str | None = None, faces: dict | None = None, limits: "IngressSpec | None" = None):
        self.handles = handles
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
        self._described: dict[str, dict] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # -- checks --------------------------------------------------------------------------------------
    def _visible(self, desc: dict, request: Request) -> dict:
        """A model's description as this caller may see it: where the checkpoint lives and how the replica
        runs (device, threads) only for the operator's admin key (``FACEATTR_ADMIN_KEY``), not for holders
        of the inference key."""
        given = request.headers.get("x-admin-key")
        if self._admin_key is not None and given is not None and hmac.compare_digest(given.encode(), self._admin_key):
            return desc
        out = {k: v for k, v in desc.items() if k not in PRIVATE_FIELDS}
        out["checkpoint"] = {"hash": desc["checkpoint"]["hash"]}
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

    async def _describe(self, name: str, refresh: bool = False) -> dict:
        """The model's description (preprocessing, checkpoint hash), fetched once and shared by the
        requests that arrive meanwhile."""
        handle = self._handle(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if refresh or name not in self._described:
                self._described[name] = await _call_model(name, handle.describe.remote())
        return self._described[name]

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

    async def _model_call(self, name: str, response):
        """A model call bounded by ``request_timeout_s``: 504 beyond it."""
        try:
            return await asyncio.wait_for(_call_model(name, response), timeout=self.limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(504, "timeout", f"model {name!r} did not answer within {self.limits.request_timeout_s:g} s",
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

    async def _consistent(self, name: str, call) -> tuple[dict, Any]:
        """``await call(description)`` against the model's current checkpoint: when a replica holds another
        one (an update under way), the description is read again and the call made once more; a second
        mismatch is a 503, never a 500."""
        for attempt in (0, 1):
            desc = await self._describe(name, refresh=attempt > 0)
            try:
                return desc, await call(desc)
            except CheckpointChanged:
                if attempt:
                    raise _changed(name) from None
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
        batch = await self._decode(decode_photos, [p for p, _ in items], [d for _, d in items],
                                   self.face_options.max_side)
        self._reject_bad_images(batch)
        payload = [{"path": batch["path"][i], "width": int(batch["width"][i]), "height": int(batch["height"][i]),
                    "scale": float(batch["scale"][i]), "image": batch["image"][i]} for i in range(len(items))]
        desc, per_image = await self._consistent(name, lambda desc: self._model_call(
            name, handle.predict_photos.remote(payload, desc["checkpoint"]["hash"])))
        images = [{"path": p["path"], "width": p["width"], "height": p["height"],
                   "faces": [r for r in rows if r["face"] is not None]} for p, rows in zip(payload, per_image)]
        return JSONResponse(_json_safe({
            "model": name, "architecture": desc["architecture"], "checkpoint": desc["checkpoint"]["hash"],
            "detector": (desc.get("faces") or {}).get("detector"), "images": images,
            "predictions": [r for rows in per_image for r in rows]}))

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
    """Serve options of a model deployment from its resolved settings."""
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
    handles = {}
    for name in args.models:
        s = args.model_settings(name)
        if not storage.is_s3(s["checkpoint"]):  # replicas may run in another working directory
            s["checkpoint"] = os.path.abspath(s["checkpoint"].removeprefix("file://"))
        handles[name] = ModelServer.options(name=f"model-{name}", **deployment_options(s)).bind(
            name, s["checkpoint"], s["device"], s["precision"], s["channels_last"], s["threads"], args.faces)
    ing = args.ingress
    ing_opts: dict = {"max_ongoing_requests": ing.max_ongoing_requests, "max_queued_requests": ing.max_queued_requests,
                      "ray_actor_options": {"num_cpus": ing.num_cpus}}
    if ing.autoscaling_config:
        ing_opts["autoscaling_config"] = ing.autoscaling_config
    else:
        ing_opts["num_replicas"] = ing.num_replicas or 1
    return FaceAttrAPI.options(name="FaceAttrAPI", **ing_opts).bind(
        handles, args.max_request_bytes, args.max_files, args.api_key_env,
        os.environ.get(args.api_key_env) or None, args.faces, ing)


__all__ = ["ServeArgs", "DeploymentSpec", "IngressSpec", "ModelServer", "FaceAttrAPI", "app", "build_app"]
