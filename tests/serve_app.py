"""The serving application of tests/test_serve.py over real HTTP on 127.0.0.1 (ONE Serve application for that
module: its fixture ``svc`` is :func:`serve_application`), its constants and the helpers its tests share.
Split from tests/test_serve.py.

The application's ingress is given small request budgets (issue #22) that the ordinary tests stay within:
at most ``MAX_REQUEST_FACES`` faces per request, bodies within ``BODY_TIMEOUT_S``."""

from __future__ import annotations

import io
import math
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import yaml
from PIL import Image

import models
from core.annotator import Annotator
from core.modelset import ModelSet, resolve_set
from tests.helpers import free_port, save_model
from tests.images import photos

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
MAX_REQUEST_FACES = 8  # ingress.max_request_faces here (256 by default): the group photo has 3
BODY_TIMEOUT_S = 2.0  # ingress.body_timeout_s here (30 s by default): a slow sender's 408 within a test


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


def ctype(name: str) -> str:
    return CTYPE[name.rsplit(".", 1)[1]]


def same_row(got: dict, want: dict, tol: float = 2e-3) -> None:
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
        # not more often: each serve.status() cloudpickles a router class in this process, a scan of every
        # module loaded (py-spy over the session-Ray modules, 2026-12-04: 8.8 CPU-s of polling every 0.5 s)
        time.sleep(2.0)


def _set_photos(group_photo) -> dict[str, bytes]:
    """The group photo (3 faces) and a photo without a face."""
    return {"group.jpg": group_photo[0], "none.jpg": photos()["none.jpg"]}


def serve_application(ray_session, s3_server, tmp_path_factory, group_photo, three):
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
            import storage

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
                       ingress={"num_cpus": 0.1, "max_ongoing_requests": 256,
                                "max_request_faces": MAX_REQUEST_FACES, "body_timeout_s": BODY_TIMEOUT_S},
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
            yield {"base": base, "app": app["name"], "client": client, "expected": expected, "checkpoints": checkpoints,
                   "face_rows": face_rows, "set": set_expected, "set_photos": set_photos}
    finally:
        serve.shutdown()


def predict_one(client: httpx.Client, model: str, name: str, prefix: str = "") -> httpx.Response:
    """``model``: an architecture of the zoo (served as URL[model]) or a URL name."""
    return client.post(f"{prefix}/v1/models/{URL.get(model, model)}/predict", params={"filename": name},
                       content=IMAGES[name], headers={"Content-Type": ctype(name)})
