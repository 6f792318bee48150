"""The model set over HTTP (issue #14, "Serve the set"): ``POST /v1/predict`` answers every model of the set
for every face of an image in one request, from one replica that holds them all; per-model routes stay.

One Serve app for the module, deployed by ``build_app`` on 127.0.0.1 with three small models (hard_sharing,
dmm_cnn at depth 18 / 64 px, age_gender_race with its default dlib trunk) served as ``hs``, ``dmm`` and
``agr-v1`` and all three, plus the face embedding, as one set (``agr-v1`` given the column name ``agr``).
Expected answers: the Parquet rows of one label job run with the same set (``hs=``, ``dmm=``, ``agr=``,
``--embedding``) over the same photos, run before Serve holds the CPUs. The configuration, the ingress's
404 without a set, its retry on a changed set and what the inference key may see are checked without Ray."""

from __future__ import annotations

import asyncio
import math
import os
import socket
import uuid
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import torch

import models
from models.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "set-key-" + uuid.uuid4().hex[:8]
KEY_ENV = "FACEATTR_TEST_SET_API_KEY"
AUTH = {"X-API-Key": API_KEY}
MODELS = {"hs": ("hard_sharing", {}), "dmm": ("dmm_cnn", {"depth": 18, "image_size": 64}),
          "agr-v1": ("age_gender_race", {})}
COLUMNS = {"hs": "hs", "dmm": "dmm", "agr-v1": "agr"}  # URL name -> the set's column
TOL = 1e-4
MAX_REQUEST_BYTES = 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _photos(group_photo) -> dict[str, bytes]:
    """The group photo (3 faces) and a photo without a face."""
    from tests.test_faces_e2e import photos

    return {"group.jpg": group_photo[0], "none.jpg": photos()["none.jpg"]}


@pytest.fixture(scope="module")
def svc(ray_session, tmp_path_factory, group_photo):
    """Checkpoints, the label job's rows for the set, then the app (a set of the three models with the
    embedding) on a free port with an API key."""
    from ray import serve

    from raytasks import label as label_job
    from raytasks.serve import build_app

    tmp = tmp_path_factory.mktemp("serve_set")
    torch.manual_seed(0)
    checkpoints = {}
    for url, (arch, kw) in MODELS.items():
        checkpoints[url] = str(tmp / f"{arch}.pt")
        save_checkpoint(models.create_model(arch, **kw), checkpoints[url])
    photos = _photos(group_photo)
    folder = tmp / "photos"
    folder.mkdir()
    for name, data in photos.items():
        (folder / name).write_bytes(data)

    # The label job with the same set (same member names, set name and version: the same identity), first.
    out = tmp / "labels"
    summary = label_job.label(label_job.LabelSpec(
        checkpoint=tuple(f"{COLUMNS[u]}={p}" for u, p in checkpoints.items()), embedding=True, input=str(folder),
        output=str(out), precision="fp32", max_actors=1), echo=lambda *a, **k: None)
    rows = pq.read_table(out / "labels").to_pylist()
    assert summary["checkpoint_hash"].startswith("set-sha256:")

    args = {"models": checkpoints, "precision": "fp32", "num_cpus": 0.2, "threads": 1, "max_batch_size": 8,
            "batch_wait_timeout_s": 0.02, "api_key_env": KEY_ENV, "max_request_bytes": MAX_REQUEST_BYTES, "ingress": {"num_cpus": 0.1},
            "model_set": {"models": COLUMNS, "embedding": True, "num_cpus": 0.3}}
    port = _free_port()
    os.environ[KEY_ENV] = API_KEY  # build_app reads the key in the driver and hands it to the ingress
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name="faceattr-set", route_prefix="/")  # returns once every replica runs
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=120, headers=AUTH) as client:
            yield {"base": base, "client": client, "photos": photos, "summary": summary, "checkpoints": checkpoints,
                   "label_rows": {(Path(r["path"]).name, r["face"]): r for r in rows}}
    finally:
        os.environ.pop(KEY_ENV, None)
        serve.shutdown()


def _same(got, want, where: str = "") -> None:
    """Equal, floats to TOL (relative or absolute: Parquet keeps float32, JSON the float64 of the same
    value; batches of other sizes sum in another order), recursively through structs and lists."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, set(got or {}) ^ set(want))
        for k in want:
            _same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        if math.isnan(want):
            assert got is None, (where, got)
        else:
            assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=TOL, abs_tol=TOL), (where, got, want)
    else:
        assert got == want, (where, got, want)


def _post(client: httpx.Client, photos: dict[str, bytes], url: str = "/v1/predict", **params) -> httpx.Response:
    files = [("file", (n, d, "image/jpeg")) for n, d in photos.items()]
    return client.post(url, files=files, params=params)


def _assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["detail"], body
    if code:
        assert body["error"] == code, body
    return body


# --- answers --------------------------------------------------------------------------------------------
@pytest.mark.ray
def test_one_request_answers_every_model_for_every_face_as_the_label_job(svc, group_photo):
    """Two photos in one multipart request: per (photo, face) the row equals the label job's Parquet row for
    the same set, every model's struct field by field and the embedding; the group photo lists every face,
    the photo without a face one row with empty structs."""
    r = _post(svc["client"], svc["photos"])
    assert r.status_code == 200, r.text
    body = r.json()
    summary = svc["summary"]
    assert body["set"] == "set" and body["checkpoint"] == summary["checkpoint_hash"]
    assert body["models"] == summary["models"]
    assert [m["name"] for m in body["models"]] == ["hs", "dmm", "agr", "embedding"]
    group, none = body["images"]
    n_faces = group_photo[1]
    assert group["path"] == "group.jpg" and len(group["faces"]) == n_faces and none["faces"] == []
    assert body["predictions"] == group["faces"] + [body["predictions"][-1]]
    assert body["detector"] == group["faces"][0]["detector"]
    want = svc["label_rows"]
    assert len(body["predictions"]) == len(want) == n_faces + 1
    for row in body["predictions"]:
        expected = want[(row["path"], row["face"])]
        _same(row, {**expected, "path": row["path"]}, f"{row['path']}#{row['face']}")
    for face in group["faces"]:
        assert [face[c]["model"] for c in ("hs", "dmm", "agr")] == ["hard_sharing", "dmm_cnn", "age_gender_race"]
        assert len(face["embedding"]) == 128 and face["embedding_model"].startswith("dlib_face_recognition")
    (empty,) = [r for r in body["predictions"] if r["path"] == "none.jpg"]
    assert empty["faces"] == 0 and empty["face"] is None and empty["embedding"] is None
    assert empty["hs"]["model"] == "hard_sharing" and empty["hs"]["gender"] is None


@pytest.mark.ray
def test_whole_images_one_row_each_equal_to_the_per_model_routes(svc):
    """?faces=whole: one row per image, each model's struct equal to that model's own route on the same
    image (the same checkpoint, decoded once per distinct preprocessing), and the embedding of the image."""
    client, photos = svc["client"], {"group.jpg": svc["photos"]["group.jpg"]}
    r = _post(client, photos, faces="whole")
    assert r.status_code == 200, r.text
    body = r.json()
    assert "images" not in body and body["checkpoint"] == svc["summary"]["checkpoint_hash"]
    (row,) = body["predictions"]
    assert row["path"] == "group.jpg" and row["detector"] == "whole" and row["face"] is None
    assert row["model"] == "set" and row["checkpoint"] == body["checkpoint"]
    assert len(row["embedding"]) == 128
    for url, column in COLUMNS.items():  # the per-model routes still answer, with the same values
        own = _post(client, photos, f"/v1/models/{url}/predict", faces="whole")
        assert own.status_code == 200, own.text
        (single,) = own.json()["predictions"]
        member = row[column]
        assert member["checkpoint"] == single["checkpoint"] and member["model"] == single["model"]
        fields = [k for k in member if k not in ("model", "checkpoint")]
        assert fields
        _same({k: member[k] for k in fields}, {k: single[k] for k in fields}, url)


@pytest.mark.ray
def test_the_set_is_described_without_its_checkpoint_uris(svc):
    client = svc["client"]
    r = client.get("/v1/set")
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["name"] == "set" and d["version"] == "1" and d["checkpoint"] == svc["summary"]["checkpoint_hash"]
    assert [m["name"] for m in d["models"]] == ["hs", "dmm", "agr", "embedding"]
    routes = {m["name"]: m.get("route") for m in d["models"]}
    assert routes == {"hs": "/v1/models/hs", "dmm": "/v1/models/dmm", "agr": "/v1/models/agr-v1", "embedding": None}
    assert not {"device", "threads", "batchnorm_folded"} & set(d)
    text = r.text
    assert all(p not in text for p in svc["checkpoints"].values())  # URIs only for the admin key
    assert len(d["preprocessings"]) == 3  # 50 px grey, 64 px, and dlib's 150 px chip (agr and the embedding)
    assert d["faces"]["detector"].startswith("retinaface")
    assert d["stats"]["requests"] >= 0 and d["batching"]["max_batch_size"] == 8
    # the members' checkpoints are the served models' own
    hashes = {m["name"]: m["checkpoint"]["hash"] for m in client.get("/v1/models").json()["models"]}
    assert {m["name"]: m["checkpoint"] for m in d["models"][:3]} == {COLUMNS[u]: h for u, h in hashes.items()}
    spec = httpx.get(svc["base"] + "/openapi.json").json()
    assert {"/v1/predict", "/v1/set"} <= set(spec["paths"])


@pytest.mark.ray
def test_bad_bodies_and_missing_keys_are_json_errors(svc):
    client = svc["client"]
    _assert_error(client.post("/v1/predict", content=b"a,b\n1,2\n", headers={"Content-Type": "text/csv"}),
                  415, "unsupported_media_type")
    _assert_error(client.post("/v1/predict", content=b"definitely not a jpeg", headers={"Content-Type": "image/jpeg"}),
                  422, "not_image")
    body = _assert_error(client.post("/v1/predict", params={"faces": "whole"},
                                     files=[("f", ("ok.jpg", svc["photos"]["none.jpg"], "image/jpeg")),
                                            ("f", ("bad.jpg", b"\x00" * 64, "image/jpeg"))]), 422)
    assert [f["file"] for f in body["files"]] == ["bad.jpg"]
    big = svc["photos"]["none.jpg"] + b"\x00" * MAX_REQUEST_BYTES
    assert _assert_error(client.post("/v1/predict", content=big, headers={"Content-Type": "image/jpeg"}),
                         413, "too_large")["limit_bytes"] == MAX_REQUEST_BYTES
    _assert_error(client.post("/v1/predict", params={"faces": "sideways"}, content=b"x",
                              headers={"Content-Type": "image/jpeg"}), 422, "invalid_request")
    with httpx.Client(base_url=svc["base"], timeout=30) as anon:
        for r in (anon.post("/v1/predict", content=svc["photos"]["none.jpg"], headers={"Content-Type": "image/jpeg"}),
                  anon.get("/v1/set"), anon.get("/v1/set", headers={"X-API-Key": "wrong"})):
            _assert_error(r, 401, "unauthorized")
    ok = client.post("/v1/predict", content=svc["photos"]["none.jpg"], params={"filename": "n.jpg"},
                     headers={"Content-Type": "image/jpeg"})
    assert ok.status_code == 200 and ok.json()["predictions"][0]["path"] == "n.jpg"


# --- without Ray: configuration and the ingress's guards ------------------------------------------------
def test_config_and_flags_make_a_set_of_the_served_checkpoints():
    from ray.serve._private.build_app import build_app as build_serve_app

    from core.modelset import ModelSet
    from jobs.serve import build_args, parser
    from raytasks.serve import SET_DEPLOYMENT, ServeArgs, build_app, deployment_options

    pin = "#sha256:" + "a" * 64
    args = ServeArgs.model_validate(build_args(parser().parse_args(
        ["--model", f"dmm=s3://b/dmm.pt{pin}", "--model", "agr=./agr.pt", "--embedding", "--num-cpus", "2"])))
    assert args.model_set.embedding and args.model_set.members(list(args.models)) == [("dmm", "dmm"), ("agr", "agr")]
    opts = deployment_options(args.set_settings())
    assert opts["ray_actor_options"]["num_cpus"] == 2.0 and opts["max_ongoing_requests"] == 32
    assert "model_set" not in build_args(parser().parse_args(["--model", "a=a.pt"]))  # no set unless asked
    assert ServeArgs.model_validate({"models": {"a": "a.pt"}}).model_set is None

    built = {d.name: d for d in build_serve_app(build_app(args), name="faceattr").deployments}
    assert set(built) == {"FaceAttrAPI", "model-dmm", "model-agr", SET_DEPLOYMENT}
    model_set = ModelSet.from_dict(built[SET_DEPLOYMENT].init_args[0])
    assert model_set.members == (("dmm", f"s3://b/dmm.pt{pin}"), ("agr", os.path.abspath("agr.pt")))  # same URIs, pins
    assert model_set.embedding and (model_set.name, model_set.version) == ("set", "1")
    assert built[SET_DEPLOYMENT].init_args[1] == {"dmm": "dmm", "agr": "agr"}


@pytest.mark.parametrize("model_set, message", [
    ({"models": ["nope"]}, "not served"),
    ({}, "give it a column name in the config .*Agr-1: agr_1"),  # a URL name that is no column name
    ({"models": {"Agr-1": "path"}}, "column of every row"),
    ({"models": {"Agr-1": "x", "b": "x"}}, "both be column 'x'"),
    ({"models": []}, "holds no model"),
    ({"name": "has space"}, "must match"),
    ({"channels_last": True}, "Extra inputs"),
])
def test_bad_sets_are_refused_clearly(model_set, message):
    from raytasks.serve import ServeArgs

    with pytest.raises(ValueError, match=message):
        ServeArgs.model_validate({"models": {"Agr-1": "a.pt", "b": "b.pt"}, "model_set": model_set})


def test_mapping_names_the_columns_and_yaml_versions_are_text():
    import datetime

    from raytasks.serve import ServeArgs

    args = ServeArgs.model_validate({"models": {"Agr-1": "a.pt", "b": "b.pt"},
                                     "model_set": {"models": {"Agr-1": "agr"}, "version": datetime.date(2026, 11, 29),
                                                   "max_batch_size": 4}})
    assert args.model_set.members(list(args.models)) == [("agr", "Agr-1")]
    assert args.model_set.version == "2026-11-29" and args.set_settings()["max_batch_size"] == 4
    assert args.set_settings()["max_ongoing_requests"] == 8  # 2 x its own batch size, as for a model


def _api(monkeypatch=None, admin: str | None = None):
    from tests.test_serve_guards import _api as guards_api

    if admin is not None:
        monkeypatch.setenv("FACEATTR_ADMIN_KEY", admin)
    return guards_api()


def test_no_set_is_a_404_naming_the_fix():
    from raytasks import serve as S

    api = _api()
    with pytest.raises(S.APIError) as e:
        asyncio.run(api._describe_set())
    assert e.value.status == 404 and e.value.code == "no_model_set" and "--set" in e.value.detail
    assert "model_set" in e.value.detail


def test_a_set_that_changes_under_a_request_is_retried_once_then_503():
    from raytasks import serve as S

    api = _api()
    calls = {"describe": 0, "predict": 0}

    class Remote:
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *a):
            return self.fn(*a)

    async def describe():
        calls["describe"] += 1
        return {"name": "set", "checkpoint": f"set-sha256:{calls['describe']}", "models": [],
                "faces": {"detector": "d"}, "preprocessings": []}

    async def predict_photos(payload, identity):
        calls["predict"] += 1
        raise S.CheckpointChanged(f"decoded for {identity}")

    class Handle:
        pass

    handle = Handle()
    handle.describe, handle.predict_photos = Remote(describe), Remote(predict_photos)
    api.set_handle = handle
    with pytest.raises(S.APIError) as e:
        asyncio.run(api._predict_set_photos(handle, [("a.png", _png())]))
    assert e.value.status == 503 and e.value.code == "checkpoint_changed" and "model set" in e.value.detail
    assert calls == {"describe": 2, "predict": 2}  # the description re-read once, the call retried once


def _png() -> bytes:
    from tests.test_serve_guards import _png as png

    return png()


def test_set_description_hides_uris_and_devices_without_the_admin_key(monkeypatch):
    api = _api(monkeypatch, admin="admin")
    desc = {"name": "set", "checkpoint": "set-sha256:x", "device": "cuda:0", "threads": 1, "batchnorm_folded": {},
            "models": [{"name": "a", "model": "m", "checkpoint": "sha256:y", "uri": "s3://secret/a.pt"},
                       {"name": "embedding", "model": "dlib", "checkpoint": "sha256:z"}]}
    from tests.test_serve_guards import _Request

    public = api._visible_set(desc, _Request({"X-API-Key": "k"}))
    assert public == {"name": "set", "checkpoint": "set-sha256:x",
                      "models": [{"name": "a", "model": "m", "checkpoint": "sha256:y"},
                                 {"name": "embedding", "model": "dlib", "checkpoint": "sha256:z"}]}
    assert api._visible_set(desc, _Request({"X-Admin-Key": "wrong"})) == public
    assert api._visible_set(desc, _Request({"X-Admin-Key": "admin"})) == desc
