"""The whole product on built-in data, on this machine: ``make demo``.

    python -m jobs.demo [--out demo_out] [--model dmm_cnn] [--n 400] [--epochs 3]

1. draws synthetic CelebA-format faces with known attributes (``jobs.synth``);
2. starts a local Ray and trains the model with Ray Train (2 CPU workers, DDP over gloo) — the same program
   as ``python -m jobs.train``, small (ResNet-18 trunk, 64 px) so that it finishes in minutes on a laptop;
3. evaluates the exported checkpoint on the held-out split (``jobs.evaluate``);
4. composes "photos" from held-out faces (0 to 3 faces each, of different sizes, turned, over clutter) and
   labels them, plus two broken files, with Ray Data into Parquet (``jobs.label``): the detector finds
   every face, aligns it to the model's face template (measured on the training faces in step 2), one row
   per face;
5. serves the checkpoint with Ray Serve on 127.0.0.1 and sends one group photo over HTTP;
6. prints a summary: training metrics, faces found against faces pasted, rows and errors, and whether the
   HTTP answer equals the Parquet rows face by face.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.request
from pathlib import Path

DEMO_MODELS = {
    # name: (model constructor overrides for a quick CPU run, recipe overrides)
    "dmm_cnn": ({"image_size": 64, "depth": 18}, {"batch_size": 16, "optimizer": "adam", "lr": 1e-3}),
    "task_attention": ({"image_size": 64, "depth": 18}, {"batch_size": 16}),
    "hard_sharing": ({}, {"batch_size": 32}),
}


def compose_photos(celeba: Path, out: Path, n: int, seed: int) -> dict[str, int]:
    """``n`` JPEG photos in ``out`` made of the drawn faces of ``celeba``'s test split: 0 to 3 faces each, 60 to
    220 px wide, turned by up to 20 degrees, over a cluttered background. Returns photo name -> faces pasted."""
    import numpy as np
    from PIL import Image

    from facedata.compose import FaceSource, compose
    from facedata.datasets import read_dataset
    from facedata.synth import encode_jpeg

    out.mkdir(parents=True, exist_ok=True)
    test = read_dataset(f"celeba:{celeba}", seed=0).split("test")
    sources = []
    for path, marks in zip(test["path"][:24], test["landmarks"][:24]):
        pts = np.asarray(marks, dtype=np.float64).reshape(5, 2)
        iod = float(np.linalg.norm(pts[1] - pts[0]))
        box = [pts[:, 0].min() - 0.9 * iod, pts[:, 1].min() - 1.0 * iod, pts[:, 0].max() + 0.9 * iod,
               pts[:, 1].max() + 0.8 * iod]
        sources.append(FaceSource(np.asarray(Image.open(path).convert("RGB")), box, pts))
    truth = {}
    for i in range(n):
        photo = compose(sources, seed + i, n_faces=(0, 3), canvas=(480, 1280), face_width=(60, 220), max_angle=20)
        name = f"photo_{i:02d}.jpg"
        (out / name).write_bytes(encode_jpeg(Image.fromarray(photo.image)))
        truth[name] = len(photo.boxes)
    return truth


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="working folder (created; reused runs resume)")
    p.add_argument("--model", default="dmm_cnn", choices=sorted(DEMO_MODELS))
    p.add_argument("--n", type=int, default=400, help="synthetic faces to draw")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    from jobs._cli import check_job_paths, flag

    # under `ray job submit --working-dir`, `--out demo_out` would resolve into Ray's unpacked copy of the code
    check_job_paths(p, [flag(p, args, "out", "--out")])

    import ray
    import torch

    from facedata.synth import generate
    from raytasks.reach import init_ray

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    out = Path(args.out).resolve()
    t_all = time.perf_counter()
    summary: dict = {"model": args.model}

    t = _step(f"1. synthetic CelebA-format faces -> {out / 'data'}")
    data = out / "data" / "celeba"
    if not (data / "list_attr_celeba.txt").exists():
        generate("celeba", args.n, str(data), seed=0)
    print(f"{args.n} faces with known attributes and landmarks ({time.perf_counter() - t:.1f} s)")

    _step("2. train with Ray Train")
    if not ray.is_initialized():
        # at least 4 logical CPUs, as jobs.label's own Ray (raytasks/label/cluster.py ensure_ray): a label run that
        # resumes holds Ray Data's checkpoint filter actor (1 CPU) beside the annotator actor and the read tasks,
        # and with os.cpu_count() = 2 the read waited for a third CPU for ever
        # (or the cluster `ray start` runs on this machine, joined as it is: raytasks/reach.py init_ray)
        init_ray(max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    ckpt = str(out / "models" / f"{args.model}.pt")
    summary.update(_train(args, data, out, ckpt))

    _step("3. evaluate the exported checkpoint on the test split")
    summary["test_metrics"] = _evaluate(ckpt, data, out)

    _step("4. photos with several faces -> Ray Data -> Parquet, one row per face")
    truth = compose_photos(data, out / "photos", n=12, seed=1)
    table, summary["label"], summary["faces_found_of_pasted"] = _label(ckpt, out / "photos", truth, out / "labels")

    _step("5. serve the checkpoint with Ray Serve and send it a group photo over HTTP")
    summary["serve"] = _serve(ckpt, out / "photos", truth, table)
    ray.shutdown()

    summary["total_seconds"] = round(time.perf_counter() - t_all, 1)
    print("\n=== summary")
    print(json.dumps(summary, indent=2, default=str))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _train(args, data: Path, out: Path, ckpt: str) -> dict:
    """Step 2: ``jobs.train``'s run (Ray Train, ``args.workers`` CPU workers) of the demo's model on the drawn
    faces, exported to ``ckpt``; the summary's training entries."""
    from raytasks.train import TrainSpec, run

    t = time.perf_counter()
    model_kw, recipe = DEMO_MODELS[args.model]
    recipe = {**recipe, "epochs": args.epochs}
    flags = "".join(f" --model-arg {k}={v}" for k, v in model_kw.items()) + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in recipe.items() if k != "epochs")
    cmd = (f"python -m jobs.train --model {args.model} --data celeba:{data} --workers {args.workers} "
           f"--cpus-per-worker 0.5 --epochs {args.epochs} --recipe none{flags} --storage {out / 'runs'} "
           f"--name demo-{args.model} --output {ckpt}")
    print(f"(the same as: {cmd})")
    outcome = run(TrainSpec(model=args.model, data=f"celeba:{data}", storage=str(out / "runs"),
                            name=f"demo-{args.model}", output=ckpt, model_kwargs=model_kw, recipe=recipe,
                            workers=args.workers, cpus_per_worker=0.5, threads=1, max_failures=1))
    return {"train_seconds": round(time.perf_counter() - t, 1), "best_epoch": outcome.best_epoch,
            "checkpoint": outcome.output, "curves": outcome.curves}


def _evaluate(ckpt: str, data: Path, out: Path) -> dict:
    """Step 3: ``jobs.evaluate`` on the test split (``metrics.json``); the headline metrics."""
    from jobs import evaluate

    metrics = evaluate.main(["--checkpoint", ckpt, "--data", f"celeba:{data}", "--split", "test",
                             "--json", str(out / "metrics.json")])
    return {k: round(v, 4) for k, v in metrics.items()
            if k in ("mean_accuracy", "Male.accuracy", "Eyeglasses.accuracy", "Smiling.accuracy", "landmarks.nme",
                     "gender.accuracy", "smile.accuracy", "eyeglasses.accuracy")}


def _label(ckpt: str, photos: Path, truth: dict[str, int], labels_out: Path):
    """Step 4: the label job over the composed photos and two broken files. Returns the rows (a DataFrame), the
    summary's label entries and how many of the pasted faces got a row."""
    import pandas as pd

    from raytasks.label import LabelSpec, label

    (photos / "zz_empty.jpg").write_bytes(b"")
    (photos / "zz_truncated.jpg").write_bytes((photos / sorted(truth)[0]).read_bytes()[:300])
    print(f"{len(truth)} photos holding {sum(truth.values())} faces (0 to 3 each), plus 2 broken files")
    print(f"(the same as: python -m jobs.label --checkpoint {ckpt} --input {photos} --output {labels_out})")
    # 14 photos: one copy of the model is enough
    label_summary = label(LabelSpec(checkpoint=ckpt, input=str(photos), output=str(labels_out), batch_size=4,
                                    max_actors=1))
    entries = {k: label_summary.get(k) for k in (
        "inputs", "images_total", "faces_total", "images_without_faces", "rows_total", "ok_total", "errors_by_kind",
        "complete", "images_per_s", "faces_per_s")}
    table = pd.read_parquet(labels_out / "labels")
    found = {Path(p).name: int(n) for p, n in table.groupby("path")["faces"].first().items() if n == n}
    return table, entries, f"{sum(min(found.get(k, 0), v) for k, v in truth.items())} of {sum(truth.values())}"


def _serve(ckpt: str, photos: Path, truth: dict[str, int], table) -> dict:
    """Step 5: the checkpoint on Ray Serve, the photo with the most faces sent over HTTP, its answer set beside
    its Parquet rows (the same faces, the same probabilities within 0.02)."""
    from ray import serve

    from raytasks.reach import free_port
    from raytasks.serve import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": {"demo": ckpt}, "precision": "fp32", "allow_no_auth": True}), name="faceattr", route_prefix="/")
    group = max(sorted(truth), key=lambda k: truth[k])
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/demo/predict?filename={group}",
                                 data=(photos / group).read_bytes(), headers={"Content-Type": "image/jpeg"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=300) as resp:
        answer = json.loads(resp.read())
    (served_image,) = answer["images"]
    rows = table[table["path"].str.endswith(group)].sort_values("face")
    shown = [k for k in served_image["faces"][0] if k.endswith("_prob") and not k.endswith("_probs")][:3] \
        if served_image["faces"] else []
    agree = len(served_image["faces"]) == len(rows)
    for face, (_, row) in zip(served_image["faces"], rows.iterrows()):
        agree = agree and all(abs(float(face[k]) - float(row[k])) < 2e-2 for k in shown)
        print(f"face {face['face']} at {[round(v) for v in face['face_box']]}: HTTP " +
              ", ".join(f"{k}={face[k]:.3f}" for k in shown) + " | Parquet " +
              ", ".join(f"{k}={row[k]:.3f}" for k in shown))
    serve.shutdown()
    return {"port": port, "photo": group, "faces_in_answer": len(served_image["faces"]),
            "answer_matches_parquet_rows": agree}


if __name__ == "__main__":
    main()
