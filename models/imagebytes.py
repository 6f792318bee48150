"""Untrusted image bytes -> a loaded, upright PIL image (RGB or L), with what one image may cost bounded
before its pixels are decoded (issue #13). Every decode path goes through :func:`open_image`, which checks
the header (:func:`check_header`) first; models/preprocess.py turns its image into a model input or a photo.

Only JPEG, PNG, WebP, GIF (first frame), BMP and TIFF are opened; pixel count, aspect ratio, estimated
decode memory (:func:`decode_cost`), TIFF tile size and count and JPEG scan count have limits
(``too_large``); 16/32-bit images are converted to 8 bits in float32 strips. Every failure raises
:class:`ImageDecodeError` with a ``kind`` among ``empty``, ``not_image``, ``truncated``, ``too_large`` and
``decode_error``: the label job turns it into an error row and the serving endpoint into a 4xx answer.
"""

from __future__ import annotations

import io
import math
import struct
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: bigger than any camera photo of a face, small enough to bound memory

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently grey pixels


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
# Photo formats common in users' buckets that are not decoded here: Pillow has no HEIF decoder, and AVIF,
# JPEG 2000 and PSD are left out of ALLOWED_FORMATS on purpose (more decoder code behind untrusted bytes). A
# label job takes such files as inputs all the same, so that each gets an error row naming its format
# (``not_image``) rather than being skipped without a word: an iPhone saves HEIC by default.
FOREIGN_EXTENSIONS = {
    ".heic": "HEIC", ".heif": "HEIF", ".hif": "HEIF", ".avif": "AVIF", ".jxl": "JPEG XL", ".jp2": "JPEG 2000",
    ".j2k": "JPEG 2000", ".jpx": "JPEG 2000", ".psd": "Photoshop (PSD)", ".dng": "camera RAW (DNG)",
    ".cr2": "camera RAW (CR2)", ".cr3": "camera RAW (CR3)", ".nef": "camera RAW (NEF)", ".arw": "camera RAW (ARW)",
    ".orf": "camera RAW (ORF)", ".rw2": "camera RAW (RW2)", ".raf": "camera RAW (RAF)",
}
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1")
_FOREIGN_MAGIC = ((b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"), (b"\xff\x0a", "JPEG XL"),
                  (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
                  (b"8BPS", "Photoshop (PSD)"), (b"FUJIFILMCCD-RAW", "camera RAW (RAF)"),
                  (b"IIRO", "camera RAW (ORF)"), (b"IIRS", "camera RAW (ORF)"), (b"IIU\x00", "camera RAW (RW2)"))


def foreign_format(head: bytes) -> str | None:
    """The name of a photo format that is not decoded here (:data:`FOREIGN_EXTENSIONS`) when a file's first
    32 bytes are its signature: an ISO base media file ("ftyp") whose brands are HEIF's or AVIF's (not a video's),
    Canon's CR3, JPEG XL, JPEG 2000, Photoshop or one of the RAW formats that are not TIFF files; else None."""
    if head[4:8] == b"ftyp":
        brands = [head[i:i + 4] for i in range(8, min(len(head), 32) - 3, 4) if i != 12]  # major, compatible
        if any(b in (b"avif", b"avis") for b in brands):
            return "AVIF"
        if any(b in _HEIF_BRANDS for b in brands):
            return "HEIC/HEIF"
        return "camera RAW (CR3)" if b"crx " in brands else None
    return next((name for magic, name in _FOREIGN_MAGIC if head.startswith(magic)), None)


MAX_ASPECT_RATIO = 20  # longer side / shorter side: a face photo, even a panorama, is far below; 8000x1 is not
DEFAULT_MAX_DECODE_BYTES = 192 * 1024 * 1024  # the memory open_image may use for one image (estimated, below)
MAX_TILE_BYTES = 32 * 1024 * 1024  # one TIFF tile or strip as libtiff allocates it
MAX_TILES = 32768  # TIFF tiles or strips: each is a decoder call
MAX_JPEG_SCANS = 64  # progressive JPEGs have about 10; thousands of scans cost seconds each (a known DoS)
_STRIP_PIXELS = 1 << 20  # 16/32-bit to 8-bit conversion works on strips of about this many pixels

# Bytes per pixel of PIL's raster for a mode, and what _to_standard_mode adds on top of it (the peak).
_RASTER_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_CONVERT_BYTES = {"RGB": 0, "L": 0, "1": 1, "P": 4, "I;16": 1, "I;16L": 1, "I;16B": 1, "I;16N": 1, "I": 1, "F": 1,
                  "RGBA": 4, "PA": 8, "LA": 8, "La": 8, "RGBa": 8}


def decode_cost(mode: str, size: tuple[int, int], rotated: bool = False, transparent_palette: bool = False) -> int:
    """Estimated peak bytes of loading an image of PIL ``mode`` and ``size`` and bringing it to RGB or L
    (the raster, a transposed copy when EXIF rotates it, and the conversion's buffers). This, not only
    the pixel count, is what the memory limit compares: a 16-bit, float or RGBA image costs 2-8 bytes a
    pixel, not one."""
    raster = _RASTER_BYTES.get(mode, 4)
    extra = _CONVERT_BYTES.get(mode, 4)
    if mode == "P" and transparent_palette:
        extra = 8  # P -> RGBA -> composited RGB
    pixels = size[0] * size[1]
    return pixels * (raster + extra + (raster if rotated else 0))


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
                 rotated: bool = False) -> None:
    """Refuse, from the header alone (before any pixel is decoded), what would cost too much: a format
    outside :data:`ALLOWED_FORMATS`, more than ``max_pixels``, an aspect ratio over
    :data:`MAX_ASPECT_RATIO`, an estimated decode memory (:func:`decode_cost`) over ``max_decode_bytes``,
    TIFF tiles or strips bigger than :data:`MAX_TILE_BYTES` or more than :data:`MAX_TILES` of them.
    Raises :class:`ImageDecodeError` (``not_image`` or ``too_large``)."""
    if img.format not in _OPENED_FORMATS:
        raise ImageDecodeError("not_image", f"{img.format} is not one of the accepted formats "
                                            f"({', '.join(ALLOWED_FORMATS)})")
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageDecodeError("decode_error", f"image size {w}x{h}")
    if w * h > max_pixels:
        raise ImageDecodeError("too_large", f"{w}x{h} = {w * h} pixels is over the limit of {max_pixels}")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ImageDecodeError("too_large", f"{w}x{h}: aspect ratio {max(w, h) / min(w, h):.0f}:1 is over the "
                                            f"limit of {MAX_ASPECT_RATIO}:1")
    cost = decode_cost(img.mode, img.size, rotated, img.mode == "P" and "transparency" in img.info)
    if cost > max_decode_bytes:
        raise ImageDecodeError("too_large", f"{w}x{h} {img.mode} needs about {cost >> 20} MiB of memory to decode, "
                                            f"over the limit of {max_decode_bytes >> 20} MiB")
    if img.format == "TIFF":
        tile_bytes, tiles = _tiff_layout(img)
        if tile_bytes > MAX_TILE_BYTES:
            raise ImageDecodeError("too_large", f"a TIFF tile or strip of {tile_bytes >> 20} MiB is over the limit "
                                                f"of {MAX_TILE_BYTES >> 20} MiB")
        if tiles > MAX_TILES:
            raise ImageDecodeError("too_large", f"{tiles} TIFF tiles or strips are over the limit of {MAX_TILES}")


def _late_png_rotation(data: bytes) -> bool:
    """Whether a PNG holds an eXIf chunk (after its pixels: one before them is in the header) whose
    orientation makes ``exif_transpose`` build a rotated or flipped copy. Found without decoding: every
    ``eXIf`` in the bytes whose length and CRC make it a chunk is read; one that cannot be read counts as
    rotating (the estimate errs on the safe side), and so do a candidate over 1 MiB and a 33rd candidate
    (the letters repeated in the pixel data must not make this cost more than a few CRCs)."""
    import zlib

    start = 8
    for _ in range(32):
        i = data.find(b"eXIf", start)
        if i < 0:
            return False
        start = i + 4
        n = int.from_bytes(data[i - 4:i], "big") if i >= 12 else -1
        end = i + 4 + n
        if n < 0 or end + 4 > len(data):
            continue  # the four letters inside another chunk's data, not a chunk
        if n > 1 << 20:
            return True
        if zlib.crc32(data[i:end]) != int.from_bytes(data[end:end + 4], "big"):
            continue
        body = data[i + 4:end]
        try:
            exif = Image.Exif()
            exif.load(body if body.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + body)
            if exif.get(0x0112, 1) not in (None, 1):
                return True
        except Exception:  # noqa: BLE001 - unreadable: assume it rotates
            return True
    return True


def jpeg_scan_count(data: bytes) -> int:
    """The number of scans of a JPEG, counted as SOS markers (``FF DA``) anywhere in the bytes: an upper
    bound (the pair can also sit in metadata, never in entropy-coded data, where ``FF`` is stuffed) that no
    layout trick lowers. 0 for bytes that are not a JPEG."""
    return data.count(b"\xff\xda") if data[:3] == b"\xff\xd8\xff" else 0


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


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_to: tuple[int, int] | int | None = None,
               max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES):
    """Bytes -> a loaded PIL image in upright orientation, mode RGB or L, plus its oriented original size.

    ``draft_to`` lets JPEG decode at a reduced scale (DCT scaling) when the image is much larger than
    needed: a (width, height) the result must still cover, or one number, the longest side it must keep.
    The returned original size is the full size. The header is checked (:func:`check_header`)
    before decoding, on the full size for the pixel and aspect limits and on the draft size for memory.
    """
    if not data:
        raise ImageDecodeError("empty", "zero bytes")
    check_jpeg_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            w0, h0 = img.size
            check_header(img, max_pixels, float("inf"))  # format, pixels, aspect, tiles: before anything else
            # Pillow's PNG getexif() decodes the whole image to look for an eXIf chunk after the pixels, so
            # a PNG's orientation is read from the header only when the chunk came before them; a chunk
            # after them (IDAT) is found in the bytes (_late_png_rotation), so that the estimate counts the
            # rotated copy exif_transpose makes after the load (issue #22: 306 MB against 152 MiB).
            early_exif = img.format != "PNG" or "exif" in img.info
            rotated = (img.getexif().get(0x0112, 1) not in (None, 1)) if early_exif else _late_png_rotation(data)
            if isinstance(draft_to, int):  # a longest side: the size that keeps the aspect ratio
                draft_to = draft_request(w0, h0, draft_to)
            if draft_to is not None and img.format in ("JPEG", "MPO"):
                img.draft(img.mode if img.mode in ("RGB", "L") else None, draft_to)
            check_header(img, max_pixels, max_decode_bytes, rotated)
            img.load()
            orientation = img.getexif().get(0x0112, 1)
            img = ImageOps.exif_transpose(img, in_place=True) or img
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
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error) as e:
        raise ImageDecodeError("decode_error", f"{type(e).__name__}: {e}") from None
    if orientation in (5, 6, 7, 8):
        w0, h0 = h0, w0
    return _to_standard_mode(img), (w0, h0)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer or float grey -> L, a strip at a time in float32 (no whole-image float64
    copy). 16-bit is divided by 257; 32-bit integers too when any value is over 255; floats in [0, 1] are
    multiplied by 255."""
    mode = img.mode
    lo, hi = img.getextrema()
    if mode.startswith("I;16") or (mode == "I" and hi > 255):
        mul = 1.0 / 257.0
    elif mode == "F" and hi <= 1.0:
        mul = 255.0
    else:
        mul = 1.0
    w, h = img.size
    out = np.empty((h, w), np.uint8)
    rows = max(1, _STRIP_PIXELS // w)
    for y in range(0, h, rows):
        strip = np.array(img.crop((0, y, w, min(h, y + rows))), dtype=np.float32)
        if mul != 1.0:
            strip *= np.float32(mul)
        np.clip(np.rint(strip, out=strip), 0, 255, out=strip)
        out[y:y + strip.shape[0]] = strip
    return Image.fromarray(out, "L")


def _to_standard_mode(img: Image.Image) -> Image.Image:
    """RGB or L from any PIL mode: 16-bit and 32-bit grey scaled to 8 bits, palette and alpha composited
    on white (a transparent background is not part of a face), CMYK/YCbCr/LAB converted. Peak memory is
    what :func:`decode_cost` estimates."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _to_8bit(img)
    if mode == "1":
        return img.convert("L")
    if mode == "P":
        if "transparency" not in img.info:
            return img.convert("RGB")
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)  # RGB onto RGB through the alpha band, without an RGB copy
        return out
    return img.convert("RGB")
