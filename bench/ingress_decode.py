"""The ``--ingress-decode`` mode of bench/bench_serve.py: the ingress's decode step alone
(``FaceAttrAPI._decoded``, in this process, no Ray, no model).

    python bench/bench_serve.py --ingress-decode [--decode-repeat 15]

A request of one large image -- a 12 MP camera-sized JPEG and a 22 MB PNG -- priced from its header and decoded for
face detection (``Photos(2048)``, the default ``faces: detect``), and the header checks alone
(``facedata.decode.cost``), each the median wall and CPU time of ``--decode-repeat`` requests after one warm-up.
Imported by bench/bench_serve.py after it has put the repository on ``sys.path``.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from facedata.decode import Photos, cost


def large_images() -> dict[str, bytes]:
    """A 12 MP camera-sized JPEG (4000x3000 gradient and noise, quality 90: about 5.4 MB) and a 22 MB PNG
    (2700x2700 RGB noise, which PNG cannot compress)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:3000, 0:4000]
    base = np.stack([xx * 255 // 4000, yy * 255 // 3000, (xx + yy) * 127 // 7000], -1)
    jpeg = np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)
    out = {}
    for name, arr, fmt, kw in (("12mp.jpg", jpeg, "JPEG", {"quality": 90}),
                               ("noise-22mb.png", rng.integers(0, 256, (2700, 2700, 3), dtype=np.uint8), "PNG", {})):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt, **kw)
        out[name] = buf.getvalue()
    return out


def ingress_decode(args) -> dict:
    """``--ingress-decode``: per file, the ingress's decode step of a one-image request (the header checks that
    price it, then the decode) and the header checks alone, median wall and CPU (this process, the decode
    threads included) milliseconds."""
    import asyncio
    import warnings

    from tests.helpers import ingress

    # the ingress object without Serve (tests/helpers.py): Serve's wrapper's __del__ is a coroutine nobody awaits
    warnings.filterwarnings("ignore", "coroutine .*ASGIIngressWrapper.__del__", RuntimeWarning)
    api, target = ingress(), Photos(2048)

    async def step(name: str, data: bytes) -> None:
        _, held = await api._decoded([(name, data)], target)
        await api._decoded_budget.release(held)

    def med(fn) -> tuple[float, float]:
        wall, cpu = [], []
        for _ in range(args.decode_repeat):
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)

    rows = []
    for name, data in large_images().items():
        asyncio.run(step(name, data))  # warm-up
        loop = asyncio.new_event_loop()
        try:
            wall, cpu = med(lambda: loop.run_until_complete(step(name, data)))  # noqa: B023 - used at once
        finally:
            loop.close()
        check_wall, check_cpu = med(lambda: cost(data, target))  # noqa: B023
        rows.append({"file": name, "bytes": len(data), "decode_step_ms": wall, "decode_step_cpu_ms": cpu,
                     "header_checks_ms": check_wall, "header_checks_cpu_ms": check_cpu})
        print(f"{name} ({len(data) / 1e6:.1f} MB): ingress decode step {wall:.1f} ms (CPU {cpu:.1f}); "
              f"header checks alone {check_wall:.1f} ms (CPU {check_cpu:.1f})", flush=True)
    return {"ingress_decode": rows}


def run_ingress_decode(args, command: str) -> dict:
    """``bench_serve.py --ingress-decode``: the machine, the timings of :func:`ingress_decode`, the load average
    before and after; written to ``args.json`` if given."""
    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
            "load_avg_start": os.getloadavg()}
    print(f"{info['date']}  {info['machine']}  load {info['load_avg_start']}\n{command}", flush=True)
    result = {"info": info, **ingress_decode(args)}
    info["load_avg_end"] = os.getloadavg()
    print(f"load average at the end: {info['load_avg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result
