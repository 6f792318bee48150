"""Serving benchmark: a bounded load generator on loopback against the Ray Serve endpoint, side by side with
the same model without HTTP, in one run.

    python bench/bench_serve.py [--model age_gender_race] [--requests 200] [--concurrency 1,8,32] [--faces detect]
    python bench/bench_serve.py --ingress-decode [--decode-repeat 15]

With ``--faces detect`` every request is a photo (640-1000 px, 1-2 faces composed from real UTKFace faces when
../shared/data is present) and both sides find, align and label every face: model only is
``Annotator.annotate_bytes`` (bytes -> rows per face), "forward only" is detection +
alignment + model on pre-decoded photos; the server runs with ``faces: {mode: detect}``.

1. Model only, in this process (``core.annotator.Annotator``, the code a replica runs): the time of one
   image (bytes -> row) and the batched throughput at ``--max-batch-size`` (bytes -> rows, and the forward
   pass alone).
2. Served: ``raytasks.serve:build_app`` on 127.0.0.1, once with dynamic batching (``--max-batch-size``,
   ``--batch-wait-timeout-s``) and once without (max_batch_size 1). For each concurrency C, C client
   threads (one keep-alive connection each) send ``--requests`` requests in total, one JPEG each, and stop.
   Throughput = requests / wall time; p50 / p99 of the per-request latency; mean batch size from the
   replica's counters.

``--ingress-decode`` times only the ingress's decode step instead, in this process (bench/ingress_decode.py).

Goals (issue 5): at concurrency 32 with batching, served throughput >= 0.8 x model-only batched throughput;
at concurrency 1, p50 within 20 ms of the single-image model time. The checkpoint is randomly initialised
(the cost of a forward pass does not depend on the weights). Timings on a shared machine are noisy: read
the ratios, which are measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import io
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from bench.cpu_accounting import process_titles  # noqa: E402
from bench.ingress_decode import run_ingress_decode  # noqa: E402
from core.annotator import Annotator  # noqa: E402
from facedata.decode import Photos, Whole, decode_batch  # noqa: E402
from models.checkpoint import save_checkpoint  # noqa: E402


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise SystemExit(f"--set wants KEY=VALUE, got {it!r}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def make_jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        base = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, (i * 37) % 256)], -1)
        arr = np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_photos(n: int) -> list[bytes]:
    """Photos of 640-1000 px with 1-2 faces each (bench/bench_faces.py's sources)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_faces import sources

    from facedata.compose import compose
    from facedata.synth import encode_jpeg

    src, _ = sources(16)
    return [encode_jpeg(Image.fromarray(compose(src, 500 + i, n_faces=(1, 2), canvas=(640, 1000),
                                                face_width=(80, 240), max_angle=15).image)) for i in range(n)]


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def model_only(ckpt: str, images: list[bytes], args) -> dict:
    p = Annotator(ckpt, faces={"mode": args.faces}, precision=args.precision, threads=args.threads)
    b = args.max_batch_size
    one = [("x.jpg", images[0])]
    batch = [(f"{i}.jpg", images[i % len(images)]) for i in range(b)]
    if args.faces == "detect":
        dec = decode_batch([n for n, _ in batch], [d for _, d in batch], Photos(p.face_options.max_side))
        forward = lambda: p.annotate(dec)  # noqa: E731 - detect + align + model, pre-decoded
    else:
        dec = decode_batch([n for n, _ in batch], [d for _, d in batch], Whole(tuple(p.preprocessings)))
        x = torch.from_numpy(dec["image_0"])
        (runner,) = p.members.values()
        forward = lambda: runner.forward_uint8(x)  # noqa: E731
    for _ in range(3):  # warm-up: kernel plans for batch 1 and batch B
        p.annotate_bytes(one)
        p.annotate_bytes(batch)
    single = timed(lambda: p.annotate_bytes(one), args.single_repeat)
    batched = timed(lambda: p.annotate_bytes(batch), args.batch_repeat)
    fwd = timed(forward, args.batch_repeat)
    return {
        "precision": p.precision,
        "single_image_ms_p50": 1000 * statistics.median(single),
        "batched_img_s": b / statistics.median(batched),
        "forward_only_batched_img_s": b / statistics.median(fwd),
        "batch_size": b,
    }


class Client(threading.Thread):
    """One keep-alive connection sending requests until the shared counter runs out."""

    def __init__(self, port: int, path: str, images: list[bytes], counter, latencies: list, errors: list):
        super().__init__(daemon=True)
        self.port, self.path, self.images = port, path, images
        self.counter, self.latencies, self.errors = counter, latencies, errors

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        while True:
            i = self.counter()
            if i is None:
                break
            body = self.images[i % len(self.images)]
            t = time.perf_counter()
            try:
                conn.request("POST", self.path, body=body, headers={"Content-Type": "image/jpeg"})
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as e:
                self.errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                continue
            dt_s = time.perf_counter() - t
            if status != 200:
                self.errors.append(f"HTTP {status}: {data[:200]!r}")
            else:
                self.latencies.append(dt_s)
        conn.close()


def load(port: int, path: str, images: list[bytes], n: int, concurrency: int) -> dict:
    lock = threading.Lock()
    state = {"next": 0}

    def counter():
        with lock:
            if state["next"] >= n:
                return None
            state["next"] += 1
            return state["next"] - 1

    latencies: list[float] = []
    errors: list[str] = []
    clients = [Client(port, path, images, counter, latencies, errors) for _ in range(concurrency)]
    t = time.perf_counter()
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    wall = time.perf_counter() - t
    lat = np.array(latencies) * 1000
    return {"requests": n, "ok": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else None,
            "wall_s": wall, "throughput_req_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan")}


def replica_stats(port: int, model: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", f"/v1/models/{model}")
    stats = json.loads(conn.getresponse().read())["stats"]
    conn.close()
    return stats


def _serve_processes() -> dict[int, str]:
    """pid -> role of the Serve processes on this machine (HTTP proxy, ingress, model replica)."""
    roles = {}
    for pid, cmd in process_titles().items():
        if cmd.startswith("ray::ProxyActor"):
            roles[pid] = "proxy"
        elif cmd.startswith("ray::ServeReplica") and "FaceAttrAPI" in cmd:
            roles[pid] = "ingress"
        elif cmd.startswith("ray::ServeReplica") and "model-" in cmd:
            roles[pid] = "model"
    roles[os.getpid()] = "client"
    return roles


def _cpu_seconds(pids) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return out


def served(ckpt: str, images: list[bytes], args, port: int, batched: bool) -> list[dict]:
    from ray import serve

    from raytasks.serve import build_app

    mbs = args.max_batch_size if batched else 1
    app = build_app({
        "models": {"m": ckpt}, "precision": args.precision, "threads": args.replica_threads or args.threads,
        "num_cpus": 1, "num_replicas": args.replicas,
        "max_batch_size": mbs, "batch_wait_timeout_s": args.batch_wait_timeout_s if batched else 0.0,
        "max_ongoing_requests": max(64, 2 * mbs), "max_queued_requests": -1,
        "ingress": {"num_cpus": 0.5, "max_ongoing_requests": 1024}, "faces": {"mode": args.faces}, "allow_no_auth": True,
    })
    serve.run(app, name="bench", route_prefix="/")
    path = "/v1/models/m/predict"
    load(port, path, images, max(args.concurrency) + 4, max(args.concurrency))  # warm-up: batch sizes 1..B
    load(port, path, images, 4, 1)
    rows = []
    for c in args.concurrency:
        before = replica_stats(port, "m")
        roles = _serve_processes()
        cpu0 = _cpu_seconds(roles)
        r = load(port, path, images, args.requests, c)
        cpu1 = _cpu_seconds(roles)
        after = replica_stats(port, "m")
        cpu_ms = {}
        for pid, role in roles.items():  # CPU time per request of each role (user + system), all its processes
            if pid in cpu0 and pid in cpu1:
                cpu_ms[role] = cpu_ms.get(role, 0.0) + 1000 * (cpu1[pid] - cpu0[pid]) / max(1, r["ok"])
        r["cpu_ms_per_request"] = cpu_ms
        batches = after["batches"] - before["batches"]
        r.update(mode="batched" if batched else "unbatched", concurrency=c, max_batch_size=mbs,
                 mean_batch=(after["images"] - before["images"]) / batches if batches else float("nan"))
        rows.append(r)
        print(f"  {r['mode']:>9}  c={c:<3} {r['throughput_req_s']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
              f"p99 {r['p99_ms']:7.1f} ms  mean batch {r['mean_batch']:5.1f}  errors {r['errors']}  CPU ms/request: "
              + ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu_ms.items())), flush=True)
    serve.delete("bench")
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="age_gender_race", help="a registered model (random weights)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model constructor override")
    p.add_argument("--checkpoint", default=None, help="use this checkpoint instead of a random one")
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency level and mode")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch threads, model only and replica (use 1 on an oversubscribed machine: OpenMP "
                        "threads that wait for a descheduled sibling make 2 threads 30x slower there)")
    p.add_argument("--replica-threads", type=int, default=None,
                   help="torch threads of each model replica (default: --threads; the model-only figures always "
                        "use --threads)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--image-px", type=int, default=200, help="side of the test JPEGs")
    p.add_argument("--single-repeat", type=int, default=30)
    p.add_argument("--batch-repeat", type=int, default=8)
    p.add_argument("--skip-unbatched", action="store_true")
    p.add_argument("--faces", choices=("whole", "detect"), default="whole",
                   help="detect: photos with faces, found and aligned on both sides")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--ingress-decode", action="store_true",
                   help="time only the ingress's decode step on a 12 MP JPEG and a 22 MB PNG (no Ray, no model)")
    p.add_argument("--decode-repeat", type=int, default=15, help="requests per file with --ingress-decode")
    args = p.parse_args(argv)
    command = "python bench/bench_serve.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    torch.set_num_threads(args.threads)
    if args.ingress_decode:
        return run_ingress_decode(args, command)

    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = os.path.join(tmp, f"{args.model}.pt")
        save_checkpoint(models.create_model(args.model, **parse_overrides(args.set)).eval(), ckpt)
    images = make_photos(32) if args.faces == "detect" else make_jpegs(32, args.image_px)
    info = {"date": dt.datetime.now().isoformat(timespec="seconds"), "command": command,
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
            "load_avg_start": os.getloadavg(), "model": args.model, "overrides": parse_overrides(args.set)}
    print(f"{info['date']}  {info['machine']}  load {info['load_avg_start']}\n{command}", flush=True)

    mo = model_only(ckpt, images, args)
    print(f"model only ({mo['precision']}, {args.threads} threads): one image {mo['single_image_ms_p50']:.1f} ms; "
          f"batch {mo['batch_size']}: {mo['batched_img_s']:.1f} img/s bytes->rows, "
          f"{mo['forward_only_batched_img_s']:.1f} img/s forward only", flush=True)

    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        rows = served(ckpt, images, args, port, batched=True)
        if not args.skip_unbatched:
            rows += served(ckpt, images, args, port, batched=False)
    finally:
        serve.shutdown()
        ray.shutdown()

    info["load_avg_end"] = os.getloadavg()
    top = max(args.concurrency)
    b32 = next((r for r in rows if r["mode"] == "batched" and r["concurrency"] == top), None)
    b1 = next((r for r in rows if r["mode"] == "batched" and r["concurrency"] == 1), None)
    goals = {}
    if b32:
        goals[f"c{top}_vs_model_batched"] = b32["throughput_req_s"] / mo["batched_img_s"]
        goals[f"c{top}_vs_forward_only"] = b32["throughput_req_s"] / mo["forward_only_batched_img_s"]
    if b1:
        goals["c1_p50_minus_single_ms"] = b1["p50_ms"] - mo["single_image_ms_p50"]
    print("goals: " + ", ".join(f"{k} = {v:.2f}" for k, v in goals.items())
          + f"  (want c{top} ratio >= 0.8, c1 excess <= 20 ms)")
    print(f"load average at the end: {info['load_avg_end']}")
    result = {"info": info, "model_only": mo, "served": rows, "goals": goals}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
