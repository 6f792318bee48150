"""Serve checkpoints over HTTP until Ctrl-C (the flags version of `serve run jobs/serve.yaml`).

    python -m jobs.serve --model dmm=s3://bucket/models/dmm.pt --model agr=./agr.pt --port 8000
    python -m jobs.serve --model dmm=... --model agr=... --set --embedding   # also every model at once: /v1/predict

Starts a local Ray (or joins the cluster named by RAY_ADDRESS), deploys ``raytasks.serve:build_app`` at
route prefix ``/`` and stays in the foreground; Ctrl-C (or SIGTERM) shuts Serve down. The API is in
docs/api.md; ``http://HOST:PORT/docs`` serves it live. Set FACEATTR_API_KEY to require an API key.
"""

from __future__ import annotations

import argparse
import signal
import time

from jobs._cli import add_face_args, add_review_args, face_options, review_options


def _model_arg(text: str) -> tuple[str, str]:
    name, sep, uri = text.partition("=")
    if not sep or not name or not uri:
        raise argparse.ArgumentTypeError(f"--model wants NAME=CHECKPOINT (path or s3:// URI), got {text!r}")
    return name, uri


def build_args(ns: argparse.Namespace) -> dict:
    """Flags -> the ``args`` of raytasks.serve:build_app (validated there)."""
    names = [n for n, _ in ns.model]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SystemExit(f"error: model name(s) given twice: {', '.join(dup)}")
    args: dict = {
        "models": dict(ns.model),
        "max_batch_size": ns.max_batch_size,
        "batch_wait_timeout_s": ns.batch_wait_timeout_s,
        "num_cpus": ns.num_cpus,
        "num_gpus": ns.num_gpus,
        "precision": ns.precision,
        "max_queued_requests": ns.max_queued_requests,
        "max_request_bytes": int(ns.max_request_mb * 1024 * 1024),
        "max_files": ns.max_files,
        "faces": face_options(ns),
        "review": review_options(ns),
    }
    if ns.autoscale:
        lo, _, hi = ns.autoscale.partition(":")
        try:
            args["autoscaling_config"] = {"min_replicas": int(lo), "max_replicas": int(hi or lo),
                                          "target_ongoing_requests": ns.max_batch_size}
        except ValueError:
            raise SystemExit(f"error: --autoscale wants MIN:MAX replicas, got {ns.autoscale!r}") from None
    else:
        args["num_replicas"] = ns.num_replicas
    if ns.set or ns.embedding:  # every --model, under its name, in one set (raytasks/serve/config.py: ModelSetSpec)
        args["model_set"] = {"embedding": ns.embedding}
    ingress = {k: v for k, v in (("max_request_faces", ns.max_request_faces),
                                 ("request_timeout_s", ns.request_timeout_s),
                                 ("max_request_pixels", None if ns.max_request_megapixels is None
                                  else int(ns.max_request_megapixels * 1_000_000)),
                                 ("body_timeout_s", ns.body_timeout_s)) if v is not None}
    if ingress:  # only what was given: the rest keeps raytasks/serve/config.py's IngressSpec defaults
        args["ingress"] = ingress
    if ns.threads:
        args["threads"] = ns.threads
    if ns.device:
        args["device"] = ns.device
    return args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", type=_model_arg, required=True, metavar="NAME=CHECKPOINT",
                   help="a model to serve at /v1/models/NAME (repeat for several); CHECKPOINT#sha256:<hex> pins "
                        "its content hash: replicas refuse any other file")
    p.add_argument("--set", action="store_true",
                   help="also serve every --model as one model set at POST /v1/predict: every model on every face "
                        "of an image in one request, from one replica that holds them all (one process, one "
                        "device); NAMEs must then be lower-case column names (^[a-z][a-z0-9_]*$)")
    p.add_argument("--embedding", action="store_true",
                   help="the set also gives dlib's 128-D face embedding of every face (implies --set)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=16, help="dynamic batching: images per forward pass")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01,
                   help="dynamic batching: how long a batch waits to fill")
    p.add_argument("--num-replicas", type=int, default=1, help="replicas per model")
    p.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="autoscale each model between MIN and MAX replicas")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per model replica")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model replica (1 on a GPU node)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per replica (default: its CPUs)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when the replica has a GPU)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--max-queued-requests", type=int, default=256, help="per model; beyond this, 503")
    p.add_argument("--max-request-mb", type=float, default=16.0, help="request body limit (413 beyond)")
    p.add_argument("--max-files", type=int, default=64, help="images per multipart request")
    g = p.add_argument_group("what one request may cost (docs/deploy.md; the defaults of IngressSpec)")
    g.add_argument("--max-request-faces", type=int, default=None, metavar="N",
                   help="faces found in one request's photos; beyond it 413 too_many_faces before any attribute "
                        "model runs (default 256)")
    g.add_argument("--max-request-megapixels", type=float, default=None, metavar="MP",
                   help="source pixels one request may decode, from the files' headers; beyond it 413 (default 200)")
    g.add_argument("--request-timeout-s", type=float, default=None, metavar="S",
                   help="a request's deadline; past it 504 and its images leave the batches (default 60)")
    g.add_argument("--body-timeout-s", type=float, default=None, metavar="S",
                   help="a request body slower than this is answered 408 (default 30)")
    p.add_argument("--allow-no-auth", action="store_true",
                   help="listen beyond loopback without an API key (refused otherwise: set FACEATTR_API_KEY)")
    add_review_args(p)
    add_face_args(p)
    return p


def check_auth(host: str, api_key: str | None, allow_no_auth: bool) -> bool:
    """Refuse to listen on anything but loopback without an API key, unless told to (a server on 0.0.0.0
    without a key answers anyone who can reach the port). Returns whether the application may answer
    without a key (the ingress refuses every request otherwise: ``ServeArgs.allow_no_auth``)."""
    import ipaddress

    if api_key:
        return False
    if allow_no_auth:
        return True
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"error: --host {host} listens beyond this machine and FACEATTR_API_KEY is not set: set "
                         "an API key (and put TLS in front, docs/api.md), or pass --allow-no-auth to serve openly")
    return True  # loopback only: this machine's users


def main(argv: list[str] | None = None) -> None:
    ns = parser().parse_args(argv)
    args = build_args(ns)
    import os

    args["allow_no_auth"] = check_auth(ns.host, os.environ.get("FACEATTR_API_KEY"), ns.allow_no_auth)

    import ray
    from ray import serve

    from raytasks.serve import ServeArgs, build_app

    try:
        ServeArgs.model_validate(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    ray.init()  # local, or the cluster in RAY_ADDRESS; keeps Ray's token authentication on
    from raytasks.reach import check_reachable

    # a replica on another node may not find a checkpoint on this machine's disk (raytasks/reach.py)
    check_reachable([], [(f"--model {name}", uri) for name, uri in args["models"].items()])
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        serve.start(http_options={"host": ns.host, "port": ns.port})
        serve.run(build_app(args), name="faceattr", route_prefix="/")
        print(f"serving {', '.join(sorted(args['models']))} at http://{ns.host}:{ns.port}/v1/models "
              + (f"and all of them at once at http://{ns.host}:{ns.port}/v1/predict " if "model_set" in args else "")
              + f"(docs: http://{ns.host}:{ns.port}/docs); Ctrl-C stops", flush=True)
        while not stop["now"]:
            time.sleep(0.5)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the shutdown
        print("shutting down", flush=True)
        try:
            serve.shutdown()
        except Exception as e:  # noqa: BLE001 - Ctrl-C in a terminal also stops Ray's own processes
            print(f"serve shutdown: {type(e).__name__}: {e}", flush=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
