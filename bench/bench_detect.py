"""Face detection: recall, false positives and point error on composed photos, recall on aligned crops,
speed by batch size and precision, and MTCNN beside it when facenet-pytorch can be imported.

    python bench/bench_detect.py [--photos 200] [--crops 200] [--threads 1] [--mtcnn-path DIR]

(a) ``--photos`` photos from :func:`facedata.compose.compose` (0-5 faces each, 40-400 px wide, turned up to
    30 degrees, canvases 320-4000 px) built from real crops of ../shared/data (half UTKFace, half CelebA)
    whose true box and points are the detector's on the crop alone. A face counts as found when a detection
    has IoU >= 0.5 with it (each detection matches one face at most); the others are false positives. Recall
    is also given by the face's width *at detection size* (the letterbox shrinks a 4000 px photo 6.25x).
    Point error: mean distance of the 5 points from the truth over the face's width, for found faces.
(b) ``--crops`` UTKFace 200x200 and CelebA 89x109 aligned crops, whole: the share in which a face is found,
    with the default letterbox (``max_upscale=1``: never enlarged) and with crops enlarged to 640 px.
(c) ms per image at 640 px for batches of 1, 8 and 16, fp32 and bf16 autocast (median of ``--rounds``).
(e) ``--drawn`` faces of :func:`facedata.draw.draw_face` (178x218) alone, and pasted 4 to a 640-1280 px
    canvas at 60-200 px wide, upright: the share found (IoU >= 0.5 with the box found on the face alone).
(d) MTCNN (facenet-pytorch 2.5.3, not a dependency: give ``--mtcnn-path`` where it was installed with
    ``pip install --no-deps --target DIR facenet-pytorch==2.5.3``) on the same photos and its speed at 640 px.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facedata.compose import FaceSource, compose  # noqa: E402
from faces.detect import DetectorConfig, FaceDetector  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
SIZE_BINS = ((0, 16), (16, 24), (24, 32), (32, 64), (64, 1e9))


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous()


def load_crops(n: int, seed: int = 0) -> list[np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    utk = sorted((DATA / "utkface").glob("*.jpg"))
    cel = sorted((DATA / "celeba" / "img_align_celeba").glob("*.jpg"))
    files = [utk[i] for i in rng.choice(len(utk), n // 2, replace=False)]
    files += [cel[i] for i in rng.choice(len(cel), n - n // 2, replace=False)]
    return [np.array(Image.open(f).convert("RGB")) for f in files]


def match(truth: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Index of the detection matched to each true face (greedy by IoU >= 0.5), -1 if none."""
    out = torch.full((len(truth),), -1, dtype=torch.long)
    if len(truth) == 0 or len(boxes) == 0:
        return out
    iou = box_iou(truth, boxes)
    while True:
        v = iou.max()
        if v < 0.5:
            return out
        i, j = divmod(int(iou.argmax()), iou.shape[1])
        out[i] = j
        iou[i, :] = -1
        iou[:, j] = -1


def photos_eval(detect, photos, thresholds=THRESHOLDS, size: int = 640) -> dict:
    """Recall and false positives per image at each threshold, recall by face size, point error."""
    stats = {t: [0, 0, 0] for t in thresholds}  # found, faces, false positives
    by_size = {b: [0, 0] for b in SIZE_BINS}
    errs = []
    seconds = 0.0
    for photo in photos:
        start = time.perf_counter()
        boxes, scores, points = detect(photo.image)
        seconds += time.perf_counter() - start
        truth = torch.tensor(photo.boxes, dtype=torch.float32)
        for t in thresholds:
            keep = scores > t
            m = match(truth, boxes[keep])
            stats[t][0] += int((m >= 0).sum())
            stats[t][1] += len(truth)
            stats[t][2] += int(keep.sum()) - int((m >= 0).sum())
        m = match(truth, boxes[scores > 0.8])
        shrink = min(1.0, size / max(photo.image.shape[:2]))
        for k, j in enumerate(m.tolist()):
            w = float(truth[k, 2] - truth[k, 0]) * shrink
            b = next(b for b in SIZE_BINS if b[0] <= w < b[1])
            by_size[b][0] += j >= 0
            by_size[b][1] += 1
            if j >= 0 and points is not None:
                p = points[scores > 0.8][j]
                errs.append(float((p - torch.tensor(photo.points[k], dtype=torch.float32)).norm(dim=-1).mean())
                            / float(truth[k, 2] - truth[k, 0]))
    return {"stats": stats, "by_size": by_size, "errs": errs, "s_per_photo": seconds / max(1, len(photos))}


def print_eval(name: str, ev: dict, n_photos: int):
    print(f"\n{name}: {n_photos} photos, {ev['s_per_photo']:.2f} s per photo (with letterbox and NMS)")
    print("| threshold | recall | false positives / photo |\n|---|---|---|")
    for t, (f, n, fp) in ev["stats"].items():
        print(f"| {t} | {f}/{n} = {100 * f / max(1, n):.1f} % | {fp / n_photos:.3f} |")
    print("recall at 0.8 by face width at detection size (px): "
          + ", ".join(f"{lo:g}-{hi:g}: {f}/{n}" for (lo, hi), (f, n) in ev["by_size"].items()))
    if ev["errs"]:
        e = np.array(ev["errs"])
        print(f"point error / face width (found faces, 0.8): median {np.median(e):.3f}, p90 "
              f"{np.percentile(e, 90):.3f}, max {e.max():.3f}")


def speed(det: FaceDetector, rounds: int) -> None:
    rng = np.random.default_rng(0)
    imgs = [torch.from_numpy(rng.integers(0, 256, (3, 480, 640), dtype=np.uint8)) for _ in range(16)]
    print("\n| batch | fp32 ms / image | bf16 autocast ms / image |\n|---|---|---|")
    for batch in (1, 8, 16):
        row = []
        for dtype in (None, torch.bfloat16):
            det.dtype = dtype
            det.detect(imgs[:batch])  # warm-up
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                det.detect(imgs[:batch])
                times.append((time.perf_counter() - start) / batch * 1000)
            row.append(statistics.median(times))
        print(f"| {batch} | {row[0]:.0f} | {row[1]:.0f} |")
    det.dtype = None


def drawn_eval(det: FaceDetector, n: int) -> None:
    from facedata.draw import draw_face

    faces = [draw_face(np.random.default_rng([7, i]), (178, 218)) for i in range(n)]
    images = [np.array(im) for im, _ in faces]
    found = det.detect([_t(a) for a in images])
    best = np.array([float(f.scores[0]) if len(f) else 0.0 for f in found])
    print(f"\n(e) drawn faces (facedata.draw.draw_face, 178x218), {n} alone: found at threshold "
          + ", ".join(f"{t}: {(best > t).sum()}/{n}" for t in THRESHOLDS))
    sources = [FaceSource(a, f.boxes[0].numpy(), np.reshape(lab["landmarks"], (5, 2)))
               for a, f, (_, lab) in zip(images, found, faces) if len(f)]
    photos = [compose(sources, 1000 + k, n_faces=(4, 4), canvas=(640, 1280), face_width=(60, 200), max_angle=0)
              for k in range(max(1, n // 4))]

    def ours(image):
        f = det.detect_one(_t(image))
        return f.boxes, f.scores, f.points

    print_eval("(e) drawn faces pasted 4 to a 640-1280 px canvas, 60-200 px wide", photos_eval(ours, photos),
               len(photos))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=200)
    p.add_argument("--crops", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--mtcnn-path", default=None)
    p.add_argument("--drawn", type=int, default=200)
    p.add_argument("--size", type=int, default=DetectorConfig().size, help="detection size for (a), (c), (e)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: photos,crops,speed,mtcnn,drawn")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    print("command: python bench/bench_detect.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    det = FaceDetector(DetectorConfig(size=args.size, threshold=min(THRESHOLDS)))
    print(f"detector {det.weights_hash}, config {DetectorConfig().to_dict()} (run at threshold {min(THRESHOLDS)})")

    photos = []
    if not DATA.is_dir():
        print(f"no real faces at {DATA}: (a), (b) and (d) skipped")
        skip |= {"photos", "crops", "mtcnn"}
    if not skip >= {"photos", "mtcnn"}:
        crops = load_crops(40, seed=1)
        found = det.detect([_t(c) for c in crops])
        sources = [FaceSource(c, f.boxes[0].numpy(), f.points[0].numpy()) for c, f in zip(crops, found) if len(f)]
        photos = [compose(sources, seed) for seed in range(args.photos)]
        n_faces = sum(len(ph.boxes) for ph in photos)
        sides = [max(ph.image.shape[:2]) for ph in photos]
        print(f"\n{len(photos)} composed photos from {len(sources)} real crops: {n_faces} faces, "
              f"longer side {min(sides)}-{max(sides)} px (median {int(np.median(sides))})")

    def ours(image):
        f = det.detect_one(_t(image))
        return f.boxes, f.scores, f.points

    if "photos" not in skip:
        print_eval(f"(a) RetinaFace-MobileNet0.25 (ours), {args.size} px", photos_eval(ours, photos, size=args.size),
                   len(photos))

    if "crops" not in skip:
        crops = load_crops(args.crops, seed=2)
        print(f"\n(b) aligned crops whole ({args.crops // 2} UTKFace 200x200, {args.crops - args.crops // 2} "
              "CelebA 89x109): share with a face found\n| letterbox | threshold | UTKFace | CelebA |\n|---|---|---|---|")
        for label, mu in (("never enlarged (default)", 1.0), ("enlarged to 640 px", 100.0)):
            d = FaceDetector(DetectorConfig(threshold=0.5, max_upscale=mu))
            res = d.detect([_t(c) for c in crops])
            half = args.crops // 2
            for t in (0.5, 0.8, 0.9):
                hit = [bool((r.scores > t).any()) for r in res]
                print(f"| {label} | {t} | {sum(hit[:half])}/{half} | {sum(hit[half:])}/{len(hit) - half} |")

    if "drawn" not in skip:
        drawn_eval(det, args.drawn)

    if "speed" not in skip:
        print(f"\n(c) speed, 640x480 images letterboxed to 640, {args.threads} thread(s), median of {args.rounds}")
        speed(det, args.rounds)

    if "mtcnn" not in skip and args.mtcnn_path:
        sys.path.insert(0, args.mtcnn_path)
        from facenet_pytorch import MTCNN

        mtcnn = MTCNN(keep_all=True, min_face_size=16, device="cpu")

        def theirs(image):
            from PIL import Image

            im = Image.fromarray(image)
            scale = min(1.0, 640 / max(im.size))  # the same detection size as ours
            if scale < 1:
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BILINEAR)
            boxes, probs, points = mtcnn.detect(im, landmarks=True)
            if boxes is None:
                return torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2)
            def arr(x, shape):  # MTCNN returns object arrays of per-face arrays
                return torch.from_numpy(np.array([np.asarray(v, np.float32) for v in x]).reshape(shape))

            return arr(boxes, (-1, 4)) / scale, arr(probs, (-1,)), arr(points, (-1, 5, 2)) / scale

        print_eval("(d) MTCNN (facenet-pytorch 2.5.3), longer side shrunk to 640 px", photos_eval(theirs, photos),
                   len(photos))
        rng = np.random.default_rng(0)
        img = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        theirs(img)
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            theirs(img)
            times.append(time.perf_counter() - start)
        print(f"MTCNN on one 640x480 noise image: {statistics.median(times) * 1000:.0f} ms (its cascade's cost "
              "grows with the number of candidate windows, so it differs on real photos)")


if __name__ == "__main__":
    main()
