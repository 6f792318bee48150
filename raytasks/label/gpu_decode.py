"""``--gpu-decode`` (and ``--actor-decode``, the same for photos on any device): JPEGs decoded in the predictor
actor (``torchvision.io.decode_jpeg``: nvjpeg on a GPU; a CPU actor's photos go through ``decode_photo``, the
CPU tasks' own decoder, for its JPEG draft mode: :func:`photos_on_device`), then resized
as ``models.preprocess.decode`` does (whole images, :func:`gpu_decode_batch`) or shrunk to the photo size of
``models.preprocess.decode_photo`` (photos for face detection, :func:`gpu_decode_photos`). Split from
raytasks/label/job.py (the pipeline); the CPU stage decides which files may go (:func:`jpeg_for_gpu`), the
actor decodes them. No Ray here: bench/bench_gpu_photos.py times the same functions on a GPU without Ray."""

from __future__ import annotations

import numpy as np


def jpeg_for_gpu(data: bytes, pre=None) -> bool:
    """Whether a file can go to the GPU decoder: a baseline/progressive JPEG in RGB or grey (CMYK and YCCK
    JPEGs, other formats and anything PIL cannot parse the header of stay on the CPU path, which gives them
    their label or error row) within the CPU decoder's limits (pixels, aspect ratio, memory, JPEG scans),
    stored upright (a JPEG whose orientation is not 1 stays on the CPU path, which turns it).
    ``pre``: the model's preprocessing (whole images), or None for photos (``decode_photo``'s pixel limit)."""
    from models.imagebytes import DEFAULT_MAX_PIXELS, read_header

    if not data.startswith(b"\xff\xd8\xff"):
        return False
    # nvjpeg decodes a truncated JPEG without an error (measured on an H200, 2026-12-04: a photo cut to a third
    # came back "ok", its lower part grey), where the CPU decoder names it ``truncated``. So only a file that
    # ends with the JPEG's end marker goes to the GPU; a cut one, or one with a trailer after its image (some
    # cameras append one), stays on the CPU path, which labels it or gives its error row.
    if not data[-64:].rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9"):
        return False
    try:
        # every check of the CPU decoder (scans, pixels, aspect ratio, memory with a progressive JPEG's
        # coefficient buffer), at the full size: nvjpeg has no draft scale
        head = read_header(data, pre.max_pixels if pre is not None else DEFAULT_MAX_PIXELS)
        # nvjpeg does not apply a JPEG's orientation: torchvision's ``decode_jpeg`` applies EXIF orientation on
        # the CPU only (its CUDA op takes no such argument), so a phone photo of Orientation 6 came out of the GPU
        # sideways and was labelled on a turned picture. A rotated or flipped JPEG (``head.rotated``: the
        # orientation the CPU decoder applies, EXIF or XMP, as models/imagebytes.py reads it) therefore takes
        # the CPU path, which turns it exactly as every other path does; turning the tensor on the GPU instead
        # would need a second reading of the orientation to stay in step with Pillow's. Phones often store
        # portraits so (Orientation 6): each costs a CPU decode (bench/bench_gpu_photos.py includes some).
        return head.format == "JPEG" and head.mode in ("RGB", "L") and not head.rotated
    except Exception:  # noqa: BLE001 - any header problem: let the CPU decoder name the error
        return False


def resize_like_preprocess(img, pre):
    """A decoded uint8 (C, H, W) tensor on any device -> (uint8 (C, h, w) of the model's input size, geometry
    as in ``models.preprocess.decode``). Bilinear with antialiasing, as PIL's resize; pixel values may differ
    from the CPU path by a few levels (different JPEG IDCT and resampling kernels). Refuses the aspect ratios
    ``check_header`` refuses, which bounds the intermediate resized image of ``shorter_center_crop`` to
    ``MAX_ASPECT_RATIO * resize_shorter**2`` pixels (about 1 MP for HMTNet) whatever the input. (torch's
    ``interpolate`` has no source box, and resizing a cut of the original shifts the sampling grid, so the
    whole image is resized, as before.)"""
    import torch
    import torch.nn.functional as F

    from models.imagebytes import MAX_ASPECT_RATIO, ImageDecodeError

    H, W = pre.size
    _, oh, ow = img.shape
    if max(ow, oh) > MAX_ASPECT_RATIO * min(ow, oh):
        raise ImageDecodeError("too_large", f"{ow}x{oh}: aspect ratio {max(ow, oh) / min(ow, oh):.0f}:1 is over "
                                            f"the limit of {MAX_ASPECT_RATIO}:1")
    x = img.unsqueeze(0).float()
    geometry = {"width": ow, "height": oh}
    if pre.resize == "stretch":
        x = F.interpolate(x, size=(H, W), mode="bilinear", antialias=True, align_corners=False)
        geometry.update(sx=ow / W, sy=oh / H, tx=0.0, ty=0.0)
    else:
        shorter = pre.resize_shorter or min(H, W)
        s = shorter / min(ow, oh)
        rw, rh = max(W, round(ow * s)), max(H, round(oh * s))  # at most MAX_ASPECT_RATIO * shorter**2 pixels
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
        left, top = (rw - W) // 2, (rh - H) // 2
        x = x[:, :, top:top + H, left:left + W]
        sxr, syr = ow / rw, oh / rh
        geometry.update(sx=sxr, sy=syr, tx=left * sxr, ty=top * syr)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0], geometry


def _decode_jpegs(datas: list[bytes], grey: bool, device) -> list:
    """JPEG bytes -> per item a uint8 (C, H, W) tensor on ``device`` as stored (no orientation applied) or the
    RuntimeError nvjpeg raised: one ``decode_jpeg`` call for the batch, one per image when that call fails.
    Only upright JPEGs come here (:func:`jpeg_for_gpu`); the orientation is not asked for on any device, as
    nvjpeg cannot apply it (torchvision: "only implemented for JPEG format on CPU"), so that the CPU tests of
    this function decode what the GPU decodes."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if grey else ImageReadMode.RGB
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return decode_jpeg(tensors, mode=mode, device=device)
    except RuntimeError:
        decoded = []
        for t in tensors:
            try:
                decoded.append(decode_jpeg(t, mode=mode, device=device))
            except RuntimeError as e:
                decoded.append(e)
        return decoded


def gpu_decode_batch(datas: list[bytes], pre, device) -> list:
    """Upright JPEG bytes (:func:`jpeg_for_gpu`) -> per item ``(uint8 (C, h, w) tensor on device, geometry)`` or
    an Exception."""
    out = []
    for d in _decode_jpegs(datas, pre.channels == 1, device):
        try:
            out.append(d if isinstance(d, Exception) else resize_like_preprocess(d, pre))
        except (RuntimeError, ValueError) as e:  # ImageDecodeError is a ValueError: the CPU decoder names it
            out.append(e)
    return out


def gpu_decode_photos(datas: list[bytes], max_side: int, device) -> list:
    """Upright JPEG bytes (:func:`jpeg_for_gpu`) -> per item ``(uint8 RGB (3, h, w) tensor on device, (width,
    height) of the original, scale)`` as ``models.preprocess.decode_photo`` returns them, or an Exception. The
    whole JPEG is decoded (nvjpeg has no draft mode: a 24 MP photo is 72 MB on the GPU for a moment), then
    shrunk by area averaging to the size the CPU decoder gives (``models.photo.photo_size``: at most
    ``max_side``); the sizes and the scale equal the CPU decoder's, the pixels differ by about 2 grey levels on
    average after a shrink (other IDCT and resampling kernels; measured in docs/benchmarks.md)."""
    import torch
    import torch.nn.functional as F

    from models.photo import photo_size

    out = []
    for d in _decode_jpegs(datas, False, device):
        if isinstance(d, Exception):
            out.append(d)
            continue
        h, w = d.shape[-2:]
        img = d
        tw, th = photo_size(int(w), int(h), max_side)  # the CPU decoder's size: its DCT scale, then max_side
        if (th, tw) != (h, w):
            img = F.interpolate(d[None].float(), size=(th, tw), mode="area")[0]
            img = img.round_().clamp_(0, 255).to(torch.uint8)
        out.append((img, (int(w), int(h)), max(h, w) / max(img.shape[-2:])))
    return out


def _on_device(batch: dict, raw: list, on_device, on_cpu):
    """Yield ``(row, result)`` for every row with bytes in ``raw``: ``on_device``'s result (one call for all
    of them), or ``on_cpu``'s for a JPEG nvjpeg refused (for every row when ``on_device`` is None); a row
    neither can decode becomes its error row in ``batch`` (the CPU decoder's kind and message) and is not
    yielded. Any other exception of the CPU decoder is a ``decode_error`` row, as in the CPU tasks
    (``facedata.decode.fail_decode``, which ``decode_into`` uses too)."""
    from facedata.decode import fail_decode

    idx = [i for i, d in enumerate(raw) if d is not None]
    datas = [bytes(raw[i]) for i in idx]
    results = on_device(datas) if on_device is not None else [None] * len(datas)
    for i, data, res in zip(idx, datas, results):
        if res is None or isinstance(res, Exception):
            try:
                res = on_cpu(data)
            except Exception as e:  # noqa: BLE001 - every failure is this row's error (fail_decode)
                fail_decode(batch, i, e)
                continue
        yield i, res


def _writable(batch: dict, arrays: tuple, lists: tuple) -> dict:
    """A new dict of ``batch`` whose columns this module writes are copies (Ray's may be read-only)."""
    batch = dict(batch)
    for k in arrays:
        batch[k] = np.array(batch[k], copy=True)
    for k in lists:
        batch[k] = list(batch[k])
    return batch


def images_on_device(batch: dict, raw: list, pre, device) -> dict:
    """A decoded whole-image batch (facedata/decode.py, one model input ``pre``) whose rows with bytes in
    ``raw`` are decoded on ``device`` by :func:`gpu_decode_batch` into ``image_0`` (then one tensor on the
    device); the other rows keep what the CPU stage decoded or why it failed. A JPEG nvjpeg refuses goes through
    the CPU decoder (``models.preprocess.decode``), which gives its input or its error row. Returns a new dict."""
    import torch

    from facedata.decode import GEOMETRY_KEYS
    from models.preprocess import decode

    batch = _writable(batch, ("ok", "error_kind", "error_message", "width", "height", "geometry_0"), ())
    images = torch.tensor(np.asarray(batch["image_0"]), device=device)  # the CPU-decoded rows, on the device

    def on_cpu(data):
        t, g = decode(data, pre)
        return t.to(device), g

    for i, (img, g) in _on_device(batch, raw, lambda datas: gpu_decode_batch(datas, pre, device), on_cpu):
        images[i] = img
        batch["ok"][i], batch["width"][i], batch["height"][i] = True, g["width"], g["height"]
        batch["geometry_0"][i] = [g[k] for k in GEOMETRY_KEYS]
    batch["image_0"] = images
    return batch


def photos_on_device(batch: dict, raw: list, max_side: int, device, torch_decode: bool | None = None) -> dict:
    """A decoded photo batch (facedata/decode.py) whose rows with bytes in ``raw`` (the CPU stage's
    ``jpeg_bytes``; None elsewhere) are decoded here into ``image`` (then a list of pictures of any size, these
    ones ``(h, w, 3)`` views of tensors on ``device``); the other rows keep what the CPU stage decoded or why it failed.

    ``torch_decode`` (default: on a GPU only): :func:`gpu_decode_photos` (nvjpeg on a GPU); a JPEG it refuses
    goes through the CPU decoder, which gives its picture or its error row. Otherwise (``--actor-decode`` on a
    CPU) every JPEG goes through the CPU stage's own ``decode_photo``, whose JPEG draft mode decodes a 12 MP
    phone photo at half size: torchvision's CPU decoder has none and decoded it whole, which made the job 2.2x
    slower on such photos than decoding in tasks (docs/benchmarks.md, "Camera-sized photos"). Returns a new
    dict; ``batch``'s arrays are not written (Ray's may be read-only)."""
    import torch

    from models.preprocess import decode_photo

    batch = _writable(batch, ("ok", "width", "height", "scale"), ("error_kind", "error_message"))
    images = list(batch["image"])

    def on_cpu(data):
        t, size, scale = decode_photo(data, max_side)
        return t.to(device), size, scale

    if torch_decode is None:
        torch_decode = torch.device(device).type == "cuda"
    on_device = (lambda datas: gpu_decode_photos(datas, max_side, device)) if torch_decode else None
    for i, (img, (w, h), scale) in _on_device(batch, raw, on_device, on_cpu):
        images[i], batch["scale"][i] = img.permute(1, 2, 0), scale  # (h, w, 3), as the batch holds pictures
        batch["ok"][i], batch["width"][i], batch["height"][i] = True, w, h
    batch["image"] = images
    return batch
