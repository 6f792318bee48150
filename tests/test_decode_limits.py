"""What the serving ingress charges for a file and what decoding it costs, read by one header check (the
bypass of the request limits through a header that only the generic Image.open could not read), and the
costs the per-image estimate missed: a progressive JPEG's coefficient buffer, a PNG rotated by XMP or EXIF
text, RLE BMPs decoded in Python. Also the API key and body-size checks of the HTTP front, and docs/api.md
against the code. Crafted files are built here, small; no Ray, no Serve."""

from __future__ import annotations

import asyncio
import io
import re
import struct
import zlib

import pytest
from PIL import Image

from facedata.decode import Photos, Whole, cost, decode_batch, decode_into, empty_batch
from models import imagebytes
from models.imagebytes import ImageDecodeError, decode_cost, open_image
from raytasks import serve as S
from tests.helpers import ROOT, FakeRequest, ingress
from tests.images import huge_png


# --- 1: the ingress's cost is the decoder's own header check -------------------------------------------------
def _tiff(w: int, h: int, text: bytes = b"", rows: int = 500) -> bytes:
    """A little-endian 8-bit grey TIFF, deflate strips of zeros; ``text`` sits between the header and the data.
    ``Image size (x*y): abc`` there makes Pillow's IM plugin raise ValueError in a plain Image.open, which
    tries it before TIFF; Image.open(formats=ALLOWED_FORMATS) never runs it."""
    strips = [zlib.compress(bytes(w * min(rows, h - y)), 9) for y in range(0, h, rows)]
    body = bytearray(b"II*\x00\x00\x00\x00\x00" + text)
    offsets = []
    for s in strips:
        offsets.append(len(body))
        body += s
    n = len(strips)
    so = len(body)
    body += struct.pack(f"<{n}I", *offsets)
    sc = len(body)
    body += struct.pack(f"<{n}I", *map(len, strips))
    body += b"\x00" * (len(body) % 2)
    ifd = len(body)
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1), (273, 4, n, so),
               (277, 3, 1, 1), (278, 4, 1, rows), (279, 4, n, sc)]
    body += struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        body += struct.pack("<HHI", tag, typ, count) + (struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value))
    body += b"\x00\x00\x00\x00"
    body[4:8] = struct.pack("<I", ifd)
    return bytes(body)


IM_TRICK = b"X: y\nImage size (x*y): abc\n"


def test_a_header_only_the_generic_opener_chokes_on_is_charged_in_full(monkeypatch):
    # Pillow tries its plugins in the order they were registered: IM comes before TIFF after Image.init()
    # (a fresh process), after it once anything imported TiffImagePlugin first (EXIF does). The first order:
    Image.init()
    order = [f for f in Image.ID if f != "TIFF"]
    monkeypatch.setattr(Image, "ID", order[:order.index("IM") + 1] + ["TIFF"] + order[order.index("IM") + 1:])
    plain, evil = _tiff(3000, 2000), _tiff(3000, 2000, IM_TRICK)
    with pytest.raises(ValueError):  # what made the ingress's own Image.open count it as free
        Image.open(io.BytesIO(evil))
    assert cost(evil, Photos(512)) == cost(plain, Photos(512)) == (6_000_000, 3 * 512 * 341)
    # the request limit holds: two of them are 12 MP, over a 10 MP request, refused before any decoding
    api = ingress(max_request_pixels=10_000_000)
    decodes = _count_decodes(api)
    with pytest.raises(S.APIError) as e:
        asyncio.run(api._decoded([("a.tif", evil), ("b.tif", evil)], Photos(512)))
    assert e.value.status == 413 and "12000000 pixels" in e.value.detail and len(decodes) == 1
    assert api._decoded_budget.free == api._decoded_budget.total


def _count_decodes(api) -> list:
    """Spy on the ingress's decode-thread calls: the header probe is one, the decode another."""
    calls, real = [], api._decode

    async def spy(fn, *args):
        calls.append(fn)
        return await real(fn, *args)

    api._decode = spy
    return calls


def test_a_file_its_header_check_refuses_is_answered_before_anything_is_decoded():
    """Not free (the old ``(0, 0)``) and not handed to the decoder: a 100 MP PNG (under the request's 200 MP,
    over one image's 40 MP) is 413, an RLE BMP 422, from the headers alone, with the files named."""
    api = ingress()
    decodes = _count_decodes(api)
    with pytest.raises(S.APIError) as e:
        asyncio.run(api._decoded([("ok.png", _png()), ("huge.png", huge_png())], Photos(512)))
    assert e.value.status == 413 and [f["file"] for f in e.value.extra["files"]] == ["huge.png"]
    with pytest.raises(S.APIError) as e:
        asyncio.run(api._decoded([("r.bmp", _rle_bmp(64, 64, 8))], Photos(512)))
    assert e.value.status == 422 and e.value.code == "not_image" and "RLE" in e.value.detail
    assert len(decodes) == 2  # two header probes; decode_batch never ran
    assert api._decoded_budget.free == api._decoded_budget.total
    with pytest.raises(ImageDecodeError) as err:  # cost() itself: the decoder's kind, never (0, 0)
        cost(b"plain text, not an image", Photos())
    assert err.value.kind == "not_image"


def _pres():
    from models.preprocess import Preprocessing

    return (Preprocessing(size=(32, 32)),
            Preprocessing(size=(48, 40), channels=1, mean=(0.5,), std=(0.5,), max_pixels=20_000_000))


def _jpeg(size=(800, 600), mode="RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (90, 120, 150, 10)[:len(mode)] if mode != "L" else 120).save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_cost_and_decode_open_the_file_with_the_same_arguments(monkeypatch):
    """The ingress's estimate and the decoders read the header through one function with one set of
    arguments (pixel limit, JPEG draft target, memory limit), for photos and for each preprocessing."""
    seen = []
    real = imagebytes._checked_open
    monkeypatch.setattr(imagebytes, "_checked_open", lambda *a: seen.append(a[1:]) or real(*a))
    data = _jpeg()
    for target in (Photos(512), Whole(_pres())):
        seen.clear()
        cost(data, target)
        charged = list(seen)
        seen.clear()
        assert decode_into(empty_batch(["x"], target), 0, data, target)
        assert charged == seen and len(seen) == (1 if isinstance(target, Photos) else 2), (charged, seen)


def test_whole_images_are_charged_once_per_distinct_preprocessing():
    pres = _pres()
    pixels, held = cost(_jpeg(), Whole(pres))
    assert pixels == 2 * 800 * 600  # decode_into decodes the image once for each
    assert held == 3 * 32 * 32 + 1 * 48 * 40


# --- 2: a progressive JPEG holds its coefficients at full size -----------------------------------------------
def test_a_progressive_jpeg_counts_its_coefficient_buffer():
    prog = _jpeg((1600, 1200), "CMYK", progressive=True)
    base = _jpeg((1600, 1200), "CMYK")
    # decoded at 1/8 scale, a 200x150 raster, but libjpeg holds the progressive one's 1600x1200 coefficients
    with pytest.raises(ImageDecodeError) as e:
        open_image(prog, draft_to=(128, 128), max_decode_bytes=8 << 20)
    assert e.value.kind == "too_large" and "progressive" in e.value.message
    assert open_image(base, draft_to=(128, 128), max_decode_bytes=8 << 20)[0].size == (200, 150)

    from models.imagebytes import jpeg_coefficient_bytes, read_header

    def coefficients(data):
        with Image.open(io.BytesIO(data)) as img:
            return jpeg_coefficient_bytes(img, data)

    # 4 components at full resolution, 2 bytes per coefficient: 8 bytes a pixel whatever the draft scale
    assert coefficients(prog) == 1600 * 1200 * 8 and coefficients(base) == 0
    assert coefficients(_jpeg((1600, 1200), progressive=True, subsampling=2)) == 1600 * 1200 * 3  # 4:2:0
    head = read_header(prog, draft_to=(128, 128))
    assert head.decoded == (200, 150) and head.decode_bytes == 200 * 150 * 4 + 1600 * 1200 * 8
    # a baseline JPEG whose metadata holds the bytes of an SOS marker (as an EXIF thumbnail does) is one
    # scan: the marker walk skips APP segments whole
    app = b"\xff\xda\x00\x0c\x03" * 8  # an APP2 segment holding bytes that read as an SOS of 3 components
    tricky = base[:2] + b"\xff\xe2" + struct.pack(">H", len(app) + 2) + app + base[2:]
    assert imagebytes.jpeg_scan_count(tricky) > 1 and coefficients(tricky) == 0


# --- 3: a PNG rotated by XMP or EXIF text, before or after its pixels ---------------------------------------
PNG_SIZE = (600, 400)
_XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="%d"/></rdf:RDF></x:xmpmeta>'


def _chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) if crc is None else crc)


def _png(before: bytes = b"", after: bytes = b"") -> bytes:
    """An RGB PNG with chunks ``before`` its pixels (after IHDR) and ``after`` them (before IEND)."""
    buf = io.BytesIO()
    Image.new("RGB", PNG_SIZE, (200, 120, 40)).save(buf, "PNG")
    png = buf.getvalue()
    return png[:33] + before + png[33:-12] + after + png[-12:]


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


RAW_PROFILE = b"Raw profile type exif\x00"


def _raw_profile(orientation: int) -> bytes:
    """ImageMagick's EXIF text: a blank line, "exif", the length, then the bytes in hex."""
    b = _exif(orientation)
    return b"\nexif\n%d\n%s\n" % (len(b), b.hex().encode())


ROTATED_PNGS = {
    "XMP iTXt before the pixels": _png(before=_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + _XMP % 6)),
    "XMP compressed iTXt after them": _png(after=_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x01\x00\x00\x00"
                                                        + zlib.compress(_XMP % 8))),
    "EXIF text (tEXt) before them": _png(before=_chunk(b"tEXt", RAW_PROFILE + _raw_profile(6))),
    "EXIF text (zTXt) after them": _png(after=_chunk(b"zTXt", RAW_PROFILE + b"\x00" + zlib.compress(_raw_profile(5)))),
    "eXIf after them, wrong CRC": _png(after=_chunk(b"eXIf", _exif(6)[6:], crc=0)),  # Pillow reads it anyway
}


@pytest.mark.parametrize("name", list(ROTATED_PNGS))
def test_a_png_rotated_by_metadata_anywhere_counts_the_rotated_copy(name):
    data = ROTATED_PNGS[name]
    img, size = open_image(data)  # Pillow does rotate it: the copy is real
    assert img.size == size == PNG_SIZE[::-1]
    raster = decode_cost("RGB", PNG_SIZE)
    with pytest.raises(ImageDecodeError) as e:
        open_image(data, max_decode_bytes=raster * 3 // 2)
    assert e.value.kind == "too_large"
    from models.imagebytes import read_header

    assert read_header(data).decode_bytes == 2 * raster


def test_metadata_that_does_not_rotate_costs_no_copy():
    """The control: orientation 1, or the letters in another chunk, leave the estimate at one raster."""
    raster = decode_cost("RGB", PNG_SIZE)
    for data in (_png(after=_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + _XMP % 1)),
                 _png(before=_chunk(b"tEXt", RAW_PROFILE + _raw_profile(1))), _png(after=_chunk(b"tEXt", b"Comment\x00eXIf")),
                 _png()):
        assert open_image(data, max_decode_bytes=raster)[0].size == PNG_SIZE


# --- 4: RLE BMPs are refused ---------------------------------------------------------------------------------
def _rle_bmp(w: int, h: int, bits: int) -> bytes:
    """An RLE8 (``bits`` 8) or RLE4 (4) BMP: each row one 1-pixel run, then end of line; end of bitmap."""
    pixels = b"".join(b"\x01\x01\x00\x00" for _ in range(h)) + b"\x00\x01"
    colours = 1 << bits
    palette = b"".join(bytes((i, i, i, 0)) for i in range(colours))
    off = 14 + 40 + len(palette)
    dib = struct.pack("<IiiHHIIiiII", 40, w, h, 1, bits, 1 if bits == 8 else 2, len(pixels), 2835, 2835, colours, 0)
    return b"BM" + struct.pack("<IHHI", off + len(pixels), 0, 0, off) + dib + palette + pixels


@pytest.mark.parametrize("bits", [8, 4])
def test_rle_bmps_are_not_decoded(bits):
    data = _rle_bmp(64, 64, bits)
    with Image.open(io.BytesIO(data)) as img:  # a BMP Pillow would decode, RLE-compressed
        assert img.format == "BMP" and img.info["compression"] == (1 if bits == 8 else 2)
    with pytest.raises(ImageDecodeError) as e:
        open_image(data)
    assert e.value.kind == "not_image" and "RLE" in e.value.message
    batch = decode_batch(["r.bmp"], [data], Photos(256))
    assert not batch["ok"][0] and batch["error_kind"][0] == "not_image"
    buf = io.BytesIO()  # an uncompressed BMP still decodes
    Image.new("P", (64, 64)).save(buf, "BMP")
    assert open_image(buf.getvalue())[0].size == (64, 64)


# --- 5: docs/api.md says what the code does --------------------------------------------------------------
def _api_doc_section(title: str) -> str:
    text = (ROOT / "docs" / "api.md").read_text()
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_every_error_the_front_raises_is_in_the_error_table():
    raised = set()
    for path in (ROOT / "raytasks" / "serve").glob("*.py"):
        raised |= {(int(s), c) for s, c in re.findall(r'APIError\(\s*(\d{3}),\s*"([a-z_]+)"', path.read_text())}
    assert (401, "no_api_key") in raised and (408, "body_timeout") in raised
    documented = set()
    for status, codes in re.findall(r"^\| (\d{3}) \| ([^|]+) \|", _api_doc_section("Errors"), re.M):
        documented |= {(int(status), c) for c in re.findall(r"`([a-z_]+)`", codes)}
    assert raised <= documented, sorted(raised - documented)


def test_every_setting_is_in_the_configuration_table():
    table = _api_doc_section("Configuration")
    keys = {k for first in re.findall(r"^\| ([^|]+) \|", table, re.M) for k in re.findall(r"`([a-z_]+)`", first)}
    assert set(S.ServeArgs.model_fields) <= keys, sorted(set(S.ServeArgs.model_fields) - keys)


# --- 6: keys no request can match fail the deploy; a declared oversized body is 413 at once ------------------
@pytest.mark.parametrize("key", ["clé-secrète", "tab\tkey", " padded"])
def test_a_key_no_request_could_match_fails_the_deploy(key, monkeypatch):
    with pytest.raises(ValueError, match="FACEATTR_API_KEY") as e:
        _ingress_with_key(key)
    assert key not in str(e.value)  # the key itself is never printed
    monkeypatch.setenv("FACEATTR_API_KEY", key)
    with pytest.raises(ValueError, match="FACEATTR_API_KEY"):
        S.build_app({"models": {"m": "m.pt"}})
    monkeypatch.setenv("FACEATTR_API_KEY", "ok-key")
    monkeypatch.setenv("FACEATTR_ADMIN_KEY", key)
    with pytest.raises(ValueError, match="FACEATTR_ADMIN_KEY"):
        S.build_app({"models": {"m": "m.pt"}})
    monkeypatch.delenv("FACEATTR_ADMIN_KEY")
    S.build_app({"models": {"m": "m.pt"}})  # a printable ASCII key deploys
    assert _ingress_with_key("k3y-OK_~")._api_key == b"k3y-OK_~"


def _ingress_with_key(key: str):
    """tests.helpers.ingress with API key ``key`` (that one always has "k")."""
    import inspect

    wrapper = S.FaceAttrAPI.func_or_class
    ours = next(c for c in wrapper.__mro__ if c.__name__ == "FaceAttrAPI" and "__init__" in c.__dict__
                and not inspect.iscoroutinefunction(c.__dict__["__init__"]))
    api = object.__new__(wrapper)
    ours.__init__(api, {}, 1 << 20, 4, api_key=key)
    return api


def test_a_declared_oversized_body_is_a_413_even_when_the_body_budget_is_busy():
    api = ingress(max_body_bytes=2 << 20, decode_wait_s=0.05)

    async def scenario():
        held = await api._body_budget.acquire(api._body_budget.total, 1)  # other requests hold every byte
        try:
            with pytest.raises(S.APIError) as e:
                await api._read_items(FakeRequest({"Content-Type": "image/jpeg", "Content-Length": str(2 << 20)}),
                                      "x.jpg")
            return e.value
        finally:
            await api._body_budget.release(held)

    err = asyncio.run(scenario())
    assert err.status == 413 and err.code == "too_large" and err.extra["limit_bytes"] == 1 << 20
    assert api._body_budget.free == api._body_budget.total


# --- a PNG's compressed text: inflated as the file is opened, whatever its pixels ------------------------------
def test_a_png_whose_text_inflates_past_its_bound_is_refused_before_its_pixels():
    """63 zTXt chunks of a compressed MiB of spaces each (a 67 KB file, one pixel): Pillow inflated them all
    (64 MiB, 0.2 s of CPU per opening) and the ingress charged one pixel. Now refused as too large, by the
    ingress's charge and by the decoder alike; real text (a 300 KB XMP, a compressed EXIF profile) still opens."""
    from tests.hostile import png_text_bomb, png_with_text

    bomb = png_text_bomb()
    assert len(bomb) < 100_000
    with pytest.raises(ImageDecodeError) as e:
        cost(bomb, Photos(2048))
    assert e.value.kind == "too_large" and "text chunks" in e.value.message
    batch = decode_batch(["t.png"], [bomb], Photos(2048))
    assert not batch["ok"][0] and batch["error_kind"][0] == "too_large"
    xmp = b"<x:xmpmeta>" + b"<rdf:li>edit</rdf:li>" * 15_000 + b"</x:xmpmeta>"
    real = png_with_text([b"iTXt" + b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp,
                          b"zTXt" + b"Raw profile type exif\x00\x00" + zlib.compress(b"exif\n" + b"00" * 2000)])
    assert cost(real, Photos(2048))[0] == 1
    img, size = open_image(real)
    assert size == (1, 1) and img.info["XML:com.adobe.xmp"].endswith("</x:xmpmeta>")
