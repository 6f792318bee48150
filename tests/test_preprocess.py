"""The one bytes -> tensor function: formats a user's bucket really holds, and the typed error for the rest."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.imagebytes import ImageDecodeError
from models.preprocess import Preprocessing, build_augmentation, decode, normalize
from tests.hostile import tiff_giant_tile

RGB = Preprocessing(size=(32, 32))
GREY = Preprocessing(size=(20, 20), channels=1, mean=(0.0,), std=(1.0,))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w=64, h=48) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], 2), "RGB")


def test_jpeg_decodes_to_model_size_with_geometry():
    t, g = decode(encode(gradient(), "JPEG"), RGB)
    assert t.shape == (3, 32, 32) and t.dtype == torch.uint8
    assert (g["width"], g["height"]) == (64, 48)
    assert g["sx"] == pytest.approx(2.0) and g["sy"] == pytest.approx(1.5)


@pytest.mark.parametrize("kind,data", [
    ("empty", b""),
    ("not_image", b"this is a text file, not a face"),
    ("not_image", b"\x00" * 2000),
])
def test_bad_bytes_raise_the_typed_error(kind, data):
    with pytest.raises(ImageDecodeError) as e:
        decode(data, RGB)
    assert e.value.kind == kind


def test_truncated_jpeg_is_truncated():
    data = encode(gradient(400, 300), "JPEG", quality=95)
    with pytest.raises(ImageDecodeError) as e:
        decode(data[: len(data) // 2], RGB)
    assert e.value.kind == "truncated"


def test_huge_image_is_refused_before_decoding():
    data = encode(Image.new("L", (3000, 3000)), "PNG")
    small_limit = Preprocessing(size=(32, 32), max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError) as e:
        decode(data, small_limit)
    assert e.value.kind == "too_large" and "9000000" in e.value.message


def test_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(ImageDecodeError("truncated", "half a file")))
    assert err.kind == "truncated" and err.message == "half a file"


def test_cmyk_jpeg_matches_its_rgb_conversion():
    rgb = Image.new("RGB", (40, 40), (200, 30, 60))
    t, _ = decode(encode(rgb.convert("CMYK"), "JPEG", quality=100), RGB)
    assert t.shape == (3, 32, 32)
    mean = t.float().mean(dim=(1, 2))
    assert mean[0] > 150 and mean[1] < 80 and mean[2] < 100  # still red, not inverted


def test_16bit_png_is_scaled_not_clipped():
    arr = np.full((30, 30), 40000, dtype=np.uint16)
    img = Image.fromarray(arr)
    t, _ = decode(encode(img, "PNG"), GREY)
    assert int(t.float().mean().round()) == round(40000 / 257)


def test_palette_and_rgba_pngs():
    pal = Image.new("P", (30, 30))
    pal.putpalette([0, 0, 255] * 256)
    t, _ = decode(encode(pal, "PNG"), RGB)
    assert t[2].float().mean() > 250 and t[0].float().mean() < 5
    rgba = Image.new("RGBA", (30, 30), (255, 0, 0, 0))  # fully transparent -> white background
    t, _ = decode(encode(rgba, "PNG"), RGB)
    assert t.float().mean() > 250


def test_grayscale_input_for_rgb_model_and_rgb_for_grey_model():
    t, _ = decode(encode(Image.new("L", (30, 30), 100), "JPEG"), RGB)
    assert t.shape[0] == 3 and abs(t.float().mean() - 100) < 3
    t, _ = decode(encode(gradient(), "PNG"), GREY)
    assert t.shape == (1, 20, 20)


def test_exif_orientation_is_honoured():
    img = Image.new("RGB", (60, 30), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 30, 30))  # white on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    t, g = decode(encode(img, "JPEG", exif=exif, quality=100), Preprocessing(size=(30, 30)))
    assert (g["width"], g["height"]) == (30, 60)  # upright: portrait
    top, bottom = t[:, :15].float().mean(), t[:, 15:].float().mean()
    assert top > 200 and bottom < 50  # left half became the top half


def test_shorter_center_crop_geometry_maps_back_to_original():
    pre = Preprocessing(size=(224, 224), resize="shorter_center_crop", resize_shorter=227)
    t, g = decode(encode(gradient(454, 300), "PNG"), pre)
    assert t.shape == (3, 224, 224)
    # the centre of the input is the centre of the original image
    cx = 112 * g["sx"] + g["tx"]
    cy = 112 * g["sy"] + g["ty"]
    assert cx == pytest.approx(227, abs=2) and cy == pytest.approx(150, abs=2)
    t_train, _ = decode(encode(gradient(454, 300), "PNG"), pre, train=True)
    assert t_train.shape == (3, 227, 227)  # the margin for the random 224 crop
    aug = build_augmentation(pre, {"random_crop": True, "rotation": 30, "color_jitter": 0.2})
    assert aug(t_train).shape == (3, 224, 224)


def test_normalize_uses_model_mean_and_std():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    y = normalize(x, RGB)
    expected = (1 - torch.tensor(RGB.mean)) / torch.tensor(RGB.std)
    assert torch.allclose(y[0, :, 0, 0], expected, atol=1e-5)


def test_with_size_keeps_hmtnet_ratio():
    pre = Preprocessing(size=(224, 224), resize="shorter_center_crop", resize_shorter=227)
    assert pre.with_size(112).resize_shorter == 114 and pre.with_size(112).size == (112, 112)
    assert Preprocessing.from_dict(pre.to_dict()) == pre


# ------------------------------------------------------------------------------------------------------
# Hostile images (issue #13, items 1-3): each costs bounded memory and time, or is refused from its header
# ------------------------------------------------------------------------------------------------------

HMT = Preprocessing(size=(224, 224), resize="shorter_center_crop", resize_shorter=227)


@pytest.mark.parametrize("size", [(8000, 1), (1, 8000), (40000, 1)])
@pytest.mark.parametrize("pre", [RGB, HMT], ids=["stretch", "shorter_center_crop"])
def test_aspect_ratio_bomb_is_refused_from_the_header(size, pre):
    data = encode(Image.new("L", size), "PNG")  # about 100 bytes
    with pytest.raises(ImageDecodeError) as e:
        decode(data, pre)
    assert e.value.kind == "too_large" and "aspect ratio" in e.value.message


def test_shorter_center_crop_never_builds_the_full_resized_image(monkeypatch):
    # a wide but acceptable image: the resize reads only the centre crop's region of the original
    sizes = []
    real = Image.Image.resize

    def spy(self, size, *a, **kw):
        sizes.append(tuple(size))
        return real(self, size, *a, **kw)

    monkeypatch.setattr(Image.Image, "resize", spy)
    t, g = decode(encode(gradient(2000, 200), "PNG"), HMT)
    assert t.shape == (3, 224, 224)
    assert max(w * h for w, h in sizes) <= 227 * 227
    assert 112 * g["sx"] + g["tx"] == pytest.approx(1000, abs=3)


def test_gpu_resize_refuses_aspect_bombs_and_bounds_its_intermediate():
    from raytasks.label.gpu_decode import resize_like_preprocess

    with pytest.raises(ImageDecodeError) as e:
        resize_like_preprocess(torch.zeros((3, 1, 65000), dtype=torch.uint8), HMT)
    assert e.value.kind == "too_large"
    img, g = resize_like_preprocess(torch.zeros((3, 200, 2000), dtype=torch.uint8), HMT)
    assert img.shape == (3, 224, 224) and 112 * g["sx"] + g["tx"] == pytest.approx(1000, abs=3)


def test_16bit_png_converts_without_float64(monkeypatch):
    arr = (np.arange(600 * 600, dtype=np.uint32) % 65536).astype(np.uint16).reshape(600, 600)
    data = encode(Image.fromarray(arr), "PNG")
    real_asarray = np.asarray

    def no_float64(a, dtype=None, **kw):
        assert dtype is not np.float64 and dtype != "float64", "float64 copy of a whole image"
        return real_asarray(a, dtype=dtype, **kw)

    monkeypatch.setattr(np, "asarray", no_float64)
    t, _ = decode(data, GREY)
    monkeypatch.undo()
    ref = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
    expected = np.asarray(Image.fromarray(ref, "L").resize((20, 20), Image.BILINEAR, reducing_gap=3.0))
    assert np.abs(t[0].numpy().astype(int) - expected.astype(int)).max() <= 1


def test_float_tiff_is_scaled():
    arr = np.full((40, 40), 0.5, dtype=np.float32)
    t, _ = decode(encode(Image.fromarray(arr, "F"), "TIFF"), GREY)
    assert int(t.float().mean().round()) == 128


def test_decoded_memory_is_bounded_not_only_pixels():
    # 3000x3000 RGBA = 9 MP (under the pixel limit) but 36 MB of raster plus the compositing copies
    data = encode(Image.new("RGBA", (3000, 3000)), "PNG")
    pre = Preprocessing(size=(32, 32))
    with pytest.raises(ImageDecodeError) as e:
        decode(data, pre, max_decode_bytes=64 * 1024 * 1024)
    assert e.value.kind == "too_large" and "memory" in e.value.message
    decode(encode(Image.new("L", (3000, 3000)), "PNG"), pre, max_decode_bytes=64 * 1024 * 1024)  # 9 MB: fine


def test_png_over_the_memory_limit_is_refused_without_decoding_it(monkeypatch):
    # Pillow's PngImageFile.getexif() loads the whole image: the limits must be checked before it is called
    from PIL import PngImagePlugin

    loads = []
    real = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: loads.append(1) or real(self))
    data = encode(Image.new("RGBA", (3000, 3000)), "PNG")
    with pytest.raises(ImageDecodeError) as e:
        decode(data, RGB, max_decode_bytes=64 * 1024 * 1024)
    assert e.value.kind == "too_large" and not loads


def test_tiff_with_giant_tiles_is_refused_from_the_header():
    with pytest.raises(ImageDecodeError) as e:
        decode(tiff_giant_tile(32768), RGB)
    assert e.value.kind == "too_large" and "tile" in e.value.message


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"


def test_eps_never_reaches_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    called = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **kw: called.append(a) or Image.new("RGB", (10, 10)).im)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs", raising=False)
    with pytest.raises(ImageDecodeError) as e:
        decode(EPS, RGB)
    assert e.value.kind == "not_image" and not called


@pytest.mark.parametrize("fmt,mode", [("PPM", "RGB"), ("TGA", "RGB"), ("PCX", "RGB"), ("ICO", "RGB"),
                                      ("DDS", "RGB"), ("SGI", "RGB"), ("IM", "RGB")])
def test_formats_outside_the_allow_list_are_not_images(fmt, mode):
    data = encode(Image.new(mode, (16, 16), (10, 20, 30)), fmt)
    with pytest.raises(ImageDecodeError) as e:
        decode(data, RGB)
    assert e.value.kind == "not_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_documented_formats_still_decode(fmt):
    t, g = decode(encode(gradient(), fmt), RGB)
    assert t.shape == (3, 32, 32) and (g["width"], g["height"]) == (64, 48)
