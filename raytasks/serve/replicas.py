"""The model side of the serving application: the Serve deployment that holds checkpoints and computes.

:class:`AnnotatorServer` is one class for both kinds of deployment, as the core has one orchestrator
(``core.annotator.Annotator``) for one model or many:

* "model-<name>" (one deployment per served model): one checkpoint, answers
  ``POST /v1/models/{name}/predict`` with the flat rows of the label job for that checkpoint;
* "modelset" (present when the config has a ``model_set``): every model of the set, and optionally dlib's
  face embedding, in **one process on one device**; answers ``POST /v1/predict``. A photo crosses the
  process boundary once and is searched for faces once; each face is aligned once per distinct face
  template and every model runs on its own crop, so the rows are the label job's rows for the same set.

Each replica batches images across requests with ``@serve.batch`` (one queue per deployment: the two
kinds never share a process) and runs every torch call on one thread (:func:`raytasks.threads.torch_executor`):
each thread that calls torch gets its own OpenMP pool, and with more OpenMP threads than cores libgomp
throttles them. A replica checks that the ingress decoded for the checkpoint (or set identity) it holds and
raises :class:`CheckpointChanged` otherwise; the ingress then re-reads the description and retries once.

What one request may cost the replica (issue #22): the ingress sends its ``limits`` with each request. A
photo request's faces are found first (its own ``@serve.batch`` queue, shared across requests) and counted:
over ``max_faces`` the request is refused (:class:`FaceBudgetExceeded`, 413) before any attribute model runs
on them. Past its deadline (when the ingress answers 504: ``limits["timeout_s"]`` from the request's arrival,
on this host's monotonic clock, so the hosts' wall clocks need not agree) a request's images are left out of
the batches they have not entered, and a batch stops before its next model, or its next chunk of faces, once
every request in it is past its deadline (:class:`DeadlineExceeded`): the replica is free for the next batch.
An image the detector or a model fails on alone gets a ``model_error`` row (core/failures.py), which the
ingress answers 422; the batch's other requests get their rows. A request holding a photo the detector failed
on costs no model work for its other photos.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import numpy as np
from ray import serve

from core.annotator import Annotator
from core.failures import ImageFailed
from core.rows import row_dicts, rows_per_image
from raytasks.threads import torch_executor

PER_IMAGE = ("path", "width", "height")
LISTS = ("image", "scale", "found")  # a photo's picture, scale and faces stay one list entry each; whole inputs stack
DEADLINE = "deadline"  # an item's request's deadline (time.monotonic() here), not part of the decoded batch


class CheckpointChanged(RuntimeError):
    """The ingress decoded for another checkpoint than the replica holds (the deployment was updated)."""


class FaceBudgetExceeded(RuntimeError):
    """A request's photos hold more faces than its budget (``max_faces``): refused before any model runs."""

    def __init__(self, faces: int, limit: int):
        super().__init__(f"the request's images hold {faces} faces, over its budget of {limit}")
        self.faces, self.limit = faces, limit

    def __reduce__(self):
        return (FaceBudgetExceeded, (self.faces, self.limit))


class DeadlineExceeded(TimeoutError):
    """The request is past its deadline (the ingress has answered it 504): no further model runs for it."""


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def deadline_of(limits: dict) -> float | None:
    """The request's deadline on this host's monotonic clock: ``limits["timeout_s"]`` (what the ingress waits
    before it answers 504) from now, when the request reaches the replica. The ingress sends a duration, not a
    time: its host's wall clock may be ahead of or behind this one's, and a deadline in another host's clock would
    cut requests short or let them run on (a request's time in Serve's queue is on the safe side: the replica's
    deadline is that much after the ingress's 504)."""
    timeout = limits.get("timeout_s")
    return None if timeout is None else time.monotonic() + float(timeout)


def _deadline_check(deadlines: list[float | None]):
    """``check`` for ``Annotator.annotate``: raises once every request of the batch is past its deadline."""
    if any(d is None for d in deadlines):
        return None
    latest = max(deadlines)

    def check() -> None:
        now = time.monotonic()
        if now > latest:
            raise DeadlineExceeded(f"every request of this batch is past its deadline ({now - latest:.1f} s ago): "
                                   "stopped")
    return check


def batch_of(items: list[dict]) -> dict:
    """Decoded images of several requests (one dict each, facedata/decode.py's fields) -> one decoded batch."""
    n = len(items)
    batch = {"path": [it["path"] for it in items], "ok": np.ones(n, dtype=bool), "error_kind": [None] * n,
             "error_message": [None] * n, "width": np.array([it["width"] for it in items], dtype=np.int32),
             "height": np.array([it["height"] for it in items], dtype=np.int32)}
    for key in items[0]:
        if key not in PER_IMAGE and key != DEADLINE:
            values = [it[key] for it in items]
            batch[key] = values if key in LISTS else np.stack(values)
    return batch


@serve.deployment
class AnnotatorServer:
    """One checkpoint (``model``: its name in the config) or a set (``model_set``: ``ModelSet.to_dict()``
    with the served models' URIs and pins, ``routes``: column -> the name it is also served under), with
    the detector, loaded once per replica."""

    def __init__(self, name: str, models: str | dict, device: str | None, precision: str, channels_last: bool,
                 threads: int, faces: dict | None = None, routes: dict[str, str] | None = None,
                 review: dict | None = None, gpu_share: float | None = None):
        self.name = name
        self.routes = dict(routes or {})
        # Every torch call of the replica runs on this one thread (see the module docstring).
        self._torch_thread = torch_executor(name)
        self.threads = threads
        self.max_batch_size, self.batch_wait_timeout_s = 16, 0.01  # @serve.batch's; reconfigure sets the config's
        self.batch_sizes: Counter[int] = Counter()
        self.requests = 0
        self.images = 0
        self.faces = 0  # faces (whole images: images) the models ran on
        self.refused = {"faces": 0, "deadline": 0}  # requests refused over their faces budget, or past deadline
        self._lock = threading.Lock()
        # device None: core.runner.resolve_device, which gives a replica the GPU only when Ray assigned it one;
        # gpu_share (the deployment's num_gpus) below 1 bounds its share of that GPU's memory
        self.annotator = self._on_torch_thread(Annotator, models, faces=faces, device=device, precision=precision,
                                               channels_last=channels_last, threads=threads, review=review,
                                               gpu_share=gpu_share)
        # The detector next to the models, loaded now whatever the default mode: a request may ask for either
        # (?faces=), and a photo crosses processes once. Then one forward pass of every network, the detector's
        # too, builds its kernels' plans (oneDNN, cuDNN) before traffic: Serve routes requests to a replica (and
        # its health, which KubeRay's probes read, says ready) only once this constructor has returned.
        self._on_torch_thread(lambda: self.annotator.finder)
        self._on_torch_thread(self.annotator.warm_up)

    def _on_torch_thread(self, fn, *args, **kwargs):
        """Run ``fn`` on the torch thread and wait (the constructor's loading and warm-up)."""
        return self._torch_thread.submit(fn, *args, **kwargs).result()

    def reconfigure(self, user_config: dict) -> None:
        """``user_config`` carries the batching knobs, so changing them in the config does not restart
        replicas (Serve calls this on deploy and on every config update)."""
        self.max_batch_size = int(user_config["max_batch_size"])
        self.batch_wait_timeout_s = float(user_config["batch_wait_timeout_s"])
        for method in (self.infer, self.infer_photo, self.find_photo):
            method.set_max_batch_size(self.max_batch_size)
            method.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    def stats(self) -> dict:
        """Counters of the replica that answers (one of possibly several)."""
        with self._lock:
            sizes = dict(sorted(self.batch_sizes.items()))
            return {"requests": self.requests, "images": self.images, "faces": self.faces,
                    "batches": sum(sizes.values()), "max_batch_size_seen": max(sizes, default=0),
                    "batch_sizes": sizes, "refused": dict(self.refused)}

    # -- what it serves -----------------------------------------------------------------------------------
    def describe(self) -> dict:
        """A model: its architecture, checkpoint (URI and hash), config, outputs, fields, preprocessing and
        metrics. A set: its identity, each member (column name, architecture, checkpoint hash, the route it
        is also served at, its outputs and fields), the rows' fields and the distinct preprocessings (the
        ingress decodes a whole image once per entry, in this order). Both: how the replica runs."""
        a = self.annotator
        fields = [{"name": f.name, "type": str(f.type)} for f in a.schema]
        running = {"device": str(a.device), "precision": a.precision,
                   "batchnorm_folded": {n: r.folded for n, r in a.members.items()} if not a.flat else
                   next(iter(a.members.values())).folded,
                   "threads": self.threads, "faces": {**a.face_options.to_dict(), "detector": a.detector},
                   "review": a.review.to_dict(),
                   "batching": {"max_batch_size": self.max_batch_size,
                                "batch_wait_timeout_s": self.batch_wait_timeout_s},
                   "stats": self.stats()}
        if a.flat:
            (r,) = a.members.values()
            info = r.info
            return {"name": self.name, "architecture": info.model,
                    "checkpoint": {"uri": a.model_set.members[0][1], "hash": info.hash}, "config": info.config,
                    "outputs": info.outputs, "fields": fields, "preprocessing": r.preprocessing.to_dict(),
                    "metrics": info.metrics, **running}
        uris = {n: uri for n, (_, uri) in zip(a.members, a.model_set.members)}
        members = []
        for entry in a.describe():
            r = a.members.get(entry["name"])
            if r is None:  # the embedding
                members.append({**entry, "fields": [f for f in fields if f["name"].startswith("embedding")],
                                "preprocessing": a.embedder.preprocessing.to_dict()})
                continue
            name = entry["name"]
            members.append({**entry, "route": f"/v1/models/{self.routes.get(name, name)}", "uri": uris[name],
                            "config": r.info.config, "outputs": r.info.outputs,
                            "fields": [{"name": f.name, "type": str(f.type)} for f in a.structs[name]],
                            "preprocessing": r.preprocessing.to_dict(), "metrics": r.info.metrics})
        return {"name": a.model_set.name, "version": a.model_set.version, "checkpoint": a.identity,
                "models": members, "embedding": a.embedding_identity, "fields": fields,
                "preprocessings": [p.to_dict() for p in a.preprocessings], **running}

    # -- requests -----------------------------------------------------------------------------------------
    def _request(self, identity: str) -> None:
        """A request decoded for ``identity``: refused when the replica holds another."""
        if identity != self.annotator.identity:
            raise CheckpointChanged(f"decoded for {identity}, replica holds {self.annotator.identity}")
        with self._lock:
            self.requests += 1

    def _refuse(self, why: str, error: Exception) -> None:
        with self._lock:
            self.refused[why] += 1
        raise error

    def _check_faces(self, faces: int, limits: dict) -> None:
        limit = limits.get("max_faces")
        if limit is not None and faces > limit:
            self._refuse("faces", FaceBudgetExceeded(faces, int(limit)))

    def _check_deadline(self, deadline: float | None) -> None:
        if _expired(deadline):
            self._refuse("deadline", DeadlineExceeded("the request is past its deadline"))

    async def predict(self, items: list[dict], identity: str, limits: dict | None = None) -> list[dict]:
        """One HTTP request's whole images (``image_<k>``/``geometry_<k>`` per preprocessing) -> their rows.
        Each image joins the replica's batch queue separately, so images of concurrent requests share
        forward passes. ``limits``: ``max_faces`` (each image is one face) and ``timeout_s`` (module
        docstring)."""
        self._request(identity)
        limits = limits or {}
        deadline = deadline_of(limits)
        self._check_faces(len(items), limits)
        self._check_deadline(deadline)
        return await self._gathered(self.infer({**item, DEADLINE: deadline}) for item in items)

    async def predict_photos(self, items: list[dict], identity: str, limits: dict | None = None) -> list[list[dict]]:
        """One HTTP request's decoded photos -> per photo its rows (one per face, or one saying no face).
        Faces are found first for the whole request and counted against ``limits["max_faces"]``; then the
        models run, unless the request is past its deadline (``limits["timeout_s"]``, module docstring). A
        photo the detector failed on alone gets its ``model_error`` row and its request nothing more: the
        ingress refuses the request whole, so its other photos get no rows (``[]``) and cost no model work."""
        self._request(identity)
        limits = limits or {}
        deadline = deadline_of(limits)
        self._check_deadline(deadline)
        items = [{**item, DEADLINE: deadline} for item in items]
        found = await self._gathered(self.find_photo(item) for item in items)
        failed = [i for i, f in enumerate(found) if isinstance(f, ImageFailed)]
        if failed:  # the ingress refuses the request whole (422): no model runs for its other photos
            rows = await self._gathered(self.infer_photo({**items[i], "found": found[i]}) for i in failed)
            out: list[list[dict]] = [[] for _ in items]
            for i, r in zip(failed, rows):
                out[i] = r
            return out
        self._check_faces(sum(len(f) for f in found if f is not None), limits)
        self._check_deadline(deadline)
        return await self._gathered(self.infer_photo({**item, "found": f}) for item, f in zip(items, found))

    async def _gathered(self, calls) -> list:
        """The results of a request's items, each from its batch; one past its deadline (left out of its
        batch, or its batch stopped) raises DeadlineExceeded for the whole request."""
        try:
            results = await asyncio.gather(*calls)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        except DeadlineExceeded as e:
            self._refuse("deadline", e)
        return list(results)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def find_photo(self, items: list[dict]) -> list:
        return await self._on_torch(lambda: self._live(items, lambda live: self.annotator.find(batch_of(live))))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer_photo(self, items: list[dict]) -> list[list[dict]]:
        return await self._on_torch(lambda: self._live(items, lambda live: rows_per_image(self._annotate(live),
                                                                                          len(live))))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer(self, items: list[dict]) -> list[dict]:
        return await self._on_torch(lambda: self._live(items, lambda live: row_dicts(self._annotate(live))))

    @staticmethod
    def _live(items: list[dict], fn) -> list:
        """``fn`` on the items whose request is not past its deadline; the others answer DeadlineExceeded
        (an exception as the item's result: the caller raises it, the batch's other requests go on)."""
        alive = [not _expired(it.get(DEADLINE)) for it in items]
        live = [it for it, a in zip(items, alive) if a]
        results = iter(fn(live) if live else [])
        return [next(results) if a else DeadlineExceeded("the request is past its deadline") for a in alive]

    def _annotate(self, items: list[dict]) -> dict[str, list]:
        with self._lock:
            self.batch_sizes[len(items)] += 1
            self.images += len(items)
        cols = self.annotator.annotate(batch_of(items), check=_deadline_check([it.get(DEADLINE) for it in items]))
        with self._lock:
            self.faces += sum(1 for f in cols["face"] if f is not None) if "scale" in items[0] else len(items)
        return cols

    async def _on_torch(self, fn):
        # Off the event loop: new requests keep joining the next batch while this one runs.
        return await asyncio.get_running_loop().run_in_executor(self._torch_thread, fn)


__all__ = ["AnnotatorServer", "CheckpointChanged", "DeadlineExceeded", "FaceBudgetExceeded", "batch_of", "deadline_of"]
