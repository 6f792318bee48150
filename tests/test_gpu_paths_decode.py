"""``--gpu-decode`` and a JPEG's orientation: nvjpeg does not apply it (torchvision's ``decode_jpeg`` applies
EXIF orientation "only for JPEG format on CPU"; its CUDA op takes no such argument), so a rotated or flipped
JPEG (EXIF Orientation, or XMP ``tiff:Orientation``, both of which the CPU decoder applies) must stay on the
CPU path (raytasks/label/gpu_decode.py ``jpeg_for_gpu``). The actor's decode runs here on the CPU with
torchvision's decoder made to behave as the CUDA one does (the orientation argument dropped), and its batch
must equal the CPU decode path's: sizes, geometry and pixels."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from facedata.decode import Photos, Whole, decode_batch
from models.preprocess import Preprocessing
from raytasks.label.decoding import read_and_decode
from raytasks.label.gpu_decode import images_on_device, jpeg_for_gpu, photos_on_device
from tests.images import compose, real_crops, write_files

MAX_SIDE = 2048
GREY50 = Preprocessing(size=(50, 50), channels=1, mean=(0.5,), std=(0.5,))
XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="%d"/></rdf:RDF></x:xmpmeta>')


def _save(jpeg: bytes, orientation: int | None = None, xmp: int | None = None) -> bytes:
    """``jpeg`` saved again (same pixels, quality 95) with an EXIF Orientation tag and/or an XMP one."""
    img = Image.open(io.BytesIO(jpeg))
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    if xmp is not None:
        kw["xmp"] = XMP % xmp
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def base() -> bytes:
    """A 900 x 640 photo, not square and not symmetric: a turn changes its size or its pixels."""
    return compose(real_crops(2), [(100, 120, 220), (560, 200, 160)], size=(900, 640), seed=4)


@pytest.fixture(scope="module")
def files(base) -> dict[str, bytes]:
    return {"exif6.jpg": _save(base, 6), "exif3.jpg": _save(base, 3), "exif8.jpg": _save(base, 8),
            "xmp6.jpg": _save(base, xmp=6), "exif1.jpg": _save(base, 1), "plain.jpg": _save(base)}


ROTATED = ("exif6.jpg", "exif3.jpg", "exif8.jpg", "xmp6.jpg")
UPRIGHT = ("exif1.jpg", "plain.jpg")


@pytest.fixture
def nvjpeg_like(monkeypatch):
    """torchvision's CPU ``decode_jpeg`` without the orientation, as its CUDA branch decodes
    (``torch.ops.image.decode_jpegs_cuda(input, mode, device)``: no ``apply_exif_orientation``)."""
    import torchvision.io

    real = torchvision.io.decode_jpeg

    def decode_jpeg(input, mode=torchvision.io.ImageReadMode.UNCHANGED, device="cpu", apply_exif_orientation=False):
        return real(input, mode=mode, device=device)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)


def test_a_rotated_or_flipped_jpeg_stays_on_the_cpu_path(files, base):
    from models.preprocess import decode_photo

    for name in ROTATED:
        assert not jpeg_for_gpu(files[name]), name
        assert not jpeg_for_gpu(files[name], GREY50), name
    for o in (2, 4, 5, 7):  # the flips and transposes too: the CPU decoder applies every orientation
        assert not jpeg_for_gpu(_save(base, o)), o
    assert not jpeg_for_gpu(_save(base, xmp=3))
    for name in UPRIGHT:
        assert jpeg_for_gpu(files[name]) and jpeg_for_gpu(files[name], Preprocessing(size=(50, 50))), name
    assert jpeg_for_gpu(_save(base, xmp=1))
    # the CPU decoder turns them: what the GPU path would have had to match
    assert decode_photo(files["exif6.jpg"], MAX_SIDE)[1] == decode_photo(files["xmp6.jpg"], MAX_SIDE)[1] == (640, 900)
    assert decode_photo(files["plain.jpg"], MAX_SIDE)[1] == (900, 640)


def _actor_batch(folder, names, faces, pre_dicts) -> tuple[dict, list]:
    """What the actor receives from the CPU stage (Ray Data's numpy batch) and the JPEG bytes it decodes."""
    from ray.data.block import BlockAccessor

    table = read_and_decode(pa.table({"path": [str(folder / n) for n in names]}), faces, pre_dicts,
                            jpegs_to_actor=True)
    batch = BlockAccessor.for_block(table).to_batch_format("numpy")
    return batch, list(batch.pop("jpeg_bytes"))


def test_photos_decoded_on_the_device_are_turned_as_on_the_cpu_path(tmp_path, files, nvjpeg_like):
    write_files(tmp_path, files)
    names = list(files)
    batch, raw = _actor_batch(tmp_path, names, {"mode": "detect", "max_side": MAX_SIDE, "detector": {}}, [])
    assert [n for n, d in zip(names, raw) if d is not None] == list(UPRIGHT)
    got = photos_on_device(batch, raw, MAX_SIDE, "cpu", torch_decode=True)
    want = decode_batch([str(tmp_path / n) for n in names], [files[n] for n in names], Photos(MAX_SIDE))
    assert list(got["ok"]) == list(want["ok"]) == [True] * len(names)
    assert list(got["width"]) == list(want["width"]) and list(got["height"]) == list(want["height"])
    assert [got["width"][i] for i in range(4)] == [640, 900, 640, 640]  # 6, 3, 8 and XMP 6 turned upright
    for i, name in enumerate(names):
        g, w = np.asarray(got["image"][i]), np.asarray(want["image"][i])
        assert g.shape == w.shape, name
        assert got["scale"][i] == pytest.approx(want["scale"][i], rel=1e-6), name
        # no shrink at this size: the same decoder family, equal within rounding (the file's other tests)
        assert np.abs(g.astype(int) - w.astype(int)).mean() < 0.05, name


def test_whole_images_decoded_on_the_device_are_turned_as_on_the_cpu_path(tmp_path, files, nvjpeg_like):
    write_files(tmp_path, files)
    names = list(files)
    # not square: a sideways decode would give another geometry
    pre = Preprocessing(size=(64, 48), channels=1, mean=(0.5,), std=(0.5,))
    batch, raw = _actor_batch(tmp_path, names, {"mode": "whole"}, [pre.to_dict()])
    assert [n for n, d in zip(names, raw) if d is not None] == list(UPRIGHT)
    got = images_on_device(batch, raw, pre, "cpu")
    want = decode_batch([str(tmp_path / n) for n in names], [files[n] for n in names], Whole((pre,)))
    assert list(got["ok"]) == list(want["ok"]) == [True] * len(names)
    assert list(got["width"]) == list(want["width"]) and list(got["height"]) == list(want["height"])
    assert np.allclose(np.asarray(got["geometry_0"]), np.asarray(want["geometry_0"]))
    g, w = np.asarray(got["image_0"]).astype(int), np.asarray(want["image_0"]).astype(int)
    assert g.shape == w.shape
    for i, name in enumerate(names):  # within a few levels (other resampling kernels), as the file's other tests
        assert np.abs(g[i] - w[i]).mean() < 6.0, name
