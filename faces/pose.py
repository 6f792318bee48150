"""Head pose from a face's 5 points: roll, yaw and pitch in degrees, AWS Rekognition's ``Pose`` columns.

Pure functions, batched over faces, torch (any device, no gradients needed), no OpenCV. The input is what
:class:`faces.detect.Faces` holds: ``points`` (N, 5, 2) (x, y) pixels, in the order image-left eye,
image-right eye, nose tip, image-left mouth corner, image-right mouth corner. Pixels of the original photo or
of a decoded copy give the same angles (they are invariant to scale and translation).

Conventions (docs/quality.md has the long version and the measured error):

* ``pose_roll``: the angle of the eye line, ``atan2(y_re - y_le, x_re - x_le)`` with image y pointing down:
  **positive when the face is turned clockwise as seen in the image** (the image-right eye lower than the
  image-left one). A face pasted ``a`` degrees counter-clockwise (``facedata.compose``'s ``angles``) reads
  ``-a``.
* ``pose_yaw``: **positive when the face turns towards the image's right** (the subject's own left: the nose
  moves right of the eyes' midline), the camera's point of view, as AWS describes its ``Yaw``.
* ``pose_pitch``: **positive when the face turns up** (chin up, the nose moves towards the eyes).
* All three are in -180..180, as Rekognition's; a 5-point weak-perspective fit is only meaningful up to
  about 60 degrees of yaw and 40 of pitch.

AWS does not publish the signs of ``Pose`` (its reference gives only the range); the choices above are
the camera's-eye view of its re:Post answer and the usual head-pose data sets' convention. GENKI-4K's labels
have the same signs as these for all three angles (measured: correlation +0.92 yaw, +0.54 pitch, +0.92 roll
with ours; bench/bench_pose.py).

Method (yaw and pitch): a generic 3-D 5-point face (:func:`face_3d`, units of the inter-ocular distance,
camera axes x right, y down, z away from the camera) is fitted to the 2-D points by a weak-perspective
(scaled orthographic) least-squares fit, ``p_i ~ s * (R X_i)[:2] + t``:

1. centre both point sets (this solves ``t``) and solve the affine camera ``M`` (2 x 3) in least squares,
   ``P ~ X M^T``;
2. take the nearest scaled pair of orthonormal rows (``M = U S V^T`` -> ``U V^T``, ``s`` the mean singular
   value) and complete ``R`` with their cross product. Exact for exact points. (A Gauss-Newton refinement of
   the reprojection error was tried and measured worse on GENKI-4K: yaw MAE 4.1 with it, 3.6 without, at a
   depth scale of 2.)
3. read the angles from ``R = Rz(roll) @ Ry(-yaw) @ Rx(-pitch)`` (the signs turn the right-handed camera
   rotations into the conventions above).

``pose_roll`` is the eye line itself (for the fitted model the Euler roll of step 3 is the same angle
when the fit is exact). Degenerate points (all equal, NaN, a zero eye distance) give finite angles, 0
where nothing can be said.
"""

from __future__ import annotations

import math

import torch

# A generic face in units of the inter-ocular distance (eye centres 1 apart), camera axes (x right, y down,
# z away from the camera), in the detector's point order. x and y: insightface's ArcFace 112 px template made
# symmetric (the frontal 2-D layout of the 5 points); z: the nose tip and mouth corners in front of the eye
# centres by anthropometric averages (nose tip about 22 mm, mouth corners about 6 mm in front of the
# corneas, eye centres 63 mm apart). The depths carry yaw and pitch. DEPTH_SCALE and NOSE_Y were fitted on
# half of GENKI-4K and checked on the other half (bench/bench_pose.py, docs/quality.md): the depth scale that
# makes the median yaw error of turned faces (|yaw| >= 20) zero, so that |yaw| is not shrunk where the
# extreme_pose flag needs it, then the nose height that makes the median pitch error 0.
FACE_3D_RAW = (
    (-0.5, 0.0, 0.0),  # image-left eye (the subject's right eye)
    (0.5, 0.0, 0.0),  # image-right eye
    (0.0, 0.571, -0.35),  # nose tip
    (-0.414, 1.155, -0.10),  # image-left mouth corner
    (0.414, 1.155, -0.10),  # image-right mouth corner
)
DEPTH_SCALE = 1.43  # multiplies the model's z (calibrated; 1 = the anthropometric depths)
NOSE_Y = 0.689  # the nose tip's height below the eye line (calibrated; the 2-D template has 0.571)


def face_3d(depth_scale: float = DEPTH_SCALE, nose_y: float = NOSE_Y, dtype=torch.float64,
            device=None) -> torch.Tensor:
    """The generic 3-D face (5, 3): :data:`FACE_3D_RAW` with its depths scaled by ``depth_scale`` and the
    nose tip at height ``nose_y`` below the eyes (the calibrated defaults)."""
    m = torch.tensor(FACE_3D_RAW, dtype=dtype, device=device)
    m[:, 2] *= depth_scale
    m[2, 1] = nose_y
    return m


def _clean_points(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 5, 2) float64 points with non-finite faces zeroed, and the (N,) mask of usable faces."""
    if not isinstance(points, torch.Tensor):
        points = torch.as_tensor(points)
    if points.dim() == 2:
        points = points[None]
    if points.shape[-2:] != (5, 2):
        raise ValueError(f"points must be (N, 5, 2), got {tuple(points.shape)}")
    p = points.detach().to(torch.float64)
    finite = torch.isfinite(p).all(-1).all(-1)
    p = torch.where(finite[:, None, None], p, torch.zeros_like(p))
    centred = p - p.mean(1, keepdim=True)
    spread = centred.pow(2).sum((1, 2)).sqrt()
    ok = finite & (spread > 1e-6)
    return p, ok


def fit_pose(points: torch.Tensor, model: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weak-perspective fit of the generic 3-D face to (N, 5, 2) points.

    Returns ``(R, s, ok)``: (N, 3, 3) float64 rotations (camera axes), (N,) float64 scales (pixels per
    inter-ocular distance of the model) and the (N,) bool mask of faces with usable points (the others get
    the identity and scale 0). ``model``: a (5, 3) 3-D face, default :func:`face_3d`."""
    p, ok = _clean_points(points)
    n = p.shape[0]
    X = (face_3d() if model is None else torch.as_tensor(model)).to(p.device, torch.float64)
    Xc = X - X.mean(0)
    P = p - p.mean(1, keepdim=True)  # (N, 5, 2)
    # 1. affine camera M (2x3): P ~ Xc @ M^T, then the nearest scaled orthonormal rows
    A = torch.linalg.solve(Xc.T @ Xc, Xc.T)  # (3, 5)
    M = (A @ P).transpose(1, 2)  # (N, 2, 3)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)  # U (N,2,2), S (N,2), Vh (N,2,3)
    R2 = U @ Vh
    r3 = torch.linalg.cross(R2[:, 0], R2[:, 1])
    R = torch.cat([R2, r3[:, None]], 1)
    s = S.mean(1)
    eye = torch.eye(3, dtype=R.dtype, device=R.device).expand(n, 3, 3)
    bad = ~ok | ~torch.isfinite(R).all(-1).all(-1) | ~torch.isfinite(s)
    R = torch.where(bad[:, None, None], eye, R)
    s = torch.where(bad, torch.zeros_like(s), s)
    return R, s, ~bad


def euler_from_rotation(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 3, 3) camera-axes rotations -> (yaw, pitch, roll) in degrees, float64, with
    ``R = Rz(roll) @ Ry(-yaw) @ Rx(-pitch)`` (the module's sign conventions)."""
    beta = torch.asin((-R[:, 2, 0]).clamp(-1.0, 1.0))
    alpha = torch.atan2(R[:, 2, 1], R[:, 2, 2])
    gamma = torch.atan2(R[:, 1, 0], R[:, 0, 0])
    deg = 180.0 / math.pi
    return -beta * deg, -alpha * deg, gamma * deg


def _wrap(deg: torch.Tensor) -> torch.Tensor:
    """Angles to (-180, 180]."""
    return 180.0 - torch.remainder(180.0 - deg, 360.0)


def eye_roll(points: torch.Tensor) -> torch.Tensor:
    """(N, 5, 2) points -> (N,) float32 roll in degrees: the eye line's angle, clockwise as seen positive;
    0 where the eyes coincide or the points are not finite."""
    p, _ = _clean_points(points)
    d = p[:, 1] - p[:, 0]
    roll = torch.atan2(d[:, 1], d[:, 0]) * (180.0 / math.pi)  # atan2(0, 0) = 0
    return _wrap(roll).float()


def head_pose(points: torch.Tensor, model: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """(N, 5, 2) points (any pixels) -> ``{"pose_yaw", "pose_pitch", "pose_roll"}``, each (N,) float32
    degrees in -180..180 on the points' device (conventions: the module docstring). Faces with unusable
    points (non-finite, all at one place) get 0, 0, 0."""
    R, _, ok = fit_pose(points, model)
    yaw, pitch, _ = euler_from_rotation(R)
    roll = eye_roll(points)
    return {"pose_yaw": _wrap(yaw).float(), "pose_pitch": _wrap(pitch).float(), "pose_roll": roll}
