"""The model set over real HTTP on 127.0.0.1 (issue #14): ``POST /v1/predict`` answers every model of the set,
and the face embedding, for every face in one request, each row the label job's row for the same set;
``GET /v1/set`` describes it without its checkpoint URIs; its bad bodies and missing keys are JSON errors.

The application is tests/serve_app.py's, as for tests/test_serve.py (the per-model routes and what one request
may cost): jobs/serve.yaml through Serve's config schema, whose model set is three of the served models
(columns ``hs``, ``dmm`` and ``agr``) plus the embedding: the one application of both modules
(tests/conftest.py's ``svc``, built once). Split from tests/test_serve.py."""

from __future__ import annotations

import httpx

from tests.helpers import assert_error, assert_same
from tests.serve_app import ADMIN_KEY, COLUMNS, MAX_REQUEST_BYTES, TOL


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
