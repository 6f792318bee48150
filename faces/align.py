"""Alignment: a detected face -> the model's input, as the model's training faces looked.

Every model declares a face template in its preprocessing (``Preprocessing.template``): where the 5 points
(image-left eye, image-right eye, nose tip, image-left mouth corner, image-right mouth corner) sit in its
input. A face found in a photo is mapped onto it by one warp:

    model input pixel --G--> training-crop pixel --S--> photo pixel

* ``G`` is the model's own resize of its training crops (``models.preprocess.decode``'s geometry: a stretch,
  or HMTNet's shorter-side resize and centre crop), for crops of ``Preprocessing.template_crop`` (H, W). The
  face is aligned in the frame of the training crops, not of the model input, because a stretch (CelebA's
  178x218 crops to a square input) is not a similarity: fitting a similarity to the stretched points would
  give the model faces of another aspect ratio than it learned from. With ``template_crop`` None the crop is
  the input (``G`` is the identity).
* ``S`` is the least-squares similarity (rotation, uniform scale, translation; Umeyama 1991) that carries the
  template's points, in crop pixels, onto the detected points.

The composed affine map is applied with ``affine_grid`` / ``grid_sample`` (bilinear) on the device the
image is on. When the face is much larger than the model input (a 600 px face to a 50 px input), bilinear
sampling alone would alias, unlike the area-averaging resize the training crops had: the image is first
halved (2x2 average) until the sampling step is at most 2 source pixels, a mip-map level per image computed
only when a face needs it. Only the part of the photo that the crops read is converted and halved (with a
margin, on the pyramid's pixel grid), unless that part is most of the photo: a portrait's one face does not pay
for a float copy of a whole 12 MP photo; the crops equal those of the whole photo to one grey level where the
float32 sampling grid rounds otherwise (tests/test_align.py).

Coordinates are continuous pixels: pixel ``i`` covers ``[i, i + 1)``, so its centre is ``i + 0.5``; this is
the convention of ``decode``'s geometry (``x * sx + tx``) and of ``grid_sample`` with ``align_corners=False``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.preprocess import Preprocessing

# insightface's ArcFace template (112x112), the usual 5-point layout of a tightly cropped aligned face; used,
# with margin, only for a model that has no template of its own (see default_template).
ARCFACE_112 = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041))


def default_template(pre: Preprocessing) -> tuple[tuple[float, float], ...]:
    """The template of a model whose checkpoint has none (trained before templates existed, or built with
    ``create_model`` and never trained): ArcFace's 112 px layout with a 1.25x margin (the face fills about
    80 % of the crop, as in CelebA's and UTKFace's aligned crops), scaled to the model's input."""
    h, w = pre.size
    m = 1.25
    return tuple(((x - 56.0) / m / 112.0 * w + w / 2, (y - 56.0) / m / 112.0 * h + h / 2) for x, y in ARCFACE_112)


def template_of(pre: Preprocessing) -> torch.Tensor:
    """The model's template in input pixels, (5, 2) float64."""
    return torch.tensor(pre.template if pre.template is not None else default_template(pre), dtype=torch.float64)


def input_to_crop(pre: Preprocessing) -> torch.Tensor:
    """``G``: the (3, 3) affine map from model-input pixels to training-crop pixels (the geometry of
    ``models.preprocess.decode`` for a crop of ``pre.template_crop``); the identity without a crop size."""
    G = torch.eye(3, dtype=torch.float64)
    if pre.template_crop is None:
        return G
    H, W = pre.size
    ch, cw = pre.template_crop
    if pre.resize == "stretch":
        G[0, 0], G[1, 1] = cw / W, ch / H
        return G
    shorter = pre.resize_shorter or min(H, W)
    s = shorter / min(cw, ch)
    rw, rh = max(W, round(cw * s)), max(H, round(ch * s))
    left, top = (rw - W) // 2, (rh - H) // 2
    sx, sy = cw / rw, ch / rh
    G[0, 0], G[1, 1], G[0, 2], G[1, 2] = sx, sy, left * sx, top * sy
    return G


def similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transforms carrying ``src`` onto ``dst`` (Umeyama 1991, no reflection).

    ``src`` (K, P, 2) or (P, 2), ``dst`` (K, P, 2) -> (K, 3, 3) matrices ``T`` with ``dst ~ T @ [src, 1]``."""
    src, dst = src.double(), dst.double()
    if src.dim() == 2:
        src = src.expand(dst.shape[0], -1, -1)
    k, p, _ = dst.shape
    mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    a, b = src - mu_s, dst - mu_d
    var_s = (a ** 2).sum((1, 2)) / p
    cov = b.transpose(1, 2) @ a / p  # (K, 2, 2)
    U, S, Vh = torch.linalg.svd(cov)
    d = torch.ones(k, 2, dtype=src.dtype, device=src.device)
    d[:, 1] = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vh))
    d[d[:, 1] == 0, 1] = 1.0
    R = U @ torch.diag_embed(d) @ Vh
    scale = (S * d).sum(1) / var_s.clamp_min(1e-12)
    T = torch.zeros(k, 3, 3, dtype=src.dtype, device=src.device)
    T[:, :2, :2] = scale[:, None, None] * R
    T[:, :2, 2] = mu_d[:, 0] - (scale[:, None, None] * R @ mu_s.transpose(1, 2))[:, :, 0]
    T[:, 2, 2] = 1.0
    return T


def input_to_image(points: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """Detected points (K, 5, 2) in image pixels (any device) -> (K, 3, 3) float64 CPU affine maps from the
    model's input pixels to image pixels (``S @ G``, see the module docstring).

    Computed on the CPU wherever the image is: K 2x2 SVDs and determinants are microseconds there, while on
    a GPU each batched call is a cuSOLVER launch and a sync (the quality crops and every template's alignment
    of a photo each paid one)."""
    G = input_to_crop(pre)
    crop_template = (G[:2, :2] @ template_of(pre).T).T + G[:2, 2]
    S = similarity(crop_template, points.detach().double().cpu())
    return S @ G


def _halve(img: torch.Tensor) -> torch.Tensor:
    """(C, H, W) float -> the 2x2 area average (odd edges padded by replication)."""
    h, w = img.shape[-2:]
    if h % 2 or w % 2:
        img = F.pad(img[None], (0, w % 2, 0, h % 2), mode="replicate")[0]
    return F.avg_pool2d(img[None], 2)[0]


def pyramid_levels(maps: torch.Tensor) -> list[int]:
    """Each map's pyramid level: how many times the image is halved before sampling, so that one output pixel
    spans at most 2 source pixels (the map's scale, its sampling step)."""
    steps = torch.sqrt(torch.abs(torch.linalg.det(maps.double()[:, :2, :2]))).tolist()
    return [math.ceil(math.log2(s / 2.0)) if s > 2.0 else 0 for s in steps]


REGION_WHOLE = 0.5  # warp() samples the whole photo once the faces' region covers this share of it


def _region(maps: torch.Tensor, size: tuple[int, int], image_hw, level: int) -> tuple[int, int, int, int]:
    """The part of the image (x0, y0, x1, y1) that the crops of ``maps`` read, at pyramid levels up to
    ``level``: every output pixel's bilinear neighbours, with a margin of two pixels of the coarsest level, its
    sides on multiples of ``2 ** level`` (or the image's own edges) so that every halving of it averages the
    same 2x2 pixels as the whole image's would. Converting only that part to floats, and halving only it, is
    what a photo of a few faces needs (a 2016 px photo's float copy alone took about 10 ms on a CPU); the whole
    image when the part is most of it."""
    out_h, out_w = size
    h, w = int(image_hw[0]), int(image_hw[1])
    corners = torch.tensor([[0.0, 0.0, 1.0], [out_w, 0.0, 1.0], [0.0, out_h, 1.0], [out_w, out_h, 1.0]],
                           dtype=torch.float64)
    pts = (maps @ corners.T)[:, :2]  # (K, 2, 4): where each crop's corners fall in the image
    g = 2 ** level
    margin = 2 * g + 1
    lo = (pts.amin((0, 2)) - margin).floor().tolist()
    hi = (pts.amax((0, 2)) + margin).ceil().tolist()
    x0, y0 = max(0, int(lo[0]) // g * g), max(0, int(lo[1]) // g * g)
    x1 = min(w, x0 + -(-(int(hi[0]) - x0) // g) * g)
    y1 = min(h, y0 + -(-(int(hi[1]) - y0) // g) * g)
    if x1 <= x0 or y1 <= y0 or (x1 - x0) * (y1 - y0) >= REGION_WHOLE * w * h:
        return 0, 0, w, h
    return x0, y0, x1, y1


def warp(image: torch.Tensor, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sample ``len(maps)`` crops of ``size`` (H, W) from one image.

    ``image``: uint8 or float (C, H, W); ``maps``: (K, 3, 3) affine maps from output pixels to image pixels
    (best on the CPU: the sampling grids' parameters are computed there and cross to the image's device in one
    copy per pyramid level). Returns uint8 (K, C, H, W) on the image's device. Outside the image the edge pixels are repeated: a face
    at a photo's edge (or a data set's tight crop) then shows no black band, which no training crop had
    (measured: zero padding cost hard_sharing 2.4 points of gender accuracy through detection, docs/results.md)."""
    out_h, out_w = size
    k = maps.shape[0]
    c = image.shape[0]
    if k == 0:
        return torch.zeros((0, c, out_h, out_w), dtype=torch.uint8, device=image.device)
    maps = maps.detach().double().cpu()
    levels = pyramid_levels(maps)
    x0, y0, x1, y1 = _region(maps, (out_h, out_w), image.shape[-2:], max(levels))
    if (x0, y0, x1, y1) != (0, 0, image.shape[-1], image.shape[-2]):  # the faces' part of the photo only
        image = image[:, y0:y1, x0:x1]
        maps = torch.tensor([[1.0, 0, -x0], [0, 1.0, -y0], [0, 0, 1.0]], dtype=torch.float64) @ maps
    src = image.float()
    pyramid = {0: src}
    out = torch.empty((k, c, out_h, out_w), dtype=torch.uint8, device=image.device)
    for level in sorted(set(levels)):
        while level not in pyramid:
            top = max(pyramid)
            pyramid[top + 1] = _halve(pyramid[top])
        img = pyramid[level]
        idx = [i for i, lv in enumerate(levels) if lv == level]
        f = 2.0 ** level
        ih, iw = img.shape[-2:]
        # output pixel -> level-`level` pixel, then both sides to grid_sample's [-1, 1] (align_corners=False)
        to_level = torch.diag(torch.tensor([1 / f, 1 / f, 1.0], dtype=torch.float64))
        from_norm = torch.tensor([[out_w / 2, 0, out_w / 2], [0, out_h / 2, out_h / 2], [0, 0, 1]],
                                 dtype=torch.float64)
        to_norm = torch.tensor([[2 / iw, 0, -1], [0, 2 / ih, -1], [0, 0, 1]], dtype=torch.float64)
        theta = (to_norm @ to_level @ maps[idx] @ from_norm)[:, :2].float().to(image.device)
        grid = F.affine_grid(theta, [len(idx), c, out_h, out_w], align_corners=False)
        sampled = F.grid_sample(img[None].expand(len(idx), -1, -1, -1), grid, mode="bilinear",
                                padding_mode="border", align_corners=False)
        out[idx] = sampled.round_().clamp_(0, 255).to(torch.uint8)
    return out


def align(image: torch.Tensor, points: torch.Tensor, pre: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's detected faces -> ``(uint8 (K, C, H, W) model inputs, (K, 3, 3) input->image maps)``.

    ``image`` uint8 (3, H, W) RGB or (1, H, W) grey (the detector takes both) on any device; ``points``
    (K, 5, 2) in the image's pixels; the maps are float64 on the CPU. The crops have the model's channels: a
    grey model (``pre.channels == 1``) gets the luma of an RGB crop (ITU-R 601, as PIL's ``convert("L")``),
    an RGB model the grey crop in all three channels (as PIL's ``convert("RGB")`` of a grey photo, which is
    how ``models.preprocess.decode`` gives it a grey file)."""
    maps = input_to_image(points, pre)
    crops = warp(image, maps, pre.size)
    if pre.channels == 1 and crops.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], device=crops.device).view(1, 3, 1, 1)
        crops = (crops.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    elif pre.channels == 3 and crops.shape[1] == 1:
        crops = crops.expand(-1, 3, -1, -1).contiguous()  # warped once, copied after: the cheaper order
    return crops, maps
