"""The four readers, on the real data in ../shared/data (skipped when absent), on drawn faces in each
format, and over S3 (moto's server on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest

import storage
from facedata import synth
from facedata.datasets import (
    CELEBA_ATTRIBUTES,
    DATASET_MODELS,
    MODEL_LABELS,
    parse_spec,
    read_dataset,
    seeded_split,
)

# The first line of CelebA's list_attr_celeba.txt (000001.jpg), in CelebA order.
CELEBA_000001 = [int(v) for v in (
    "-1 1 1 -1 -1 -1 -1 -1 -1 -1 -1 1 -1 -1 -1 -1 -1 -1 1 1 -1 1 -1 -1 1 -1 -1 1 -1 -1 -1 1 1 -1 1 -1 1 -1 -1 1"
).split()]  # fmt: skip


def _by_name(table: pd.DataFrame) -> dict[str, dict]:
    return {os.path.basename(r["path"]): r for r in table.to_dict("records")}


# ------------------------------------------------------------------------------------------ real data


def test_real_celeba(shared_data):
    root = shared_data / "celeba"
    ds = read_dataset(f"celeba:{root}")
    n_lines = int((root / "list_attr_celeba.txt").read_text().split("\n", 1)[0])
    assert len(ds.table) == n_lines == len(os.listdir(root / "img_align_celeba"))
    assert ds.skipped == [] and not ds.has_landmarks and "landmarks" not in ds.table.columns
    row = _by_name(ds.table)["000001.jpg"]
    assert row["attributes"] == CELEBA_000001
    assert (row["gender"], row["smile"], row["eyeglasses"]) == (1.0, 1.0, 0.0)  # Male -1, Smiling 1
    assert storage.read_bytes(row["path"])[:2] == b"\xff\xd8"
    counts = ds.table["split"].value_counts(normalize=True)
    assert 0.75 < counts["train"] < 0.85 and 0.07 < counts["val"] < 0.13 and 0.07 < counts["test"] < 0.13
    assert all(seeded_split(name) == r["split"] for name, r in list(_by_name(ds.table).items())[:50])
    assert ds.model_overrides("task_attention") == {}


def test_real_utkface_reports_the_malformed_names(shared_data):
    root = shared_data / "utkface"
    names = os.listdir(root)
    # The malformed names lack a label field (e.g. 61_1_20170109142408075.jpg.chip.jpg has no race).
    malformed = {n for n in names if len(n.split("_")) < 4}
    assert malformed
    ds = read_dataset(f"utkface:{root}")
    assert {where for where, _ in ds.skipped} == malformed
    assert all("missing a label field" in reason for _, reason in ds.skipped)
    assert len(ds.table) == len(names) - len(malformed)
    rows = _by_name(ds.table)
    assert {k: rows["100_1_2_20170105174847679.jpg.chip.jpg"][k] for k in ("age", "gender", "race")} == {
        "age": 100.0, "gender": 1.0, "race": 2.0,
    }  # fmt: skip
    assert set(ds.table["split"]) == {"train", "val", "test"}
    assert ds.model_overrides("hmtnet") == {"race_classes": 5}
    with pytest.raises(ValueError, match="age_gender_race, hmtnet"):
        ds.model_overrides("dmm_cnn")


# ------------------------------------------------------------------------------------------ CelebA


def test_celeba_uses_landmarks_and_partition_and_skips_bad_lines(tmp_path):
    root = tmp_path / "celeba"
    synth.generate("celeba", 20, str(root), seed=7)
    expected = {n: lab for n, _, lab in synth.iter_faces("celeba", 20, seed=7)}
    partition = dict(line.split() for line in (root / "list_eval_partition.txt").read_text().splitlines())
    with open(root / "list_attr_celeba.txt", "a") as f:
        f.write("000021.jpg " + " ".join(["1"] * 39) + "\n")  # 39 values
        f.write("000022.jpg " + " ".join(["1"] * 39) + " 2\n")  # a value that is not +-1
    (root / "img_align_celeba" / "000020.jpg").unlink()  # labelled, but the image is missing

    ds = read_dataset(f"celeba:{root}")
    assert len(ds.table) == 19
    reasons = dict(ds.skipped)
    assert "expected 40 values, got 39" in reasons["list_attr_celeba.txt:23"]
    assert "'2' is not 1 or -1" in reasons["list_attr_celeba.txt:24"]
    assert any("000020.jpg" in w and "missing" in r for w, r in ds.skipped)
    assert len(ds.skipped) == 3
    assert ds.has_landmarks and ds.num_landmarks == 5
    for name, row in _by_name(ds.table).items():
        lab = expected[name]
        assert row["attributes"] == lab["attributes"]
        assert row["landmarks"] == lab["landmarks"]
        assert row["gender"] == lab["gender"] and row["smile"] == lab["smile"]
        assert row["split"] == {"0": "train", "1": "val", "2": "test"}[partition[name]]
    assert len(ds.split("train")) == 16 and len(ds.split("val")) == 2 and len(ds.split("test")) == 1
    assert ds.model_overrides("dmm_cnn") == {"num_landmarks": 5}


def test_celeba_without_optional_files_gets_a_seeded_split(tmp_path):
    root = tmp_path / "celeba"
    synth.generate("celeba", 30, str(root), seed=1, size=(64, 80))
    (root / "list_landmarks_align_celeba.txt").unlink()
    (root / "list_eval_partition.txt").unlink()
    a = read_dataset(f"celeba:{root}", seed=3)
    assert not a.has_landmarks and "landmarks" not in a.table.columns
    assert a.model_overrides("dmm_cnn") == {"num_landmarks": 0}
    assert all(seeded_split(n, 3) == r["split"] for n, r in _by_name(a.table).items())
    # The split is a function of (seed, name): the same again, a different one for another seed.
    assert read_dataset(f"celeba:{root}", seed=3).table["split"].tolist() == a.table["split"].tolist()
    assert read_dataset(f"celeba:{root}", seed=4).table["split"].tolist() != a.table["split"].tolist()
    everything_train = read_dataset(f"celeba:{root}", val_fraction=0.0, test_fraction=0.0)
    assert set(everything_train.table["split"]) == {"train"}


# ------------------------------------------------------------------------------------------ UTKFace


def test_utkface_nested_plain_jpg_and_malformed_names(tmp_path):
    root = tmp_path / "utk"
    synth.generate("utkface", 12, str(root), seed=2, size=(64, 64))
    expected = {n: lab for n, _, lab in synth.iter_faces("utkface", 12, seed=2, size=(64, 64))}
    nested = root / "part2" / "deeper"
    nested.mkdir(parents=True)
    for name in sorted(expected)[:5]:
        shutil.move(root / name, nested / name)
    some_jpeg = (nested / sorted(expected)[0]).read_bytes()
    bad = {
        "39_1_20170116174525125.jpg.chip.jpg": "missing a label field",
        "130_0_0_20170116174525125.jpg.chip.jpg": "age 130",
        "20_2_0_20170116174525125.jpg": "gender 2",
        "20_0_7_20170116174525125.jpg.chip.jpg": "race 7",
        "x_0_1_20170116174525125.jpg.chip.jpg": "not integers",
    }
    for name in bad:
        (nested / name).write_bytes(some_jpeg)
    (root / "30_1_3_20170116174525125.jpg").write_bytes(some_jpeg)  # plain .jpg is a valid name too

    ds = read_dataset(f"utkface:{root}")
    reasons = {os.path.basename(w): r for w, r in ds.skipped}
    assert reasons.keys() == bad.keys()
    for name, fragment in bad.items():
        assert fragment in reasons[name]
    assert any(w.startswith("part2/deeper/") for w, _ in ds.skipped)
    rows = _by_name(ds.table)
    assert len(rows) == 13
    assert (rows["30_1_3_20170116174525125.jpg"]["age"], rows["30_1_3_20170116174525125.jpg"]["race"]) == (30, 3)
    for name, lab in expected.items():
        assert (rows[name]["age"], rows[name]["gender"], rows[name]["race"]) == (
            lab["age"], lab["gender"], lab["race"],
        )  # fmt: skip
        assert storage.exists(rows[name]["path"])


# ------------------------------------------------------------------------------------------ SCUT-FBP5500


def test_scut_from_all_labels_then_from_split_files(tmp_path):
    root = tmp_path / "scut"
    synth.generate("scut_fbp5500", 24, str(root), seed=4, size=(96, 96))
    expected = {n: lab for n, _, lab in synth.iter_faces("scut_fbp5500", 24, seed=4, size=(96, 96))}

    ds = read_dataset(f"scut_fbp5500:{root}")
    assert len(ds.table) == 24 and ds.skipped == []
    for name, row in _by_name(ds.table).items():
        lab = expected[name]
        assert (row["gender"], row["race"]) == (lab["gender"], lab["race"])
        assert row["beauty"] == pytest.approx(lab["beauty"], abs=1e-6)
        assert row["race"] == (0.0 if name.startswith("A") else 1.0)
    assert all(seeded_split(n) == r["split"] for n, r in _by_name(ds.table).items())
    assert ds.model_overrides("hmtnet") == {"race_classes": 2}

    # The 60/40 split files give train/test; val is carved from train with the seed.
    split_dir = root / "train_test_files" / "split_of_60%training and 40%testing"
    split_dir.mkdir(parents=True)
    lines = (root / "train_test_files" / "All_labels.txt").read_text().splitlines()
    (split_dir / "train.txt").write_text("\n".join(lines[:15]) + "\n")
    (split_dir / "test.txt").write_text("\n".join(lines[15:]) + "\n")
    (root / "train_test_files" / "All_labels.txt").unlink()
    ds = read_dataset(f"scut_fbp5500:{root}", val_fraction=0.3)
    train_names = {line.split()[0] for line in lines[:15]}
    rows = _by_name(ds.table)
    assert len(rows) == 24
    assert {n for n, r in rows.items() if r["split"] == "test"} == {line.split()[0] for line in lines[15:]}
    val = {n for n, r in rows.items() if r["split"] == "val"}
    assert val and val < train_names
    assert rows[lines[0].split()[0]]["beauty"] == pytest.approx(float(lines[0].split()[1]))


# ------------------------------------------------------------------------------------------ manifest


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_manifest_with_relative_paths(tmp_path, kind):
    synth.generate("celeba", 6, str(tmp_path / "faces"), seed=6, size=(64, 80))
    expected = {n: lab for n, _, lab in synth.iter_faces("celeba", 6, seed=6, size=(64, 80))}
    names = sorted(expected)
    frame = pd.DataFrame({
        "path": [f"faces/img_align_celeba/{n}" for n in names],
        "gender": [float(expected[n]["gender"]) for n in names[:-1]] + [None],
        "split": ["train", "val", "test", "valid", None, None],
    })  # fmt: skip
    if kind == "parquet":
        frame["attributes"] = [expected[n]["attributes"] for n in names]
        frame["landmarks"] = [expected[n]["landmarks"] for n in names[:-1]] + [None]
    manifest = tmp_path / f"manifest.{kind}"
    if kind == "csv":
        frame.to_csv(manifest, index=False)
    else:
        frame.to_parquet(manifest)

    ds = read_dataset(f"manifest:{manifest}", seed=2)
    assert ds.format == "manifest" and ds.root == str(manifest) and ds.skipped == []
    assert ds.table["path"].tolist() == [str(tmp_path / "faces" / "img_align_celeba" / n) for n in names]
    assert all(storage.exists(p) for p in ds.table["path"])
    assert ds.table["split"].tolist()[:4] == ["train", "val", "test", "val"]
    assert ds.table["split"].tolist()[4:] == [seeded_split(f"faces/img_align_celeba/{n}", 2) for n in names[4:]]
    assert ds.table["gender"].tolist()[:-1] == [expected[n]["gender"] for n in names[:-1]]
    assert pd.isna(ds.table["gender"].iloc[-1])
    if kind == "parquet":
        assert ds.table["attributes"].tolist() == [expected[n]["attributes"] for n in names]
        assert ds.table["landmarks"].iloc[-1] is None
        assert ds.has_landmarks and ds.model_overrides("dmm_cnn") == {"num_landmarks": 5}
    else:
        assert "attributes" not in ds.table.columns
        # gender alone: every model with a gender output, not DMM-CNN (attributes only)
        with pytest.raises(ValueError, match="task_attention, hard_sharing, age_gender_race, hmtnet"):
            ds.model_overrides("dmm_cnn")
        assert ds.model_overrides("age_gender_race") == {} and ds.model_overrides("task_attention") == {}


def _manifest(tmp_path, n, seed, columns) -> str:
    """A CSV manifest of ``n`` drawn CelebA faces with the given columns (functions of each face's labels)."""
    synth.generate("celeba", n, str(tmp_path / "faces"), seed=seed, size=(50, 60))
    faces = list(synth.iter_faces("celeba", n, seed=seed, size=(50, 60)))
    frame = pd.DataFrame({"path": [f"faces/img_align_celeba/{name}" for name, _, _ in faces]})
    for col, fn in columns.items():
        frame[col] = [fn(lab) for _, _, lab in faces]
    frame["split"] = ["val" if i % 5 == 0 else "train" for i in range(n)]
    path = tmp_path / "m.csv"
    frame.to_csv(path, index=False)
    return str(path)


ATTR = {a: i for i, a in enumerate(CELEBA_ATTRIBUTES)}


def _attr(lab, name) -> bool:
    return lab["attributes"][ATTR[name]] > 0


@pytest.mark.parametrize("model, columns, expect", [
    # the attention paper's FotW / LFWA labels: smile and gender, spelled in words
    ("task_attention", {"smile": lambda lab: "yes" if _attr(lab, "Smiling") else "no",
                        "gender": lambda lab: "female" if lab["gender"] else "male"}, ("smile", "gender")),
    # the hard-sharing paper's own set: gender and eyeglasses, CelebA's ±1 for the glasses
    ("hard_sharing", {"gender": lambda lab: "F" if lab["gender"] else "M",
                      "eyeglasses": lambda lab: 1 if _attr(lab, "Eyeglasses") else -1}, ("gender", "eyeglasses")),
    # a manifest with CelebA's 40 attributes only: the three columns come from them
    ("task_attention", {"attributes": lambda lab: json.dumps(lab["attributes"])}, ("smile", "gender")),
    ("hard_sharing", {"attributes": lambda lab: json.dumps(lab["attributes"])}, ("gender", "eyeglasses")),
])
def test_a_manifest_with_the_models_own_labels_trains_it(tmp_path, model, columns, expect):
    from raytasks.train import TrainSpec, prepare

    uri = _manifest(tmp_path, 20, 8, columns)
    ds = read_dataset(f"manifest:{uri}")
    assert ds.skipped == [] and model in ds.compatible_models()
    truth = {name: lab for name, _, lab in synth.iter_faces("celeba", 20, seed=8, size=(50, 60))}
    for _, row in ds.table.iterrows():
        lab = truth[os.path.basename(row["path"])]
        want = {"gender": float(lab["gender"]), "smile": float(_attr(lab, "Smiling")),
                "eyeglasses": float(_attr(lab, "Eyeglasses"))}
        assert all(row[c] == want[c] for c in expect), row
    model_obj, _, train, val, _ = prepare(TrainSpec(model=model, data=f"manifest:{uri}", storage=str(tmp_path), name="m",
                                                    faces="whole"))  # crops: the labels are what is checked
    assert sorted(train.columns) == sorted(["path", *expect]) and len(train) == 16 and len(val) == 4
    assert sorted(c for c in expect) == sorted(o.target_column for o in model_obj.outputs)


def test_limit_draws_at_random_from_the_whole_split_not_its_first_rows(tmp_path):
    """UTKFace lists its files by age (the name starts with it): ``--limit`` must not train on the youngest only.
    The draw is fixed by ``--seed``, keeps the table's order, and ``--val-limit`` draws the same way."""
    from raytasks.train import TrainSpec, prepare

    root = synth.generate("utkface", 80, str(tmp_path / "utk"), seed=4, size=(48, 48))

    def drawn(seed):
        spec = TrainSpec(model="hmtnet", data=f"utkface:{root}", storage=str(tmp_path), name="m",
                         faces="whole", limit=12, val_limit=4, seed=seed, template_images=0)
        _, _, train, val, _ = prepare(spec)
        return train, val

    listed = list(read_dataset(f"utkface:{root}").split("train")["path"])  # by file name: by age, as text
    train, val = drawn(0)
    assert len(train) == 12 and len(val) == 4
    at = [listed.index(p) for p in train["path"]]
    assert at == sorted(at)  # kept in the table's order
    assert max(at) >= len(listed) // 2  # drawn from the whole split, not its first 12 rows
    again, _ = drawn(0)
    other, _ = drawn(1)
    assert list(again["path"]) == list(train["path"]) and list(other["path"]) != list(train["path"])


def test_model_labels_are_the_models_target_columns():
    import models

    for name, cols in MODEL_LABELS.items():
        m = models.create_model(name, **({"depth": 18} if name in ("dmm_cnn", "task_attention") else {}))
        targets = {o.target_column for o in m.outputs} - {"landmarks"}  # DMM-CNN's auxiliary task
        assert set(cols) == targets, name


def test_manifest_label_spellings_and_refusals(tmp_path):
    manifest = tmp_path / "m.csv"
    pd.DataFrame({
        "path": [f"{i}.jpg" for i in range(8)],
        "gender": ["Male", "female", "0", "1", "", "-1", "2", "x"],
        "smile": ["Smiling", "non_smile", "TRUE", "false", "-1", "1", "yes", "no"],
    }).to_csv(manifest, index=False)
    ds = read_dataset(f"manifest:{manifest}")
    assert ds.table["gender"].tolist()[:4] == [0.0, 1.0, 0.0, 1.0] and pd.isna(ds.table["gender"].iloc[4])
    assert ds.table["smile"].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    reasons = [r for _, r in ds.skipped]
    assert len(reasons) == 3 and all(r.startswith("gender:") for r in reasons)
    assert "CelebA's Male column is the opposite" in reasons[0]  # -1 is ambiguous for gender


def test_manifest_errors(tmp_path):
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"file": ["a.jpg"], "age": [3]}).to_csv(manifest, index=False)
    with pytest.raises(ValueError, match="no 'path' column"):
        read_dataset(f"manifest:{manifest}")
    pd.DataFrame({"path": ["a.jpg", "b.jpg", ""], "age": ["3", "old", "4"], "split": ["train", "x", None]}).to_csv(
        manifest, index=False
    )
    ds = read_dataset(f"manifest:{manifest}")
    assert ds.table["path"].tolist() == [str(tmp_path / "a.jpg")]
    assert len(ds.skipped) == 2 and "split 'x'" in ds.skipped[0][1] and "empty path" in ds.skipped[1][1]


def test_parse_spec_and_model_table():
    assert parse_spec("utkface:s3://bucket/utk") == ("utkface", "s3://bucket/utk")
    assert parse_spec("manifest:../m.parquet") == ("manifest", "../m.parquet")
    for bad in ("celeba", "imagenet:/x", "utkface:"):
        with pytest.raises(ValueError, match="FORMAT:URI"):
            parse_spec(bad)
    assert set(DATASET_MODELS) == {"celeba", "utkface", "scut_fbp5500", "genki4k", "manifest"}
    assert len(CELEBA_ATTRIBUTES) == 40 and CELEBA_ATTRIBUTES[0] == "5_o_Clock_Shadow"


# ------------------------------------------------------------------------------------------ S3


def test_utkface_and_manifest_over_s3(tmp_path, s3_bucket):
    client, bucket = s3_bucket
    local = tmp_path / "utk"
    synth.generate("utkface", 8, str(local), seed=8, size=(64, 64))
    expected = {n: lab for n, _, lab in synth.iter_faces("utkface", 8, seed=8, size=(64, 64))}
    for i, path in enumerate(sorted(local.iterdir())):
        key = f"data/utk/{'sub/' if i % 2 else ''}{path.name}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    client.put_object(Bucket=bucket, Key="data/utk/39_1_20170116174525125.jpg.chip.jpg", Body=b"\xff\xd8")

    ds = read_dataset(f"utkface:s3://{bucket}/data/utk")
    assert [w for w, _ in ds.skipped] == ["39_1_20170116174525125.jpg.chip.jpg"]
    rows = _by_name(ds.table)
    assert rows.keys() == expected.keys()
    for name, lab in expected.items():
        assert rows[name]["path"].startswith(f"s3://{bucket}/data/utk/")
        assert (rows[name]["age"], rows[name]["gender"], rows[name]["race"]) == (
            lab["age"], lab["gender"], lab["race"],
        )  # fmt: skip
    first = sorted(local.iterdir())[1]
    assert storage.read_bytes(rows[first.name]["path"]) == first.read_bytes()

    # A Parquet manifest on S3 whose paths are relative to its own prefix.
    manifest = pd.DataFrame({"path": [f"utk/sub/{first.name}"], "age": [1.0]})
    storage.write_bytes(f"s3://{bucket}/data/m.parquet", manifest.to_parquet())
    m = read_dataset(f"manifest:s3://{bucket}/data/m.parquet")
    assert m.table["path"].tolist() == [f"s3://{bucket}/data/utk/sub/{first.name}"]
    assert storage.read_bytes(m.table["path"].iloc[0]) == first.read_bytes()
