"""The HTTP front's guards and the serving configuration, without Ray: back-pressure before decoding, a
checkpoint (or model set) that changes under a request (503, never 500), what the inference key may see,
the 404 without a set, refusing to serve openly beyond loopback without a key, and the model set's
configuration (issue #14: the set's deployment built from the served checkpoints, bad sets refused)."""

from __future__ import annotations

import asyncio
import os

import pytest

from raytasks import serve as S
from tests.helpers import FakeRequest, ingress
from tests.images import png_bytes


def test_decoding_is_bounded_and_saturation_is_a_503():
    api = ingress(max_decodes=1, decode_wait_s=0.05)

    async def scenario():
        started = asyncio.Event()
        release = asyncio.Event()
        loop = asyncio.get_running_loop()

        def slow():
            loop.call_soon_threadsafe(started.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
            return "done"

        first = asyncio.create_task(api._decode(slow))
        await started.wait()
        with pytest.raises(S.APIError) as e:  # the only slot is busy: refused at once, nothing decoded
            await api._decode(lambda: "never")
        release.set()
        assert await first == "done"
        assert await api._decode(lambda: "again") == "again"  # the slot is free again
        return e.value

    err = asyncio.run(scenario())
    assert err.status == 503 and err.code == "overloaded" and err.headers["Retry-After"] == "1"


def test_a_model_call_past_the_timeout_is_a_504():
    api = ingress(request_timeout_s=0.05)

    async def never():
        await asyncio.sleep(10)

    with pytest.raises(S.APIError) as e:
        asyncio.run(api._model_call("m", never()))
    assert e.value.status == 504 and e.value.code == "timeout"


def _image_request() -> FakeRequest:
    return FakeRequest({"X-API-Key": "k", "Content-Type": "image/png"}, png_bytes())


def test_replicas_with_different_checkpoints_answer_503_not_500():
    api = ingress()

    class Handle:
        calls = 0

        class _M:
            def remote(self, *a):
                Handle.calls += 1

                async def fail():
                    raise S.CheckpointChanged("decoded for sha256:a, replica holds sha256:b")
                return fail()

        predict = _M()
        describe = _M()

    api.handles = {"m": Handle()}

    async def describe(name, refresh=False):
        return {"preprocessing": {"size": [8, 8], "channels": 3, "mean": [0, 0, 0], "std": [1, 1, 1]},
                "checkpoint": {"hash": "sha256:a"}, "architecture": "x"}

    api._describe = describe
    with pytest.raises(S.APIError) as e:  # the whole route's way: read, decode, call (whole image)
        asyncio.run(api._predict("m", _image_request(), "a.png", "whole"))
    assert e.value.status == 503 and e.value.code == "checkpoint_changed" and "Retry-After" in e.value.headers
    assert Handle.calls == 2  # the description was re-read and the call retried once


def test_private_fields_only_for_the_admin_key(monkeypatch):
    monkeypatch.setenv(S.ADMIN_KEY_ENV, "admin")
    api = ingress()
    desc = {"name": "m", "checkpoint": {"uri": "/secret/path/m.pt", "hash": "sha256:x"}, "device": "cuda:0",
            "threads": 4, "batchnorm_folded": ["trunk"], "outputs": []}
    public = api._visible("m", desc, FakeRequest({"X-API-Key": "k"}))
    assert public == {"name": "m", "checkpoint": {"hash": "sha256:x"}, "outputs": []}
    assert api._visible("m", desc, FakeRequest({"X-Admin-Key": "wrong"})) == public
    assert api._visible("m", desc, FakeRequest({"X-Admin-Key": "admin"})) == desc


@pytest.mark.parametrize("host,key,allow,refused", [
    ("127.0.0.1", None, False, False), ("localhost", None, False, False), ("::1", None, False, False),
    ("0.0.0.0", None, False, True), ("10.1.2.3", None, False, True), ("0.0.0.0", "", False, True),
    ("0.0.0.0", "secret", False, False), ("0.0.0.0", None, True, False),
])
def test_serving_beyond_loopback_needs_a_key_or_an_explicit_opt_out(host, key, allow, refused):
    from jobs.serve_checks import check_auth

    if refused:
        with pytest.raises(SystemExit, match="FACEATTR_API_KEY"):
            check_auth(host, key, allow)
    else:
        check_auth(host, key, allow)


# --- the model set (formerly tests/test_serve_set.py's checks without Ray) -----------------------------------
def test_config_and_flags_make_a_set_of_the_served_checkpoints(monkeypatch):
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
    # the per-request bounds of the ingress from flags; what is not given keeps IngressSpec's default
    ing = ServeArgs.model_validate(build_args(parser().parse_args(
        ["--model", "a=a.pt", "--max-request-faces", "32", "--max-request-megapixels", "12.5",
         "--request-timeout-s", "5"]))).ingress
    assert (ing.max_request_faces, ing.max_request_pixels, ing.request_timeout_s) == (32, 12_500_000, 5.0)
    assert ing.body_timeout_s == ServeArgs.model_validate({"models": {"a": "a.pt"}}).ingress.body_timeout_s
    assert "ingress" not in build_args(parser().parse_args(["--model", "a=a.pt"]))
    with pytest.raises(ValueError, match="max_request_faces"):
        ServeArgs.model_validate(build_args(parser().parse_args(["--model", "a=a.pt", "--max-request-faces", "0"])))
    assert ServeArgs.model_validate({"models": {"a": "a.pt"}}).model_set is None

    key_env = "FACEATTR_TEST_SET_API_KEY"  # build_app reads the key named by api_key_env in the driver
    monkeypatch.setenv(key_env, "set-key")
    args = args.model_copy(update={"api_key_env": key_env})
    built = {d.name: d for d in build_serve_app(build_app(args), name="faceattr").deployments}
    assert set(built) == {"FaceAttrAPI", "model-dmm", "model-agr", SET_DEPLOYMENT}
    name, models, *_, routes = built[SET_DEPLOYMENT].init_args  # one replica class for models and the set
    model_set = ModelSet.from_dict(models)
    assert model_set.members == (("dmm", f"s3://b/dmm.pt{pin}"), ("agr", os.path.abspath("agr.pt")))  # same URIs, pins
    assert model_set.embedding and (model_set.name, model_set.version) == ("set", "1")
    assert routes == {"dmm": "dmm", "agr": "agr"} and name == "set-set"
    assert built["model-dmm"].init_args[:2] == ("dmm", f"s3://b/dmm.pt{pin}")
    assert built["FaceAttrAPI"].init_args[3:5] == (key_env, "set-key")


@pytest.mark.parametrize("model_set, message", [
    ({"models": ["nope"]}, "not served"),
    ({}, "give it a column name in the config .*Agr-1: agr_1"),  # a URL name that is no column name
    ({"models": {"Agr-1": "path"}}, "column of every row"),
    ({"models": {"Agr-1": "x", "b": "x"}}, "both be column 'x'"),
    ({"models": []}, "holds no model"),
    ({"name": "has space"}, "must match"),
    ({"channels_last": True}, "Extra inputs"),
    ({"models": {"Agr-1": "agr"}, "version": ""}, "string of 1-64 characters"),  # the set file's rule (#18)
    ({"models": {"Agr-1": "agr"}, "version": True}, "string of 1-64 characters"),
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


def test_no_set_is_a_404_naming_the_fix():
    api = ingress()
    with pytest.raises(S.APIError) as e:
        asyncio.run(api._describe(None))  # None: the set's target
    assert e.value.status == 404 and e.value.code == "no_model_set" and "--set" in e.value.detail
    assert "model_set" in e.value.detail
    with pytest.raises(S.APIError) as e:  # the set's routes alike, before reading the body
        asyncio.run(api._predict(None, _image_request(), "a.png", None))
    assert e.value.status == 404 and e.value.code == "no_model_set"


def test_a_set_that_changes_under_a_request_is_retried_once_then_503():
    api = ingress()
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

    async def predict_photos(payload, identity, limits):
        calls["predict"] += 1
        raise S.CheckpointChanged(f"decoded for {identity}")

    class Handle:
        pass

    handle = Handle()
    handle.describe, handle.predict_photos = Remote(describe), Remote(predict_photos)
    api.set_handle = handle
    with pytest.raises(S.APIError) as e:  # the set route's way: read, decode photos, call
        asyncio.run(api._predict(None, _image_request(), "a.png", None))
    assert e.value.status == 503 and e.value.code == "checkpoint_changed" and "model set" in e.value.detail
    assert calls == {"describe": 2, "predict": 2}  # the description re-read once, the call retried once


def test_set_description_hides_uris_and_devices_without_the_admin_key(monkeypatch):
    monkeypatch.setenv(S.ADMIN_KEY_ENV, "admin")
    api = ingress()
    desc = {"name": "set", "checkpoint": "set-sha256:x", "device": "cuda:0", "threads": 1, "batchnorm_folded": {},
            "models": [{"name": "a", "model": "m", "checkpoint": "sha256:y", "uri": "s3://secret/a.pt"},
                       {"name": "embedding", "model": "dlib", "checkpoint": "sha256:z"}]}
    public = api._visible(None, desc, FakeRequest({"X-API-Key": "k"}))
    assert public == {"name": "set", "checkpoint": "set-sha256:x",
                      "models": [{"name": "a", "model": "m", "checkpoint": "sha256:y"},
                                 {"name": "embedding", "model": "dlib", "checkpoint": "sha256:z"}]}
    assert api._visible(None, desc, FakeRequest({"X-Admin-Key": "wrong"})) == public
    assert api._visible(None, desc, FakeRequest({"X-Admin-Key": "admin"})) == desc


# --- configuration (moved from tests/test_serve.py) -----------------------------------------------------------------------
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
