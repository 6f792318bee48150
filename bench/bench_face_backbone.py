"""The pretrained face backbone (dlib's ResNet rebuilt in torch, models/dlib_resnet.py) on this CPU:

* forward time per face of the torch network against dlib's own C++ implementation (``--dlib-python``: a
  Python that has ``dlib`` installed, e.g. a throwaway venv with ``pip install dlib-bin``; dlib is not a
  dependency of the project), both on the same 150×150 inputs, one thread, in alternating rounds;
* with ``--utkface DIR`` (and ``--dlib-python``): where dlib's own 150×150 / 25 % chip lies in UTKFace's
  200×200 faces (dlib's HOG detector and 5-point model, CC0, then ``get_face_chip_details``), and how far the
  descriptors of UTKFace faces cut our way are from those of dlib's own chip of the same face;
* training samples/s of ``age_gender_race`` on it: frozen with a cold cache (first epoch), frozen with a
  warm cache (later epochs), partly frozen and fine-tuned end to end.

    python bench/bench_face_backbone.py --threads 1 [--dlib-python /tmp/dlibenv/bin/python] [--utkface DIR]

Prints a markdown table and the command line. Timings are medians over rounds on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DLIB_SCRIPT = r"""
import sys, time, json
import numpy as np, dlib
rec = dlib.face_recognition_model_v1(sys.argv[1])
n, batch, rounds = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
imgs = list(np.load(sys.argv[5]))
rec.compute_face_descriptor(imgs[:batch])  # warm up
out = []
for _ in range(rounds):
    t = time.perf_counter()
    for s in range(0, n, batch):
        chunk = imgs[s:s + batch]
        if batch == 1:
            rec.compute_face_descriptor(chunk[0])
        else:
            rec.compute_face_descriptor(chunk)
    out.append((time.perf_counter() - t) / n * 1000)
print(json.dumps(out))
"""


DLIB_CROP_SCRIPT = r"""
import sys, os, json
import numpy as np, dlib
from PIL import Image
folder, n, models_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sp5 = dlib.shape_predictor(os.path.join(models_dir, "shape_predictor_5_face_landmarks.dat"))
rec = dlib.face_recognition_model_v1(os.path.join(models_dir, "dlib_face_recognition_resnet_model_v1.dat"))
det = dlib.get_frontal_face_detector()
names = sorted(os.listdir(folder))
files = names[7::max(1, len(names) // n)][:n]
rects, dist = [], {"stretch 200->150 (ours)": [], "resize 200->140, 5 px black border": [],
                   "resize 200->160, centre 150": []}
for f in files:
    im = Image.open(os.path.join(folder, f)).convert("RGB")
    img = np.asarray(im)
    dets = det(img, 1)
    if len(dets) != 1:
        continue
    shape = sp5(img, dets[0])
    cd = dlib.get_face_chip_details(shape, 150, 0.25)
    rects.append([cd.rect.left(), cd.rect.top(), cd.rect.right(), cd.rect.bottom(), cd.angle])
    ref = np.array(rec.compute_face_descriptor(dlib.get_face_chip(img, shape, 150, 0.25)))
    pad = np.zeros((150, 150, 3), np.uint8)
    pad[5:145, 5:145] = np.asarray(im.resize((140, 140), Image.BILINEAR))
    cuts = [np.asarray(im.resize((150, 150), Image.BILINEAR)), pad,
            np.asarray(im.resize((160, 160), Image.BILINEAR))[5:155, 5:155]]
    for k, a in zip(dist, cuts):
        d = np.array(rec.compute_face_descriptor(np.ascontiguousarray(a))) - ref
        dist[k].append(float(np.linalg.norm(d)))
a = np.array(rects)
print(json.dumps({"files": len(files), "faces": len(rects),
                  "centre": [float(np.mean((a[:, 0] + a[:, 2]) / 2)), float(np.mean((a[:, 1] + a[:, 3]) / 2))],
                  "width": [float(np.mean(a[:, 2] - a[:, 0])), float(np.std(a[:, 2] - a[:, 0]))],
                  "angle_deg": [float(np.degrees(np.mean(a[:, 4]))), float(np.degrees(np.std(a[:, 4])))],
                  "distance": {k: [float(np.mean(v)), float(np.percentile(v, 90))] for k, v in dist.items()}}))
"""


def faces(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 150, 150, 3), dtype=np.uint8)


def torch_ms_per_face(net, imgs: np.ndarray, batch: int) -> float:
    from models.dlib_resnet import MEAN_RGB, SCALE

    x = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() - torch.tensor(MEAN_RGB).view(1, 3, 1, 1)) / SCALE
    t = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(x), batch):
            net(x[s : s + batch])
    return (time.perf_counter() - t) / len(x) * 1000


def train_rate(model, steps: int, batch: int, repeat_same: bool) -> float:
    """Samples/s of engine.train_step on random uint8 faces; ``repeat_same`` feeds the same batches again
    (a warm cache: what a frozen trunk sees from its second epoch on)."""
    from core import engine

    rng = np.random.default_rng(1)
    batches = [{"image": rng.integers(0, 256, (batch, 3, 150, 150), dtype=np.uint8),
                "t:age": rng.integers(0, 90, batch).astype(np.float32),
                "t:gender": rng.integers(0, 2, batch).astype(np.float32),
                "t:race": rng.integers(0, 5, batch).astype(np.float32)} for _ in range(steps)]
    model.train()
    opt = engine.make_optimizer(model, model.recipe)
    dev = torch.device("cpu")
    engine.train_step(model, batches[0], opt, dev)  # warm up (and fill the cache with batch 0)
    if repeat_same:
        for b in batches:
            engine.train_step(model, b, opt, dev)
    t = time.perf_counter()
    for b in batches:
        engine.train_step(model, b, opt, dev)
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=64, help="faces per forward-time round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dlib-python", default=None, help="a python with dlib installed, for dlib's own timing")
    ap.add_argument("--utkface", default=None, help="UTKFace folder: measure our crop against dlib's chip")
    ap.add_argument("--utkface-n", type=int, default=200)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--train-batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import models
    from models import dlib_resnet

    path = dlib_resnet.package_file()
    if path is None:
        sys.exit("face-recognition-models==0.3.0 is not installed: nothing to measure")
    net, _ = dlib_resnet.dlib_face_resnet("package")
    net.eval()
    imgs = faces(args.n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        npy = Path(tmp) / "faces.npy"
        np.save(npy, imgs)
        for batch in (1, 32):
            torch_ms_per_face(net, imgs[:batch], batch)  # warm up
            t_ms, d_ms = [], []
            for _ in range(args.rounds):  # alternate the two implementations
                t_ms.append(torch_ms_per_face(net, imgs, batch))
                if args.dlib_python:
                    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
                    out = subprocess.run([args.dlib_python, "-c", DLIB_SCRIPT, str(path), str(args.n), str(batch), "1",
                                          str(npy)], capture_output=True, text=True, env=env, check=True)
                    d_ms += json.loads(out.stdout)
            row = {"what": f"forward, batch {batch}", "torch_ms": statistics.median(t_ms)}
            if d_ms:
                row["dlib_ms"] = statistics.median(d_ms)
            rows.append(row)

    crop = None
    if args.utkface and args.dlib_python:
        out = subprocess.run([args.dlib_python, "-c", DLIB_CROP_SCRIPT, args.utkface, str(args.utkface_n),
                              str(path.parent)], capture_output=True, text=True, check=True)
        crop = json.loads(out.stdout)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rates = {}
        for name, kw, warm in (("frozen, cold cache (first epoch)", {}, False),
                               ("frozen, warm cache (later epochs)", {}, True),
                               ("partly frozen (stem..level2 fixed: backbone_freeze=4)", {"backbone_freeze": 4}, False),
                               ("fine-tuned end to end (backbone_freeze=none)", {"backbone_freeze": "none"}, False)):
            torch.manual_seed(0)
            m = models.create_model("age_gender_race", **kw)
            rates[name] = train_rate(m, args.train_steps, args.train_batch, warm)

    print(f"command: python bench/bench_face_backbone.py {' '.join(sys.argv[1:])}")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs")
    print("\n| dlib face ResNet, 150x150 | torch (ms/face) | dlib C++ (ms/face) | dlib / torch |")
    print("|---|---|---|---|")
    for r in rows:
        d = r.get("dlib_ms")
        print(f"| {r['what']} | {r['torch_ms']:.1f} | {d:.1f} | {d / r['torch_ms']:.1f}x |" if d
              else f"| {r['what']} | {r['torch_ms']:.1f} | not measured | |")
    if crop:
        print(f"\nUTKFace: dlib found one face in {crop['faces']} of {crop['files']} files; dlib's 150/0.25 chip in "
              f"UTKFace pixels: centre ({crop['centre'][0]:.1f}, {crop['centre'][1]:.1f}), width "
              f"{crop['width'][0]:.1f} ± {crop['width'][1]:.1f} px, angle {crop['angle_deg'][0]:.2f} ± "
              f"{crop['angle_deg'][1]:.2f} deg")
        print("\n| UTKFace face cut as | descriptor distance to dlib's own chip: mean | 90th percentile |")
        print("|---|---|---|")
        for k, (mean, p90) in crop["distance"].items():
            print(f"| {k} | {mean:.3f} | {p90:.3f} |")
    print(f"\n| age_gender_race training step, batch {args.train_batch} | samples/s |")
    print("|---|---|")
    for k, v in rates.items():
        print(f"| {k} | {v:.1f} |")


if __name__ == "__main__":
    main()
