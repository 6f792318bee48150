"""The HTTP front's guards that need no model: back-pressure before decoding, a checkpoint that changes
under a request (503, never 500), what the inference key may see, and refusing to serve openly beyond
loopback without a key."""

from __future__ import annotations

import asyncio

import pytest

from raytasks import serve as S


class _Request:
    def __init__(self, headers: dict | None = None):
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}


def _api(**limits) -> S.FaceAttrAPI:
    """The ingress object without Serve: @serve.ingress wraps the class in an ASGI replica whose __init__ is
    a coroutine; ours is the plain one below it in the MRO."""
    import inspect

    wrapper = S.FaceAttrAPI.func_or_class
    ours = next(c for c in wrapper.__mro__ if c.__name__ == "FaceAttrAPI" and "__init__" in c.__dict__
                and not inspect.iscoroutinefunction(c.__dict__["__init__"]))
    api = object.__new__(wrapper)
    ours.__init__(api, {}, 1 << 20, 4, api_key="k", limits=S.IngressSpec(**limits))
    return api


def test_decoding_is_bounded_and_saturation_is_a_503():
    api = _api(max_decodes=1, decode_wait_s=0.05)

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
    api = _api(request_timeout_s=0.05)

    async def never():
        await asyncio.sleep(10)

    with pytest.raises(S.APIError) as e:
        asyncio.run(api._model_call("m", never()))
    assert e.value.status == 504 and e.value.code == "timeout"


def test_replicas_with_different_checkpoints_answer_503_not_500():
    api = _api()

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
    from faces.finder import decode_photos  # noqa: F401 - the module the route uses

    with pytest.raises(S.APIError) as e:
        asyncio.run(api._predict_whole("m", api.handles["m"], [("a.png", _png())]))
    assert e.value.status == 503 and e.value.code == "checkpoint_changed" and "Retry-After" in e.value.headers
    assert Handle.calls == 2  # the description was re-read and the call retried once


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_private_fields_only_for_the_admin_key(monkeypatch):
    monkeypatch.setenv(S.ADMIN_KEY_ENV, "admin")
    api = _api()
    desc = {"name": "m", "checkpoint": {"uri": "/secret/path/m.pt", "hash": "sha256:x"}, "device": "cuda:0",
            "threads": 4, "batchnorm_folded": ["trunk"], "outputs": []}
    public = api._visible(desc, _Request({"X-API-Key": "k"}))
    assert public == {"name": "m", "checkpoint": {"hash": "sha256:x"}, "outputs": []}
    assert api._visible(desc, _Request({"X-Admin-Key": "wrong"})) == public
    assert api._visible(desc, _Request({"X-Admin-Key": "admin"})) == desc


@pytest.mark.parametrize("host,key,allow,refused", [
    ("127.0.0.1", None, False, False), ("localhost", None, False, False), ("::1", None, False, False),
    ("0.0.0.0", None, False, True), ("10.1.2.3", None, False, True), ("0.0.0.0", "", False, True),
    ("0.0.0.0", "secret", False, False), ("0.0.0.0", None, True, False),
])
def test_serving_beyond_loopback_needs_a_key_or_an_explicit_opt_out(host, key, allow, refused):
    from jobs.serve import check_auth

    if refused:
        with pytest.raises(SystemExit, match="FACEATTR_API_KEY"):
            check_auth(host, key, allow)
    else:
        check_auth(host, key, allow)
