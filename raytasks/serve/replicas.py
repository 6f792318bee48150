"""The model side of the serving application: the Serve deployments that hold checkpoints and compute.

Split from raytasks/serve/ingress.py, which keeps the HTTP ingress (``FaceAttrAPI``: checks, reading, decoding) and
the application builder (``build_app``); the ingress reaches these deployments through handles only.

* :class:`ModelServer` ("model-<name>", one deployment per served model): the checkpoint loaded once per
  replica (:class:`core.predictor.Predictor`), answers ``POST /v1/models/{name}/predict``.
* :class:`SetServer` ("modelset", present when the config has a ``model_set``): every model of the set,
  and optionally dlib's face embedding, loaded once per replica in **one process on one device**
  (:class:`core.modelset.SetPredictor`); answers ``POST /v1/predict``. A photo crosses the process
  boundary once and is searched for faces once; each face is aligned once per distinct face template and
  every model runs on its own crop, so the rows are the label job's rows for the same set.

Both batch images across requests with ``@serve.batch`` and run every torch call of the replica on one
thread (:func:`raytasks.threads.torch_executor`): each thread that calls torch gets its own OpenMP pool, and
with more OpenMP threads than cores libgomp throttles them. Each replica checks that the ingress decoded
for the checkpoint (or set identity) it holds and raises :class:`CheckpointChanged` otherwise; the ingress
then re-reads the description and retries once.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import numpy as np
import torch
from ray import serve

from core.modelset import SetPredictor
from core.predictor import Predictor, rows_per_image
from faces.pipeline import FaceFinder, FaceOptions
from raytasks.threads import torch_executor


class CheckpointChanged(RuntimeError):
    """The ingress decoded for another checkpoint than the replica holds (the deployment was updated)."""


def _photo_batch(items: list[dict]) -> dict:
    """Decoded photos of several requests (``faces.pipeline.decode_photos``'s fields, one dict each) -> one
    batch for ``predict_photos``."""
    n = len(items)
    return {"path": [it["path"] for it in items], "ok": np.ones(n, dtype=bool), "error_kind": [None] * n,
            "error_message": [None] * n, "width": [it["width"] for it in items],
            "height": [it["height"] for it in items], "scale": [it["scale"] for it in items],
            "image": [it["image"] for it in items]}


def _whole_batch(items: list[dict], arrays: list[str]) -> dict:
    """Whole images of several requests -> one batch for ``predict_decoded``; ``arrays``: the keys stacked
    (``image``/``geometry``, or ``image_<k>``/``geometry_<k>`` per preprocessing of a set)."""
    n = len(items)
    batch = {
        "path": np.array([it["path"] for it in items], dtype=object),
        "ok": np.ones(n, dtype=bool),
        "error_kind": np.array([None] * n, dtype=object),
        "error_message": np.array([None] * n, dtype=object),
        "width": np.array([it["width"] for it in items], dtype=np.int32),
        "height": np.array([it["height"] for it in items], dtype=np.int32),
    }
    for key in arrays:
        batch[key] = np.stack([it[key] for it in items])
    return batch


def _rows(cols: dict[str, list], n: int) -> list[dict]:
    return [{k: cols[k][i] for k in cols} for i in range(n)]


class _Replica:
    """What a model replica and a set replica share: the torch thread, the batching knobs, the counters
    and the identity check. Subclasses define ``infer`` and ``infer_photo`` (their own ``@serve.batch``
    queues), ``predictor``, ``finder`` and ``identity``."""

    predictor: Predictor | SetPredictor
    finder: FaceFinder

    def _start(self, name: str, threads: int) -> None:
        # Every torch call of the replica runs on this one thread (see the module docstring).
        self._torch_thread = torch_executor(name)
        self.threads = threads
        self.max_batch_size, self.batch_wait_timeout_s = 16, 0.01  # @serve.batch's; reconfigure sets the config's
        self.batch_sizes: Counter[int] = Counter()
        self.requests = 0
        self.images = 0
        self._lock = threading.Lock()

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

    def _batching(self) -> dict:
        return {"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s}

    def _faces(self) -> dict:
        return {**self.face_options.to_dict(), "detector": self.finder.identity}

    def _request(self, checkpoint_hash: str) -> None:
        """A request decoded for ``checkpoint_hash``: refused when the replica holds another."""
        if checkpoint_hash != self.predictor.checkpoint_hash:
            raise CheckpointChanged(f"decoded for {checkpoint_hash}, replica holds {self.predictor.checkpoint_hash}")
        with self._lock:
            self.requests += 1

    def _batch(self, n: int) -> None:
        with self._lock:
            self.batch_sizes[n] += 1
            self.images += n

    async def _on_torch(self, fn, items: list[dict]):
        # Off the event loop: new requests keep joining the next batch while this one runs.
        return await asyncio.get_running_loop().run_in_executor(self._torch_thread, fn, items)

    def _run_photos(self, items: list[dict]) -> list[list[dict]]:
        return rows_per_image(self.predictor.predict_photos(_photo_batch(items), self.finder), len(items))


@serve.deployment
class ModelServer(_Replica):
    """One model: its checkpoint loaded once per replica, images batched across requests."""

    def __init__(self, name: str, checkpoint: str, device: str | None, precision: str,
                 channels_last: bool, threads: int, faces: dict | None = None):
        self.name = name
        self._start(f"model-{name}", threads)
        self.predictor = self._on_torch_thread(Predictor, checkpoint, device=device, precision=precision,
                                               channels_last=channels_last, threads=threads)
        self.face_options = FaceOptions.from_dict(faces)
        # The detector next to the model, loaded once per replica (0.4 M parameters), whatever the default mode:
        # a request may ask for either (?faces=), and a photo crosses processes once.
        self.finder = self._on_torch_thread(FaceFinder, self.face_options, self.predictor.device)
        self.checkpoint_uri = checkpoint
        pre = self.predictor.preprocessing
        # The first forward pass builds the kernels' plans (oneDNN, cuDNN); pay for it before traffic.
        self._on_torch_thread(self.predictor.forward_uint8, torch.zeros((1, pre.channels, *pre.size), dtype=torch.uint8))

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
            "faces": self._faces(),
            "batching": self._batching(),
            "stats": self.stats(),
        }

    async def predict(self, items: list[dict], checkpoint_hash: str) -> list[dict]:
        """One HTTP request's decoded images -> their rows. Each image joins the replica's batch queue
        separately, so images of concurrent requests share forward passes."""
        self._request(checkpoint_hash)
        return list(await asyncio.gather(*(self.infer(item) for item in items)))

    async def predict_photos(self, items: list[dict], checkpoint_hash: str) -> list[list[dict]]:
        """One HTTP request's decoded photos -> per photo its rows (one per face, or one saying no face)."""
        self._request(checkpoint_hash)
        return list(await asyncio.gather(*(self.infer_photo(item) for item in items)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer_photo(self, items: list[dict]) -> list[list[dict]]:
        self._batch(len(items))
        return await self._on_torch(self._run_photos, items)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer(self, items: list[dict]) -> list[dict]:
        self._batch(len(items))
        return await self._on_torch(self._run, items)

    def _run(self, items: list[dict]) -> list[dict]:
        return _rows(self.predictor.predict_decoded(_whole_batch(items, ["image", "geometry"])), len(items))


@serve.deployment
class SetServer(_Replica):
    """A model set: every member's checkpoint (and the embedding network) loaded once per replica, in one
    process on one device; every model on every face of a photo in one pass.

    ``model_set``: :meth:`core.modelset.ModelSet.to_dict` (members named by their column, with the
    served models' checkpoint URIs and pins); ``routes``: column -> the name the model is also served under
    at ``/v1/models/{name}``."""

    def __init__(self, model_set: dict, routes: dict[str, str], device: str | None, precision: str,
                 threads: int, faces: dict | None = None):
        self._start(f"set-{model_set.get('name', 'set')}", threads)
        self.predictor = self._on_torch_thread(SetPredictor, model_set, device=device, precision=precision,
                                               threads=threads)
        self.uris = {name: uri for name, (_, uri) in zip(self.predictor.members, self.predictor.model_set.members)}
        self.routes = dict(routes)
        self.face_options = FaceOptions.from_dict(faces)
        self.finder = self._on_torch_thread(FaceFinder, self.face_options, self.predictor.device)
        self._on_torch_thread(self._warm_up)

    def _warm_up(self) -> None:
        """The first forward pass of each network builds its kernels' plans: paid before traffic."""
        for p in self.predictor.members.values():
            pre = p.preprocessing
            p.forward_uint8(torch.zeros((1, pre.channels, *pre.size), dtype=torch.uint8))
        if self.predictor.embedder is not None:
            pre = self.predictor.embedder.preprocessing
            self.predictor.embedder.embed(torch.zeros((1, pre.channels, *pre.size), dtype=torch.uint8))

    def describe(self) -> dict:
        """The set: its identity, each member (column name, architecture, checkpoint hash, the route it is
        also served at, its outputs and fields), the rows' fields, the distinct preprocessings (the
        ingress decodes a whole image once per entry, in this order) and how the replica runs."""
        sp = self.predictor
        members = []
        for entry in sp.describe():
            name = entry["name"]
            p = sp.members.get(name)
            if p is None:  # the embedding
                members.append({**entry, "fields": [{"name": f.name, "type": str(f.type)}
                                                    for f in sp.schema if f.name.startswith("embedding")],
                                "preprocessing": sp.embedder.preprocessing.to_dict()})
                continue
            members.append({**entry, "route": f"/v1/models/{self.routes.get(name, name)}",
                            "uri": self.uris[name], "config": p.info.config, "outputs": p.info.outputs,
                            "fields": [{"name": f.name, "type": str(f.type)} for f in sp.structs[name]],
                            "preprocessing": p.preprocessing.to_dict(), "metrics": p.info.metrics})
        return {
            "name": sp.model_set.name,
            "version": sp.model_set.version,
            "checkpoint": sp.checkpoint_hash,
            "models": members,
            "embedding": sp.embedding_identity,
            "fields": [{"name": f.name, "type": str(f.type)} for f in sp.schema],
            "preprocessings": [p.to_dict() for p in sp.preprocessings()],
            "device": str(sp.device),
            "precision": sp.precision,
            "batchnorm_folded": sp.folded,
            "threads": self.threads,
            "faces": self._faces(),
            "batching": self._batching(),
            "stats": self.stats(),
        }

    async def predict(self, items: list[dict], identity: str) -> list[dict]:
        """One HTTP request's images, decoded once per distinct preprocessing of the set
        (``image_<k>``/``geometry_<k>``) -> one row per image with every model's struct."""
        self._request(identity)
        return list(await asyncio.gather(*(self.infer(item) for item in items)))

    async def predict_photos(self, items: list[dict], identity: str) -> list[list[dict]]:
        """One HTTP request's decoded photos -> per photo its rows, one per face with every model's struct
        (one row saying no face when there is none)."""
        self._request(identity)
        return list(await asyncio.gather(*(self.infer_photo(item) for item in items)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer_photo(self, items: list[dict]) -> list[list[dict]]:
        self._batch(len(items))
        return await self._on_torch(self._run_photos, items)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer(self, items: list[dict]) -> list[dict]:
        self._batch(len(items))
        return await self._on_torch(self._run, items)

    def _run(self, items: list[dict]) -> list[dict]:
        keys = [f"{kind}_{k}" for k in range(len(self.predictor.preprocessings())) for kind in ("image", "geometry")]
        return _rows(self.predictor.predict_decoded(_whole_batch(items, keys)), len(items))


__all__ = ["CheckpointChanged", "ModelServer", "SetServer"]
