"""Where does a forward pass run slower? One model, one input, timed on different threads and processes.

    python bench/probe_threads.py [--model age_gender_race] [--threads 2] [--batch 1]

Ray runs actor methods (and Serve replicas, and Ray Train's loop) off the process's main thread; this probe
shows what that costs torch (docs/benchmarks.md, serving). It times ``ModelRunner.forward_uint8`` (median of ``--repeat`` calls
after a warm-up) in each of these places, each in a fresh process:

* ``process main``: a plain Python process, main thread;
* ``process thread``: a plain process, a worker thread (nothing on the main thread uses torch);
* ``process thread after main op``: the same after one parallel torch op on the main thread (two OpenMP
  pools in the process);
* ``ray actor main``: a Ray actor's method, which runs on the actor process's main thread;
* ``ray actor thread``: a Ray actor whose torch work all runs on one executor thread (as Serve's
  ``AnnotatorServer`` does);
* ``ray actor thread, OMP_WAIT_POLICY=ACTIVE``: the same with OpenMP workers that never sleep;
* ``serve replica thread``: a Ray Serve replica whose torch work runs on one executor thread.

Random weights; the timing does not depend on them. OpenMP variables in the environment (``GOMP_SPINCOUNT``,
``OMP_WAIT_POLICY``) reach every variant: the child processes and Ray's workers inherit them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def time_forward(ckpt: str, threads: int, batch: int, repeat: int) -> float:
    """Median milliseconds of one forward pass, on the calling thread."""
    import torch

    from core.runner import ModelRunner

    p = ModelRunner(ckpt, device="cpu", threads=threads)
    pre = p.preprocessing
    x = torch.zeros((batch, pre.channels, *pre.size), dtype=torch.uint8)
    for _ in range(3):
        p.forward_uint8(x)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        p.forward_uint8(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _in_process(ckpt: str, args, mode: str) -> float:
    """Run one plain-process variant in a fresh interpreter (``--_child MODE``)."""
    cmd = [sys.executable, __file__, "--_child", mode, "--_ckpt", ckpt, "--threads", str(args.threads),
           "--batch", str(args.batch), "--repeat", str(args.repeat)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return float(out.stdout.strip().splitlines()[-1])


def _child(mode: str, ckpt: str, args) -> None:
    import threading

    import torch

    if mode == "main":
        print(time_forward(ckpt, args.threads, args.batch, args.repeat))
        return
    if mode == "thread_after_main_op":
        torch.zeros(10**6).add_(1)  # a parallel op on the main thread: its OpenMP pool now exists
    result = []
    t = threading.Thread(target=lambda: result.append(time_forward(ckpt, args.threads, args.batch, args.repeat)))
    t.start()
    t.join()
    print(result[0])


def _ray_variants(ckpt: str, args) -> dict[str, float]:
    import ray

    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})

    @ray.remote(num_cpus=args.threads)
    class Probe:
        def on_main(self):
            return time_forward(ckpt, args.threads, args.batch, args.repeat)

        def on_thread(self):
            import concurrent.futures as cf

            with cf.ThreadPoolExecutor(1) as ex:
                return ex.submit(time_forward, ckpt, args.threads, args.batch, args.repeat).result()

    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": args.threads})
    class ServeProbe:
        async def on_thread(self):
            import asyncio
            import concurrent.futures as cf

            with cf.ThreadPoolExecutor(1) as ex:
                return await asyncio.get_running_loop().run_in_executor(
                    ex, time_forward, ckpt, args.threads, args.batch, args.repeat)

    out = {}
    try:
        handle = serve.run(ServeProbe.bind(), name="probe_threads", route_prefix=None)
        out["serve replica thread"] = handle.on_thread.remote().result(timeout_s=300)
        serve.delete("probe_threads")
        for name, env, method in (("ray actor main", {}, "on_main"), ("ray actor thread", {}, "on_thread"),
                                  ("ray actor thread, OMP_WAIT_POLICY=ACTIVE", {"OMP_WAIT_POLICY": "ACTIVE"},
                                   "on_thread")):
            actor = Probe.options(runtime_env={"env_vars": env} if env else None).remote()
            out[name] = ray.get(getattr(actor, method).remote())
            ray.kill(actor)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="age_gender_race")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_ckpt", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        _child(args._child, args._ckpt, args)
        return {}
    import torch

    import models
    from models.checkpoint import save_checkpoint

    ckpt = os.path.join(tempfile.mkdtemp(prefix="probe_threads_"), f"{args.model}.pt")
    torch.manual_seed(0)
    save_checkpoint(models.create_model(args.model).eval(), ckpt)
    print(f"python bench/probe_threads.py --model {args.model} --threads {args.threads} --batch {args.batch} "
          f"--repeat {args.repeat}  ({os.cpu_count()} CPUs, torch {torch.__version__})")
    results = {
        "process main": _in_process(ckpt, args, "main"),
        "process thread": _in_process(ckpt, args, "thread"),
        "process thread after main op": _in_process(ckpt, args, "thread_after_main_op"),
    }
    results.update(_ray_variants(ckpt, args))
    for name, ms in results.items():
        print(f"{name:<45} {ms:7.1f} ms")
    return results


if __name__ == "__main__":
    main()
