"""``--gpu-decode``: JPEGs decoded on the predictor actor's GPU (``torchvision.io.decode_jpeg``), then resized
as ``models.preprocess.decode`` does. Split from raytasks/label/job.py (the pipeline); the CPU stage decides
which files may go (:func:`jpeg_for_gpu`), the actor decodes them (:func:`gpu_decode_batch`)."""

from __future__ import annotations

import io


def jpeg_for_gpu(data: bytes, pre) -> bool:
    """Whether a file can go to the GPU decoder: a baseline/progressive JPEG in RGB or grey (CMYK and YCCK
    JPEGs, other formats and anything PIL cannot parse the header of stay on the CPU path, which gives them
    their label or error row) within the CPU decoder's limits (pixels, aspect ratio, memory, JPEG scans)."""
    from PIL import Image

    from models.imagebytes import check_header, check_jpeg_bytes

    if not data.startswith(b"\xff\xd8\xff"):
        return False
    try:
        check_jpeg_bytes(data)  # the CPU decoder's scan limit: thousands of scans cost minutes on either
        img = Image.open(io.BytesIO(data), formats=["JPEG"])
        check_header(img, pre.max_pixels)  # the CPU decoder's limits (aspect ratio, memory): refused there
        return img.format == "JPEG" and img.mode in ("RGB", "L")
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


def gpu_decode_batch(datas: list[bytes], pre, device) -> list:
    """JPEG bytes -> per item ``(uint8 (C, h, w) tensor on device, geometry)`` or an Exception. Decodes the
    batch in one ``decode_jpeg`` call, falling back to one call per image when the batch call fails."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if pre.channels == 1 else ImageReadMode.RGB
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        decoded = decode_jpeg(tensors, mode=mode, device=device, apply_exif_orientation=True)
    except RuntimeError:
        decoded = []
        for t in tensors:
            try:
                decoded.append(decode_jpeg(t, mode=mode, device=device, apply_exif_orientation=True))
            except RuntimeError as e:
                decoded.append(e)
    out = []
    for d in decoded:
        try:
            out.append(d if isinstance(d, Exception) else resize_like_preprocess(d, pre))
        except (RuntimeError, ValueError) as e:  # ImageDecodeError is a ValueError: the CPU decoder names it
            out.append(e)
    return out
