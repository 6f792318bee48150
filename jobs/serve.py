"""Serve checkpoints over HTTP until Ctrl-C (the flags version of `serve run jobs/serve.yaml`).

    python -m jobs.serve --model dmm=s3://bucket/models/dmm.pt --model agr=./agr.pt --port 8000
    python -m jobs.serve --model dmm=... --model agr=... --set --embedding   # also every model at once: /v1/predict

Starts a local Ray (or joins the cluster named by RAY_ADDRESS, or the one ``ray start`` runs on this machine),
deploys ``raytasks.serve:build_app`` at route prefix ``/`` and stays in the foreground; Ctrl-C (or SIGTERM), while
it deploys as while it serves, shuts down the Serve it started, or deletes only its own application from a Serve
instance that was already running (whose HTTP host and port it keeps: without an API key it then refuses to
deploy unless that proxy listens on loopback), and exits with status 130 (143). The API is in docs/api.md;
``http://HOST:PORT/docs`` serves it live. Set FACEATTR_API_KEY to require an API key.

A local Ray it starts gets as many logical CPUs as the application's replicas ask for (each model's, the set's
and the ingress's), at least this machine's cores: ``--model a=... --model b=... --set`` asks for 4, and Serve
would otherwise wait for ever on a 2-core laptop. On a cluster it joined, a shortfall is a ``warning:`` line
(an autoscaler may add nodes); GPUs a local Ray does not have are an ``error:``.

Every setting is checked, and the application built, before Ray starts: a wrong one is an ``error:`` line
and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time

from jobs._cli import (
    STOP_STATUS,
    add_face_args,
    add_review_args,
    check_job_paths,
    face_options,
    finite,
    init_ray_stoppably,
    review_options,
    stop_on_signals,
)
from jobs.serve_checks import (
    API_KEY_ENV,
    bind_failure,
    check_auth,
    check_checkpoints_here,
    check_port_free,
    check_proxy,
    check_resources,
    demand_line,
    deploy_failure,
)

APP_NAME = "faceattr"


def _scaled(value: float, unit: int, flag: str) -> int:
    """``value`` units (MiB, megapixels) as a whole number, or an ``error:`` when it is too large to be one."""
    v = value * unit
    if not math.isfinite(v):
        raise SystemExit(f"error: {flag} {value:g} is too large")
    return int(v)


def _port(text: str) -> int:
    """An argparse ``type``: a TCP port, 1-65535 (Serve's proxy would fail to bind anything else, after Ray
    started)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number (1-65535), got {text!r}") from None
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (1-65535), got {text}")
    return v


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
        "max_request_bytes": _scaled(ns.max_request_mb, 1024 * 1024, "--max-request-mb"),
        "max_files": ns.max_files,
        "faces": face_options(ns),
        "review": review_options(ns),
    }
    if ns.autoscale:
        lo, _, hi = ns.autoscale.partition(":")
        try:
            lo, hi = int(lo), int(hi or lo)
        except ValueError:
            raise SystemExit(f"error: --autoscale wants MIN:MAX replicas, got {ns.autoscale!r}") from None
        if not 0 <= lo <= hi or hi < 1:
            raise SystemExit(f"error: --autoscale wants MIN:MAX replicas with 0 <= MIN <= MAX and MAX >= 1, got "
                             f"{ns.autoscale!r}")
        args["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                      "target_ongoing_requests": ns.max_batch_size}
    else:
        args["num_replicas"] = ns.num_replicas
    if ns.set or ns.embedding:  # every --model, under its name, in one set (raytasks/serve/config.py: ModelSetSpec)
        args["model_set"] = {"embedding": ns.embedding}
    ingress = {k: v for k, v in (("max_request_faces", ns.max_request_faces),
                                 ("request_timeout_s", ns.request_timeout_s),
                                 ("max_request_pixels", None if ns.max_request_megapixels is None
                                  else _scaled(ns.max_request_megapixels, 1_000_000, "--max-request-megapixels")),
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
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (1-65535)")
    p.add_argument("--max-batch-size", type=int, default=16, help="dynamic batching: images per forward pass")
    p.add_argument("--batch-wait-timeout-s", type=finite, default=0.01,
                   help="dynamic batching: how long a batch waits to fill")
    p.add_argument("--num-replicas", type=int, default=1, help="replicas per model")
    p.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="autoscale each model between MIN and MAX replicas")
    p.add_argument("--num-cpus", type=finite, default=1.0, help="CPUs per model replica")
    p.add_argument("--num-gpus", type=finite, default=0.0, help="GPUs per model replica (1 on a GPU node)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per replica (default: its CPUs)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when the replica has a GPU)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--max-queued-requests", type=int, default=256, help="per model; beyond this, 503")
    p.add_argument("--max-request-mb", type=finite, default=16.0, help="request body limit (413 beyond)")
    p.add_argument("--max-files", type=int, default=64, help="images per multipart request")
    g = p.add_argument_group("what one request may cost (docs/deploy.md; the defaults of IngressSpec)")
    g.add_argument("--max-request-faces", type=int, default=None, metavar="N",
                   help="faces found in one request's photos; beyond it 413 too_many_faces before any attribute "
                        "model runs (default 256)")
    g.add_argument("--max-request-megapixels", type=finite, default=None, metavar="MP",
                   help="source pixels one request may decode, from the files' headers; beyond it 413 (default 200)")
    g.add_argument("--request-timeout-s", type=finite, default=None, metavar="S",
                   help="a request's deadline; past it 504 and its images leave the batches (default 60)")
    g.add_argument("--body-timeout-s", type=finite, default=None, metavar="S",
                   help="a request body slower than this is answered 408 (default 30)")
    p.add_argument("--allow-no-auth", action="store_true",
                   help="listen beyond loopback without an API key (refused otherwise: set FACEATTR_API_KEY)")
    add_review_args(p)
    add_face_args(p)
    return p


def _running_serve():
    """The client of the Serve instance running on the connected Ray cluster, or None. Serve 2.60 has no public
    call for the HTTP options a running instance really has (``serve.start`` only logs that it ignored ours):
    its controller client holds them (``http_config``)."""
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False)


def stop_serve(serve, joined: bool, deployed: bool) -> None:
    """At exit: shut down the Serve instance this process started; from one it joined, delete only its own
    application (other applications there keep running), and nothing when it deployed none."""
    try:
        if not joined:
            serve.shutdown()
        elif deployed:
            serve.delete(APP_NAME)
    except Exception as e:  # noqa: BLE001 - Ctrl-C in a terminal also stops Ray's own processes
        print(f"serve shutdown: {type(e).__name__}: {e}", flush=True)


def _wait_for(got: dict) -> None:
    """Serve until a signal: SIGINT or SIGTERM raises KeyboardInterrupt in here (jobs/_cli.py: stop_on_signals)."""
    while "signum" not in got:
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    p = parser()
    ns = p.parse_args(argv)
    from raytasks.reach import path_of

    # a relative checkpoint resolves into Ray's unpacked working_dir under `ray job submit`, and the replicas' into
    # theirs: refused there (raytasks/reach.py)
    check_job_paths(p, [(f"--model {name}", path_of(uri)) for name, uri in ns.model])
    try:
        _main(ns)
    except SystemExit as e:  # a setting refused: its error line, and the usage status (as argparse's own)
        if isinstance(e.code, str) and e.code.startswith("error: "):
            print(e.code, file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raise


def _main(ns: argparse.Namespace) -> None:
    args = build_args(ns)
    api_key = os.environ.get(API_KEY_ENV) or None
    args["allow_no_auth"] = check_auth(ns.host, api_key, ns.allow_no_auth)

    from raytasks.serve import ServeArgs, build_app
    from raytasks.serve.app import start_demand

    try:  # every setting, the keys' characters and Serve's own options are checked here, before Ray starts
        app = build_app(ServeArgs.model_validate(args))
        demand = start_demand(app)  # what its replicas take once it is ready
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    from raytasks.reach import joined_address

    if not joined_address():  # a Ray of its own: the replicas and Serve's proxy will run on this machine
        check_checkpoints_here(args["models"])
        check_port_free(ns.host, ns.port)

    got: dict = {}
    with stop_on_signals(got) as reinstall:  # jobs/_cli.py: SIGINT and SIGTERM raise KeyboardInterrupt
        # nothing of Serve to stop until it is known to be ours; "own": a Ray this process started; "ready": served
        state = {"joined": True, "deployed": False, "own": False, "ready": False}
        try:
            _serve(ns, args, app, demand, api_key, state, got, reinstall)
        except KeyboardInterrupt:
            signum = got.get("signum", signal.SIGINT)
            what = ("Serve shut down" if not state["joined"] else f"application {APP_NAME} deleted from the "
                    "Serve instance it joined" if state["deployed"] else "nothing deployed")
            print(f"stopped by {signal.Signals(signum).name}: {what}", flush=True)
            raise SystemExit(STOP_STATUS.get(signum, 130)) from None


def _serve(ns: argparse.Namespace, args: dict, app, demand: dict, api_key: str | None, state: dict, got: dict,
           reinstall) -> None:
    """Start or join Ray, check that the application fits, deploy it and serve until a signal (``got``,
    ``reinstall``: jobs/_cli.py stop_on_signals); at the end, however it ends, Serve and Ray are shut down
    (:func:`stop_serve`: only this application from a Serve instance it joined)."""
    import ray
    from ray import serve

    from raytasks import reach
    from raytasks.serve.app import total_demand

    try:
        address = reach.joined_address()
        # A Ray of this process's own, on this machine: enough logical CPUs for every replica of the application
        # at its start (Serve would wait for ever for the rest), at least this machine's cores. Logical CPUs are
        # Ray's count for scheduling: the replicas share the real cores. A cluster (RAY_ADDRESS, or `ray start`'s)
        # is joined as it is (raytasks/reach.py init_ray), Ray's token authentication kept on.
        cores = os.cpu_count() or 1
        cpus = max(math.ceil(total_demand(demand)[0]), cores)
        if not address and cpus > cores:
            print(f"starting a local Ray with {cpus} logical CPUs, one per CPU the application's replicas "
                  f"ask for ({demand_line(demand)}), on this machine's {cores} cores", flush=True)
        init_ray_stoppably(got, reinstall, lambda: reach.init_ray(cpus, join=bool(address)))
        state["own"] = reach.started_here()
        if ray.is_initialized():  # (a test's stand-in for ray.init connects nothing: nothing to compare)
            warning = check_resources(demand, ray.cluster_resources(), state["own"])
            if warning:
                print(warning, flush=True)
        # a replica on another node may not find a checkpoint on this machine's disk (raytasks/reach.py)
        reach.check_reachable([], [(f"--model {name}", uri) for name, uri in args["models"].items()])
        state["joined"] = _running_serve() is not None  # then its HTTP options stay, and it is not ours to stop
        try:
            serve.start(http_options={"host": ns.host, "port": ns.port})
        except Exception as e:  # noqa: BLE001 - the proxy's bind failure is a clear error; any other is re-raised
            where = bind_failure(e)
            if where is None:
                raise
            raise SystemExit(f"error: Serve's HTTP proxy cannot listen on {where}: another server holds it; "
                             "choose another --port (or --host)") from None
        http = _running_serve().http_config
        host, port = http.host, http.port
        warning = check_proxy(ns.host, ns.port, host, port, api_key, ns.allow_no_auth)
        if warning:
            print(warning, flush=True)
        state["deployed"] = True  # from here the application named APP_NAME is this process's, to delete at exit
        cpus, gpus = total_demand(demand)
        print(f"deploying {', '.join(demand)}: {cpus:g} CPUs" + (f", {gpus:g} GPUs" if gpus else "")
              + "; Ctrl-C stops", flush=True)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # Serve tried each replica three times; say why, not Serve's traceback
            if not str(e).startswith(f"Deploying application {APP_NAME} failed"):
                raise
            raise SystemExit(f"error: deploying {APP_NAME} failed: {deploy_failure(serve, APP_NAME)}") from None
        state["ready"] = True
        print(f"serving {', '.join(sorted(args['models']))} at http://{host}:{port}/v1/models "
              + (f"and all of them at once at http://{host}:{port}/v1/predict " if "model_set" in args else "")
              + f"(docs: http://{host}:{port}/docs); Ctrl-C stops", flush=True)
        _wait_for(got)
    finally:
        for s in STOP_STATUS:  # a second Ctrl-C or SIGTERM must not break the shutdown
            signal.signal(s, signal.SIG_IGN)
        print("shutting down", flush=True)
        # Stopped while deploying on a Ray of its own: ray.shutdown ends that Ray, Serve's controller and replicas
        # with it; serve.shutdown would first wait up to 30 s for replicas that are still starting.
        if state["ready"] or not state["own"]:
            stop_serve(serve, state["joined"], state["deployed"])
        ray.shutdown()


if __name__ == "__main__":
    main()
