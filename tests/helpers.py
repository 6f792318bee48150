"""Helpers shared by the test modules: images and photos, checkpoints, the label job's output and its
kill-after-the-first-commit loop, and the HTTP/ingress helpers of the serving tests. Fixtures that hold
these (checkpoints, the detector, Ray, S3) are in tests/conftest.py."""

from __future__ import annotations

import io
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# The environment of the tests' Ray clusters (the session's, tests/conftest.py, and the notebook kernel's).
# Ray Train V2's controller collects the workers' reports, and sees a finished or dead worker, only when it
# polls them: every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default. Our workers wait for each epoch's
# checkpoint to be committed (raytasks/train/worker.py), so each epoch, start, end and restart of a run waits
# for the next poll; runs whose epochs take seconds poll more often here.
# RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0: each Ray Train run starts an actor that asks Ray every 5 s whether a
# node is being drained (spot instances); on one local node nothing is, and the actor's process (it imports
# ray.train and ray.data) cost 22 CPU-s over the suite's 7 runs (measured 2026-12-03, per-process CPU of a
# whole `make test`). A user's runs keep Ray's default (on).
# RAY_LOG_MONITOR_MANY_FILES_THRESHOLD=0: the log monitor (a process per cluster, started by ray.init from the
# driver's environment) lists the session's log folder every 0.1 s while it holds fewer files than this, else
# every 0.5 s (ray/_private/log_monitor.py); it took 22 CPU-s over the suite's three clusters (2026-12-03, per
# process). The tests' drivers do not print the workers' logs (log_to_driver=False) and read no log through it.
RAY_TEST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0"}


def lease_output(request, tmp_path) -> str:
    """A label output on a local folder or on the test S3 server (``request.param``: "local" or "s3"); the
    lease tests' fixture (``pytest.fixture(params=["local", "s3"])(lease_output)``)."""
    if request.param == "local":
        return str(tmp_path / "out")
    _, bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/labels/run-1/"


# --- checkpoints ----------------------------------------------------------------------------------------
def save_model(path: str, name: str, seed: int | None = None, **kwargs) -> str:
    """``models.create_model(name, **kwargs)`` saved at ``path`` (a file or an s3:// URI); returns ``path``."""
    import torch

    import models
    from models.checkpoint import save_checkpoint

    if seed is not None:
        torch.manual_seed(seed)
    save_checkpoint(models.create_model(name, **kwargs), path)
    return path


def copy_file(src: str, dst: Path) -> str:
    dst.write_bytes(Path(src).read_bytes())
    return str(dst)


# --- single images ----------------------------------------------------------------------------------------
def face_jpeg(i: int, size=(56, 56)) -> bytes:
    """A drawn face (seeded by ``i``) as JPEG bytes."""
    from facedata.draw import draw_face
    from facedata.synth import encode_jpeg

    return encode_jpeg(draw_face(np.random.default_rng([7, i]), size)[0])


def png_bytes(img: Image.Image | None = None) -> bytes:
    """``img`` (default: an 8x8 RGB square) as PNG bytes."""
    img = img if img is not None else Image.new("RGB", (8, 8), (10, 20, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def huge_png(w: int = 10_000, h: int = 10_000) -> bytes:
    """A PNG whose header says w x h (over the 40 MP limit); only the header is ever read."""
    data = bytearray(png_bytes(Image.new("L", (8, 8))))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", w, h)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def odd_images() -> dict[str, bytes]:
    """Formats that must be labeled correctly (CMYK JPEG, 16-bit and palette PNG, no extension)."""
    from facedata.draw import draw_face

    face = draw_face(np.random.default_rng([7, 999]), (56, 56))[0]
    cmyk = io.BytesIO()
    face.convert("CMYK").save(cmyk, format="JPEG")
    grey16 = Image.fromarray(np.asarray(face.convert("L"), dtype=np.uint16) * 257)
    return {"odd/cmyk.jpg": cmyk.getvalue(), "odd/grey16.png": png_bytes(grey16),
            "odd/palette.png": png_bytes(face.convert("P", palette=Image.ADAPTIVE, colors=64)),
            "odd/IMG_0042": face_jpeg(4242)}  # no extension: an image by its content


BAD = {  # name -> expected error kind
    "bad/empty.jpg": "empty", "bad/text.jpg": "not_image", "bad/truncated.jpg": "truncated",
    "bad/huge.png": "too_large", "bad/IMG_0001.HEIC": "not_image", "bad/avif_without_extension": "not_image",
}
# the start of an iPhone's HEIC file: an ISO base media "ftyp" box of brand heic (the rest is not read)
HEIC_HEAD = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"


def avif_image() -> bytes:
    """A real AVIF file (Pillow writes it; it is not among the formats decoded here)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buf, "AVIF")
    return buf.getvalue()


def bad_files() -> dict[str, bytes]:
    full = face_jpeg(5000, (120, 120))
    return {"bad/empty.jpg": b"", "bad/text.jpg": b"these are not the pixels you are looking for\n",
            "bad/truncated.jpg": full[: len(full) // 2], "bad/huge.png": huge_png(),
            "bad/IMG_0001.HEIC": HEIC_HEAD + bytes(200), "bad/avif_without_extension": avif_image()}


NOT_INPUTS = {"notes.txt": b"a text file next to the photos\n", "meta/info.json": b"{}",
              ".hidden.jpg": face_jpeg(1),
              "clip.mp4": b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + bytes(64)}  # a video


def real_faces(n_utk: int = 3, n_celeba: int = 2) -> dict[str, bytes]:
    """Real UTKFace and CelebA files from ../shared/data (empty when absent)."""
    if not SHARED.is_dir():
        return {}
    utk = sorted((SHARED / "utkface").glob("*.jpg"))[:n_utk]
    celeba = sorted((SHARED / "celeba" / "img_align_celeba").glob("*.jpg"))[:n_celeba]
    return {f"real/{p.name}": p.read_bytes() for p in utk + celeba}


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


# --- photos with several faces ----------------------------------------------------------------------------
def real_crops(n: int) -> list[Image.Image]:
    """Real aligned faces from ../shared/data when present (UTKFace chips), else drawn faces."""
    from facedata.draw import draw_face

    paths = sorted((SHARED / "utkface").glob("*.jpg"))[:n] if SHARED.is_dir() else []
    if paths:
        return [Image.open(p).convert("RGB") for p in paths]
    return [draw_face(np.random.default_rng([11, i]), (178, 218))[0] for i in range(n)]


def compose(crops: list[Image.Image], places: list[tuple[int, int, int]], size=(1200, 800), seed=0) -> bytes:
    """Paste each crop scaled to ``width`` at ``(x, y)`` on a textured background -> JPEG bytes."""
    rng = np.random.default_rng(seed)
    small = rng.integers(60, 200, (size[1] // 40 + 1, size[0] // 40 + 1, 3), dtype=np.uint8)
    canvas = Image.fromarray(small).resize(size, Image.BICUBIC)
    for crop, (x, y, width) in zip(crops, places):
        h = round(crop.height * width / crop.width)
        canvas.paste(crop.resize((width, h), Image.BILINEAR), (x, y))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


PLACES = {  # photo -> where its faces are pasted (x, y, width), 0 to 3 faces
    "none.jpg": [],
    "one.jpg": [(500, 250, 260)],
    "three.jpg": [(60, 80, 180), (480, 300, 240), (900, 120, 150)],
}
ROWS_PER_PHOTOS = sum(max(1, len(p)) for p in PLACES.values()) + 1  # rows of photos(): faces, no face, broken
FACES_PER_PHOTOS = sum(len(p) for p in PLACES.values())


def photos() -> dict[str, bytes]:
    """none.jpg, one.jpg, three.jpg (PLACES) and a broken file."""
    crops = real_crops(4)
    out = {}
    for i, (name, places) in enumerate(PLACES.items()):
        out[name] = compose(crops[i % 2: i % 2 + len(places)], places, seed=i)
    out["broken.jpg"] = b"\xff\xd8\xff\xe0 not really a jpeg"
    return out


def many_photos(folder: Path | None = None, copies: int = 4) -> dict[str, bytes]:
    """``copies`` times photos() under prefixed names (more images than one batch), written to ``folder`` if
    one is given."""
    items = photos()
    many = {f"{i:02d}_{name}": data for i in range(copies) for name, data in items.items()}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        write_files(folder, many)
    return many


def inside(box, place) -> bool:
    x, y, w = place
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return x <= cx <= x + w and y <= cy <= y + w * 1.3


# --- the label job's output --------------------------------------------------------------------------------
def read_rows(output: str):
    """The Parquet rows of a label output (local or s3://) as an Arrow table."""
    import pyarrow.parquet as pq

    import storage
    from raytasks.label.output import LABELS_DIR

    fs, path = storage.filesystem(storage.join(output, LABELS_DIR))
    return pq.read_table(path, filesystem=fs)


def kill_after_commits(argv: list[str], ray_session, committed, n: int = 1, throttle: float = 1.0,
                       timeout_s: float = 240) -> None:
    """Run ``python -m jobs.label argv --throttle`` against the test session's Ray, wait until
    ``committed()`` (how many commit files the output's commit log holds) reaches ``n``, then SIGKILL the
    job's whole process group (the driver, as a killed pod would lose it). Fails if the job ends or no
    commit comes before the deadline."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.label", *argv, "--throttle", str(throttle)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while committed() < n:
            assert proc.poll() is None, "the job ended before it was killed:\n" + proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"no {n} commits in {timeout_s} s"
            time.sleep(0.2)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    time.sleep(2)  # let Ray reap the killed job's workers


def put_all(client, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    """Each of ``files`` (name -> bytes) as the object ``prefix + name`` of ``bucket``."""
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}{name}", Body=data)


def s3_commits(client, bucket: str, prefix: str):
    """``committed`` for kill_after_commits on an s3:// output (``prefix``: the commit log's key prefix)."""
    def count() -> int:
        objs = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return sum(1 for o in objs if o["Key"].endswith(".parquet") and not o["Key"].endswith(".pending.parquet"))
    return count


def assert_row_matches(got: dict, want: dict, fields) -> None:
    """Field by field: floats (and float lists) to 1e-4, the rest exactly."""
    import pytest

    for f in fields:
        a, b = got[f.name], want[f.name]
        if isinstance(b, float):
            assert a == pytest.approx(b, abs=1e-4), (got["path"], f.name)
        elif isinstance(b, list) and b and isinstance(b[0], float):
            assert np.allclose(a, b, atol=1e-4), (got["path"], f.name)
        else:
            assert a == b, (got["path"], f.name, a, b)


def plain(v, digits: int | None = 5):
    """A value as pandas or Arrow gives it -> plain Python (NaN -> None, arrays -> lists, floats rounded)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, np.ndarray):
        return [plain(x, digits) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [plain(x, digits) for x in v]
    if isinstance(v, dict):
        return {k: plain(x, digits) for k, x in v.items()}
    if isinstance(v, (np.floating, float)):
        return round(float(v), digits) if digits is not None else float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


# --- HTTP and the ingress ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_error(r, status: int, code: str | None = None) -> dict:
    """An httpx response is the JSON error ``status`` (``code``); returns its body."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["detail"], body
    if code:
        assert body["error"] == code, body
    return body


class FakeRequest:
    """What the ingress reads of a request: its headers and its body stream."""

    def __init__(self, headers: dict | None = None, body: bytes = b""):
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.body = body

    async def stream(self):
        yield self.body


def ingress(**limits):
    """The ingress object (``FaceAttrAPI``) without Serve, with API key ``k``: @serve.ingress wraps the class
    in an ASGI replica whose __init__ is a coroutine; ours is the plain one below it in the MRO."""
    import inspect

    from raytasks import serve as S

    wrapper = S.FaceAttrAPI.func_or_class
    ours = next(c for c in wrapper.__mro__ if c.__name__ == "FaceAttrAPI" and "__init__" in c.__dict__
                and not inspect.iscoroutinefunction(c.__dict__["__init__"]))
    api = object.__new__(wrapper)
    ours.__init__(api, {}, 1 << 20, 4, api_key="k", limits=S.IngressSpec(**limits))
    return api


def assert_same(got, want, where: str = "", tol: float = 1e-4) -> None:
    """Equal, floats to ``tol`` (relative or absolute: Parquet keeps float32, JSON and the core the float64
    of the same value; batches of other sizes sum in another order), recursively through structs and
    lists; a NaN expected is a None got (JSON has no NaN)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, set(got or {}) ^ set(want))
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}", tol)
    elif isinstance(want, (list, tuple, np.ndarray)):
        got = list(got) if isinstance(got, (tuple, np.ndarray)) else got
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]", tol)
    elif isinstance(want, (float, np.floating)) and not isinstance(want, bool):
        if math.isnan(want):
            assert got is None or (isinstance(got, float) and math.isnan(got)), (where, got)
        else:
            assert isinstance(got, (int, float, np.number)) and math.isclose(got, want, rel_tol=tol, abs_tol=tol), (
                where, got, want)
    else:
        assert got == want, (where, got, want)


def assert_same_faces(got, want) -> None:
    """Two ``faces.detect.Faces`` of one image are the same faces: count, boxes and points to 1e-3 px, scores
    to 1e-5 (a batch of other images sums in another order)."""
    import torch

    assert len(got) == len(want), (got.scores, want.scores)
    torch.testing.assert_close(got.boxes, want.boxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(got.points, want.points, atol=1e-3, rtol=0)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=0)


def detect_batched_and_alone(detector, images: list) -> list:
    """``detector``'s faces of ``images`` detected in one batch, each checked equal to the image detected alone."""
    together = detector.detect(images)
    for image, batched in zip(images, together):
        assert_same_faces(batched, detector.detect_one(image))
    return together


# --- training photos: drawn faces pasted at known places (jobs.train --faces detect) --------------------------
def drawn_source(seed: int, stream: int = 19):
    """A drawn face (facedata/draw.py) as a compose.FaceSource (its drawn points and a box around them),
    with its labels; drawn from the random stream ``[stream, seed]``."""
    from facedata.compose import FaceSource
    from facedata.draw import draw_face

    img, lab = draw_face(np.random.default_rng([stream, seed]), (178, 218))
    pts = np.asarray(lab["landmarks"], dtype=np.float64).reshape(5, 2)
    iod = float(np.linalg.norm(pts[1] - pts[0]))
    box = [pts[:, 0].min() - 0.9 * iod, pts[:, 1].min() - iod, pts[:, 0].max() + 0.9 * iod, pts[:, 1].max() + 0.8 * iod]
    return FaceSource(np.asarray(img), box, pts), lab


def face_photo(seeds: list[int], size=(320, 240), width: float = 110, seed: int = 0) -> tuple[bytes, list[dict]]:
    """A JPEG photo with the drawn faces ``seeds`` side by side on a cluttered background; returns its bytes
    and, per face, ``{"box", "points", "labels"}`` in the photo's pixels."""
    from facedata.compose import background, paste

    canvas = background(np.random.default_rng([23, seed]), *size)
    faces = []
    for k, s in enumerate(seeds):
        src, lab = drawn_source(s)
        centre = (size[0] * (k + 1) / (len(seeds) + 1), size[1] / 2)
        box, points = paste(canvas, src, centre, width / max(1, len(seeds)) ** 0.5, 0.0)
        faces.append({"box": box.tolist(), "points": points.reshape(-1).tolist(), "labels": lab})
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=92)
    return buf.getvalue(), faces


def blank_photo(seed: int = 5, size=(320, 240)) -> bytes:
    """A JPEG photo of clutter without a face."""
    from facedata.compose import background

    buf = io.BytesIO()
    background(np.random.default_rng([29, seed]), *size).save(buf, format="JPEG")
    return buf.getvalue()


def bad_training_files() -> dict[str, bytes]:
    """A truncated JPEG, a zero-byte file and a 1 x 40000 PNG (refused for its aspect ratio), by name."""
    full, _ = face_photo([900])
    return {"truncated.jpg": full[: len(full) // 2], "empty.jpg": b"",
            "strip.png": png_bytes(Image.new("L", (1, 40_000), 128))}


@contextmanager
def torch_threads(n: int = 2):
    """Run the block with ``n`` torch threads, then restore the count: a learning test's bar was measured with
    a thread count, another count sums floats in another order, and a test run earlier in the same xdist worker
    may have set one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def chw(a: np.ndarray):
    """An HWC uint8 array as the detector's CHW uint8 tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous()


def drawn_face_sources(detector, n: int = 3) -> list:
    """``n`` drawn faces (178x218, seeds [3, i]) as ``facedata.compose.FaceSource``: each with the box ``detector``
    finds on it alone and its drawn points (tests/test_detect.py, tests/test_tiles.py)."""
    from facedata.compose import FaceSource
    from facedata.draw import draw_face

    drawn = [draw_face(np.random.default_rng([3, i]), (178, 218)) for i in range(n)]
    images = [np.array(im) for im, _ in drawn]
    found = detector.detect([chw(a) for a in images])
    assert [len(f) for f in found] == [1] * n
    return [FaceSource(a, f.boxes[0].numpy(), np.reshape(lab["landmarks"], (5, 2)))
            for a, f, (_, lab) in zip(images, found, drawn)]

