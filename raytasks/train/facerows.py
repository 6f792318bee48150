"""The face of every training and validation row and the model's face template, found on the driver before any
worker starts (:func:`resolve_faces`, :func:`measure_template`; :func:`template_choice` says which template).

Split from raytasks/train/job.py (the driver), whose :func:`~raytasks.train.job.prepare` calls these.
"""

from __future__ import annotations

import logging
import warnings

import pandas as pd

import storage
from faces.facecache import DetectionCache
from faces.trainfaces import find_training_faces, landmark_faces
from models.preprocess import Preprocessing
from raytasks.train.spec import TrainError, TrainSpec

log = logging.getLogger(__name__)


def template_choice(spec: TrainSpec, mode: str) -> str:
    """``measured``, ``canonical`` or ``default`` (whole crops without a measured template: label and serve
    align to the canonical one): ``spec.template``, or by default measured for ``whole`` crops and canonical
    for faces found in photos, which sit anywhere. A measured template with ``detect`` suits data sets of
    crops (CelebA, UTKFace, SCUT-FBP5500): their faces are warped to where the data set framed them."""
    if spec.template not in (None, "measured", "canonical"):
        raise TrainError(f"--template must be measured or canonical, got {spec.template!r}")
    if spec.template == "measured" and not spec.template_images:
        raise TrainError("--template measured needs --template-images above 0")
    if spec.template_images and (spec.template == "measured" or (spec.template is None and mode == "whole")):
        return "measured"
    return "canonical" if mode != "whole" else "default"


def resolve_faces(spec: TrainSpec, mode: str, train: pd.DataFrame, val: pd.DataFrame, log_fn=print):
    """The face of every training and validation row (faces/trainfaces.py): ``detect`` runs the detector
    once per file not yet in the cache under ``spec.storage`` (faces/facecache.py), ``landmarks`` takes the
    data's own points, ``whole`` changes nothing. Returns the tables (rows without a face left out) and
    ``{"mode", "detector", "max_side", "template", "report"}`` for the history and the checkpoints."""
    info = {"mode": mode, "detector": None, "max_side": None, "template": template_choice(spec, mode), "report": None}
    detector, max_side = (spec.face_options or {}).get("detector"), (spec.face_options or {}).get("max_side")
    if (detector and mode != "detect") or (max_side and mode == "whole"):
        raise TrainError(f"--faces {mode}: the detector's settings (--det-*, --min-face, --max-faces) apply to "
                         f"--faces detect only{', --max-side to detect and landmarks' if max_side else ''}")
    if mode == "whole":
        return train, val, info
    from faces.finder import FaceFinder, FaceOptions

    try:
        options = FaceOptions.from_dict({**spec.face_options, "mode": "detect"})
    except ValueError as e:
        raise TrainError(f"face settings: {e}") from None
    info["max_side"] = options.max_side
    both = pd.concat([train.assign(_part="train"), val.assign(_part="val")], ignore_index=True)
    if mode == "landmarks":
        try:
            both, report = landmark_faces(both)
        except ValueError as e:
            raise TrainError(f"{spec.data}: {e}") from None
    else:
        import torch

        finder = FaceFinder(options, device="cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu")
        shown = [0.0]

        def progress(r, total):  # a line every 30 s of a long first pass
            if r.seconds - shown[0] >= 30 and r.images < total:
                shown[0] = r.seconds
                log_fn(f"faces: {r.images}/{total} images, {r.cached} from the cache, {r.detected} detected, "
                       f"{r.images / r.seconds:.1f} images/s")

        both, report = find_training_faces(both, finder, DetectionCache(spec.storage, finder.identity),
                                           progress=progress)
        info["detector"] = finder.identity
    log_fn(report.line())
    if report.used == 0:
        raise TrainError(f"{spec.data}: no training or validation image has a face ({report.line()}); the first "
                         f"skipped: {'; '.join(f'{p}: {r}' for p, r in report.skipped[:3])}")
    info["report"] = report.to_dict()
    parts = both.pop("_part")
    return both[parts == "train"].reset_index(drop=True), both[parts == "val"].reset_index(drop=True), info


def measure_template(ds, train: pd.DataFrame, pre: Preprocessing, spec: TrainSpec) -> Preprocessing:
    """The model's face template measured on its training images (faces/templates.py), so that label and
    serve align a face found in a photo the way the training crops were; the checkpoint keeps it."""
    from faces.finder import FaceFinder
    from faces.templates import derive_template

    paths = list(train["path"])
    marks = None
    if "landmarks" in ds.table.columns:
        by_path = dict(zip(ds.table["path"], ds.table["landmarks"]))
        marks = [by_path.get(p) for p in paths]
    finder = None if marks is not None and any(m is not None for m in marks) else FaceFinder()
    try:
        pre, report = derive_template(paths, storage.read_bytes, pre, marks, finder, spec.template_images, spec.seed)
    except ValueError as e:
        warnings.warn(f"{spec.data}: {e}; the model keeps its default face template", stacklevel=2)
        return pre
    log.info(report.line())
    print(report.line(), flush=True)
    return pre
