"""One function from image bytes to model input, shared by training, evaluation, labeling and serving.

``decode(data, pre)`` turns bytes into a ``uint8`` tensor (C, H, W) of the model's input size plus the
geometry that maps input pixels back to the original image (for landmarks in pixels). Normalisation
(``normalize``) is a separate, batched step so that it can run where the model runs (on the GPU in the
label job) and so that uint8, four times smaller than float32, is what travels between processes.

The bytes come from strangers: they are opened by models/imagebytes.py (``open_image``), which bounds what
one image may cost before its pixels are decoded and raises ``ImageDecodeError`` (a ``kind`` among
``empty``, ``not_image``, ``truncated``, ``too_large`` and ``decode_error``) for every failure: the label
job turns it into an error row and the serving endpoint into a 4xx answer. No resize here builds an image
bigger than the model's input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image

from .imagebytes import (
    DEFAULT_MAX_DECODE_BYTES,
    DEFAULT_MAX_PIXELS,
    open_image,
)
from .photo import DEFAULT_PHOTO_SIDE, decode_photo_pixels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    # Test-time mirror averaging: the model reads each face and its mirror image and its raw outputs are
    # averaged, the mirrored pass's mapped back first (landmarks: x mirrored, left and right points swapped;
    # models/outputset.py ``mirror_average``). Twice the model's work, never in training; set by a model's
    # recipe where it was measured to help (docs/results.md) or ``--model-arg mirror=true``, and kept in the
    # checkpoint, so that label, serve and evaluate read every face the same way.
    mirror: bool = False

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


# Bounds on a preprocessing read from a checkpoint (models/checkpoint.py; a file's config and template are
# anyone's edit, its hash re-signed: audit). Input sides: the zoo's are 50 (hard_sharing) to 224 px, 227 for
# HMTNet's shorter side; 1024 leaves room for a model trained at 4x that while refusing the 100000 px side whose
# warm-up batch was 60 GB (a 1024 px batch of 2 is 6 MB of uint8). resize_shorter is a shade over a side
# (227 for 224), bounded at twice it. Template crops: the training crops the template was measured on, 178x218
# (CelebA) to a few hundred px (UTKFace 200, SCUT-FBP5500 350); 4096 is any photo's face crop, and 16 px is the
# least that holds a face's 5 points apart. The eyes: 0.22 (CelebA's crops) to 0.35 (dlib's chip) of the width
# in the zoo's templates; under 0.05 the similarity fitted to them is ill-conditioned (coincident points: none).
MAX_INPUT_SIDE = 1024
MIN_CROP_SIDE, MAX_CROP_SIDE = 16, 4096
MIN_EYE_SHARE = 0.05


def _sides(value, low: int, high: int, what: str) -> tuple[int, ...]:
    sides = tuple(value)
    if len(sides) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in sides):
        raise ValueError(f"{what} must be two integers {low}-{high} (H, W), got {value!r}")
    return sides


def check_bounds(pre: Preprocessing) -> None:
    """Raise ValueError unless ``pre`` (from a checkpoint) is in the bounds above: input sides, the template's
    crop, and a template of 5 finite points inside the input (its frame: input pixels), the image-left eye left
    of the image-right one, the eyes above the mouth corners and at least :data:`MIN_EYE_SHARE` of the input's
    width apart. For a stretch (all of the zoo but HMTNet's centre crop) the input is the training crop scaled,
    so these hold in the crop's frame alike. A template out of them crashed alignment (a crop of 0 or 3 sides)
    or made silent garbage (NaN, one point 5 times: audit)."""
    h, w = _sides(pre.size, 1, MAX_INPUT_SIDE, "the input size")
    if pre.resize_shorter is not None and not (isinstance(pre.resize_shorter, int)
                                                and 1 <= pre.resize_shorter <= 2 * MAX_INPUT_SIDE):
        raise ValueError(f"resize_shorter must be an integer 1-{2 * MAX_INPUT_SIDE}, got {pre.resize_shorter!r}")
    if pre.template_crop is not None:
        _sides(pre.template_crop, MIN_CROP_SIDE, MAX_CROP_SIDE, "template_crop")
    if pre.template is None:
        return
    pts = np.asarray(pre.template, dtype=np.float64)
    if pts.shape != (5, 2) or not np.isfinite(pts).all():
        raise ValueError(f"a face template is 5 finite (x, y) points, got {pre.template!r}")
    if (pts < 0).any() or (pts[:, 0] > w).any() or (pts[:, 1] > h).any():
        raise ValueError(f"the face template {pre.template!r} is not inside the {w}x{h} input")
    (lx, ly), (rx, ry) = pts[0], pts[1]
    if rx <= lx or max(ly, ry) >= pts[3:, 1].min() or np.hypot(rx - lx, ry - ly) < MIN_EYE_SHARE * w:
        raise ValueError(f"the face template {pre.template!r} is degenerate: its eyes must be in order, above the "
                         f"mouth and at least {MIN_EYE_SHARE:.0%} of the input's width apart")


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


def photo_tensor(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(h, w, 3)`` pixels (:func:`decode_photo_pixels`, or a decoded batch's ``image``) -> the uint8
    ``(3, h, w)`` tensor that detection and alignment read, in HWC memory (``permute``: a view, channels-last
    strides). An array is copied once, into memory torch may write (Pillow's and Ray's are read-only); a
    tensor (one the label job's actor decoded on its device) is only viewed."""
    if isinstance(pixels, torch.Tensor):
        return pixels.permute(2, 0, 1)
    return torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def decode_photo(data: bytes, max_side: int = DEFAULT_PHOTO_SIDE,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, tuple[int, int], float]:
    """Photo bytes -> ``(uint8 RGB (3, h, w) tensor, (width, height) of the upright original, scale)``:
    :func:`decode_photo_pixels` as a tensor (:func:`photo_tensor`: HWC memory seen as CHW)."""
    arr, size, scale = decode_photo_pixels(data, max_side, max_pixels)
    return photo_tensor(arr), size, scale


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
