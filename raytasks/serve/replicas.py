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
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import numpy as np
from ray import serve

from core.annotator import Annotator
from core.rows import row_dicts, rows_per_image
from raytasks.threads import torch_executor

PER_IMAGE = ("path", "width", "height")
LISTS = ("image", "scale")  # a photo's picture and scale stay one list entry each; whole inputs stack


class CheckpointChanged(RuntimeError):
    """The ingress decoded for another checkpoint than the replica holds (the deployment was updated)."""


def batch_of(items: list[dict]) -> dict:
    """Decoded images of several requests (one dict each, facedata/decode.py's fields) -> one decoded batch."""
    n = len(items)
    batch = {"path": [it["path"] for it in items], "ok": np.ones(n, dtype=bool), "error_kind": [None] * n,
             "error_message": [None] * n, "width": np.array([it["width"] for it in items], dtype=np.int32),
             "height": np.array([it["height"] for it in items], dtype=np.int32)}
    for key in items[0]:
        if key not in PER_IMAGE:
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
                 review: dict | None = None):
        self.name = name
        self.routes = dict(routes or {})
        # Every torch call of the replica runs on this one thread (see the module docstring).
        self._torch_thread = torch_executor(name)
        self.threads = threads
        self.max_batch_size, self.batch_wait_timeout_s = 16, 0.01  # @serve.batch's; reconfigure sets the config's
        self.batch_sizes: Counter[int] = Counter()
        self.requests = 0
        self.images = 0
        self._lock = threading.Lock()
        self.annotator = self._on_torch_thread(Annotator, models, faces=faces, device=device, precision=precision,
                                               channels_last=channels_last, threads=threads, review=review)
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
        for method in (self.infer, self.infer_photo):
            method.set_max_batch_size(self.max_batch_size)
            method.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    def stats(self) -> dict:
        """Counters of the replica that answers (one of possibly several)."""
        with self._lock:
            sizes = dict(sorted(self.batch_sizes.items()))
            return {"requests": self.requests, "images": self.images, "batches": sum(sizes.values()),
                    "max_batch_size_seen": max(sizes, default=0), "batch_sizes": sizes}

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

    async def predict(self, items: list[dict], identity: str) -> list[dict]:
        """One HTTP request's whole images (``image_<k>``/``geometry_<k>`` per preprocessing) -> their rows.
        Each image joins the replica's batch queue separately, so images of concurrent requests share
        forward passes."""
        self._request(identity)
        return list(await asyncio.gather(*(self.infer(item) for item in items)))

    async def predict_photos(self, items: list[dict], identity: str) -> list[list[dict]]:
        """One HTTP request's decoded photos -> per photo its rows (one per face, or one saying no face)."""
        self._request(identity)
        return list(await asyncio.gather(*(self.infer_photo(item) for item in items)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer_photo(self, items: list[dict]) -> list[list[dict]]:
        return await self._on_torch(lambda: rows_per_image(self._annotate(items), len(items)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer(self, items: list[dict]) -> list[dict]:
        return await self._on_torch(lambda: row_dicts(self._annotate(items)))

    def _annotate(self, items: list[dict]) -> dict[str, list]:
        with self._lock:
            self.batch_sizes[len(items)] += 1
            self.images += len(items)
        return self.annotator.annotate(batch_of(items))

    async def _on_torch(self, fn):
        # Off the event loop: new requests keep joining the next batch while this one runs.
        return await asyncio.get_running_loop().run_in_executor(self._torch_thread, fn)


__all__ = ["AnnotatorServer", "CheckpointChanged", "batch_of"]
