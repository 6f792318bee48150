"""Untrusted image bytes -> a loaded, upright PIL image (RGB or L), with what one image may cost bounded
before its pixels are decoded (issue #13). Every decode path goes through :func:`open_image`, which checks
the header (:func:`check_header`) first, except the label job's ``--gpu-decode`` (and ``--actor-decode`` on a
GPU): it runs :func:`read_header` only, then decodes the JPEG with torchvision's ``decode_jpeg``
(raytasks/label/gpu_decode.py). :func:`read_header` makes the same checks without decoding, for whoever must
know the cost first (that path, and the serving ingress, which hands what they found to the decode in a
:class:`Prechecked`, so that they run once); models/preprocess.py turns the image into a model input or a
photo. What is read from the raw bytes without Pillow is in models/imagescan.py.

Only JPEG, PNG, WebP, GIF (first frame), BMP (not RLE-compressed) and TIFF are opened; pixel count, aspect
ratio, estimated decode memory (:func:`decode_cost`: the rotated copy of an EXIF-, XMP- or PNG-text-rotated
image and the coefficients of a progressive JPEG included), TIFF tile size and count and JPEG scan count
have limits (``too_large``). Every failure raises :class:`ImageDecodeError` with a ``kind`` among
``empty``, ``not_image``, ``truncated``, ``too_large`` and ``decode_error``: the label job turns it into an
error row and the serving endpoint into a 4xx answer. The decoded image is brought to RGB or L (16/32-bit
images converted to 8 bits in float32 strips, alpha composited on white) by ``to_standard_mode``, which is
in models/imagemodes.py.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, PngImagePlugin, UnidentifiedImageError

from .imagemodes import to_standard_mode

# What the raw bytes say (models/imagescan.py); FOREIGN_EXTENSIONS, foreign_format and jpeg_scan_count are
# re-exported: the label job and the tests import them from here.
from .imagescan import (  # noqa: F401
    FOREIGN_EXTENSIONS,
    foreign_format,
    jpeg_first_scan_components,
    jpeg_scan_count,
    png_may_rotate,
)

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: bigger than any camera photo of a face, small enough to bound memory

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently grey pixels

# A PNG's compressed text (zTXt, iTXt) is inflated by Pillow as the file is opened, before any pixel and
# whatever the image's size, each chunk up to 1 MiB (Pillow's MAX_TEXT_CHUNK) and by default 64 MiB an image:
# a 67 KB 1x1 PNG of 63 chunks of compressed spaces cost about 0.2 s of CPU per opening, charged as one pixel
# (the serving ingress opens a file twice, to charge it and to decode it, and checks it once: Prechecked).
# 1 MiB an image bounds that to about 7 ms, and holds any real text: EXIF, XMP and ICC text profiles are
# kilobytes. Over it, the file is refused (``too_large``, :func:`_decode_errors`). Set for the process: every
# image is opened here.
MAX_PNG_TEXT_BYTES = 1 << 20
PngImagePlugin.MAX_TEXT_MEMORY = MAX_PNG_TEXT_BYTES


class ImageDecodeError(ValueError):
    """Bytes that cannot become a model input. ``kind`` is machine-readable, ``str(err)`` is for people."""

    # ``changed``: a training file whose bytes are no longer those its face was found in (faces/trainfaces.py)
    KINDS = ("empty", "not_image", "truncated", "too_large", "decode_error", "no_face", "changed")

    def __init__(self, kind: str, message: str):
        assert kind in self.KINDS, kind
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message

    def __reduce__(self):  # picklable across Ray processes
        return (ImageDecodeError, (self.kind, self.message))


# The formats we document (README, docs/api.md). Image.open(formats=...) never runs another plugin: EPS
# (Ghostscript), FITS, PSD, BLP, GRIB, ... are "not_image". Pillow names a JPEG with a multi-picture header
# (many phone cameras) MPO; it is opened by the JPEG plugin and decodes its first picture.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_OPENED_FORMATS = frozenset(ALLOWED_FORMATS + ("MPO",))
MAX_ASPECT_RATIO = 20  # longer side / shorter side: a face photo, even a panorama, is far below; 8000x1 is not
DEFAULT_MAX_DECODE_BYTES = 192 * 1024 * 1024  # the memory open_image may use for one image (estimated, below)
MAX_TILE_BYTES = 32 * 1024 * 1024  # one TIFF tile or strip as libtiff allocates it
MAX_TILES = 32768  # TIFF tiles or strips: each is a decoder call
MAX_JPEG_SCANS = 64  # progressive JPEGs have about 10; thousands of scans cost seconds each (a known DoS)

# Bytes per pixel of PIL's raster for a mode, and what to_standard_mode (models/imagemodes.py) adds on top
# of it (the peak).
_RASTER_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_CONVERT_BYTES = {"RGB": 0, "L": 0, "1": 1, "P": 4, "I;16": 1, "I;16L": 1, "I;16B": 1, "I;16N": 1, "I": 1, "F": 1,
                  "RGBA": 4, "PA": 8, "LA": 8, "La": 8, "RGBa": 8}


def decode_cost(mode: str, size: tuple[int, int], rotated: bool = False, transparent_palette: bool = False,
                coefficients: int = 0) -> int:
    """Estimated peak bytes of loading an image of PIL ``mode`` and ``size`` and bringing it to RGB or L: the
    raster and, while it is filled, libjpeg's ``coefficients`` buffer (:func:`jpeg_coefficient_bytes`); then a
    transposed copy when EXIF rotates it and the conversion's buffers. This, not only the pixel count, is what
    the memory limit compares: a 16-bit, float or RGBA image costs 2-8 bytes a pixel, not one, and a
    progressive JPEG decoded at 1/8 scale still holds its full-size coefficients."""
    raster = _RASTER_BYTES.get(mode, 4)
    extra = _CONVERT_BYTES.get(mode, 4)
    if mode == "P" and transparent_palette:
        extra = 8  # P -> RGBA -> composited RGB
    pixels = size[0] * size[1]
    # The coefficient buffer is freed when the load ends (the decoder's cleanup), before the rotated copy and
    # the conversion are made, so the peak is the raster plus the larger of the two, not their sum. Measured
    # (growth of RSS sampled every 0.5 ms, after the imports and a warm-up decode; Pillow 13.0): progressive
    # 4000x3000 JPEGs through models.photo.decode_photo_pixels (decoded at 2000x1500), grown / estimated MiB:
    # CMYK 4:4:4 103 / 103 (23 without the coefficients), RGB 4:4:4 80 / 80 (11), RGB 4:2:0 45 / 46 (11),
    # grey 26 / 26 (3); decoded to a 64x64 input (1/8 scale): RGB 4:2:0 35 / 35 (1), CMYK 92 / 92 (1); the
    # audit's 7700x5190 progressive CMYK JPEG (at 3850x2595) 343 / 343 (76); rotated by its EXIF and decoded
    # whole, CMYK 3000x1900 66 / 65 (the sum of the two would say 109).
    return pixels * raster + max(coefficients, pixels * (extra + (raster if rotated else 0)))


def jpeg_coefficient_bytes(img, data: bytes) -> int:
    """The bytes libjpeg holds for a JPEG's DCT coefficients while it decodes ``data`` (``img``: the same file
    opened, before :meth:`draft`): 0 when it decodes a row of blocks at a time (one scan of every component),
    else the whole image's coefficients at full size, whatever the draft scale: 2 bytes for each of the 64 of
    each 8x8 block of each component, at that component's sampling, rounded up to whole MCUs (libjpeg's
    jdinput.c ``has_multiple_scans``: a progressive JPEG, or a first scan with fewer components than the
    frame; jdcoefct.c allocates the buffer)."""
    if img.format not in ("JPEG", "MPO") or not img.layer:
        return 0
    if not img.info.get("progressive"):
        scan = jpeg_first_scan_components(data)
        if scan is not None and scan >= len(img.layer):
            return 0
    hmax, vmax = max(max(c[1], 1) for c in img.layer), max(max(c[2], 1) for c in img.layer)
    w, h = img.size
    total = 0
    for _, hs, vs, _ in img.layer:
        hs, vs = max(hs, 1), max(vs, 1)
        blocks_w, blocks_h = -(-w * hs // (hmax * 8)), -(-h * vs // (vmax * 8))
        total += -(-blocks_w // hs) * hs * -(-blocks_h // vs) * vs * 128
    return total


def _tiff_layout(img) -> tuple[int, int]:
    """``(bytes of the largest tile or strip, number of tiles or strips)`` of a TIFF, from its header."""
    tags = img.tag_v2
    w, h = img.size
    bpp = _RASTER_BYTES.get(img.mode, 4)
    if 322 in tags or 323 in tags:  # TileWidth / TileLength
        tw, th = int(tags.get(322, w)), int(tags.get(323, h))
        count = len(tags.get(324, ()) or ())
    else:
        tw, th = w, min(h, int(tags.get(278, h) or h))  # RowsPerStrip (2**32-1 means one strip)
        count = len(tags.get(273, ()) or ())
    return tw * th * max(bpp, 1), max(count, len(img.tile))


def check_header(img, max_pixels: int = DEFAULT_MAX_PIXELS, max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
                 rotated: bool = False, coefficients: int = 0) -> int:
    """Refuse, from the header alone (before any pixel is decoded), what would cost too much: a format
    outside :data:`ALLOWED_FORMATS`, an RLE-compressed BMP, more than ``max_pixels``, an aspect ratio over
    :data:`MAX_ASPECT_RATIO`, an estimated decode memory (:func:`decode_cost`) over ``max_decode_bytes``,
    TIFF tiles or strips bigger than :data:`MAX_TILE_BYTES` or more than :data:`MAX_TILES` of them
    (``rotated``: its orientation makes a transposed copy; ``coefficients``: :func:`jpeg_coefficient_bytes`).
    Raises :class:`ImageDecodeError` (``not_image`` or ``too_large``); returns the estimated decode memory."""
    if img.format not in _OPENED_FORMATS:
        raise ImageDecodeError("not_image", f"{img.format} is not one of the accepted formats "
                                            f"({', '.join(ALLOWED_FORMATS)})")
    # Refused, not given a lower pixel limit: Pillow decodes RLE8/RLE4 in Python, holding the GIL (a 25 KB
    # 6000x6000 RLE8 BMP took 8 s of CPU, and even 1 MP about 0.2 s), and no camera or phone writes them.
    if img.format == "BMP" and img.info.get("compression") in (1, 2):
        raise ImageDecodeError("not_image", "an RLE-compressed BMP (RLE8 or RLE4) is not accepted (its decoder is "
                                            "slow pure Python): convert it to PNG or an uncompressed BMP")
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageDecodeError("decode_error", f"image size {w}x{h}")
    if w * h > max_pixels:
        raise ImageDecodeError("too_large", f"{w}x{h} = {w * h} pixels is over the limit of {max_pixels}")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ImageDecodeError("too_large", f"{w}x{h}: aspect ratio {max(w, h) / min(w, h):.0f}:1 is over the "
                                            f"limit of {MAX_ASPECT_RATIO}:1")
    cost = decode_cost(img.mode, img.size, rotated, img.mode == "P" and "transparency" in img.info, coefficients)
    if cost > max_decode_bytes:
        held = " (a progressive or multi-scan JPEG: its coefficients at full size)" if coefficients else ""
        raise ImageDecodeError("too_large", f"{w}x{h} {img.mode} needs about {cost >> 20} MiB of memory to decode"
                                            f"{held}, over the limit of {max_decode_bytes >> 20} MiB")
    if img.format == "TIFF":
        tile_bytes, tiles = _tiff_layout(img)
        if tile_bytes > MAX_TILE_BYTES:
            raise ImageDecodeError("too_large", f"a TIFF tile or strip of {tile_bytes >> 20} MiB is over the limit "
                                                f"of {MAX_TILE_BYTES >> 20} MiB")
        if tiles > MAX_TILES:
            raise ImageDecodeError("too_large", f"{tiles} TIFF tiles or strips are over the limit of {MAX_TILES}")
    return cost




def check_jpeg_bytes(data: bytes) -> None:
    """Refuse (:class:`ImageDecodeError` ``too_large``) a JPEG of more than :data:`MAX_JPEG_SCANS` scans:
    a progressive JPEG has about 10, and each scan of a big image is another pass over all of it (thousands
    cost minutes: a known denial of service). Both decoders call it before decoding: :func:`open_image`
    (the CPU path) and ``raytasks.label.gpu_decode.jpeg_for_gpu`` (``--gpu-decode``)."""
    scans = jpeg_scan_count(data)
    if scans > MAX_JPEG_SCANS:
        raise ImageDecodeError("too_large", f"a JPEG of {scans} scans is over the limit of {MAX_JPEG_SCANS}")


def draft_request(width: int, height: int, longest: int) -> tuple[int, int]:
    """The (width, height) :func:`open_image` asks a JPEG's draft mode to cover when told a longest side."""
    f = min(1.0, longest / max(width, height, 1))
    return max(1, math.ceil(width * f)), max(1, math.ceil(height * f))


def jpeg_draft_size(width: int, height: int, request: tuple[int, int]) -> tuple[int, int]:
    """The size Pillow's JPEG draft mode decodes a ``width`` x ``height`` JPEG at for ``request``: the largest
    DCT scale of 1/8, 1/4, 1/2, 1 whose image still covers it, sides rounded up (``JpegImageFile.draft``,
    Pillow 11)."""
    scale = min(width // request[0], height // request[1])
    s = next(a for a in (8, 4, 2, 1) if scale >= a)
    return (width + s - 1) // s, (height + s - 1) // s


@dataclass(frozen=True)
class Header:
    """What :func:`read_header` found, every check passed: the format, the size as stored (before EXIF
    orientation), the size the pixels decode at (a JPEG's draft scale) and the estimated peak memory of that
    decode (:func:`decode_cost`: what ``max_decode_bytes`` was compared with), the PIL mode it decodes to
    before any conversion (a CMYK JPEG stays ``CMYK``) and whether its orientation turns it (``rotated``)."""

    format: str
    size: tuple[int, int]
    decoded: tuple[int, int]
    decode_bytes: int
    mode: str
    # Whether :func:`open_image` rotates or flips the decoded pixels: the orientation it applies (Pillow's
    # ``getexif``: the EXIF Orientation tag, else an XMP ``tiff:Orientation``) is not 1; for a PNG, whether
    # anything in it may rotate it (``png_may_rotate``). The same reading the memory estimate charges.
    rotated: bool = False


class Prechecked:
    """Image bytes and what :func:`read_header` found in them (every check passed), per set of arguments it
    was called with. :func:`open_image` given this object and the same arguments opens the bytes without
    checking them again: the serving ingress checks each file once per request, to charge it, and decodes what
    passed (facedata/decode.py ``cost``, then ``decode_batch``). The checks' byte scans are most of their time
    (a 12 MP JPEG's marker walk about 5 ms, a 22 MB PNG's search for a late orientation about 30 ms); the
    opening they share is kept only as its :class:`Header`, and no opened image is held between the two (a
    PNG's text, inflated as it is opened, could hold 1 MiB for each file of a request). Given other arguments,
    or none checked yet, :func:`open_image` checks as for plain bytes: never less."""

    __slots__ = ("data", "_passed")

    def __init__(self, data: bytes):
        self.data = bytes(data)  # the same object when it is bytes already
        self._passed: dict[tuple, Header] = {}


def _draft(img, draft_to: tuple[int, int] | int | None) -> None:
    """A JPEG set to decode at the reduced DCT scale that still covers ``draft_to`` (see :func:`open_image`)."""
    if isinstance(draft_to, int):  # a longest side: the size that keeps the aspect ratio
        draft_to = draft_request(*img.size, draft_to)
    if draft_to is not None and img.format in ("JPEG", "MPO"):
        img.draft(img.mode if img.mode in ("RGB", "L") else None, draft_to)


def _checked_open(data: bytes, max_pixels: int, draft_to: tuple[int, int] | int | None,
                  max_decode_bytes: int) -> tuple[Image.Image, Header]:
    """``data`` opened (not loaded) with every check made, at the draft scale it will decode at."""
    if not data:
        raise ImageDecodeError("empty", "zero bytes")
    check_jpeg_bytes(data)
    img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    w0, h0 = img.size
    check_header(img, max_pixels, float("inf"))  # format, RLE, pixels, aspect, tiles: before anything else
    # A PNG's orientation may come after its pixels (an eXIf, XMP or EXIF text chunk), where Pillow's getexif()
    # finds it only by decoding the whole image: it is read from the bytes instead (png_may_rotate), so that
    # the estimate counts the rotated copy exif_transpose makes after the load (issue #22: 306 MB against
    # 152 MiB).
    rotated = png_may_rotate(data) if img.format == "PNG" else img.getexif().get(0x0112, 1) not in (None, 1)
    coefficients = jpeg_coefficient_bytes(img, data)  # at the full size, which draft() forgets
    _draft(img, draft_to)
    cost = check_header(img, max_pixels, max_decode_bytes, rotated, coefficients)
    return img, Header(img.format, (w0, h0), img.size, cost, img.mode, rotated)


def _opened(data: bytes | Prechecked, max_pixels: int, draft_to: tuple[int, int] | int | None,
            max_decode_bytes: int) -> tuple[Image.Image, Header]:
    """``data`` opened for decoding: checked by :func:`_checked_open`, unless it is a :class:`Prechecked` whose
    checks passed with these arguments, and it opens again to the header they found (the same bytes do: a
    difference, which would be a bug, checks it again)."""
    known = data._passed.get((max_pixels, draft_to, max_decode_bytes)) if isinstance(data, Prechecked) else None
    raw = data.data if isinstance(data, Prechecked) else data
    if known is not None:
        img = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS)
        size = img.size
        if img.format != "PNG":  # read before the draft and the load, as _checked_open reads it: the
            img.getexif()  # orientation applied after the load is the one that was charged
        _draft(img, draft_to)
        if (img.format, size, img.size, img.mode) == (known.format, known.size, known.decoded, known.mode):
            return img, known
        img.close()
    return _checked_open(raw, max_pixels, draft_to, max_decode_bytes)


@contextlib.contextmanager
def _decode_errors(data: bytes):
    """Whatever Pillow raises while opening or decoding ``data``, as :class:`ImageDecodeError` of its kind."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError("too_large", str(e)) from None
    except UnidentifiedImageError:
        foreign = foreign_format(data[:32])
        if foreign:
            raise ImageDecodeError("not_image", f"{foreign}, a format not decoded here (accepted: "
                                                f"{', '.join(ALLOWED_FORMATS)}): convert it to JPEG or PNG") from None
        raise ImageDecodeError("not_image", "bytes are not an image in an accepted format "
                                            f"({', '.join(ALLOWED_FORMATS)})") from None
    except MemoryError:
        raise ImageDecodeError("too_large", "out of memory while decoding") from None
    except OSError as e:
        msg = str(e)
        low = msg.lower()
        kind = "truncated" if any(w in low for w in ("truncat", "broken data stream", "premature")) else "decode_error"
        raise ImageDecodeError(kind, msg) from None
    except ValueError as e:
        if "text chunks" in str(e) or "MAX_TEXT_CHUNK" in str(e):  # Pillow's PNG text limits (above)
            raise ImageDecodeError("too_large", f"the PNG's text chunks inflate to more than "
                                                f"{MAX_PNG_TEXT_BYTES >> 20} MiB ({e})") from None
        raise ImageDecodeError("decode_error", f"{type(e).__name__}: {e}") from None
    except (SyntaxError, EOFError, IndexError, TypeError, struct.error) as e:
        raise ImageDecodeError("decode_error", f"{type(e).__name__}: {e}") from None


def read_header(data: bytes | Prechecked, max_pixels: int = DEFAULT_MAX_PIXELS,
                draft_to: tuple[int, int] | int | None = None,
                max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> Header:
    """Every check :func:`open_image` makes before decoding, with the same arguments, and nothing decoded:
    raises the :class:`ImageDecodeError` it would raise before decoding, else returns the :class:`Header`.
    The serving ingress charges a request from it (facedata/decode.py ``cost``), so that what a file is
    charged and how it is decoded come from the same checks (:func:`_checked_open`). Given a
    :class:`Prechecked`, the header is kept in it, and :func:`open_image` called with it and the same
    arguments does not check again: the checks run once, to charge (a PNG's orientation scan and a JPEG's
    marker walk included)."""
    raw = data.data if isinstance(data, Prechecked) else data
    with _decode_errors(raw):
        img, head = _checked_open(raw, max_pixels, draft_to, max_decode_bytes)
        img.close()
    if isinstance(data, Prechecked):
        data._passed[(max_pixels, draft_to, max_decode_bytes)] = head
    return head


def open_image(data: bytes | Prechecked, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft_to: tuple[int, int] | int | None = None, max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES):
    """Bytes -> a loaded PIL image in upright orientation, mode RGB or L, plus its oriented original size.

    ``draft_to`` lets JPEG decode at a reduced scale (DCT scaling) when the image is much larger than
    needed: a (width, height) the result must still cover, or one number, the longest side it must keep.
    The returned original size is the full size. The header is checked (:func:`check_header`, as
    :func:`read_header` does) before decoding, on the full size for the pixel and aspect limits and on the
    draft size for memory; not again for a :class:`Prechecked` whose :func:`read_header` passed with the same
    arguments.
    """
    with _decode_errors(data.data if isinstance(data, Prechecked) else data):
        img, head = _opened(data, max_pixels, draft_to, max_decode_bytes)
        img.load()
        orientation = img.getexif().get(0x0112, 1)
        img = ImageOps.exif_transpose(img, in_place=True) or img
    w0, h0 = head.size
    if orientation in (5, 6, 7, 8):
        w0, h0 = h0, w0
    return to_standard_mode(img), (w0, h0)
