"""The ``manifest`` format: a CSV or Parquet table of image paths and any canonical label columns (a user's own
photos or crops), and the spellings its label values may take."""

from __future__ import annotations

import gzip
import io
import json
import math
import posixpath
from collections import Counter
from collections.abc import Iterable

import numpy as np
import pandas as pd

import storage
from facedata.datasets.base import (
    _LIST_SIZES,
    _SPLIT_ALIASES,
    ATTRIBUTE_COLUMNS,
    CELEBA_ATTRIBUTES,
    FACE_SELECT_COLUMNS,
    LABEL_COLUMNS,
    LIST_COLUMNS,
    SCUT_BEAUTY_RANGE,
    UTKFACE_AGE_RANGE,
    FaceDataset,
    _basename,
    _frame,
    _Skips,
    _Splitter,
    columns_from_attributes,
    log,
    missing,
)
from facedata.datasets.textfiles import _unique_names, csv_records, decode_text
from facedata.paths import normalize_path

# --------------------------------------------------------------------------------------------- manifest


def _read_manifest(uri: str, splitter: _Splitter) -> FaceDataset:
    skips = _Skips()
    columns, records = _manifest_records(uri, skips)
    if "path" not in columns:
        raise ValueError(
            f"manifest {uri} has no 'path' column (columns: {', '.join(map(str, columns))}); "
            "a manifest needs one image path per row, relative to the manifest's folder or absolute"
        )
    base = uri.rsplit("/", 1)[0] if storage.is_s3(uri) else posixpath.dirname(storage.filesystem(uri)[1])
    label_cols = [c for c in LABEL_COLUMNS + FACE_SELECT_COLUMNS if c in columns]
    ignored = [str(c) for c in columns if c not in ("path", "split", *label_cols)]
    if ignored:
        log.warning("manifest %s: columns %s are not label columns (%s) and are not read", uri, ignored,
                    ", ".join(LABEL_COLUMNS + FACE_SELECT_COLUMNS))
    entries = []  # (where, path as written, row)
    for where, rec in records:
        entry = _manifest_row(where, rec, base, label_cols, skips)
        if entry is not None:
            entries.append(entry)
    entries, num_points = _one_landmark_length(entries, skips)
    keys = _split_keys([(written, row["path"]) for _, written, row in entries], base)
    for _, written, row in entries:
        row["split"] = row["split"] or splitter(keys[written])
    table = _frame([row for _, _, row in entries], ["path", "split", *label_cols])
    if "attributes" in table.columns:
        _derive_from_attributes(table)
    return FaceDataset("manifest", uri, table, list(skips), num_points > 0, num_points)


def _manifest_records(uri: str, skips: _Skips) -> tuple[list[str], list[tuple[str, dict]]]:
    """The column names and ``(file:row N, {column: value})`` per row of a CSV or Parquet manifest; a CSV's
    text missing-value spellings (``NA``, ``nan``, ...) as None."""
    data = storage.read_bytes(uri)
    lower, name = uri.lower(), _basename(uri)
    if lower.endswith((".parquet", ".pq")) or data[:4] == b"PAR1":
        raw = pd.read_parquet(io.BytesIO(data))
        raw.columns = _unique_names([str(c).strip() for c in raw.columns])
        return list(raw.columns), [(f"{name}:row {i}", rec) for i, rec in enumerate(raw.to_dict("records"))]
    if lower.endswith((".csv", ".tsv", ".txt")) or lower.endswith(".csv.gz"):
        text = decode_text(gzip.decompress(data) if lower.endswith(".gz") else data, uri)
        columns, lines = csv_records(text, name, skips, "\t" if lower.endswith(".tsv") else ",", file=uri)
        return columns, [(f"{name}:row {i}", {k: _na(v) for k, v in rec.items()}) for i, rec in lines]
    raise ValueError(f"manifest {uri}: expected a .csv or .parquet file")


def _manifest_row(where: str, rec: dict, base: str, label_cols: list[str], skips: _Skips):
    """``(where, path as written, row)`` of one manifest record, the row's ``split`` None where the manifest
    gives none; None when the record is malformed (reported in ``skips``)."""
    path = rec.get("path")
    if not isinstance(path, str) or not path.strip():
        skips.add(where, "empty path")
        return None
    path = path.strip()
    full = path if storage.is_s3(path) or path.startswith(("/", "file://")) else storage.join(base, path)
    split = _manifest_split(rec.get("split"))
    if split is False:
        skips.add(where, f"split {rec.get('split')!r} is not train/val/test")
        return None
    row: dict = {"path": full, "split": split}
    try:
        for col in label_cols:
            row[col] = _manifest_value(col, rec.get(col))
    except ValueError as err:
        skips.add(where, str(err))
        return None
    return where, path, row


def _one_landmark_length(entries: list, skips: _Skips) -> tuple[list, int]:
    """The entries whose landmarks have the length most rows have (a row with another number of points is
    reported and left out: one mistyped row does not stop the read), and that number of points."""
    lengths = Counter(len(row["landmarks"]) for _, _, row in entries if row.get("landmarks") is not None)
    if not lengths:
        return entries, 0
    want = lengths.most_common(1)[0][0]
    kept = []
    for where, written, row in entries:
        got = row.get("landmarks")
        if got is not None and len(got) != want:
            skips.add(where, f"landmarks: expected {want} values ({want // 2} points, as {lengths[want]} rows "
                             f"have), got {len(got)}")
            continue
        kept.append((where, written, row))
    return kept, want // 2


def _split_keys(paths: list[tuple[str, str]], base: str) -> dict[str, str]:
    """``path as written -> the key of its seeded split``, for ``(written, full path)`` pairs. A file written
    one way keeps its text as the key, so the split of a manifest that names each file one way is what it has
    always been (checkpoints record the split seed, and jobs.evaluate reads their test split again). A file
    written several ways (``a.jpg``, ``./a.jpg``, ``/data/a.jpg``) takes one key for all of them, its path
    relative to the manifest's folder as the reader resolves it (absolute when outside it), so that it lands
    in one split: the same file in train and test would be tested on faces it was trained on."""
    spellings: dict[str, set[str]] = {}
    for written, full in paths:
        spellings.setdefault(normalize_path(full), set()).add(written)
    folder = normalize_path(base).rstrip("/") + "/"
    keys = {}
    for file, texts in spellings.items():
        key = next(iter(texts)) if len(texts) == 1 else file.removeprefix(folder)
        keys.update(dict.fromkeys(texts, key))
    return keys


# The texts pandas reads as a missing value (its default na_values): a CSV manifest is read line by line
# (textfiles.csv_records) and keeps meaning what it meant when pandas read it.
_NA_TEXT = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                      "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def _na(text: str) -> str | None:
    return None if text.strip() in _NA_TEXT else text


def _manifest_split(value) -> str | None | bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    key = str(value).strip().lower()
    if not key:
        return None
    try:  # 0 / 1 / 2, also as 1.0 (a Parquet float column); 0.5 is no split
        number = float(key)
    except ValueError:
        number = math.nan
    if number.is_integer():
        key = str(int(number))
    return _SPLIT_ALIASES.get(key, False)


def _derive_from_attributes(table: pd.DataFrame) -> None:
    """A manifest with CelebA's 40 ``attributes`` but no ``gender``/``smile``/``eyeglasses`` column gets them
    from the attributes, as the celeba reader does; a column the manifest has is kept as it is."""
    for col in ATTRIBUTE_COLUMNS:
        if col not in table.columns:
            table[col] = [math.nan if v is None else columns_from_attributes(v)[col] for v in table["attributes"]]


# The usual spellings of the binary labels (case-insensitive), besides the numbers 0 and 1.
_SPELLINGS: dict[str, dict[str, float]] = {
    "gender": {"male": 0.0, "m": 0.0, "man": 0.0, "female": 1.0, "f": 1.0, "woman": 1.0},
    "smile": {"smile": 1.0, "smiling": 1.0, "yes": 1.0, "true": 1.0, "non_smile": 0.0, "no_smile": 0.0,
              "not_smiling": 0.0, "no": 0.0, "false": 0.0},
    "eyeglasses": {"eyeglasses": 1.0, "glasses": 1.0, "yes": 1.0, "true": 1.0, "no_eyeglasses": 0.0,
                   "no_glasses": 0.0, "no": 0.0, "false": 0.0},
}


def _binary_value(col: str, value) -> float:
    """gender / smile / eyeglasses -> 0.0 or 1.0 (NaN when missing). smile and eyeglasses also take CelebA's
    -1 for "no"; gender does not (CelebA's ±1 column is ``Male``, the opposite of our 1 = female)."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        text = value.strip()
        key = text.lower().replace("-", "_").replace(" ", "_")
        if not text:
            return math.nan
        if key in _SPELLINGS[col]:
            return _SPELLINGS[col][key]
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{col}: {value!r} is not one of 0, 1, {', '.join(sorted(_SPELLINGS[col]))}") from None
    else:
        number = _number(col, value)
    if math.isnan(number):
        return math.nan
    if number in (0.0, 1.0):
        return number
    if number == -1.0 and col != "gender":
        return 0.0
    hint = " (gender is 0 = male, 1 = female; CelebA's Male column is the opposite)" if col == "gender" else ""
    raise ValueError(f"{col}: {value!r} is not 0 or 1{hint}")


def _number(col: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{col}: {value!r} is not a number") from err


def text_of(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _list_numbers(col: str, value) -> list[float] | None:
    """A list column's cell as floats (None when missing): a list, a Parquet array, JSON text (``[1, -1, null]``)
    or numbers separated by commas or spaces; the points of a point column as pairs (``[[x, y], ...]``, the
    (T, 2) shape) are flattened, and a null or a missing-value text inside the list is NaN (an attribute not labelled). Anything else (a
    single number, an object) is a ValueError, which reports and skips the row."""
    if missing(value):
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = json.loads(text) if text.startswith("[") else text.replace(",", " ").split()
        except json.JSONDecodeError as err:
            raise ValueError(f"{col}: cannot parse {text[:40]!r}") from err
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise ValueError(f"{col}: expected a list of numbers, got {text_of(value)}")
    items = list(value)
    if col != "attributes" and items and all(isinstance(v, (list, tuple, np.ndarray)) and len(v) == 2 for v in items):
        items = [x for v in items for x in v]
    try:
        return [math.nan if v is None or (isinstance(v, str) and v.strip() in _NA_TEXT) else float(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"{col}: cannot parse {text_of(value)} as a list of numbers") from None


def _manifest_value(col: str, value):
    if col in LIST_COLUMNS:
        values = _list_numbers(col, value)
        if values is None:
            return None
        if col == "attributes" and len(values) != len(CELEBA_ATTRIBUTES):
            raise ValueError(f"attributes: expected {len(CELEBA_ATTRIBUTES)} values, got {len(values)}")
        if col == "landmarks" and len(values) % 2:
            raise ValueError(f"landmarks: expected x, y pairs, got {len(values)} values")
        if col in _LIST_SIZES and (len(values) != _LIST_SIZES[col] or not all(map(math.isfinite, values))):
            raise ValueError(f"{col}: expected {_LIST_SIZES[col]} finite numbers, got {text_of(value)}")
        if col == "face_box" and not (values[2] > values[0] and values[3] > values[1]):
            raise ValueError(f"face_box: expected x1 < x2 and y1 < y2, got {values}")
        return values
    if col in _SPELLINGS:
        return _binary_value(col, value)
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    number = _number(col, value)
    if math.isnan(number):
        return math.nan
    # A value no model can learn is a malformed row, not a label: a race code indexes the race head (7 in a
    # 5-class head, -1 or 2.5 stop the loss; 2.5 would otherwise be cut to 2 without a word), and an age or a
    # score off its scale is a typo or another unit (months, a 1-10 score).
    if col == "race" and not (number >= 0 and number.is_integer()):
        raise ValueError(f"race: {text_of(value)} is not a class code (a whole number 0, 1, ...)")
    if col in _RANGES and not _RANGES[col][0] <= number <= _RANGES[col][1]:
        lo, hi = _RANGES[col]
        raise ValueError(f"{col}: {text_of(value)} is outside {lo:g}-{hi:g} ({_RANGE_WHY[col]})")
    if not math.isfinite(number):
        raise ValueError(f"{col}: {text_of(value)} is not a finite number")
    return number


_RANGES = {"age": UTKFACE_AGE_RANGE, "beauty": SCUT_BEAUTY_RANGE}
_RANGE_WHY = {"age": "years, the ages age_gender_race learns", "beauty": "SCUT-FBP5500's 1-5 scale"}
