"""The serving endpoint over real HTTP on 127.0.0.1: jobs/serve.yaml deployed through Serve's config schema
(as `serve run jobs/serve.yaml` does) with the zoo's models at small sizes, one of them from s3:// (moto).

Expected answers: for DMM-CNN (40 binary attributes and landmarks mapped back to original pixels through the
preprocessing geometry), the label job's Parquet rows from a real label run over a folder of the test images;
for the other models, the rows of ``Predictor.predict_bytes`` on the same checkpoint, the code the label job's
rows come from (decode_batch -> Predictor.predict_decoded). One label run only: a Ray Data pipeline costs
25-50 s on this machine, and it must finish before Serve holds its CPUs."""

from __future__ import annotations

import io
import math
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from core.predictor import Predictor
from PIL import Image

import models
from models.checkpoint import save_checkpoint

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-" + uuid.uuid4().hex[:8]
ADMIN_KEY = "admin-key-" + uuid.uuid4().hex[:8]
AUTH = {"X-API-Key": API_KEY}
MAX_REQUEST_BYTES = 300_000
SMALL = {"hard_sharing": {}, "hmtnet": {"image_size": 96}, "dmm_cnn": {"image_size": 64},
         "task_attention": {"image_size": 64}, "age_gender_race": {"depth": 18, "image_size": 64}}
ZOO = models.list_models()
LABELED = "dmm_cnn" if "dmm_cnn" in ZOO else ZOO[0]  # the model whose answers are checked against a label run
SLOW = "hmtnet" if "hmtnet" in ZOO else ZOO[0]  # served with a queue of one for the 503 test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image(seed: int, size: tuple[int, int], mode: str, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (h + w))], -1)
    arr = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


IMAGES = {
    "a.jpg": _image(0, (90, 70), "RGB", "JPEG"),
    "b.png": _image(1, (64, 120), "RGBA", "PNG"),
    "c.jpg": _image(2, (50, 50), "L", "JPEG"),
}
CTYPE = {"jpg": "image/jpeg", "png": "image/png"}


def _ctype(name: str) -> str:
    return CTYPE[name.rsplit(".", 1)[1]]


def _plain(row: dict) -> dict:
    """A Parquet row as pandas gives it -> plain Python values (float32 lists -> lists of floats)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, np.ndarray):
            v = [float(x) for x in v]
        elif isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, float) and math.isnan(v):
            v = None
        out[k] = v
    return out


def _same_row(got: dict, want: dict, tol: float = 2e-3) -> None:
    """Equal field by field: strings, booleans and integers exactly, floats to ``tol`` (relative or absolute):
    fp32 convolutions sum in another order at another batch size or thread count, and through a random
    ResNet-50 that moves DMM-CNN's landmarks by up to ~5e-4 px. A wrong preprocessing or checkpoint moves
    them by whole pixels and the probabilities by far more."""
    assert set(got) == set(want), set(got) ^ set(want)
    for k, w in want.items():
        g = got[k]
        if isinstance(w, float):
            assert g is not None and math.isclose(g, w, rel_tol=tol, abs_tol=tol), (k, g, w)
        elif isinstance(w, list) and w and isinstance(w[0], float):
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=k)
        else:
            assert g == w, (k, g, w)


def _wait_running(apps: list[str], timeout_s: float = 240.0) -> None:
    from ray import serve

    deadline = time.time() + timeout_s
    while True:
        status = serve.status().applications
        states = {a: (status[a].status if a in status else "MISSING") for a in apps}
        failed = {a: status[a].message for a in apps if a in status and status[a].status == "DEPLOY_FAILED"}
        if failed:
            raise AssertionError(f"deploy failed: {failed}")
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.time() > deadline:
            raise AssertionError(f"apps not running after {timeout_s}s: {states}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def svc(ray_session, s3_server, tmp_path_factory, group_photo):
    """The zoo's checkpoints (hard_sharing on S3), a label run over the test images, jobs/serve.yaml deployed
    with those checkpoints and an API key (SLOW with a tiny queue, for the 503 test); expected rows per model
    and image."""
    import boto3
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    tmp = tmp_path_factory.mktemp("serve")
    bucket = f"serve-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    checkpoints = {}
    for name in ZOO:
        uri = f"s3://{bucket}/models/{name}.pt" if name == "hard_sharing" else str(tmp / f"{name}.pt")
        save_checkpoint(models.create_model(name, **SMALL.get(name, {"image_size": 96})), uri)
        checkpoints[name] = uri

    # The label job over a folder of the test images, before Serve holds any CPU.
    from raytasks import label as label_job

    folder = tmp / "photos"
    folder.mkdir()
    for name, data in IMAGES.items():
        (folder / name).write_bytes(data)
    out = tmp / "labels-dmm"
    label_job.label(label_job.LabelSpec(checkpoint=checkpoints[LABELED], input=str(folder), output=str(out),
                                        precision="fp32", faces={"mode": "whole"}), echo=lambda *a, **k: None)
    table = pd.read_parquet(out / "labels")
    label_rows = {Path(r["path"]).name: _plain(r) for r in table.to_dict("records")}
    assert sorted(label_rows) == sorted(IMAGES)
    # and a group photo with face detection (the default): one row per face
    photos = tmp / "group"
    photos.mkdir()
    (photos / "group.jpg").write_bytes(group_photo[0])
    label_job.label(label_job.LabelSpec(checkpoint=checkpoints[LABELED], input=str(photos), output=str(tmp / "faces"),
                                        precision="fp32"), echo=lambda *a, **k: None)
    face_rows = sorted((_plain(r) for r in pd.read_parquet(tmp / "faces" / "labels").to_dict("records")),
                       key=lambda r: r["face"])

    config = yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "raytasks.serve:build_app" and app["route_prefix"] == "/"
    # Test substitutions: checkpoints, small resources on a 2-core machine, exact fp32, a wait long
    # enough for concurrent requests to meet in a batch, a small body limit, the API key.
    # HMTNet (about 30 ms an image here) with a tiny queue: one request at a time, one waiting; more is 503.
    slow = {"checkpoint": checkpoints[SLOW], "max_batch_size": 1, "max_ongoing_requests": 1, "max_queued_requests": 1}
    app["args"].update(models={**checkpoints, SLOW: slow}, precision="fp32", num_cpus=0.2, threads=1,
                       batch_wait_timeout_s=0.05, max_batch_size=8, max_request_bytes=MAX_REQUEST_BYTES,
                       ingress={"num_cpus": 0.1, "max_ongoing_requests": 256},
                       faces={"mode": "whole"})  # these tests send face crops; photos: tests/test_faces_e2e.py
    app["runtime_env"] = {"env_vars": {"FACEATTR_API_KEY": API_KEY, "FACEATTR_ADMIN_KEY": ADMIN_KEY}}
    schema = ServeDeploySchema.model_validate({"applications": [app]})

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # What `serve run jobs/serve.yaml` does (ray/serve/scripts.py): the controller imports the builder
        # named by import_path and builds the app from the config's args.
        serve.context._get_global_client().deploy_apps(schema, _blocking=False)
        expected = {}
        for name, uri in checkpoints.items():  # meanwhile, the expected rows
            if name == LABELED:  # the label job's rows, under the uploaded names
                expected[name] = {n: {**r, "path": n} for n, r in label_rows.items()}
                continue
            p = Predictor(uri, precision="fp32", threads=1)
            expected[name] = {r["path"]: r for r in p.predict_bytes(list(IMAGES.items()))}
        _wait_running([app["name"]])
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=60, headers=AUTH) as client:
            yield {"base": base, "client": client, "expected": expected, "checkpoints": checkpoints,
                   "face_rows": face_rows}
    finally:
        serve.shutdown()


def _predict_one(client: httpx.Client, model: str, name: str, prefix: str = "") -> httpx.Response:
    return client.post(f"{prefix}/v1/models/{model}/predict", params={"filename": name}, content=IMAGES[name],
                       headers={"Content-Type": _ctype(name)})


# --- answers --------------------------------------------------------------------------------------------
def test_a_group_photo_answers_one_row_per_face_equal_to_the_label_job(svc, group_photo):
    """?faces=detect (the server here defaults to whole): per face, the answer is the label job's Parquet
    row for the same photo, and the image lists every face."""
    photo, n_faces = group_photo
    want = svc["face_rows"]
    assert len(want) == n_faces and [r["face"] for r in want] == list(range(n_faces))
    r = svc["client"].post(f"/v1/models/{LABELED}/predict", params={"filename": "group.jpg", "faces": "detect"},
                           content=photo, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    body = r.json()
    (image,) = body["images"]
    assert image["path"] == "group.jpg" and len(image["faces"]) == n_faces and body["detector"] == want[0]["detector"]
    assert body["predictions"] == image["faces"]
    for got, row in zip(image["faces"], want):
        _same_row(got, {**row, "path": "group.jpg"})


@pytest.mark.parametrize("model", ZOO)
def test_answer_equals_the_label_row(svc, model):
    """Per image, raw body and multipart: the answer is the label job's row (LABELED: from its Parquet,
    the file's full path replaced by the uploaded name) or the Predictor's row for the same bytes."""
    client, expected = svc["client"], svc["expected"][model]
    for name in IMAGES:
        r = _predict_one(client, model, name)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == model and body["architecture"] == model
        assert body["checkpoint"] == expected[name]["checkpoint"]
        (row,) = body["predictions"]
        _same_row(row, expected[name])
    # The same images as one multipart request: one row per file, in order, under their file names.
    files = [("file", (n, IMAGES[n], _ctype(n))) for n in IMAGES]
    r = client.post(f"/v1/models/{model}/predict", files=files)
    assert r.status_code == 200, r.text
    rows = r.json()["predictions"]
    assert [row["path"] for row in rows] == list(IMAGES)
    for row in rows:
        _same_row(row, expected[row["path"]])


def test_models_listing_health_and_docs(svc):
    client = svc["client"]
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    listed = {m["name"]: m for m in r.json()["models"]}
    assert set(listed) == set(ZOO)
    # The inference key sees what the models are, not where they live or how they run ...
    admin = {m["name"]: m for m in client.get("/v1/models", headers={"X-Admin-Key": ADMIN_KEY}).json()["models"]}
    for name, m in listed.items():
        want = svc["expected"][name]["a.jpg"]["checkpoint"]
        assert m["checkpoint"] == {"hash": want}
        assert not {"device", "threads", "batchnorm_folded"} & set(m), m.keys()
        assert svc["checkpoints"][name] not in str(m)
        # ... the operator's admin key does
        assert admin[name]["checkpoint"] == {"uri": svc["checkpoints"][name], "hash": want}
        assert admin[name]["device"] == "cpu" and admin[name]["threads"] == 1
        assert m["faces"]["detector"].startswith("retinaface-mobilenet0.25 sha256:")
        created = models.create_model(name, **SMALL.get(name, {"image_size": 96}))
        assert m["outputs"] == created.outputs.describe()
        assert m["preprocessing"] == created.preprocessing.to_dict() | {"size": list(created.preprocessing.size),
                                                                       "mean": list(created.preprocessing.mean),
                                                                       "std": list(created.preprocessing.std)}
        assert m["metrics"] == {} and m["precision"] == "fp32"
    assert svc["checkpoints"]["hard_sharing"].startswith("s3://")  # one model was loaded from S3
    h = httpx.get(svc["base"] + "/healthz")  # no key needed, and it names no model
    assert h.status_code == 200 and h.json() == {"status": "ok"}
    assert httpx.get(svc["base"] + "/docs").status_code == 200
    for hidden in ("/redoc", "/docs/oauth2-redirect"):  # nothing open that is not documented
        assert httpx.get(svc["base"] + hidden).status_code == 404
    spec = httpx.get(svc["base"] + "/openapi.json").json()
    assert "/v1/models/{name}/predict" in spec["paths"]
    assert "multipart/form-data" in spec["paths"]["/v1/models/{name}/predict"]["post"]["requestBody"]["content"]


def test_concurrent_requests_are_batched_and_several_models_served_at_once(svc):
    client, expected = svc["client"], svc["expected"]
    jobs = [(m, n) for _ in range(4) for m in ("hard_sharing", "age_gender_race") for n in IMAGES]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: _predict_one(client, *job), jobs))
    for (m, n), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        _same_row(r.json()["predictions"][0], expected[m][n])
    for m in ("hard_sharing", "age_gender_race"):
        stats = client.get(f"/v1/models/{m}").json()["stats"]
        assert stats["max_batch_size_seen"] > 1, stats
        assert sum(size * count for size, count in
                   ((int(k), v) for k, v in stats["batch_sizes"].items())) == stats["images"]


# --- errors ---------------------------------------------------------------------------------------------
def _assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["detail"], body
    if code:
        assert body["error"] == code, body
    return body


def test_unsupported_and_undecodable_bodies(svc):
    client = svc["client"]
    url = "/v1/models/hard_sharing/predict"
    _assert_error(client.post(url, content=b"name,age\nx,3\n", headers={"Content-Type": "text/csv"}),
                  415, "unsupported_media_type")
    _assert_error(client.post(url, content=IMAGES["a.jpg"], headers={"Content-Type": ""}), 415)
    _assert_error(client.post(url, content=b"definitely not a jpeg", headers={"Content-Type": "image/jpeg"}),
                  422, "not_image")
    _assert_error(client.post(url, content=IMAGES["a.jpg"][: len(IMAGES["a.jpg"]) // 2],
                              headers={"Content-Type": "image/jpeg"}), 422)
    _assert_error(client.post(url, content=b"", headers={"Content-Type": "image/png"}), 422, "empty")
    # One bad file in a multipart request: the request is refused and the bad file is named.
    body = _assert_error(client.post(url, files=[("f", ("good.jpg", IMAGES["a.jpg"], "image/jpeg")),
                                                 ("f", ("bad.jpg", b"\x00" * 100, "image/jpeg"))]), 422)
    assert [f["file"] for f in body["files"]] == ["bad.jpg"]
    _assert_error(client.post(url, data={"note": "hello"}, files=[("f", ("a.jpg", IMAGES["a.jpg"], "image/jpeg"))]),
                  422, "bad_form")
    # The service is still fine.
    assert _predict_one(client, "hard_sharing", "a.jpg").status_code == 200


def test_size_limit(svc):
    client = svc["client"]
    url = "/v1/models/hard_sharing/predict"
    big = IMAGES["a.jpg"] + b"\x00" * MAX_REQUEST_BYTES
    body = _assert_error(client.post(url, content=big, headers={"Content-Type": "image/jpeg"}), 413, "too_large")
    assert body["limit_bytes"] == MAX_REQUEST_BYTES

    def chunks():  # no Content-Length: chunked transfer, refused once the limit is passed
        for _ in range(2 * MAX_REQUEST_BYTES // 65536):
            yield b"\xff" * 65536

    _assert_error(client.post(url, content=chunks(), headers={"Content-Type": "image/jpeg"}), 413, "too_large")
    files = [("f", (f"{i}.jpg", IMAGES["a.jpg"] + b"\x00" * 100_000, "image/jpeg")) for i in range(4)]
    _assert_error(client.post(url, files=files), 413, "too_large")
    assert _predict_one(client, "hard_sharing", "a.jpg").status_code == 200


def test_unknown_model(svc):
    body = _assert_error(_predict_one(svc["client"], "no_such_model", "a.jpg"), 404, "unknown_model")
    assert body["models"] == sorted(ZOO)
    _assert_error(svc["client"].get("/v1/models/no_such_model"), 404, "unknown_model")
    _assert_error(svc["client"].get("/v2/no/such/path"), 404, "not_found")


def test_api_key(svc):
    base = svc["base"]
    with httpx.Client(base_url=base, timeout=30) as anon:
        for r in (anon.get("/v1/models"), _predict_one(anon, "hard_sharing", "a.jpg"),
                  anon.post("/v1/models/hard_sharing/predict", content=IMAGES["a.jpg"],
                            headers={"Content-Type": "image/jpeg", "X-API-Key": "wrong"}),
                  anon.get("/v1/models", headers={"Authorization": "Bearer wrong"})):
            _assert_error(r, 401, "unauthorized")
        assert anon.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert anon.get("/v1/models", headers={"X-API-Key": API_KEY}).status_code == 200


def test_overload_gives_503_and_the_service_stays_up(svc):
    """SLOW's replica takes one request at a time with a queue of one: 24 at once overflow it."""
    client = svc["client"]
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda _: _predict_one(client, SLOW, "a.jpg"), range(24)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) > 0 and codes.count(200) > 0, codes
    rejected = next(r for r in responses if r.status_code == 503)
    _assert_error(rejected, 503, "overloaded")
    assert int(rejected.headers["retry-after"]) >= 1
    for r in responses:
        if r.status_code == 200:
            _same_row(r.json()["predictions"][0], svc["expected"][SLOW]["a.jpg"])
    # Afterwards: healthy and answering, this model and the others.
    assert httpx.get(svc["base"] + "/healthz").status_code == 200
    assert _predict_one(client, SLOW, "a.jpg").status_code == 200
    assert _predict_one(client, "hard_sharing", "a.jpg").status_code == 200


# --- configuration (no Ray needed) -----------------------------------------------------------------------
def test_cli_flags_become_valid_app_args():
    from jobs.serve import build_args, parser
    from raytasks.serve import ServeArgs, deployment_options
    from raytasks.threads import runtime_env

    ns = parser().parse_args(["--model", "dmm=s3://b/models/dmm.pt", "--model", "agr=./agr.pt", "--port", "8001",
                              "--autoscale", "1:3", "--num-gpus", "1", "--max-batch-size", "32"])
    assert (ns.host, ns.port) == ("127.0.0.1", 8001)
    args = ServeArgs.model_validate(build_args(ns))
    assert args.models == {"dmm": "s3://b/models/dmm.pt", "agr": "./agr.pt"}
    opts = deployment_options(args.model_settings("dmm"))
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0, "runtime_env": runtime_env()}
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 32}
    assert "num_replicas" not in opts
    assert opts["user_config"] == {"max_batch_size": 32, "batch_wait_timeout_s": 0.01}
    assert opts["max_ongoing_requests"] == 64
    with pytest.raises(SystemExit):
        parser().parse_args(["--model", "no-uri-given"])
    with pytest.raises(SystemExit):
        build_args(parser().parse_args(["--model", "a=x.pt", "--model", "a=y.pt"]))


@pytest.mark.parametrize("bad", [
    {"models": {}},
    {"models": {"has space": "x.pt"}},
    {"models": {"a": "x.pt"}, "max_batch_size": 0},
    {"models": {"a": "x.pt"}, "max_batch_sise": 8},
    {"models": {"a": {"num_gpus": 1}}},
])
def test_bad_app_args_are_refused(bad):
    from raytasks.serve import ServeArgs

    with pytest.raises(ValueError):
        ServeArgs.model_validate(bad)


def test_per_model_settings_override_the_defaults():
    from raytasks.serve import ServeArgs, deployment_options

    args = ServeArgs.model_validate({"models": {"a": "a.pt", "b": {"checkpoint": "b.pt", "num_replicas": 2,
                                                                    "max_batch_size": 64}},
                                     "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}})
    a, b = (deployment_options(args.model_settings(n)) for n in "ab")
    assert a["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4} and "num_replicas" not in a
    assert b["num_replicas"] == 2 and "autoscaling_config" not in b
    assert b["user_config"]["max_batch_size"] == 64 and a["user_config"]["max_batch_size"] == 16
