"""Evaluate a checkpoint on a dataset with each paper's metrics.

    python -m jobs.evaluate --checkpoint CKPT --data FORMAT:PATH [--split test] [--json OUT] [--faces detect]

Prints per-attribute and mean accuracy (with the checkpoint's thresholds), MAE / RMSE / Pearson for
scores, age MAE / RMSE and class accuracy; ``--json OUT`` writes a flat object ``{"<output>.<metric>":
number, ..., "mean_accuracy": number}``. ``--faces detect`` measures the model the way a user meets it: the
detector finds the face in each image and the model reads its aligned crop (faces/finder.py); images in
which no face is found are left out and counted (``images_without_face``). The default, ``whole``, feeds each
image whole, as training did.
"""

from __future__ import annotations

import argparse
import json
import sys

from core.engine import evaluate_table
from facedata import storage
from facedata.datasets import read_dataset
from jobs._cli import add_face_args, face_options
from models.checkpoint import load_checkpoint


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint path or s3:// URI")
    p.add_argument("--data", required=True, help="FORMAT:PATH, e.g. celeba:../shared/data/celeba")
    p.add_argument("--split", default="test", help="train, val, test or all (default test; val if no test rows)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the split when the data has none")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    p.add_argument("--json", default=None, help="write the metrics as a flat JSON object here (path or s3://)")
    add_face_args(p, default_mode="whole")
    args = p.parse_args(argv)

    model, info = load_checkpoint(args.checkpoint)
    ds = read_dataset(args.data, seed=args.seed)
    table = ds.table if args.split == "all" else ds.split(args.split)
    if len(table) == 0 and args.split == "test":
        table = ds.split("val")
        print("no test rows: evaluating on the validation split", file=sys.stderr)
    if len(table) == 0:
        p.error(f"no rows in split {args.split!r} of {args.data}")
    if args.limit:
        table = table.iloc[: args.limit]
    decode_fn = None
    if args.faces == "detect":
        from faces.finder import FaceFinder, FaceOptions, decode_face

        finder = FaceFinder(FaceOptions.from_dict(face_options(args)))
        decode_fn = lambda data, pre: decode_face(data, pre, finder)  # noqa: E731
    metrics = evaluate_table(model, table, batch_size=args.batch_size, decode_fn=decode_fn)
    if decode_fn is not None:
        metrics["images_without_face"] = float(len(table) - metrics["n_images"])
    print(f"model {info.model}  checkpoint {info.short_hash()}  data {args.data}  split {args.split}  "
          f"images {int(metrics['n_images'])}")
    width = max(len(k) for k in metrics)
    for k in sorted(metrics):
        print(f"  {k:<{width}}  {metrics[k]:.4f}")
    if args.json:
        storage.write_bytes(args.json, json.dumps(metrics, indent=2, sort_keys=True).encode())
    return metrics


if __name__ == "__main__":
    main()
