"""Whether the cluster's tasks can reach a job's paths: a local path is refused where tasks run on other nodes.

A label or training job reads and writes through Ray tasks and actors, which a cluster places on any node. A
path on the driver's own disk (``--input /data/photos``, ``--output /data/labels``, ``--storage ~/runs``) is
then not there for them: every row would be ``unreadable``, and each node would write its Parquet files, or
its training checkpoints, to its own disk, where the driver's summary and the next resume never see them (and
``jobs.serve``'s replicas would not find a checkpoint). So before anything is read or written,
:func:`check_reachable` refuses such a path when tasks may run elsewhere:

* on a Ray this process started (``ray.init()`` without an address: a laptop, a notebook, the tests) every task
  runs on this machine, and nothing is checked;
* on a cluster it connected to, tasks run elsewhere when it has more than one node now, or when this node
  offers them no CPU and no GPU (the head of ``cluster.yaml`` and of the KubeRay manifests advertises
  ``CPU: 0``, and an autoscaling cluster may have no worker yet when the job starts);
* a path is reachable from every node when it is an ``s3://`` URI, or when it lies on a network filesystem
  (its mount's type in ``/proc/self/mounts``: NFS, which EFS is, SMB, Lustre, which FSx is, GPFS, CephFS,
  GlusterFS, BeeGFS, WekaFS, and FUSE mounts such as s3fs, gcsfuse or JuiceFS), mounted at the same path on
  every node: that last part cannot be checked from here, and the docs (docs/deploy.md) say so.

A machine started with ``ray start --head`` and used through ``ray job submit`` alone is one node with CPUs:
its local paths are accepted, but only absolute ones: :func:`check_job_paths` refuses a *relative* local path
(and a relative default, ``jobs.train``'s ``--storage runs``) in a process that runs in the copy of the job's
``working_dir`` Ray unpacked (``ray job submit --working-dir .``), on any Ray, one machine or a cluster: the path
would be read and written in Ray's temporary session folder, in a package folder named by the code's content.

Every job starts or joins Ray here too (:func:`init_ray`), and a Ray it starts asks its own dashboard for Ray's
State API (:func:`own_state_api`).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import PurePath

import storage
from facedata.paths import local_path

# Filesystem types (as /proc/self/mounts names them) whose files every node mounting them sees.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs",
                                 "beegfs", "wekafs", "orangefs", "pvfs2", "ocfs2", "gfs2", "afs", "panfs"})
LOCAL_FUSE = frozenset({"fuse.fuse-overlayfs", "fuse.lxcfs", "fuse.portal"})  # FUSE mounts of this machine only
STATE_API_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's State API asks (own_state_api)


def started_here() -> bool:
    """Whether this process started the Ray it uses (``ray.init()`` without an address, here, in a notebook or
    in a user's script): a Ray on this machine alone, which no autoscaler grows. Read from the driver's node
    (``ray_init_cluster``, private to Ray 2.60, so read with a default: an unknown Ray counts as a cluster)."""
    try:
        from ray._private import worker
    except ImportError:
        return False
    return bool(getattr(getattr(worker, "_global_node", None), "ray_init_cluster", False))


def joined_address() -> str | None:
    """The cluster a plain ``ray.init()`` joins, or None when it starts a Ray of this process's own: RAY_ADDRESS
    (``ray job submit`` sets it), else the one ``ray start`` recorded on this machine (its ``ray_current_cluster``
    file in Ray's temporary folder, ``$RAY_TMPDIR/ray`` or ``/tmp/ray``: docs/deploy.md, one machine). Ray's own
    lookup, ``ray._private.services.canonicalize_bootstrap_address``, is private in 2.60: where it is missing,
    RAY_ADDRESS alone is read, and where it fails (a stale record, a malformed address) None, and the ``ray.init``
    that follows says what is wrong."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return None
    try:
        return canonicalize_bootstrap_address(None)
    except Exception:  # noqa: BLE001 - ray.init's own lookup fails the same way, with Ray's message
        return None


def init_ray(local_cpus: int, join: bool | None = None, **init_kwargs) -> bool:
    """Join the cluster a plain ``ray.init()`` finds (:func:`joined_address`: RAY_ADDRESS, or ``ray start``'s on
    this machine) with ``ray.init(**init_kwargs)``, as it is: Ray refuses ``num_cpus`` when joining ("When
    connecting to an existing cluster, num_cpus and num_gpus must not be provided"), and keeps its token
    authentication on; or start a Ray of this process's own with ``num_cpus=local_cpus``. ``join``: the caller's
    own :func:`joined_address` answer (None: asked here). True when it joined. Every job starts or joins Ray here."""
    import ray

    if join is None:
        join = joined_address() is not None
    if join:
        ray.init(**init_kwargs)
        return True
    try:
        own_kwargs, env = own_state_api(init_kwargs)
        with _environ(env):
            ray.init(num_cpus=local_cpus, **own_kwargs)
    except ValueError as e:  # a cluster Ray found where joined_address did not (a Ray whose lookup changed)
        if "connecting to an existing cluster" not in str(e):
            raise
        ray.init(**init_kwargs)
        return True
    return False


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_state_api(init_kwargs: dict) -> tuple[dict, dict]:
    """``(init_kwargs, environment)`` for a Ray this process starts, so that Ray's State API, asked from inside
    that Ray, answers about that Ray and no other on the machine.

    Asked without an address (as Ray Train 2.60's ``PlacementGroupCleaner`` asks every second whether the run's
    controller lives: ``ray.train.v2._internal.state.util.is_actor_alive``), the State API does not ask the Ray
    of the process asking: it reads RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, then the cluster ``ray start`` last
    recorded on the machine (``ray_current_cluster``), and without one the dashboard address that Ray's GCS holds
    (127.0.0.1:8265 for a Ray without a dashboard, where another Ray's dashboard may be). Checked on Ray 2.60
    (2026-12-07): an actor of a Ray started by ``ray.init()`` asked about a live actor of its own Ray after
    ``ray start --head`` had started a second Ray on the machine, and was told it does not exist; the cleaner
    takes that answer for a dead controller and removes the live run's workers ("placement group was removed").

    So the dashboard gets a port chosen here (``dashboard_port``, unless the caller chose one: a free port, not
    Ray's 8265, which every Ray on the machine tries first, so that no other Ray's dashboard can take it between
    this choice and the dashboard's start; Ray prints the address as it starts) and
    RAY_API_SERVER_ADDRESS names it in the environment the Ray's processes inherit (set only while ``ray.init``
    starts them: :func:`_environ`; this process's own environment is left as it was). A Ray without a
    dashboard (``include_dashboard=False``) then has its State API pointed at a port nothing listens on: every
    query fails, and the cleaner waits, as on a machine with one Ray. A RAY_API_SERVER_ADDRESS the user set (for
    ``ray job submit`` to a remote cluster, say) is replaced for the started Ray's processes only, since one
    naming another cluster would mislead them the same way, and stays as it was for this process."""
    kwargs = {**init_kwargs}
    port = kwargs.setdefault("dashboard_port", free_port())
    return kwargs, {STATE_API_ENV: f"http://127.0.0.1:{port}"}


@contextmanager
def _environ(values: dict):
    """``values`` in this process's environment for the ``with`` block (inherited by the processes it starts),
    then the environment as it was."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tasks_elsewhere() -> str | None:
    """Why the connected Ray may run this job's tasks on another node than this one, or None (module docstring)."""
    import ray

    if not ray.is_initialized() or started_here():  # not yet connected: the job will start a Ray of its own
        return None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        return f"its {len(nodes)} nodes each run tasks"
    here = ray.get_runtime_context().get_node_id()
    mine = next((n for n in nodes if n.get("NodeID") == here), None)
    offers = (mine or {}).get("Resources") or {}
    if mine is not None and not offers.get("CPU") and not offers.get("GPU"):
        return "this node offers tasks no CPU and no GPU (a cluster's head: its tasks run on worker nodes)"
    return None


def _unescape(field: str) -> str:
    """A /proc/self/mounts field: spaces, tabs, newlines and backslashes are written as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_of(path: str, mounts: str | None = None) -> tuple[str, str]:
    """``(mount point, filesystem type)`` of the mount holding ``path`` (the nearest folder that exists, for a
    path a job will create), links resolved; ``mounts``: the text of ``/proc/self/mounts`` (read when None)."""
    path = os.path.realpath(path)  # first: looking the path up mounts an automounted share (autofs)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if mounts is None:
        try:
            with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
                mounts = f.read()
        except OSError:
            return "/", "unknown"
    best = ("/", "unknown")
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point, fstype = _unescape(fields[1]), fields[2]
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):  # the last of equal mount points is the one seen
            best = (point, fstype)
    return best


def on_network_filesystem(fstype: str) -> bool:
    return fstype in NETWORK_FILESYSTEMS or (fstype.startswith("fuse.") and fstype not in LOCAL_FUSE)


def local_paths(paths: list[tuple[str, str | None]], mounts: str | None = None) -> list[str]:
    """The entries of ``paths`` (what the job calls it, path or URI) that are on this machine's own disks, each
    said with its mount: none for ``s3://`` URIs and paths on a network filesystem."""
    out = []
    for what, path in paths:
        local = local_path(path) if path else None  # None: an s3:// URI
        if local is None:
            continue
        point, fstype = mount_of(local, mounts)
        if not on_network_filesystem(fstype):
            out.append(f"{what} {path} ({fstype} at {point})")
    return out


def check_reachable(writes: list[tuple[str, str | None]], reads: list[tuple[str, str | None]] = (),
                    error: type[Exception] = ValueError, warn=print) -> None:
    """When the cluster runs the job's tasks on other nodes: raise ``error`` naming every local path of ``writes``
    (each node would write to its own disk), and ``warn`` about every local path of ``reads`` (the files may be
    on every node at that path, baked into the container image, but are most often not)."""
    why = tasks_elsewhere()
    if why is None:
        return
    bad = local_paths(writes)
    if bad:
        raise error(f"{'; '.join(bad)}: on this machine's own disk, but this Ray cluster runs the job's tasks on "
                    f"other nodes ({why}), which would each write to their own disk: rows and checkpoints scattered "
                    "where no summary or resume sees them. Use an s3:// URI, or a network filesystem (NFS, EFS, "
                    "Lustre, ...) mounted at the same path on every node (docs/deploy.md)")
    unsure = local_paths(reads)
    if unsure:
        warn(f"warning: {'; '.join(unsure)}: on this machine's own disk, and this Ray cluster runs the job's tasks "
             f"on other nodes ({why}): unless the same files are at the same path on every node (baked into the "
             "container image, say), they will not be found there (label rows `unreadable`, a training run that "
             "stops, a replica that cannot load its checkpoint). Prefer s3:// URIs or a network filesystem "
             "(docs/deploy.md)")


# ---- relative paths inside a Ray job's unpacked working_dir ----------------------------------------------------
#
# How Ray 2.60 runs `ray job submit --working-dir . -- python -m jobs.train ...` (read in the installed package):
# * the working_dir is zipped and uploaded as gcs://_ray_pkg_<content hash>.zip (ray/_private/runtime_env/
#   packaging.py: RAY_PKG_PREFIX = "_ray_pkg_", the name made from the files' hash) and unpacked on the node into
#   <session dir>/runtime_resources/working_dir_files/_ray_pkg_<hash>/ (ray/_private/ray_constants.py:
#   DEFAULT_RUNTIME_ENV_DIR_NAME = "runtime_resources", a name `ray start` may be given another of;
#   ray/_private/runtime_env/working_dir.py: WorkingDirPlugin's resources dir "working_dir_files", and
#   packaging.get_local_dir_from_uri: the zip's name without its extension). A `local://` working_dir is used
#   where it is, not unpacked (WorkingDirPlugin._get_directory_on_node).
# * WorkingDirPlugin.modify_context prefixes the process's command with `cd <that folder> &&`: the job's
#   supervisor actor runs there, and it starts the entrypoint with subprocess.Popen(shell=True) without a cwd
#   (ray/dashboard/modules/job/job_supervisor.py: _exec_entrypoint), so the entrypoint's cwd is that folder;
# * the entrypoint's environment is the supervisor's, with Ray's internal flags removed (RAY_JOB_ID is one of
#   ray_constants.RAY_INTERNAL_FLAGS: remove_ray_internal_flags_from_env), so RAY_JOB_ID is NOT set in a
#   submitted entrypoint (raylet sets it for worker processes only), plus RAY_ADDRESS and
#   RAY_JOB_CONFIG_JSON_ENV_VAR = {"runtime_env": {..., "working_dir": "gcs://_ray_pkg_<hash>.zip"},
#   "metadata": {"job_submission_id": ...}} (job_supervisor.py: _get_driver_env_vars;
#   ray/_private/runtime_env/constants.py names the variable).
# So: the cwd is the evidence (a job whose entrypoint first does `cd /data && python -m ...` resolves its relative
# paths in /data, which is fine), and the job config in the environment confirms it where the runtime resources
# folder has another name than "runtime_resources".
WORKING_DIR_FILES = "working_dir_files"
RUNTIME_RESOURCES = "runtime_resources"
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def _submitted_working_dir(environ) -> str | None:
    """The ``working_dir`` URI of the job config Ray's job supervisor hands a submitted entrypoint, when it is one
    Ray unpacks (not ``local://``), else None."""
    try:
        config = json.loads(environ.get(JOB_CONFIG_ENV) or "null")
        uri = ((config or {}).get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):
        return None
    return uri if isinstance(uri, str) and uri and not uri.startswith("local://") else None


def job_working_dir(cwd: str | None = None, environ=None) -> str | None:
    """The folder Ray unpacked a submitted job's ``working_dir`` into, when this process runs in it (``cwd`` at or
    under ``.../runtime_resources/working_dir_files/<package>``, or under ``.../working_dir_files/<package>`` with
    the job config naming a working_dir), else None (the notes above)."""
    if cwd is None:
        try:
            cwd = os.getcwd()
        except OSError:  # a cwd removed under the process: nothing to resolve against here
            return None
    environ = os.environ if environ is None else environ
    parts = PurePath(cwd).parts
    for i in range(1, len(parts) - 1):
        if parts[i] == WORKING_DIR_FILES and (parts[i - 1] == RUNTIME_RESOURCES or _submitted_working_dir(environ)):
            return str(PurePath(*parts[: i + 2]))
    return None


def path_of(text: str | None, named: bool = False) -> str | None:
    """The path or URI in a flag's value: a checkpoint's ``#sha256:<hex>`` pin dropped
    (``models.checkpoint.split_pin``), ``NAME=`` dropped with ``named`` (``--checkpoint NAME=URI``, ``--model
    NAME=URI``: ``core.modelset.split_member``; a name it refuses is the job's to report, the path is kept whole)."""
    from core.modelset import ModelSetError, split_member
    from models.checkpoint import CheckpointError, split_pin

    if not text:
        return None
    if named:
        try:
            text = split_member(text)[1]
        except ModelSetError:
            pass
    try:
        return split_pin(text)[0] or text
    except CheckpointError:  # a malformed pin: the job reports it; the path is judged as written
        return text


def is_relative_local(path: str) -> bool:
    """Whether ``path`` is a local path resolved against the cwd: not an ``s3://`` URI, not absolute
    (``file://`` is read as a local path: storage.filesystem)."""
    if storage.is_s3(path):
        return False
    return not os.path.isabs(path[len("file://"):] if path.startswith("file://") else path)


def job_dir_problem(paths: Iterable[tuple[str, str | None]], cwd: str | None = None, environ=None) -> str | None:
    """One line refusing the relative local paths of ``paths`` (``(what the job calls it, path)``; None or ''
    skipped) when this process runs in a Ray job's unpacked working_dir (:func:`job_working_dir`), else None."""
    where = job_working_dir(cwd, environ)
    if where is None:
        return None
    bad = [f"{what} {path!r}" for what, path in paths if path and is_relative_local(path)]
    if not bad:
        return None
    what = "a relative path" if len(bad) == 1 else "relative paths"
    return (f"{'; '.join(bad)}: {what}, and this job runs in the copy of its working_dir that Ray unpacked "
            f"({where!r}): {'it' if len(bad) == 1 else 'they'} would be read and written there, in Ray's temporary session folder, and a rerun after "
            "any code change gets a new copy (another package hash), so nothing there is found again or resumed. "
            "Pass an absolute path (e.g. /data/runs) or an s3:// URI (docs/deploy.md)")
