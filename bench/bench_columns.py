"""What the per-face quality columns cost (issue #21: goal <= 5 % of label throughput).

    python bench/bench_columns.py [--models hard_sharing,age_gender_race] [--photos 32] [--rounds 5] [--threads 1]

The columns ``face_size``, ``pose_*``, ``sharpness``, ``brightness``, ``review`` and ``review_reasons`` are
computed by ``Annotator._quality`` (a 64 x 64 quality crop per face, then faces/quality.py). This bench runs
``Annotator.annotate`` -- what a label actor and a serving replica run on a decoded batch: detection, alignment,
every model, the quality columns, the rows -- on the same decoded photos twice per round, once as shipped and
once with ``_quality`` answering empty columns, in turn (AB BA AB ...) so that a busy machine slows both alike
and neither always runs first.
Reported per model: photos/s and faces/s of each, the median over rounds of the cost
(time with / time without - 1), and the quality step's own share of the batch, timed inside the same runs (the
steadier of the two figures: the difference of two whole batches carries both batches' noise).

The label job's throughput also includes reading and decoding the files, which this leaves out, so the cost
here is an upper bound of the cost in a label job.

Photos: 640 x 480 composed photos (facedata/compose.py) with ``--faces`` (1-4) faces 50-130 px wide, from UTKFace crops of
../shared/data when present (their points found by the detector), else drawn faces. Weights are random (the
cost does not depend on them).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from core.annotator import Annotator  # noqa: E402
from core.rows import QUALITY_FIELDS  # noqa: E402
from facedata.compose import FaceSource, compose  # noqa: E402
from facedata.decode import Photos, decode_batch  # noqa: E402
from facedata.draw import draw_face  # noqa: E402
from models.checkpoint import save_checkpoint  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "utkface"


def sources(n: int = 8) -> tuple[list[FaceSource], str]:
    real = sorted(SHARED.glob("*.jpg"))[:n] if SHARED.is_dir() else []
    if real:
        from faces.detect import FaceDetector

        det, out = FaceDetector(), []
        for p in real:
            img = np.asarray(Image.open(p).convert("RGB"))
            f = det.detect([torch.from_numpy(img.copy()).permute(2, 0, 1)])[0]
            if len(f):
                out.append(FaceSource(img, f.boxes[0].numpy(), f.points[0].numpy()))
        return out, f"{len(out)} UTKFace crops"
    out = []
    for i in range(n):
        img, lab = draw_face(np.random.default_rng([5, i]), (178, 218))
        pts = np.asarray(lab["landmarks"], dtype=np.float64).reshape(5, 2)
        iod = float(np.linalg.norm(pts[1] - pts[0]))
        box = [pts[:, 0].min() - 0.9 * iod, pts[:, 1].min() - iod, pts[:, 0].max() + 0.9 * iod,
               pts[:, 1].max() + 1.2 * iod]
        out.append(FaceSource(img, np.array(box), pts))
    return out, f"{n} drawn faces"


def photos(n: int, srcs: list[FaceSource], faces: tuple[int, int] = (1, 4)) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        c = compose(srcs, 9000 + i, n_faces=faces, canvas=(480, 640), face_width=(50, 130), max_angle=10)
        buf = io.BytesIO()
        Image.fromarray(c.image).save(buf, "JPEG", quality=90)
        out.append((f"photo_{i:03d}.jpg", buf.getvalue()))
    return out


def without_quality(ann: Annotator):
    """``_quality`` answering empty columns: the rows as before, without their cost."""
    def empty(images, found, scales, confidences):
        n = sum(len(f) for f in found if f is not None)
        return {f.name: [None] * n for f in QUALITY_FIELDS}
    return empty


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="hard_sharing,age_gender_race")
    ap.add_argument("--photos", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--faces", default="1,4", help="faces pasted per photo: LO,HI")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    srcs, said = sources()
    lo, hi = (int(v) for v in args.faces.split(","))
    items = photos(args.photos, srcs, (lo, hi))
    batch = decode_batch([n for n, _ in items], [d for _, d in items], Photos())
    print(f"{args.photos} photos of 640x480 with {lo}-{hi} faces from {said}; {args.rounds} rounds; "
          f"torch threads {args.threads}")
    print("| model | faces | photos/s with | photos/s without | faces/s with | cost (median, min-max) | quality step |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            torch.manual_seed(0)
            uri = str(Path(tmp) / f"{name}.pt")
            save_checkpoint(models.create_model(name).eval(), uri)
            ann = Annotator(uri, faces={"mode": "detect"}, device="cpu", precision="fp32", threads=args.threads)
            shipped, empty = ann._quality, without_quality(ann)
            spent = []

            def timed_quality(*a, _shipped=shipped, _spent=spent):
                t = time.perf_counter()
                out = _shipped(*a)
                _spent.append(time.perf_counter() - t)
                return out

            ann._quality = timed_quality
            faces = sum(1 for f in ann.annotate(batch)["face"] if f is not None)  # warm-up
            spent.clear()
            with_s, without_s = [], []
            for r in range(args.rounds):
                pair = ((timed_quality, with_s), (empty, without_s))
                for variant, times in pair if r % 2 == 0 else pair[::-1]:  # ABBA: neither goes first always
                    ann._quality = variant
                    t = time.perf_counter()
                    ann.annotate(batch)
                    times.append(time.perf_counter() - t)
            costs = sorted(w / o - 1 for w, o in zip(with_s, without_s))
            w, o = statistics.median(with_s), statistics.median(without_s)
            share = statistics.median(spent) / w
            print(f"| {name} | {faces} | {args.photos / w:.2f} | {args.photos / o:.2f} | {faces / w:.1f} | "
                  f"{100 * statistics.median(costs):+.1f} % ({100 * costs[0]:+.1f} to {100 * costs[-1]:+.1f}) | "
                  f"{100 * share:.1f} % of the batch |")


if __name__ == "__main__":
    main()
