"""What an image file's raw bytes say before Pillow decodes them, read without decoding (no Pillow parser):
the signature of a photo format that is not decoded here, a JPEG's scans and whether libjpeg will buffer its
coefficients, and whether anything in a PNG may rotate it. Split from models/imagebytes.py, whose header
checks (``check_header``, ``read_header``) use these; every function here is bounded in time whatever the
bytes (C-speed searches, a bounded number of candidates), and errs on the costly side when unsure.
"""

from __future__ import annotations

import re
import zlib

from PIL import Image

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


# --- JPEG -----------------------------------------------------------------------------------------------
def jpeg_scan_count(data: bytes) -> int:
    """The number of scans of a JPEG, counted as SOS markers (``FF DA``) anywhere in the bytes: an upper
    bound (the pair can also sit in metadata, never in entropy-coded data, where ``FF`` is stuffed) that no
    layout trick lowers. 0 for bytes that are not a JPEG."""
    return data.count(b"\xff\xda") if data[:3] == b"\xff\xd8\xff" else 0


_NOT_FF = re.compile(rb"[^\xff]")  # the end of a run of fill bytes (a regex over FF runs would backtrack: n^2)
_STANDALONE = frozenset([0x01, *range(0xD0, 0xDA)])  # TEM, RSTn, SOI, EOI: no length field
_MAX_SEGMENTS = 4096  # segments before the first scan: a camera JPEG has about 10-20


def jpeg_first_scan_components(data: bytes) -> int | None:
    """Ns of a JPEG's first SOS segment (the components its first scan holds), found by walking its marker
    segments from the start as libjpeg does (bytes between segments that are not a marker are skipped, as
    libjpeg skips them with a warning; APPn segments, EXIF thumbnails included, are skipped whole by their
    length). None when the walk reaches no scan within :data:`_MAX_SEGMENTS` segments: the caller then
    assumes the costly case. Linear in the bytes walked: each search starts where the last one ended."""
    pos = 2
    for _ in range(_MAX_SEGMENTS):
        ff = data.find(b"\xff", pos)
        m = _NOT_FF.search(data, ff) if ff >= 0 else None
        if m is None:
            return None
        code, pos = data[m.start()], m.start() + 1
        if code == 0x00 or code in _STANDALONE:
            continue  # FF 00 is not a marker; standalone markers have no length
        if code == 0xDA:
            return data[pos + 2] if pos + 2 < len(data) else None
        if pos + 2 > len(data):
            return None
        pos += int.from_bytes(data[pos:pos + 2], "big")
    return None


# --- PNG orientation ------------------------------------------------------------------------------------
# Pillow's Image.getexif (what ImageOps.exif_transpose reads) takes a PNG's orientation from an eXIf chunk,
# else from a text chunk (tEXt, zTXt or iTXt) keyed "Raw profile type exif" (ImageMagick's hex EXIF), else
# from one keyed "XML:com.adobe.xmp" (XMP's tiff:Orientation). Any of them can come after the pixels (IDAT),
# where Pillow reads them when the pixels are loaded, without checking their CRCs (PngImageFile.load_end).
_PNG_ORIENTATION_CHUNKS = (b"eXIf",) + tuple(kind + key + b"\x00" for kind in (b"tEXt", b"zTXt", b"iTXt")
                                            for key in (b"Raw profile type exif", b"XML:com.adobe.xmp"))
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # Pillow's own pattern (Image.getexif)
_MAX_PNG_CANDIDATES = 32  # chunks read, all kinds together: the letters repeated in pixel data cost a few reads
_MAX_PNG_TEXT = 1 << 20  # Pillow's limit on a decompressed text chunk (PngImagePlugin.MAX_TEXT_CHUNK)


def png_may_rotate(data: bytes) -> bool:
    """Whether anything in a PNG, before or after its pixels, may make ``exif_transpose`` build a rotated or
    flipped copy: every place in the bytes where one of those chunks could be read (its type, keyword and a
    length that fits) is read, CRC or not, as Pillow reads a late chunk; one that cannot be read, one over
    1 MiB and a candidate past the 32nd count as rotating (the estimate errs on the safe side)."""
    seen = 0
    for needle in _PNG_ORIENTATION_CHUNKS:
        start = 8
        while (i := data.find(needle, start)) >= 0:
            start = i + 4
            n = int.from_bytes(data[i - 4:i], "big") if i >= 12 else -1
            if n < 0 or i + 4 + n > len(data):
                continue  # the letters inside another chunk's data: not a chunk Pillow could read whole
            seen += 1
            if seen > _MAX_PNG_CANDIDATES or n > _MAX_PNG_TEXT or _chunk_rotates(needle[:4], data[i + 4:i + 4 + n]):
                return True
    return False


def _chunk_rotates(kind: bytes, body: bytes) -> bool:
    """Whether one eXIf or orientation text chunk's data gives an orientation other than 1 (or cannot be read)."""
    try:
        if kind == b"eXIf":
            return _exif_rotates(body)
        key, rest = body.split(b"\x00", 1)
        if kind == b"zTXt":
            text = _inflate(rest[1:])  # after the compression method byte
        elif kind == b"iTXt":
            compressed, rest = rest[0], rest[2:]  # flag, method, then language and translated keyword
            text = rest.split(b"\x00", 2)[2]
            text = _inflate(text) if compressed else text
        else:
            text = rest
        if key == b"XML:com.adobe.xmp":
            m = _XMP_ORIENTATION.search(text)
            return m is not None and m[2] != b"1"
        return _exif_rotates(bytes.fromhex("".join(text.decode("latin-1").split("\n")[3:])))  # as Pillow does
    except Exception:  # noqa: BLE001 - unreadable: assume it rotates
        return True


def _inflate(z: bytes) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(z, _MAX_PNG_TEXT + 1)
    if len(out) > _MAX_PNG_TEXT:
        raise ValueError("text chunk over Pillow's limit")
    return out


def _exif_rotates(body: bytes) -> bool:
    exif = Image.Exif()
    exif.load(body)  # with or without its "Exif\0\0" prefix
    return exif.get(0x0112, 1) not in (None, 1)
