"""One function from image bytes to model input, shared by training, evaluation, labeling and serving.

``decode(data, pre)`` turns bytes into a ``uint8`` tensor (C, H, W) of the model's input size plus the
geometry that maps input pixels back to the original image (for landmarks in pixels). Normalisation
(``normalize``) is a separate, batched step so that it can run where the model runs (on the GPU in the
label job) and so that uint8, four times smaller than float32, is what travels between processes.

Every failure raises :class:`ImageDecodeError` with a ``kind`` among ``empty``, ``not_image``,
``truncated``, ``too_large`` and ``decode_error``: the label job turns it into an error row and the
serving endpoint into a 4xx answer.

The bytes come from strangers, so what one image may cost is bounded before its pixels are decoded
(:func:`check_header`): only JPEG, PNG, WebP, GIF (first frame), BMP and TIFF are opened; pixel count,
aspect ratio, estimated decode memory, TIFF tile size and count and JPEG scan count have limits
(``too_large``); no resize builds an image bigger than the model's input; 16/32-bit images are converted
in float32 strips.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


@dataclass(frozen=True)
class Preprocessing:
    """What the model needs from an image; stored in every checkpoint.

    ``resize``: ``stretch`` resizes the whole image to ``size`` (faces that are already aligned and
    cropped); ``shorter_center_crop`` resizes the shorter side to ``resize_shorter`` and takes the centre
    ``size`` crop (HMTNet: 227 then 224). In training, ``shorter_center_crop`` keeps a margin of
    ``resize_shorter - min(size)`` pixels around the crop so that the augmentation can take a random crop.
    """

    size: tuple[int, int] = (224, 224)  # (H, W)
    channels: int = 3  # 3 = RGB, 1 = grayscale
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: str = "stretch"
    resize_shorter: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    # The face template: where the 5 points (image-left eye, image-right eye, nose tip, image-left mouth
    # corner, image-right mouth corner) sit in the model's input, in input pixels (x, y) of ``size``. A face
    # detected in a photo is warped onto it (faces/align.py), so it must be where the training faces had
    # them; the train job derives it from the training data and the checkpoint keeps it. None: the model's
    # default (faces.align.default_template). ``template_crop``: the (H, W) of the training crops the
    # template was measured on, which the resize policy turned into the input (faces/align.py aligns in
    # that frame, so that a stretch is applied as in training); None: the crops were the input's size.
    template: tuple[tuple[float, float], ...] | None = None
    template_crop: tuple[int, int] | None = None

    def __post_init__(self):
        if self.resize not in ("stretch", "shorter_center_crop"):
            raise ValueError(f"unknown resize policy {self.resize!r}")
        if self.channels not in (1, 3) or len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("channels must be 1 or 3, with one mean and std per channel")
        if self.template is not None:
            pts = tuple((float(x), float(y)) for x, y in self.template)
            if len(pts) != 5:
                raise ValueError(f"a face template has 5 (x, y) points, got {len(pts)}")
            object.__setattr__(self, "template", pts)
        if self.template_crop is not None:
            object.__setattr__(self, "template_crop", tuple(int(v) for v in self.template_crop))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        d = dict(d)
        for k in ("size", "mean", "std"):
            d[k] = tuple(d[k])
        if d.get("template") is not None:
            d["template"] = tuple(tuple(p) for p in d["template"])
        if d.get("template_crop") is not None:
            d["template_crop"] = tuple(d["template_crop"])
        return cls(**d)

    def with_size(self, size: int | tuple[int, int]) -> Preprocessing:
        """The same policy at another input size (``--image-size``); keeps HMTNet's 227/224 ratio and
        scales the face template with the input."""
        hw = (size, size) if isinstance(size, int) else tuple(size)
        shorter = None
        if self.resize_shorter is not None:
            shorter = round(self.resize_shorter * min(hw) / min(self.size))
        template = None
        if self.template is not None:
            fx, fy = hw[1] / self.size[1], hw[0] / self.size[0]
            template = tuple((x * fx, y * fy) for x, y in self.template)
        return replace(self, size=hw, resize_shorter=shorter, template=template)


# ------------------------------------------------------------------------------------------------------
# Untrusted bytes: what one image may cost (issue #13). Every decode path goes through open_image, which
# checks the header (check_header) before a pixel is decoded.
# ------------------------------------------------------------------------------------------------------

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
                f = min(1.0, draft_to / max(w0, h0, 1))
                draft_to = (max(1, math.ceil(w0 * f)), max(1, math.ceil(h0 * f)))
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


def decode(data: bytes, pre: Preprocessing, train: bool = False,
           max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> tuple[torch.Tensor, dict]:
    """Image bytes -> (uint8 tensor (C, H, W), geometry).

    Geometry maps a pixel ``(x, y)`` of the model input to the oriented original image:
    ``(x * sx + tx, y * sy + ty)``; it also carries the original ``width`` and ``height``.

    ``shorter_center_crop`` resizes only the region of the original that becomes the centre crop
    (``Image.resize(box=...)``): no intermediate image bigger than the crop, whatever the aspect ratio.
    Channels are converted after the resize (the same pixels: replicating grey, or a linear mix of RGB
    that commutes with bilinear resampling up to rounding), so a grey photo is never tripled at full size.
    """
    H, W = pre.size
    img, (ow, oh) = open_image(data, pre.max_pixels, draft_to=(2 * W, 2 * H), max_decode_bytes=max_decode_bytes)
    iw, ih = img.size  # smaller than (ow, oh) when JPEG draft decoded at a reduced scale
    geometry = {"width": ow, "height": oh, "input_w": W, "input_h": H}
    if pre.resize == "stretch":
        img = img.resize((W, H), Image.BILINEAR, reducing_gap=3.0)
        geometry.update(sx=ow / W, sy=oh / H, tx=0.0, ty=0.0)
    else:
        shorter = pre.resize_shorter or min(H, W)
        margin = max(0, shorter - min(H, W)) if train else 0
        cw, ch = W + margin, H + margin
        s = shorter / min(ow, oh)
        rw, rh = max(cw, round(ow * s)), max(ch, round(oh * s))  # the resized image, never built
        left, top = (rw - cw) // 2, (rh - ch) // 2
        fx, fy = iw / rw, ih / rh  # resized pixel -> decoded pixel
        img = img.resize((cw, ch), Image.BILINEAR, box=(left * fx, top * fy, (left + cw) * fx, (top + ch) * fy),
                         reducing_gap=3.0)
        sxr, syr = ow / rw, oh / rh  # resized pixel -> original pixel
        geometry.update(sx=sxr, sy=syr, tx=left * sxr, ty=top * syr)
    img = img.convert("L") if pre.channels == 1 else (img if img.mode == "RGB" else img.convert("RGB"))
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()
    return t, geometry


DEFAULT_PHOTO_SIDE = 2048  # longest side a photo is decoded at for face detection and alignment (see decode_photo)


def decode_photo(data: bytes, max_side: int = DEFAULT_PHOTO_SIDE,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, tuple[int, int], float]:
    """Photo bytes -> ``(uint8 RGB (3, h, w), (width, height) of the upright original, scale)``, the whole
    picture for face detection, its longest side at most ``max_side`` pixels.

    A 24-megapixel JPEG is decoded at a reduced DCT scale (JPEG draft mode: 1/2, 1/4 or 1/8, the smallest
    that stays at or above ``max_side``) and then area-resized, so neither its full-size pixels nor their
    time are ever spent; other formats are resized after decoding. ``scale`` maps decoded pixels to original
    ones (``x_original = x * scale``). 2048 px keeps a face that fills a tenth of a 6000 px photo's width at
    about 200 px, the input size of the largest model; a smaller ``max_side`` is faster and loses small
    faces first."""
    if max_side < 32:
        raise ValueError("max_side must be at least 32 pixels")
    img, (ow, oh) = open_image(data, max_pixels, draft_to=max_side)
    img = img if img.mode == "RGB" else img.convert("RGB")
    w, h = img.size
    if max(w, h) > max_side:
        f = max_side / max(w, h)
        img = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    return t, (ow, oh), max(ow, oh) / max(t.shape[1], t.shape[2])


def normalize(batch: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 normalised with the model's mean and std, on the batch's device."""
    mean = torch.tensor(pre.mean, device=batch.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    std = torch.tensor(pre.std, device=batch.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return (batch.float() - mean) / std


def build_augmentation(pre: Preprocessing, augment: dict | None):
    """The part of a recipe's augmentation that belongs to the decode, on uint8 (C, H, W) tensors from
    ``decode(..., train=True)``: for ``shorter_center_crop`` inputs (HMTNet) the random crop to ``pre.size``
    out of the training margin (``random_crop``, on by default; off: the centre crop). Everything else
    (flip, similarity jitter, colour, blur) runs on the device, in the aligned frame, with the landmark
    targets moved along: core/augment.py. Returns ``None`` when there is nothing to do here."""
    if pre.resize != "shorter_center_crop":
        return None
    from torchvision.transforms import v2

    return v2.RandomCrop(pre.size) if (augment or {}).get("random_crop", True) else v2.CenterCrop(pre.size)
