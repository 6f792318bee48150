"""How accuracy falls with face size (issue #20 item 5): held-out faces shrunk on purpose, then labelled
through the real photo path.

    python bench/bench_face_size.py --checkpoint /tmp/agr/agr_frozen.pt --data utkface:../shared/data/utkface
    python bench/bench_face_size.py --checkpoint /tmp/fs/hs.pt --data celeba:../shared/data/celeba

Faces: ``--n`` rows drawn (``--seed``) from the data set's **test** split (``facedata.datasets.read_dataset``,
seed 0: the split the checkpoints did not train on). Each crop's face box and 5 points are the default
detector network's on the crop alone (on a 256 px canvas, which holds the crops whole; as bench_review.py
takes them); crops without a face are left out. For every target inter-ocular distance ``--sizes`` (pixels in
the photo) each face is **shrunk** to it by
PIL's Lanczos resize (antialiased: what a camera farther away records, not a point-sampled copy), never
enlarged: a face whose own distance is below a target is left out at that size. ``native`` is the crop at its
own size (UTKFace's 200 px chips: about 80 px between the eyes; the CelebA subset's half-resolution crops:
about 20). The shrunk faces are pasted (``facedata.compose.paste``: feathered ellipse, no turn, a whole-pixel
shift so the paste adds no resampling) in a grid on ``--canvas`` clutter (``facedata.compose.background``),
the faces of one size together, saved as JPEG and labelled by ``core.annotator.Annotator`` with the default
detector (``annotate_bytes``: decode, detect, align to the model's template, model, the rows' quality columns).

A pasted face is found when a row's box has IoU >= 0.5 with its true box. Per size: found / pasted (95 %
Wilson interval), the median ``face_size`` the rows report, the share flagged ``small_face``, and per output
the accuracy (age: mean absolute error) on the found faces; ``drop`` is the paired difference against the
reference size (``native``) over the faces found at both sizes, with its 95 % interval (1.96 standard errors
of the per-face differences). The last line is the whole result as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = (8, 12, 16, 20, 24, 32, 48, 64)
NATIVE = "native"


def sources(table, n: int, seed: int):
    """[(row index, FaceSource)] of up to ``n`` test rows drawn at random, box and points from the default
    detector network on the crop alone; and the number of rows without a face."""
    import torch
    from PIL import Image

    from facedata.compose import FaceSource
    from faces.detect import DetectorConfig, FaceDetector

    det = FaceDetector(DetectorConfig(size=256))  # the crops (200 px, 89 x 109) whole, never enlarged
    order = np.random.default_rng(seed).permutation(len(table))[:n]
    out, missed = [], 0
    for s in range(0, len(order), 16):
        idx = order[s:s + 16]
        ims = [np.array(Image.open(table.path[i]).convert("RGB")) for i in idx]
        for i, im, f in zip(idx, ims, det.detect([torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in ims])):
            if len(f):
                out.append((int(i), FaceSource(im, f.boxes[0].numpy(), f.points[0].numpy())))
            else:
                missed += 1
    return out, missed


def iod(points: np.ndarray) -> float:
    return float(np.linalg.norm(points[1] - points[0]))


def shrunk(src, target: float):
    """``src`` resized (Lanczos) so that its inter-ocular distance is ``target``; None if that enlarges it."""
    from PIL import Image

    from facedata.compose import FaceSource

    f = target / iod(src.points)
    if f > 1.0:
        return None
    h, w = src.image.shape[:2]
    nw, nh = max(1, round(w * f)), max(1, round(h * f))
    img = np.asarray(Image.fromarray(src.image).resize((nw, nh), Image.Resampling.LANCZOS))
    sx, sy = nw / w, nh / h  # pixel i covers [i, i+1): a point x maps to x * sx
    box = src.box * np.array([sx, sy, sx, sy])
    return FaceSource(img, box, src.points * np.array([sx, sy]))


def photos(faces: list, canvas: tuple[int, int], rng: np.random.Generator):
    """Lay ``faces`` [(key, FaceSource)] out in grids on canvases; yields (JPEG bytes, [(key, true box)])."""
    from PIL import Image

    from facedata.compose import background, paste
    from facedata.synth import encode_jpeg

    W, H = canvas
    margin = 1.5
    cw = max(s.box[2] - s.box[0] for _, s in faces) * margin + 8
    ch = max(s.box[3] - s.box[1] for _, s in faces) * margin + 8
    cols, rows = max(1, int(W // cw)), max(1, int(H // ch))
    if cols * cw > W or rows * ch > H:
        raise SystemExit(f"a face of {cw:.0f} x {ch:.0f} px does not fit a {W} x {H} canvas")
    per = cols * rows
    for s in range(0, len(faces), per):
        img = background(rng, W, H)
        truth = []
        for k, (key, src) in enumerate(faces[s:s + per]):
            cx = (k % cols + 0.5) * W / cols
            cy = (k // cols + 0.5) * H / rows
            c_src = np.array([(src.box[0] + src.box[2]) / 2, (src.box[1] + src.box[3]) / 2])
            centre = c_src + np.round(np.array([cx, cy]) - c_src)  # whole-pixel shift: no resampling
            box, _ = paste(img, src, (float(centre[0]), float(centre[1])), float(src.box[2] - src.box[0]), 0.0, margin)
            truth.append((key, box))
        yield encode_jpeg(Image.fromarray(np.asarray(img))), truth


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def tasks(runner, table) -> list[tuple[str, str]]:
    """(output, "accuracy" | "mae") for every output of the model that the data set labels."""
    from models.outputs import Categorical

    out = []
    for o in runner.model.outputs:
        if o.name in table.columns and table[o.name].notna().any():
            out.append((o.name, "accuracy" if isinstance(o, Categorical) else "mae"))
    return out


def score(row: dict, label: float, kind: str, name: str) -> float:
    """1/0 for a right/wrong class (the ``<output>_probs`` argmax against the label's index), or |error|."""
    if kind == "accuracy":
        return float(int(np.argmax(row[f"{name}_probs"])) == int(label))
    return abs(float(row[name]) - float(label))


def match(ann, batch: list, table, src: list, todo: list, res: dict) -> None:
    """Label a batch of (JPEG bytes, [(face, true box)]) photos; per pasted face into ``res``: found or not, and
    for a found face its row's ``face_size``, ``small_face`` and per output its :func:`score`."""
    rows = ann.annotate_bytes([(f"p{k}.jpg", d) for k, (d, _) in enumerate(batch)])
    for k, (_, truth) in enumerate(batch):
        mine = [r for r in rows if r["path"] == f"p{k}.jpg" and r["face_box"] is not None]
        for i, box in truth:
            best = max(mine, key=lambda r: iou(r["face_box"], box), default=None)
            entry = {"found": best is not None and iou(best["face_box"], box) >= 0.5}
            if entry["found"]:
                label = table.iloc[src[i][0]]
                entry.update(face_size=best["face_size"], small="small_face" in best["review_reasons"])
                for name, kind in todo:
                    if not math.isnan(float(label[name])):
                        entry[name] = score(best, label[name], kind, name)
            res[i] = entry


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True, help="FORMAT:URI of the labelled faces (its test split is used)")
    ap.add_argument("--n", type=int, default=400, help="test faces drawn")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="inter-ocular distances in pixels")
    ap.add_argument("--canvas", default="640x640", help="photo size (at 640 or less the detector sees it whole)")
    ap.add_argument("--batch", type=int, default=8, help="photos per annotate call")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from core.annotator import Annotator
    from core.evaluation import wilson
    from facedata.datasets import read_dataset
    from faces.align import template_of
    from faces.quality import face_size

    torch.set_num_threads(args.threads)
    sizes = [float(s) for s in args.sizes.split(",")]
    canvas = tuple(int(v) for v in args.canvas.lower().split("x"))
    print("command: python bench/bench_face_size.py " + " ".join(sys.argv[1:] if argv is None else argv))
    t0 = time.perf_counter()
    table = read_dataset(args.data, seed=0).split("test")
    ann = Annotator(args.checkpoint, device="cpu", threads=args.threads)
    (runner,) = ann.members.values()
    todo = tasks(runner, table)
    if not todo:
        raise SystemExit(f"{args.data} labels none of {runner.architecture}'s outputs")
    src, missed = sources(table, args.n, args.seed)
    native = np.array([iod(s.points) for _, s in src])
    th = ann.review.min_face_size
    template_iod = float(face_size(template_of(runner.preprocessing))[0])
    print(f"{runner.architecture} ({args.checkpoint}), input {runner.preprocessing.size} (eyes {template_iod:.1f} px apart in it); {len(src)} test faces of "
          f"{args.data} ({missed} crops without a face left out), own inter-ocular distance median "
          f"{np.median(native):.1f} px (5-95 %: {np.percentile(native, 5):.1f}-{np.percentile(native, 95):.1f}); "
          f"canvas {canvas[0]}x{canvas[1]}; detector {ann.detector}; small_face below {th:g} px")

    rng = np.random.default_rng([args.seed, 1])
    results: dict[str, dict[int, dict]] = {}  # size -> face -> {"found", "face_size", "small", outputs...}
    for size in sizes + [NATIVE]:
        faces = [(i, s if size == NATIVE else shrunk(s, size)) for i, (_, s) in enumerate(src)]
        faces = [(i, s) for i, s in faces if s is not None]
        key = NATIVE if size == NATIVE else f"{size:g}"
        res = results[key] = {}
        batch: list = []

        for item in photos(faces, canvas, rng):
            batch.append(item)
            if len(batch) == args.batch:
                match(ann, batch, table, src, todo, res)
                batch = []
        if batch:
            match(ann, batch, table, src, todo, res)
        print(f"  size {key}: {len(res)} faces, {sum(e['found'] for e in res.values())} found "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    ref = results[NATIVE]
    summary = {}
    head = f"{'IOD px':>8}{'faces':>7}{'found':>20}{'face_size':>10}{'small':>7}"
    for name, kind in todo:
        head += f"{name + (' acc' if kind == 'accuracy' else ' MAE'):>16}{'drop (95 %)':>17}"
    print("\n" + head)
    for key, res in results.items():
        n = len(res)
        found = [i for i, e in res.items() if e["found"]]
        lo, hi = wilson(len(found), n) if n else (float("nan"), float("nan"))
        line = {"faces": n, "found": len(found), "found_share": len(found) / n if n else None,
                "found_interval": [lo, hi],
                "face_size_median": float(np.median([res[i]["face_size"] for i in found])) if found else None,
                "small_face_share": float(np.mean([res[i]["small"] for i in found])) if found else None}
        text = (f"{key:>8}{n:>7}{f'{len(found) / max(n, 1):.3f} ({lo:.2f}-{hi:.2f})':>20}"
                f"{line['face_size_median'] or float('nan'):>10.1f}{line['small_face_share'] or 0.0:>7.2f}")
        for name, kind in todo:
            have = [i for i in found if name in res[i]]
            value = float(np.mean([res[i][name] for i in have])) if have else float("nan")
            both = [i for i in have if ref.get(i, {}).get(name) is not None]
            d = np.array([ref[i][name] - res[i][name] for i in both]) if kind == "accuracy" else \
                np.array([res[i][name] - ref[i][name] for i in both])  # positive: worse than native
            drop = float(d.mean()) if len(d) else float("nan")
            half = float(1.96 * d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
            scale = 100.0 if kind == "accuracy" else 1.0
            line[name] = {"kind": kind, "value": value, "n": len(have), "drop": drop, "drop_half_interval": half,
                          "paired_n": len(both)}
            text += f"{value * scale:>16.2f}{f'{drop * scale:+.2f} ±{half * scale:.2f}':>17}"
        summary[key] = line
        print(text)
    print("accuracy in %, MAE in years; drop: native minus this size over the faces found at both (accuracy, "
          "points) or this size minus native (MAE, years), positive = worse; ±: 95 % interval")
    print(f"{time.perf_counter() - t0:.0f} s")
    print(json.dumps({"checkpoint": args.checkpoint, "model": runner.architecture, "data": args.data,
                      "input": list(runner.preprocessing.size), "template_iod": template_iod, "faces": len(src), "canvas": list(canvas),
                      "min_face_size": th, "sizes": summary}))


if __name__ == "__main__":
    main()
