"""The serving side of issue #22 for bench/bench_hostile.py (``--parts serve`` and ``--parts concurrent``): hostile
requests over a real socket to the serving application, each with its answer and time against a budget, and
the service up at the end; then the same hostile requests sent while normal clients keep sending a face.

One local Ray and Serve in this process, three applications built by ``raytasks.serve.build_app``:

* ``main`` (``/``): hard_sharing (``hs``) and age_gender_race (``agr``, dlib's face trunk: the issue's
  per-face cost) with the default limits (256 faces per request, 60 s per model call, 30 s per body), an
  inference key and an admin key;
* ``short`` (``/short``): agr alone, with ``request_timeout_s`` 2 s and ``body_timeout_s`` 5 s, for the 504
  (is the replica freed?) and the slow sender;
* ``nokey`` (``/nokey``): hs, deployed without any API key and without ``allow_no_auth``.

The hostile bodies come from tests/hostile.py, as the tests build them.
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

KEY, ADMIN = "bench-" + uuid.uuid4().hex[:8], "admin-" + uuid.uuid4().hex[:8]
AUTH = {"X-API-Key": KEY}


def _answer(r: httpx.Response) -> str:
    try:
        doc = r.json()
    except ValueError:
        doc = {}
    if r.status_code == 200:
        return f"200 {sum(len(i['faces']) for i in doc['images'])} faces" if "images" in doc else "200"
    return f"{r.status_code} {doc.get('error')}"


def _row(case: str, finding: str, answer: str, seconds: float, budget_s: float, expected: bool) -> dict:
    return {"case": case, "finding": finding, "answer": answer, "seconds": round(seconds, 3), "budget_s": budget_s,
            "ok": bool(expected and seconds <= budget_s)}


def _post(client: httpx.Client, url: str, files: list[tuple[str, bytes, str]], **params) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = client.post(url, params={"faces": "detect", **params},
                    files=[("file", (name, data, ctype)) for name, data, ctype in files])
    return r, time.perf_counter() - t0


def start(tmp: Path, threads: int) -> dict:
    """Ray, Serve and the three applications; returns the base URL, the apps and the time to deploy."""
    import ray
    from ray import serve

    import models
    from models.checkpoint import save_checkpoint
    from raytasks.serve import build_app
    from tests.helpers import free_port

    ckpt = {}
    for name, arch in (("hs", "hard_sharing"), ("agr", "age_gender_race")):
        ckpt[name] = str(tmp / f"{name}.pt")
        save_checkpoint(models.create_model(arch), ckpt[name])
    root = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root, "FACEATTR_ADMIN_KEY": ADMIN}})
    os.environ["FACEATTR_API_KEY"] = KEY  # build_app reads the key in this process
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"num_cpus": 0.25, "threads": threads, "precision": "fp32", "ingress": {"num_cpus": 0.1}}
    t0 = time.perf_counter()
    serve.run(build_app({**common, "models": {"hs": ckpt["hs"], "agr": ckpt["agr"]}}), name="main", route_prefix="/")
    deployed = time.perf_counter() - t0
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, headers=AUTH, timeout=120) as client:
        first = first_request(client, _face(), deployed)  # before anything else reaches the replicas
    serve.run(build_app({**common, "models": {"agr": ckpt["agr"]},
                         "ingress": {"num_cpus": 0.1, "request_timeout_s": 2.0, "body_timeout_s": 5.0}}),
              name="short", route_prefix="/short")
    serve.run(build_app({**common, "models": {"hs": ckpt["hs"]}, "api_key_env": "FACEATTR_BENCH_UNSET_KEY"}),
              name="nokey", route_prefix="/nokey")
    return {"base": base, "port": port, "first": first}


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def first_request(client: httpx.Client, face: bytes, deployed_s: float) -> dict:
    """Issue #22 finding 9: the first request right after the deploy returned (every replica constructed,
    warmed up and reported healthy) and /healthz said ok."""
    health = client.get("/healthz").status_code
    r, s = _post(client, "/v1/models/agr/predict", [("face.jpg", face, "image/jpeg")])
    again, s2 = _post(client, "/v1/models/agr/predict", [("face.jpg", face, "image/jpeg")])
    return _row("first request after /healthz (agr, one photo)", "9",
                f"healthz {health}, first {_answer(r)}; the next {s2:.2f} s (deploy {deployed_s:.0f} s)", s, 2.0,
                health == 200 and r.status_code == 200 and again.status_code == 200)


def requests_cases(server: dict, client: httpx.Client) -> list[dict]:
    from tests.hostile import crowd_photo, flat_webp, slow_post
    from tests.images import photos

    face = photos()["one.jpg"]
    rows = [server["first"]]
    webp = flat_webp(2048, 2048)
    r, s = _post(client, "/v1/models/hs/predict", [(f"{i}.webp", webp, "image/webp") for i in range(64)])
    rows.append(_row(f"64 flat 2048x2048 WebPs ({64 * len(webp) // 1024} KB body)", "1", _answer(r), s, 1.0,
                     r.status_code == 413))
    tall = flat_webp(16383, 2441)
    r, s = _post(client, "/v1/models/hs/predict", [(f"{i}.webp", tall, "image/webp") for i in range(64)])
    rows.append(_row(f"64 flat 16383x2441 WebPs ({64 * len(tall) // 1024} KB)", "2 (decoding)", _answer(r), s, 1.0,
                     r.status_code == 413))
    r, s = _post(client, "/v1/models/hs/predict", [("tall.webp", tall, "image/webp")])
    rows.append(_row(f"one flat 16383x2441 WebP ({len(tall)} bytes)", "2 (decoding)", _answer(r), s, 3.0,
                     r.status_code == 200))
    crowd = crowd_photo(64)
    for n, model in ((5, "agr"), (4, "agr")):
        stats0 = client.get(f"/v1/models/{model}").json()["stats"]
        r, s = _post(client, f"/v1/models/{model}/predict", [(f"c{i}.jpg", crowd, "image/jpeg") for i in range(n)])
        ran = client.get(f"/v1/models/{model}").json()["stats"]["faces"] - stats0["faces"]
        detail = r.json().get("faces") if r.status_code == 413 else None
        rows.append(_row(f"{n} photos of 64 faces ({model})", "2 (faces)",
                         f"{_answer(r)}{f' ({detail} found)' if detail else ''}; model ran on {ran} faces", s,
                         15.0 if n == 5 else 30.0, (r.status_code == 413 and ran == 0) if n == 5 else r.status_code == 200))
    rows.append(timeout_frees_the_replica(client, crowd, face))
    status, doc, s = slow_post(server["port"], "/short/v1/models/agr/predict", b"\xff" * 4000, 0.2, headers=AUTH)
    rows.append(_row("slow body sender (1 byte / 0.2 s)", "partly fixed", f"{status} {doc.get('error')}", s, 6.0,
                     status == 408))
    rows.append(no_key(client))
    rows.append(config_visibility(client))
    return rows


def timeout_frees_the_replica(client: httpx.Client, crowd: bytes, face: bytes) -> dict:
    """Issue #22: "the 504 does not stop the batch already running". On ``short`` (2 s), 4 photos of 64 faces
    (256 faces, within the budget) on agr: 504 at 2 s; then one face, whose wait says whether the replica
    went on with the 256 faces or stopped at its next check."""
    before = client.get("/short/v1/models/agr").json()["stats"]
    r, s = _post(client, "/short/v1/models/agr/predict", [(f"c{i}.jpg", crowd, "image/jpeg") for i in range(4)])
    ok, s2 = _post(client, "/short/v1/models/agr/predict", [("face.jpg", face, "image/jpeg")])
    after = client.get("/short/v1/models/agr").json()["stats"]
    ran = after["faces"] - before["faces"] - (1 if ok.status_code == 200 else 0)
    return _row("504 at 2 s, then one face on the same replica", "2 (504)",
                f"{_answer(r)} in {s:.1f} s; the face after it: {_answer(ok)} in {s2:.2f} s; the model ran on "
                f"{ran} of 256 faces; refused past deadline {after['refused']['deadline'] - before['refused']['deadline']}",
                s2, 2.0, r.status_code == 504 and ok.status_code == 200)


def no_key(client: httpx.Client) -> dict:
    r, s = _post(client, "/nokey/v1/models/hs/predict", [("x.jpg", b"\xff\xd8", "image/jpeg")])
    return _row("an application deployed without a key", "partly fixed", _answer(r), s, 1.0,
                r.status_code == 401 and r.json()["error"] == "no_api_key")


def config_visibility(client: httpx.Client) -> dict:
    t0 = time.perf_counter()
    user = client.get("/v1/models/agr").json()
    admin = client.get("/v1/models/agr", headers={"X-Admin-Key": ADMIN}).json()
    s = time.perf_counter() - t0
    hidden = "config" not in user and set(user["checkpoint"]) == {"hash"}
    return _row("model config to the inference key", "7",
                f"inference key sees config: {'config' in user}, uri: {'uri' in user['checkpoint']}; admin: "
                f"{'config' in admin and 'uri' in admin['checkpoint']}", s, 1.0, hidden and "config" in admin)


def concurrent(server: dict, client: httpx.Client, seconds: float = 30.0, normal_clients: int = 4) -> dict:
    """Normal clients send one face each to hs, one request after another, for ``seconds``; meanwhile hostile
    requests arrive every second in turn: 64 flat WebPs, 5 photos of 64 faces (agr), a slow body sender
    (on ``short``) and 64 flat 16383x2441 WebPs. Every normal request must get 200; their p50 and p99 are
    stated, with the same clients alone for as long before."""
    from tests.hostile import crowd_photo, flat_webp, slow_post
    from tests.images import photos

    face, crowd = photos()["one.jpg"], crowd_photo(64)
    webp, tall = flat_webp(2048, 2048), flat_webp(16383, 2441)
    hostile = [
        ("many_webp", lambda c: _post(c, "/v1/models/hs/predict", [(f"{i}.webp", webp, "image/webp") for i in range(64)])[0].status_code),
        ("faces", lambda c: _post(c, "/v1/models/agr/predict", [(f"c{i}.jpg", crowd, "image/jpeg") for i in range(5)])[0].status_code),
        ("slow_body", lambda c: slow_post(server["port"], "/short/v1/models/agr/predict", b"\xff" * 4000, 0.2, headers=AUTH)[0]),
        ("tall_webp", lambda c: _post(c, "/v1/models/hs/predict", [(f"{i}.webp", tall, "image/webp") for i in range(64)])[0].status_code),
    ]

    def run(with_hostile: bool) -> tuple[list[float], list[int], dict]:
        lat, codes, answers, end = [], [], {}, time.perf_counter() + seconds

        def normal():
            with httpx.Client(base_url=server["base"], headers=AUTH, timeout=120) as c:
                while time.perf_counter() < end:
                    r, s = _post(c, "/v1/models/hs/predict", [("face.jpg", face, "image/jpeg")])
                    lat.append(s)
                    codes.append(r.status_code)

        def attacker():
            with httpx.Client(base_url=server["base"], headers=AUTH, timeout=120) as c:
                k = 0
                while time.perf_counter() < end:
                    name, fn = hostile[k % len(hostile)]
                    answers.setdefault(name, []).append(fn(c))
                    k += 1
                    time.sleep(1.0)

        with ThreadPoolExecutor(normal_clients + 2) as pool:
            futures = [pool.submit(normal) for _ in range(normal_clients)]
            if with_hostile:
                futures += [pool.submit(attacker), pool.submit(attacker)]
            for f in futures:
                f.result()
        return lat, codes, answers

    quiet_lat, quiet_codes, _ = run(False)
    lat, codes, answers = run(True)
    pct = lambda xs, q: float(np.percentile(xs, q))  # noqa: E731
    return {"seconds": seconds, "normal_clients": normal_clients,
            "alone": {"requests": len(quiet_codes), "all_200": set(quiet_codes) == {200},
                      "p50": pct(quiet_lat, 50), "p99": pct(quiet_lat, 99)},
            "with_hostile": {"requests": len(codes), "all_200": set(codes) == {200},
                             "codes": {c: codes.count(c) for c in set(codes)},
                             "p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat)},
            "hostile": {k: {c: v.count(c) for c in set(v)} for k, v in answers.items()},
            "healthz": client.get("/healthz").status_code}


def bench_serve(tmp: Path, threads: int, parts: set[str]) -> tuple[list[dict], dict]:
    server = start(tmp, threads)
    rows, extra = [], {}
    try:
        with httpx.Client(base_url=server["base"], headers=AUTH, timeout=120) as client:
            if "serve" in parts:
                rows = requests_cases(server, client)
            if "concurrent" in parts:
                extra["concurrent"] = concurrent(server, client)
            rows = rows or [server["first"]]
            extra["after"] = {"healthz": client.get("/healthz").status_code,
                              "face": _post(client, "/v1/models/hs/predict", [("f.jpg", _face(), "image/jpeg")])[0].status_code}
    finally:
        stop()
    return rows, extra


def _face() -> bytes:
    from tests.images import photos

    return photos()["one.jpg"]
