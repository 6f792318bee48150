"""What ``python -m jobs.serve`` checks before and while it starts, each a clear ``error:`` (SystemExit) or a
``warning:`` line: no keyless server beyond loopback (:func:`check_auth`, :func:`check_proxy` for a Serve already
running), the CPUs and GPUs the application takes (:func:`check_resources`), a local checkpoint the replicas could
not use (:func:`check_checkpoints_here`) and a port another server holds (:func:`check_port_free`) before Ray
starts, and why Serve could not bind its proxy (:func:`bind_failure`) or deploy (:func:`deploy_failure`)."""

from __future__ import annotations

import storage

API_KEY_ENV = "FACEATTR_API_KEY"


def check_port_free(host: str, port: int) -> None:
    """Refuse, before Ray starts, a ``--host``/``--port`` that a server on this machine holds already, when Serve's
    proxy will listen here (a Ray this process starts): one line, not Serve's "Failed to bind" traceback after
    Ray has started. ``SO_REUSEADDR`` as the proxy's own server binds, so a port in TIME_WAIT is not refused."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise SystemExit(f"error: --host {host}: {e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise SystemExit(f"error: --port {port}: cannot listen on {host}:{port} ({e.strerror or e}): another "
                             "server holds it (another jobs.serve?); choose another --port") from None


def bind_failure(e: Exception) -> str | None:
    """The address of Serve's "Failed to bind to address 'HOST:PORT'" in ``e`` (the proxy's error, raised through
    ``serve.start``), or None for any other error."""
    import re

    m = re.search(r"Failed to bind to address '([^']+)'", str(e))
    return m.group(1) if m else None


def _loopback(host: str | None) -> bool:
    import ipaddress

    if host is None:  # Serve's proxy is off: nothing to say it stays on this machine
        return False
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_auth(host: str, api_key: str | None, allow_no_auth: bool) -> bool:
    """Refuse to listen on anything but loopback without an API key, unless told to (a server on 0.0.0.0
    without a key answers anyone who can reach the port). Returns whether the application may answer
    without a key (the ingress refuses every request otherwise: ``ServeArgs.allow_no_auth``)."""
    if api_key:
        return False
    if allow_no_auth:
        return True
    if not _loopback(host):
        raise SystemExit(f"error: --host {host} listens beyond this machine and {API_KEY_ENV} is not set: set "
                         "an API key (and put TLS in front, docs/api.md), or pass --allow-no-auth to serve openly")
    return True  # loopback only: this machine's users


def check_proxy(host: str, port: int, proxy_host: str | None, proxy_port: int, api_key: str | None,
                allow_no_auth: bool) -> str | None:
    """The HTTP options Serve really has (``proxy_host``, ``proxy_port``) against the flags. A Serve instance
    already running on the cluster (``serve deploy``, an earlier ``jobs.serve`` killed with -9: its controller
    is detached and survives) keeps its own and ignores ours. Without an API key and without
    ``--allow-no-auth``, a proxy beyond loopback is refused (the keyless application would answer anyone who
    reaches it); otherwise a different host or port is a warning line (returned), None when they agree."""
    if not api_key and not allow_no_auth and not _loopback(proxy_host):
        raise SystemExit(f"error: Serve already runs on this Ray cluster with its HTTP proxy on "
                         f"{proxy_host}:{proxy_port}, beyond this machine (--host {host} cannot change it), and "
                         f"{API_KEY_ENV} is not set: this server would answer anyone on the network. Set "
                         f"{API_KEY_ENV}, or stop that Serve instance (serve shutdown) so that jobs.serve starts "
                         "its own on --host, or pass --allow-no-auth to serve openly")
    if (proxy_host, proxy_port) != (host, port):
        return (f"warning: Serve already runs on this Ray cluster with its HTTP proxy on {proxy_host}:{proxy_port}; "
                f"--host {host} --port {port} are ignored (stop that Serve instance with serve shutdown to choose them)")
    return None


def demand_line(demand: dict[str, tuple[int, float, float]], what: str = "CPU") -> str:
    """The deployments of raytasks.serve.app.start_demand that take ``what``, as ``model-a 1 x 1, ...``."""
    i = 1 if what == "CPU" else 2
    return ", ".join(f"{name} {d[0]} x {d[i]:g}" for name, d in demand.items() if d[0] and d[i])


def check_resources(demand: dict[str, tuple[int, float, float]], have: dict, started_here: bool) -> str | None:
    """The CPUs and GPUs the application's replicas take at its start (raytasks/serve/app.py: start_demand)
    against ``have`` (``ray.cluster_resources()``). Short on a Ray this process started, nothing adds a node
    and Serve would wait for ever: an ``error:`` (SystemExit). Short on a cluster it joined, an autoscaler may
    add nodes: a ``warning:`` line, returned. None when it fits (the rule of jobs.label and jobs.train:
    raytasks.reach.started_here)."""
    from raytasks.serve.app import total_demand

    cpus, gpus = total_demand(demand)
    short = []
    if cpus > round(have.get("CPU", 0.0), 4):
        short.append(f"the application's replicas ask for {cpus:g} CPUs ({demand_line(demand)}; replicas x CPUs "
                     f"each) and this Ray has {have.get('CPU', 0.0):g}: --num-cpus sets each model replica's "
                     "(e.g. 0.5)")
    if gpus > round(have.get("GPU", 0.0), 4):
        short.append(f"the application's replicas ask for {gpus:g} GPUs ({demand_line(demand, 'GPU')}) and this "
                     f"Ray has {have.get('GPU', 0.0):g}: --num-gpus sets the GPUs of each model replica (0: CPU)")
    if not short:
        return None
    if started_here:
        raise SystemExit(f"error: {'; and '.join(short)} (on this Ray, which this process started, nothing adds "
                         "a node: Serve would wait for ever)")
    return (f"warning: {'; and '.join(short)}; Serve waits for the autoscaler to add nodes (for ever if none "
            "can come)")


def check_checkpoints_here(models: dict[str, str]) -> None:
    """Refuse, before Ray starts, a local checkpoint that the replicas could not use, called when they will run
    here (a Ray this process starts): a file that is not there, not a checkpoint or not the pinned hash is one
    line at once (``models.checkpoint.checkpoint_info``: the replicas' own checks but building the model), not a
    deploy that fails after Serve has tried three replicas. Joining a cluster, the replicas may run on nodes
    whose disk holds it (``check_reachable`` warns), and an s3:// checkpoint is read by the replicas: their
    failure is reported as the deploy's (:func:`deploy_failure`)."""
    from models.checkpoint import CheckpointError, checkpoint_info
    from raytasks.reach import path_of

    for name, uri in models.items():
        path = path_of(uri)
        if path and not storage.is_s3(path):
            try:
                checkpoint_info(uri)
            except CheckpointError as e:
                raise SystemExit(f"error: --model {name}: {e}") from None


def deploy_failure(serve, app_name: str) -> str:
    """Why Serve could not deploy ``app_name``: each failed deployment's last error line (a replica's constructor
    raised: a checkpoint that is not there, not a checkpoint, or not the pinned hash), read from Serve's status
    before it is shut down; Serve's own message where there is none."""
    try:
        app = serve.status().applications.get(app_name)
        reasons = [f"{name}: {last_error_line(d.message)}" for name, d in (app.deployments if app else {}).items()
                   if str(getattr(d.status, "value", d.status)) == "DEPLOY_FAILED"]
    except Exception:  # noqa: BLE001 - the failure is reported either way; its detail is in the replicas' logs
        reasons = []
    return "; ".join(reasons) or "a replica failed to start (its error is in the log above)"


def last_error_line(message: str) -> str:
    """The exception line of a replica's traceback (``module.Error: text``, the module path dropped), else the
    message's last line."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        head, sep, text = ln.partition(": ")
        if sep and head.split(".")[-1].endswith(("Error", "Exception", "Mismatch", "Unavailable")):
            return f"{head.split('.')[-1]}: {text}"
    return lines[-1] if lines else "no message"
