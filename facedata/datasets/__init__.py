"""Readers for the face datasets the models train on, from a local folder or an ``s3://`` prefix.

``read_dataset("FORMAT:URI")`` returns a :class:`FaceDataset`: one row per usable image with its full
``path`` (readable with :func:`storage.read_bytes`), its ``split`` (``train`` / ``val`` / ``test``)
and the *canonical* label columns every model output consumes:

============  ===========================================================================================
column        meaning
============  ===========================================================================================
gender        float, 0 = male, 1 = female (CelebA: ``Male == 1`` -> 0)
race          float class index (UTKFace: :data:`UTKFACE_RACES`; SCUT-FBP5500: :data:`SCUT_RACES`)
age           float, years
beauty        float, 1-5
attributes    list of the 40 CelebA values, +1 / -1, in :data:`CELEBA_ATTRIBUTES` order (NaN: not labelled; a
              model with these reads a row that has none from gender, smile and eyeglasses,
              ``FaceDataset.for_labels``)
smile         float 0 / 1 (CelebA ``Smiling``)
eyeglasses    float 0 / 1 (CelebA ``Eyeglasses``)
landmarks     list of 2T floats ``[x1, y1, x2, y2, ...]`` in the pixel coordinates of the image file, or None
============  ===========================================================================================

A format only has the columns it can fill; a missing value is NaN (None in the list columns).

Formats (``FORMAT`` in the spec):

* ``celeba`` - ``img_align_celeba/*.jpg`` + ``list_attr_celeba.txt``; optional
  ``list_landmarks_align_celeba.txt`` (5 points) and ``list_eval_partition.txt`` (0/1/2 -> train/val/test).
* ``utkface`` - labels in the file name ``[age]_[gender]_[race]_[date&time].jpg.chip.jpg`` (or ``.jpg``),
  files possibly nested in sub-folders.
* ``scut_fbp5500`` - ``Images/{A,C}{F,M}N.jpg`` + ``train_test_files/All_labels.txt`` and/or the 60/40 split
  files ``train_test_files/split_of_60%training and 40%testing/{train,test}.txt``; gender and race come from
  the file-name prefix.
* ``genki4k`` - GENKI-4K's photos (not aligned) and ``labels.csv`` (``file,smile,yaw,pitch,roll``) or the
  release's ``labels.txt`` + ``files/``: ``smile`` and the pose (facedata/datasets/genki.py).
* ``manifest`` - a CSV or Parquet file with a ``path`` column (relative paths are resolved against the
  manifest's folder or prefix), any canonical label columns and an optional ``split`` column; for photos of
  several people, ``face_box`` or ``face_points`` (:data:`FACE_SELECT_COLUMNS`) name the face a row's labels
  are about. ``gender``
  also takes ``male``/``female`` (``m``/``f``); ``smile`` and ``eyeglasses`` take ``yes``/``no``,
  ``true``/``false``, the model's class names (``smile``/``non_smile``, ``eyeglasses``/``no_eyeglasses``)
  and CelebA's ``-1`` for no; ``race`` is a class code (a whole number 0, 1, ...), ``age`` 0-116 years
  (UTKFace's range, age_gender_race's bins), ``beauty`` 1-5 (SCUT-FBP5500's scale). With ``attributes`` and
  without ``gender``/``smile``/``eyeglasses`` those three are filled from the attributes (``Male``,
  ``Smiling``, ``Eyeglasses``; an attribute left NaN leaves its column missing). A list column takes a list,
  JSON text (``null`` for NaN) or numbers separated by commas or spaces; points may be pairs (``[[x, y], ...]``).

Malformed entries (a bad file name, a line with the wrong number of fields, a value out of range, a label
row whose image is missing, a manifest row whose landmarks have another length than most rows) never stop a
read: each is logged with ``logging.warning`` and listed in ``FaceDataset.skipped`` as ``(file or file:line,
reason)``. A label file that cannot be read at all is a ValueError naming the file and what to do: bytes that
are not UTF-8 (a leading BOM is fine), or a CSV quote that never closes (facedata/datasets/textfiles.py).

When the data carries no split, :func:`seeded_split` assigns one from a hash of ``(seed, file name)``: the
same on every worker and independent of listing order (a manifest's: of the path as written, one key for all
the spellings of one file, manifest.py ``_split_keys``). ``jobs.train`` reads with ``--split-seed`` (not its
``--seed``, so that every training seed holds out the same test faces), records it in the checkpoint
(``extra["split_seed"]``), and ``jobs.evaluate`` reads that split by default.

``read_dataset([SPEC, SPEC, ...])`` reads several data sets as one (``jobs.train --data A --data B``): the
union of their columns, each source filling the labels it has and keeping its own split (a file that several
sources list takes the first one's); a label a source lacks is missing, which the losses and metrics leave out
(facedata/datasets/mixed.py).

Modules: ``base.py`` (the columns, :class:`FaceDataset`, the spec and the split), ``classcodes.py`` (what a
class-coded column's codes mean in each format, and the rule comparing them), ``crops.py`` (CelebA,
UTKFace, SCUT-FBP5500), ``genki.py``, ``manifest.py``, ``mixed.py``, ``textfiles.py`` (the label files'
text: decoding, lines, CSV records).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from facedata.datasets.base import (  # noqa: F401 - the package's API, as facedata/datasets.py had it
    ATTRIBUTE_COLUMNS,
    CELEBA_ATTR_FILE,
    CELEBA_ATTRIBUTES,
    CELEBA_IMAGES,
    CELEBA_LANDMARK_FILE,
    CELEBA_LANDMARKS,
    CELEBA_PARTITION_FILE,
    DATASET_MODELS,
    FACE_SELECT_COLUMNS,
    FORMATS,
    LABEL_COLUMNS,
    LIST_COLUMNS,
    MODEL_LABELS,
    SCUT_IMAGES,
    SCUT_LABELS,
    SCUT_SPLIT_DIR,
    SPLITS,
    UTKFACE_AGE_RANGE,
    UTKFACE_RACES,
    FaceDataset,
    _Splitter,
    attributes_from_columns,
    columns_from_attributes,
    parse_spec,
    seeded_split,
)
from facedata.datasets.classcodes import SCUT_RACES  # noqa: F401
from facedata.datasets.crops import _read_celeba, _read_scut, _read_utkface, parse_utkface_name  # noqa: F401
from facedata.datasets.genki import read_genki
from facedata.datasets.manifest import _read_manifest, text_of  # noqa: F401
from facedata.datasets.mixed import MIXED, SOURCE, mix  # noqa: F401

log = logging.getLogger(__name__)

def read_dataset(
    spec: str | Sequence[str], *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> FaceDataset:
    """Read a dataset given as ``"FORMAT:URI"`` (local folder, ``s3://`` prefix, or manifest file), or several
    such specs as one mixed data set, each source filling the labels it has (facedata/datasets/mixed.py)."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions val={val_fraction} test={test_fraction}")
    if not isinstance(spec, str):
        specs = list(spec)
        if not specs:
            raise ValueError("no data set given")
        if len(specs) > 1:
            return mix([read_dataset(s, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
                        for s in specs])
        spec = specs[0]
    fmt, uri = parse_spec(spec)
    reader = _READERS[fmt]
    ds = reader(uri, _Splitter(seed, val_fraction, test_fraction))
    if ds.skipped:
        log.warning("%s:%s: skipped %d malformed entries", fmt, uri, len(ds.skipped))
    return ds


_READERS = {
    "celeba": _read_celeba,
    "utkface": _read_utkface,
    "scut_fbp5500": _read_scut,
    "genki4k": read_genki,
    "manifest": _read_manifest,
}
