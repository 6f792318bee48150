"""The HTTP front of the serving application (``FaceAttrAPI``): checks, reads and decodes; the replicas compute.

Each route names a *target*: a served model (``/v1/models/{name}/...``, key ``name``) or the model set
(``/v1/predict``, ``/v1/set``, key None). A target's description comes from its deployment (``describe``)
and is cached; the ingress decodes for it (photos once, or whole images once per distinct preprocessing,
facedata/decode.py) and sends the identity it decoded for (the checkpoint hash, or the set's identity).
Errors: raytasks/serve/http.py; reading the body: raytasks/serve/bodies.py. Why it is built this way:
raytasks/serve/app.py.
"""

# No ``from __future__ import annotations`` here: FastAPI resolves the route methods' annotations at runtime
# after @serve.ingress has moved them off the class, and string annotations would not resolve.
import asyncio
import hmac
import os
from typing import Any

from fastapi import Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from facedata.decode import Photos, Whole, cost, decode_batch
from faces.finder import FACE_MODES, FaceOptions
from models.imagebytes import ImageDecodeError, Prechecked
from models.preprocess import Preprocessing
from raytasks.serve.bodies import BodyReader
from raytasks.serve.config import API_KEY_ENV, IngressSpec, check_key
from raytasks.serve.http import (
    _ERRORS,
    _SET_ERRORS,
    PREDICT_OPENAPI,
    APIError,
    Budget,
    PredictResponse,
    SetPredictResponse,
    _call_model,
    _changed,
    _json_safe,
    _no_model_set,
    _refuse_model_errors,
    _refused,
    app,
)
from raytasks.serve.replicas import CheckpointChanged, DeadlineExceeded, FaceBudgetExceeded

ADMIN_KEY_ENV = "FACEATTR_ADMIN_KEY"  # who may see checkpoint URIs, devices and threads (GET /v1/models)
# besides checkpoint URIs: operators only. ``config`` may hold private URIs (--model-arg backbone_weights=s3://...)
PRIVATE_FIELDS = ("device", "threads", "batchnorm_folded", "config")
SET = None  # the target key of the model set (models are keyed by their name)
# ?faces=: a plain string, checked after the API key (a Literal would be refused 422 before it); its values in the
# OpenAPI description all the same
FACES_QUERY = Query(None, json_schema_extra={"enum": list(FACE_MODES)})


def _identity(key: str | None, desc: dict) -> str:
    """What the rows' ``checkpoint`` holds: a model's checkpoint hash, or the set's identity."""
    return desc["checkpoint"] if key is SET else desc["checkpoint"]["hash"]


def _preprocessings(key: str | None, desc: dict) -> list[Preprocessing]:
    """What a whole image is decoded to: the model's input, or each distinct one of the set's members."""
    return [Preprocessing.from_dict(d) for d in (desc["preprocessings"] if key is SET else [desc["preprocessing"]])]


def _head(key: str | None, desc: dict) -> dict:
    """The answer's fields before its rows: the model (name, architecture, checkpoint) or the set."""
    if key is SET:
        return {"set": desc["name"], "checkpoint": desc["checkpoint"],
                "models": [{k: m[k] for k in ("name", "model", "checkpoint")} for m in desc["models"]]}
    return {"model": key, "architecture": desc["architecture"], "checkpoint": desc["checkpoint"]["hash"]}


@serve.deployment
@serve.ingress(app)
class FaceAttrAPI(BodyReader):
    """The HTTP front: checks, reads and decodes; the model deployments compute. ``model_set``: the set's
    deployment, or None when the config has no ``model_set``."""

    def __init__(self, handles: dict[str, DeploymentHandle], max_request_bytes: int, max_files: int, api_key_env: str = API_KEY_ENV,
                 api_key: str | None = None, faces: dict | None = None, limits: "IngressSpec | None" = None,
                 model_set: DeploymentHandle | None = None, set_name: str = "set", allow_no_auth: bool = False):
        self.handles = handles
        self.set_handle, self.set_name = model_set, set_name
        self.face_options = FaceOptions.from_dict(faces)
        self.max_request_bytes = max_request_bytes
        self.max_files = max_files
        key = check_key(api_key or os.environ.get(api_key_env) or None, f"${api_key_env}")
        self._api_key = key.encode() if key else None
        self._open = allow_no_auth  # without a key: answer anyone (explicit), or no one (the default)
        admin = check_key(os.environ.get(ADMIN_KEY_ENV) or None, f"${ADMIN_KEY_ENV}")
        self._admin_key = admin.encode() if admin else None
        # Back-pressure before decoding: at most max_decodes images are decoded at once, on threads of their
        # own; a request that cannot get a slot within decode_wait_s is answered 503 before any work.
        from concurrent.futures import ThreadPoolExecutor

        self.limits = limits or IngressSpec()
        self._decoders = ThreadPoolExecutor(self.limits.max_decodes, thread_name_prefix="decode")
        self._decode_slots = asyncio.Semaphore(self.limits.max_decodes)
        self._decoded_budget = Budget(self.limits.max_decoded_bytes, "decoded images in flight")
        self._body_budget = Budget(self.limits.max_body_bytes, "request bodies in flight")
        self._described: dict[str | None, dict] = {}  # target key -> its description
        self._locks: dict[str | None, asyncio.Lock] = {}

    # -- checks --------------------------------------------------------------------------------------
    def _is_admin(self, request: Request) -> bool:
        given = request.headers.get("x-admin-key")
        return self._admin_key is not None and given is not None and hmac.compare_digest(given.encode(), self._admin_key)

    def _visible(self, key: str | None, desc: dict, request: Request) -> dict:
        """A description as this caller may see it: where checkpoints live and how the replica runs (device,
        threads, folded layers) only for the operator's admin key (``FACEATTR_ADMIN_KEY``), not for holders
        of the inference key."""
        if self._is_admin(request):
            return desc
        out = {k: v for k, v in desc.items() if k not in PRIVATE_FIELDS}
        if key is SET:
            out["models"] = [{k: v for k, v in m.items() if k not in ("uri", "config")} for m in desc["models"]]
        else:
            out["checkpoint"] = {"hash": desc["checkpoint"]["hash"]}
        return out

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            if self._open:
                return
            raise APIError(401, "no_api_key", "this server has no API key configured and refuses every request: set "
                           "FACEATTR_API_KEY (or the variable its api_key_env names) where it runs, or deploy it "
                           "with allow_no_auth: true to serve openly", headers={"WWW-Authenticate": "Bearer"})
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), self._api_key):
            raise APIError(401, "unauthorized",
                           "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                           headers={"WWW-Authenticate": "Bearer"})

    # -- targets -------------------------------------------------------------------------------------
    def _handle(self, key: str | None) -> DeploymentHandle:
        if key is SET:
            if self.set_handle is None:
                raise _no_model_set()
            return self.set_handle
        if key not in self.handles:
            raise APIError(404, "unknown_model", f"no model named {key!r}", models=sorted(self.handles))
        return self.handles[key]

    @staticmethod
    def _what(key: str | None) -> str:
        return "model set" if key is SET else "model"

    def _target_name(self, key: str | None) -> str:
        return self.set_name if key is SET else key

    async def _describe(self, key: str | None, refresh: bool = False) -> dict:
        """The target's description (preprocessing, checkpoint hash or set identity). A cached one is returned
        at once: no request waits for another's read. The first read is shared by the requests that arrive
        meanwhile; ``refresh`` (GET of a description, a checkpoint that changed) reads it again on its own.
        Every read, the wait for a shared one included, is bounded by ``request_timeout_s`` (504), and a full
        or missing deployment is a 503, as for a model call."""
        self._handle(key)  # 404 before anything
        if not refresh and key in self._described:
            return self._described[key]
        name, what, timeout = self._target_name(key), self._what(key), self.limits.request_timeout_s
        try:
            return await asyncio.wait_for(self._fetch(key) if refresh else self._first_fetch(key), timeout)
        except asyncio.TimeoutError:
            raise APIError(504, "timeout", f"{what} {name!r} did not describe itself within {timeout:g} s",
                           headers={"Retry-After": "5"}) from None

    async def _first_fetch(self, key: str | None) -> dict:
        async with self._locks.setdefault(key, asyncio.Lock()):  # one read at a time while none is cached
            return self._described[key] if key in self._described else await self._fetch(key)

    async def _fetch(self, key: str | None) -> dict:
        desc = await _call_model(self._target_name(key), self._handle(key).describe.remote(), self._what(key))
        self._described[key] = desc
        return desc

    async def _decode(self, fn, *args):
        """Run a decode on the ingress's decode threads, at most ``max_decodes`` requests at a time; 503 with
        ``Retry-After`` when no slot frees within ``decode_wait_s`` (0: when none is free; the request has cost
        nothing yet)."""
        slots, wait = self._decode_slots, self.limits.decode_wait_s
        try:
            if wait > 0:
                await asyncio.wait_for(slots.acquire(), timeout=wait)
            elif slots.locked():  # decode_wait_s 0: refuse only when busy (asyncio.wait_for(..., 0) refuses
                raise asyncio.TimeoutError  # even a free slot on Python 3.10 and 3.11)
            else:
                await slots.acquire()  # free: taken at once
        except asyncio.TimeoutError:
            raise APIError(503, "overloaded", "image decoding is saturated; retry later",
                           headers={"Retry-After": "1"}) from None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._decoders, fn, *args)
        finally:
            self._decode_slots.release()

    def _request_limits(self) -> dict:
        """What the replica enforces for one request: its budget of faces, and how long this ingress waits before
        its 504, after which the replica runs no further model for it (on its own clock: ``replicas.deadline_of``)."""
        return {"max_faces": self.limits.max_request_faces, "timeout_s": self.limits.request_timeout_s}

    async def _model_call(self, key: str | None, response):
        """A call to the target's deployment bounded by ``request_timeout_s`` (504), 503 when it is full,
        413 when the replica found more faces than ``max_request_faces``."""
        name, what = self._target_name(key), self._what(key)
        timeout = self.limits.request_timeout_s
        try:
            return await asyncio.wait_for(_call_model(name, response, what), timeout=timeout)
        except (asyncio.TimeoutError, DeadlineExceeded):
            raise APIError(504, "timeout", f"{what} {name!r} did not answer within {timeout:g} s",
                           headers={"Retry-After": "5"}) from None
        except FaceBudgetExceeded as e:
            raise APIError(413, "too_many_faces", f"the request's images hold {e.faces} faces; one request may hold "
                           f"at most {e.limit} (ingress.max_request_faces): send fewer photos per request",
                           faces=e.faces, limit_faces=e.limit) from None

    async def _consistent(self, key: str | None, call) -> tuple[dict, Any]:
        """``await call(description)`` against the target's current checkpoint: when a replica holds another
        one (an update under way), the description is read again and the call made once more; a second
        mismatch is a 503, never a 500."""
        for attempt in (0, 1):
            desc = await self._describe(key, refresh=attempt > 0)
            try:
                return desc, await call(desc)
            except CheckpointChanged:
                if attempt:
                    raise _changed(self._target_name(key), self._what(key)) from None
        raise AssertionError("unreachable")

    # -- decoding (reading the body: raytasks/serve/bodies.py) ------------------------------------------
    async def _decoded(self, items: list[tuple[str, bytes]], target) -> tuple[list[dict], int]:
        """The request's images decoded (facedata/decode.py), one dict each for the replica, and the bytes
        they hold (taken from the decoded-images budget: give them back with ``self._decoded_budget.release``).
        What decoding would cost is read from the headers first, by the checks the decoder makes before
        decoding: a file they refuse is answered 413/422 then, and a request over ``max_request_pixels`` or
        ``max_request_decoded_bytes`` 413, before any pixel is decoded; one that finds the replica's budget
        full waits ``decode_wait_s``, then 503. The files are then decoded without those checks run again
        (``Prechecked``: what they found, kept from the pricing). A file that is not an image answers the
        whole request 413/422 before any model work."""
        checked = [Prechecked(d) for _, d in items]

        def header_costs():
            costs, bad = [], []
            for (p, _), d in zip(items, checked):
                try:
                    costs.append(cost(d, target))
                except ImageDecodeError as e:
                    bad.append({"file": str(p), "error": e.kind, "detail": e.message})
            return costs, bad

        costs, bad = await self._decode(header_costs)
        if bad:
            raise _refused(bad)
        pixels, nbytes = sum(c[0] for c in costs), sum(c[1] for c in costs)
        lim = self.limits
        if pixels > lim.max_request_pixels or nbytes > lim.max_request_decoded_bytes:
            raise APIError(413, "too_large", f"the request's images hold {pixels} pixels ({nbytes >> 20} MiB decoded); "
                           f"one request may hold at most {lim.max_request_pixels} pixels and "
                           f"{lim.max_request_decoded_bytes >> 20} MiB decoded: send fewer or smaller images per "
                           "request", limit_pixels=lim.max_request_pixels, limit_bytes=lim.max_request_decoded_bytes)
        held = await self._decoded_budget.acquire(nbytes, lim.decode_wait_s)
        try:
            batch = await self._decode(decode_batch, [p for p, _ in items], checked, target)
            bad = [{"file": str(p), "error": k, "detail": m}
                   for p, ok, k, m in zip(batch["path"], batch["ok"], batch["error_kind"], batch["error_message"]) if not ok]
            if bad:
                raise _refused(bad)
        except BaseException:
            await self._decoded_budget.release(held)
            raise
        keys = [k for k in batch if k not in ("ok", "error_kind", "error_message")]
        return [{k: (int(batch[k][i]) if k in ("width", "height") else batch[k][i]) for k in keys}
                for i in range(len(items))], held

    # -- predictions -----------------------------------------------------------------------------------
    async def _predict(self, key: str | None, request: Request, filename: str, faces: str | None) -> JSONResponse:
        """The request's images through the target: photos (faces found, one row per face, grouped per
        image in ``images``) or whole images (one row each). The body's and the decoded pictures' bytes are
        held against the replica's budgets until the answer is built. The API key is checked first: a caller
        without it learns nothing, not even which query values are valid."""
        self._authorize(request)
        handle = self._handle(key)
        if faces not in (None, *FACE_MODES):
            raise APIError(422, "invalid_request", f"faces must be one of {', '.join(FACE_MODES)}, got {faces!r}",
                           errors=[{"type": "literal_error", "loc": ["query", "faces"],
                                    "msg": f"Input should be {' or '.join(map(repr, FACE_MODES))}"}])
        items, body = await self._read_items(request, filename)
        try:
            return await self._answer(key, handle, items, faces)
        finally:
            await self._body_budget.release(body)

    async def _answer(self, key: str | None, handle: DeploymentHandle, items: list[tuple[str, bytes]],
                      faces: str | None) -> JSONResponse:
        if (faces or self.face_options.mode) == "detect":
            payload, held = await self._decoded(items, Photos(self.face_options.max_side))
            try:
                desc, per_image = await self._consistent(key, lambda desc: self._model_call(
                    key, handle.predict_photos.remote(payload, _identity(key, desc), self._request_limits())))
            finally:
                await self._decoded_budget.release(held)
            _refuse_model_errors([r for rows in per_image for r in rows])
            images = [{"path": p["path"], "width": p["width"], "height": p["height"],
                       "faces": [r for r in rows if r["face"] is not None]} for p, rows in zip(payload, per_image)]
            return JSONResponse(_json_safe({**_head(key, desc), "detector": desc["faces"]["detector"],
                                            "images": images, "predictions": [r for rows in per_image for r in rows]}))

        async def whole(desc: dict):  # decoded for the target's own preprocessing(s)
            payload, held = await self._decoded(items, Whole(tuple(_preprocessings(key, desc))))
            try:
                return await self._model_call(key, handle.predict.remote(payload, _identity(key, desc),
                                                                         self._request_limits()))
            finally:
                await self._decoded_budget.release(held)

        desc, rows = await self._consistent(key, whole)
        _refuse_model_errors(rows)
        return JSONResponse(_json_safe({**_head(key, desc), "predictions": rows}))

    # -- routes --------------------------------------------------------------------------------------
    @app.get("/healthz", summary="Liveness of the HTTP front")
    async def healthz(self) -> dict:
        return {"status": "ok"}  # open to anyone: says nothing about the models

    @app.get("/v1/models", summary="The served models: outputs, preprocessing, metrics, checkpoint hash",
             responses={k: _ERRORS[k] for k in (401, 503, 504)})
    async def list_models(self, request: Request) -> dict:
        self._authorize(request)
        names = sorted(self.handles)
        described = await asyncio.gather(*(self._describe(n, refresh=True) for n in names))
        return _json_safe({"models": [self._visible(n, d, request) for n, d in zip(names, described)]})

    @app.get("/v1/models/{name}", summary="One served model",
             responses={k: _ERRORS[k] for k in (401, 404, 503, 504)})
    async def get_model(self, name: str, request: Request) -> dict:
        self._authorize(request)
        return _json_safe(self._visible(name, await self._describe(name, refresh=True), request))

    @app.post("/v1/models/{name}/predict", summary="Predict the attributes of one or more face images",
              response_model=PredictResponse, openapi_extra=PREDICT_OPENAPI,
              responses={k: _ERRORS[k] for k in (401, 404, 408, 413, 415, 422, 503, 504)})
    async def predict(self, name: str, request: Request, filename: str = "image",
                      faces: str | None = FACES_QUERY) -> JSONResponse:
        """The image as the body, or several as multipart files; ``filename`` names a raw body's image in
        the answer's ``path`` field (multipart files keep their own names). ``faces``: ``detect`` (the
        default unless the server runs with ``faces: whole``) finds every face and answers, per image, one
        row per face (``images[i].faces``; ``predictions`` lists the same rows as the label job's Parquet);
        ``whole`` treats each image as one aligned face crop (one row per image). The server's ``faces.mode``
        is the default."""
        return await self._predict(name, request, filename, faces)

    @app.post("/v1/predict", summary="Every model of the set on every face of one or more images",
              response_model=SetPredictResponse, openapi_extra=PREDICT_OPENAPI,
              responses={k: _SET_ERRORS[k] for k in (401, 404, 408, 413, 415, 422, 503, 504)})
    async def predict_set(self, request: Request, filename: str = "image",
                          faces: str | None = FACES_QUERY) -> JSONResponse:
        """Every model of the server's model set (and the face embedding when the set has it) on every face,
        in one request: each image is read and decoded once and searched for faces once, and each face
        gets one row holding one object per model (``{"model", "checkpoint", ...its outputs}``), the same
        row as the label job's Parquet for the same set. The body and ``filename`` as for
        ``/v1/models/{name}/predict``; ``faces=whole``: one row per image. 404 ``no_model_set`` when the
        server runs without a set."""
        return await self._predict(SET, request, filename, faces)

    @app.get("/v1/set", summary="The model set answered at POST /v1/predict: identity, members, fields",
             responses={k: _SET_ERRORS[k] for k in (401, 404, 503, 504)})
    async def get_set(self, request: Request) -> dict:
        self._authorize(request)
        return _json_safe(self._visible(SET, await self._describe(SET, refresh=True), request))
