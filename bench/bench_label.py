"""Benchmark of the label job (raytasks/label/job.py) on this machine, all figures from one run.

    python bench/bench_label.py --model dmm_cnn --n 1024 --naive-n 128 --batch-size 64 --compile --growth 1000,10000,100000

Prints, for ``--model`` at its native input size (synthetic 178x218 JPEG faces, random weights unless
``--checkpoint`` is given):

1. model-only images/s: ``ModelRunner.forward_uint8`` on pre-decoded uint8 batches in this process, with the
   predictor actor's threads, at ``--precision`` (default auto: bf16 on CPUs with AVX-512 BF16 or AMX, else fp32) and in fp32, batch by batch in
   turn after a warm-up;
2. bf16 against fp32 on the same tensors: the share of labels (categorical classes, binary attributes) that
   agree, and the speed ratio;
3. end-to-end images/s of the label job over a local folder (``label()`` in this process, local Ray), as the
   marginal rate between a run of ``n/4`` and a run of ``n`` images after a warm-up run (the actors' start-up
   and checkpoint loading cancel out) and as ``n / wall``; and its ratio to the model-only rate (goal >= 0.9);
4. the loop a user would write (for each file: PIL open, resize, normalise, ``model(x[None])`` in fp32) and the
   end-to-end speed-up over it (goal >= 5x for dmm_cnn);
5. cost growth with ``--growth-model`` (tiny) over ``--growth`` small JPEGs: for each size, ``python -m
   jobs.label`` as a separate driver process connected to this Ray: wall, per-image time, the marginal
   per-image time between sizes, and the driver's peak RSS (its ``VmHWM``), which should stay flat.

Synthetic images are cached under ``--cache`` (default /tmp/bench_label_cache) so reruns skip generating them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import subprocess
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
from core.runner import ModelRunner  # noqa: E402
from facedata.decode import GEOMETRY_KEYS, Whole, decode_batch  # noqa: E402
from facedata.draw import draw_face  # noqa: E402
from facedata.synth import encode_jpeg  # noqa: E402
from models.checkpoint import save_checkpoint  # noqa: E402
from raytasks import label as L  # noqa: E402
from raytasks.label.output import SUMMARY_FILE  # noqa: E402


def faces_folder(cache: Path, n: int, size=(178, 218)) -> Path:
    folder = cache / f"faces_{size[0]}x{size[1]}_{n}"
    if len(list(folder.glob("*.jpg"))) != n:
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (folder / f"face_{i:06d}.jpg").write_bytes(encode_jpeg(draw_face(np.random.default_rng([3, i]), size)[0]))
    return folder


def small_folder(cache: Path, n: int, side: int = 48) -> Path:
    """``n`` small JPEGs (smooth random colour fields, cheap to make), 1,000 per sub-folder."""
    folder = cache / f"small_{side}_{n}"
    marker = folder / ".complete"
    if not marker.exists():
        rng = np.random.default_rng(n)
        base = np.linspace(0, 255, side, dtype=np.float32)
        for i in range(n):
            sub = folder / f"d{i // 1000:04d}"
            if i % 1000 == 0:
                sub.mkdir(parents=True, exist_ok=True)
            c = rng.uniform(0.2, 1.0, 3)
            arr = np.stack([np.add.outer(base * c[0], base * c[1]) / 2, np.add.outer(base * c[2], base[::-1]) / 2,
                            np.full((side, side), 255 * c[1])], axis=-1).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=85)
            (sub / f"s{i:07d}.jpg").write_bytes(buf.getvalue())
        marker.write_text("ok")
    return folder


def label_values(cols: dict, fields) -> list:
    """Every categorical class and binary attribute decision of a batch, flattened."""
    out = []
    for f in fields:
        if str(f.type) in ("string", "bool"):
            out.extend(cols[f.name])
    return out


def model_only(ckpt: str, dec: dict, precisions: tuple[str, str], threads: int, batch: int,
               compile_first: bool = False) -> dict:
    """images/s of the model alone on pre-decoded uint8 batches for two precisions, batch by batch in turn
    (so that both see the same load on a shared machine), and the labels each gives. With
    ``compile_first`` the first precision's predictor is torch.compiled (as the label job's ``--compile``);
    the second (the fp32 reference) stays eager."""
    preds = {p: ModelRunner(ckpt, device="cpu", precision=p, threads=threads,
                          compile_batch=batch if compile_first and k == 0 else None)
             for k, p in enumerate(precisions)}
    images = torch.from_numpy(dec["image_0"])
    n = len(images)
    for pred in preds.values():  # warm-up: allocations, oneDNN primitives for both batch shapes
        pred.forward_uint8(images[:batch])
        pred.forward_uint8(images[(n // batch) * batch:] if n % batch else images[:batch])
    seconds = dict.fromkeys(precisions, 0.0)
    raws = {p: [] for p in precisions}
    for i in range(0, n, batch):
        for p, pred in preds.items():
            start = time.perf_counter()
            raws[p].append(pred.forward_uint8(images[i:i + batch]))
            seconds[p] += time.perf_counter() - start
    h, w = preds[precisions[0]].preprocessing.size
    geometry = [dict(zip(GEOMETRY_KEYS, map(float, g)), input_w=w, input_h=h) for g in dec["geometry_0"]]
    out = {}
    for p, pred in preds.items():
        labels = []
        for k, raw in enumerate(raws[p]):
            labels.extend(label_values(pred.model.to_columns(raw, geometry[k * batch:(k + 1) * batch]),
                                       pred.output_fields))
        out[p] = (n / seconds[p], labels)
    return out


def naive_loop(ckpt: str, files: list[Path]) -> float:
    """What a user writes first: one file at a time, PIL, the model in fp32, batch of one."""
    from models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ckpt)
    pre = model.preprocessing
    mean = torch.tensor(pre.mean).view(-1, 1, 1)
    std = torch.tensor(pre.std).view(-1, 1, 1)
    start = time.perf_counter()
    with torch.no_grad():
        for path in files:
            img = Image.open(path).convert("L" if pre.channels == 1 else "RGB").resize(pre.size[::-1])
            x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
            x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
            model(((x - mean) / std)[None])
    return len(files) / (time.perf_counter() - start)


def timed_label(spec: L.LabelSpec) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = L.label(spec, echo=lambda *_: None)
    return time.perf_counter() - start, summary


def peak_rss_mb(pid: int) -> float | None:
    """The process's own peak resident memory (Linux ``VmHWM``), not its children's."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def growth_run(ckpt: str, folder: Path, out: Path, batch: int, cpus_per_actor: float, address: str) -> dict:
    """``python -m jobs.label`` as its own driver process (connected to this Ray), its wall time and peak RSS."""
    cmd = [sys.executable, "-m", "jobs.label", "--checkpoint", ckpt, "--input", str(folder), "--output", str(out),
           "--batch-size", str(batch), "--cpus-per-actor", str(cpus_per_actor), "--max-actors", "1"]
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, peak_rss_mb(proc.pid) or 0.0)  # VmHWM only grows: the last read is the peak
            time.sleep(0.1)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{shlex.join(cmd)} failed:\n{log.read().decode()[-3000:]}")
    summary = json.loads((out / SUMMARY_FILE).read_text())
    return {"wall_s": wall, "rows": summary["rows_written"], "driver_peak_rss_mb": peak}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dmm_cnn")
    p.add_argument("--checkpoint", default=None, help="a trained checkpoint (default: --model, random weights)")
    p.add_argument("--n", type=int, default=1024, help="images of the end-to-end and model-only runs")
    p.add_argument("--naive-n", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cpus-per-actor", type=float, default=2.0, help="CPUs (torch threads) of the one predictor actor")
    p.add_argument("--precision", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the predictor (model only and end to end)")
    p.add_argument("--growth", default="1000,10000,100000", help="sizes of the growth runs ('' to skip)")
    p.add_argument("--growth-model", default="hard_sharing")
    p.add_argument("--cache", default="/tmp/bench_label_cache")
    args = p.parse_args(argv)
    print("command:", shlex.join([sys.executable.rsplit("/", 1)[-1], "bench/bench_label.py", *sys.argv[1:]]))
    cache = Path(args.cache)
    work = Path(tempfile.mkdtemp(prefix="bench_label_"))
    threads = max(1, int(args.cpus_per_actor))
    torch.set_num_threads(threads)
    if args.model not in models.list_models():
        raise SystemExit(f"model {args.model} is not in the zoo ({', '.join(models.list_models())})")
    ckpt = args.checkpoint or str(work / f"{args.model}.pt")
    if not args.checkpoint:
        torch.manual_seed(0)
        save_checkpoint(models.create_model(args.model), ckpt)
    folder = faces_folder(cache, args.n)
    files = sorted(folder.glob("*.jpg"))
    results: dict = {"model": args.model, "checkpoint": ckpt, "n": args.n, "batch_size": args.batch_size,
                     "compile": args.compile,
                     "threads": threads, "cpu_count": os.cpu_count()}

    # 1-2. model only, bf16 and fp32, on the same decoded tensors
    pre = ModelRunner(ckpt, device="cpu", precision="fp32", threads=threads).preprocessing
    dec = decode_batch([str(f) for f in files], [f.read_bytes() for f in files], Whole((pre,)))
    assert dec["ok"].all()
    rates = model_only(ckpt, dec, (args.precision, "fp32"), threads, args.batch_size, args.compile)
    (auto_rate, auto_labels), (fp32_rate, fp32_labels) = rates[args.precision], rates["fp32"]
    agree = float(np.mean([a == b for a, b in zip(auto_labels, fp32_labels)]))
    results.update(model_only_ips=auto_rate, model_only_fp32_ips=fp32_rate, precision_speedup=auto_rate / fp32_rate,
                   label_agreement=agree, labels_compared=len(auto_labels))
    print(f"model only ({args.precision}): {auto_rate:.1f} images/s; fp32: {fp32_rate:.1f} images/s; "
          f"speed ratio {auto_rate / fp32_rate:.2f}x; labels agreeing with fp32: {100 * agree:.2f} % "
          f"of {len(auto_labels)}")

    # 4. the naive loop (before Ray starts: a user's script has no Ray processes beside it)
    naive = naive_loop(ckpt, files[: args.naive_n])
    results["naive_ips"] = naive
    print(f"naive loop (PIL, fp32, batch 1, {threads} threads): {naive:.1f} images/s")

    # 3. end to end, marginal rate between n/4 and n images
    L.ensure_ray()
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    small = faces_folder(cache, max(1, args.n // 4))
    spec = dict(checkpoint=ckpt, batch_size=args.batch_size, cpus_per_actor=args.cpus_per_actor,
                precision=args.precision, max_actors=1, compile=args.compile)
    timed_label(L.LabelSpec(input=str(small), output=str(work / "e2e_warmup"), **spec))  # worker processes up
    t_small, s_small = timed_label(L.LabelSpec(input=str(small), output=str(work / "e2e_small"), **spec))
    t_full, s_full = timed_label(L.LabelSpec(input=str(folder), output=str(work / "e2e_full"), **spec))
    assert s_full["rows_total"] == args.n and s_small["rows_total"] == max(1, args.n // 4)
    marginal = (args.n - max(1, args.n // 4)) / max(1e-9, t_full - t_small)
    results.update(e2e_wall_s=t_full, e2e_ips=args.n / t_full, e2e_marginal_ips=marginal,
                   e2e_over_model_only=marginal / auto_rate)
    print(f"end to end: {args.n} images in {t_full:.1f} s ({args.n / t_full:.1f} images/s with start-up); "
          f"marginal {marginal:.1f} images/s = {marginal / auto_rate:.2f} x model-only")

    results["e2e_over_naive"] = marginal / naive
    print(f"end to end is {marginal / naive:.1f}x faster than the naive loop")

    # 5. growth
    sizes = [int(s) for s in args.growth.split(",") if s.strip()]
    if sizes:
        gckpt = str(work / f"{args.growth_model}.pt")
        save_checkpoint(models.create_model(args.growth_model), gckpt)
        address = ray.get_runtime_context().gcs_address
        growth, prev = [], None
        for n in sizes:
            folder_n = small_folder(cache, n)
            r = growth_run(gckpt, folder_n, work / f"growth_{n}", args.batch_size * 4, 1.0, address)
            assert r["rows"] == n, r
            r.update(n=n, per_image_ms=1000 * r["wall_s"] / n)
            if prev:
                r["marginal_per_image_ms"] = 1000 * (r["wall_s"] - prev["wall_s"]) / (n - prev["n"])
            growth.append(r)
            prev = r
            print(f"growth {n:>7} images: {r['wall_s']:.1f} s, {r['per_image_ms']:.2f} ms/image"
                  + (f" (marginal {r['marginal_per_image_ms']:.2f} ms/image)" if "marginal_per_image_ms" in r else "")
                  + f", driver peak RSS {r['driver_peak_rss_mb']:.0f} MB")
        results["growth"] = growth
    print(json.dumps(results, indent=1, default=float))
    return results


if __name__ == "__main__":
    main()
