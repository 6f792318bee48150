"""Per-face quality: image quality of the aligned face, face size, and the review flags.

Pure functions, batched over faces, torch (any device). The columns (docs/quality.md has the formulas, the
thresholds' measurements and the commands that measured them):

* ``sharpness`` (float32, 0-100, higher = sharper) and ``brightness`` (float32, 0-100, higher = brighter),
  AWS Rekognition's ``Quality`` columns, from the face's aligned crop, uint8 (N, C, H, W) RGB or grey.
  Values are comparable between faces only when the crops are made the same way: use
  :func:`quality_crops` (64 x 64, :data:`QUALITY_PREPROCESSING`: the default 5-point template), not a
  model's own crops. ``FaceFinder.aligned(images, faces, QUALITY_PREPROCESSING, scales).inputs`` gives the
  same crops but costs about 5 times more on photos with large faces (it converts and halves whole photos).
* ``face_size`` (float32, pixels of the original image): the inter-ocular distance, from the 5 points
  (``small_face`` judges it in the decoded picture's pixels, the ones the models read: :func:`face_quality`).
* ``review`` (bool) and ``review_reasons`` (list of strings, in the order of :data:`REASONS`, then
  ``low_confidence:<output>`` in the caller's output order) from :func:`review_flags` and
  :class:`ReviewThresholds`.
* the pose columns ``pose_yaw``, ``pose_pitch``, ``pose_roll``: :mod:`faces.pose`.

:func:`face_quality` computes every column for a batch of faces in one call.

Formulas (L is the crop's luma, ITU-R 601, 0-255; the *face region* is the box x in [0.25, 0.75] W,
y in [0.30, 0.85] H of the crop, which with the default template holds the eyes, nose and mouth and
little background):

* ``brightness = 100 * mean(L over the face region) / 255``.
* ``sharpness``: the share of the face region's contrast that is fine detail, ``r = rms(L - G1 * L) /
  (std(L) + 2)`` over the face region (``G1 * L``: L blurred by a Gaussian of sigma 1 crop pixel; the +2
  grey levels keep a flat or black crop at 0 instead of 0/0), mapped through the saturating curve
  ``100 * (1 - exp(-r / SHARPNESS_SCALE))``. Dividing by the contrast makes it blind to darkening and
  contrast (a darker face is not a blurrier one); the re-blur difference falls as a face's own blur
  grows. Measured on 64 px crops; another crop size changes the scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from facedata.yamlsafe import settings_from_dict
from faces.align import input_to_image, template_of, warp
from faces.pose import head_pose
from models.preprocess import Preprocessing

# The crop quality is measured on: 64 x 64, the default template (ArcFace's 5-point layout with a 1.25
# margin; eyes about 16 px apart). Small enough to cost little, large enough for the detail of a face whose
# eyes are 16 px or more apart (smaller faces are enlarged and read as soft, which they are).
QUALITY_PREPROCESSING = Preprocessing(size=(64, 64))
FACE_REGION = (0.25, 0.30, 0.75, 0.85)  # x1, y1, x2, y2 as fractions of the crop's width and height
SHARPNESS_SCALE = 0.15  # r at which sharpness is 63 (a clean face's median r is about 0.25: sharpness 80)
_LUMA = (0.299, 0.587, 0.114)

REASONS = ("small_face", "extreme_pose", "blurry", "dark", "low_detection_score")
# low_detection_score's limit per detector network (DetectorConfig.network), each measured the one way,
# bench/bench_review.py --network NAME (docs/quality.md, "The detection score per network"): one step of 0.05
# below the highest step under which no clean face of the bench scores, the rule that gives RetinaFace's 0.9
# (its clean faces' lowest score 0.961: 0.95, then one step of margin). Why per network: RetinaFace's scores
# are a softmax (clean faces' median 0.999), SCRFD's a sigmoid (0.771), CenterFace's a heatmap peak (0.876):
# at RetinaFace's 0.9 every face SCRFD found was flagged, and 55 % of CenterFace's clean faces.
DETECTION_SCORES = {"retinaface": 0.9, "scrfd": 0.6, "centerface": 0.55}
DEFAULT_NETWORK = "retinaface"  # DetectorConfig's default network: the limit when the detector is not known
LOW_CONFIDENCE = "low_confidence"  # + ":<output>"


# --- the quality crop -------------------------------------------------------------------------------------


def quality_crops(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """One image's faces -> their quality crops, uint8 (K, C, 64, 64) on the image's device.

    The crops of ``faces.align.align(image, points, QUALITY_PREPROCESSING)[0]`` (the same maps, the same
    warp; the anti-aliasing pyramid groups pixels from the region's corner, so values differ by about 1 grey
    level on average) but each face is warped from the part of the image under its crop only, so a photo's cost
    does not grow with its size (``align`` converts and halves the whole photo when a face is large; measured
    in bench/bench_review.py). ``image``: uint8 (C, H, W); ``points`` (K, 5, 2) in the image's pixels (the
    decoded picture's, as ``FaceFinder.find`` returns them)."""
    pre = QUALITY_PREPROCESSING
    h, w = pre.size
    k = int(points.shape[0])
    if k == 0:
        return torch.zeros((0, image.shape[0], h, w), dtype=torch.uint8, device=image.device)
    maps = input_to_image(points, pre)  # (K, 3, 3) crop pixel -> image pixel, on the CPU
    corners = torch.tensor([[0.0, 0.0, 1.0], [w, 0.0, 1.0], [0.0, h, 1.0], [w, h, 1.0]], dtype=maps.dtype)
    foot = (maps @ corners.T)[:, :2]  # (K, 2, 4) the crop's corners in the image
    lo = torch.floor(foot.amin(-1)) - 4
    hi = torch.ceil(foot.amax(-1)) + 4
    ih, iw = image.shape[-2:]
    out = []
    for i in range(k):
        x0, y0 = int(max(0, min(iw - 1, lo[i, 0]))), int(max(0, min(ih - 1, lo[i, 1])))
        x1, y1 = int(max(x0 + 1, min(iw, hi[i, 0]))), int(max(y0 + 1, min(ih, hi[i, 1])))
        shift = torch.eye(3, dtype=maps.dtype)
        shift[0, 2], shift[1, 2] = -x0, -y0
        out.append(warp(image[:, y0:y1, x0:x1], shift @ maps[i : i + 1], pre.size))
    return torch.cat(out)


# --- image quality ----------------------------------------------------------------------------------------


def _luma(crops: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (N, 1, H, W) luma 0-255."""
    if not isinstance(crops, torch.Tensor) or crops.dim() != 4 or crops.shape[1] not in (1, 3):
        shape = tuple(crops.shape) if isinstance(crops, torch.Tensor) else type(crops).__name__
        raise ValueError(f"crops must be a (N, C, H, W) tensor with C 1 or 3, got {shape}")
    x = crops.float()
    if x.shape[1] == 3:
        w = torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)
        x = (x * w).sum(1, keepdim=True)
    return x


def _region(h: int, w: int) -> tuple[slice, slice]:
    x1, y1, x2, y2 = FACE_REGION
    ys = slice(int(round(y1 * h)), max(int(round(y1 * h)) + 1, int(round(y2 * h))))
    xs = slice(int(round(x1 * w)), max(int(round(x1 * w)) + 1, int(round(x2 * w))))
    return ys, xs


def brightness(crops: torch.Tensor) -> torch.Tensor:
    """Aligned crops uint8 (N, C, H, W) -> (N,) float32 0-100: the face region's mean luma / 255 * 100."""
    L = _luma(crops)
    if L.shape[0] == 0:
        return torch.zeros(0, device=L.device)
    ys, xs = _region(*L.shape[-2:])
    return (L[:, 0, ys, xs].mean((1, 2)) * (100.0 / 255.0)).clamp(0.0, 100.0)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))


def detail_ratio(crops: torch.Tensor) -> torch.Tensor:
    """The raw sharpness measure ``r`` (N,) float32 >= 0 (see the module docstring)."""
    L = _luma(crops)
    if L.shape[0] == 0:
        return torch.zeros(0, device=L.device)
    ys, xs = _region(*L.shape[-2:])
    hf = (L - _gaussian_blur(L, 1.0))[:, 0, ys, xs]
    face = L[:, 0, ys, xs]
    rms = hf.pow(2).mean((1, 2)).sqrt()
    std = face.flatten(1).std(1, correction=0)
    return rms / (std + 2.0)


def sharpness(crops: torch.Tensor) -> torch.Tensor:
    """Aligned crops uint8 (N, C, H, W) -> (N,) float32 0-100: ``100 * (1 - exp(-r / SHARPNESS_SCALE))``
    with ``r`` the :func:`detail_ratio`."""
    r = detail_ratio(crops)
    return (100.0 * (1.0 - torch.exp(-r / SHARPNESS_SCALE))).clamp(0.0, 100.0)


# --- size -------------------------------------------------------------------------------------------------


def face_size(points: torch.Tensor) -> torch.Tensor:
    """(N, 5, 2) points in pixels of the original image -> (N,) float32 inter-ocular distance in those
    pixels (0 where the points are not finite)."""
    p = torch.as_tensor(points)
    if p.dim() == 2:
        p = p[None]
    if p.shape[-2:] != (5, 2):
        raise ValueError(f"points must be (N, 5, 2), got {tuple(p.shape)}")
    d = (p[:, 1] - p[:, 0]).double().norm(dim=-1)
    return torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0).float()


# --- review -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewThresholds:
    """When a face is sent for review (each reason fires on its own; docs/quality.md has the measurements
    behind every default). A value that is NaN fires its reason (nothing can be vouched for)."""

    # small_face: the inter-ocular distance in the decoded picture the models' crops come from (face_size /
    # the decode scale: face_quality) below min_face_size when it is given (a
    # number of pixels whatever the models); by default (None) below the models' own need (resolve_face_size):
    # min_face_ratio x the largest eye distance of the models' inputs (their templates), never below
    # min_face_floor. bench/bench_face_size.py (docs/quality.md): age_gender_race (eyes 58 px apart in its
    # 150 px input) lost nothing measurable at 20 px, 0.5 years of age MAE and 1.8 points of race at 16;
    # hard_sharing (eyes 11 px apart in its 50 px input) nothing at 10 px, 5 points at 8, where the detector
    # also misses 40 % of faces.
    min_face_size: float | None = None
    min_face_ratio: float = 1 / 3
    min_face_floor: float = 10.0
    # extreme_pose: |pose_yaw| above max_yaw, or pose_pitch above max_pitch_up (face up) or below
    # -max_pitch_down (face down): Rekognition's guidance (yaw under 45, pitch under 30 down and 45 up).
    max_yaw: float = 45.0
    max_pitch_up: float = 45.0
    max_pitch_down: float = 30.0
    # blurry: sharpness (0-100) below this (bench_review: no clean face below it, 1st percentile 52-59;
    # every face blurred by sigma = 0.10 x its inter-ocular distance below it).
    min_sharpness: float = 50.0
    # dark: brightness (0-100) below this (bench_review: about 2 % of clean faces, none of UTKFace's by race
    # label; faces darkened to x0.3 about 95 % below).
    min_brightness: float = 22.0
    # low_detection_score: the detector's score below min_detection_score when it is given (a number whatever
    # the detector); by default (None) below the detector network's own value (resolve_detection_score,
    # DETECTION_SCORES): each network's scores live on their own scale, so one number cannot serve all three.
    min_detection_score: float | None = None
    # low_confidence:<output>: an output's confidence (0-1, given by the caller) below min_confidence, or
    # below per_output[output] when the output is named there.
    min_confidence: float = 0.6
    per_output: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("min_face_size", "min_detection_score") and v is None:
                continue
            if f.name == "per_output":
                if not isinstance(v, Mapping) or not all(
                        isinstance(k, str) and isinstance(x, (int, float)) and not isinstance(x, bool)
                        and math.isfinite(x) for k, x in v.items()):
                    raise ValueError(f"ReviewThresholds: per_output must map output names to numbers, got {v!r}")
                object.__setattr__(self, "per_output", dict(v))
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"ReviewThresholds: {f.name} must be a finite number, got {v!r}")

    def face_size_limit(self) -> float:
        """The ``small_face`` limit in pixels: ``min_face_size`` when set, else ``min_face_floor`` (what is
        known without the models; :meth:`resolve_face_size` sets it from them)."""
        return self.min_face_floor if self.min_face_size is None else float(self.min_face_size)

    def resolve_face_size(self, preprocessings) -> ReviewThresholds:
        """These thresholds with ``min_face_size`` set for faces read by models of these preprocessings (a
        label job's or a serving replica's models, the embedding's too): unchanged when it is set, else
        ``max(min_face_floor, min_face_ratio x the largest eye distance of their templates)``: the face is
        too small for at least one model of the row."""
        if self.min_face_size is not None:
            return self
        eyes = [float(face_size(template_of(p))[0]) for p in preprocessings]  # in each model's input pixels
        need = max([self.min_face_ratio * e for e in eyes], default=0.0)
        return replace(self, min_face_size=round(max(self.min_face_floor, need), 2))

    def detection_score_limit(self) -> float:
        """The ``low_detection_score`` limit: ``min_detection_score`` when set, else the default detector's
        (RetinaFace's: what is known without the detector; :meth:`resolve_detection_score` sets it from it)."""
        if self.min_detection_score is None:
            return DETECTION_SCORES[DEFAULT_NETWORK]
        return float(self.min_detection_score)

    def resolve_detection_score(self, network: str) -> ReviewThresholds:
        """These thresholds with ``min_detection_score`` set for faces found by the detector ``network``
        (``DetectorConfig.network``: a label job's or a serving replica's detector): unchanged when it is
        set (a user's number), else that network's :data:`DETECTION_SCORES` value."""
        if self.min_detection_score is not None:
            return self
        if network not in DETECTION_SCORES:
            raise ValueError(f"ReviewThresholds: no review score measured for detector network {network!r}; "
                             f"known: {sorted(DETECTION_SCORES)} (or set min_detection_score)")
        return replace(self, min_detection_score=DETECTION_SCORES[network])

    def resolve(self, preprocessings, network: str) -> ReviewThresholds:
        """Both limits that depend on the run (:meth:`resolve_face_size`, :meth:`resolve_detection_score`): the
        thresholds a label job records in its summary and an annotator or replica applies to its rows."""
        return self.resolve_face_size(preprocessings).resolve_detection_score(network)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_output"] = dict(self.per_output)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ReviewThresholds:
        return settings_from_dict(cls, d)


def _vec(x, n: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().double().reshape(-1).cpu()
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} values for {n} faces")
    return t


def _below(x: torch.Tensor, limit: float) -> torch.Tensor:
    return ~(x >= limit)  # NaN fires


def review_flags(face_size: torch.Tensor, pose_yaw: torch.Tensor, pose_pitch: torch.Tensor,
                 sharpness: torch.Tensor, brightness: torch.Tensor, detection_score: torch.Tensor,
                 confidences: Mapping[str, torch.Tensor] | None = None,
                 thresholds: ReviewThresholds | None = None) -> tuple[torch.Tensor, list[list[str]]]:
    """Which faces need review, and why.

    Every argument is (N,) (tensors, arrays or lists); ``face_size`` is the eye distance in the pixels the
    models' crops are warped from (the decoded picture's: :func:`face_quality` divides by the decode scale);
    ``confidences`` maps output names to (N,) confidences
    in 0-1 (e.g. a classifier's top softmax probability; NaN where the output does not apply is treated
    as missing and fires nothing). Returns ``(review, reasons)``: (N,) bool CPU tensor, and per face the list
    of reasons in the order of :data:`REASONS`, then ``"low_confidence:<output>"`` in the order of
    ``confidences``. ``review[i]`` is ``len(reasons[i]) > 0``."""
    th = thresholds if thresholds is not None else ReviewThresholds()
    n = int(torch.as_tensor(face_size).reshape(-1).shape[0])
    size = _vec(face_size, n, "face_size")
    yaw, pitch = _vec(pose_yaw, n, "pose_yaw"), _vec(pose_pitch, n, "pose_pitch")
    fires = {
        "small_face": _below(size, th.face_size_limit()),
        "extreme_pose": ~(yaw.abs() <= th.max_yaw) | ~(pitch <= th.max_pitch_up) | ~(pitch >= -th.max_pitch_down),
        "blurry": _below(_vec(sharpness, n, "sharpness"), th.min_sharpness),
        "dark": _below(_vec(brightness, n, "brightness"), th.min_brightness),
        "low_detection_score": _below(_vec(detection_score, n, "detection_score"), th.detection_score_limit()),
    }
    columns = [(r, fires[r].tolist()) for r in REASONS]
    low = low_confidence_reasons(confidences, n, th)
    reasons = [[r for r, col in columns if col[i]] + low[i] for i in range(n)]
    review = torch.tensor([bool(r) for r in reasons], dtype=torch.bool)
    return review, reasons


def low_confidence_reasons(confidences: Mapping[str, torch.Tensor] | None, n: int,
                           thresholds: ReviewThresholds | None = None) -> list[list[str]]:
    """Per face, ``"low_confidence:<output>"`` for every output whose confidence is below its threshold, in
    the order of ``confidences`` (NaN: the output does not apply, nothing fires). The review reasons of a
    face with no points (``--faces whole``) are these alone."""
    th = thresholds if thresholds is not None else ReviewThresholds()
    columns = []
    for name, conf in (confidences or {}).items():
        c = _vec(conf, n, f"confidences[{name!r}]")
        limit = th.per_output.get(name, th.min_confidence)
        columns.append((f"{LOW_CONFIDENCE}:{name}", (c < limit).tolist()))  # NaN: not applicable
    return [[r for r, col in columns if col[i]] for i in range(n)]


# --- everything at once -----------------------------------------------------------------------------------


def face_quality(points: torch.Tensor, crops: torch.Tensor, detection_score: torch.Tensor,
                 confidences: Mapping[str, torch.Tensor] | None = None,
                 thresholds: ReviewThresholds | None = None, scales=None) -> dict:
    """Every per-face quality column for a batch of N faces.

    ``points``: (N, 5, 2) in pixels of the ORIGINAL image (``face_size`` counts those pixels; the angles
    do not depend on it); ``crops``: uint8 (N, C, H, W) aligned crops from :func:`quality_crops`
    (:data:`QUALITY_PREPROCESSING`); ``detection_score``: (N,) the detector's scores; ``confidences``,
    ``thresholds``: as :func:`review_flags`; ``scales``: (N,) each face's decode scale (original pixels per
    decoded pixel; None: 1). ``small_face`` reads ``face_size / scale``, the eye distance in the decoded
    picture that the models' crops are warped from: a 6144 px photo decoded at 2048 px gives its models a third
    of the pixels its ``face_size`` counts.

    Returns ``{"pose_yaw", "pose_pitch", "pose_roll", "sharpness", "brightness", "face_size"}`` as (N,)
    float32 CPU tensors, ``"review"`` (N,) bool CPU tensor and ``"review_reasons"`` a list of N lists of
    strings."""
    points = torch.as_tensor(points)
    if points.dim() == 2:
        points = points[None]
    n = points.shape[0]
    if crops.shape[0] != n:
        raise ValueError(f"{crops.shape[0]} crops for {n} faces")
    out = {k: v.cpu() for k, v in head_pose(points).items()}
    out["sharpness"] = sharpness(crops).cpu()
    out["brightness"] = brightness(crops).cpu()
    out["face_size"] = face_size(points).cpu()
    decoded = out["face_size"] if scales is None else out["face_size"].double() / _vec(scales, n, "scales")
    out["review"], out["review_reasons"] = review_flags(
        decoded, out["pose_yaw"], out["pose_pitch"], out["sharpness"], out["brightness"],
        detection_score, confidences, thresholds)
    return out
