"""Edges of the serving configuration, of ``python -m jobs.serve``'s start and of the HTTP front, without Ray or
Serve (the serving audit's findings 1 and 3-7):

* a server without an API key never answers beyond loopback, even when it joins a Serve instance whose proxy
  already listens on every interface, and it leaves a Serve it joined running (deleting only its application);
* ``ingress.decode_wait_s: 0`` means "no wait", not "refuse everything";
* a misspelt or misplaced ``faces:`` key, or a wrong type there, fails the deploy naming it;
* a refresh of a model's description never holds up the predictions, and every description read is bounded;
* settings Serve would refuse (or that are not finite) fail before Ray starts, as an ``error:`` line, exit 2;
* an unauthenticated caller gets 401 before any query check; 405 and 422 ``invalid_request`` are documented.

Ray is replaced by recording fakes where ``jobs.serve.main`` would start it.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from raytasks import serve as S
from tests.helpers import ROOT, FakeRequest, assert_error, ingress
from tests.images import png_bytes

BASE = {"models": {"m": "m.pt"}}
DESC = {"name": "m", "architecture": "x", "checkpoint": {"hash": "sha256:a", "uri": "/x"},
        "preprocessing": {"size": [8, 8], "channels": 3, "mean": [0, 0, 0], "std": [1, 1, 1]},
        "faces": {"detector": "det"}}


# --- the fakes: a model deployment's handle, and Ray / Serve as jobs.serve.main calls them ---------------------
class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *a):
        return self.fn(*a)  # a coroutine: what the ingress awaits, as it awaits a DeploymentResponse


class FakeModel:
    """A model deployment whose ``describe`` waits on ``gate`` while it is set (an Event that is never set:
    a replica that never answers)."""

    def __init__(self):
        self.gate: asyncio.Event | None = None
        self.describes = 0

        async def describe():
            self.describes += 1
            if self.gate is not None:
                await self.gate.wait()
            return DESC

        async def predict(items, identity, limits):
            return [{"path": it["path"], "ok": True, "error_kind": None, "face": None} for it in items]

        self.describe, self.predict = _Method(describe), _Method(predict)


class FakeRay:
    """``ray`` and ``ray.serve`` for ``jobs.serve.main``: records the calls; ``existing`` is the HTTP (host,
    port) of a Serve instance already running on the cluster, or None."""

    def __init__(self, monkeypatch, existing: tuple[str, int] | None):
        import ray
        from ray import serve

        import jobs.serve as J
        import raytasks.reach

        self.calls: list[str] = []
        self.http = existing
        for mod, name in ((ray, "init"), (ray, "shutdown"), (serve, "shutdown")):
            monkeypatch.setattr(mod, name, lambda *a, _n=name, **k: self.calls.append(_n))
        monkeypatch.setattr(serve, "start", self._start)
        monkeypatch.setattr(serve, "run", lambda app, name, route_prefix: self.calls.append(f"run {name}"))
        monkeypatch.setattr(serve, "delete", lambda name: self.calls.append(f"delete {name}"))
        monkeypatch.setattr(raytasks.reach, "check_reachable", lambda *a: None)
        monkeypatch.setattr(J, "check_port_free", lambda host, port: None)  # this machine's ports: tested apart
        monkeypatch.setattr(J, "_running_serve", self._client)
        monkeypatch.setattr(J, "_wait_for", lambda stop: self.calls.append("served"))
        monkeypatch.setattr(J.signal, "signal", lambda *a: None)  # the test process keeps its handlers
        for env in ("FACEATTR_API_KEY", "FACEATTR_ADMIN_KEY"):
            monkeypatch.delenv(env, raising=False)

    def _start(self, http_options):
        self.calls.append("start")
        if self.http is None:  # a new Serve takes the options asked for; a running one keeps its own
            self.http = (http_options["host"], http_options["port"])

    def _client(self):
        if self.http is None:
            return None

        class Client:
            class http_config:
                host, port = self.http
        return Client()


CHECKPOINT = {"path": ""}


@pytest.fixture(scope="module", autouse=True)
def _a_checkpoint_file(tmp_path_factory):
    """The ``m=`` checkpoint of :func:`_main` is one (jobs.serve reads a local one before Ray starts, and refuses
    one it could not serve); Ray and Serve are fakes here."""
    from tests.helpers import save_model

    CHECKPOINT["path"] = save_model(str(tmp_path_factory.mktemp("ckpt") / "m.pt"), "hard_sharing", seed=0, hidden=8)


def _main(argv: list[str]) -> None:
    from jobs.serve import main

    main(["--model", f"m={CHECKPOINT['path']}", *argv])


# --- 1: no keyless server beyond loopback; a joined Serve is left running -----------------------------------------
@pytest.mark.parametrize("proxy,key,allow,refused", [
    (("0.0.0.0", 18321), None, False, True), (("::", 8000), None, False, True), ((None, 8000), None, False, True),
    (("10.0.0.5", 8000), None, False, True), (("127.0.0.1", 8000), None, False, False),
    (("localhost", 9000), None, False, False), (("0.0.0.0", 18321), "secret", False, False),
    (("0.0.0.0", 18321), None, True, False),
])
def test_a_keyless_server_is_refused_where_the_running_proxy_listens_beyond_loopback(proxy, key, allow, refused):
    from jobs.serve_checks import check_proxy

    if refused:
        with pytest.raises(SystemExit, match="FACEATTR_API_KEY.*serve shutdown"):
            check_proxy("127.0.0.1", 8000, *proxy, key, allow)
        return
    warning = check_proxy("127.0.0.1", 8000, *proxy, key, allow)
    if proxy == ("127.0.0.1", 8000):
        assert warning is None
    else:  # the address really served at, and that the flags were ignored
        assert f"{proxy[0]}:{proxy[1]}" in warning and "ignored" in warning


def test_jobs_serve_without_a_key_does_not_deploy_into_a_serve_open_to_the_network(monkeypatch, capsys):
    ray = FakeRay(monkeypatch, existing=("0.0.0.0", 18321))
    with pytest.raises(SystemExit) as e:
        _main(["--port", "18322"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "0.0.0.0:18321" in err and "FACEATTR_API_KEY" in err
    assert ray.calls == ["init", "start", "shutdown"]  # never deployed; the running Serve is left as it was


def test_jobs_serve_deletes_only_its_application_from_a_serve_it_joined(monkeypatch, capsys):
    ray = FakeRay(monkeypatch, existing=("127.0.0.1", 18321))
    _main(["--port", "18322"])
    assert ray.calls == ["init", "start", "run faceattr", "served", "delete faceattr", "shutdown"]
    out = capsys.readouterr().out
    assert "http://127.0.0.1:18321/v1/models" in out and "ignored" in out  # where it really serves
    monkeypatch.setenv("FACEATTR_API_KEY", "a-key")  # with a key, a proxy on every interface is served (warned)
    ray.calls.clear()
    ray.http = ("0.0.0.0", 18321)
    _main([])
    assert "run faceattr" in ray.calls and "delete faceattr" in ray.calls


def test_jobs_serve_shuts_down_the_serve_it_started(monkeypatch, capsys):
    ray = FakeRay(monkeypatch, existing=None)
    _main(["--port", "18322"])
    assert ray.calls == ["init", "start", "run faceattr", "served", "shutdown", "shutdown"]  # serve's, then ray's
    out = capsys.readouterr().out
    assert "http://127.0.0.1:18322/v1/models" in out and "ignored" not in out


def test_a_proxy_that_cannot_bind_is_one_error_line_and_ray_is_shut_down(monkeypatch, capsys):
    """Where the port could not be checked first (a cluster's proxy, or a server that took the port meanwhile),
    Serve's bind failure is one ``error:`` line and status 2, and the job still shuts Ray down."""
    from ray import serve

    import raytasks.reach

    ray = FakeRay(monkeypatch, existing=None)
    # a joined Ray (as on a cluster): Serve is shut down, then the connection (on a Ray of its own, ray.shutdown
    # alone ends both); fixed here, as an earlier test of this process may have started a Ray of its own
    monkeypatch.setattr(raytasks.reach, "started_here", lambda: False)

    def start(http_options):
        ray.calls.append("start")
        raise RuntimeError("ray::ProxyActor.ready() (pid=1) ... RuntimeError: Failed to bind to address "
                           f"'{http_options['host']}:{http_options['port']}'.")

    monkeypatch.setattr(serve, "start", start)
    with pytest.raises(SystemExit) as e:
        _main(["--port", "18324"])
    assert e.value.code == 2
    assert ray.calls == ["init", "start", "shutdown", "shutdown"]  # nothing deployed; Serve, then Ray shut down
    assert "error: Serve's HTTP proxy cannot listen on 127.0.0.1:18324: another server holds it" in \
        capsys.readouterr().err


# --- 3: decode_wait_s 0 is "no wait" -----------------------------------------------------------------------------
def test_decode_wait_zero_takes_free_room_at_once_and_refuses_only_when_busy():
    api = ingress(decode_wait_s=0, max_decodes=1)

    async def scenario():
        assert await api._decode(lambda: "decoded") == "decoded"  # idle: a slot at once (was 503 on 3.10/3.11)
        items, held = await api._read_items(FakeRequest({"Content-Type": "image/png"}, png_bytes()), "a.png")
        await api._body_budget.release(held)
        budget = S.http.Budget(10, "things")
        assert await budget.acquire(6, 0) == 6
        with pytest.raises(S.APIError) as full:  # no room: refused at once
            await budget.acquire(6, 0)
        await api._decode_slots.acquire()  # another request decodes
        t = time.perf_counter()
        with pytest.raises(S.APIError) as busy:
            await api._decode(lambda: "never")
        waited = time.perf_counter() - t
        api._decode_slots.release()
        return items, full.value, busy.value, waited

    items, full, busy, waited = asyncio.run(scenario())
    assert items == [("a.png", png_bytes())]
    assert full.status == busy.status == 503 and busy.code == "overloaded" and waited < 0.1
    assert api._body_budget.free == api._body_budget.total


# --- 4: faces: strict ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("faces,named", [
    ({"threshold": 0.95}, "threshold"), ({"mode": "detect", "max_sides": 1024}, "max_sides"),
    ({"mod": "whole"}, "mod"), ({"preset": "event"}, "preset"), ({"min_face": 20}, "min_face"),
    ({"max_side": None}, "max_side"), ({"max_side": 1024.9}, "max_side"), ({"max_side": "1024"}, "max_side"),
    ({"detector": [1, 2]}, "detector"), ({"mode": 1}, "mode"), ({"detector": {"threshod": 0.9}}, "threshod"),
])
def test_a_misspelt_or_misplaced_faces_setting_fails_the_deploy_naming_it(faces, named):
    with pytest.raises(ValueError, match=named) as e:
        S.ServeArgs.model_validate({**BASE, "faces": faces})
    if named not in ("max_side", "detector", "mode", "threshod"):  # an unknown key: the known ones are listed
        assert "'mode', 'max_side', 'detector'" in str(e.value) and "faces.detector" in str(e.value)


def test_good_faces_settings_are_kept():
    args = S.ServeArgs.model_validate({**BASE, "faces": {"mode": "whole", "max_side": 1024,
                                                         "detector": {"threshold": 0.9, "min_face": 20}}})
    assert args.faces == {"mode": "whole", "max_side": 1024, "detector": {"threshold": 0.9, "min_face": 20}}
    assert S.ServeArgs.model_validate({**BASE, "faces": {"detector": None}}).faces["detector"] == {}


# --- 5: a description read never holds up the predictions, and is bounded ----------------------------------------
def _api_with(model: FakeModel, timeout_s: float = 0.3):
    api = ingress(request_timeout_s=timeout_s)
    api.handles = {"m": model}
    return api


def _predict(api):
    return api._predict("m", FakeRequest({"X-API-Key": "k", "Content-Type": "image/png"}, png_bytes()),
                        "a.png", "whole")


def test_a_refresh_of_the_description_does_not_hold_up_predictions():
    """GET /v1/models/{name} reads the description again; the model's replicas answer it late (all busy):
    a prediction meanwhile uses the cached one at once, and the GET is a 504 at request_timeout_s."""
    model = FakeModel()
    api = _api_with(model)

    async def scenario():
        await api._predict("m", FakeRequest({"X-API-Key": "k", "Content-Type": "image/png"}, png_bytes()),
                           "a.png", "whole")  # the description is cached now
        model.gate = asyncio.Event()  # from here, describe never answers
        refresh = asyncio.create_task(api._describe("m", refresh=True))
        await asyncio.sleep(0.05)
        t = time.perf_counter()
        answer = await asyncio.wait_for(_predict(api), 3)
        took = time.perf_counter() - t
        with pytest.raises(S.APIError) as e:
            await asyncio.wait_for(refresh, 3)
        return answer, took, e.value

    answer, took, err = asyncio.run(scenario())
    assert answer.status_code == 200 and took < 0.25
    assert err.status == 504 and err.code == "timeout"


def test_a_description_that_never_comes_is_a_504_not_a_wait_without_end():
    """The first read of a description (after a deploy) is shared by the requests that arrive meanwhile, and
    each of them waits at most request_timeout_s for it."""
    model = FakeModel()
    model.gate = asyncio.Event()
    api = _api_with(model)

    async def scenario():
        t = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(_predict(api), _predict(api), return_exceptions=True), 3)
        return results, time.perf_counter() - t

    results, took = asyncio.run(scenario())
    assert all(isinstance(r, S.APIError) and r.status == 504 and r.code == "timeout" for r in results), results
    assert took < 1.0 and model.describes == 1  # one read for both, neither waits past the timeout


# --- 6: what Serve would refuse fails before Ray starts -------------------------------------------------------------
@pytest.mark.parametrize("bad,named", [
    ({"max_queued_requests": 0}, "max_queued_requests"),
    ({"ingress": {"max_queued_requests": 0}}, "max_queued_requests"),
    ({"models": {"m": {"checkpoint": "m.pt", "max_queued_requests": 0}}}, "max_queued_requests"),
    ({"model_set": {"max_queued_requests": 0}}, "max_queued_requests"),
    ({"num_gpus": float("inf")}, "num_gpus"), ({"num_cpus": float("nan")}, "num_cpus"),
    ({"ingress": {"num_cpus": float("inf")}}, "num_cpus"),
    ({"ingress": {"request_timeout_s": float("inf")}}, "request_timeout_s"),
    ({"batch_wait_timeout_s": float("inf")}, "batch_wait_timeout_s"),
    ({"autoscaling_config": {"min_replica": 1}}, "min_replica"),
    ({"autoscaling_config": {"min_replicas": 3, "max_replicas": 1}}, "max_replicas"),
    ({"ingress": {"autoscaling_config": {"min_replicas": 0, "max_replicas": 0}}}, "max_replicas"),
    ({"models": {"m": {"checkpoint": "m.pt", "autoscaling_config": {"max_replica": 2}}}}, "max_replica"),
    ({"models": {"m": ""}}, "checkpoint is required"), ({"models": {"m": "  "}}, "checkpoint is required"),
])
def test_settings_serve_would_refuse_fail_the_config(bad, named):
    with pytest.raises(ValueError, match=named):
        S.ServeArgs.model_validate({**BASE, **bad})


def test_serves_own_good_values_still_pass():
    args = S.ServeArgs.model_validate({**BASE, "max_queued_requests": -1, "ingress": {"decode_wait_s": 0},
                                       "autoscaling_config": {"min_replicas": 0, "max_replicas": 4,
                                                              "target_ongoing_requests": 16}})
    assert args.max_queued_requests == -1 and args.autoscaling_config["max_replicas"] == 4


@pytest.mark.parametrize("env,argv,says", [
    ({"FACEATTR_API_KEY": "sécret"}, [], "FACEATTR_API_KEY"),
    ({"FACEATTR_API_KEY": "key "}, [], "FACEATTR_API_KEY"),
    ({"FACEATTR_API_KEY": "k", "FACEATTR_ADMIN_KEY": "admin\t"}, [], "FACEATTR_ADMIN_KEY"),
    ({}, ["--max-queued-requests", "0"], "max_queued_requests"),
    ({}, ["--autoscale", "3:1"], "--autoscale"),
    ({}, ["--autoscale", "0:0"], "--autoscale"),
    ({}, ["--num-gpus", "inf"], "--num-gpus"),
    ({}, ["--num-cpus", "nan"], "--num-cpus"),
    ({}, ["--max-request-mb", "nan"], "--max-request-mb"),
    ({}, ["--max-request-mb", "1e308"], "--max-request-mb"),
    ({}, ["--max-request-megapixels", "inf"], "--max-request-megapixels"),
    ({}, ["--request-timeout-s", "inf"], "--request-timeout-s"),
])
def test_jobs_serve_refuses_bad_settings_before_ray_starts(env, argv, says, monkeypatch, capsys):
    ray = FakeRay(monkeypatch, existing=None)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        _main(argv)
    assert e.value.code == 2 and ray.calls == []  # nothing started
    err = capsys.readouterr().err
    assert "error: " in err and says in err and "Traceback" not in err
    assert "sécret" not in err and "admin\t" not in err  # a key is never printed


# --- 7: auth before the query; the codes documented -------------------------------------------------------------
def _client(api, monkeypatch):
    import httpx
    from ray import serve

    class Context:
        servable_object = api

    monkeypatch.setattr(serve, "get_replica_context", lambda: Context())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=S.http.app), base_url="http://t")


def test_a_caller_without_the_key_learns_nothing_about_the_query(monkeypatch):
    api = _api_with(FakeModel())
    png = {"Content-Type": "image/png"}

    async def scenario():
        async with _client(api, monkeypatch) as c:
            return (await c.post("/v1/models/m/predict?faces=xyz", content=png_bytes(), headers=png),
                    await c.post("/v1/models/m/predict?faces=xyz", content=png_bytes(), headers={**png, "X-API-Key": "k"}),
                    await c.post("/v1/models/m/predict?faces=whole", content=png_bytes(), headers={**png, "X-API-Key": "k"}),
                    await c.get("/v1/models/m/predict", headers={"X-API-Key": "k"}),
                    await c.get("/openapi.json"))

    anon, bad, good, method, spec = asyncio.run(scenario())
    assert "xyz" not in assert_error(anon, 401, "unauthorized")["detail"]
    body = assert_error(bad, 422, "invalid_request")
    assert "faces" in body["detail"] and body["errors"][0]["loc"] == ["query", "faces"]
    assert good.status_code == 200
    assert_error(method, 405, "method_not_allowed")
    (faces,) = [p for p in spec.json()["paths"]["/v1/models/{name}/predict"]["post"]["parameters"]
                if p["name"] == "faces"]
    assert faces["schema"]["enum"] == ["detect", "whole"]  # its values are still described


def test_405_and_invalid_request_are_in_the_error_table():
    table = (ROOT / "docs" / "api.md").read_text().split("## Errors", 1)[1].split("\n## ", 1)[0]
    assert "| 405 | `method_not_allowed` |" in table and "| 422 | `invalid_request` |" in table
