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
its local paths are accepted.
"""

from __future__ import annotations

import os

from facedata.paths import local_path

# Filesystem types (as /proc/self/mounts names them) whose files every node mounting them sees.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs",
                                 "beegfs", "wekafs", "orangefs", "pvfs2", "ocfs2", "gfs2", "afs", "panfs"})
LOCAL_FUSE = frozenset({"fuse.fuse-overlayfs", "fuse.lxcfs", "fuse.portal"})  # FUSE mounts of this machine only


def started_here() -> bool:
    """Whether this process started the Ray it uses (``ray.init()`` without an address, here, in a notebook or
    in a user's script): a Ray on this machine alone, which no autoscaler grows. Read from the driver's node
    (``ray_init_cluster``, private to Ray 2.60, so read with a default: an unknown Ray counts as a cluster)."""
    try:
        from ray._private import worker
    except ImportError:
        return False
    return bool(getattr(getattr(worker, "_global_node", None), "ray_init_cluster", False))


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
