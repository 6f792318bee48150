"""Benchmark of a set of models in one pass (issue #14): the label job with three checkpoints at once against
three single-model label jobs over the same folder, in the same run.

    python bench/bench_modelset.py [--n 48] [--batch-size 16] [--threads 2] [--embedding] [--no-ray]

Photos: ``--n`` JPEGs composed as in bench/bench_faces.py (real UTKFace faces when ../shared/data is present,
1-3 faces each, 60-300 px wide, on 640-1600 px canvases). Models: the three configurations trained in
docs/results.md that read different crops: ``hard_sharing`` (50×50 grey), ``dmm_cnn`` (ResNet-18 trunk,
64×64) and ``age_gender_race`` (dlib's face ResNet, 150×150), random weights (the cost does not depend on them).

"label job": ``jobs.label``'s pipeline on a local Ray (decode tasks + one predictor actor of ``--threads``
CPUs), each run from file bytes to Parquet, timed by the job's own summary (Ray's start-up outside, listing
inside); one warm-up run first so that worker processes exist. The three single passes and the set pass
run in turn, then again in the opposite order, and each figure is the sum over both rounds.

"in process" (``--no-ray`` runs only this; it is what runs on a GPU machine without Ray): decode
(``facedata.decode.decode_batch``), then either each model's own ``Annotator.annotate`` (detection again for
every model, as three jobs would) or one ``Annotator.annotate`` of the set; decode is counted three times for the three
passes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODELS = (("hard_sharing", {}), ("dmm_cnn", {"depth": 18, "image_size": 64}), ("age_gender_race", {}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=48, help="photos")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--embedding", action="store_true", help="the set also computes the face embedding")
    p.add_argument("--no-ray", action="store_true", help="only the in-process comparison")
    p.add_argument("--device", default=None, help="in process: cpu or cuda (default: cuda when present)")
    args = p.parse_args(argv)

    import torch
    from bench_faces import write_photos

    import models
    from core.annotator import Annotator
    from core.modelset import ModelSet
    from facedata.decode import Photos, decode_batch
    from models.checkpoint import save_checkpoint

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-set-"))
    folder, truth, where = write_photos(work / "photos", args.n)
    ckpts = {}
    for name, kw in MODELS:
        ckpts[name] = str(work / f"{name}.pt")
        save_checkpoint(models.create_model(name, **kw), ckpts[name])
    bs = args.batch_size
    print(f"{args.n} photos ({truth} faces pasted, from {where}); models {', '.join(ckpts)}"
          f"{' + embedding' if args.embedding else ''}; batch {bs}; {args.threads} threads")

    # --- in process ---------------------------------------------------------------------------------------
    files = sorted(folder.iterdir())
    datas = [f.read_bytes() for f in files]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    singles = [Annotator(c, device=device, precision="auto") for c in ckpts.values()]
    model_set = ModelSet.parse(list(ckpts.values()), embedding=args.embedding)
    sp = Annotator(model_set, device=device, precision="auto")

    def decode_all():
        return [decode_batch([str(f) for f in files[s:s + bs]], datas[s:s + bs], Photos(2048)) for s in range(0, args.n, bs)]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    warm = decode_all()[:1]
    for pred in singles + [sp]:
        pred.annotate(warm[0])
    t0 = time.perf_counter()
    batches = decode_all()
    t_decode = time.perf_counter() - t0
    t_single = []
    for pred in singles:
        t0 = time.perf_counter()
        for b in batches:
            pred.annotate(b)
        sync()
        t_single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    rows = 0
    for b in batches:
        rows += len(sp.annotate(b)["path"])
    sync()
    t_set = time.perf_counter() - t0
    three = 3 * t_decode + sum(t_single)
    one = t_decode + t_set
    print(f"in process on {device}: decode {1000 * t_decode / args.n:.1f} ms/photo; single models "
          + ", ".join(f"{n} {1000 * t / args.n:.1f}" for n, t in zip(ckpts, t_single))
          + f" ms/photo (detect+align+model); set {1000 * t_set / args.n:.1f} ms/photo")
    print(f"in process: three passes {args.n / three:.2f} photos/s, one pass {args.n / one:.2f} photos/s "
          f"({rows} rows): one pass costs {one / three:.2f} of three")
    if args.no_ray:
        return

    # --- the label job ------------------------------------------------------------------------------------
    import ray

    from raytasks.label import LabelSpec, label

    ray.init(num_cpus=max(4, args.threads + 2), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    common = dict(input=str(folder), batch_size=bs, max_actors=1, cpus_per_actor=args.threads)
    set_spec = dict(checkpoint=tuple(f"{n}={c}" for n, c in ckpts.items()), embedding=args.embedding)
    label(LabelSpec(checkpoint=ckpts["hard_sharing"], output=str(work / "warm"), limit=bs, **common),
          echo=lambda *_: None)
    totals = {n: 0.0 for n in ckpts} | {"set": 0.0}
    runs = [(n, {"checkpoint": c}) for n, c in ckpts.items()] + [("set", set_spec)]
    for r, order in enumerate((runs, runs[::-1])):
        for name, spec in order:
            s = label(LabelSpec(output=str(work / f"out-{name}-{r}"), **common, **spec), echo=lambda *_: None)
            assert s["complete"], s
            totals[name] += s["seconds"]
            print(f"  round {r + 1}: {name:<16} {s['seconds']:7.1f} s  {s['images_per_s']:6.2f} images/s  "
                  f"{s['rows_total']} rows")
    three = sum(totals[n] for n in ckpts)
    print(f"label job: three single-model passes {2 * args.n / three:.2f} photos/s ({three:.1f} s for both rounds), "
          f"one pass with the set {2 * args.n / totals['set']:.2f} photos/s ({totals['set']:.1f} s): one pass costs "
          f"{totals['set'] / three:.2f} of three (goal < 0.6)")
    ray.shutdown()


if __name__ == "__main__":
    main()
