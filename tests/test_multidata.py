"""Several data sets as one (``jobs.train --data A --data B``, facedata/datasets/mixed.py) and the GENKI-4K
reader (facedata/datasets/genki.py): each source fills the labels it has, a label it lacks is left out of
the loss and the metrics, each source keeps its own split; GENKI's photos go through the detector, and one
without a face is counted, not trained on.

Bad files in the training data (a truncated JPEG, a zero-byte file, a 1 x 40000 PNG) are covered where the
training paths are: tests/test_train_faces.py (``whole`` and ``detect``); here they sit in one source of a mix.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import models
from core import engine
from core.batches import load_batch, to_tensors
from facedata import synth
from facedata.datasets import CELEBA_ATTRIBUTES, MIXED, SOURCE, read_dataset, seeded_split
from tests.images import bad_training_files, blank_photo, face_photo, png_bytes, write_files


def _genki(folder, rows: list[str], images: dict[str, bytes]) -> str:
    write_files(folder, {"labels.csv": ("file,smile,yaw,pitch,roll\n" + "\n".join(rows) + "\n").encode(), **images})
    return f"genki4k:{folder}"


def test_genki_reader_reads_both_layouts_skips_bad_lines_and_splits_by_file_name(tmp_path):
    names = [f"file{i:04d}.jpg" for i in range(1, 41)]
    rows = [f"{n},{i % 2},0.1,-0.2,0.05" for i, n in enumerate(names)]
    rows += ["file0041.jpg,2,0,0,0",  # smile out of range
             "file0042.jpg,1,0,0,0",  # no image
             f"{names[0]},1,0,0,0"]  # a second line for the same file
    ds = read_dataset(_genki(tmp_path / "g", rows, {n: png_bytes() for n in names}), seed=3)
    assert ds.format == "genki4k" and len(ds) == 40
    assert list(ds.table["smile"]) == [float(i % 2) for i in range(40)]
    assert np.allclose(ds.table[["yaw", "pitch", "roll"]].to_numpy(), [0.1, -0.2, 0.05])
    reasons = dict(ds.skipped)
    assert "is not 0 or 1" in reasons["labels.csv:row 40"] and "missing" in reasons["labels.csv:row 41"]
    assert "duplicate" in reasons["labels.csv:row 42"]
    assert list(ds.table["split"]) == [seeded_split(n, 3) for n in names]
    assert ds.compatible_models() == ("task_attention",)

    # the release's own layout: labels.txt, line i is files/file{i:04d}.jpg
    txt = tmp_path / "release"
    write_files(txt, {"labels.txt": b"1 0.1 0 0\n0 0 0 0\nbad line\n",
                      "files/file0001.jpg": png_bytes(), "files/file0002.jpg": png_bytes()})
    rel = read_dataset(f"genki4k:{txt}")
    assert [p.rsplit("/", 1)[1] for p in rel.table["path"]] == ["file0001.jpg", "file0002.jpg"]
    assert list(rel.table["smile"]) == [1.0, 0.0] and [w for w, _ in rel.skipped] == ["labels.txt:3"]


def _manifest(path, table: pd.DataFrame, column: str) -> str:
    table[["path", "split", column]].to_csv(path, index=False)
    return f"manifest:{path}"


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    root = synth.generate("celeba", 48, str(tmp_path_factory.mktemp("c")), seed=4, size="40x48")
    return read_dataset(f"celeba:{root}").table


def test_mixing_keeps_each_label_where_it_is_and_each_sources_split(tmp_path, crops):
    genki = _genki(tmp_path / "g", [f"g{i}.jpg,{i % 2},0,0,0" for i in range(6)],
                   {f"g{i}.jpg": png_bytes() for i in range(6)})
    gender = _manifest(tmp_path / "gender.csv", crops.iloc[:20].copy(), "gender")
    celeba = f"celeba:{crops['path'].iloc[0].rsplit('/', 2)[0]}"
    ds = read_dataset([genki, gender, celeba])
    alone = [read_dataset(s) for s in (genki, gender, celeba)]
    assert ds.format == MIXED and len(ds) == sum(len(a) for a in alone) and ds.parts and len(ds.parts) == 3
    by = {s: ds.table[ds.table[SOURCE] == f"{a.format}:{a.root}"] for s, a in zip("gmc", alone)}
    assert by["g"]["gender"].isna().all() and by["g"]["smile"].notna().all()
    assert by["m"]["smile"].isna().all() and (by["m"]["gender"].to_numpy() == crops["gender"].iloc[:20]).all()
    assert by["g"]["attributes"].map(lambda v: v is None).all()  # a list column a source lacks: None, not NaN
    assert by["c"]["attributes"].map(len).eq(40).all()
    for part, a in zip("gmc", alone):
        assert list(by[part]["split"]) == list(a.table["split"])  # the split each source has alone
    assert "task_attention" in ds.compatible_models() and ds.model_overrides("task_attention") == {}
    assert list(read_dataset([genki]).table["path"]) == list(alone[0].table["path"])  # one spec: no mix


def test_mixing_refuses_labels_that_mean_different_classes(tmp_path):
    utk = synth.generate("utkface", 12, str(tmp_path / "u"), seed=1, size="32x32")
    scut = synth.generate("scut_fbp5500", 12, str(tmp_path / "s"), seed=1, size="32x32")
    mixed = read_dataset([f"utkface:{utk}", f"scut_fbp5500:{scut}"])
    with pytest.raises(ValueError, match="race_classes=5 .* race_classes=2"):
        mixed.model_overrides("hmtnet")
    # SCUT's race codes (0=Asian, 1=Caucasian) would go into UTKFace's 5-class head: refused too
    with pytest.raises(ValueError, match="0=Asian, 1=Caucasian"):
        mixed.model_overrides("age_gender_race")


def test_a_model_on_two_sources_learns_each_task_only_from_the_rows_that_have_its_label(tmp_path, crops):
    """hard_sharing (gender, eyeglasses): source A has gender only, source B eyeglasses only. The loss of each
    task is the loss over its own source's rows; a batch of B rows gives the gender branch no gradient; and
    a short fit on the mix, with three broken files in source A, skips and counts them and goes on."""
    a, b = crops.iloc[:24].copy(), crops.iloc[24:].copy()
    a["split"], b["split"] = ["train"] * 16 + ["val"] * 8, ["train"] * 16 + ["val"] * 8
    write_files(tmp_path / "bad", bad_training_files())
    broken = pd.DataFrame({"path": [str(tmp_path / "bad" / n) for n in bad_training_files()], "split": "train",
                           "gender": 1.0})
    ds = read_dataset([_manifest(tmp_path / "a.csv", pd.concat([a, broken]), "gender"),
                       _manifest(tmp_path / "b.csv", b, "eyeglasses")])
    torch.manual_seed(0)
    model = models.create_model("hard_sharing", **ds.model_overrides("hard_sharing"))
    cols = ["path", "gender", "eyeglasses"]
    train, val = ds.split("train"), ds.split("val")
    ok = ~train["path"].str.contains("/bad/")
    batch = load_batch(train[ok][cols], model, train=False)
    images, targets = to_tensors(batch, torch.device("cpu"))
    with torch.no_grad():
        raw = model(model.prepare(images))
    total, parts = model.loss(raw, targets)
    from_a, from_b = targets["gender"].isfinite(), targets["eyeglasses"].isfinite()
    assert from_a.sum() == 16 and from_b.sum() == 16 and not (from_a & from_b).any()
    out = model.outputs
    assert math.isclose(float(parts["gender"]), float(out["gender"].loss(raw["gender"][from_a],
                                                                          targets["gender"][from_a])), rel_tol=1e-6)
    assert math.isclose(float(parts["eyeglasses"]), float(out["eyeglasses"].loss(
        raw["eyeglasses"][from_b], targets["eyeglasses"][from_b])), rel_tol=1e-6)
    assert torch.isfinite(total)

    only_b = load_batch(train[train["eyeglasses"].notna()][cols], model, train=False)
    images, targets = to_tensors(only_b, torch.device("cpu"))
    model.zero_grad()
    model.loss(model(model.prepare(images)), targets)[0].backward()
    grads = {t: [p.grad for p in model.branches[t].parameters()] for t in ("gender", "eyeglasses")}
    assert all(g is None or not g.any() for g in grads["gender"])
    assert any(g is not None and g.any() for g in grads["eyeglasses"])

    history = engine.fit(model, train[cols], val[cols], epochs=1, batch_size=8, log_fn=None)
    assert [h["train_skipped"] for h in history] == [3]
    last = history[-1]
    assert all(np.isfinite([last["train_loss"], last["val_loss"]]))
    assert {"gender.accuracy", "eyeglasses.accuracy"} <= set(last)  # each measured on its own source's rows


def test_genki_photos_through_the_detector_count_the_one_without_a_face(tmp_path, finder):
    from faces.facecache import DetectionCache
    from faces.trainfaces import find_training_faces

    photo, _ = face_photo([3], size=(190, 180), width=90)
    source = _genki(tmp_path / "g", ["a.jpg,1,0,0,0", "b.jpg,0,0,0,0", "c.jpg,1,0,0,0"],
                    {"a.jpg": photo, "b.jpg": blank_photo(2, size=(190, 180)), "c.jpg": b""})
    table = read_dataset(source).table
    faces, report = find_training_faces(table, finder, DetectionCache(str(tmp_path / "runs"), finder.identity))
    assert report.kinds() == {"no_face": 1, "empty": 1} and report.used == 1
    assert list(faces["path"]) == [table["path"].iloc[0]] and list(faces["smile"]) == [1.0]


def test_task_attention_trunk_learns_at_its_own_rate():
    """The GENKI run's recipe (docs/results.md): new layers at --lr, the trunk at trunk_lr_scale x --lr."""
    m = models.create_model("task_attention", depth=18, image_size=64, trunk_lr_scale=0.1)
    new, trunk = m.optimizer_groups(1e-3)
    assert new["lr"] == 1e-3 and trunk["lr"] == pytest.approx(1e-4)
    every = [id(p) for g in (new, trunk) for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in m.parameters())  # each parameter once
    assert {id(p) for p in m.head_smile.parameters()} <= {id(p) for p in new["params"]}
    assert {id(p) for p in m.res5_gender.parameters()} <= {id(p) for p in trunk["params"]}
    opt = engine.make_optimizer(m, m.recipe)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([m.recipe.lr * 0.1, m.recipe.lr])
    with pytest.raises(ValueError, match="trunk_lr_scale"):
        models.create_model("task_attention", depth=18, trunk_lr_scale=-1)


def test_dmm_cnn_reads_smiling_from_genki_and_male_from_a_gender_manifest(tmp_path, crops, capsys):
    """DMM-CNN's 40 CelebA attributes beside data that labels only smile (GENKI-4K) or gender (a manifest):
    ``jobs.train``'s prepare gives those rows an attribute vector with Smiling or Male and the other 39
    missing; a GENKI row moves only the Smiling score; a short fit reads every attribute on CelebA's rows and
    Smiling on GENKI's too (facedata.datasets ``attributes_from_columns``, models/outputs.py ``Binary``)."""
    from raytasks.train import TrainSpec, prepare

    smiles = [f"g{i}.jpg,{i % 2},0,0,0" for i in range(16)]
    genki = _genki(tmp_path / "g", smiles, {f"g{i}.jpg": png_bytes() for i in range(16)})
    gender = _manifest(tmp_path / "gender.csv", crops.iloc[:12].copy(), "gender")
    celeba = f"celeba:{crops['path'].iloc[0].rsplit('/', 2)[0]}"
    spec = TrainSpec(model="dmm_cnn", data=(celeba, genki, gender), storage=str(tmp_path / "runs"), name="d",
                     faces="whole", model_kwargs={"depth": 18, "image_size": 48}, template_images=0)
    model, _, train, val, _ = prepare(spec)
    assert {"path", "attributes"} <= set(train.columns) and "gender" not in train.columns
    smile_i, male_i = CELEBA_ATTRIBUTES.index("Smiling"), CELEBA_ATTRIBUTES.index("Male")
    labels = {p.rsplit("/", 1)[1]: np.asarray(v, dtype=float) for p, v in zip(train["path"], train["attributes"])}
    g = {k: v for k, v in labels.items() if k.startswith("g")}
    assert g and all(np.isnan(np.delete(v, smile_i)).all() for v in g.values())
    assert {v[smile_i] for v in g.values()} == {-1.0, 1.0}
    assert sum(np.isfinite(v).sum() == 1 and np.isfinite(v[male_i]) for v in labels.values()) > 0  # the manifest
    assert sum(np.isfinite(v).all() for v in labels.values()) > 0  # CelebA's own rows
    counts = {name: (sum(np.isfinite(np.asarray(a, dtype=float)[i]) for a in train["attributes"] if a is not None),
                     sum(np.isfinite(np.asarray(a, dtype=float)[i]) for a in val["attributes"] if a is not None))
              for i, name in enumerate(CELEBA_ATTRIBUTES)}
    other = counts["Bald"]
    assert counts["Smiling"][0] > other[0] and counts["Male"][0] > other[0]  # GENKI's smiles, the manifest's genders
    out = capsys.readouterr().out  # what each attribute learns from, printed before training
    for name in ("Smiling", "Male"):
        assert f"{name} {counts[name][0]:,} / {counts[name][1]:,}" in out
    assert f"the other 38 {other[0]:,} / {other[1]:,}" in out

    genki_rows = train[train["path"].str.contains("/g/")]
    images, targets = to_tensors(load_batch(genki_rows, model), torch.device("cpu"))
    model.train()
    raw = model(model.prepare(images))
    raw["attributes"].retain_grad()
    model.loss(raw, targets)[0].backward()
    moved = raw["attributes"].grad.abs().sum(0) > 0
    assert moved.tolist() == [j == smile_i for j in range(len(CELEBA_ATTRIBUTES))]

    history = engine.fit(model, train, val, epochs=1, batch_size=8, log_fn=None)
    assert "Smiling.accuracy" in history[-1] and math.isfinite(history[-1]["val_loss"])
    assert torch.isfinite(model.thresholds).all() and torch.isfinite(model.attribute_weights).all()
