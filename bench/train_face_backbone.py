"""Train ``age_gender_race`` on UTKFace in this process (``engine.fit``, the loop Ray Train's workers run,
without Ray) and save a project checkpoint, for docs/results.md runs on a machine where a Ray run is not
affordable or not safe (a shared machine).

    python bench/train_face_backbone.py --data ../shared/data/utkface --out /tmp/agr_dlib.pt \\
        --limit 6000 --val-limit 1000 --epochs 2 [--model-arg backbone_freeze=none] [--init-from CKPT]
    python -m jobs.evaluate --checkpoint /tmp/agr_dlib.pt --data utkface:../shared/data/utkface --split test

Prints one line per epoch and the wall time. The checkpoint is the last epoch's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=None, help="first N training faces of the seeded split")
    ap.add_argument("--val-limit", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--init-from", default=None, help="a project checkpoint whose weights start the model")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import models
    from core.engine import fit
    from facedata.datasets import read_dataset
    from models.checkpoint import load_checkpoint, save_checkpoint

    kw = {}
    for item in args.model_arg:
        k, _, v = item.partition("=")
        try:
            kw[k] = json.loads(v)
        except json.JSONDecodeError:
            kw[k] = v
    ds = read_dataset(f"utkface:{args.data}")
    train, val = ds.split("train"), ds.split("val")
    train = train.iloc[: args.limit] if args.limit else train
    val = val.iloc[: args.val_limit] if args.val_limit else val
    model = models.create_model("age_gender_race", **kw)
    if args.init_from:
        src, _ = load_checkpoint(args.init_from)
        model.load_state_dict(src.state_dict())
    print(f"age_gender_race {kw}: {len(train)} train / {len(val)} val faces, {args.epochs} epochs, "
          f"{args.threads} threads", flush=True)
    t0 = time.perf_counter()
    history = fit(model, train, val, epochs=args.epochs, log_fn=lambda s: print(s, flush=True))
    save_checkpoint(model, args.out, metrics={k: v for k, v in history[-1].items() if isinstance(v, float)})
    print(f"wall {time.perf_counter() - t0:.0f} s; checkpoint {args.out}", flush=True)


if __name__ == "__main__":
    main()
