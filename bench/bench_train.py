"""Training throughput: Ray Train (``raytasks.train``) against the same loop in plain PyTorch, side by side.

    python bench/bench_train.py [--models all] [--steps 6] [--batch-size 8] [--threads 1] [--n 96]

For every model, at its default input size, on synthetic faces of its dataset format (CelebA for dmm_cnn,
task_attention and hard_sharing; UTKFace for age_gender_race and hmtnet), in one run:

1. plain: this process, ``torch.set_num_threads(--threads)``, the loop of ``engine.fit``
   (``core.batches.iter_batches`` decoding inline, ``engine.train_step``), 2 epochs of ``--steps`` steps;
2. ray x1: ``raytasks.train.run`` with one TorchTrainer worker of ``--threads`` CPUs and threads (Ray Data
   decoding in its own tasks), 2 epochs of ``--steps`` steps;
3. ray x2: two workers of ``--threads`` CPUs and threads each (DDP over gloo), the same global batch.

The default of one thread per process is deliberate on a shared machine: with more OpenMP threads than free
cores, torch slows down ten-fold and more (measured here: hard_sharing 200 samples/s on 1 thread, 9-17 on 2).

Figures are training samples/s (validation excluded) of the second epoch, once over the whole epoch and once
"steady" (from the end of the epoch's first step, so the start of the epoch's data pipeline is left out).
Ray's overhead = 1 - ray x1 / plain (goal: under 5 %). The start-up of the worker group (tens of seconds on a
busy 2-core machine) is reported apart, as the wall time of each ``run``. Weights are random (the cost of a
step does not depend on them). Timings on a shared machine are noisy: compare the columns of one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from core import engine  # noqa: E402
from core.batches import iter_batches  # noqa: E402
from facedata import synth  # noqa: E402
from facedata.datasets import DATASET_MODELS  # noqa: E402
from raytasks.train import TrainSpec, prepare, run  # noqa: E402


def dataset_format(model: str) -> str:
    for fmt, names in DATASET_MODELS.items():
        if model in names:
            return fmt
    raise SystemExit(f"no synthetic dataset format trains {model}")


def plain_loop(model, recipe, table, steps: int, threads: int, seed: int = 0) -> dict:
    """engine.fit's training loop, 2 epochs of ``steps`` steps; figures of the second epoch."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device("cpu")
    model.to(dev).train()
    opt = engine.make_optimizer(model, recipe)
    out = {}
    for epoch in (1, 2):
        t0, t_first, n, n_first = time.perf_counter(), None, 0, 0
        for i, batch in enumerate(iter_batches(table, model, recipe.batch_size, train=True, seed=seed,
                                                      epoch=epoch)):
            if i >= steps:
                break
            engine.train_step(model, batch, opt, dev)
            n += len(batch["image"])
            if t_first is None:
                t_first, n_first = time.perf_counter(), n
        t_end = time.perf_counter()
        out = {"samples_per_s": n / (t_end - t0),
               "steady_samples_per_s": (n - n_first) / (t_end - t_first) if n > n_first else float("nan")}
    return out


def ray_run(spec: TrainSpec, prepared) -> dict:
    t0 = time.perf_counter()
    outcome = run(spec, log_fn=lambda msg: None, prepared=prepared)
    last = outcome.history[-1]
    return {"samples_per_s": last["samples_per_s"], "steady_samples_per_s": last["steady_samples_per_s"],
            "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="all", help="comma-separated model names, or all")
    p.add_argument("--steps", type=int, default=6, help="optimisation steps per epoch (2 epochs)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch of one step")
    p.add_argument("--threads", type=int, default=1, help="torch threads (and CPUs) of the plain loop and of each worker")
    p.add_argument("--n", type=int, default=96, help="synthetic faces per format (80%% train)")
    p.add_argument("--no-two-workers", action="store_true", help="skip ray x2")
    args = p.parse_args(argv)
    names = models.list_models() if args.models == "all" else args.models.split(",")
    for name in names:
        models.model_class(name)

    import ray

    ray.init(num_cpus=2 * args.threads + 2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    data: dict[str, str] = {}
    rows = []
    for name in names:
        fmt = dataset_format(name)
        if fmt not in data:
            data[fmt] = synth.generate(fmt, args.n, str(tmp / fmt), seed=0)
        base = TrainSpec(model=name, data=f"{fmt}:{data[fmt]}", storage=str(tmp / "runs"), name=name,
                         output=str(tmp / f"{name}.pt"), recipe={"epochs": 2, "batch_size": args.batch_size,
                                                                 "early_stopping_patience": None},
                         steps_per_epoch=args.steps, val_limit=args.batch_size, keep=1)
        prepared = prepare(base)
        model, recipe, train, _ = prepared
        size = "x".join(map(str, model.preprocessing.size))
        print(f"{name} ({size}, batch {args.batch_size}, {args.steps} steps/epoch)", flush=True)
        plain = plain_loop(model, recipe, train, args.steps, args.threads)
        print(f"  plain   {plain['steady_samples_per_s']:.2f} samples/s steady", flush=True)
        one = dataclasses.replace(base, name=f"{name}-x1", workers=1, cpus_per_worker=args.threads,
                                  threads=args.threads)
        r1 = ray_run(one, prepare(one))
        print(f"  ray x1  {r1['steady_samples_per_s']:.2f} samples/s steady ({r1['wall_s']:.0f} s wall)", flush=True)
        r2 = None
        if not args.no_two_workers:
            two = dataclasses.replace(base, name=f"{name}-x2", workers=2, cpus_per_worker=args.threads,
                                      threads=args.threads)
            r2 = ray_run(two, prepare(two))
            print(f"  ray x2  {r2['steady_samples_per_s']:.2f} samples/s steady ({r2['wall_s']:.0f} s wall)",
                  flush=True)
        rows.append((name, size, plain, r1, r2))
    ray.shutdown()

    cmd = "python bench/bench_train.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"\n{dt.date.today()} · {platform.machine()} · {os.cpu_count()} CPUs · torch {torch.__version__} · "
          f"ray {ray.__version__} · {args.threads} threads · batch {args.batch_size} · {args.steps} steps/epoch, "
          f"figures of epoch 2")
    print(f"command: {cmd.strip()}\n")
    print("| model | input | plain samples/s (epoch / steady) | Ray x1 (epoch / steady) | Ray overhead (steady) "
          "| Ray x2 (epoch / steady) | x2 / x1 (steady) | run wall s (x1 / x2) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, size, plain, r1, r2 in rows:
        overhead = 1 - r1["steady_samples_per_s"] / plain["steady_samples_per_s"]
        two = f"{r2['samples_per_s']:.2f} / {r2['steady_samples_per_s']:.2f}" if r2 else "-"
        ratio = f"{r2['steady_samples_per_s'] / r1['steady_samples_per_s']:.2f}" if r2 else "-"
        wall = f"{r1['wall_s']:.0f} / {r2['wall_s']:.0f}" if r2 else f"{r1['wall_s']:.0f} / -"
        print(f"| {name} | {size} | {plain['samples_per_s']:.2f} / {plain['steady_samples_per_s']:.2f} "
              f"| {r1['samples_per_s']:.2f} / {r1['steady_samples_per_s']:.2f} | {overhead:+.1%} | {two} | {ratio} "
              f"| {wall} |")
    if not np.isfinite([r[2]["steady_samples_per_s"] for r in rows]).all():
        print("\n(steady figures need at least 2 steps per epoch)")


if __name__ == "__main__":
    main()
