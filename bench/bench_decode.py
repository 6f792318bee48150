"""What a camera-sized photo costs before the detector's network: the JPEG decode and the letterbox.

    python bench/bench_decode.py [--photos 8] [--rounds 5] [--threads 2] [--sizes 4032x3024,4000x3000,6000x4000,1024x683]

Photos: ``--photos`` WIDER FACE photos of ../shared/data/wider_face (drawn faces when absent) enlarged to each
size and saved as JPEG (quality 90), as a phone or camera would. For each size, in interleaved rounds (median):

* decode: ``models.preprocess.decode_photo`` at ``max_side`` 2048 as it is (a JPEG's DCT scale may leave the
  longest side down to 31/32 of ``max_side``), against the rule before 2026-12-06 (the scale had to keep
  ``max_side`` itself, so a 4032 px photo decoded whole and was shrunk to 2048);
* detect: ``FaceDetector.detect`` (RetinaFace at 640, batches of 4) on each rule's decoded photos, with the
  letterbox resizing 8-bit values (the default) and in floats (``resize="float"``, before 2026-12-06).

Prints one table, ms per photo, and the faces each detection found (they should agree to a face or two).
"""

from __future__ import annotations

import argparse
import glob
import io
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDER = ROOT.parent / "shared" / "data" / "wider_face" / "images"


def sources(n: int):
    from PIL import Image

    files = sorted(glob.glob(str(WIDER / "*" / "*.jpg")))
    if files:
        return [Image.open(f).convert("RGB") for f in files[:: max(1, len(files) // n)][:n]]
    import numpy as np

    from facedata.draw import draw_face

    return [draw_face(np.random.default_rng(i), (1024, 683))[0] for i in range(n)]


def decode_before(data: bytes, max_side: int = 2048):
    """decode_photo as it was before 2026-12-06: the JPEG draft had to keep ``max_side`` itself."""
    import numpy as np
    import torch
    from PIL import Image

    from models.imagebytes import open_image

    img, _ = open_image(data, draft_to=max_side)
    img = img if img.mode == "RGB" else img.convert("RGB")
    w, h = img.size
    if max(w, h) > max_side:
        f = max_side / max(w, h)
        img = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR, reducing_gap=3.0)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", default="4032x3024,4000x3000,6000x4000,1024x683")
    args = p.parse_args(argv)

    import torch
    from PIL import Image

    from faces.detect import DetectorConfig, FaceDetector
    from models.preprocess import decode_photo

    torch.set_num_threads(args.threads)
    print(f"command: python bench/bench_decode.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
          f"torch {torch.__version__}, {args.threads} thread(s); {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    srcs = sources(args.photos)
    detectors = {"uint8": FaceDetector(), "float": FaceDetector(DetectorConfig(resize="float"))}
    rows = []
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        jpegs = []
        for im in srcs:
            buf = io.BytesIO()
            im.resize((w, h), Image.BICUBIC).save(buf, "JPEG", quality=90)
            jpegs.append(buf.getvalue())
        decoders = {"now": lambda d: decode_photo(d)[0], "before": decode_before}
        times: dict[str, list[float]] = {}
        decoded, faces = {}, {}
        for _ in range(args.rounds):
            for name, fn in decoders.items():
                t = time.perf_counter()
                decoded[name] = [fn(d) for d in jpegs]
                times.setdefault(f"decode {name}", []).append((time.perf_counter() - t) / len(jpegs))
            for dname, photos in decoded.items():
                for rname, det in detectors.items():
                    det.detect(photos[:1])
                    t = time.perf_counter()
                    found = [f for i in range(0, len(photos), 4) for f in det.detect(photos[i : i + 4])]
                    times.setdefault(f"detect {dname} {rname}", []).append((time.perf_counter() - t) / len(photos))
                    faces[f"{dname} {rname}"] = sum(len(f) for f in found)
        med = {k: 1000 * statistics.median(v) for k, v in times.items()}
        rows.append((size, tuple(decoded["now"][0].shape[1:]), tuple(decoded["before"][0].shape[1:]), med, faces))
        print(f"{size}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items()) + f"; faces {faces}", flush=True)
    print("\n| photo | decoded at (now / before) | decode now | decode before | detect, 8-bit letterbox | "
          "detect, float letterbox | decode + detect now | before | faces (now, before) |\n" + "|---" * 9 + "|")
    for size, s_now, s_before, m, f in rows:
        now = m["decode now"] + m["detect now uint8"]
        before = m["decode before"] + m["detect before float"]
        print(f"| {size} | {s_now[1]}x{s_now[0]} / {s_before[1]}x{s_before[0]} | {m['decode now']:.1f} | "
              f"{m['decode before']:.1f} | {m['detect now uint8']:.1f} | {m['detect now float']:.1f} | {now:.1f} | "
              f"{before:.1f} ({before / now:.2f}x) | {f['now uint8']}, {f['before float']} |")


if __name__ == "__main__":
    main()
