"""Benchmark of photos with faces (issue #10): what one image costs at each stage, and the label job end to
end with detection against detection + alignment + model alone on pre-decoded images, in one run.

    python bench/bench_faces.py [--model age_gender_race] [--n 64] [--batch-size 16] [--threads 2]
                                [--actor-decode] [--cpu-accounting]

Photos: ``--n`` JPEGs composed from real faces in ../shared/data/utkface when present (drawn faces otherwise),
1-3 faces each, 60-300 px wide, turned up to 20 degrees, on 640-1600 px canvases (facedata/compose.py; ``--canvas
4032,4032`` for photos of a 12 MP phone's width).

Stages, in this process on one torch thread pool (``--threads``), batched by ``--batch-size`` photos:
decode (``models.preprocess.decode_photo``, PIL with JPEG draft), detect (``FaceDetector.detect``: letterbox to
640, RetinaFace, box/point decoding, NMS), align (``faces.align``: similarity + grid_sample, every face) and
the model (bf16 autocast, batch norm folded, as the label job's actors run it). "model only" is detect +
align + model over the pre-decoded batches (``Annotator.annotate``); "end to end" is ``jobs.label`` over
the folder on a local Ray (decode tasks + one predictor actor of ``--threads`` CPUs; with ``--actor-decode``
the actor decodes the JPEGs), from file bytes to Parquet, timed from the job's own summary minus nothing: Ray's start-up is outside, the listing inside.
``--cpu-accounting`` adds the CPU time of every process during that job (bench/cpu_accounting.py) against the
model-only pass's: on a machine whose cores the job keeps busy, it says where the end-to-end time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"


def sources(n: int):
    from PIL import Image

    from facedata.compose import FaceSource
    from faces.detect import FaceDetector

    if (SHARED / "utkface").is_dir():
        import torch

        det = FaceDetector()
        out = []
        for p in sorted((SHARED / "utkface").glob("*.jpg"))[: 4 * n]:
            img = np.asarray(Image.open(p).convert("RGB"))
            f = det.detect([torch.from_numpy(img.copy()).permute(2, 0, 1)])[0]
            if len(f):
                out.append(FaceSource(img, f.boxes[0].numpy(), f.points[0].numpy()))
            if len(out) >= n:
                break
        return out, "UTKFace (../shared/data)"
    from facedata.draw import draw_face

    out = []
    for i in range(n):
        img, lab = draw_face(np.random.default_rng([5, i]), (178, 218))
        pts = np.asarray(lab["landmarks"], dtype=np.float64).reshape(5, 2)
        iod = float(np.linalg.norm(pts[1] - pts[0]))
        box = [pts[:, 0].min() - 0.9 * iod, pts[:, 1].min() - iod, pts[:, 0].max() + 0.9 * iod, pts[:, 1].max() + 0.8 * iod]
        out.append(FaceSource(np.asarray(img), box, pts))
    return out, "drawn faces (facedata/synth.py)"


def cpu_summary(acct, model_cpu: float, n: int) -> str:
    """The label job's CPU in four parts, and what they imply for the end-to-end / model-only ratio when the job
    keeps every core busy (each CPU-second beside the actor's batches is one the model does not get)."""
    parts = {"actor, per batch (decode too with --actor-decode)": 0.0, "actor, start-up (once per actor)": 0.0,
             "decode / read tasks": 0.0, "driver, Ray's own processes, idle workers": 0.0}
    for name, cpu in acct.by_name.items():
        if "AnnotatorActor" in name:
            parts["actor, per batch (decode too with --actor-decode)" if name.endswith(".submit")
                  else "actor, start-up (once per actor)"] += cpu
        elif "read_and_decode" in name:
            parts["decode / read tasks"] += cpu
        else:
            parts["driver, Ray's own processes, idle workers"] += cpu
    lines = [f"{cpu:8.1f} CPU-s {1000 * cpu / n:7.1f} ms a photo  {what}" for what, cpu in parts.items()]
    total = sum(parts.values())
    once = parts["actor, start-up (once per actor)"]
    lines.append(f"model only / this job's CPU: {model_cpu / total:.2f}; without the actor's start-up (a long job): "
                 f"{model_cpu / (total - once):.2f}")
    return "\n".join(lines)


def write_photos(folder: Path, n: int, canvas: tuple[int, int] = (640, 1600)) -> tuple[Path, int, str]:
    """``n`` JPEGs composed as the module docstring says, written to the new ``folder``: ``(folder, faces
    pasted, where the faces came from)``. The photos of this benchmark and of bench_modelset.py."""
    from PIL import Image

    from facedata.compose import compose
    from facedata.synth import encode_jpeg

    src, where = sources(32)
    folder.mkdir()
    truth = 0
    for i in range(n):
        c = compose(src, 1000 + i, n_faces=(1, 3), canvas=canvas, face_width=(60, 300), max_angle=20)
        (folder / f"p{i:04d}.jpg").write_bytes(encode_jpeg(Image.fromarray(c.image)))
        truth += len(c.boxes)
    return folder, truth, where


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="age_gender_race")
    p.add_argument("--n", type=int, default=64, help="photos")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--canvas", default="640,1600", help="the photos' side range in pixels (4032,4032: a phone's width)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-label-job", action="store_true", help="skip the end-to-end Ray run")
    p.add_argument("--cpu-accounting", action="store_true",
                   help="also the CPU time of every process during the label job, by what it did (Linux; "
                        "bench/cpu_accounting.py), against the model-only pass's CPU time")
    p.add_argument("--actor-decode", action="store_true",
                   help="the label job with --actor-decode (JPEGs decoded in the actor, not in CPU tasks)")
    args = p.parse_args(argv)

    import torch

    import models
    from core.annotator import Annotator
    from facedata.decode import Photos, decode_batch
    from models.checkpoint import save_checkpoint
    from models.preprocess import decode_photo

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-faces-"))
    folder, truth, where = write_photos(work / "photos", args.n, tuple(int(v) for v in args.canvas.split(",")))
    files = sorted(folder.iterdir())
    datas = [f.read_bytes() for f in files]
    ckpt = str(work / f"{args.model}.pt")
    save_checkpoint(models.create_model(args.model), ckpt)
    ann = Annotator(ckpt, device="cpu", precision="auto", threads=args.threads)
    finder = ann.finder
    (pred,) = ann.members.values()
    bs = args.batch_size
    print(f"{args.n} photos ({truth} faces pasted, from {where}), {args.model}, batch {bs}, {args.threads} threads")

    # warm-up (first-call costs of oneDNN and the allocator)
    warm = decode_batch([str(f) for f in files[:bs]], datas[:bs], Photos(2048))
    ann.annotate(warm)

    # stage by stage
    t = {"decode": 0.0, "detect": 0.0, "align": 0.0, "model": 0.0}
    faces_found = 0
    decoded_batches = []
    for s in range(0, args.n, bs):
        t0 = time.perf_counter()
        imgs, scales = [], []
        for d in datas[s:s + bs]:
            im, _, sc = decode_photo(d)
            imgs.append(im)
            scales.append(sc)
        t1 = time.perf_counter()
        found = finder.find(imgs, scales)
        t2 = time.perf_counter()
        aligned = finder.aligned(imgs, found, pred.preprocessing, scales)
        t3 = time.perf_counter()
        if len(aligned.owner):
            pred.forward_uint8(aligned.inputs)
        t4 = time.perf_counter()
        t["decode"] += t1 - t0
        t["detect"] += t2 - t1
        t["align"] += t3 - t2
        t["model"] += t4 - t3
        faces_found += len(aligned.owner)
        decoded_batches.append(decode_batch([str(f) for f in files[s:s + bs]], datas[s:s + bs], Photos(2048)))
    print(f"faces found {faces_found} of {truth} pasted")
    print(f"{'stage':<10}{'ms/image':>10}{'ms/face':>10}")
    for k, v in t.items():
        print(f"{k:<10}{1000 * v / args.n:>10.1f}{1000 * v / max(faces_found, 1):>10.1f}")
    total = sum(t.values())
    print(f"{'total':<10}{1000 * total / args.n:>10.1f}{1000 * total / max(faces_found, 1):>10.1f}   "
          f"({args.n / total:.1f} images/s, {faces_found / total:.1f} faces/s)")

    # model only: detect + align + model on pre-decoded batches (what the label job's actor does)
    t0, cpu0 = time.perf_counter(), time.process_time()
    rows = 0
    for b in decoded_batches:
        rows += len(ann.annotate(b)["path"])
    model_only = time.perf_counter() - t0
    model_cpu = time.process_time() - cpu0
    print(f"model only (detect + align + model, pre-decoded): {args.n / model_only:.2f} images/s, "
          f"{faces_found / model_only:.2f} faces/s")
    if args.no_label_job:
        return
    import ray

    from raytasks.label import LabelSpec, label

    ray.init(num_cpus=max(4, args.threads + 2), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = dict(checkpoint=ckpt, input=str(folder), batch_size=bs, max_actors=1, cpus_per_actor=args.threads,
                actor_decode=args.actor_decode)
    label(LabelSpec(output=str(work / "warm"), **spec, limit=bs), echo=lambda *_: None)  # worker processes up
    from cpu_accounting import ProcessCPU

    acct = ProcessCPU() if args.cpu_accounting else contextlib.nullcontext()
    with acct:
        s = label(LabelSpec(output=str(work / "out"), **spec), echo=lambda *_: None)
    e2e = s["seconds"]
    print(f"end to end (jobs.label, bytes -> Parquet): {args.n / e2e:.2f} images/s, {s['faces_total'] / e2e:.2f} "
          f"faces/s over {e2e:.1f} s; ratio to model only {model_only / e2e:.2f} (goal >= 0.85)")
    if args.cpu_accounting:
        print(f"\nCPU during the label job (model only: {model_cpu:.1f} CPU-s, "
              f"{1000 * model_cpu / args.n:.1f} ms a photo, {model_cpu / model_only:.2f} cores):")
        print(acct.table(per=args.n))
        print(cpu_summary(acct, model_cpu, args.n))
    ray.shutdown()


if __name__ == "__main__":
    main()
