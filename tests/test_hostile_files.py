"""Issue #22 (security hardening, second round), what is inside the bytes, without Ray: bounded checkpoint reads,
the checkpoint hash over tensors in metadata, YAML aliases, the JPEG scan limit shared with --gpu-decode, and a
PNG's late orientation chunk. Each test failed on the code before its fix. (Where bytes are read from:
tests/test_hostile_paths.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.hostile import BILLION_LAUGHS
from tests.hostile import checkpoint_with_extra as _with_extra
from tests.hostile import noise_jpeg as _jpeg
from tests.hostile import png_with_late_exif as _png_with_late_exif
from tests.hostile import scan_bomb as _scan_bomb

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------
# 5: checkpoint reads are bounded in size and time; a FIFO fails at once
# ------------------------------------------------------------------------------------------------------

def _in_thread(fn, timeout):
    box = []

    def run():
        try:
            box.append(("ok", fn()))
        except BaseException as e:  # noqa: BLE001
            box.append(("error", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert box, f"still blocked after {timeout} s"
    return box[0]


def _saved(tmp_path, name="hs.pt", **kw):
    import models
    from models.checkpoint import save_checkpoint

    path = str(tmp_path / name)
    digest = save_checkpoint(models.create_model("hard_sharing"), path, **kw)
    return path, digest


def test_a_fifo_given_as_a_checkpoint_fails_fast(tmp_path):
    from models.checkpoint import CheckpointError, load_checkpoint

    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    status, err = _in_thread(lambda: load_checkpoint(str(fifo)), 10)
    assert time.perf_counter() - t0 < 2
    assert status == "error" and isinstance(err, CheckpointError) and "not a regular file" in str(err)


def test_checkpoint_reads_are_bounded_in_size(tmp_path, monkeypatch):
    from models.checkpoint import (
        DEFAULT_MAX_CHECKPOINT_BYTES,
        MAX_BYTES_ENV,
        CheckpointError,
        load_checkpoint,
    )

    path, digest = _saved(tmp_path)
    size = os.path.getsize(path)
    monkeypatch.setenv(MAX_BYTES_ENV, str(size - 1))
    with pytest.raises(CheckpointError, match=f"{size} bytes, over the limit of {size - 1}"):
        load_checkpoint(path)
    assert load_checkpoint(path, max_bytes=size)[1].hash == digest  # the argument wins over the environment
    monkeypatch.delenv(MAX_BYTES_ENV)
    assert load_checkpoint(path)[1].hash == digest
    big = tmp_path / "big.pt"
    with open(big, "wb") as f:
        f.truncate(DEFAULT_MAX_CHECKPOINT_BYTES + 1)  # sparse: refused from its size, never read
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"over the limit of {DEFAULT_MAX_CHECKPOINT_BYTES}"):
        load_checkpoint(str(big))
    assert time.perf_counter() - t0 < 2


class _SlowS3:
    """A minimal S3 endpoint on 127.0.0.1 whose one object is sent at 20 bytes a second."""

    def __init__(self, size: int):
        import http.server

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _headers(self):
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Last-Modified", "Tue, 01 Dec 2026 00:00:00 GMT")
                self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
                self.end_headers()

            def do_HEAD(self):
                self._headers()

            def do_GET(self):
                self._headers()
                try:
                    for _ in range(size):
                        if outer.stop.is_set():
                            self.close_connection = True  # the read left behind ends now (see the test)
                            return
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:
                    pass

        self.stop = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_slow_checkpoint_read_times_out(monkeypatch):
    import storage
    from models.checkpoint import TIMEOUT_ENV, CheckpointError, load_checkpoint

    slow = _SlowS3(100_000)
    try:
        for k, v in {"AWS_ENDPOINT_URL": slow.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv(TIMEOUT_ENV, "1.5")
        # one attempt: the read left behind after its timeout then ends with the server, not after 10 attempts'
        # backoff against a closed port (60-150 s) during which it holds pyarrow's S3 lock, and every
        # S3FileSystem made later in this process waits for it (a later S3 test stood still, CI 2026-12-06)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        t0 = time.perf_counter()
        status, err = _in_thread(lambda: load_checkpoint("s3://models/slow.pt"), 20)
        assert status == "error" and isinstance(err, CheckpointError), err
        assert "not done within 1.5 s" in str(err) and time.perf_counter() - t0 < 5
        with pytest.raises(storage.BoundedReadError, match="over the limit of 1000"):
            storage.read_bounded("s3://models/slow.pt", 1000, 5)  # refused from its size (HEAD)
    finally:
        slow.close()


def test_read_bounded_refuses_what_is_not_a_regular_file(tmp_path):
    import storage

    (tmp_path / "set.yaml").write_bytes(b"models: {}\n")
    assert storage.read_bounded(str(tmp_path / "set.yaml"), 100, 5) == b"models: {}\n"
    os.mkfifo(tmp_path / "fifo.yaml")
    for uri in (str(tmp_path / "fifo.yaml"), "/dev/zero", str(tmp_path)):
        status, err = _in_thread(lambda u=uri: storage.read_bounded(u, 100, 5), 10)
        assert status == "error" and isinstance(err, storage.BoundedReadError) and "not a regular file" in str(err)
    with pytest.raises(storage.BoundedReadError, match="11 bytes, over the limit of 10"):
        storage.read_bounded(str(tmp_path / "set.yaml"), 10, 5)
    with pytest.raises(FileNotFoundError):
        storage.read_bounded(str(tmp_path / "missing.yaml"), 10, 5)


# ------------------------------------------------------------------------------------------------------
# 4: the content hash covers every value of a tensor in the metadata
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["top", "nested"])
def test_one_value_of_a_tensor_in_extra_changes_the_hash(tmp_path, where):
    import torch

    from models.checkpoint import CheckpointError, load_checkpoint

    calib = torch.linspace(0, 1, 5000)
    other = calib.clone()
    other[2500] += 0.5  # in the middle: repr shows neither

    def wrap(t):
        return {"calibration": t} if where == "top" else {"runs": [{"name": "r1", "curves": {"calibration": t}}]}

    a, ha = _with_extra(tmp_path, "a.pt", wrap(calib))
    b, hb = _with_extra(tmp_path, "b.pt", wrap(other))
    assert ha != hb
    for path in (f"{a}#{ha}", f"{b}#{ha}"):  # metadata is plain JSON: such a file is refused whatever its pin
        with pytest.raises(CheckpointError, match="a tensor outside state_dict"):
            load_checkpoint(path)
    # the same values in another dtype or shape are another checkpoint too
    _, hc = _with_extra(tmp_path, "c.pt", wrap(calib.double()))
    _, hd = _with_extra(tmp_path, "d.pt", wrap(calib.reshape(50, 100)))
    assert len({ha, hc, hd}) == 3


def test_a_tensor_and_text_that_looks_like_it_hash_differently(tmp_path):
    import torch

    from models.checkpoint_hash import content_hash

    t = torch.zeros(5000)
    sd = {"w": torch.ones(2)}
    assert content_hash("m", {}, sd, extra={"x": t}) != content_hash("m", {}, sd, extra={"x": repr(t)})
    assert content_hash("m", {}, sd, extra={"x": t, "y": "a"}) != content_hash("m", {}, sd, extra={"x": t, "y": ["a"]})


def test_hashes_of_checkpoints_without_arrays_in_their_metadata_do_not_change(tmp_path):
    """The hash every existing checkpoint carries (JSON of the metadata, then the tensors) is unchanged."""
    import hashlib
    import json

    import torch

    from models.checkpoint import load_checkpoint
    from models.checkpoint_hash import FORMAT, tensor_digest

    path, digest = _saved(tmp_path, metrics={"accuracy": 0.5}, extra={"run": "r1", "epochs": [1, 2], "lr": 1e-3})
    obj = torch.load(path, weights_only=True)
    h = hashlib.sha256(FORMAT.encode())
    meta = {k: obj[k] for k in ("config", "outputs", "preprocessing", "metrics", "extra")}
    h.update(json.dumps({"model": obj["model"], **meta}, sort_keys=True, default=repr).encode())
    tensor_digest(h, obj["state_dict"])
    assert digest == obj["hash"] == "sha256:" + h.hexdigest()
    assert load_checkpoint(f"{path}#{digest}")[1].hash == digest


# ------------------------------------------------------------------------------------------------------
# 6: YAML with aliases is refused before it is expanded; the node count is bounded
# ------------------------------------------------------------------------------------------------------

def test_billion_laughs_fails_fast_with_bounded_memory():
    assert len(BILLION_LAUGHS) < 500
    code = ("import resource, sys, time; from facedata.yamlsafe import load_yaml, YamlError; "
            "text = sys.stdin.read(); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "t0 = time.perf_counter()\n"
            "try:\n    load_yaml(text); print('loaded')\n"
            "except YamlError as e:\n"
            "    print(f'{time.perf_counter() - t0:.3f}', "
            "(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, e)")
    out = subprocess.run([sys.executable, "-c", code], input=BILLION_LAUGHS, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    seconds, grew_mb, message = out.stdout.split(" ", 2)
    assert float(seconds) < 1.0 and int(grew_mb) < 16, out.stdout
    assert message.startswith("line 1: an anchor (&a)"), message


def test_a_model_set_file_loads_as_safe_load_does():
    import yaml

    from facedata.yamlsafe import load_yaml

    text = (ROOT / "jobs" / "model_set.yaml").read_text()
    assert load_yaml(text) == yaml.safe_load(text)
    assert load_yaml('{"models": {"a": "s3://m/a.pt"}, "embedding": false}') == {"models": {"a": "s3://m/a.pt"},
                                                                                  "embedding": False}
    assert load_yaml("version: 2026-11-29\n")["version"].isoformat() == "2026-11-29"  # the usual types


@pytest.mark.parametrize("text,expected", [
    ("base: &b {x: 1}\nother:\n  <<: *b\n", "line 1: an anchor (&b)"),
    ("models:\n  a: s3://m/a.pt\n  b: *undefined\n", "line 3: an alias (*undefined)"),
    ("models: [" + ", ".join(["x"] * 20_000) + "]\n", "line 1: more than 10000 YAML nodes"),
    ("[" * 100 + "]" * 100, "line 1: nested deeper than 32 levels"),
    ("a: 1\n---\nb: 2\n", "line 2: more than one YAML document"),
    ("models:\n  a: [" + "z" * 100_000 + "\n", "line 3: not valid YAML"),
])
def test_refused_yaml_names_the_line_and_quotes_little(text, expected):
    from facedata.yamlsafe import YamlError, load_yaml

    t0 = time.perf_counter()
    with pytest.raises(YamlError) as e:
        load_yaml(text)
    assert time.perf_counter() - t0 < 1.0
    assert str(e.value).startswith(expected), str(e.value)
    assert len(str(e.value)) < 300 and "z" * 100 not in str(e.value)


# ------------------------------------------------------------------------------------------------------
# 7: one JPEG scan limit for the CPU decoder and --gpu-decode
# ------------------------------------------------------------------------------------------------------

def test_a_4000_scan_jpeg_is_refused_by_the_shared_check():
    from models.imagebytes import MAX_JPEG_SCANS, ImageDecodeError, check_jpeg_bytes, jpeg_scan_count
    from models.preprocess import Preprocessing, decode

    bomb = _scan_bomb()
    assert len(bomb) < 2_000_000 and jpeg_scan_count(bomb) >= 4000
    t0 = time.perf_counter()
    with pytest.raises(ImageDecodeError) as e:
        check_jpeg_bytes(bomb)
    assert time.perf_counter() - t0 < 0.5
    assert e.value.kind == "too_large" and f"over the limit of {MAX_JPEG_SCANS}" in e.value.message
    with pytest.raises(ImageDecodeError) as e:  # the CPU decoder uses that same check
        decode(bomb, Preprocessing(size=(32, 32)))
    assert e.value.kind == "too_large" and "scans" in e.value.message
    for ok in (_jpeg(True), _jpeg(False)):  # ordinary JPEGs, progressive (about 10 scans) or not
        assert 1 <= jpeg_scan_count(ok) <= 12
        check_jpeg_bytes(ok)
        decode(ok, Preprocessing(size=(32, 32)))
    assert jpeg_scan_count(b"\x89PNG\r\n\x1a\n" + b"\xff\xda" * 100) == 0


def test_gpu_decode_refuses_the_scan_bomb_too():
    from models.preprocess import Preprocessing
    from raytasks.label.gpu_decode import jpeg_for_gpu

    pre = Preprocessing(size=(32, 32))
    assert jpeg_for_gpu(_jpeg(True), pre)
    assert not jpeg_for_gpu(_scan_bomb(), pre)  # stays on the CPU path, which gives it its too_large row


# ------------------------------------------------------------------------------------------------------
# 8: a PNG whose orientation (eXIf) comes after its pixels (IDAT): the memory estimate holds
# ------------------------------------------------------------------------------------------------------

def test_a_late_exif_chunk_is_in_the_memory_estimate():
    from models.imagebytes import ImageDecodeError, decode_cost
    from models.preprocess import Preprocessing, decode

    data = _png_with_late_exif()
    assert data.index(b"eXIf") > data.index(b"IDAT")
    raster = decode_cost("RGB", (3000, 2000))  # 24 MB; the rotated copy doubles it
    with pytest.raises(ImageDecodeError) as e:
        decode(data, Preprocessing(size=(32, 32)), max_decode_bytes=raster + (4 << 20))
    assert e.value.kind == "too_large" and "memory" in e.value.message
    t, g = decode(data, Preprocessing(size=(32, 32)))  # within the default limit: decoded, upright
    assert (g["width"], g["height"]) == (2000, 3000) and t.shape == (3, 32, 32)
    # orientation 1 after the pixels: nothing is rotated, so the plain estimate is the right one
    decode(_png_with_late_exif(orientation=1), Preprocessing(size=(32, 32)), max_decode_bytes=raster + (4 << 20))
    # the chunk is looked for in the bytes: many false "eXIf"s cost a few bounded checks, and count as rotating
    from models.imagescan import png_may_rotate

    t0 = time.perf_counter()
    assert png_may_rotate(b"\x89PNG\r\n\x1a\n" + b"\x00\x0f\xff\xffeXIf" * 1_000_000)
    assert time.perf_counter() - t0 < 0.5


_PEAK_PROBE = """
import os, sys, threading
from models import imagebytes, preprocess as P

data = open(sys.argv[1], "rb").read()
seen = []
real = imagebytes.decode_cost
imagebytes.decode_cost = lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1]
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
peak, done = [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        done.wait(0.0005)

base = rss()
t = threading.Thread(target=sample)
t.start()
P.decode(data, P.Preprocessing(size=(32, 32)))
done.set()
t.join()
print(peak[0] - base, max(seen))
"""


def test_peak_memory_of_a_late_exif_png_stays_within_the_estimate(tmp_path):
    """Peak resident memory, sampled every half millisecond around the decode (ru_maxrss would hide under
    the high-water mark of the imports), against what the estimate said (recorded from decode_cost)."""
    (tmp_path / "late.png").write_bytes(_png_with_late_exif())
    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE, str(tmp_path / "late.png")], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    grew, estimate = map(int, out.stdout.split())
    assert grew > 20 << 20, out.stdout + out.stderr  # the measurement sees the decode (a 24 MB raster)
    assert grew <= 1.1 * estimate + (4 << 20), f"peak grew {grew >> 20} MiB over an estimate of {estimate >> 20} MiB"


def test_photo_formats_not_decoded_here_are_named_not_just_refused():
    """HEIC (an iPhone's default), AVIF, JPEG XL, JPEG 2000, PSD and RAW files are refused as ``not_image``
    like any bytes outside the accepted formats, with a message that names the format; a video's ISO base
    media header is not taken for a photo."""
    import io

    import numpy as np
    from PIL import Image

    from models.imagebytes import ImageDecodeError, foreign_format, open_image
    from tests.images import HEIC_HEAD, NOT_INPUTS, avif_image

    j2k = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(j2k, "JPEG2000")
    files = {"HEIC/HEIF": HEIC_HEAD + bytes(64), "AVIF": avif_image(), "JPEG 2000": j2k.getvalue(),
             "JPEG XL": b"\xff\x0a" + bytes(64), "Photoshop (PSD)": b"8BPS\x00\x01" + bytes(64),
             "camera RAW (RAF)": b"FUJIFILMCCD-RAW 0201" + bytes(64)}
    for name, data in files.items():
        assert foreign_format(data[:32]) == name
        with pytest.raises(ImageDecodeError) as e:
            open_image(data)
        assert e.value.kind == "not_image" and e.value.message.startswith(f"{name}, a format not decoded here")
    assert foreign_format(NOT_INPUTS["clip.mp4"][:32]) is None and foreign_format(b"\xff\xd8\xff\xe0") is None
