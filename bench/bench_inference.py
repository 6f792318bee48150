"""The model alone, eager vs batch norm folded vs folded and compiled vs folded and mirror-averaged, interleaved
in one process.

    python bench/bench_inference.py [--model dmm_cnn] [--model-arg KEY=VALUE ...] [--batch 32] [--rounds 6]
        [--threads 2]

Four ``core.runner.ModelRunner`` objects on the same random checkpoint (the model's defaults, or a recipe's
input and trunk with ``--model-arg``: ``--model-arg backbone=dlib_resnet --model-arg image_size=150``) (bf16 autocast where
``--precision auto`` gives it, channels_last): ``fold_bn=False``; ``fold_bn=True`` (models/inference.py);
``fold_bn=True, compile_batch=--batch`` (torch.compile); ``fold_bn=True, mirror=True`` (each face read with
its mirror image too, models/preprocess.py: its outputs are averages, so not compared with eager ones). After a warm-up, each round times one
``forward_uint8`` of each on the same uint8 batch, in turn, so that a drift in the machine's speed hits
all four alike. Prints images/s (median over rounds) and the largest difference of the folded and
compiled outputs from the eager ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from core.runner import ModelRunner  # noqa: E402
from jobs._cli import key_value  # noqa: E402
from models.checkpoint import save_checkpoint  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dmm_cnn")
    p.add_argument("--model-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="a constructor argument of the model (as jobs.train's)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ckpt = os.path.join(tempfile.mkdtemp(prefix="bench_inference_"), f"{args.model}.pt")
    save_checkpoint(models.create_model(args.model, **dict(args.model_arg)).eval(), ckpt)
    kw = dict(device="cpu", precision=args.precision, threads=args.threads)
    start = time.perf_counter()
    variants = {"eager": ModelRunner(ckpt, fold_bn=False, **kw), "folded": ModelRunner(ckpt, **kw)}
    variants["folded + compiled"] = ModelRunner(ckpt, compile_batch=args.batch, **kw)
    variants["folded + mirror"] = ModelRunner(ckpt, mirror=True, **kw)
    setup_s = time.perf_counter() - start
    pre = variants["eager"].preprocessing
    x = torch.randint(0, 256, (args.batch, pre.channels, *pre.size), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(1))
    outputs = {name: v.forward_uint8(x) for name, v in variants.items()}  # warm-up, and the outputs compared
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, v in variants.items():
            t = time.perf_counter()
            v.forward_uint8(x)
            times[name].append(time.perf_counter() - t)
    flags = "".join(f" --model-arg {k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in args.model_arg)
    print(f"python bench/bench_inference.py --model {args.model}{flags} --batch {args.batch} --rounds {args.rounds} "
          f"--threads {args.threads} --precision {args.precision}  ({os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {variants['eager'].precision}; set-up incl. compiling {setup_s:.0f} s)")
    print(f"folded: {variants['folded'].folded}; compiled: {variants['folded + compiled'].compile_batch is not None}")
    result = {}
    for name in variants:
        ips = args.batch / statistics.median(times[name])
        if name.endswith("mirror"):
            result[name] = {"images_per_s": ips}
            print(f"{name:<18} {ips:7.1f} images/s   (averages of two readings: not compared)")
            continue
        diff = max(float((outputs[name][k] - outputs["eager"][k]).abs().max()) for k in outputs["eager"])
        result[name] = {"images_per_s": ips, "max_abs_diff_vs_eager": diff}
        print(f"{name:<18} {ips:7.1f} images/s   max |output - eager| {diff:.4f}")
    return result


if __name__ == "__main__":
    main()
