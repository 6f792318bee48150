"""Readers of the data sets of aligned face crops: CelebA, UTKFace and SCUT-FBP5500 (each in its release's own
layout; the formats are described in facedata/datasets/__init__.py)."""

from __future__ import annotations

import math

import storage
from facedata.datasets.base import (
    _PARTITION,
    _SCUT_NAME,
    _UTK_NAME,
    _UTK_SUFFIXES,
    CELEBA_ATTR_FILE,
    CELEBA_ATTRIBUTES,
    CELEBA_IMAGES,
    CELEBA_LANDMARK_FILE,
    CELEBA_PARTITION_FILE,
    SCUT_BEAUTY_RANGE,
    SCUT_IMAGES,
    SCUT_LABELS,
    SCUT_SPLIT_DIR,
    UTKFACE_AGE_RANGE,
    UTKFACE_RACES,
    FaceDataset,
    _basename,
    _frame,
    _list_images,
    _relpath,
    _Skips,
    _Splitter,
    columns_from_attributes,
    log,
)
from facedata.datasets.classcodes import SCUT_RACES
from facedata.datasets.textfiles import read_lines

# --------------------------------------------------------------------------------------------- CelebA


def _read_celeba(root: str, splitter: _Splitter) -> FaceDataset:
    skips = _Skips()
    attr_uri = storage.join(root, CELEBA_ATTR_FILE)
    if not storage.exists(attr_uri):
        raise FileNotFoundError(f"CelebA attribute file {attr_uri} not found")
    images = _list_images(storage.join(root, CELEBA_IMAGES))
    by_name = {_basename(u): u for u in images}
    by_stem: dict[str, str] = {}
    for name, u in by_name.items():
        by_stem.setdefault(name.rsplit(".", 1)[0], u)

    attrs = _read_celeba_attributes(attr_uri, skips)
    landmarks, num_points = _read_celeba_landmarks(storage.join(root, CELEBA_LANDMARK_FILE), skips)
    partition = _read_celeba_partition(storage.join(root, CELEBA_PARTITION_FILE), skips)

    rows = []
    for name, values in attrs.items():
        path = by_name.get(name) or by_stem.get(name.rsplit(".", 1)[0])
        if path is None:
            skips.add(f"{CELEBA_ATTR_FILE}:{name}", f"image {CELEBA_IMAGES}/{name} is missing")
            continue
        row = {
            "path": path,
            "split": partition.get(name) or splitter(name),
            **columns_from_attributes(values),
            "attributes": [float(v) for v in values],
        }
        if num_points:
            row["landmarks"] = landmarks.get(name)
        rows.append(row)
    unlabelled = len(by_name) - len(rows)
    if unlabelled > 0:
        log.info("celeba:%s: %d images have no attribute line and are not used", root, unlabelled)
    columns = ["path", "split", "gender", "smile", "eyeglasses", "attributes"]
    if num_points:
        columns.append("landmarks")
    table = _frame(rows, columns)
    has_landmarks = bool(num_points) and bool(table["landmarks"].notna().any())
    return FaceDataset("celeba", root, table, list(skips), has_landmarks, num_points if has_landmarks else 0)


def _read_celeba_attributes(uri: str, skips: _Skips) -> dict[str, list[int]]:
    lines = read_lines(uri)
    if len(lines) < 2:
        raise ValueError(f"{uri}: expected a count line and a header line")
    header = lines[1].split()
    if sorted(header) != sorted(CELEBA_ATTRIBUTES):
        unknown = sorted(set(header) - set(CELEBA_ATTRIBUTES))
        missing = sorted(set(CELEBA_ATTRIBUTES) - set(header))
        raise ValueError(f"{uri}: header is not the 40 CelebA attributes (unknown {unknown}, missing {missing})")
    order = [header.index(a) for a in CELEBA_ATTRIBUTES]
    out: dict[str, list[int]] = {}
    for lineno, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        where = f"{CELEBA_ATTR_FILE}:{lineno}"
        name = fields[0]
        if len(fields) != 1 + len(header):
            skips.add(where, f"{name}: expected {len(header)} values, got {len(fields) - 1}")
            continue
        if any(v not in ("1", "-1") for v in fields[1:]):
            bad = next(v for v in fields[1:] if v not in ("1", "-1"))
            skips.add(where, f"{name}: value {bad!r} is not 1 or -1")
            continue
        if name in out:
            skips.add(where, f"{name}: duplicate line")
            continue
        values = fields[1:]
        out[name] = [int(values[i]) for i in order]
    declared, present = lines[0].strip(), sum(1 for x in lines[2:] if x.strip())
    if declared.isdigit() and int(declared) != present:
        log.warning("%s: count line says %s rows, the file has %d", uri, declared, present)
    return out


def _read_celeba_landmarks(uri: str, skips: _Skips) -> tuple[dict[str, list[float]], int]:
    if not storage.exists(uri):
        return {}, 0
    lines = read_lines(uri)
    out: dict[str, list[float]] = {}
    num_values = 0
    header = lines[1].split() if len(lines) > 1 else []
    if header and len(header) % 2 == 0 and not any(_is_number(h) for h in header):
        num_values = len(header)
    start = 2 if num_values else 1
    for lineno, line in enumerate(lines[start:], start=start + 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{CELEBA_LANDMARK_FILE}:{lineno}"
        if not num_values:
            num_values = len(fields) - 1
        if len(fields) != 1 + num_values or num_values % 2:
            why = (f"expected {num_values} coordinates, got {len(fields) - 1}" if len(fields) != 1 + num_values
                   else f"{num_values} coordinates are no (x, y) pairs")
            skips.add(where, f"{fields[0]}: {why}")
            continue
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            skips.add(where, f"{fields[0]}: coordinates are not numbers")
            continue
        if any(v < 0 or not math.isfinite(v) for v in values):
            skips.add(where, f"{fields[0]}: negative or non-finite coordinate")
            continue
        out[fields[0]] = values
    return out, num_values // 2 if out else 0


def _read_celeba_partition(uri: str, skips: _Skips) -> dict[str, str]:
    if not storage.exists(uri):
        return {}
    out: dict[str, str] = {}
    for lineno, line in enumerate(read_lines(uri), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in _PARTITION:
            skips.add(f"{CELEBA_PARTITION_FILE}:{lineno}", f"expected 'name 0|1|2', got {line.strip()[:80]!r}")
            continue
        out[fields[0]] = _PARTITION[fields[1]]
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------- UTKFace


def parse_utkface_name(name: str) -> tuple[int, int, int]:
    """``"26_1_2_20170116174525125.jpg.chip.jpg"`` -> ``(age, gender, race)``; ValueError with the reason
    when the name does not carry three valid labels."""
    m = _UTK_NAME.match(name)
    if not m:
        fields = name.split("_")
        if len(fields) < 4:
            raise ValueError(
                f"missing a label field: expected age_gender_race_datetime, found {len(fields)} '_'-separated fields"
            )
        raise ValueError("age, gender and race fields are not integers")
    age, gender, race = int(m["age"]), int(m["gender"]), int(m["race"])
    if not UTKFACE_AGE_RANGE[0] <= age <= UTKFACE_AGE_RANGE[1]:
        raise ValueError(f"age {age} outside {UTKFACE_AGE_RANGE[0]}-{UTKFACE_AGE_RANGE[1]}")
    if gender not in (0, 1):
        raise ValueError(f"gender {gender} is not 0 or 1")
    if not 0 <= race < len(UTKFACE_RACES):
        raise ValueError(f"race {race} outside 0-{len(UTKFACE_RACES) - 1}")
    return age, gender, race


def _read_utkface(root: str, splitter: _Splitter) -> FaceDataset:
    skips = _Skips()
    rows = []
    for uri in _list_images(root):
        name = _basename(uri)
        if not name.lower().endswith(_UTK_SUFFIXES):
            continue
        try:
            age, gender, race = parse_utkface_name(name)
        except ValueError as err:
            skips.add(_relpath(uri, root), str(err))
            continue
        rows.append({"path": uri, "split": splitter(name), "age": age, "gender": gender, "race": race})
    table = _frame(rows, ["path", "split", "age", "gender", "race"])
    return FaceDataset("utkface", root, table, list(skips))


# --------------------------------------------------------------------------------------------- SCUT-FBP5500


def _read_scut_scores(uri: str, skips: _Skips, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for lineno, line in enumerate(read_lines(uri), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label}:{lineno}"
        if len(fields) != 2:
            skips.add(where, f"expected 'name score', got {line.strip()[:80]!r}")
            continue
        try:
            score = float(fields[1])
        except ValueError:
            skips.add(where, f"{fields[0]}: score {fields[1]!r} is not a number")
            continue
        if not SCUT_BEAUTY_RANGE[0] <= score <= SCUT_BEAUTY_RANGE[1]:
            skips.add(where, f"{fields[0]}: score {score} outside {SCUT_BEAUTY_RANGE[0]:g}-{SCUT_BEAUTY_RANGE[1]:g}")
            continue
        if not _SCUT_NAME.match(fields[0]):
            skips.add(where, f"{fields[0]}: name does not start with A/C (race) then F/M (gender)")
            continue
        out[fields[0]] = score
    return out


def _read_scut(root: str, splitter: _Splitter) -> FaceDataset:
    skips = _Skips()
    images = {_basename(u): u for u in _list_images(storage.join(root, SCUT_IMAGES))}
    scores: dict[str, float] = {}
    given_split: dict[str, str] = {}
    all_labels = storage.join(root, SCUT_LABELS)
    train_uri, test_uri = (storage.join(root, SCUT_SPLIT_DIR, f) for f in ("train.txt", "test.txt"))
    have_all = storage.exists(all_labels)
    if have_all:
        scores.update(_read_scut_scores(all_labels, skips, "All_labels.txt"))
    if storage.exists(train_uri) and storage.exists(test_uri):
        for split, uri in (("train", train_uri), ("test", test_uri)):
            part = _read_scut_scores(uri, skips if not have_all else _Skips(), f"{split}.txt")
            for name, score in part.items():
                scores.setdefault(name, score)
                given_split[name] = split
    elif not have_all:
        raise FileNotFoundError(f"neither {all_labels} nor the split files under {SCUT_SPLIT_DIR} exist")

    rows = []
    for name, score in scores.items():
        path = images.get(name)
        if path is None:
            skips.add(f"{SCUT_IMAGES}/{name}", "image listed in the labels is missing")
            continue
        m = _SCUT_NAME.match(name)
        split = given_split.get(name)
        if split == "train":
            split = splitter.carve_val(name)
        elif split is None:
            split = splitter(name)
        rows.append(
            {
                "path": path,
                "split": split,
                "gender": 1.0 if m["gender"] == "F" else 0.0,
                "race": float(SCUT_RACES.index("Asian" if m["race"] == "A" else "Caucasian")),
                "beauty": score,
            }
        )
    table = _frame(rows, ["path", "split", "gender", "race", "beauty"])
    return FaceDataset("scut_fbp5500", root, table, list(skips))
