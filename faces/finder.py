"""Faces in decoded photos: the detector, loaded once, and the alignment of its faces for any model.

* :class:`FaceFinder` (where the models are, loaded once per actor or replica): decoded pictures
  (facedata/decode.py) -> :class:`~faces.detect.Faces` per picture (one batched detection), then, for any
  model's preprocessing, the aligned crops of every face (``faces.align``) with the maps that carry the
  crop's pixels back to the original picture's pixels (for landmark outputs and for the rows' ``face_box``
  / ``face_points``). core/annotator.py calls it for label and serve; :func:`decode_face` is the same way
  for one image's best face (``jobs.evaluate --faces detect``), and :func:`face_input` the same decode and
  warp for a face whose points are already known (``jobs.train --faces detect``: cached detections,
  faces/trainfaces.py).

``FaceOptions`` are the settings users give (``--faces``, ``--max-side``, the detector's settings) and travel
as a plain dict between processes; ``FaceFinder.identity`` names the detector's weights and settings, and
lands in every row's ``detector`` column so that an output says how its faces were found.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from faces.align import align
from faces.detect import DetectorConfig, FaceDetector, Faces
from models.imagebytes import ImageDecodeError
from models.photo import DEFAULT_PHOTO_SIDE, axis_scales, jpeg_draft_side
from models.preprocess import Preprocessing, decode_photo

FACE_MODES = ("detect", "whole")


@dataclass(frozen=True)
class FaceOptions:
    """How faces are found. ``mode``: ``detect`` (find every face, align each to the model's template, one
    row per face) or ``whole`` (the image is one face crop, stretched to the model's input: datasets of
    aligned crops). ``max_side``: the longest side a photo is decoded at. ``detector``: settings of
    :class:`~faces.detect.DetectorConfig` that differ from its defaults."""

    mode: str = "detect"
    max_side: int = DEFAULT_PHOTO_SIDE
    detector: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in FACE_MODES:
            raise ValueError(f"faces must be one of {', '.join(FACE_MODES)}, got {self.mode!r}")
        if self.max_side < 32:
            raise ValueError(f"max_side must be at least 32 pixels, got {self.max_side}")
        self.detector_config()  # unknown or out-of-range detector settings fail here, in the driver

    @property
    def detect(self) -> bool:
        return self.mode == "detect"

    def detector_config(self) -> DetectorConfig:
        return DetectorConfig.from_dict(dict(self.detector))  # unset: each network's own defaults

    def to_dict(self) -> dict:
        return {"mode": self.mode, "max_side": self.max_side, "detector": dict(self.detector)}

    @classmethod
    def from_dict(cls, d: dict | None) -> FaceOptions:
        d = dict(d or {})
        return cls(mode=d.get("mode", "detect"), max_side=int(d.get("max_side", DEFAULT_PHOTO_SIDE)),
                   detector=dict(d.get("detector") or {}))


@dataclass
class AlignedFaces:
    """Every face of a batch of pictures, aligned for one model."""

    inputs: torch.Tensor  # uint8 (N, C, H, W): the model's inputs
    maps: torch.Tensor  # (N, 3, 3) float64: model-input pixel -> original-picture pixel
    owner: list[int]  # the picture each face belongs to
    index: list[int]  # the face's rank in its picture (0: highest detection score)


class FaceFinder:
    """The detector, loaded once, and the alignment of its faces for any model."""

    def __init__(self, options: FaceOptions | dict | None = None, device: str | torch.device = "cpu"):
        self.options = options if isinstance(options, FaceOptions) else FaceOptions.from_dict(options)
        self.detector = FaceDetector(self.options.detector_config(), device=device)
        self.device = self.detector.device
        # jpeg_draft: the least side a JPEG's reduced DCT scale may leave (models.preprocess.decode_photo); named
        # since 2026-12-06, when it went from max_side to 31/32 of it (photos 3968-4095 px long decode at half size)
        self.identity = (f"{self.detector.identity} max_side={self.options.max_side} "
                         f"jpeg_draft={jpeg_draft_side(self.options.max_side)}")

    def find(self, images: list[torch.Tensor], scales: list[float] | None = None) -> list[Faces]:
        """Decoded pictures (uint8 (3, h, w) RGB or (1, h, w) grey, any device) -> their faces, in the decoded
        pictures' pixels.
        ``scales`` (decoded -> original) only makes ``min_face`` count original pixels."""
        if not images:
            return []
        images = [im.to(self.device) for im in images]
        if scales is None:
            return self.detector.detect(images)
        found = self.detector.detect(images, scales=list(scales))
        # the detector returned original pixels: bring them back to the decoded pictures' (alignment samples those)
        return [Faces(f.boxes / s, f.scores, f.points / s, f.dropped) for f, s in zip(found, scales)]

    def aligned(self, images: list[torch.Tensor], faces: list[Faces], pre: Preprocessing,
                scales: list[float | tuple[float, float]] | None = None) -> AlignedFaces:
        """The aligned crops of every face for one model, with the model's channels whatever the pictures'
        (``faces.align.align``: a grey picture's crops in three channels for an RGB model); ``maps`` go to
        original pixels (decoded x * sx, y * sy): ``scales`` per picture ``(sx, sy)``
        (``models.photo.axis_scales``) or one number for both axes."""
        inputs, maps, owner, index = [], [], [], []
        for i, (img, f) in enumerate(zip(images, faces)):
            if len(f) == 0:
                continue
            crops, m = align(img.to(self.device), f.points, pre)
            m = _to_original(m, 1.0 if scales is None else scales[i])
            inputs.append(crops)
            maps.append(m)
            owner += [i] * len(f)
            index += list(range(len(f)))
        if not inputs:
            c, (h, w) = pre.channels, pre.size
            return AlignedFaces(torch.zeros((0, c, h, w), dtype=torch.uint8, device=self.device),
                                torch.zeros((0, 3, 3), dtype=torch.float64), [], [])
        return AlignedFaces(torch.cat(inputs), torch.cat(maps), owner, index)


class NoFace(ImageDecodeError):
    """An image in which the detector found no face (evaluation through detection skips and counts it)."""

    def __init__(self, message: str = "no face found"):
        super().__init__("no_face", message)

    def __reduce__(self):
        return (NoFace, (self.message,))


# Which face of a photo is "the" face when a data set labels one per photo (jobs.evaluate --face-pick):
# score: the detector's most confident; largest: the largest box (area); center: the box whose centre is nearest
# the photo's centre (LFW's rule: "the face in the middle").
FACE_PICKS = ("score", "largest", "center")


def pick_index(faces: Faces, width: float, height: float, rule: str = "score") -> int:
    """The index of the face ``rule`` (:data:`FACE_PICKS`) picks among ``faces`` (not empty) of a ``width`` x
    ``height`` picture, in the pixels of its boxes. Ties go to the higher score (faces are sorted by score)."""
    if rule not in FACE_PICKS:
        raise ValueError(f"unknown face pick {rule!r}: one of {', '.join(FACE_PICKS)}")
    if len(faces) == 0:
        raise ValueError("no face to pick from")
    b = faces.boxes.detach().double().cpu()
    if rule == "largest":
        return int(torch.argmax((b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)))
    if rule == "center":
        cx, cy = (b[:, 0] + b[:, 2]) / 2 - width / 2, (b[:, 1] + b[:, 3]) / 2 - height / 2
        return int(torch.argmin(cx * cx + cy * cy))
    return 0  # sorted by score, highest first


def decode_face(data: bytes, pre: Preprocessing, finder: FaceFinder, max_side: int | None = None,
                pick: str = "score") -> tuple[torch.Tensor, dict]:
    """Bytes -> one face of the image (the one ``pick`` names: :func:`pick_index`; by default the highest-scoring)
    aligned to the model's input, ``(uint8 (C, H, W), geometry)``, the way a user meets the model
    (``jobs.evaluate --faces detect``). The geometry's ``affine`` maps input pixels to the original image's.
    Raises :class:`NoFace` when none is found."""
    img, size, scale = decode_photo(data, max_side or finder.options.max_side)
    found = finder.find([img], [scale])[0]
    if len(found) == 0:
        raise NoFace()
    k = pick_index(found, img.shape[-1], img.shape[-2], pick)  # boxes are in the decoded picture's pixels
    return _aligned_one(img.to(finder.device), size, found.points[k:k + 1], pre)


def face_input(data: bytes, pre: Preprocessing, points, max_side: int = DEFAULT_PHOTO_SIDE) -> tuple[torch.Tensor, dict]:
    """Bytes and one face's 5 points (10 numbers or (5, 2), in pixels of the original upright image, as
    the detector gave them or a data set's landmarks) -> that face aligned to the model's input, with the
    geometry of :func:`decode_face`: the same decode and the same warp (``jobs.train --faces detect`` and
    ``--faces landmarks`` read their faces through it)."""
    img, size, _ = decode_photo(data, max_side)
    pts = torch.as_tensor(points, dtype=torch.float64).reshape(1, 5, 2) / torch.tensor(picture_scales(size, img),
                                                                                       dtype=torch.float64)
    return _aligned_one(img, size, pts, pre)


# The version of how detected boxes and points go from a decoded picture's pixels to the original's: 1, one factor
# for both axes (the longer side's ``scale``, before 2026-12-06); 2, one per axis (:func:`picture_scales`,
# ``models.photo.axis_scales``). Bump it with ANY change of that mapping (here, in models/photo.py or in
# faces/trainfaces.py's ``_detect``): what was stored in original pixels by another mapping is then not reused,
# as the training faces' cache is keyed by it (faces/facecache.py, ``cache_key``).
TO_ORIGINAL = 2


def picture_scales(size: tuple[int, int], image: torch.Tensor) -> tuple[float, float]:
    """``(sx, sy)`` from a decoded picture's pixels (uint8 (C, h, w)) to its original's, ``size`` (width, height)
    (``models.photo.axis_scales``)."""
    return axis_scales(size, (int(image.shape[-1]), int(image.shape[-2])))


def _aligned_one(img: torch.Tensor, size: tuple[int, int], points: torch.Tensor,
                 pre: Preprocessing) -> tuple[torch.Tensor, dict]:
    """One face (points (1, 5, 2) in the decoded picture's pixels) -> (model input, geometry)."""
    crops, maps = align(img, points, pre)
    maps = _to_original(maps, picture_scales(size, img))
    (w, h), (H, W) = size, pre.size
    return crops[0].cpu(), {"width": w, "height": h, "input_w": W, "input_h": H,
                            "affine": maps[0, :2].reshape(-1).tolist()}


def _to_original(maps: torch.Tensor, scale: float | tuple[float, float]) -> torch.Tensor:
    """Input -> decoded-picture maps to input -> original-picture maps (decoded x times ``sx``, y times ``sy``;
    ``scale`` ``(sx, sy)`` or one number for both)."""
    sx, sy = map(float, scale) if isinstance(scale, (tuple, list)) else (float(scale), float(scale))
    if sx == 1.0 and sy == 1.0:
        return maps
    return torch.diag(torch.tensor([sx, sy, 1.0], dtype=maps.dtype, device=maps.device)) @ maps
