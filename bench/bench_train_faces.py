"""What ``jobs.train --faces detect`` costs: the first detection pass over a data set, the same pass when
every detection is in the cache (a later run), and one epoch's decode + alignment from the cached faces
(what every epoch's Ray Data tasks do), next to the whole-image decode of ``--faces whole``.

    python bench/bench_train_faces.py --data manifest:../shared/data/lfw_gender/labels.csv --n 100 --rounds 3

Prints photos/s for each (median and every round, the rounds interleaved: the machine may be shared), with
the command and the load average. The caches are written to temporary folders and removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import models  # noqa: E402
from core.batches import iter_batches  # noqa: E402
from facedata.datasets import read_dataset  # noqa: E402
from faces.facecache import DetectionCache  # noqa: E402
from faces.finder import FaceFinder  # noqa: E402
from faces.trainfaces import find_training_faces  # noqa: E402


def one_round(table, model, finder) -> dict:
    """One interleaved round: a cold pass into a fresh cache, a later run's pass, a cached epoch and a whole
    epoch; photos/s of each."""
    folder = tempfile.mkdtemp(prefix="bench-faces-")
    try:
        t = time.perf_counter()
        resolved, first = find_training_faces(table, finder, DetectionCache(folder, finder.identity))
        cold = time.perf_counter() - t
        t = time.perf_counter()
        _, again = find_training_faces(table, finder, DetectionCache(folder, finder.identity))
        warm = time.perf_counter() - t
        assert again.detected == 0 and again.cached == first.detected, "the second pass detected again"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    t = time.perf_counter()
    n_epoch = sum(len(b["image"]) for b in iter_batches(resolved, model, 64))
    epoch = time.perf_counter() - t
    t = time.perf_counter()
    n_whole = sum(len(b["image"]) for b in iter_batches(table, model, 64))
    whole = time.perf_counter() - t
    return {"first pass": len(table) / cold, "later run": len(table) / warm, "cached epoch": n_epoch / epoch,
            "whole epoch": n_whole / whole, "used": first.used, "line": first.line()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="FORMAT:URI")
    p.add_argument("--n", type=int, default=100, help="images")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the machine may be shared)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--model", default="hard_sharing", help="the model whose input the epoch is decoded for")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = read_dataset(args.data).table.iloc[: args.n][["path"]]
    model = models.create_model(args.model)
    finder = FaceFinder()
    rounds = [one_round(table, model, finder) for _ in range(args.rounds)]
    print(f"command: python bench/bench_train_faces.py --data {args.data} --n {args.n} --rounds {args.rounds} "
          f"--threads {args.threads} --model {args.model}")
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(rounds[0]["line"])
    what = {"first pass": "read, hash, decode, detect, write the cache",
            "later run": "read, hash, cache hit",
            "cached epoch": f"read, check the hash, decode, align to {args.model}'s input",
            "whole epoch": "read, decode, stretch (--faces whole)"}
    for k, say in what.items():
        vals = sorted(r[k] for r in rounds)
        print(f"{k:<13} {statistics.median(vals):9.1f} photos/s median (rounds: "
              f"{', '.join(f'{v:.1f}' for v in vals)}): {say}")


if __name__ == "__main__":
    main()
