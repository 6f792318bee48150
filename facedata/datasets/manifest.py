"""The ``manifest`` format: a CSV or Parquet table of image paths and any canonical label columns (a user's own
photos or crops), and the spellings its label values may take."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import posixpath

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
)

# --------------------------------------------------------------------------------------------- manifest


def _read_manifest(uri: str, splitter: _Splitter) -> FaceDataset:
    skips = _Skips()
    data = storage.read_bytes(uri)
    lower, name = uri.lower(), _basename(uri)
    if lower.endswith((".parquet", ".pq")) or data[:4] == b"PAR1":
        raw = pd.read_parquet(io.BytesIO(data))
        columns = list(raw.columns)
        records = [(f"{name}:row {i}", rec) for i, rec in enumerate(raw.to_dict("records"))]
    elif lower.endswith((".csv", ".tsv", ".txt")) or lower.endswith(".csv.gz"):
        text = gzip.decompress(data) if lower.endswith(".gz") else data
        columns, lines = _csv_records(text, name, skips, "\t" if lower.endswith(".tsv") else ",")
        records = [(f"{name}:row {i}", {k: _na(v) for k, v in rec.items()}) for i, rec in lines]
    else:
        raise ValueError(f"manifest {uri}: expected a .csv or .parquet file")
    if "path" not in columns:
        raise ValueError(
            f"manifest {uri} has no 'path' column (columns: {', '.join(map(str, columns))}); "
            "a manifest needs one image path per row, relative to the manifest's folder or absolute"
        )
    base = uri.rsplit("/", 1)[0] if storage.is_s3(uri) else posixpath.dirname(storage.filesystem(uri)[1])

    label_cols = [c for c in LABEL_COLUMNS + FACE_SELECT_COLUMNS if c in columns]
    rows = []
    for where, rec in records:
        path = rec.get("path")
        if not isinstance(path, str) or not path.strip():
            skips.add(where, "empty path")
            continue
        path = path.strip()
        full = path if storage.is_s3(path) or path.startswith(("/", "file://")) else storage.join(base, path)
        split = _manifest_split(rec.get("split"))
        if split is False:
            skips.add(where, f"split {rec.get('split')!r} is not train/val/test")
            continue
        row: dict = {"path": full, "split": split or splitter(path)}
        try:
            for col in label_cols:
                row[col] = _manifest_value(col, rec.get(col))
        except ValueError as err:
            skips.add(where, str(err))
            continue
        rows.append(row)
    table = _frame(rows, ["path", "split", *label_cols])
    if "attributes" in table.columns:
        _derive_from_attributes(table)
    num_points = 0
    if "landmarks" in table.columns:
        lengths = {len(v) for v in table["landmarks"] if v is not None}
        if len(lengths) > 1:
            raise ValueError(f"manifest {uri}: landmark lists have different lengths {sorted(lengths)}")
        num_points = lengths.pop() // 2 if lengths else 0
    return FaceDataset("manifest", uri, table, list(skips), num_points > 0, num_points)


# The texts pandas reads as a missing value (its default na_values): a CSV manifest is read line by line
# (_csv_records) and keeps meaning what it meant when pandas read it.
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


def _manifest_value(col: str, value):
    if col in LIST_COLUMNS:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return None
            try:
                value = json.loads(text) if text.startswith("[") else text.replace(",", " ").split()
            except json.JSONDecodeError as err:
                raise ValueError(f"{col}: cannot parse {text[:40]!r}") from err
        values = [float(v) for v in list(value)]
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


def _csv_records(data: bytes, label: str, skips: _Skips, sep: str = ",") -> tuple[list[str], list[tuple[int, dict]]]:
    """The header and the data rows of a CSV file: ``(row, {column: text})`` per row, ``row`` counting the data
    rows from 0 (the readers' ``file:row N``), each field's text as written and "" for a field that a short row
    lacks. Read line by line, not with pandas, because pandas stops the whole read on a line with more fields
    than the header ("Expected 5 fields in line 3, saw 6") and its skip option does not say which line it was:
    such a line is reported in ``skips`` as ``file:line N`` (its line in the file) and left out, since its
    fields cannot be matched to the columns."""
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""), delimiter=sep)
    header: list[str] | None = None
    rows: list[tuple[int, dict]] = []
    line, index = 1, -1
    for fields in reader:
        start, line = line, reader.line_num + 1  # a quoted field may span lines: report the first
        if not fields:
            continue  # a blank line, as pandas skips it
        if header is None:
            header = _unique_names(fields)
            continue
        index += 1  # a bad line counts too, so that a row's number does not depend on the lines before it
        if len(fields) > len(header):
            text = sep.join(fields)
            skips.add(f"{label}:line {start}", f"expected {len(header)} fields ({sep.join(header)}), got "
                      f"{len(fields)}: {text[:80]!r}")
            continue
        rows.append((index, dict(zip(header, fields + [""] * (len(header) - len(fields))))))
    if header is None:
        raise ValueError(f"{label}: empty, expected a header line")
    return header, rows


def _unique_names(names: list[str]) -> list[str]:
    """Column names as pandas makes them unique (the second ``x`` is ``x.1``), so a repeated column does not
    silently replace the first."""
    out: list[str] = []
    for name in names:
        new, k = name, 0
        while new in out:
            k += 1
            new = f"{name}.{k}"
        out.append(new)
    return out
