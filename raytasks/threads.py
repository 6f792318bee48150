"""Where the model runs inside a Ray worker process: a worker of its own, and one torch thread.

Two things were measured on the 2-core machine of docs/benchmarks.md:

1. **A model actor in a worker process of its own is faster.** Label job, dmm_cnn, batch 64, compiled,
   end to end / model only (``bench/bench_label.py``, one run each): 0.74 with the annotator actors in
   Ray's shared worker processes, 0.85 with a runtime_env of their own (a dummy variable) and 0.90, 0.95 and
   1.02 with this module's variable. Ray keys worker processes by runtime_env, so a runtime_env of their
   own gives the model actors fresh processes that have run nothing else. Why a shared worker is slower was
   not pinned down. One candidate was measured: once a process's main thread has run a parallel torch
   op, torch on another thread of that process runs slower (ResNet-50 of age_gender_race, batch 1, 2 threads:
   20.9 ms, 32.4 ms after a ``torch.zeros(10**6).add_(1)`` on the main thread; ``bench/probe_threads.py``). GNU libgomp, PyTorch's
   OpenMP, then manages two thread pools, and with more OpenMP threads than CPUs it lets idle workers spin
   only 100 times before they sleep, instead of 300,000. Ray calls actor methods, Serve replicas and
   Ray Train's loop off the main thread.
2. **One thread for all torch work** (:func:`torch_executor`: Serve's ``AnnotatorServer`` and the label job's
   ``AnnotatorActor``): one OpenMP pool. Ray runs an actor's constructor on the main thread and its
   methods on others, so a model loaded in the constructor and called in the methods had two.

:func:`runtime_env` is the runtime_env of model actors (the label job's annotator actors, Serve's model
replicas). Its variable only marks them (``FACEATTR_MODEL_WORKER=1``). A correction to commit f5f5391,
which set ``GOMP_SPINCOUNT=300000`` here: that is libgomp's own default when ``OMP_WAIT_POLICY`` is unset,
and it does not lift the throttled count of 100 spins. A direct test showed no effect (the two-pool row of
``bench/probe_threads.py``: 32.4 ms without, 34.9 ms with it). The gain measured with it came from the
separate process.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

MODEL_WORKER_ENV = {"FACEATTR_MODEL_WORKER": "1"}


def runtime_env(base: dict | None = None) -> dict:
    """``base`` (a runtime_env dict or None) with the model-worker marker added to its ``env_vars`` (base's
    own values win)."""
    env = dict(base or {})
    env["env_vars"] = {**MODEL_WORKER_ENV, **(env.get("env_vars") or {})}
    return env


def torch_executor(name: str) -> ThreadPoolExecutor:
    """One thread for all of a model process's torch work: the checkpoint loading, the checks and warm-up
    passes at start, every forward pass. Ray runs an actor's constructor on the process's main thread and
    its methods on other threads; torch on both makes two OpenMP pools, 19 -> 32 ms per forward pass
    (``bench/probe_threads.py``)."""
    return ThreadPoolExecutor(1, thread_name_prefix=name)
