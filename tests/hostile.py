"""Hostile inputs of issues #13 and #22, built in one place for the tests and for bench/bench_hostile.py: files
that are small but costly (flat WebPs, a JPEG of thousands of scans, a PNG whose orientation comes after its
pixels, one whose compressed text inflates to 63 MiB, a photo of 64 faces), paths and YAML that must be refused, and a slowloris sender over a real socket."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def flat_webp(w: int, h: int) -> bytes:
    """A w x h single-colour lossless WebP: a few hundred bytes that decode to w * h * 3 (issue #22)."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 150)).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


@contextlib.contextmanager
def swapping_name(root: Path):
    """While the block runs, ``root/photos/x.png`` is flipped by atomic renames on a thread between a regular
    file inside the folder (bytes ``INSIDE``) and a symlink to ``root/secret.txt`` outside it (bytes
    ``OUTSIDE``), the race of issue #22 finding 3. Yields ``(folder, name)``."""
    photos = root / "photos"
    photos.mkdir(parents=True)
    (photos / "inside.png").write_bytes(b"INSIDE")
    (root / "secret.txt").write_bytes(b"OUTSIDE")
    target = photos / "x.png"
    os.link(photos / "inside.png", target)
    stop = threading.Event()

    def flip():
        n = 0
        while not stop.is_set():
            tmp = photos / f".tmp{n}"
            if n % 2:
                os.link(photos / "inside.png", tmp)
            else:
                os.symlink(root / "secret.txt", tmp)
            os.replace(tmp, target)
            n += 1

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    try:
        yield photos, target
    finally:
        stop.set()
        flipper.join()


def tiff_giant_tile(tile: int = 32768) -> bytes:
    """A 64x64 TIFF of about 2 KB whose one tile claims tile x tile pixels (libtiff allocates the tile)."""
    tiff = _encoded(Image.new("L", (64, 64)), "TIFF", compression="tiff_deflate")
    off = struct.unpack_from("<I", tiff, 4)[0]
    n = struct.unpack_from("<H", tiff, off)[0]
    entries = {}
    for i in range(n):
        tag, typ, cnt, val = struct.unpack_from("<HHII", tiff, off + 2 + 12 * i)
        entries[tag] = (typ, cnt, val)
    so, sl = entries[273][2], entries[279][2]
    for t in (273, 278, 279):
        entries.pop(t)
    entries.update({322: (4, 1, tile), 323: (4, 1, tile), 324: (4, 1, so), 325: (4, 1, sl)})
    out = bytearray(tiff[:off]) + struct.pack("<H", len(entries))
    for tag in sorted(entries):
        typ, cnt, val = entries[tag]
        out += struct.pack("<HHIHH", tag, typ, cnt, val & 0xFFFF, 0) if typ == 3 and cnt == 1 else \
            struct.pack("<HHII", tag, typ, cnt, val)
    return bytes(out + b"\0\0\0\0")


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise_jpeg(progressive: bool, size=(64, 48)) -> bytes:
    """A JPEG of noise (progressive: about 10 scans)."""
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


def scan_bomb(scans: int = 4000) -> bytes:
    """A progressive JPEG whose last scan (SOS segment and its entropy-coded data) is repeated."""
    data = noise_jpeg(True)
    assert data.endswith(b"\xff\xd9")
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * scans + b"\xff\xd9"


def png_with_late_exif(size=(3000, 2000), orientation=6) -> bytes:
    """An RGB PNG (small: one colour) whose eXIf chunk, rotating it, is written after IDAT, before IEND."""
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(buf, "PNG")
    png = buf.getvalue()
    assert png.endswith(b"IEND\xaeB`\x82")
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = exif.tobytes()[len(b"Exif\x00\x00"):]  # a PNG's eXIf holds the TIFF structure alone
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    return png[:-12] + chunk + png[-12:]


def png_with_text(chunks: list[bytes]) -> bytes:
    """A 1x1 PNG with these chunks (type + body) after its header, before its pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    png = buf.getvalue()
    extra = b"".join(struct.pack(">I", len(c) - 4) + c + struct.pack(">I", zlib.crc32(c)) for c in chunks)
    return png[:33] + extra + png[33:]  # after the signature and IHDR


def png_text_bomb(chunks: int = 63) -> bytes:
    """A 1x1 PNG of ``chunks`` zTXt chunks, each a compressed MiB of spaces (a 67 KB file for 63)."""
    spaces = zlib.compress(b" " * ((1 << 20) - 1), 9)
    return png_with_text([b"zTXt" + b"Comment%d\x00\x00" % i + spaces for i in range(chunks)])


def odd_paths(folder: Path) -> list[str]:
    """Manifest rows that must each become an error row, never an exception (issue #22, finding 4)."""
    return [
        "b\x00.jpg", str(folder / "c\x00.jpg"),  # NUL
        "n" * 300 + ".jpg",  # over NAME_MAX
        "/".join(["d" * 200] * 30) + "/e.jpg",  # over PATH_MAX
        "bad\udcff.jpg", "lone\ud800.jpg",  # invalid UTF-8 (surrogate-escaped) and a lone surrogate
        "s3://", "s3:///key.jpg", "s3://bucket", "s3://bucket/",  # no bucket, no key
        "%2e%2e/secret.txt", "%2e%2e%2fsecret.txt",  # URL-encoded ..
        "../secret.txt", "sub/../../secret.txt", "../../../../../../etc/passwd",  # plain .. traversal
        "",
    ]


# 401 bytes of YAML that expand to 9**9 strings through aliases (issue #22, finding 5)
BILLION_LAUGHS = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]) + "\n"


def checkpoint_with_extra(folder: Path, name: str, extra: dict) -> tuple[str, str]:
    """A hard_sharing checkpoint ``folder/name`` whose ``extra`` holds ``extra`` (tensors too, as a foreign or
    hostile file may: loading refuses them, models.checkpoint_hash.check_contents) with its content hash; the
    files of one folder differ only in ``extra``. Returns ``(path, hash)``."""
    import torch

    import models
    from models.checkpoint import save_checkpoint
    from models.checkpoint_hash import hash_of

    base = folder / "base.pt"
    if not base.exists():
        save_checkpoint(models.create_model("hard_sharing"), str(base))
    obj = torch.load(base, weights_only=True)
    obj["extra"] = extra
    obj["hash"] = hash_of(obj)
    torch.save(obj, folder / name)
    return str(folder / name), obj["hash"]


def crowd_photo(n: int = 64, seed: int = 21) -> bytes:
    """A JPEG of ``n`` drawn faces on a grid (178x218 each, as tests/test_crowd_cap.py draws 24): the most
    faces a photo keeps by default (``max_faces`` 64), every one of which an attribute model then runs on."""
    from facedata.compose import FaceSource
    from facedata.draw import draw_face

    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    canvas = Image.new("RGB", (40 + cols * 220, 40 + rows * 260), (120, 130, 140))
    for k in range(n):
        img, lab = draw_face(np.random.default_rng([seed, k]), (178, 218))
        src = FaceSource(np.asarray(img), [20, 30, 158, 200], np.asarray(lab["landmarks"], float).reshape(5, 2))
        canvas.paste(Image.fromarray(src.image).resize((178, 218)), (40 + (k % cols) * 220, 40 + (k // cols) * 260))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def slow_post(port: int, path: str, body: bytes, delay_s: float, headers: dict | None = None,
              timeout_s: float = 60.0) -> tuple[int, dict, float]:
    """A slowloris sender over a real socket: the request's headers (``Content-Length`` of the whole body),
    then one byte of ``body`` every ``delay_s``, until the server answers or the body is sent. Returns the
    status, the JSON body (``{}`` when it is not JSON) and the seconds until the answer."""
    import json

    head = {"Host": "127.0.0.1", "Content-Type": "image/jpeg", "Content-Length": str(len(body)), **(headers or {})}
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall((f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n").encode())
        s.setblocking(False)
        answer = b""
        for i in range(len(body)):
            try:
                answer += s.recv(65536)
                break  # the server answered before the body was sent
            except BlockingIOError:
                pass
            try:
                s.sendall(body[i:i + 1])
            except OSError:  # the server answered and closed
                break
            time.sleep(delay_s)
        s.setblocking(True)
        s.settimeout(max(1.0, timeout_s - (time.perf_counter() - t0)))
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    seconds = time.perf_counter() - t0
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    try:
        doc = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    except (IndexError, ValueError):
        doc = {}
    return status, doc, seconds


def _length(response: bytes) -> int:
    """The Content-Length of a raw HTTP response's head (0 when it has none)."""
    for line in response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return int(v.strip())
    return 0
