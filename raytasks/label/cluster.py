"""Where the label job runs: the Ray it connects to or starts, and how many annotator actors fit."""

from __future__ import annotations

import math
import os

from raytasks.label.spec import LabelError, LabelSpec
from raytasks.reach import init_ray, started_here


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address``, or to the cluster a plain ``ray.init()`` finds (``RAY_ADDRESS``, set by ``ray job
    submit``, or the one ``ray start`` runs on this machine: raytasks/reach.py init_ray), or start a local Ray with
    at least four logical CPUs (Ray's checkpoint filter actor takes one, see the module docstring)."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        init_ray(max(4, os.cpu_count() or 1))


def resolve_pool(spec: LabelSpec, resuming: bool = False, can_grow: bool | None = None,
                 warn=print) -> tuple[int, int]:
    """``(min_size, max_size)`` of the annotator actor pool from the cluster's resources now. CPU actors leave one
    CPU for the decode and write tasks and one for Ray's checkpoint filter actor, which is there when the
    output already has rows (``resuming``); the default maximum leaves that room on every run, so that a
    laptop's cores are not shared by more model threads than they have.

    When the pool does not fit: on a Ray this process started (:func:`started_here`, by ensure_ray or by the
    user's own ``ray.init()``; ``can_grow`` False) nothing will add resources, so it is an error, not a wait
    that never ends; on a cluster it is a warning, since the autoscaler adds nodes as Ray Data
    asks for them (a cluster whose GPU workers scale from zero has no GPU when the job starts; give
    ``--max-actors`` there, the default is what fits now)."""
    import ray

    can_grow = (not started_here()) if can_grow is None else can_grow
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if spec.gpus_per_actor > 0:
        fit = default = int(gpus // spec.gpus_per_actor)
        short = f"--gpus-per-actor {spec.gpus_per_actor:g} but the Ray cluster has {gpus:g} GPUs"
    else:
        spare = 1 + int(resuming)
        fit = int((cpus - spare) // spec.cpus_per_actor)
        default = int((cpus - 2) // spec.cpus_per_actor)
        short = (f"the Ray cluster has {cpus:g} CPUs: {spec.min_actors} annotator actor(s) of --cpus-per-actor "
                 f"{spec.cpus_per_actor:g} plus {spare} for the other steps")
    size = spec.max_actors if spec.max_actors is not None else max(spec.min_actors, min(fit, default))
    if spec.min_actors > fit:
        if not can_grow:
            raise LabelError(short + (" (run with --gpus-per-actor 0 to label on CPUs)" if spec.gpus_per_actor
                                      else f" do not fit (at most {max(fit, 0)} actors) on this Ray, which this "
                                      "process started: start it with more logical CPUs, e.g. ray.init(num_cpus="
                                      f"{math.ceil(spec.min_actors * spec.cpus_per_actor + spare)}), as jobs.label "
                                      "does by itself"))
        # --max-actors alone sets how far the pool grows on the nodes the autoscaler adds: without it the
        # maximum is what fits now, so a cluster that starts with no GPU node runs one GPU actor
        grow = (f"the pool may grow to --max-actors {size} actors" if spec.max_actors is not None else
                f"without --max-actors the pool grows to at most {size} actor(s), what fits now: --max-actors sets "
                "how many actors it may grow to on the nodes the autoscaler adds")
        warn(f"warning: {short}{'' if spec.gpus_per_actor else ' do not fit'} now; waiting for the autoscaler "
             f"to add nodes; {grow}")
    return spec.min_actors, size


def check_decode_fits(spec: LabelSpec, faces: dict, pre_dicts: list[dict], can_grow: bool | None = None,
                      warn=print) -> None:
    """A decode task reserves memory that grows with ``--batch-size`` (raytasks.label.decoding.decode_memory),
    and Ray never schedules a task that asks for more than any node offers: the job would wait for ever. On a
    Ray this process started that is an error naming the largest batch size that fits; on a cluster a warning
    (the autoscaler may add a larger node type)."""
    import ray

    from raytasks.label.decoding import decode_memory, largest_batch_within

    can_grow = (not started_here()) if can_grow is None else can_grow
    memory = decode_memory(spec.batch_size, faces, pre_dicts)
    largest = max((n.get("Resources", {}).get("memory", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    if memory <= largest:
        return
    fits = largest_batch_within(largest, faces, pre_dicts)
    short = (f"--batch-size {spec.batch_size}: each decode task reserves {memory / 2**30:.1f} GiB of memory, more "
             f"than the largest node of this Ray offers ({largest / 2**30:.1f} GiB)")
    hint = f"use --batch-size {fits} or less" if fits else "no node has the memory for a task of one photo"
    if not can_grow:
        raise LabelError(f"{short}: {hint}")
    warn(f"warning: {short}; waiting for the autoscaler to add a larger node ({hint} for the nodes there are)")
