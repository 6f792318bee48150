"""The ingress checks each file's header once per request: the checks that price it (facedata/decode.py
``cost``) are not run again when it is decoded (``models.imagebytes.Prechecked``), and what is decoded is
what plain bytes decode to. No Serve needed: the ingress object alone (tests/helpers.py ``ingress``)."""

from __future__ import annotations

import asyncio
import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from facedata.decode import Photos, Whole, decode_batch
from models import imagebytes
from models.imagebytes import ImageDecodeError, open_image, read_header
from tests.helpers import ingress
from tests.hostile import flat_webp, noise_jpeg, png_with_late_exif


def _rotated_jpeg(size=(300, 200), orientation=6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 140, 200)).save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _files() -> dict[str, bytes]:
    """Each kind of check once: a JPEG rotated by EXIF, a progressive JPEG (coefficients), a PNG rotated after
    its pixels (the scan for a late orientation), a WebP."""
    return {"rot.jpg": _rotated_jpeg(), "prog.jpg": noise_jpeg(True, (640, 480)),
            "late.png": png_with_late_exif((400, 300)), "flat.webp": flat_webp(320, 240)}


@pytest.fixture
def checks(monkeypatch) -> Counter:
    """How often each file's header went through the checks (``_checked_open``), and its PNG orientation scan."""
    seen: Counter = Counter()
    real_open, real_scan = imagebytes._checked_open, imagebytes.png_may_rotate
    monkeypatch.setattr(imagebytes, "_checked_open", lambda data, *a: seen.update([data]) or real_open(data, *a))
    monkeypatch.setattr(imagebytes, "png_may_rotate", lambda data: seen.update([("scan", data)]) or real_scan(data))
    return seen


def _named(checks: Counter, files: dict[str, bytes]) -> dict[str, int]:
    name = {d: n for n, d in files.items()}
    return {(f"scan {name[k[1]]}" if isinstance(k, tuple) else name[k]): v for k, v in checks.items()}


def _same(payload: list[dict], want: dict, keys: tuple[str, ...]) -> None:
    for i, row in enumerate(payload):
        assert row["path"] == want["path"][i] and want["ok"][i]
        assert (row["width"], row["height"]) == (want["width"][i], want["height"][i])
        for k in keys:
            np.testing.assert_array_equal(np.asarray(row[k]), np.asarray(want[k][i]), err_msg=f"{row['path']} {k}")


def test_a_request_of_photos_checks_each_header_once(checks):
    files = _files()
    payload, held = asyncio.run(ingress()._decoded(list(files.items()), Photos(256)))
    assert _named(checks, files) == {"rot.jpg": 1, "prog.jpg": 1, "late.png": 1, "flat.webp": 1, "scan late.png": 1}
    assert held == sum(3 * r["image"].shape[0] * r["image"].shape[1] for r in payload)
    checks.clear()
    _same(payload, decode_batch(list(files), list(files.values()), Photos(256)), ("image", "scale"))
    assert _named(checks, files)["late.png"] == 1  # plain bytes: checked as they are decoded


def test_a_request_of_whole_images_checks_each_header_once_per_preprocessing(checks):
    from models.preprocess import Preprocessing

    pres = (Preprocessing(size=(32, 32)),
            Preprocessing(size=(48, 40), channels=1, mean=(0.5,), std=(0.5,), max_pixels=20_000_000))
    files = _files()
    payload, _ = asyncio.run(ingress()._decoded(list(files.items()), Whole(pres)))
    assert _named(checks, files) == {"rot.jpg": 2, "prog.jpg": 2, "late.png": 2, "flat.webp": 2, "scan late.png": 2}
    _same(payload, decode_batch(list(files), list(files.values()), Whole(pres)),
          ("image_0", "image_1", "geometry_0", "geometry_1"))


def test_a_prechecked_file_is_checked_unless_its_header_passed_with_the_same_arguments(checks):
    from models.imagebytes import Prechecked

    data = _rotated_jpeg()
    want, size = open_image(data, draft_to=128)
    checks.clear()
    fresh = Prechecked(data)  # nothing read yet: checked as bytes are
    assert open_image(fresh, draft_to=128)[1] == size and checks[data] == 1
    read_header(fresh, draft_to=128)
    img, _ = open_image(fresh, draft_to=128)
    assert checks[data] == 2 and img.size == want.size and img.tobytes() == want.tobytes()
    open_image(fresh, draft_to=64)  # other arguments: checked again
    assert checks[data] == 3
    # a header that the bytes do not open to (a bug, never the same bytes): checked again, not trusted
    key = next(iter(fresh._passed))
    fresh._passed[key] = imagebytes.Header("JPEG", (1, 1), (1, 1), 0, "RGB")
    assert open_image(fresh, draft_to=128)[1] == size and checks[data] == 4


@pytest.mark.parametrize("name", ["empty", "text", "truncated"])
def test_a_prechecked_file_is_refused_as_its_bytes_are(name):
    """The decoder's refusals are unchanged: a refused header records nothing, so the decode (which the ingress
    never reaches for it) would check and refuse it with the same kind and message."""
    from models.imagebytes import Prechecked

    data = {"empty": b"", "text": b"not an image at all", "truncated": noise_jpeg(False, (640, 480))[:2000]}[name]
    with pytest.raises(ImageDecodeError) as plain:
        open_image(data, draft_to=128)
    checked = Prechecked(data)
    if name != "truncated":  # its header is whole: it fails while decoding
        with pytest.raises(ImageDecodeError) as priced:
            read_header(checked, draft_to=128)
        assert (priced.value.kind, priced.value.message) == (plain.value.kind, plain.value.message)
    else:
        read_header(checked, draft_to=128)
    with pytest.raises(ImageDecodeError) as decoded:
        open_image(checked, draft_to=128)
    assert (decoded.value.kind, decoded.value.message) == (plain.value.kind, plain.value.message)
