"""Review flags (faces/quality.py) on composed photos with faces made blurry, dark, small or turned.

    python bench/bench_review.py [--photos 120] [--threads 1] [--seed 0] [--model age_gender_race]
                                 [--network retinaface|centerface|scrfd]

Every photo (960 x 640, ``facedata.compose.background`` clutter) holds six faces, one per slot of a 3 x 2
grid, in random order:

* ``clean``: a UTKFace crop, face box 70-130 px wide;
* ``blurry``: the same kind of face, then the photo inside a feathered ellipse 1.5 times its box blurred
  (Gaussian) with sigma = k x the face's inter-ocular distance, k drawn from ``BLUR_LEVELS`` (the same blur
  relative to the face at any size; the face and its surroundings blur together, as a subject out of focus);
* ``dark``: the same region's pixel values times f, f drawn from ``DARK_LEVELS`` (a face in shadow);
* ``small``: face box 28-44 px wide (inter-ocular distance about 11-18 px);
* ``genki_front``: a GENKI-4K face with |yaw label| <= 10 degrees, 70-130 px (a clean face too);
* ``genki_turned``: a GENKI-4K face with |yaw label| >= 30 degrees, 70-130 px (GENKI has one face beyond
  45 degrees, so no photo here is turned as far as Rekognition's limit; see the yaw table).

``--wider`` instead checks ``low_detection_score`` on WIDER FACE's real crowd photos (:func:`wider`).

Each source's box and points are the detector's on the source alone (UTKFace 200 x 200 crops, GENKI photos).
The photos then go through what the product runs: ``FaceDetector`` (``--network``'s default settings but a
960 px canvas, so that the photos are seen at their own size and the small faces are found), a
face counts as found when a detection has IoU >= 0.5 with its true box, then ``faces.quality.quality_crops``
and ``faces.quality.face_quality``. Reported: per category the share found, and for
every reason the share of found faces it fires on at the shipped ``ReviewThresholds``; per level of blur and
darkness; the raw value distributions and a threshold sweep behind each default; ``dark`` on clean faces by
UTKFace's race label; and the cost of ``face_quality`` and of the quality crop (``quality_crops``, and ``align`` for comparison)
per face beside the detector's per photo at its default settings, measured side by side.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torchvision.ops import box_iou

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facedata.compose import FaceSource, background, paste  # noqa: E402
from faces.align import align  # noqa: E402
from faces.detect import DetectorConfig, FaceDetector  # noqa: E402
from faces.quality import QUALITY_PREPROCESSING, REASONS, ReviewThresholds, face_quality, quality_crops  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CATEGORIES = ("clean", "blurry", "dark", "small", "genki_front", "genki_turned")
BLUR_LEVELS = (0.05, 0.10, 0.15)  # sigma / inter-ocular distance
DARK_LEVELS = (0.45, 0.30, 0.20)  # pixel factor
W, H = 960, 640
SLOTS = [(160 + 320 * i, 160 + 320 * j) for j in range(2) for i in range(3)]
RACES = ("White", "Black", "Asian", "Indian", "Others")


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).permute(2, 0, 1).contiguous()


def sources(det: FaceDetector, n_utk: int, rng: np.random.Generator):
    """(UTKFace sources with race, GENKI frontal sources, GENKI turned sources), boxes and points found by
    the detector on each source alone."""
    import pandas as pd

    utk = sorted((DATA / "utkface").glob("*.jpg"))
    files = [utk[i] for i in rng.choice(len(utk), n_utk, replace=False)]
    genki = pd.read_csv(DATA / "genki4k" / "labels.csv")
    yaw = np.degrees(genki.yaw.to_numpy())
    front = list(genki.file[np.abs(yaw) <= 10].sample(n=min(n_utk, (np.abs(yaw) <= 10).sum()), random_state=0))
    turned = list(genki.file[np.abs(yaw) >= 30])
    gyaw = dict(zip(genki.file, yaw))

    def found(paths):
        out = []
        for s in range(0, len(paths), 16):
            ims = [np.array(Image.open(p).convert("RGB")) for p in paths[s : s + 16]]
            for p, im, f in zip(paths[s : s + 16], ims, det.detect([_t(im) for im in ims])):
                if len(f):
                    out.append((p, FaceSource(im, f.boxes[0].numpy(), f.points[0].numpy())))
        return out

    u = []
    for p, src in found(files):
        parts = p.name.split("_")
        race = int(parts[2]) if len(parts) >= 4 and parts[2].isdigit() else -1
        u.append((src, race))
    f = [(src, gyaw[p.name]) for p, src in found([DATA / "genki4k" / x for x in front])]
    t = [(src, gyaw[p.name]) for p, src in found([DATA / "genki4k" / x for x in turned])]
    return u, f, t


def alter(canvas: Image.Image, box: np.ndarray, iod: float, category: str, level: float) -> None:
    """Blur (sigma = level x iod) or darken (x level) the pasted face in place: the canvas inside a feathered
    ellipse 1.5 times the face box, so the face and its surroundings change together, as in a photo."""
    x1, y1, x2, y2 = box
    cx, cy, a, b = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * 0.75, (y2 - y1) * 0.75
    pad = 3 * level * iod if category == "blurry" else 0.0
    lft, t = int(max(0, cx - a - pad)), int(max(0, cy - b - pad))
    r, btm = int(min(canvas.width, cx + a + pad + 1)), int(min(canvas.height, cy + b + pad + 1))
    patch = canvas.crop((lft, t, r, btm))
    if category == "blurry":
        changed = patch.filter(ImageFilter.GaussianBlur(float(level * iod)))
    else:
        changed = Image.fromarray(np.clip(np.asarray(patch, np.float32) * level, 0, 255).round().astype(np.uint8))
    mask = Image.new("L", patch.size, 0)
    ImageDraw.Draw(mask).ellipse((cx - a - lft, cy - b - t, cx + a - lft, cy + b - t), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(float(max(1.0, 0.05 * (x2 - x1)))))
    canvas.paste(changed, (lft, t), mask)


def build(rng, utk, front, turned, small_width=(28.0, 44.0)):
    """One photo: (image, truth boxes (6, 4), per face (category, level, race, genki yaw))."""
    canvas = background(rng, W, H)
    boxes, meta = [], []
    for (cx, cy), cat in zip(SLOTS, rng.permutation(CATEGORIES)):
        level, race, gy = np.nan, -1, np.nan
        if cat.startswith("genki"):
            src, gy = (front if cat == "genki_front" else turned)[rng.integers(len(front if cat == "genki_front" else turned))]
        else:
            src, race = utk[rng.integers(len(utk))]
            level = {"blurry": rng.choice(BLUR_LEVELS), "dark": rng.choice(DARK_LEVELS)}.get(cat, np.nan)
        width = rng.uniform(*small_width) if cat == "small" else rng.uniform(70, 130)
        box, pts = paste(canvas, src, (cx + rng.uniform(-20, 20), cy + rng.uniform(-15, 15)), width,
                         rng.uniform(-10, 10))
        if cat in ("blurry", "dark"):
            alter(canvas, box, float(np.linalg.norm(pts[1] - pts[0])), cat, level)
        boxes.append(box)
        meta.append((str(cat), float(level), race, float(gy)))
    return np.asarray(canvas), np.array(boxes), meta


def wider(network: str, size: int = 640) -> None:
    """``--wider``: low_detection_score on real crowd photos (../shared/data/wider_face, labelled boxes), the
    network at its default settings (``size`` canvas): per size of the true face (its box's shorter side), the
    share of found faces (IoU >= 0.5 with a labelled box) below the network's review score and below
    RetinaFace's 0.9, and of the detections matching no box (false, or faces the labels left out)."""
    import pandas as pd

    from models.preprocess import decode_photo

    root = DATA / "wider_face"
    boxes = pd.read_csv(root / "boxes.csv")
    boxes = boxes[(boxes.w > 0) & (boxes.h > 0)]  # a box of zero width or height is a labelling slip (README)
    det = FaceDetector(DetectorConfig(network=network, size=size))
    limit = ReviewThresholds().resolve_detection_score(network).detection_score_limit()
    true, other = [], []
    for name, g in boxes.groupby("file", sort=True):
        img, _, scale = decode_photo((root / "images" / name).read_bytes())
        found = det.detect([img], scales=[scale])[0]  # boxes in original pixels, as the labels
        if not len(found):
            continue
        gt = torch.tensor(np.stack([g.x, g.y, g.x + g.w, g.y + g.h], 1), dtype=torch.float32)
        best, j = box_iou(found.boxes, gt).max(1)
        side = np.minimum(g.w.to_numpy(), g.h.to_numpy())
        for k in range(len(found)):
            s = float(found.scores[k])
            if float(best[k]) >= 0.5:
                true.append((s, float(side[int(j[k])])))
            else:
                other.append(s)
    t, o = np.array(true), np.array(other)
    print(f"{det.identity}; review score {limit:g}: {boxes.file.nunique()} photos, {len(t)} found faces, "
          f"{len(o)} detections matching no box")
    for lo, hi in ((64, np.inf), (32, 64), (16, 32)):
        v = t[(t[:, 1] >= lo) & (t[:, 1] < hi), 0]
        print(f"  faces {lo}-{hi:g} px (n={len(v)}): below {limit:g} {np.mean(v < limit):.3f}, below 0.9 "
              f"{np.mean(v < 0.9):.3f}, median score {np.median(v):.3f}")
    print(f"  detections matching no box (n={len(o)}): below {limit:g} {np.mean(o < limit):.3f}, below 0.9 "
          f"{np.mean(o < 0.9):.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=120)
    ap.add_argument("--sources", type=int, default=150, help="UTKFace crops (and GENKI frontal faces) to draw from")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-photos", type=int, default=20)
    ap.add_argument("--small-width", default="28,44", metavar="LO,HI",
                    help="face box widths of the small category in px (the inter-ocular distance is about 0.47 x)")
    ap.add_argument("--network", default="retinaface",
                    help="the detector network of the photos (its own default threshold); the sources' boxes and "
                         "points are always RetinaFace's, so every network is scored on the same faces")
    ap.add_argument("--model", default=None,
                    help="the small_face limit these faces get with this zoo model (its input template; "
                         "faces/quality.py resolve_face_size); default: no model, min_face_floor")
    ap.add_argument("--wider", action="store_true",
                    help="only low_detection_score on ../shared/data/wider_face's real crowd photos (wider())")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.wider:
        print(f"command: python bench/bench_review.py --wider --network {args.network} --threads {args.threads}")
        return wider(args.network)
    if not (DATA / "utkface").exists() or not (DATA / "genki4k").exists():
        sys.exit(f"needs {DATA}/utkface and {DATA}/genki4k (research data, absent)")
    rng = np.random.default_rng(args.seed)
    print(f"command: python bench/bench_review.py --photos {args.photos} --sources {args.sources} "
          f"--threads {args.threads} --seed {args.seed}" + (f" --model {args.model}" if args.model else "")
          + f" --small-width {args.small_width} --network {args.network} --timing-photos {args.timing_photos}")
    utk, front, turned = sources(FaceDetector(DetectorConfig(size=256)), args.sources, rng)
    print(f"sources: {len(utk)} UTKFace, {len(front)} GENKI |yaw|<=10, {len(turned)} GENKI |yaw|>=30")

    det = FaceDetector(DetectorConfig(size=W, network=args.network))
    det640 = FaceDetector(DetectorConfig(network=args.network))
    small_width = tuple(float(v) for v in args.small_width.split(","))
    th = ReviewThresholds().resolve_detection_score(args.network)  # what a label job with this detector uses
    print(f"detector {det.identity}; low_detection_score below {th.detection_score_limit():g}")
    if args.model:  # the limit a label job with this model would use (no weights needed: its input only)
        import models

        th = th.resolve_face_size([models.create_model(args.model).preprocessing])
    print(f"small_face limit: {th.face_size_limit():.1f} px of inter-ocular distance")
    rows, photos = [], []
    for _ in range(args.photos):
        image, truth, meta = build(rng, utk, front, turned, small_width)
        img = _t(image)
        faces = det.detect_one(img)
        q = face_quality(faces.points, quality_crops(img, faces.points), faces.scores, thresholds=th)
        if len(photos) < args.timing_photos:
            photos.append(img)
        iou = box_iou(torch.from_numpy(truth).float(), faces.boxes) if len(faces) else torch.zeros(len(truth), 0)
        for k, (cat, level, race, gy) in enumerate(meta):
            j = int(iou[k].argmax()) if iou.shape[1] else -1
            ok = j >= 0 and float(iou[k, j]) >= 0.5
            row = {"cat": cat, "level": level, "race": race, "genki_yaw": gy, "found": ok}
            if ok:
                row.update({c: float(q[c][j]) for c in ("sharpness", "brightness", "face_size", "pose_yaw",
                                                        "pose_pitch", "pose_roll")})
                row["score"] = float(faces.scores[j])
                row["reasons"] = q["review_reasons"][j]
            rows.append(row)

    def share(sel, reason):
        r = [x for x in sel if x["found"]]
        return (np.mean([reason in x["reasons"] for x in r]) if r else float("nan")), len(r)

    print(f"\nshare of found faces each reason fires on, shipped thresholds {th.to_dict()}")
    print(f"{'category':<22}{'n':>5}{'found':>7}" + "".join(f"{r:>21}" for r in REASONS) + f"{'any':>7}")

    def line(name, sel):
        found = [x for x in sel if x["found"]]
        vals = [share(sel, r)[0] for r in REASONS]
        anyr = np.mean([bool(x["reasons"]) for x in found]) if found else float("nan")
        print(f"{name:<22}{len(sel):>5}{len(found) / max(1, len(sel)):>7.2f}" + "".join(f"{v:>21.3f}" for v in vals)
              + f"{anyr:>7.3f}")

    for cat in CATEGORIES:
        sel = [x for x in rows if x["cat"] == cat]
        line(cat, sel)
        if cat in ("blurry", "dark"):
            for lv in BLUR_LEVELS if cat == "blurry" else DARK_LEVELS:
                line(f"  {'sigma' if cat == 'blurry' else 'x'}={lv:g}{' IOD' if cat == 'blurry' else ''}",
                     [x for x in sel if x["level"] == lv])

    def pct(cat, col, extra=lambda x: True):
        v = np.array([x[col] for x in rows if x["cat"] == cat and x["found"] and extra(x)])
        return " ".join(f"{q:6.1f}" for q in np.percentile(v, [1, 5, 25, 50, 75, 95])) if len(v) else "-"

    print("\nvalue percentiles (1, 5, 25, 50, 75, 95) of found faces")
    for col, cats in (("sharpness", ("clean", "genki_front", "dark", "small")), ("brightness", ("clean", "genki_front", "blurry"))):
        for cat in cats:
            print(f"  {col:<11}{cat:<13} {pct(cat, col)}")
        if col == "sharpness":
            for lv in BLUR_LEVELS:
                print(f"  {col:<11}blurry {lv:<6g} {pct('blurry', col, lambda x, lv=lv: x['level'] == lv)}")
        else:
            for lv in DARK_LEVELS:
                print(f"  {col:<11}dark x{lv:<5g} {pct('dark', col, lambda x, lv=lv: x['level'] == lv)}")
    for cat in ("clean", "small", "genki_front"):
        print(f"  {'face_size':<11}{cat:<13} {pct(cat, 'face_size')}")
    for col in ("pose_yaw", "pose_pitch"):
        for cat in ("clean", "genki_front", "genki_turned"):
            print(f"  {col:<11}{cat:<13} {pct(cat, col)}")
    for cat in CATEGORIES:
        print(f"  {'score':<11}{cat:<13} " + pct(cat, "score").replace("  ", " "))
    print("detection score of found faces: min, percentiles 1, 5, 25, 50 (3 decimals)")
    for cat in CATEGORIES:
        v = np.array([x["score"] for x in rows if x["cat"] == cat and x["found"]])
        if len(v):
            print(f"  {cat:<13} n={len(v):<4} {v.min():.3f} " + " ".join(f"{q:.3f}" for q in np.percentile(v, [1, 5, 25, 50])))

    def sweep(col, cats_bad, values, below=True):
        clean = [x[col] for x in rows if x["cat"] in ("clean", "genki_front") and x["found"]]
        out = []
        for v in values:
            fc = np.mean([c < v for c in clean])
            bad = [np.mean([x[col] < v for x in rows if x["found"] and sel(x)]) for sel in cats_bad.values()]
            out.append(f"{v:g}: clean {fc:.3f}, " + ", ".join(f"{k} {b:.3f}" for k, b in zip(cats_bad, bad)))
        print(f"\nsweep of min_{col}:\n  " + "\n  ".join(out))

    sweep("sharpness", {f"blur{lv:g}": (lambda x, lv=lv: x["cat"] == "blurry" and x["level"] == lv) for lv in BLUR_LEVELS},
          (20, 25, 30, 35, 40, 45, 50, 55, 60))
    sweep("brightness", {f"dark{lv:g}": (lambda x, lv=lv: x["cat"] == "dark" and x["level"] == lv) for lv in DARK_LEVELS},
          (10, 12, 15, 18, 20, 22, 25))
    sweep("score", {"small": lambda x: x["cat"] == "small", "blur0.15": lambda x: x["cat"] == "blurry" and x["level"] == 0.15,
                    "dark0.2": lambda x: x["cat"] == "dark" and x["level"] == 0.2},
          tuple(np.round(np.arange(0.30, 0.96, 0.025), 3)))  # wide: CenterFace's and SCRFD's scores sit lower

    print("\ndark on clean UTKFace faces by race label (share fired, n)")
    for i, name in enumerate(RACES):
        sel = [x for x in rows if x["cat"] == "clean" and x["race"] == i]
        v, n = share(sel, "dark")
        print(f"  {name:<8} {v:.3f} ({n})" + (f"   brightness median {np.median([x['brightness'] for x in sel if x['found']]):.1f}" if n else ""))

    print("\nyaw of GENKI faces (pose_yaw of the found face vs GENKI's label)")
    for cat in ("genki_front", "genki_turned"):
        sel = [x for x in rows if x["cat"] == cat and x["found"]]
        ey = np.array([x["pose_yaw"] for x in sel])
        gy = np.array([x["genki_yaw"] for x in sel])
        print(f"  {cat:<13} n={len(sel)}  |label| median {np.median(np.abs(gy)):.1f}  |pose_yaw| percentiles "
              f"(5, 50, 95) {' '.join(f'{v:.1f}' for v in np.percentile(np.abs(ey), [5, 50, 95]))}  "
              f"MAE {np.abs(ey - gy).mean():.2f}  |pose_yaw| > 20: {np.mean(np.abs(ey) > 20):.3f}, > 45: {np.mean(np.abs(ey) > 45):.3f}")

    if not photos:  # --timing-photos 0: the flags only
        return
    # cost, side by side on the same photos: the detector at its defaults (640 px canvas) vs the quality
    # crop's alignment plus face_quality for every face it found
    t_det, t_align, t_crop, t_q, n_q = [], [], [], [], 0
    for img in photos * 2:
        t0 = time.perf_counter()
        faces = det640.detect_one(img)
        t1 = time.perf_counter()
        align(img, faces.points, QUALITY_PREPROCESSING)
        t2 = time.perf_counter()
        crops = quality_crops(img, faces.points)
        t3 = time.perf_counter()
        face_quality(faces.points, crops, faces.scores)
        t4 = time.perf_counter()
        for v, dt in ((t_det, t1 - t0), (t_align, t2 - t1), (t_crop, t3 - t2), (t_q, t4 - t3)):
            v.append(dt)
        n_q += len(faces)
    d, a, c, q = (1e3 * float(np.sum(v)) for v in (t_det, t_align, t_crop, t_q))
    n = len(t_det)
    # face_quality once for every face of the photos (as a Ray batch of photos would call it)
    found = [det640.detect_one(img) for img in photos]
    allp = torch.cat([f.points for f in found])
    allc = torch.cat([quality_crops(img, f.points) for img, f in zip(photos, found)])
    alls = torch.cat([f.scores for f in found])
    tb = []
    for _ in range(5):
        t0 = time.perf_counter()
        face_quality(allp, allc, alls)
        tb.append(time.perf_counter() - t0)
    qb = 1e3 * float(np.median(tb)) / len(allp)
    print(f"\ncost ({args.threads} thread(s), {n} detections of {len(photos)} photos, {n_q / n:.1f} faces/photo):\n"
          f"  detector (default settings, 640 px canvas) {d / n:.1f} ms/photo\n"
          f"  face_quality {q / n_q:.2f} ms/face = {100 * q / d:.1f} % of the detector's time, called per photo; "
          f"{qb:.3f} ms/face = {100 * qb * n_q / d:.1f} % called once for the {len(allp)} faces of {len(photos)} photos\n"
          f"  quality_crops {c / n_q:.2f} ms/face = {100 * c / d:.1f} % (align with QUALITY_PREPROCESSING instead: "
          f"{a / n_q:.2f} ms/face = {100 * a / d:.1f} %)\n"
          f"  quality_crops + face_quality: {100 * (c + q) / d:.1f} % of the detector's time")


if __name__ == "__main__":
    main()
