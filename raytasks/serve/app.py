"""Online queries: the label job's checkpoints behind an HTTP API on Ray Serve.

    serve run jobs/serve.yaml
    python -m jobs.serve --model dmm=s3://bucket/models/dmm.pt --model agr=./agr.pt --port 8000 [--set]

One Serve application, built by :func:`build_app` from plain arguments (:class:`ServeArgs`)::

    HTTP proxy -> FaceAttrAPI (FastAPI ingress, raytasks/serve/ingress.py): API key, size limit, content
                      |  type, decoding; one DeploymentHandle per model (and one for the set); decoded
                      v  pictures travel, as in the label job
                  AnnotatorServer "model-<name>" (one deployment per model, raytasks/serve/replicas.py):
                  the checkpoint loaded once per replica, @serve.batch dynamic batching, rows out
                  AnnotatorServer "modelset" (only with a ``model_set`` in the config): every model of the
                  set in one replica, for POST /v1/predict

The configuration is raytasks/serve/config.py; errors raytasks/serve/http.py; reading request bodies
raytasks/serve/bodies.py.

The answer for an image is the label job's Parquet row for it: both decode with facedata/decode.py and go
through ``core.annotator.Annotator.annotate`` with the same detector, so the columns (``path``, ``ok``,
..., ``model``, ``checkpoint``, then the model's output fields, or one struct per model of a set) and
values are the same.

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
"""

from __future__ import annotations

import os

from ray import serve

import storage
from core.modelset import ModelSet
from raytasks.serve.config import ServeArgs, check_key
from raytasks.serve.ingress import ADMIN_KEY_ENV, FaceAttrAPI
from raytasks.serve.replicas import AnnotatorServer
from raytasks.threads import runtime_env

SET_DEPLOYMENT = "modelset"  # the model set's deployment (model deployments are "model-<name>")


def deployment_options(settings: dict) -> dict:
    """Serve options of a model (or the set's) deployment from its resolved settings."""
    opts: dict = {
        "max_ongoing_requests": settings["max_ongoing_requests"],
        "max_queued_requests": settings["max_queued_requests"],
        # a worker process of its own, as the label job's annotator actors (raytasks/threads.py)
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
    # keys that no request could match fail the deploy here (and in the ingress replica, which may hold its own)
    api_key = check_key(os.environ.get(args.api_key_env) or None, f"${args.api_key_env}")
    check_key(os.environ.get(ADMIN_KEY_ENV) or None, f"${ADMIN_KEY_ENV}")
    handles, uris = {}, {}
    for name in args.models:
        s = args.model_settings(name)
        if not storage.is_s3(s["checkpoint"]):  # replicas may run in another working directory
            s["checkpoint"] = os.path.abspath(s["checkpoint"].removeprefix("file://"))
        uris[name] = s["checkpoint"]
        handles[name] = AnnotatorServer.options(name=f"model-{name}", **deployment_options(s)).bind(
            name, s["checkpoint"], s["device"], s["precision"], s["channels_last"], s["threads"], args.faces,
            review=args.review, gpu_share=s["num_gpus"])
    set_handle, set_name = None, "set"
    if args.model_set is not None:  # the same checkpoints (URIs and pins) as the per-model deployments
        spec, s = args.model_set, args.set_settings()
        members = spec.members(list(args.models))
        model_set = ModelSet(tuple((column, uris[name]) for column, name in members), embedding=spec.embedding,
                             name=spec.name, version=spec.version)
        set_name = spec.name
        set_handle = AnnotatorServer.options(name=SET_DEPLOYMENT, **deployment_options(s)).bind(
            f"set-{spec.name}", model_set.to_dict(), s["device"], s["precision"], True, s["threads"], args.faces,
            {column: name for column, name in members}, review=args.review, gpu_share=s["num_gpus"])
    ing = args.ingress
    ing_opts: dict = {"max_ongoing_requests": ing.max_ongoing_requests, "max_queued_requests": ing.max_queued_requests,
                      "ray_actor_options": {"num_cpus": ing.num_cpus}}
    if ing.autoscaling_config:
        ing_opts["autoscaling_config"] = ing.autoscaling_config
    else:
        ing_opts["num_replicas"] = ing.num_replicas or 1
    return FaceAttrAPI.options(name="FaceAttrAPI", **ing_opts).bind(
        handles, args.max_request_bytes, args.max_files, args.api_key_env,
        api_key, args.faces, ing, set_handle, set_name, args.allow_no_auth)


def start_demand(app: serve.Application) -> dict[str, tuple[int, float, float]]:
    """What each deployment of ``app`` takes from Ray's logical resources once it is ready: ``{deployment name:
    (replicas at start, CPUs per replica, GPUs per replica)}``. Replicas at start are ``num_replicas``, or with
    autoscaling ``initial_replicas``, else ``min_replicas`` (Serve's own rule: autoscaling_state.py). Read from
    the application as Serve builds it for ``serve.run`` (``ray.serve._private.build_app``, private in 2.60; it
    starts no Ray), so every deployment and option counts as deployed; Serve's controller and HTTP proxy take
    no CPU."""
    from ray.serve._private.build_app import build_app as build_for_run

    out = {}
    for d in build_for_run(app, name="demand").deployments:
        auto = d._deployment_config.autoscaling_config
        n = d.num_replicas if auto is None else (auto.initial_replicas if auto.initial_replicas is not None
                                                 else auto.min_replicas)
        res = d._replica_config.resource_dict  # Serve's reading of ray_actor_options
        out[d.name] = (n, res.get("CPU", 0.0), res.get("GPU", 0.0))
    return out


def total_demand(demand: dict[str, tuple[int, float, float]]) -> tuple[float, float]:
    """``(CPUs, GPUs)`` all deployments of :func:`start_demand` take at once (rounded as Ray rounds resources,
    to 1e-4, so that 3 x 0.1 is 0.3)."""
    cpus = sum(n * c for n, c, _ in demand.values())
    gpus = sum(n * g for n, _, g in demand.values())
    return round(cpus, 4), round(gpus, 4)
