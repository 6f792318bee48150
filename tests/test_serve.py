"""The serving endpoint over real HTTP on 127.0.0.1: ONE Serve application for the whole module, jobs/serve.yaml
deployed through Serve's config schema (as `serve run jobs/serve.yaml` does), serving the zoo's five models at
small sizes on the per-model routes (hard_sharing from s3:// on moto; age_gender_race under the URL name
``agr-v1``) and three of them, plus the face embedding, as the model set of ``POST /v1/predict`` and
``GET /v1/set`` (issue #14) with the columns ``hs``, ``dmm`` and ``agr``.

Expected answers are the core's rows (``core.annotator.Annotator.annotate_bytes``) for the same bytes and
checkpoints: the label job's rows equal the core's (tests/test_label.py, tests/test_faces_e2e.py,
tests/test_modelset.py), so an answer equal to the core's is the label job's Parquet row. The configuration
and the ingress's guards are checked without Ray (below, and tests/test_serve_guards.py)."""

from __future__ import annotations

import io
import json
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

import models
from core.annotator import Annotator
from core.modelset import ModelSet, resolve_set
from tests.helpers import assert_error, assert_same, free_port, photos, save_model

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-" + uuid.uuid4().hex[:8]
ADMIN_KEY = "admin-key-" + uuid.uuid4().hex[:8]
AUTH = {"X-API-Key": API_KEY}
MAX_REQUEST_BYTES = 1_000_000
ZOO = models.list_models()
URL = {name: name for name in ZOO} | {"age_gender_race": "agr-v1"}  # architecture -> the name it is served as
# the sizes served: the set's three are conftest's ``three`` (dmm_cnn on a ResNet-18 trunk, age_gender_race
# on dlib's face trunk at 150 px), the other two small
SMALL = {"hard_sharing": {}, "hmtnet": {"image_size": 96}, "dmm_cnn": {"depth": 18, "image_size": 64},
         "task_attention": {"image_size": 64}, "age_gender_race": {}}
LABELED = "dmm_cnn" if "dmm_cnn" in ZOO else ZOO[0]  # the model asked for the faces of a group photo
SLOW = "hmtnet" if "hmtnet" in ZOO else ZOO[0]  # served with a queue of one for the 503 test
COLUMNS = {"hard_sharing": "hs", "dmm_cnn": "dmm", "agr-v1": "agr"}  # the set: URL name -> its column
TOL = 1e-4  # the set's answers against the core's rows


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


def _same_row(got: dict, want: dict, tol: float = 2e-3) -> None:
    """Equal field by field: strings, booleans and integers exactly, floats to ``tol`` (relative or absolute):
    fp32 convolutions sum in another order at another batch size or thread count, and through a random
    ResNet that moves DMM-CNN's landmarks by up to ~5e-4 px. A wrong preprocessing or checkpoint moves
    them by whole pixels and the probabilities by far more."""
    assert set(got) == set(want), set(got) ^ set(want)
    for k, w in want.items():
        g = got[k]
        if isinstance(w, float) and math.isnan(w):
            assert g is None, (k, g)
        elif isinstance(w, float):
            assert g is not None and math.isclose(g, w, rel_tol=tol, abs_tol=tol), (k, g, w)
        elif isinstance(w, list) and w and isinstance(w[0], float):
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=k)
        else:
            assert g == w, (k, g, w)


def _wait_running(apps: list[str], timeout_s: float = 300.0) -> None:
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


def _set_photos(group_photo) -> dict[str, bytes]:
    """The group photo (3 faces) and a photo without a face."""
    return {"group.jpg": group_photo[0], "none.jpg": photos()["none.jpg"]}


@pytest.fixture(scope="module")
def svc(ray_session, s3_server, tmp_path_factory, group_photo, three):
    """The zoo's checkpoints (hard_sharing on S3; three of them conftest's ``three``), jobs/serve.yaml deployed
    with those checkpoints, the set of three plus the embedding, and an API key (SLOW with a tiny queue, for
    the 503 test); meanwhile the core's expected rows per model and image, and for the set."""
    import boto3
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    tmp = tmp_path_factory.mktemp("serve")
    bucket = f"serve-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    checkpoints = {}  # URL name -> URI
    for name in ZOO:
        if name == "hard_sharing":
            uri = f"s3://{bucket}/models/{name}.pt"
            from facedata import storage

            storage.write_bytes(uri, Path(three[name]).read_bytes())
        elif name in three:
            uri = three[name]
        else:
            uri = save_model(str(tmp / f"{name}.pt"), name, **SMALL.get(name, {"image_size": 96}))
        checkpoints[URL[name]] = uri

    config = yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "raytasks.serve:build_app" and app["route_prefix"] == "/"
    # Test substitutions: checkpoints, small resources on a 2-core machine, exact fp32, a wait long
    # enough for concurrent requests to meet in a batch, a small body limit, the API key.
    # HMTNet (about 30 ms an image here) with a tiny queue: one request at a time, one waiting; more is 503.
    slow = {"checkpoint": checkpoints[URL[SLOW]], "max_batch_size": 1, "max_ongoing_requests": 1,
            "max_queued_requests": 1}
    app["args"].update(models={**checkpoints, URL[SLOW]: slow}, precision="fp32", num_cpus=0.2, threads=1,
                       batch_wait_timeout_s=0.05, max_batch_size=8, max_request_bytes=MAX_REQUEST_BYTES,
                       ingress={"num_cpus": 0.1, "max_ongoing_requests": 256},
                       model_set={"models": COLUMNS, "embedding": True, "num_cpus": 0.3},
                       faces={"mode": "whole"})  # the per-model tests send face crops; ?faces=detect for photos
    app["runtime_env"] = {"env_vars": {"FACEATTR_API_KEY": API_KEY, "FACEATTR_ADMIN_KEY": ADMIN_KEY}}
    schema = ServeDeploySchema.model_validate({"applications": [app]})

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # What `serve run jobs/serve.yaml` does (ray/serve/scripts.py): the controller imports the builder
        # named by import_path and builds the app from the config's args.
        serve.context._get_global_client().deploy_apps(schema, _blocking=False)
        expected = {}  # meanwhile, the core's rows
        for name in ZOO:
            ann = Annotator(checkpoints[URL[name]], precision="fp32", threads=1)
            expected[name] = {r["path"]: r for r in ann.annotate_bytes(list(IMAGES.items()), faces="whole")}
            if name == LABELED:  # and a group photo with face detection: one row per face
                face_rows = ann.annotate_bytes([("group.jpg", group_photo[0])], faces="detect")
        # the set as the label job makes it of the same checkpoints (--checkpoint hs=... --embedding)
        model_set = ModelSet.parse([f"{c}={checkpoints[u]}" for u, c in COLUMNS.items()], embedding=True)
        set_photos = _set_photos(group_photo)
        set_ann = Annotator(model_set, precision="fp32", threads=1)
        set_rows = set_ann.annotate_bytes(list(set_photos.items()), faces="detect")
        resolved = resolve_set(model_set)  # what the label job's driver reads (its summary's models, identity)
        assert resolved.identity == set_ann.identity
        set_expected = {"identity": set_ann.identity, "models": resolved.describe(),
                        "rows": {(r["path"], r["face"]): r for r in set_rows}}
        _wait_running([app["name"]])
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=120, headers=AUTH) as client:
            yield {"base": base, "client": client, "expected": expected, "checkpoints": checkpoints,
                   "face_rows": face_rows, "set": set_expected, "set_photos": set_photos}
    finally:
        serve.shutdown()


def _predict_one(client: httpx.Client, model: str, name: str, prefix: str = "") -> httpx.Response:
    """``model``: an architecture of the zoo (served as URL[model]) or a URL name."""
    return client.post(f"{prefix}/v1/models/{URL.get(model, model)}/predict", params={"filename": name},
                       content=IMAGES[name], headers={"Content-Type": _ctype(name)})


# --- answers --------------------------------------------------------------------------------------------
def test_a_group_photo_answers_one_row_per_face_equal_to_the_label_job(svc, group_photo):
    """?faces=detect (the server here defaults to whole): per face, the answer is the core's row (the label
    job's Parquet row) for the same photo, and the image lists every face."""
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
    """Per image, raw body and multipart: the answer is the core's row (the label job's row) for the same
    bytes; the server's default (faces: whole) applies."""
    client, expected = svc["client"], svc["expected"][model]
    for name in IMAGES:
        r = _predict_one(client, model, name)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == URL[model] and body["architecture"] == model
        assert body["checkpoint"] == expected[name]["checkpoint"]
        (row,) = body["predictions"]
        _same_row(row, expected[name])
    # The same images as one multipart request: one row per file, in order, under their file names.
    files = [("file", (n, IMAGES[n], _ctype(n))) for n in IMAGES]
    r = client.post(f"/v1/models/{URL[model]}/predict", files=files)
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
    assert set(listed) == set(URL.values())
    # The inference key sees what the models are, not where they live or how they run ...
    admin = {m["name"]: m for m in client.get("/v1/models", headers={"X-Admin-Key": ADMIN_KEY}).json()["models"]}
    for name in ZOO:
        m = listed[URL[name]]
        want = svc["expected"][name]["a.jpg"]["checkpoint"]
        assert m["checkpoint"] == {"hash": want}
        assert not {"device", "threads", "batchnorm_folded"} & set(m), m.keys()
        assert svc["checkpoints"][URL[name]] not in str(m)
        # ... the operator's admin key does
        assert admin[URL[name]]["checkpoint"] == {"uri": svc["checkpoints"][URL[name]], "hash": want}
        assert admin[URL[name]]["device"] == "cpu" and admin[URL[name]]["threads"] == 1
        assert m["faces"]["detector"].startswith("retinaface-mobilenet0.25 sha256:")
        created = models.create_model(name, **SMALL.get(name, {"image_size": 96}))
        assert m["outputs"] == created.outputs.describe()
        # as JSON carries it (tuples become lists: size, mean, std, a face template's points)
        assert m["preprocessing"] == json.loads(json.dumps(created.preprocessing.to_dict()))
        assert m["metrics"] == {} and m["precision"] == "fp32"
    assert svc["checkpoints"]["hard_sharing"].startswith("s3://")  # one model was loaded from S3
    h = httpx.get(svc["base"] + "/healthz")  # no key needed, and it names no model
    assert h.status_code == 200 and h.json() == {"status": "ok"}
    assert httpx.get(svc["base"] + "/docs").status_code == 200
    for hidden in ("/redoc", "/docs/oauth2-redirect"):  # nothing open that is not documented
        assert httpx.get(svc["base"] + hidden).status_code == 404
    spec = httpx.get(svc["base"] + "/openapi.json").json()
    assert {"/v1/models/{name}/predict", "/v1/predict", "/v1/set"} <= set(spec["paths"])
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
        stats = client.get(f"/v1/models/{URL[m]}").json()["stats"]
        assert stats["max_batch_size_seen"] > 1, stats
        assert sum(size * count for size, count in
                   ((int(k), v) for k, v in stats["batch_sizes"].items())) == stats["images"]


# --- errors ---------------------------------------------------------------------------------------------
def test_unsupported_and_undecodable_bodies(svc):
    client = svc["client"]
    url = "/v1/models/hard_sharing/predict"
    assert_error(client.post(url, content=b"name,age\nx,3\n", headers={"Content-Type": "text/csv"}),
                  415, "unsupported_media_type")
    assert_error(client.post(url, content=IMAGES["a.jpg"], headers={"Content-Type": ""}), 415)
    assert_error(client.post(url, content=b"definitely not a jpeg", headers={"Content-Type": "image/jpeg"}),
                  422, "not_image")
    assert_error(client.post(url, content=IMAGES["a.jpg"][: len(IMAGES["a.jpg"]) // 2],
                              headers={"Content-Type": "image/jpeg"}), 422)
    assert_error(client.post(url, content=b"", headers={"Content-Type": "image/png"}), 422, "empty")
    # One bad file in a multipart request: the request is refused and the bad file is named.
    body = assert_error(client.post(url, files=[("f", ("good.jpg", IMAGES["a.jpg"], "image/jpeg")),
                                                 ("f", ("bad.jpg", b"\x00" * 100, "image/jpeg"))]), 422)
    assert [f["file"] for f in body["files"]] == ["bad.jpg"]
    assert_error(client.post(url, data={"note": "hello"}, files=[("f", ("a.jpg", IMAGES["a.jpg"], "image/jpeg"))]),
                  422, "bad_form")
    # The service is still fine.
    assert _predict_one(client, "hard_sharing", "a.jpg").status_code == 200


def test_size_limit(svc):
    client = svc["client"]
    url = "/v1/models/hard_sharing/predict"
    big = IMAGES["a.jpg"] + b"\x00" * MAX_REQUEST_BYTES
    body = assert_error(client.post(url, content=big, headers={"Content-Type": "image/jpeg"}), 413, "too_large")
    assert body["limit_bytes"] == MAX_REQUEST_BYTES

    def chunks():  # no Content-Length: chunked transfer, refused once the limit is passed
        for _ in range(2 * MAX_REQUEST_BYTES // 65536):
            yield b"\xff" * 65536

    assert_error(client.post(url, content=chunks(), headers={"Content-Type": "image/jpeg"}), 413, "too_large")
    files = [("f", (f"{i}.jpg", IMAGES["a.jpg"] + b"\x00" * (MAX_REQUEST_BYTES // 3), "image/jpeg")) for i in range(4)]
    assert_error(client.post(url, files=files), 413, "too_large")
    assert _predict_one(client, "hard_sharing", "a.jpg").status_code == 200


def test_unknown_model(svc):
    body = assert_error(_predict_one(svc["client"], "no_such_model", "a.jpg"), 404, "unknown_model")
    assert body["models"] == sorted(URL.values())
    assert_error(svc["client"].get("/v1/models/no_such_model"), 404, "unknown_model")
    assert_error(svc["client"].get("/v2/no/such/path"), 404, "not_found")


def test_api_key(svc):
    base = svc["base"]
    with httpx.Client(base_url=base, timeout=30) as anon:
        for r in (anon.get("/v1/models"), _predict_one(anon, "hard_sharing", "a.jpg"),
                  anon.post("/v1/models/hard_sharing/predict", content=IMAGES["a.jpg"],
                            headers={"Content-Type": "image/jpeg", "X-API-Key": "wrong"}),
                  anon.get("/v1/models", headers={"Authorization": "Bearer wrong"})):
            assert_error(r, 401, "unauthorized")
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
    assert_error(rejected, 503, "overloaded")
    assert int(rejected.headers["retry-after"]) >= 1
    for r in responses:
        if r.status_code == 200:
            _same_row(r.json()["predictions"][0], svc["expected"][SLOW]["a.jpg"])
    # Afterwards: healthy and answering, this model and the others.
    assert httpx.get(svc["base"] + "/healthz").status_code == 200
    assert _predict_one(client, SLOW, "a.jpg").status_code == 200
    assert _predict_one(client, "hard_sharing", "a.jpg").status_code == 200




# --- the model set: POST /v1/predict, GET /v1/set ------------------------------------------------------------
def _post(client: httpx.Client, photos_: dict[str, bytes], url: str = "/v1/predict", **params) -> httpx.Response:
    files = [("file", (n, d, "image/jpeg")) for n, d in photos_.items()]
    return client.post(url, files=files, params=params)


def test_one_request_answers_every_model_for_every_face_as_the_label_job(svc, group_photo):
    """Two photos in one multipart request: per (photo, face) the row equals the core's row (the label job's
    Parquet row) for the same set, every model's struct field by field and the embedding; the set's identity
    and members are the label job's; the group photo lists every face, the photo without a face one row with
    empty structs."""
    r = _post(svc["client"], svc["set_photos"], faces="detect")
    assert r.status_code == 200, r.text
    body = r.json()
    expected = svc["set"]
    assert body["set"] == "set" and body["checkpoint"] == expected["identity"]
    assert body["models"] == expected["models"]
    assert [m["name"] for m in body["models"]] == ["hs", "dmm", "agr", "embedding"]
    group, none = body["images"]
    n_faces = group_photo[1]
    assert group["path"] == "group.jpg" and len(group["faces"]) == n_faces and none["faces"] == []
    assert body["predictions"] == group["faces"] + [body["predictions"][-1]]
    assert body["detector"] == group["faces"][0]["detector"]
    want = expected["rows"]
    assert len(body["predictions"]) == len(want) == n_faces + 1
    for row in body["predictions"]:
        assert_same(row, want[(row["path"], row["face"])], f"{row['path']}#{row['face']}", TOL)
    for face in group["faces"]:
        assert [face[c]["model"] for c in ("hs", "dmm", "agr")] == ["hard_sharing", "dmm_cnn", "age_gender_race"]
        assert len(face["embedding"]) == 128 and face["embedding_model"].startswith("dlib_face_recognition")
    (empty,) = [r for r in body["predictions"] if r["path"] == "none.jpg"]
    assert empty["faces"] == 0 and empty["face"] is None and empty["embedding"] is None
    assert empty["hs"]["model"] == "hard_sharing" and empty["hs"]["gender"] is None


def test_whole_images_one_row_each_equal_to_the_per_model_routes(svc):
    """?faces=whole: one row per image, each model's struct equal to that model's own route on the same
    image (the same checkpoint, decoded once per distinct preprocessing), and the embedding of the image."""
    client, photos_ = svc["client"], {"group.jpg": svc["set_photos"]["group.jpg"]}
    r = _post(client, photos_, faces="whole")
    assert r.status_code == 200, r.text
    body = r.json()
    assert "images" not in body and body["checkpoint"] == svc["set"]["identity"]
    (row,) = body["predictions"]
    assert row["path"] == "group.jpg" and row["detector"] == "whole" and row["face"] is None
    assert row["model"] == "set" and row["checkpoint"] == body["checkpoint"]
    assert len(row["embedding"]) == 128
    for url, column in COLUMNS.items():  # the per-model routes still answer, with the same values
        own = _post(client, photos_, f"/v1/models/{url}/predict", faces="whole")
        assert own.status_code == 200, own.text
        (single,) = own.json()["predictions"]
        member = row[column]
        assert member["checkpoint"] == single["checkpoint"] and member["model"] == single["model"]
        fields = [k for k in member if k not in ("model", "checkpoint")]
        assert fields
        assert_same({k: member[k] for k in fields}, {k: single[k] for k in fields}, url, TOL)


def test_the_set_is_described_without_its_checkpoint_uris(svc):
    client = svc["client"]
    r = client.get("/v1/set")
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["name"] == "set" and d["version"] == "1" and d["checkpoint"] == svc["set"]["identity"]
    assert [m["name"] for m in d["models"]] == ["hs", "dmm", "agr", "embedding"]
    routes = {m["name"]: m.get("route") for m in d["models"]}
    assert routes == {"hs": "/v1/models/hard_sharing", "dmm": "/v1/models/dmm_cnn", "agr": "/v1/models/agr-v1",
                      "embedding": None}
    assert not {"device", "threads", "batchnorm_folded"} & set(d)
    text = r.text
    assert all(p not in text for p in svc["checkpoints"].values())  # URIs only for the admin key
    assert len(d["preprocessings"]) == 3  # 50 px grey, 64 px, and dlib's 150 px chip (agr and the embedding)
    assert d["faces"]["detector"].startswith("retinaface")
    assert d["stats"]["requests"] >= 0 and d["batching"]["max_batch_size"] == 8
    # the members' checkpoints are the served models' own
    hashes = {m["name"]: m["checkpoint"]["hash"] for m in client.get("/v1/models").json()["models"]}
    assert {m["name"]: m["checkpoint"] for m in d["models"][:3]} == {c: hashes[u] for u, c in COLUMNS.items()}
    admin = client.get("/v1/set", headers={"X-Admin-Key": ADMIN_KEY}).json()  # the operator sees the URIs
    assert {m["name"]: m["uri"] for m in admin["models"][:3]} == {c: svc["checkpoints"][u] for u, c in COLUMNS.items()}
    spec = httpx.get(svc["base"] + "/openapi.json").json()
    assert {"/v1/predict", "/v1/set"} <= set(spec["paths"])


def test_set_bad_bodies_and_missing_keys_are_json_errors(svc):
    client, none_jpg = svc["client"], svc["set_photos"]["none.jpg"]
    assert_error(client.post("/v1/predict", content=b"a,b\n1,2\n", headers={"Content-Type": "text/csv"}),
                 415, "unsupported_media_type")
    assert_error(client.post("/v1/predict", content=b"definitely not a jpeg", headers={"Content-Type": "image/jpeg"}),
                 422, "not_image")
    body = assert_error(client.post("/v1/predict", params={"faces": "whole"},
                                    files=[("f", ("ok.jpg", none_jpg, "image/jpeg")),
                                           ("f", ("bad.jpg", b"\x00" * 64, "image/jpeg"))]), 422)
    assert [f["file"] for f in body["files"]] == ["bad.jpg"]
    big = none_jpg + b"\x00" * MAX_REQUEST_BYTES
    assert assert_error(client.post("/v1/predict", content=big, headers={"Content-Type": "image/jpeg"}),
                        413, "too_large")["limit_bytes"] == MAX_REQUEST_BYTES
    assert_error(client.post("/v1/predict", params={"faces": "sideways"}, content=b"x",
                             headers={"Content-Type": "image/jpeg"}), 422, "invalid_request")
    with httpx.Client(base_url=svc["base"], timeout=30) as anon:
        for r in (anon.post("/v1/predict", content=none_jpg, headers={"Content-Type": "image/jpeg"}),
                  anon.get("/v1/set"), anon.get("/v1/set", headers={"X-API-Key": "wrong"})):
            assert_error(r, 401, "unauthorized")
    ok = client.post("/v1/predict", content=none_jpg, params={"filename": "n.jpg"},
                     headers={"Content-Type": "image/jpeg"})
    assert ok.status_code == 200 and ok.json()["predictions"][0]["path"] == "n.jpg"


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
