"""Training on faces found in photos (issue #19): ``jobs.train --faces detect`` finds each image's face with
the detector of label and serve, caches the detections beside the runs, skips and counts what has no face
or cannot be read; a changed file, detector or mapping back to original pixels is detected again, never reused;
the train job and ``--faces landmarks``. The augmentation in the aligned frame: tests/test_train_faces_augment.py.

The photos are drawn faces (facedata/synth.py) pasted on cluttered backgrounds at known places
(tests/images.py ``face_photo``); the detector is the session's (tests/conftest.py ``finder``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pandas as pd
import pytest

import models
import storage
from core import engine
from core.batches import load_batch
from facedata.datasets import read_dataset
from faces import facecache
from faces.facecache import Detection, DetectionCache
from faces.finder import FaceFinder, FaceOptions
from faces.trainfaces import ALIGN_POINTS, find_training_faces, pick_face
from tests.images import bad_training_files, blank_photo, face_photo, write_files

N_TRAIN, N_VAL = 12, 5  # 5 validation photos: shares of 3 and 2 on the Ray run's 2 workers


class Counting:
    """A FaceFinder that counts the images it is asked to search."""

    def __init__(self, finder):
        self.finder, self.options, self.identity, self.images = finder, finder.options, finder.identity, 0

    def find(self, images, scales=None):
        self.images += len(images)
        return self.finder.find(images, scales)


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory):
    """Photos of one drawn face each (12 train, 4 val) and a manifest with their gender and eyeglasses;
    returns ``(folder, manifest path, {name: faces})``."""
    root = tmp_path_factory.mktemp("photos")
    files, faces, rows = {}, {}, []
    for i in range(N_TRAIN + N_VAL):
        data, found = face_photo([i], seed=i)
        name = f"p{i:02d}.jpg"
        files[name], faces[name] = data, found
        lab = found[0]["labels"]
        rows.append({"path": name, "gender": lab["gender"], "eyeglasses": lab["eyeglasses"],
                     "split": "train" if i < N_TRAIN else "val"})
    write_files(root, files)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root, str(root / "manifest.csv"), faces


def _inside(points, box) -> bool:
    """Whether all 5 points lie inside the box (x1, y1, x2, y2)."""
    p = np.asarray(points).reshape(5, 2)
    return bool(((p[:, 0] > box[0]) & (p[:, 0] < box[2]) & (p[:, 1] > box[1]) & (p[:, 1] < box[3])).all())


def _table(manifest: str) -> pd.DataFrame:
    return read_dataset(f"manifest:{manifest}").table


def test_detections_are_cached_for_every_epoch_and_later_run(photo_set, finder, tmp_path):
    root, manifest, truth = photo_set
    table = _table(manifest)
    first = Counting(finder)
    resolved, report = find_training_faces(table, first, DetectionCache(str(tmp_path), finder.identity))
    assert first.images == len(table) == report.detected == report.used and report.cached == 0
    # the chosen face is the pasted one: its points inside the pasted face's box
    for path, pts in zip(resolved["path"], resolved[ALIGN_POINTS]):
        assert _inside(pts, truth[path.rsplit("/", 1)[1]][0]["box"]), path

    # two epochs of training read the rows' faces; the detector is never called again
    model = models.create_model("hard_sharing")
    history = engine.fit(model, resolved[resolved.index < N_TRAIN], resolved[resolved.index >= N_TRAIN],
                         epochs=2, batch_size=6, log_fn=None)
    assert [h["train_skipped"] for h in history] == [0, 0]
    assert first.images == len(table)

    # a later run (a new cache object over the same storage) reads every entry, detects nothing
    later = Counting(finder)
    again, report2 = find_training_faces(table, later, DetectionCache(str(tmp_path), finder.identity))
    assert later.images == 0 and report2.cached == len(table) and report2.detected == 0
    assert again[ALIGN_POINTS].tolist() == resolved[ALIGN_POINTS].tolist()


def test_a_changed_file_or_detector_setting_is_detected_again(photo_set, finder, tmp_path):
    root, manifest, _ = photo_set
    table = _table(manifest).iloc[:6]
    find_training_faces(table, Counting(finder), DetectionCache(str(tmp_path), finder.identity))
    (root / "p03.jpg").write_bytes(face_photo([103], seed=103)[0])  # another face in the same file name
    try:
        c = Counting(finder)
        _, report = find_training_faces(table, c, DetectionCache(str(tmp_path), finder.identity))
        assert c.images == 1 and report.detected == 1 and report.cached == len(table) - 1
    finally:
        (root / "p03.jpg").write_bytes(face_photo([3], seed=3)[0])
    other = FaceFinder(FaceOptions(detector={"min_face": 20.0}))
    assert other.identity != finder.identity
    c = Counting(other)
    _, report = find_training_faces(table, c, DetectionCache(str(tmp_path), other.identity))
    assert c.images == len(table) and report.cached == 0


def test_detections_cached_with_the_old_mapping_to_original_pixels_are_detected_again(photo_set, finder, tmp_path):
    """Before 2026-12-06 a photo decoded shrunk had its points mapped back with one factor for both axes (up to
    3 px off in y) and cached in a folder named by the detector's identity alone, which that change left as it
    was: such entries are never reused (faces/facecache.py ``cache_key``), their files are detected again."""
    _, manifest, _ = photo_set
    table = _table(manifest).iloc[:4]
    fresh = DetectionCache(str(tmp_path / "fresh"), finder.identity)
    want, _ = find_training_faces(table, finder, fresh)
    # the cache as the code before wrote it: <digest of the identity>/identity.txt and a part, its points 3 px low
    old = tmp_path / "runs" / "_face_cache" / hashlib.sha256(finder.identity.encode()).hexdigest()[:20]
    old.mkdir(parents=True)
    (old / "identity.txt").write_text(finder.identity)
    stale = {sha: Detection(d.width, d.height, d.faces + np.r_[[0.0] * 5, [0.0, 3.0] * 5])
             for sha, d in fresh.load().items()}
    (old / "part-20261205T000000-000000000000.jsonl").write_text(
        "".join(json.dumps(d.to_json(sha)) + "\n" for sha, d in stale.items()))
    c = Counting(finder)
    got, report = find_training_faces(table, c, DetectionCache(str(tmp_path / "runs"), finder.identity))
    assert c.images == len(table) and report.detected == len(table) and report.cached == 0
    assert got[ALIGN_POINTS].tolist() == want[ALIGN_POINTS].tolist()  # the new mapping's points, not the stale
    assert len(list(old.parent.iterdir())) == 2  # a folder of its own; the old one is left as it was
    later = Counting(finder)  # and the new entries are reused
    find_training_faces(table, later, DetectionCache(str(tmp_path / "runs"), finder.identity))
    assert later.images == 0


def test_the_cache_is_keyed_by_the_mapping_to_original_pixels(tmp_path, monkeypatch):
    """faces.finder.TO_ORIGINAL is the one number to bump when that mapping changes: it names the cache's folder."""
    cache = DetectionCache(str(tmp_path), "detector A")
    assert cache.key == "detector A to_original=2" and cache.identity == "detector A"
    cache.put("ab" * 32, Detection(640, 480, np.zeros((1, 15))))
    cache.flush()
    assert (tmp_path / "_face_cache").joinpath(cache.folder.rsplit("/", 1)[1], "identity.txt").read_text() == cache.key
    monkeypatch.setattr(facecache, "TO_ORIGINAL", 3)
    bumped = DetectionCache(str(tmp_path), "detector A")
    assert bumped.folder != cache.folder and bumped.get("ab" * 32) is None


def test_a_file_changed_after_its_face_was_found_is_skipped_not_misaligned(photo_set, finder, tmp_path):
    root, manifest, _ = photo_set
    table = _table(manifest).iloc[:3]
    resolved, _ = find_training_faces(table, finder, DetectionCache(str(tmp_path), finder.identity))
    model = models.create_model("hard_sharing")
    store = {p: storage.read_bytes(p) for p in resolved["path"]}
    store[resolved["path"][1]] = face_photo([77], seed=77)[0]
    failed: list = []
    batch = load_batch(resolved, model, read=store.__getitem__, failed=failed)
    assert len(batch["image"]) == 2 and failed[0][0] == resolved["path"][1] and "changed" in failed[0][1]


def test_no_face_bad_files_and_an_unmatched_box_are_skipped_with_their_reason(photo_set, finder, tmp_path):
    root, _, _ = photo_set
    folder = tmp_path / "mixed"
    two, faces = face_photo([40, 41], size=(420, 240), seed=40)
    files = {"one.jpg": face_photo([2], seed=2)[0], "two.jpg": two, "two_right.jpg": two,
             "noface.jpg": blank_photo(), **bad_training_files()}
    write_files(folder, files)
    right = faces[1]["box"]
    rows = [{"path": n, "gender": 0, "face_box": None} for n in files]
    rows[1]["face_box"] = json.dumps([5, 5, 40, 40])  # names neither face of two.jpg
    rows[2]["face_box"] = json.dumps(right)  # names the right-hand face
    pd.DataFrame(rows).to_csv(folder / "m.csv", index=False)
    table = _table(str(folder / "m.csv"))
    resolved, report = find_training_faces(table, finder, DetectionCache(str(tmp_path), finder.identity))
    assert report.kinds() == {"unmatched": 1, "no_face": 1, "truncated": 1, "empty": 1, "too_large": 1}, report.skipped
    assert sorted(p.rsplit("/", 1)[1] for p in resolved["path"]) == ["one.jpg", "two_right.jpg"]
    got = resolved[resolved["path"].str.endswith("two_right.jpg")][ALIGN_POINTS].iloc[0]
    assert _inside(got, faces[1]["box"]) and not _inside(got, faces[0]["box"])
    assert "face_box" not in resolved.columns and "skipped 5" in report.line()


def test_pick_face_by_points_and_its_refusals():
    faces = np.zeros((2, 15))
    faces[0, 5:] = [10, 10, 30, 10, 20, 20, 12, 30, 28, 30]
    faces[1, 5:] = faces[0, 5:] + 100
    faces[:, :4] = [[0, 0, 40, 40], [100, 100, 140, 140]]
    assert pick_face(faces) == 0
    assert pick_face(faces, points=faces[1, 5:] + 1) == 1
    with pytest.raises(ValueError, match="unmatched"):
        pick_face(faces, points=faces[0, 5:] + 50)
    with pytest.raises(ValueError, match="no_face"):
        pick_face(np.zeros((0, 15)))


def test_whole_images_that_cannot_be_decoded_are_counted_and_training_goes_on(tmp_path):
    from facedata import synth

    root = synth.generate("celeba", 16, str(tmp_path / "c"), seed=2, size="40x48")
    table = read_dataset(f"celeba:{root}").table[["path", "gender", "eyeglasses"]]
    write_files(tmp_path / "bad", bad_training_files())
    bad = pd.DataFrame({"path": [str(tmp_path / "bad" / n) for n in bad_training_files()], "gender": 0.0,
                        "eyeglasses": 0.0})
    train = pd.concat([table.iloc[:10], bad], ignore_index=True)
    model = models.create_model("hard_sharing")
    history = engine.fit(model, train, table.iloc[10:], epochs=2, batch_size=4, log_fn=None)
    assert [h["train_skipped"] for h in history] == [3, 3] and history[-1]["val_skipped"] == 0
    assert all(np.isfinite(h["train_loss"]) for h in history)


def test_the_cache_works_on_s3(s3_bucket):
    _, bucket = s3_bucket
    cache = DetectionCache(f"s3://{bucket}/runs", "detector A")
    faces = np.arange(30, dtype=np.float64).reshape(2, 15)
    cache.put("ab" * 32, Detection(640, 480, faces))
    assert cache.flush() == 1
    back = DetectionCache(f"s3://{bucket}/runs", "detector A").get("ab" * 32)
    assert back.width == 640 and np.allclose(back.faces, faces)
    assert DetectionCache(f"s3://{bucket}/runs", "detector B").get("ab" * 32) is None


def test_faces_landmarks_needs_5_points_per_row():
    from faces.trainfaces import landmark_faces

    t = pd.DataFrame({"path": ["a", "b", "c"], "landmarks": [list(range(10)), None, list(range(8))]})
    out, report = landmark_faces(t)
    assert list(out["path"]) == ["a"] and report.kinds() == {"no_landmarks": 2}
    with pytest.raises(ValueError, match="landmarks"):
        landmark_faces(t.drop(columns=["landmarks"]))


# --- the train job ---------------------------------------------------------------------------------------
def test_jobs_train_with_faces_detect_on_photos_and_early_stopping(ray_session, photo_set, finder, tmp_path,
                                                                     capsys, monkeypatch):
    """``jobs.train --faces detect`` on a manifest of photos with a photo without a face and three broken
    files in its training split: they are skipped and counted, the run trains on the 12 faces, the
    checkpoint records the faces, the template and the augmentation, and a later run reads the cache.

    The same run checks early stopping on DDP workers (one Ray Train run instead of two): with lr 0 the weights
    never move (hard_sharing has no batch norm or dropout, and evaluation no augmentation), so validation
    never improves after epoch 1 and the recipe's rule (stop after --patience epochs without improvement) must
    end the run after epoch 2 of 6 on both workers (a worker that went on alone would hang in the next
    all-reduce); the same command again exports the finished run without training or starting a worker."""
    from faces.align import default_template
    from jobs import train as train_job
    from models.checkpoint import load_checkpoint
    from raytasks.train import TrainSpec, prepare

    root, manifest, _ = photo_set
    extra = {"noface.jpg": blank_photo(9), **bad_training_files()}
    write_files(tmp_path / "extra", extra)
    rows = pd.read_csv(manifest)
    rows["path"] = [str(root / p) for p in rows["path"]]
    rows = pd.concat([rows, pd.DataFrame({"path": [str(tmp_path / "extra" / n) for n in extra], "gender": 0,
                                          "eyeglasses": 0, "split": "train"})], ignore_index=True)
    rows.to_csv(tmp_path / "m.csv", index=False)
    data, runs = f"manifest:{tmp_path / 'm.csv'}", str(tmp_path / "runs")
    argv = ["--model", "hard_sharing", "--data", data, "--storage", runs, "--name", "hs", "--workers", "2",
            "--epochs", "6", "--lr", "0", "--patience", "1", "--batch-size", "4", "--augment", "hflip=0.5",
            "--augment", "brightness=0.2", "--align-jitter", "1"]
    outcome = train_job.main(argv)
    out = capsys.readouterr().out
    assert ("faces (detect): 17/21 images used, 0 from the cache, 18 detected" in out
            and "skipped 4 (empty 1, no_face 1, too_large 1, truncated 1)" in out), out
    model, info = load_checkpoint(outcome.output)
    assert info.extra["faces"]["mode"] == "detect" and info.extra["faces"]["detector"] == finder.identity
    assert info.extra["faces"]["report"]["skipped_total"] == 4 and info.extra["faces"]["template"] == "canonical"
    assert info.extra["augment"]["hflip"] == 0.5 and info.extra["augment"]["rotation"] == 3.0
    assert model.preprocessing.template == default_template(model.preprocessing)  # hard_sharing has none of its own
    assert [e["train_images"] for e in outcome.history] == [N_TRAIN, N_TRAIN]
    # every validation photo once a validation, on uneven shares (raytasks.train.data.val_datasets)
    assert all(e["train_skipped"] == 0 and e["val_images"] == N_VAL for e in outcome.history)
    # early stopping, on both workers: 12 faces, 6 a worker, batches of 2 a worker
    assert "early stopping after epoch 2: no improvement" in out
    assert [e["epoch"] for e in outcome.history] == [1, 2] and [e["stopped"] for e in outcome.history] == [0, 1]
    assert all([r["steps"] for r in e["ranks"]] == [3, 3] for e in outcome.history)
    again = train_job.main(argv)  # the same command again: the run is complete, nothing more is trained
    out = capsys.readouterr().out
    assert "is complete (2 epochs, stopped early)" in out and again.output == outcome.output
    assert "training hard_sharing on" not in out  # no worker group started: exported from the run's storage
    assert len(again.history) == 2
    # an --output that cannot be written: refused before anything when it can be told (a folder), and a write
    # that fails at the end keeps the run, which the same command with another --output exports
    import raytasks.train.job as train_run

    with pytest.raises(SystemExit):
        train_job.main([*argv, "--output", str(tmp_path)])
    assert f"--output {tmp_path}: it is a folder" in capsys.readouterr().err
    real_write = storage.write_bytes

    def refused(uri, data):
        if uri.endswith("denied.pt"):
            raise PermissionError(13, "Permission denied", uri)
        real_write(uri, data)

    monkeypatch.setattr(train_run.storage, "write_bytes", refused)
    with pytest.raises(SystemExit):
        train_job.main([*argv, "--output", str(tmp_path / "denied.pt")])
    err = capsys.readouterr().err
    assert f"cannot write --output {tmp_path / 'denied.pt'} (PermissionError" in err and "is kept in" in err
    monkeypatch.setattr(train_run.storage, "write_bytes", real_write)
    third = train_job.main([*argv, "--output", str(tmp_path / "exported.pt")])
    assert "is complete (2 epochs" in capsys.readouterr().out and load_checkpoint(third.output)[1].hash == \
        load_checkpoint(outcome.output)[1].hash

    # jobs.evaluate reads a detect-trained checkpoint through detection unless told otherwise
    from jobs import evaluate as evaluate_job

    metrics = evaluate_job.main(["--checkpoint", outcome.output, "--data", data, "--split", "val"])
    assert "images_without_face" in metrics and metrics["n_images"] == N_VAL
    assert "images_without_face" not in evaluate_job.main(["--checkpoint", outcome.output, "--data", data,
                                                          "--split", "val", "--faces", "whole"])

    # a later run over the same storage finds every detection in the cache
    *_, faces = prepare(TrainSpec(model="hard_sharing", data=data, storage=runs, name="hs-2", faces="detect"))
    assert faces["report"]["cached"] == 18 and faces["report"]["detected"] == 0


def test_faces_landmarks_aligns_with_the_datas_points_and_bad_flags_fail(tmp_path):
    """``--faces landmarks`` (no detector): every row is aligned with its own 5 points onto the canonical
    template, so DMM-CNN's landmark targets land on the template; settings that do not apply fail."""
    from facedata import synth
    from faces.align import template_of
    from raytasks.train import TrainError, TrainSpec, prepare

    root = synth.generate("celeba", 30, str(tmp_path / "c"), seed=4, size="89x109")
    spec = TrainSpec(model="dmm_cnn", data=f"celeba:{root}", storage=str(tmp_path / "runs"), name="lm",
                     faces="landmarks", model_kwargs={"depth": 18, "image_size": 64})
    model, _, train, val, faces = prepare(spec)
    assert faces["mode"] == "landmarks" and faces["report"]["used"] == len(train) + len(val) == 27  # 3 test
    assert model.preprocessing.template_crop is None
    batch = load_batch(train.iloc[:8], model)
    H, W = model.preprocessing.size
    want = template_of(model.preprocessing).numpy() / [W, H] * 2 - 1  # the template in the targets' units
    got = batch["t:landmarks"].reshape(-1, 5, 2)
    assert np.abs(got - want[None]).mean() < 0.06, np.abs(got - want[None]).mean()
    assert not (tmp_path / "runs" / "_face_cache").exists()  # nothing was detected
    # --template measured: the data set's own framing (where its crops put the 5 points, here from its points),
    # in place of the canonical template; the faces land on it as well
    model_m, _, train_m, _, faces_m = prepare(dataclasses.replace(spec, template="measured"))
    assert faces_m["template"] == "measured" and model_m.preprocessing.template_crop is not None
    assert np.abs(template_of(model_m.preprocessing) - template_of(model.preprocessing)).max() > 1  # pixels
    got_m = load_batch(train_m.iloc[:8], model_m)["t:landmarks"].reshape(-1, 5, 2)
    want_m = template_of(model_m.preprocessing).numpy() / [W, H] * 2 - 1
    assert np.abs(got_m - want_m[None]).mean() < 0.06, np.abs(got_m - want_m[None]).mean()
    with pytest.raises(TrainError, match="needs --template-images above 0"):
        prepare(dataclasses.replace(spec, template="measured", template_images=0))
    # data without a split of its own (UTKFace) is split by --split-seed: another training seed holds out the
    # same faces, another split seed draws another split
    utk = TrainSpec(model="age_gender_race", data=f"utkface:{synth.generate('utkface', 40, str(tmp_path / 'u40'), seed=2)}",
                    storage=str(tmp_path / "runs"), name="split", faces="whole", template_images=0,
                    model_kwargs={"depth": 18, "image_size": 32, "backbone": "resnet"})
    _, _, train_0, val_0, _ = prepare(utk)
    _, _, train_s1, val_s1, _ = prepare(dataclasses.replace(utk, seed=1))
    assert (list(train_s1["path"]), list(val_s1["path"])) == (list(train_0["path"]), list(val_0["path"]))
    _, _, train_p1, _, _ = prepare(dataclasses.replace(utk, split_seed=2))
    assert set(train_p1["path"]) != set(train_0["path"])

    with pytest.raises(TrainError, match="apply to --faces detect only"):
        prepare(dataclasses.replace(spec, faces="whole", face_options={"detector": {"size": 320}}))
    with pytest.raises(TrainError, match="needs 5-point landmarks"):
        prepare(dataclasses.replace(spec, data=f"utkface:{synth.generate('utkface', 12, str(tmp_path / 'u'), seed=1)}",
                                    model="age_gender_race", model_kwargs={"depth": 18, "image_size": 32, "backbone": "resnet"}))
    pd.DataFrame({"path": [str(p) for p in sorted((tmp_path / "c").rglob("*.jpg"))[:4]], "gender": [0, 1, 0, 1],
                  "landmarks": [json.dumps(list(range(8)))] * 4, "split": ["train", "train", "train", "val"]}
                 ).to_csv(tmp_path / "four.csv", index=False)
    with pytest.raises(TrainError, match="no training or validation image has a face.*no_landmarks 4"):
        prepare(dataclasses.replace(spec, data=f"manifest:{tmp_path / 'four.csv'}", model="hard_sharing",
                                    model_kwargs={}))


def test_a_long_pass_writes_its_detections_as_it_goes_and_reports_progress(photo_set, finder, tmp_path, monkeypatch):
    import faces.trainfaces as tf

    _, manifest, _ = photo_set
    monkeypatch.setattr(tf, "CHUNK", 2)
    monkeypatch.setattr(tf, "FLUSH_EVERY", 2)
    seen = []
    tf.find_training_faces(_table(manifest).iloc[:5], finder, DetectionCache(str(tmp_path), finder.identity),
                           progress=lambda r, total: seen.append((r.images, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert len(list((tmp_path / "_face_cache").rglob("part-*.jsonl"))) == 3  # 2 + 2 + 1 entries
