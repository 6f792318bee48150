"""What one request may cost the ingress (issue #22): decoded pixels and bytes per request, refused from the
headers before any decoding; the replica's budgets of decoded images and bodies in flight (503 before the
memory is taken); a body that does not arrive in time (408). No Serve needed: the ingress object alone."""

from __future__ import annotations

import asyncio
import time

import pytest

from facedata.decode import Photos
from raytasks import serve as S
from tests.helpers import assert_same, ingress
from tests.hostile import flat_webp


def test_a_small_body_of_many_large_flat_images_is_refused_before_decoding():
    """64 copies of a 2048x2048 single-colour lossless WebP (about 200 bytes each, a 14 KB body) would hold
    768 MiB decoded: refused 413 from the headers, with nothing decoded."""
    data = flat_webp(2048, 2048)
    assert len(data) < 1024
    api = ingress()
    decoded = []
    api._decode_real = api._decode

    async def spy(fn, *args):
        decoded.append(fn)
        return await api._decode_real(fn, *args)

    api._decode = spy
    t = time.perf_counter()
    with pytest.raises(S.APIError) as e:
        asyncio.run(api._decoded([(f"{i}.webp", data) for i in range(64)], Photos(2048)))
    assert time.perf_counter() - t < 5
    assert e.value.status == 413 and e.value.code == "too_large" and "decoded" in e.value.detail
    assert len(decoded) == 1  # only the header probe ran, never decode_batch
    assert api._decoded_budget.free == api._decoded_budget.total  # nothing held


def test_the_source_pixels_of_a_request_are_bounded():
    """Six 6000x6000 single-colour WebPs (36 MP each, under the 40 MP limit of one image): 216 MP in one
    request is over the 200 MP default, so the decoder's CPU time is bounded per request (413 before
    decoding)."""
    data = flat_webp(6000, 6000)
    api = ingress()
    with pytest.raises(S.APIError) as e:
        asyncio.run(api._decoded([(f"{i}.webp", data) for i in range(6)], Photos(256)))
    assert e.value.status == 413 and "pixels" in e.value.detail
    ok = asyncio.run(api._decoded([("a.webp", data)], Photos(256)))  # one alone is fine
    assert ok[0][0]["width"] == 6000 and ok[1] == 3 * 256 * 256


def test_a_full_decoded_budget_is_a_503_and_frees_again():
    data = flat_webp(1024, 1024)  # 3 MiB decoded
    api = ingress(max_decoded_bytes=4 << 20, decode_wait_s=0.05)

    async def scenario():
        first, held = await api._decoded([("a.webp", data)], Photos(2048))
        with pytest.raises(S.APIError) as e:
            await api._decoded([("b.webp", data)], Photos(2048))
        await api._decoded_budget.release(held)
        again, held2 = await api._decoded([("b.webp", data)], Photos(2048))
        await api._decoded_budget.release(held2)
        return e.value

    err = asyncio.run(scenario())
    assert err.status == 503 and err.code == "overloaded" and err.headers["Retry-After"] == "1"
    assert api._decoded_budget.free == api._decoded_budget.total


class _SlowRequest:
    """A body that trickles in: ``chunks`` pieces, ``delay_s`` apart (a slowloris sender)."""

    def __init__(self, size: int, chunks: int, delay_s: float):
        self.headers = {"content-type": "image/jpeg", "content-length": str(size)}
        self.size, self.chunks, self.delay_s = size, chunks, delay_s

    async def stream(self):
        for _ in range(self.chunks):
            await asyncio.sleep(self.delay_s)
            yield b"x" * (self.size // self.chunks)


def test_a_slow_body_is_a_408_and_gives_its_memory_back():
    api = ingress(body_timeout_s=0.3)
    with pytest.raises(S.APIError) as e:
        asyncio.run(api._read_items(_SlowRequest(1000, 100, 0.05), "x.jpg"))
    assert e.value.status == 408 and e.value.code == "body_timeout"
    assert api._body_budget.free == api._body_budget.total
    items, held = asyncio.run(api._read_items(_SlowRequest(1000, 2, 0.01), "x.jpg"))  # a normal sender
    assert items == [("x.jpg", b"x" * 1000)] and held == 1000


def test_bodies_in_flight_are_bounded():
    """Room for a body is taken from its Content-Length before it is read: with room for one 1 MiB body,
    a second slow sender waits decode_wait_s, then 503, holding nothing."""
    api = ingress(max_body_bytes=(1 << 20) + 10, decode_wait_s=0.05, body_timeout_s=5)

    async def scenario():
        slow = asyncio.create_task(api._read_items(_SlowRequest(1 << 20, 4, 0.1), "a.jpg"))
        await asyncio.sleep(0.02)
        with pytest.raises(S.APIError) as e:
            await api._read_items(_SlowRequest(1 << 20, 1, 0.0), "b.jpg")
        _, held = await slow
        await api._body_budget.release(held)
        return e.value

    err = asyncio.run(scenario())
    assert err.status == 503 and api._body_budget.free == api._body_budget.total


def test_work_stops_at_the_check_after_detection_and_between_chunks_of_faces(hs_annotator, group_photo, monkeypatch):
    """The serving replica's deadline is a ``check`` given to the core: called after detection, before each
    model and between chunks of faces; what it raises stops the work there, so no further forward pass runs
    (count them). Without it firing, the rows are those of a run without any check."""
    import core.annotator as A
    from facedata.decode import decode_batch

    (runner,) = hs_annotator.members.values()
    passes, real = [], runner.forward_uint8
    monkeypatch.setattr(runner, "forward_uint8", lambda x: passes.append(len(x)) or real(x))
    batch = decode_batch(["a.jpg", "b.jpg"], [group_photo[0]] * 2, Photos(hs_annotator.face_options.max_side))
    batch["found"] = hs_annotator.find(batch)  # detection once, as the serving replica does (then the models)
    faces = 2 * group_photo[1]
    assert sum(len(f) for f in batch["found"]) == faces

    class Late(Exception):
        pass

    def after(n: int):
        """A check that lets ``n`` calls pass, then raises; and its calls."""
        calls = []

        def check():
            calls.append(1)
            if len(calls) > n:
                raise Late
        return check, calls

    check, _ = after(0)  # the deadline passed during detection: no model runs
    with pytest.raises(Late):
        hs_annotator.annotate(batch, check=check)
    assert passes == []
    monkeypatch.setattr(A, "CHECK_EVERY", 2)
    check, _ = after(2)  # after detection, then one chunk of 2 faces, then stop
    with pytest.raises(Late):
        hs_annotator.annotate(batch, check=check)
    assert passes == [2]
    passes.clear()
    check, calls = after(10**6)
    rows = hs_annotator.annotate(batch, check=check)
    assert passes == [2] * (faces // 2) + [faces % 2] * (faces % 2) and len(calls) == 1 + len(passes)
    monkeypatch.setattr(runner, "forward_uint8", real)
    assert_same(rows, hs_annotator.annotate(batch))


def test_a_requests_deadline_is_counted_on_the_replicas_clock_whatever_the_hosts_wall_clocks_say(monkeypatch):
    """The ingress sends how long it waits before its 504, and the replica counts it on its own monotonic clock:
    an ingress host an hour behind and a replica host an hour ahead (wall clocks; NTP steps them, containers
    on other hosts disagree) still give the request its 7 s. Before, the ingress sent ``time.time() + 7`` of its
    host and the replica compared it with its own ``time.time()``: every request was past its deadline on
    arrival, and with the skew reversed none ever was."""
    from raytasks.serve import replicas as R
    from tests.helpers import ingress

    api = ingress(request_timeout_s=7.0)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)  # the ingress's host
    limits = api._request_limits()
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # the replica's host
    live = R.AnnotatorServer.func_or_class._live
    deadline = R.deadline_of(limits)
    assert 6.5 < deadline - time.monotonic() <= 7.0
    assert live([{R.DEADLINE: deadline}], lambda items: ["rows"] * len(items)) == ["rows"]
    late = R.deadline_of({**limits, "timeout_s": 0.0})
    time.sleep(0.01)
    (result,) = live([{R.DEADLINE: late}], lambda items: ["rows"] * len(items))
    assert isinstance(result, R.DeadlineExceeded)
    assert R.deadline_of({"max_faces": 3}) is None  # no timeout sent: no deadline
