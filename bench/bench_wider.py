"""Face detection on WIDER FACE val photos: recall by face height, precision, AP and photos/s per setting.

    python bench/bench_wider.py [--photos 305] [--threads 2] [--settings rf640,rf1024,...] [--timing-photos 40]

Reads ../shared/data/wider_face (``boxes.csv``: ``file,x,y,w,h`` per labelled face, zero-size boxes skipped;
``images/<event>/<file>.jpg``, 1024 px wide). For each setting of :data:`SETTINGS`:

* accuracy: every photo detected once at score threshold ``--eval-threshold`` (0.02), ``min_face`` 0 and no
  ``max_faces`` cap, so that one pass gives every operating point. Detections of a photo are matched to its
  faces as VOC and WIDER do: in order of score, each detection takes the labelled face it overlaps most; it is
  a true positive if that IoU is >= 0.5 and the face is not taken yet, a false positive otherwise.

  - recall at the setting's operating threshold (the network's default unless the setting names one) by the
    face's height in the photo: >= 64, 32-64, 16-32, 8-16 px (and < 8 px, which no setting is asked to find);
  - precision at that threshold: true positives / detections;
  - AP: all faces together (no easy / medium / hard groups, no faces ignored), all detections of all photos
    sorted by score, VOC's all-point interpolated area under the precision-recall curve;
* speed: ``--timing-photos`` photos detected with the setting as it would run (its threshold, ``min_face``
  16, ``max_faces`` 64), ``--batch`` photos per call: photos/s of detection alone (decoded tensors in) and with
  the JPEG decode (``torchvision.io.decode_jpeg``, timed separately on the same photos) added.
  With ``--timing-enlarge F`` the timing photos are first enlarged F times (to 2048 px with F = 2: what a
  phone photo is decoded at; the letterbox then has 3.2x as far to shrink it).
* crowds (``--crowd SETTING``): with that setting's detections, how many photos have more faces than a
  ``max_faces`` cap, and the recall and precision with ``min_face`` 0 / 8 / 12 / 16 and caps 64 / 128 / 256 / 512.

``OMP_WAIT_POLICY`` is set to PASSIVE unless given: on a shared, overloaded machine OpenMP workers that spin
made one 640 px RetinaFace pass take 4-7 s with 2 threads instead of 0.04-0.3 s (measured 2026-12-02,
load 25-35 on 2 cores). Timings are ratios measured side by side in one run; the machine is shared.
Results go to ``--out`` (JSON) after every setting, so a partial run keeps what it measured; ``--report``
prints the tables from that file.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: see the docstring

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.io import decode_jpeg  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from faces import detect as detect_module  # noqa: E402
from faces.detect import DetectorConfig, FaceDetector  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wider_face"
BINS = ((64, None), (32, 64), (16, 32), (8, 16), (0, 8))
# name -> DetectorConfig settings (threshold: the network's own unless given)
SETTINGS: dict[str, dict] = {
    "rf640": {},  # today's default
    "rf896": {"size": 896},
    "rf1024": {"size": 1024},
    "rf1280x": {"size": 1280, "max_upscale": 1.25},  # 1024 px photos enlarged to 1280
    "rf640-flip": {"flip": True},
    "rf640-tile640": {"tile": 640, "tile_overlap": 128},
    "rf320-tile640": {"size": 320, "tile": 640, "tile_overlap": 128},
    "rf640-tile512": {"tile": 512, "tile_overlap": 96},
    "cf640": {"network": "centerface"},
    "cf1024": {"network": "centerface", "size": 1024},
    "cf896": {"network": "centerface", "size": 896},
    "cf640-tile640": {"network": "centerface", "tile": 640, "tile_overlap": 128},
    "cf1280x": {"network": "centerface", "size": 1280, "max_upscale": 1.25},
    "sc640": {"network": "scrfd"},
    "sc800": {"network": "scrfd", "size": 800},
    "sc1024": {"network": "scrfd", "size": 1024},
    "sc1280x": {"network": "scrfd", "size": 1280, "max_upscale": 1.25},
    "sc640-flip": {"network": "scrfd", "flip": True},
    # the letterbox's resize in floats, as before 2026-12-06 (the default resizes 8-bit values: docs/faces.md)
    "rf640-float": {"resize": "float"},
    "rf1024-float": {"size": 1024, "resize": "float"},
    "sc640-float": {"network": "scrfd", "resize": "float"},
}
DEFAULT_SETTINGS = "rf640,rf896,rf1024,rf640-tile640,rf640-flip,cf640,cf1024"


def load_truth(n_photos: int) -> list[tuple[str, np.ndarray]]:
    """(file, (K, 4) x1, y1, x2, y2) per photo, sorted by file; ``n_photos`` of them evenly spaced."""
    faces = defaultdict(list)
    with open(DATA / "boxes.csv", newline="") as f:
        for row in csv.DictReader(f):
            x, y, w, h = (float(row[k]) for k in ("x", "y", "w", "h"))
            faces[row["file"]]  # a photo whose boxes are all zero-size still counts (no faces)
            if w > 0 and h > 0:
                faces[row["file"]].append((x, y, x + w, y + h))
    files = sorted(faces)
    if n_photos < len(files):
        files = [files[i] for i in np.linspace(0, len(files) - 1, n_photos).round().astype(int)]
    return [(f, np.array(faces[f], dtype=np.float32).reshape(-1, 4)) for f in files]


def read_photos(files: list[str]) -> tuple[list[bytes], list[torch.Tensor], float]:
    datas = [(DATA / "images" / f).read_bytes() for f in files]
    start = time.perf_counter()
    images = [decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8)) for d in datas]
    return datas, images, time.perf_counter() - start


def match(truth: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """For detections in order of score: index of the face each one takes (IoU >= 0.5), -1 if none (VOC)."""
    out = np.full(len(boxes), -1, dtype=np.int64)
    if len(truth) == 0 or len(boxes) == 0:
        return out
    iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(truth)).numpy()
    taken = np.zeros(len(truth), bool)
    best = iou.argmax(1)
    for j in range(len(boxes)):
        g = best[j]
        if iou[j, g] >= 0.5 and not taken[g]:
            taken[g] = True
            out[j] = g
    return out


def voc_ap(tp: np.ndarray, n_truth: int) -> float:
    """All-point interpolated AP from true-positive flags of detections sorted by score."""
    if len(tp) == 0:
        return 0.0
    ctp = np.cumsum(tp)
    rec = ctp / max(1, n_truth)
    prec = ctp / np.arange(1, len(tp) + 1)
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def evaluate(truth, dets, threshold: float, min_face: float = 0.0, max_faces: int | None = None) -> dict:
    """Recall by height bin, precision and AP of ``dets`` (per photo: boxes, scores sorted by score)."""
    found = {b: 0 for b in BINS}
    total = {b: 0 for b in BINS}
    all_scores, all_tp, n_det, n_tp, capped = [], [], 0, 0, 0
    for (_, gt), (boxes, scores) in zip(truth, dets):
        side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) if len(boxes) else np.zeros(0)
        keep = side >= min_face
        boxes, scores = boxes[keep], scores[keep]
        if max_faces is not None:
            above = int((scores > threshold).sum())
            capped += above > max_faces
            boxes, scores = boxes[:max_faces], scores[:max_faces]
        m = match(gt, boxes)
        all_scores.append(scores)
        all_tp.append(m >= 0)
        on = scores > threshold
        n_det += int(on.sum())
        n_tp += int((m[on] >= 0).sum())
        hit = np.zeros(len(gt), bool)
        hit[m[on & (m >= 0)]] = True
        h = gt[:, 3] - gt[:, 1]
        for lo, hi in BINS:
            inb = (h >= lo) & (h < (hi if hi is not None else np.inf))
            total[(lo, hi)] += int(inb.sum())
            found[(lo, hi)] += int((hit & inb).sum())
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    tp = np.concatenate(all_tp) if all_tp else np.zeros(0, bool)
    order = np.argsort(-scores, kind="stable")
    n_truth = sum(total.values())
    return {
        "recall": {f"{lo}-{hi or ''}": found[(lo, hi)] / max(1, total[(lo, hi)]) for lo, hi in BINS},
        "faces": {f"{lo}-{hi or ''}": total[(lo, hi)] for lo, hi in BINS},
        "recall_all": sum(found.values()) / max(1, n_truth),
        "precision": n_tp / max(1, n_det), "detections": n_det, "true_positives": n_tp,
        "ap": voc_ap(tp[order], n_truth), "photos_over_cap": capped,
    }


def run_setting(name, kw, truth, images, args) -> tuple[dict, list]:
    cfg = DetectorConfig(**{**kw, "threshold": args.eval_threshold, "min_face": 0.0, "max_faces": 100_000})
    det = FaceDetector(cfg)
    dets = []
    start = time.perf_counter()
    for i in range(0, len(images), args.batch):
        for f in det.detect(images[i : i + args.batch]):
            dets.append((f.boxes.numpy(), f.scores.numpy()))
    seconds = time.perf_counter() - start
    op = DetectorConfig(**kw)
    result = {"name": name, "settings": kw, "threshold": op.threshold, "accuracy_pass_s": seconds,
              **evaluate(truth, dets, op.threshold)}
    return result, dets


def time_setting(kw, images, args) -> tuple[float, int]:
    """Seconds to detect ``images`` as the setting runs, and the most candidates one photo had for NMS."""
    det = FaceDetector(DetectorConfig(**kw))
    most = [0]
    real = detect_module.top_k_per_group

    def counting(scores, groups, k):
        if len(groups):
            most[0] = max(most[0], int(torch.bincount(groups).max()))
        return real(scores, groups, k)

    det.detect(images[:1])  # warm-up
    detect_module.top_k_per_group = counting
    try:
        start = time.perf_counter()
        for i in range(0, len(images), args.batch):
            det.detect(images[i : i + args.batch])
        return time.perf_counter() - start, most[0]
    finally:
        detect_module.top_k_per_group = real


def table(results: list[dict], decode_s_per_photo: float) -> str:
    base = next((r for r in results if r["name"] == "rf640"), None)
    lines = ["| setting | recall >=64 | 32-64 | 16-32 | 8-16 | <8 | precision | AP | photos/s detect | "
             "photos/s with decode | time vs rf640 | most NMS candidates |", "|---" * 12 + "|"]
    for r in results:
        rec = r["recall"]
        t = r.get("timing_s_per_photo")
        fps = f"{1 / t:.2f}" if t else "-"
        fps_d = f"{1 / (t + decode_s_per_photo):.2f}" if t else "-"
        ratio = f"{t / base['timing_s_per_photo']:.2f}x" if t and base and base.get("timing_s_per_photo") else "-"
        lines.append(f"| {r['name']} (t={r['threshold']:g}) | {rec['64-']:.3f} | {rec['32-64']:.3f} | "
                     f"{rec['16-32']:.3f} | {rec['8-16']:.3f} | {rec['0-8']:.3f} | {r['precision']:.3f} | "
                     f"{r['ap']:.3f} | {fps} | {fps_d} | {ratio} | {r.get('most_candidates', '-')} |")
    return "\n".join(lines)


def _save_dets(out: str, name: str, dets: list) -> None:
    arrays = {f"{k}_{i}": a for i, (b, s) in enumerate(dets) for k, a in (("b", b), ("s", s))}
    np.savez_compressed(f"{out}.{name}.npz", **arrays)


def _load_dets(out: str, name: str) -> list:
    z = np.load(f"{out}.{name}.npz")
    return [(z[f"b_{i}"], z[f"s_{i}"]) for i in range(len(z.files) // 2)]


def target_table(results: list[dict], truth, out: str, target: float) -> None:
    """Per setting, the lowest threshold (0.30-0.99, steps of 0.01) at which precision reaches ``target``."""
    print(f"\nat the lowest threshold with precision >= {target:g}\n| setting | threshold | recall >=64 | 32-64 | "
          "16-32 | 8-16 | precision | all faces |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        dets = _load_dets(out, r["name"])
        for thr in np.arange(0.30, 0.995, 0.01):
            e = evaluate(truth, dets, float(thr))
            if e["precision"] >= target:
                rec = e["recall"]
                print(f"| {r['name']} | {thr:.2f} | {rec['64-']:.3f} | {rec['32-64']:.3f} | {rec['16-32']:.3f} | "
                      f"{rec['8-16']:.3f} | {e['precision']:.3f} | {e['recall_all']:.3f} |")
                break
        else:
            print(f"| {r['name']} | none up to 0.99 | | | | | | |")


def crowd_table(name: str, truth, dets, thr: float | None = None) -> None:
    thr = thr if thr is not None else DetectorConfig(**SETTINGS[name]).threshold
    print(f"\ncrowds, {name} at threshold {thr:g}: photos with more faces found than the cap, overall recall "
          "and precision\n| min_face | max_faces | photos over the cap | recall (all faces) | recall >= 16 px | "
          "precision |\n|---|---|---|---|---|---|")
    for min_face in (0.0, 8.0, 12.0, 16.0):
        for cap in (64, 128, 256, 512):
            e = evaluate(truth, dets, thr, min_face=min_face, max_faces=cap)
            big = sum(e["recall"][k] * e["faces"][k] for k in ("64-", "32-64", "16-32"))
            n_big = sum(e["faces"][k] for k in ("64-", "32-64", "16-32"))
            print(f"| {min_face:g} | {cap} | {e['photos_over_cap']} | {e['recall_all']:.3f} | "
                  f"{big / max(1, n_big):.3f} | {e['precision']:.3f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=305, help="photos, evenly spaced over the sorted files")
    p.add_argument("--timing-photos", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="photos per detect() call")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"comma-separated, of: {', '.join(SETTINGS)}")
    p.add_argument("--timing-enlarge", type=float, default=1.0, metavar="F",
                   help="enlarge the timing photos F times first (2: 2048 px wide, as a phone photo is decoded)")
    p.add_argument("--eval-threshold", type=float, default=0.02)
    p.add_argument("--crowd", default="", help="a setting whose detections the crowd table uses")
    p.add_argument("--crowd-threshold", type=float, default=None, help="the crowd table's threshold (default: the setting's)")
    p.add_argument("--out", default="/tmp/bench_wider.json")
    p.add_argument("--report", action="store_true", help="print the tables of --out and stop")
    p.add_argument("--precision-target", type=float, default=0.0,
                   help="with --report: each setting's lowest threshold whose precision reaches this, and its recall")
    p.add_argument("--timing-only", type=int, default=0, metavar="ROUNDS",
                   help="only time the settings, in ROUNDS interleaved rounds (median of each); no accuracy pass")
    args = p.parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.out).read_text())
        print(saved["header"])
        print(table(saved["results"], saved["decode_s_per_photo"]))
        truth = load_truth(saved["photos"])
        if args.precision_target:
            target_table(saved["results"], truth, args.out, args.precision_target)
        if args.crowd:
            crowd_table(args.crowd, truth, _load_dets(args.out, args.crowd), args.crowd_threshold)
        return
    if not DATA.is_dir():
        print(f"WIDER FACE not found at {DATA}: nothing to measure")
        return
    torch.set_num_threads(args.threads)
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; known: {list(SETTINGS)}")
    header = ("command: python bench/bench_wider.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "\n"
              + f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load {os.getloadavg()[0]:.1f} at start; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(header, flush=True)
    truth = load_truth(args.photos)
    _, images, decode_s = read_photos([f for f, _ in truth])
    n_faces = sum(len(g) for _, g in truth)
    header += (f"\n{len(truth)} photos, {n_faces} labelled faces (zero-size boxes skipped); JPEG decode "
               f"{1000 * decode_s / len(images):.1f} ms per photo")
    print(header.splitlines()[-1], flush=True)
    timing_images = images[: args.timing_photos]
    if args.timing_enlarge != 1.0:
        timing_images = [torch.nn.functional.interpolate(im[None].float(), scale_factor=args.timing_enlarge,
                                                         mode="bilinear")[0].round().clamp(0, 255).byte()
                         for im in timing_images]
        header += f"; timing photos enlarged {args.timing_enlarge:g}x (to {max(timing_images[0].shape[1:])} px)"
    if args.timing_only:
        times = {n: [] for n in names}
        for _ in range(args.timing_only):
            for name in names:
                times[name].append(time_setting(SETTINGS[name], timing_images, args)[0] / len(timing_images))
        base = float(np.median(times[names[0]]))
        print(f"\n{len(timing_images)} photos, {args.timing_only} interleaved rounds, median s per photo; load "
              f"{os.getloadavg()[0]:.1f} at the end\n| setting | photos/s detect | photos/s with decode | "
              f"time vs {names[0]} | rounds (s per photo) |\n|---|---|---|---|---|")
        d = decode_s / len(images)
        for name in names:
            t = float(np.median(times[name]))
            print(f"| {name} | {1 / t:.2f} | {1 / (t + d):.2f} | {t / base:.2f}x | "
                  f"{', '.join(f'{x:.3f}' for x in times[name])} (quietest {min(times[name]) / min(times[names[0]]):.2f}x) |")
        return
    results, all_dets = [], {}
    for name in names:
        kw = SETTINGS[name]
        r, dets = run_setting(name, kw, truth, images, args)
        all_dets[name] = dets
        t, most = time_setting(kw, timing_images, args)
        r["timing_s_per_photo"] = t / len(timing_images)
        r["most_candidates"] = most
        r["load_after"] = os.getloadavg()[0]
        results.append(r)
        print(f"{name}: AP {r['ap']:.3f}, precision {r['precision']:.3f}, recall {r['recall']}, "
              f"{r['timing_s_per_photo']:.3f} s/photo, accuracy pass {r['accuracy_pass_s']:.0f} s, "
              f"load {r['load_after']:.1f}", flush=True)
        Path(args.out).write_text(json.dumps({"header": header, "results": results, "photos": args.photos,
                                              "decode_s_per_photo": decode_s / len(images)}, indent=1))
        _save_dets(args.out, name, dets)
    print("\n" + table(results, decode_s / len(images)))
    if args.crowd:
        dets = all_dets.get(args.crowd)
        if dets is None:
            _, dets = run_setting(args.crowd, SETTINGS[args.crowd], truth, images, args)
        crowd_table(args.crowd, truth, dets, args.crowd_threshold)

if __name__ == "__main__":
    main()
