"""The OpenMP setting every Ray process that runs the models gets, and why.

Ray runs user code off the process's main thread: Ray Data's actor UDFs (the label job's predictor), Ray
Train's training function and Ray Serve's replicas all call PyTorch from a worker thread. PyTorch's CPU
kernels use OpenMP (GNU libgomp in the PyPI wheels). libgomp counts every thread it manages, the process's
initial thread included; when a pool is started from another thread and the count goes over the CPUs the
process may use (always the case when the torch threads equal the actor's CPUs), it "throttles": idle
workers spin 1,000 times instead of 300,000 before they sleep on a futex, so each of the thousand-odd
parallel regions of a ResNet-50 forward pass waits for a wake-up. Measured on the 2-core machine of
docs/benchmarks.md (age_gender_race, bf16, batch 1, 2 torch threads): 19 ms from the main thread, 25-40 ms
from a worker thread, 18.3 ms from a worker thread with ``GOMP_SPINCOUNT=300000``.

``GOMP_SPINCOUNT`` is read once, when libgomp loads (when the process first imports torch), so it must be
in the environment the worker process starts with: :func:`runtime_env` gives the ``runtime_env`` for the
actors (Ray Data ``map_batches``, Serve ``ray_actor_options``, Ray Train ``RunConfig.worker_runtime_env``).
300,000 is libgomp's own default for the unthrottled case, so an idle pool still goes to sleep within a
fraction of a millisecond. A value the user set (in the driver's environment) wins; ``OMP_WAIT_POLICY``
set by the user disables ours, since libgomp derives the spin count from it.
"""

from __future__ import annotations

import os

SPINCOUNT = "300000"


def omp_env() -> dict[str, str]:
    """Environment variables for model worker processes (see the module docstring)."""
    if "GOMP_SPINCOUNT" in os.environ:
        return {"GOMP_SPINCOUNT": os.environ["GOMP_SPINCOUNT"]}
    if "OMP_WAIT_POLICY" in os.environ:
        return {}
    return {"GOMP_SPINCOUNT": SPINCOUNT}


def runtime_env(base: dict | None = None) -> dict:
    """``base`` (a runtime_env dict or None) with :func:`omp_env` added to its ``env_vars`` (base's own
    values win)."""
    env = dict(base or {})
    env["env_vars"] = {**omp_env(), **(env.get("env_vars") or {})}
    return env
