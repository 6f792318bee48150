"""Training augmentation in the aligned frame, on the device, a batch at a time (issue #19).

The model's input is the aligned face (``--faces detect`` / ``landmarks``: warped onto the model's
template; ``--faces whole``: the data set's own aligned crop), so every augmentation here works in that
frame, on the uint8 batch where the model runs (the GPU in a Ray Train worker), after the batch left Ray
Data and before ``prepare``:

* a small random similarity per image: rotation (± ``rotation`` degrees), scale (1 ± ``scale``), shift
  (± ``shift`` of the width and height), and a horizontal flip with probability ``hflip``, all in one
  bilinear resampling with the edge pixels repeated outside the image (as faces/align.py warps);
* brightness (a factor in 1 ± ``brightness``), contrast (blend with the image's mean grey, 1 ± ``contrast``),
  saturation (blend with its grey, RGB only) and hue (a turn of ± ``hue`` of the chroma plane in YIQ, RGB
  only), in that order;
* a Gaussian blur with probability ``blur``, sigma uniform in [0.3, ``blur_sigma``] input pixels;
* random erasing (Zhong et al., "Random Erasing Data Augmentation", 2017) with probability ``erase``: one
  rectangle of 2 % to ``erase_area`` of the image, its aspect ratio log-uniform in [0.3, 3.3] (the paper's
  values), filled with the image's mean colour (the paper fills with noise; a flat patch adds no texture the
  model could read), last, after the colours. It hides a part of the face, so that no one cue (hair, a cap,
  glasses) carries a label alone. Landmark targets do not move.

Targets move with the pixels: landmark targets (``models.outputs.Landmarks``, in the input's units) go
through the same similarity, and a flip also swaps the left and right points (image-left eye <-> image-right
eye, mouth corners; 5-point landmarks: :data:`FLIP_5`). A model with landmarks of another count has no
known left/right order: a flip is refused for it (:meth:`Augment.check`). No label of the zoo names a side
of the face (CelebA's 40 attributes, gender, age, race, smile, beauty are all symmetric), so no class label
changes under a flip.

A recipe's ``augment`` dict (``models.base.Recipe``, set per model, kept in every checkpoint's
``extra["recipe"]`` and, resolved, ``extra["augment"]``) is read by :meth:`Augment.from_recipe`. Two keys
expand into the fields above: ``align_jitter`` K (the measured spread between a data set's own alignment and
the detector's, faces/align.py and docs/faces.md: 3 K degrees, 3 K % shift, 7 K % scale) and ``color_jitter``
J (brightness, contrast and saturation J, hue J/4). ``random_crop`` is the decode's crop out of HMTNet's
227 px margin (``models.preprocess.build_augmentation``, on the CPU), not an augmentation of this module.
Evaluation never calls it: ``core.engine.train_step`` is the only caller.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from models.landmarks import FLIP_5, Landmarks

CPU_KEYS = ("random_crop",)  # recipe keys that the decode applies, not this module
_LIMITS = {"hflip": 1.0, "rotation": 45.0, "shift": 0.25, "scale": 0.5, "brightness": 1.0, "contrast": 1.0,
           "saturation": 1.0, "hue": 0.5, "blur": 1.0, "blur_sigma": 8.0, "erase": 1.0, "erase_area": 0.8}
_LOWER = {"blur_sigma": 0.3, "erase_area": 0.02}  # the other fields start at 0
_SIZES = ("blur_sigma", "erase_area")  # sizes of an augmentation, not whether it happens
# The keys that expand into the fields: key -> {field: amount per unit of the key} (the module docstring)
_EXPANDS = {"align_jitter": {"rotation": 3.0, "shift": 0.03, "scale": 0.07},
            "color_jitter": {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.25}}
_FLAGS = {"align_jitter": "--align-jitter K or --augment align_jitter=K", "color_jitter": "--augment color_jitter=J"}
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)


@dataclass(frozen=True)
class Augment:
    hflip: float = 0.0
    rotation: float = 0.0
    shift: float = 0.0
    scale: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    blur: float = 0.0
    blur_sigma: float = 1.0
    erase: float = 0.0
    erase_area: float = 0.4

    def __post_init__(self):
        for f in fields(self):
            _check_field(f.name, getattr(self, f.name))

    @classmethod
    def from_recipe(cls, augment: dict | None) -> Augment:
        """A recipe's ``augment`` dict -> the augmentation (see the module docstring); unknown keys fail."""
        d = dict(augment or {})
        for k in CPU_KEYS:
            d.pop(k, None)
        out = {f.name: 0.0 for f in fields(cls)}
        for key in _SIZES:
            out[key] = getattr(cls, key)
        jitters = {key: d.pop(key, 0) or 0 for key in _EXPANDS}
        unknown = sorted(set(d) - set(out))
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown}; known: "
                             f"{sorted(set(out) | {'align_jitter', 'color_jitter', *CPU_KEYS})}")
        for key, v in d.items():
            _check_field(key, v)  # as given, before a jitter adds to it
            out[key] = float(v)
        for key, v in jitters.items():  # checked as given, before they expand into fields the user never named
            _check_jitter(key, v, out)
            for field_name, per_unit in _EXPANDS[key].items():
                out[field_name] += per_unit * float(v)
        return cls(**out)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self) if f.name not in _SIZES)

    @property
    def geometric(self) -> bool:
        return bool(self.hflip or self.rotation or self.shift or self.scale)

    def check(self, outputs) -> None:
        """Refuse a flip for a model whose landmarks have no known left/right order (not 5 points)."""
        for o in outputs:
            if isinstance(o, Landmarks) and self.hflip and o.points != 5:
                raise ValueError(f"augment hflip: {o.name} has {o.points} points, whose left/right order is not "
                                 f"known; only 5-point landmarks can be flipped (set hflip to 0)")

    # --- the batch ---------------------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, targets: dict[str, torch.Tensor], outputs,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """uint8 (B, C, H, W) and the batch's targets -> augmented copies (same dtype, shape, device)."""
        if not self.active or len(images) == 0:
            return images, targets
        x = images.float()
        targets = dict(targets)
        if self.geometric:
            A, flipped = self._similarities(x.shape[0], x.shape[-2:], x.device, generator)
            x = _resample(x, torch.linalg.inv(A))
            for o in outputs:
                if isinstance(o, Landmarks) and o.target_column in targets:
                    targets[o.target_column] = _move_points(targets[o.target_column], A, flipped, o)
        x = self._photometric(x, generator)
        if self.erase:
            x = self._erase(x, generator)
        return x.round_().clamp_(0, 255).to(torch.uint8), targets

    def _rand(self, n: int, device, generator) -> torch.Tensor:
        return torch.rand(n, device=device, generator=generator, dtype=torch.float64) * 2 - 1  # uniform [-1, 1)

    def _similarities(self, n: int, hw, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 3, 3) maps from the input's normalised coordinates ([-1, 1], grid_sample's with
        align_corners=False) to the augmented image's, and which images were flipped."""
        H, W = int(hw[0]), int(hw[1])
        flipped = torch.rand(n, device=device, generator=generator) < self.hflip
        theta = torch.deg2rad(self._rand(n, device, generator) * self.rotation)
        s = 1.0 + self._rand(n, device, generator) * self.scale
        tx, ty = self._rand(n, device, generator) * self.shift * 2, self._rand(n, device, generator) * self.shift * 2
        # in pixels about the centre: p' = s R(theta) F p + t; with normalised coordinates x_n = 2x/W - 1 the
        # rotation needs the aspect ratio (W/H) so that it stays a rotation of the pixels
        cos, sin = torch.cos(theta) * s, torch.sin(theta) * s
        f = torch.where(flipped, -1.0, 1.0).to(torch.float64)
        A = torch.zeros(n, 3, 3, dtype=torch.float64, device=device)
        A[:, 0, 0], A[:, 0, 1] = cos * f, -sin * H / W
        A[:, 1, 0], A[:, 1, 1] = sin * W / H * f, cos
        A[:, 0, 2], A[:, 1, 2], A[:, 2, 2] = tx, ty, 1.0
        return A, flipped

    def _photometric(self, x: torch.Tensor, generator) -> torch.Tensor:
        n, c = x.shape[:2]
        dev = x.device

        def factor(strength: float) -> torch.Tensor:
            return (1.0 + self._rand(n, dev, generator) * strength).float().view(n, 1, 1, 1)

        if self.brightness:
            x = x * factor(self.brightness)
        grey = (lambda t: (t * _YIQ[0].to(dev, t.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)) if c == 3 else (lambda t: t)
        if self.contrast:
            m = grey(x).mean((1, 2, 3), keepdim=True)
            x = (x - m) * factor(self.contrast) + m
        if c == 3 and self.saturation:
            g = grey(x)
            x = (x - g) * factor(self.saturation) + g
        if c == 3 and self.hue:
            a = (self._rand(n, dev, generator) * self.hue * 2 * math.pi)
            rot = torch.zeros(n, 3, 3, dtype=torch.float64, device=dev)
            rot[:, 0, 0] = 1.0
            rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = a.cos(), -a.sin(), a.sin(), a.cos()
            yiq = _YIQ.to(dev)
            m = (torch.linalg.inv(yiq) @ rot @ yiq).float()  # (n, 3, 3) RGB -> RGB
            x = torch.einsum("nij,njhw->nihw", m, x)
        x = x.clamp(0, 255)
        if self.blur:
            x = self._blur(x, generator)
        return x

    def _blur(self, x: torch.Tensor, generator) -> torch.Tensor:
        n, c, h, w = x.shape
        dev = x.device
        on = torch.rand(n, device=dev, generator=generator) < self.blur
        if not bool(on.any()):
            return x
        sigma = 0.3 + torch.rand(n, device=dev, generator=generator) * (self.blur_sigma - 0.3)
        r = max(1, math.ceil(3 * self.blur_sigma))
        r = min(r, (min(h, w) - 1) // 2) or 1
        k = torch.arange(-r, r + 1, device=dev, dtype=torch.float32)
        g = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None] ** 2))
        g = g / g.sum(1, keepdim=True)
        delta = (k == 0).float()[None].expand(n, -1)
        g = torch.where(on[:, None], g, delta)  # (n, 2r+1): the identity for images not blurred
        kern = g.repeat_interleave(c, 0)  # one kernel per (image, channel)
        y = x.reshape(1, n * c, h, w)
        y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), kern.view(n * c, 1, 1, -1), groups=n * c)
        y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), kern.view(n * c, 1, -1, 1), groups=n * c)
        return y.reshape(n, c, h, w)

    def _erase(self, x: torch.Tensor, generator) -> torch.Tensor:
        n, _, h, w = x.shape
        dev = x.device

        def u(lo: float, hi: float) -> torch.Tensor:
            return lo + torch.rand(n, device=dev, generator=generator, dtype=torch.float64) * (hi - lo)

        on = torch.rand(n, device=dev, generator=generator) < self.erase
        area = u(0.02, self.erase_area) * h * w
        ratio = torch.exp(u(math.log(0.3), math.log(3.3)))
        eh = torch.sqrt(area * ratio).clamp(1, h)
        ew = torch.sqrt(area / ratio).clamp(1, w)
        y0, x0 = u(0, 1) * (h - eh), u(0, 1) * (w - ew)
        rows = torch.arange(h, device=dev, dtype=torch.float64)[None]
        cols = torch.arange(w, device=dev, dtype=torch.float64)[None]
        inside_r = (rows >= y0[:, None]) & (rows < (y0 + eh)[:, None])  # (n, h)
        inside_c = (cols >= x0[:, None]) & (cols < (x0 + ew)[:, None])  # (n, w)
        mask = (inside_r[:, :, None] & inside_c[:, None, :] & on[:, None, None])[:, None]  # (n, 1, h, w)
        return torch.where(mask, x.mean((2, 3), keepdim=True), x)


def _resample(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Sample every image at ``inv`` (augmented normalised coordinates -> input's), bilinear, edges repeated."""
    grid = F.affine_grid(inv[:, :2].to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _move_points(target: torch.Tensor, A: torch.Tensor, flipped: torch.Tensor, o: Landmarks) -> torch.Tensor:
    """(B, 2T) landmark targets in the output's units -> where ``A`` puts them, left and right swapped in
    the flipped rows. Rows of NaN (no label) stay NaN."""
    n = target.shape[0]
    pts = target.double().reshape(n, -1, 2)
    if o.scale == "unit":
        pts = pts * 2 - 1
    moved = torch.einsum("nij,npj->npi", A[:, :2, :2], pts) + A[:, None, :2, 2]
    if o.points == 5 and bool(flipped.any()):
        moved = torch.where(flipped[:, None, None], moved[:, list(FLIP_5)], moved)
    if o.scale == "unit":
        moved = (moved + 1) / 2
    return moved.reshape(n, -1).to(target.dtype)


def _check_field(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"augment {name}: expected a number, got {v!r}")
    lo = _LOWER.get(name, 0.0)
    if not lo <= v <= _LIMITS[name]:
        raise ValueError(f"augment {name} must be between {lo:g} and {_LIMITS[name]:g}, got {v!r}")


def _check_jitter(key: str, value, fields_so_far: dict) -> None:
    """``align_jitter`` / ``color_jitter`` as the user gave them: a number >= 0 small enough that every field it
    adds to (with that field's own value) stays within its limit; the message names the key and its flag."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"augment {key} ({_FLAGS[key]}): expected a number, got {value!r}")
    room = min((_LIMITS[f] - fields_so_far[f]) / per_unit for f, per_unit in _EXPANDS[key].items())
    if not 0 <= value <= room:
        unit = _FLAGS[key].split()[-1].split("=")[-1]
        adds = ", ".join(f"{f} {per_unit:g} x {unit}" for f, per_unit in _EXPANDS[key].items())
        raise ValueError(f"augment {key} ({_FLAGS[key]}) must be between 0 and {max(room, 0):.3g} (it adds {adds} "
                         f"to the recipe's values, each within its limit), got {value!r}")
