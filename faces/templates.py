"""A model's face template, measured on its training data (the train job calls :func:`derive_template`).

The template says where the 5 points sit in the faces a model learned from, so that a face found in a photo
is warped to look like them (faces/align.py). It is measured, not assumed, because every data set crops
differently: CelebA's aligned crops put the eyes at about 51 % of the height, UTKFace's chips lower and
closer together, and the drawn faces of ``jobs.synth`` elsewhere again.

* With 5-point landmarks in the data (CelebA's ``list_landmarks_align_celeba.txt``, a manifest's
  ``landmarks`` column), the template is their per-coordinate median.
* Without, the detector runs over a seeded sample of the training images (their own crops, decoded whole)
  and the template is the median of each image's best face's points. Images where no face is found are left
  out and counted.

The points are measured in the frame of the training crops (the most common image size of the sample;
images of other sizes are left out, as their points are in another frame) and mapped into the model's input
through the model's own resize (``faces.align.input_to_crop``), so ``Preprocessing.template`` is in input
pixels and ``template_crop`` keeps the crop size.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch

from faces.align import input_to_crop
from models.imagebytes import ImageDecodeError, open_image
from models.photo import axis_scales
from models.preprocess import Preprocessing, decode_photo

log = logging.getLogger(__name__)

DEFAULT_SAMPLE = 256  # images measured per training set (median of 256 points: well within a pixel here)


@dataclasses.dataclass
class TemplateReport:
    """How a template was measured: from ``landmarks`` or the ``detector``, over how many images."""

    source: str
    images: int
    used: int
    no_face: int
    crop: tuple[int, int]
    template: list[list[float]]

    def line(self) -> str:
        pts = " ".join(f"({x:.1f},{y:.1f})" for x, y in self.template)
        return (f"face template from {self.source} of {self.used}/{self.images} training images "
                f"({self.crop[1]}x{self.crop[0]} crops; {self.no_face} without a face): {pts} in input pixels")


def derive_template(paths: Sequence[str], read: Callable[[str], bytes], pre: Preprocessing,
                    landmarks: Sequence | None = None, finder=None, sample: int = DEFAULT_SAMPLE,
                    seed: int = 0) -> tuple[Preprocessing, TemplateReport]:
    """``pre`` with the template of the training images ``paths`` (see the module docstring). ``landmarks``:
    per path a list of 10 numbers (x, y of the 5 points in the file's pixels) or None. ``finder``: a
    ``faces.finder.FaceFinder``, needed when there are no landmarks."""
    order = np.random.default_rng(seed).permutation(len(paths))[:sample]
    have_marks = landmarks is not None and any(_five(landmarks[i]) is not None for i in order)
    if not have_marks and finder is None:
        raise ValueError("no landmarks in the data: a face finder is needed to measure the template")
    points: list[tuple[tuple[int, int], np.ndarray]] = []
    no_face = 0
    for i in order:
        try:
            data = read(paths[i])
            if have_marks:
                p = _five(landmarks[i])
                if p is None:
                    continue
                _, (w, h) = open_image(data)
                points.append(((h, w), p))
                continue
            img, (w, h), scale = decode_photo(data)
        except (ImageDecodeError, OSError) as e:
            log.warning("template: skipping %s: %s", paths[i], e)
            continue
        found = finder.find([img], [scale])[0]
        if len(found) == 0:
            no_face += 1
            continue
        points.append(((h, w), found.points[0].double().cpu().numpy() * np.array(axis_scales((w, h), (img.shape[-1], img.shape[-2])))))
    if not points:
        raise ValueError(f"no face found in {len(order)} training images: cannot measure a face template")
    crop, _ = Counter(size for size, _ in points).most_common(1)[0]
    same = np.stack([p for size, p in points if size == crop])
    median = torch.from_numpy(np.median(same, axis=0))
    with_crop = dataclasses.replace(pre, template_crop=crop, template=None)
    G = input_to_crop(with_crop)
    inv = torch.linalg.inv(G)
    tmpl = (inv[:2, :2] @ median.T).T + inv[:2, 2]
    out = dataclasses.replace(with_crop, template=tuple(map(tuple, tmpl.tolist())))
    report = TemplateReport("landmarks" if have_marks else "the detector", len(order), len(same), no_face, crop,
                            [list(p) for p in out.template])
    return out, report


def _five(v) -> np.ndarray | None:
    if v is None:
        return None
    try:
        arr = np.asarray(v, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return None
    if arr.size != 10 or not np.isfinite(arr).all():
        return None
    return arr.reshape(5, 2)
