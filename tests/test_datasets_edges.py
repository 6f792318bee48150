"""The training data readers on label files as users write them (facedata/datasets): unlabelled attributes,
stray quotes, the usual spellings of a list, one file under several spellings, one row with another number of
landmarks, another encoding, short lines, a BOM and spaces in a header. A malformed line is reported and
skipped; a file that cannot be read is a ValueError naming it. Small hand-written files, no Ray."""

from __future__ import annotations

import math
import os
import re

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facedata.datasets import CELEBA_ATTRIBUTES, read_dataset, seeded_split
from facedata.datasets.base import columns_from_attributes
from tests.images import png_bytes, write_files

BOM = "\ufeff"


def _manifest(tmp_path, text: str, name: str = "m.csv") -> str:
    (tmp_path / name).write_text(text, encoding="utf-8", newline="")
    return f"manifest:{tmp_path / name}"


def _names(ds) -> list[str]:
    return [p.rsplit("/", 1)[1] for p in ds.table["path"]]


# ------------------------------------------------------------------------- 1: unlabelled attributes stay missing


def test_unlabelled_male_smiling_eyeglasses_leave_gender_smile_eyeglasses_missing(tmp_path):
    only_young = [None] * 40
    only_young[CELEBA_ATTRIBUTES.index("Young")] = 1
    table = pa.table({"path": ["a.jpg", "b.jpg"],
                      "attributes": pa.array([only_young, [1] * 40], type=pa.list_(pa.int64()))})
    pq.write_table(table, tmp_path / "m.parquet")
    ds = read_dataset(f"manifest:{tmp_path / 'm.parquet'}")
    a, b = ds.table.to_dict("records")
    assert all(math.isnan(a[c]) for c in ("gender", "smile", "eyeglasses"))  # not female, no smile, no glasses
    assert (b["gender"], b["smile"], b["eyeglasses"]) == (0.0, 1.0, 1.0)
    text = " ".join("1" if n == "Young" else "nan" for n in CELEBA_ATTRIBUTES)
    csv = read_dataset(_manifest(tmp_path, f'path,attributes\na.jpg,"{text}"\n'))
    assert csv.table[["gender", "smile", "eyeglasses"]].isna().all(axis=None)
    assert csv.compatible_models() == ("dmm_cnn",)  # no gender label: age_gender_race and hmtnet cannot train
    assert math.isnan(columns_from_attributes([math.nan] * 40)["gender"])


# ------------------------------------------------------------------------- 3: a stray quote


def test_a_quote_that_never_closes_refuses_the_manifest_naming_its_line(tmp_path):
    lines = [f"{i}.jpg,{i % 2}\n" for i in range(1000)]
    lines[5] = '"5.jpg,1\n'  # line 7 of the file
    spec = _manifest(tmp_path, "path,gender\n" + "".join(lines))
    with pytest.raises(ValueError, match=r"m\.csv: line 7 opens a quote .* never closed"):
        read_dataset(spec)
    more = [f"{i}.jpg,{i % 2}\n" for i in range(20000)]  # past csv's 128 KiB field limit
    big = _manifest(tmp_path, "path,gender\n" + "".join(lines + more), "big.csv")
    with pytest.raises(ValueError, match=r"big\.csv: line 7 opens a quote"):
        read_dataset(big)


def test_a_quote_that_closes_on_a_later_line_or_mid_field_skips_those_lines_only(tmp_path):
    spec = _manifest(tmp_path, 'path,gender\na.jpg,0\n"b.jpg,1\nc.jpg,0\nd.jpg",1\n"e"x.jpg,1\nf.jpg,1\n')
    ds = read_dataset(spec)
    assert _names(ds) == ["a.jpg", "f.jpg"]
    reasons = dict(ds.skipped)
    assert "several lines" in reasons["m.csv:lines 3-5"]
    assert "m.csv:line 6" in reasons


# ------------------------------------------------------------------------- 4: how users write a list


def test_list_columns_take_json_null_point_pairs_and_report_what_is_no_list(tmp_path):
    nul = ",".join(["1"] * 39 + ["null"])
    pairs = "[[1,2],[3,4],[5,6],[7,8],[9,10]]"
    spec = _manifest(tmp_path, f'path,attributes,landmarks,face_points\na.jpg,"[{nul}]","{pairs}","{pairs}"\n'
                               'b.jpg,,"[[1,2],3]",\nc.jpg,,"[[1,2,3],[4,5,6]]",\n')
    ds = read_dataset(spec)
    row = ds.table.iloc[0]
    assert row["attributes"][:39] == [1.0] * 39 and math.isnan(row["attributes"][39])
    assert row["landmarks"] == row["face_points"] == [float(v) for v in range(1, 11)]
    assert ds.num_landmarks == 5 and len(ds) == 1
    reasons = dict(ds.skipped)  # mixed nesting, and triples that are no (x, y) points: reported, not guessed
    assert "landmarks: cannot parse" in reasons["m.csv:row 1"] and "landmarks: cannot parse" in reasons["m.csv:row 2"]

    pd.DataFrame({"path": ["a.jpg", "b.jpg"], "attributes": [1.0, 2.0]}).to_parquet(tmp_path / "s.parquet")
    ds = read_dataset(f"manifest:{tmp_path / 's.parquet'}")  # a number where a list belongs: reported
    assert len(ds) == 0 and [w for w, _ in ds.skipped] == ["s.parquet:row 0", "s.parquet:row 1"]
    assert "expected a list of numbers, got 1.0" in ds.skipped[0][1]


# ------------------------------------------------------------------------- 6: one file, several spellings


def test_one_file_written_several_ways_lands_in_one_split(tmp_path):
    lines = [f"{s},{i % 2}\n" for i in range(60) for s in (f"img{i}.jpg", f"./img{i}.jpg", f"{tmp_path}/img{i}.jpg")]
    ds = read_dataset(_manifest(tmp_path, "path,gender\n" + "".join(lines)), seed=3)
    splits = ds.table.groupby(ds.table["path"].map(os.path.normpath))["split"].agg(set)
    assert len(splits) == 60 and all(len(s) == 1 for s in splits)
    assert {next(iter(splits[f"{tmp_path}/img{i}.jpg"])) for i in range(60)} > {"train"}  # not all one split
    # the key is the spelling relative to the folder: the split a.jpg alone has always had
    assert all(splits[f"{tmp_path}/img{i}.jpg"] == {seeded_split(f"img{i}.jpg", 3)} for i in range(60))


def test_a_file_written_one_way_keeps_the_split_of_its_text(tmp_path):
    """Manifests whose files are each written one way keep their splits (checkpoints record the split seed and
    jobs.evaluate reads their test split again): the key is the path as written, relative, ./, ../ or absolute."""
    written = [f"img{i}.jpg" if i % 4 == 0 else f"./d/img{i}.jpg" if i % 4 == 1 else f"../o/img{i}.jpg"
               if i % 4 == 2 else f"{tmp_path}/img{i}.jpg" for i in range(200)]
    ds = read_dataset(_manifest(tmp_path, "path\n" + "".join(f"{w}\n" for w in written)), seed=5)
    assert ds.table["split"].tolist() == [seeded_split(w, 5) for w in written]


# ------------------------------------------------------------------------- 7: landmarks of another length


def test_a_row_with_another_number_of_landmarks_is_skipped_and_named(tmp_path):
    rows = [f'img{i}.jpg,"{" ".join(["1"] * (8 if i == 17 else 10))}"\n' for i in range(40)]
    ds = read_dataset(_manifest(tmp_path, "path,landmarks\n" + "".join(rows)))
    assert len(ds) == 39 and ds.num_landmarks == 5 and ds.has_landmarks
    assert ds.skipped == [("m.csv:row 17", "landmarks: expected 10 values (5 points, as 39 rows have), got 8")]


# ------------------------------------------------------------------------- 13: another encoding


def test_a_windows_1252_manifest_is_refused_naming_the_file_and_utf8(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("path,gender\r\na.jpg,male\r\nJos\u00e9.jpg,male\r\n".encode("cp1252"))
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is not UTF-8 .*line 3.*save it as UTF-8"):
        read_dataset(f"manifest:{path}")


# ------------------------------------------------------------------------- 15: short lines


def test_a_line_with_too_few_fields_is_skipped_and_reported(tmp_path):
    ds = read_dataset(_manifest(tmp_path, "path,age,gender,race\na.jpg,25,1,2\nb.jpg,1,0\nc.jpg,30,0,1\n"))
    assert _names(ds) == ["a.jpg", "c.jpg"]
    assert [w for w, _ in ds.skipped] == ["m.csv:line 3"] and "expected 4 fields" in ds.skipped[0][1]


# ------------------------------------------------------------------------- 16: a BOM


def test_a_bom_keeps_the_first_line_of_celeba_scut_and_genki_label_files(tmp_path):
    names = ["000001.jpg", "000002.jpg"]
    header = " ".join(CELEBA_ATTRIBUTES)
    attrs = "".join(f"{n} {' '.join(['1'] * 40)}\n" for n in names)
    assert seeded_split(names[0]) != "test"  # so that the seeded split cannot pass for the given one
    celeba = write_files(tmp_path / "celeba", {
        "list_attr_celeba.txt": f"2\n{header}\n{attrs}".encode(),
        "list_eval_partition.txt": f"{BOM}{names[0]} 2\n{names[1]} 0\n".encode(),
        **{f"img_align_celeba/{n}": png_bytes() for n in names}})
    ds = read_dataset(f"celeba:{celeba}")
    assert dict(zip(_names(ds), ds.table["split"])) == {names[0]: "test", names[1]: "train"} and not ds.skipped

    scut_names = ["CM1.jpg", "AF1.jpg"]
    scut = write_files(tmp_path / "scut", {
        "train_test_files/All_labels.txt": f"{BOM}CM1.jpg 2.5\nAF1.jpg 3.5\n".encode(),
        **{f"Images/{n}": png_bytes() for n in scut_names}})
    ds = read_dataset(f"scut_fbp5500:{scut}")
    assert sorted(_names(ds)) == sorted(scut_names) and not ds.skipped

    genki = write_files(tmp_path / "genki", {
        "labels.txt": f"{BOM}1 0.1 0.2 0.3\n0 0 0 0\n".encode(),
        **{f"files/file000{i}.jpg": png_bytes() for i in (1, 2)}})
    ds = read_dataset(f"genki4k:{genki}")
    assert _names(ds) == ["file0001.jpg", "file0002.jpg"] and ds.table["smile"].tolist() == [1.0, 0.0]
    assert not ds.skipped


# ------------------------------------------------------------------------- 17: spaces in a header


def test_header_names_are_stripped(tmp_path):
    ds = read_dataset(_manifest(tmp_path, "path, gender , age\na.jpg,f,30\nb.jpg,m,40\n"))
    assert ds.table[["gender", "age"]].values.tolist() == [[1.0, 30.0], [0.0, 40.0]]


def test_a_celeba_landmark_line_of_odd_length_says_its_values_are_no_pairs(tmp_path):
    names = ["000001.jpg", "000002.jpg"]
    header = " ".join(CELEBA_ATTRIBUTES)
    attrs = "".join(f"{n} {' '.join(['1'] * 40)}\n" for n in names)
    celeba = write_files(tmp_path / "celeba", {
        "list_attr_celeba.txt": f"2\n{header}\n{attrs}".encode(),
        "list_landmarks_align_celeba.txt": f"2\n{names[0]} 1 2 3\n{names[1]} 1 2 3\n".encode(),
        **{f"img_align_celeba/{n}": png_bytes() for n in names}})
    ds = read_dataset(f"celeba:{celeba}")
    assert ds.skipped and all("3 coordinates are no (x, y) pairs" in why for _, why in ds.skipped), ds.skipped
