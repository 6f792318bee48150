"""One image cannot fail its batch (core/failures.py): when the detector or a model raises on a batch, each image
is run again alone; one that fails alone gets a ``model_error`` row, the others the rows they get in any batch.
When every image fails, a dummy input tells the images' fault (error rows, whatever the batch) from the
networks' (raised: a broken model fails the job). A serving deadline (``check``) is a stop, never retried, and
the HTTP front refuses a request holding such an image with a 422 naming it.

The failures are injected where they would arise (the detector's or the model's forward pass of the session's
annotator), keyed on the image itself, so that only the batches holding it fail."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from core.failures import MODEL_ERROR, ImageFailed
from core.rows import row_dicts
from facedata.decode import Photos, Whole, decode_batch
from facedata.synth import encode_jpeg
from tests.helpers import assert_same

POISON_WIDTH = 333  # the detector "fails" on pictures of this width (under faces.max_side: not resized)


def _jpeg(array: np.ndarray) -> bytes:
    return encode_jpeg(Image.fromarray(array))


@pytest.fixture
def poison() -> bytes:
    return _jpeg(np.full((250, POISON_WIDTH, 3), 128, np.uint8))


@pytest.fixture
def poisoned_detector(hs_annotator, monkeypatch):
    """The annotator's detector raises on every batch holding the poison picture; its calls are counted."""
    finder = hs_annotator.finder
    real, calls = finder.find, []

    def find(images, scales=None):
        calls.append(len(images))
        if any(im.shape[-1] == POISON_WIDTH for im in images):
            raise RuntimeError("poisoned picture")
        return real(images, scales)

    monkeypatch.setattr(finder, "find", find)
    return calls


def _photos(items: list[tuple[str, bytes]], annotator) -> dict:
    return decode_batch([n for n, _ in items], [d for _, d in items], Photos(annotator.face_options.max_side))


def _alone(annotator, name: str, data: bytes) -> list[dict]:
    return row_dicts(annotator.annotate(_photos([(name, data)], annotator)))


def test_an_image_the_detector_fails_on_gets_an_error_row_and_its_batch_its_rows(hs_annotator, group_photo, poison,
                                                                                poisoned_detector):
    photo, faces = group_photo
    want = {n: _alone(hs_annotator, n, d) for n, d in (("a.jpg", photo), ("c.jpg", photo[:-2] + b"\xff\xd9"))}
    poisoned_detector.clear()
    batch = _photos([("a.jpg", photo), ("bad.jpg", poison), ("broken.jpg", b"not an image"),
                     ("c.jpg", photo[:-2] + b"\xff\xd9")], hs_annotator)
    rows = row_dicts(hs_annotator.annotate(batch))  # raised "poisoned picture" before core/failures.py
    assert poisoned_detector[0] == 3  # the batch's three pictures once, then each alone
    by_path: dict[str, list] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    assert list(by_path) == ["a.jpg", "bad.jpg", "broken.jpg", "c.jpg"]  # the batch's order
    (bad,) = by_path["bad.jpg"]
    assert not bad["ok"] and bad["error_kind"] == MODEL_ERROR and bad["face"] is None
    assert bad["error_message"] == "RuntimeError: poisoned picture"
    (broken,) = by_path["broken.jpg"]
    assert broken["error_kind"] == "not_image"  # a decoding error keeps its own kind
    for name in ("a.jpg", "c.jpg"):
        assert len(by_path[name]) == faces
        assert_same(by_path[name], want[name], name)


def test_find_names_the_failed_picture_and_annotate_gives_it_its_error_row(hs_annotator, group_photo, poison,
                                                                          poisoned_detector):
    """The serving replica finds faces first (to count them against the request's budget), then annotates."""
    photo, faces = group_photo
    batch = _photos([("a.jpg", photo), ("bad.jpg", poison)], hs_annotator)
    found = hs_annotator.find(batch)
    assert len(found[0]) == faces and found[1] == ImageFailed("RuntimeError: poisoned picture")
    rows = row_dicts(hs_annotator.annotate({**batch, "found": found}))
    assert [r["error_kind"] for r in rows] == [None] * faces + [MODEL_ERROR]
    assert_same(rows[:faces], _alone(hs_annotator, "a.jpg", photo))


def test_a_batch_that_fails_only_together_is_answered_image_by_image(hs_annotator, group_photo, monkeypatch):
    """As a GPU out of memory on a batch of crowds: the model raises on more faces than one photo holds."""
    photo, faces = group_photo
    batch = _photos([("a.jpg", photo), ("b.jpg", photo)], hs_annotator)
    want = row_dicts(hs_annotator.annotate(batch))
    (runner,) = hs_annotator.members.values()
    real = runner.forward_uint8

    def forward(x):
        if len(x) > faces:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(x)

    monkeypatch.setattr(runner, "forward_uint8", forward)
    assert_same(row_dicts(hs_annotator.annotate(batch)), want)


def test_a_failure_the_networks_have_on_any_input_is_raised_not_written_as_error_rows(hs_annotator, group_photo,
                                                                                     monkeypatch):
    """A broken model or device (it fails on a dummy input too) fails the job: a million ``model_error`` rows
    would hide it."""
    photo, _ = group_photo
    (runner,) = hs_annotator.members.values()
    calls = []

    def broken(x):
        calls.append(len(x))
        raise RuntimeError("broken model")

    monkeypatch.setattr(runner, "forward_uint8", broken)
    batch = _photos([("a.jpg", photo), ("b.jpg", photo), ("bad.jpg", b"")], hs_annotator)
    with pytest.raises(RuntimeError, match="broken model"):
        hs_annotator.annotate(batch)
    assert calls == [2 * group_photo[1], group_photo[1], group_photo[1], 1]  # the batch, each alone, the dummy


def test_a_detector_that_fails_on_any_input_is_raised(hs_annotator, group_photo, poison, monkeypatch):
    finder = hs_annotator.finder

    def broken(images, scales=None):
        raise RuntimeError("broken detector")

    monkeypatch.setattr(finder, "find", broken)
    with pytest.raises(RuntimeError, match="broken detector"):
        hs_annotator.annotate(_photos([("a.jpg", group_photo[0]), ("bad.jpg", poison)], hs_annotator))
    with pytest.raises(RuntimeError, match="broken detector"):
        hs_annotator.find(_photos([("bad.jpg", poison)], hs_annotator))


def test_an_image_gets_its_error_row_whatever_shares_its_batch(hs_annotator, group_photo, poison, poisoned_detector):
    """Alone in its batch (a serving request of one photo), or with another image that fails too: the same
    error row, since the networks still run on a dummy input; the decode error beside it keeps its own."""
    alone = row_dicts(hs_annotator.annotate(_photos([("bad.jpg", poison), ("broken.jpg", b"")], hs_annotator)))
    assert [(r["path"], r["error_kind"]) for r in alone] == [("bad.jpg", MODEL_ERROR), ("broken.jpg", "empty")]
    both = row_dicts(hs_annotator.annotate(_photos([("bad.jpg", poison), ("bad2.jpg", poison)], hs_annotator)))
    assert [r["error_kind"] for r in both] == [MODEL_ERROR, MODEL_ERROR]
    assert alone[0]["error_message"] == both[0]["error_message"] == "RuntimeError: poisoned picture"
    assert hs_annotator.find(_photos([("bad.jpg", poison)], hs_annotator)) == [ImageFailed("RuntimeError: poisoned picture")]


def test_a_stop_is_not_retried_image_by_image(hs_annotator, group_photo, poison, poisoned_detector):
    """A serving request past its deadline stops the work (``check``); no image is tried again."""
    photo, _ = group_photo
    batch = _photos([("a.jpg", photo), ("b.jpg", photo)], hs_annotator)

    class Late(Exception):
        pass

    def check():
        raise Late

    with pytest.raises(Late):
        hs_annotator.annotate(batch, check=check)
    assert poisoned_detector == [2]  # detection once; then the check stopped it


def test_whole_images_the_model_fails_on_alone_get_error_rows(hs_annotator, group_photo, monkeypatch):
    """Whole images (each one face): the model raises on any batch holding an all-white input."""
    (runner,) = hs_annotator.members.values()
    pre = runner.preprocessing
    face = _jpeg(np.asarray(Image.open(io.BytesIO(group_photo[0])).convert("RGB").resize(pre.size[::-1])))
    white = _jpeg(np.full((*pre.size, 3), 255, np.uint8))
    items = [("a.jpg", face), ("white.jpg", white), ("b.jpg", face)]
    batch = decode_batch([n for n, _ in items], [d for _, d in items], Whole((pre,)))
    want = row_dicts(hs_annotator.annotate(batch))
    real = runner.forward_uint8

    def forward(x):
        if bool((x.flatten(1).min(1).values >= 250).any()):
            raise ValueError("white input")
        return real(x)

    monkeypatch.setattr(runner, "forward_uint8", forward)
    rows = row_dicts(hs_annotator.annotate(batch))
    assert [r["error_kind"] for r in rows] == [None, MODEL_ERROR, None]
    assert rows[1]["error_message"] == "ValueError: white input"
    assert_same([rows[0], rows[2]], [want[0], want[2]])


def test_the_http_front_refuses_a_request_holding_such_an_image_with_a_422_naming_it():
    from raytasks.serve.http import APIError, _refuse_model_errors

    ok = {"path": "a.jpg", "ok": True, "error_kind": None, "error_message": None}
    _refuse_model_errors([ok, ok])
    with pytest.raises(APIError) as e:
        _refuse_model_errors([ok, {"path": "bad.jpg", "ok": False, "error_kind": MODEL_ERROR,
                                   "error_message": "RuntimeError: poisoned picture"}])
    assert e.value.status == 422 and e.value.code == MODEL_ERROR
    assert e.value.extra["files"] == [{"file": "bad.jpg", "error": MODEL_ERROR,
                                       "detail": "RuntimeError: poisoned picture"}]


def _replica(annotator):
    """The serving replica's class around the session's annotator, outside Serve: its ``@serve.batch`` methods
    (which need a Serve replica's context) are their own functions, each item a batch of one."""
    import threading
    from collections import Counter

    from raytasks.serve.replicas import AnnotatorServer
    from raytasks.threads import torch_executor

    cls = AnnotatorServer.func_or_class
    s = object.__new__(cls)
    s.name, s.annotator, s._torch_thread, s._lock = "t", annotator, torch_executor("t"), threading.Lock()
    s.batch_sizes, s.requests, s.images, s.faces, s.refused = Counter(), 0, 0, 0, {"faces": 0, "deadline": 0}
    for name in ("find_photo", "infer_photo"):
        fn = getattr(cls, name).__wrapped__

        async def one(item, fn=fn):
            return (await fn(s, [item]))[0]
        setattr(s, name, one)
    return s


def test_a_request_holding_a_photo_the_detector_fails_on_costs_no_model_work(hs_annotator, group_photo, poison,
                                                                           poisoned_detector):
    """The ingress refuses such a request whole (422), so its other photos are not run through the models."""
    import asyncio

    from raytasks.serve.http import APIError, _refuse_model_errors

    photo, faces = group_photo
    batch = _photos([("a.jpg", photo), ("bad.jpg", poison), ("b.jpg", photo)], hs_annotator)
    items = [{k: batch[k][i] for k in batch if k not in ("ok", "error_kind", "error_message")} for i in range(3)]
    server = _replica(hs_annotator)
    try:
        out = asyncio.run(server.predict_photos(items, hs_annotator.identity, {"max_faces": 100}))
        assert [len(rows) for rows in out] == [0, 1, 0]
        assert out[1][0]["error_kind"] == MODEL_ERROR and out[1][0]["path"] == "bad.jpg"
        assert (server.images, server.faces) == (1, 0)  # only the failed photo's error row was built
        with pytest.raises(APIError) as e:
            _refuse_model_errors([r for rows in out for r in rows])
        assert e.value.status == 422 and [f["file"] for f in e.value.extra["files"]] == ["bad.jpg"]

        out = asyncio.run(server.predict_photos([items[0], items[2]], hs_annotator.identity, {"max_faces": 100}))
        assert [len(rows) for rows in out] == [faces, faces]  # without it, the request's photos get their rows
        assert (server.images, server.faces) == (3, 2 * faces)
    finally:
        server._torch_thread.shutdown()


def test_a_broken_model_is_raised_even_beside_a_photo_without_a_face(hs_annotator, group_photo, monkeypatch):
    """A photo without a face never reaches the models, so it succeeds alone: the dummy input still says that
    the model, not the photos, is broken (without the probe, two error rows and a clean blank one)."""
    (runner,) = hs_annotator.members.values()

    def broken(x):
        raise RuntimeError("broken model")

    monkeypatch.setattr(runner, "forward_uint8", broken)
    blank = _jpeg(np.full((240, 300, 3), 128, np.uint8))
    batch = _photos([("a.jpg", group_photo[0]), ("b.jpg", group_photo[0]), ("blank.jpg", blank)], hs_annotator)
    with pytest.raises(RuntimeError, match="broken model"):
        hs_annotator.annotate(batch)


def test_a_model_whose_output_head_fails_on_any_input_is_raised(hs_annotator, group_photo, monkeypatch):
    """The probe reads each model's columns (its heads and calibration), not only its forward pass."""
    (runner,) = hs_annotator.members.values()

    def broken(*args, **kwargs):
        raise ValueError("calibration shape mismatch")

    monkeypatch.setattr(runner.model, "to_columns", broken)
    with pytest.raises(ValueError, match="calibration shape mismatch"):
        hs_annotator.annotate(_photos([("a.jpg", group_photo[0]), ("b.jpg", group_photo[0])], hs_annotator))


def test_a_broken_detector_is_raised_and_a_decoding_error_is_never_retried(hs_annotator, group_photo, monkeypatch):
    calls = []

    def broken(images, scales=None):
        calls.append(len(images))
        raise RuntimeError("broken detector")

    monkeypatch.setattr(hs_annotator.finder, "find", broken)
    batch = _photos([("a.jpg", group_photo[0]), ("b.jpg", group_photo[0]), ("broken.jpg", b"")], hs_annotator)
    with pytest.raises(RuntimeError, match="broken detector"):
        hs_annotator.find(batch)
    assert calls == [2, 1, 1, 1]  # the batch, each picture alone, the dummy: the empty file is not a picture


def test_the_failed_batchs_tensors_are_freed_before_the_images_run_alone(hs_annotator, group_photo, monkeypatch):
    """After a batch ran out of device memory, its activations and inputs (held by the exception's frames) are
    released before the retries, so those do not run out of memory in turn."""
    import gc
    import weakref

    photo, faces = group_photo
    (runner,) = hs_annotator.members.values()
    real, refs = runner.forward_uint8, []

    def forward(x):
        if len(x) > faces:
            activation = torch.empty(50_000_000, dtype=torch.uint8)
            refs.extend([weakref.ref(activation), weakref.ref(x)])
            raise torch.OutOfMemoryError("injected")
        return real(x)

    alive = []
    monkeypatch.setattr(runner, "forward_uint8", forward)
    monkeypatch.setattr(hs_annotator, "_release_device_memory",
                        lambda: (gc.collect(), alive.append([r() is not None for r in refs])))
    rows = row_dicts(hs_annotator.annotate(_photos([("a.jpg", photo), ("b.jpg", photo)], hs_annotator)))
    assert alive == [[False, False]] and [r["error_kind"] for r in rows] == [None] * (2 * faces)
