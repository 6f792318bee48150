"""Guards of the data set readers against labels that would train the wrong thing or stop a read
(facedata/datasets): race codes of different classes in one mix, a file in two splits of a mix, manifest values
no model can learn, and a CSV line with an extra field. Small hand-written folders, no images decoded, no Ray."""

from __future__ import annotations

import gzip
import logging

import pandas as pd
import pytest

from facedata.datasets import SOURCE, UTKFACE_RACES, read_dataset, seeded_split
from tests.images import png_bytes, write_files


def _utkface(folder) -> str:
    names = [f"{20 + i}_{i % 2}_{i % 5}_2017011617452{i}.jpg.chip.jpg" for i in range(10)]
    write_files(folder, {n: png_bytes() for n in names})
    return f"utkface:{folder}"


def _scut(folder) -> str:
    names = [f"{r}{g}{i}.jpg" for r in "AC" for g in "FM" for i in range(1, 3)]
    labels = "".join(f"{n} {2.5 + i / 10:.6f}\n" for i, n in enumerate(names))
    write_files(folder, {"train_test_files/All_labels.txt": labels.encode(),
                         **{f"Images/{n}": png_bytes() for n in names}})
    return f"scut_fbp5500:{folder}"


def _genki(folder, names: list[str], extra_lines: str = "") -> str:
    lines = "".join(f"{n},{i % 2},0.1,-0.2,0.05\n" for i, n in enumerate(names))
    write_files(folder, {"labels.csv": f"file,smile,yaw,pitch,roll\n{lines}{extra_lines}".encode(),
                         **{n: png_bytes() for n in names}})
    return f"genki4k:{folder}"


# ---------------------------------------------------------------------------------- 1: class meanings in a mix


def test_a_mix_refuses_race_codes_of_other_classes_from_every_source_that_fills_race(tmp_path):
    """SCUT-FBP5500 cannot train age_gender_race alone, but in a mix with UTKFace its race 0 = Asian would go
    into the head whose 0 is White: refused, naming both sources, the column and both meanings."""
    utk, scut = _utkface(tmp_path / "u"), _scut(tmp_path / "s")
    for specs in ([utk, scut], [scut, utk]):
        mixed = read_dataset(specs)
        with pytest.raises(ValueError) as err:
            mixed.model_overrides("age_gender_race")
        text = str(err.value)
        assert utk in text and scut in text and "race" in text
        assert "0=White, 1=Black, 2=Asian, 3=Indian, 4=Others" in text and "0=Asian, 1=Caucasian" in text
        with pytest.raises(ValueError, match="race_classes=5 .* race_classes=2|race_classes=2 .* race_classes=5"):
            mixed.model_overrides("hmtnet")

    # a manifest's race codes have no stated meaning: the model's classes when they are among them ...
    good = tmp_path / "agr.csv"
    pd.DataFrame({"path": ["a.jpg", "b.jpg"], "age": [30, 40], "gender": [0, 1], "race": [0, 4]}).to_csv(good, index=False)
    assert read_dataset([utk, f"manifest:{good}"]).model_overrides("age_gender_race") == {}
    # ... but never beside SCUT's for a model whose race head has UTKFace's classes
    with pytest.raises(ValueError, match=r"age_gender_race learns race as 0=White.*scut_fbp5500:.*0=Asian"):
        read_dataset([f"manifest:{good}", scut]).model_overrides("age_gender_race")
    # a model that does not learn race is not refused for it
    gender = tmp_path / "g.csv"
    pd.DataFrame({"path": ["c.jpg"], "gender": ["f"], "smile": ["yes"]}).to_csv(gender, index=False)
    assert read_dataset([f"manifest:{gender}", scut]).model_overrides("task_attention") == {}


# ---------------------------------------------------------------------------------- 2: one split per file


def test_a_file_that_two_sources_list_is_in_one_split_the_first_sources(tmp_path, caplog):
    """GENKI splits by file name, a manifest by the path as written: the same photo landed in train for one
    and in test for the other. In a mix every row of such a file takes the first source's split."""
    names = [f"file{i:04d}.jpg" for i in range(1, 61)]
    genki = _genki(tmp_path / "g", names)
    folder = tmp_path / "g"
    # the same photos, spelled differently (absolute, through "./"), adding gender; one photo GENKI does not have
    paths = [str(folder / n) if i % 2 else f"{folder}/./{n}" for i, n in enumerate(names)] + [str(tmp_path / "x.jpg")]
    man = tmp_path / "gender.csv"
    pd.DataFrame({"path": paths, "gender": "female"}).to_csv(man, index=False)
    alone = read_dataset(genki, seed=5).table
    other = read_dataset(f"manifest:{man}", seed=5).table
    assert (alone["split"].to_numpy() != other["split"].to_numpy()[:60]).any()  # the readers disagree

    with caplog.at_level(logging.WARNING, logger="facedata.datasets"):
        ds = read_dataset([genki, f"manifest:{man}"], seed=5)
    key = ds.table["path"].str.rsplit("/", n=1).str[-1]
    assert len(ds) == 121 and (ds.table.groupby(key)["split"].nunique() == 1).all()
    by_source = {s: t.reset_index(drop=True) for s, t in ds.table.groupby(SOURCE)}
    assert list(by_source[f"genki4k:{folder}"]["split"]) == list(alone["split"])  # the first source's split
    assert by_source[f"manifest:{man}"]["split"].iloc[60] == other["split"].iloc[60]  # a file only it lists
    assert by_source[f"manifest:{man}"]["gender"].eq(1.0).all()  # each source keeps its own labels
    assert any("60 files are listed by more than one source" in r.getMessage() for r in caplog.records)

    # the other order: GENKI's rows follow the manifest's split
    swapped = read_dataset([f"manifest:{man}", genki], seed=5).table
    genki_rows = swapped[swapped[SOURCE] == f"genki4k:{folder}"]
    assert list(genki_rows["split"]) == list(other["split"].iloc[:60])


# ---------------------------------------------------------------------------------- 3: manifest value ranges


def test_manifest_values_no_model_can_learn_are_skipped_and_reported(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,race,age,beauty\n"
                        "ok.jpg,3,30.5,3.2\n"  # row 0: a real age and score are fine
                        "r1.jpg,-1,30,3\n"
                        "r2.jpg,2.5,30,3\n"
                        "r3.jpg,inf,30,3\n"
                        "a1.jpg,1,-4,3\n"
                        "a2.jpg,1,500,3\n"
                        "b1.jpg,1,30,0.5\n"
                        "b2.jpg,1,30,5.5\n"
                        "edge.jpg,0,116,5\n"  # row 8: the ends of the scales
                        "seven.jpg,7,0,1\n"  # row 9: a class code, but not one of age_gender_race's
                        "gaps.jpg,,,\n")  # row 10: missing values stay missing
    ds = read_dataset(f"manifest:{manifest}")
    reasons = dict(ds.skipped)
    assert sorted(reasons) == [f"m.csv:row {i}" for i in range(1, 8)]
    assert all("not a class code" in reasons[f"m.csv:row {i}"] for i in (1, 2, 3))
    assert "'-4' is outside 0-116" in reasons["m.csv:row 4"] and "'500' is outside 0-116" in reasons["m.csv:row 5"]
    assert "beauty: '0.5' is outside 1-5" in reasons["m.csv:row 6"] and "'5.5'" in reasons["m.csv:row 7"]
    assert [p.rsplit("/", 1)[1] for p in ds.table["path"]] == ["ok.jpg", "edge.jpg", "seven.jpg", "gaps.jpg"]
    assert ds.table["race"].tolist()[:3] == [3.0, 0.0, 7.0] and ds.table["age"].tolist()[:2] == [30.5, 116.0]
    assert ds.table.iloc[3][["race", "age", "beauty"]].isna().all()

    # race 7 is a class for hmtnet, which takes its number of races from the data, not for age_gender_race
    assert ds.model_overrides("hmtnet") == {"race_classes": 8}
    with pytest.raises(ValueError, match=f"age_gender_race learns race as 0=White.*4=Others; manifest:{manifest} "
                                         "has race 7"):
        ds.model_overrides("age_gender_race")
    assert len(UTKFACE_RACES) == 5


# ---------------------------------------------------------------------------------- 4: a line with an extra field


def test_a_csv_line_with_an_extra_field_is_skipped_and_reported_not_the_end_of_the_read(tmp_path):
    names = [f"file{i:04d}.jpg" for i in range(1, 5)]
    genki = _genki(tmp_path / "g", names[:2], extra_lines=f"{names[2]},1,0,0,0,9\n\n{names[3]},0,0,0,0\n")
    write_files(tmp_path / "g", {n: png_bytes() for n in names[2:]})
    ds = read_dataset(genki, seed=1)
    assert [p.rsplit("/", 1)[1] for p in ds.table["path"]] == [names[0], names[1], names[3]]
    assert list(ds.table["split"]) == [seeded_split(n, 1) for n in (names[0], names[1], names[3])]
    assert [w for w, _ in ds.skipped] == ["labels.csv:line 4"]
    assert "expected 5 fields" in ds.skipped[0][1] and "got 6" in ds.skipped[0][1]

    # a manifest, plain and gzip: a quoted comma is one field, a short line is skipped and reported too,
    # pandas' spellings of a missing value stay missing
    text = ('path,gender,face_box,split\n'
            'a.jpg,male,"[1, 2, 30, 40]",train\n'
            'b.jpg,female,"[1, 2, 30, 40]",test,extra\n'
            '"c,1.jpg",NA,,1\n'
            'd.jpg,f\n')
    for name, data in (("m.csv", text.encode()), ("m.csv.gz", gzip.compress(text.encode()))):
        (tmp_path / name).write_bytes(data)
        ds = read_dataset(f"manifest:{tmp_path / name}")
        assert [w for w, _ in ds.skipped] == [f"{name}:line 3", f"{name}:line 5"]
        assert "expected 4 fields" in ds.skipped[0][1] and "got 2" in ds.skipped[1][1]
        t = ds.table
        assert [p.rsplit("/", 1)[1] for p in t["path"]] == ["a.jpg", "c,1.jpg"]
        assert t["gender"].tolist()[0] == 0.0 and pd.isna(t["gender"].iloc[1])
        assert t["face_box"].iloc[0] == [1.0, 2.0, 30.0, 40.0] and t["face_box"].iloc[1] is None
        assert t["split"].tolist()[:2] == ["train", "val"]
