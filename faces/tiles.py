"""Tiles, and the merge of what every view of an image found (faces/detect.py; docs/faces.md, "How detection
behaves").

* :func:`tile_views`: with ``DetectorConfig.tile`` > 0, the tiles of an image the letterbox shrinks, at the
  image's own resolution, overlapping by at least ``tile_overlap`` and spread evenly (:func:`tile_starts`).
  Each tile keeps only the boxes that stay clear of the borders it shares with another tile
  (:attr:`View.safe`): a face cut by such a border is found whole in the neighbouring tile (when it is at
  most ``tile_overlap - 2 * TILE_MARGIN`` wide) or in the letterbox (when it is larger).
* :func:`merge`: the candidates of every view (the letterbox, the tiles, their mirror images) -> the faces
  kept: NMS per image, then the part rule. A tile that holds only part of a large face (an eye, a mouth, the
  half of a face its border cuts a few pixels short of the margin) often finds that part as a face of its own,
  with a high score. Its box lies inside the whole face's box, but it is so much smaller that their IoU stays
  at 0.25-0.40, under ``nms_iou``, so NMS keeps both and the photo gets two or three rows for one person.
  So, after NMS, a box that lies at least :data:`PART_INSIDE` inside a higher-scored kept box found in
  *another* view of the image (another tile or the letterbox; a view and its mirror are one view) is part of
  that face and goes. Only kept, higher-scored boxes remove (greedy, as NMS): the faces above any threshold
  are the same whatever lower-scored candidates there are. A letterbox alone (tiles off, flip or not) is one
  view per image, so the rule never applies there and those faces are exactly what NMS kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TILE_MARGIN = 4  # pixels: a tile's detection this close to a border shared with another tile is dropped
# A kept box lying at least this fraction inside a higher-scored kept box of another view is part of that face
# and goes (module docstring). Measured on WIDER FACE and enlarged LFW portraits (docs/faces.md, "Tiles"):
# the part boxes lie 80-100 % inside the whole face's; two different faces lie this much inside each other
# almost never (after NMS at 0.4 the outer box is at least 1.45x the inner's area).
PART_INSIDE = 0.7
# A tile box larger than tile_overlap - 2 * TILE_MARGIN (a face no tile is sure to hold whole) goes when it comes
# within this fraction of its size of a shared border: a face cut there is seen as the part the tile holds, whose
# box the network often stops well short of the cut (a quarter of its height, on WIDER); the letterbox, where such
# a face is large, finds it whole (measured: docs/faces.md, "Tiles").
BORDER_FRACTION = 0.25
TILE_MERGE = 2  # the version of this merge, in the detector's identity with tiles (1: NMS alone, before 2026-12-06)


@dataclass
class View:
    """One network input cut from one image: how to make it and how its pixels map back."""

    image: int  # index of the image in the detect() call
    side: int  # the canvas is side x side
    crop: tuple[int, int, int, int]  # x0, y0, x1, y1 of the image region it shows
    resize: tuple[int, int]  # (h, w) the region is resized to (the region's own size for a tile)
    factor: tuple[float, float]  # canvas pixel -> image pixel (x, y), before the offset
    safe: tuple[float, float, float, float]  # lo_x, lo_y, hi_x, hi_y in canvas pixels a kept box stays within
    number: int = 0  # which view of the detect() call (the part rule merges across views only)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of ``tile`` pixels start along a side of ``length`` pixels: the fewest that overlap by at
    least ``overlap``, spread evenly, the first at 0 and the last ending at ``length`` (one at 0 when the
    side is no longer than a tile)."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(k * (length - tile) / (n - 1)) for k in range(n)]


def tile_views(i: int, height: int, width: int, tile: int, overlap: int) -> list[View]:
    """The tiles of image ``i`` (``height`` x ``width``): each a ``tile`` x ``tile`` canvas of the image at its own
    size (padded where the image is shorter), safe everywhere but within :data:`TILE_MARGIN` of a border it
    shares with another tile."""
    inf, m = float("inf"), TILE_MARGIN
    views = []
    for y0 in tile_starts(height, tile, overlap):
        for x0 in tile_starts(width, tile, overlap):
            x1, y1 = min(width, x0 + tile), min(height, y0 + tile)
            safe = (m if x0 > 0 else -inf, m if y0 > 0 else -inf,
                    tile - m if x1 < width else inf, tile - m if y1 < height else inf)
            views.append(View(i, tile, (x0, y0, x1, y1), (y1 - y0, x1 - x0), (1.0, 1.0), safe))
    return views


def clear_of_borders(boxes: torch.Tensor, safe: torch.Tensor, large: float) -> torch.Tensor:
    """Which candidate boxes (V, A, 4, canvas pixels) stay within their view's safe window ``safe`` (V, 1, 4):
    :data:`TILE_MARGIN` from a border shared with another tile, and a box larger than ``large`` pixels
    (``tile_overlap - 2 * TILE_MARGIN``: a face no tile is sure to hold whole) :data:`BORDER_FRACTION` of its
    size from it. The letterbox's window is unbounded."""
    size = torch.maximum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])
    tile = torch.isfinite(safe).any(-1)  # (V, 1): a tile; the letterbox's bounds stay exactly what they were
    extra = torch.where((size > large) & tile, (BORDER_FRACTION * size - TILE_MARGIN).clamp(min=0),
                        torch.zeros_like(size))
    return ((boxes[..., 0] >= safe[..., 0] + extra) & (boxes[..., 1] >= safe[..., 1] + extra)
            & (boxes[..., 2] <= safe[..., 2] - extra) & (boxes[..., 3] <= safe[..., 3] - extra))


def merge(boxes: torch.Tensor, scores: torch.Tensor, images: torch.Tensor, views: torch.Tensor,
          nms_iou: float) -> torch.Tensor:
    """Candidates (boxes (N, 4) in image pixels, scores, the image and the view each came from; a view belongs
    to one image) -> the indices of the faces kept, highest score first: NMS per image at ``nms_iou``, then the
    part rule (module docstring)."""
    # imported here, not at the top: ``import torchvision`` costs ~1.4 s of CPU (it pulls in torch._dynamo),
    # paid by every Ray worker process that imports this module (Ray Train's, Ray Data's) without detecting
    import torchvision

    keep = torchvision.ops.batched_nms(boxes, scores, images, nms_iou)  # sorted by score, highest first
    img, view = images[keep], views[keep]
    # as many views as images among the kept boxes: each image's come from one view (tiles off): nothing to merge
    if len(keep) < 2 or len(torch.unique(view)) == len(torch.unique(img)):
        return keep
    gone = torch.zeros(len(keep), dtype=torch.bool)
    for i in torch.unique(img).tolist():
        mine = (img == i).nonzero(as_tuple=True)[0]  # this image's kept boxes, highest score first
        if len(mine) > 1:
            gone[mine.cpu()] = _parts(boxes[keep[mine]], view[mine])
    return keep[~gone.to(keep.device)]


def _parts(b: torch.Tensor, view: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """Of one image's kept boxes (highest score first) and their views: which are parts of a higher-scored box
    of another view (the part rule), greedy as NMS (a box that went removes nothing); a CPU bool mask. The
    pairs are compared ``rows`` boxes at a time, so that thousands of boxes (a low threshold) stay small."""
    n = len(b)
    area = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    order = torch.arange(n, device=b.device)
    part = []
    for r0 in range(0, n, rows):
        r = slice(r0, min(n, r0 + rows))
        lo = torch.maximum(b[r, None, :2], b[None, :, :2])
        hi = torch.minimum(b[r, None, 2:], b[None, :, 2:])
        inter = (hi - lo).clamp(min=0).prod(-1)  # [i, j]: the area box i and box j share
        # [i, j]: box j lies PART_INSIDE inside box i, which scored higher and was found in another view
        part.append((order[r, None] < order[None, :]) & (view[r, None] != view[None, :])
                    & (inter >= PART_INSIDE * area[None, :]) & (area[None, :] > 0))
    part = torch.cat(part)
    holders = part.any(1).nonzero(as_tuple=True)[0]
    gone = torch.zeros(n, dtype=torch.bool)
    if len(holders) == 0:
        return gone
    for i, row in zip(holders.tolist(), part[holders].cpu()):  # the few boxes that hold a part, read once
        if not gone[i]:
            gone |= row
    return gone
