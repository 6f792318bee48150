"""The landmark output: points regressed in the model's input frame and mapped back to the image's pixels
(DMM-CNN's 5 or 68 points). One of the output kinds of models/outputs.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from .losses import valid_rows
from .outputs import Output

LANDMARK_SCALES = ("signed", "unit")
FLIP_5 = (1, 0, 2, 4, 3)  # a mirrored face's 5 points: the eyes and the mouth corners change places


@dataclass(frozen=True)
class Landmarks(Output):
    """T facial points regressed with MSE (DMM-CNN Eq. 1). The raw output (B, 2T) and the targets are in the
    model input's coordinates scaled by ``scale``: ``signed`` (default) maps the input's width and height to
    [-1, 1] (``2x/W − 1``, ``2y/H − 1``), the range of the ±1 attribute targets the same loss sums with;
    ``unit`` maps them to [0, 1]. :meth:`normalise` turns pixel targets into these units; ``to_columns`` maps the
    points back to pixels of the original image through each row's preprocessing geometry (``sx, sy, tx, ty``)
    or, for a face aligned in a photo, its 2x3 ``affine`` map from input to original pixels. Metric: mean
    point error in units of the input's size (``mean_error``: x/W, y/H, whatever the scale) and ``nme``
    (divided by the inter-ocular distance when T == 5)."""

    points: int = 5
    scale: str = "signed"
    kind = "landmarks"

    def __post_init__(self):
        if self.scale not in LANDMARK_SCALES:
            raise ValueError(f"{self.name}: landmark scale must be one of {LANDMARK_SCALES}, got {self.scale!r}")

    @property
    def _span(self) -> float:
        return 2.0 if self.scale == "signed" else 1.0

    @property
    def _offset(self) -> float:
        return -1.0 if self.scale == "signed" else 0.0

    def normalise(self, points, geometry: list[dict]):
        """(B, 2T) pixel coordinates of the original images -> the model's target units (a new array)."""
        out = np.array(points, dtype=np.float32, copy=True)
        for r, g in enumerate(geometry):
            x, y = out[r, 0::2].astype(np.float64), out[r, 1::2].astype(np.float64)
            if "affine" in g:  # an aligned face: invert its input -> original map
                a = np.linalg.inv(np.vstack([np.reshape(g["affine"], (2, 3)), [0, 0, 1]]))
                u, v = a[0, 0] * x + a[0, 1] * y + a[0, 2], a[1, 0] * x + a[1, 1] * y + a[1, 2]
            else:
                u, v = (x - g["tx"]) / g["sx"], (y - g["ty"]) / g["sy"]
            out[r, 0::2] = u / g["input_w"] * self._span + self._offset
            out[r, 1::2] = v / g["input_h"] * self._span + self._offset
        return out

    def loss(self, raw, target):
        # Eq. 1: squared L2 norm of the 2T-vector, averaged over images.
        return ((raw.float() - target) ** 2).sum(1).mean()

    def stats(self, raw, target, **ctx):
        keep = valid_rows(target)
        raw, y = raw[keep].float(), target[keep].float()
        n = torch.tensor(float(len(y)), dtype=torch.float64)
        if len(y) == 0:
            z = torch.zeros((), dtype=torch.float64)
            return {"n": n, "err": z, "nme": z.clone(), "loss_sum": z.clone()}
        p, t = raw.reshape(len(y), -1, 2) / self._span, y.reshape(len(y), -1, 2) / self._span
        err = (p - t).norm(dim=2).mean(1)
        if self.points == 5:
            iod = (t[:, 0] - t[:, 1]).norm(dim=1).clamp_min(1e-6)
            nme = err / iod
        else:
            nme = err
        return {"n": n, "err": err.double().sum(), "nme": nme.double().sum(),
                "loss_sum": ((raw - y) ** 2).sum(1).double().sum()}

    def metrics(self, s):
        n = float(s["n"])
        if n == 0:
            return {}
        return {f"{self.name}.mean_error": float(s["err"]) / n, f"{self.name}.nme": float(s["nme"]) / n,
                f"{self.name}.loss": float(s["loss_sum"]) / n}

    def fields(self):
        return [pa.field(self.name, pa.list_(pa.float32()))]

    def to_columns(self, raw, geometry=None, **ctx):
        pts = raw.float().reshape(raw.shape[0], -1, 2)
        rows = []
        for i in range(pts.shape[0]):
            g = geometry[i] if geometry else None
            if g is None:
                rows.append(pts[i].reshape(-1).tolist())
                continue
            u = (pts[i, :, 0].double() - self._offset) / self._span * g["input_w"]
            v = (pts[i, :, 1].double() - self._offset) / self._span * g["input_h"]
            if "affine" in g:  # an aligned face: input pixel -> original pixel by a 2x3 map (faces/align.py)
                a = g["affine"]
                x, y = a[0] * u + a[1] * v + a[2], a[3] * u + a[4] * v + a[5]
            else:
                x, y = u * g["sx"] + g["tx"], v * g["sy"] + g["ty"]
            rows.append(torch.stack([x, y], 1).reshape(-1).tolist())
        return {self.name: rows}

    def unmirror(self, raw):
        """Points read on the mirrored input -> the same points on the input: x mirrored about the centre
        (``x.flip(-1)`` maps ``2x/W - 1`` to its negative, grid_sample's convention with align_corners=False),
        the left and right points swapped. Only 5 points have a known left/right order."""
        if self.points != 5:
            raise ValueError(f"{self.name} has {self.points} points, whose left/right order is not known: only "
                             "a model with 5-point landmarks can be read with its mirror image")
        pts = raw.reshape(raw.shape[0], -1, 2)[:, list(FLIP_5)].clone()
        pts[..., 0] = -pts[..., 0] if self.scale == "signed" else 1.0 - pts[..., 0]
        return pts.reshape(raw.shape)

    def _describe(self):
        return {"points": self.points, "scale": self.scale}

