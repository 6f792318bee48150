"""The label job (raytasks/label/job.py, jobs/label.py) against a real S3 endpoint (moto's server on 127.0.0.1),
local folders and manifests: one row per input image, the documented schema, the error rows, rows equal to
the model's own answer for the same bytes. A run killed midway then resumed with exactly one row per input:
tests/test_modelset.py (the label job of a model set, on S3)."""

from __future__ import annotations

import dataclasses
import io
import json
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import models
import storage
from core.annotator import Annotator
from core.modelset import ModelSet
from facedata import inputs
from models.checkpoint import save_checkpoint
from raytasks import label as L
from tests.helpers import assert_row_matches, put_all, read_rows
from tests.images import (
    BAD,
    HEIC_HEAD,
    NOT_INPUTS,
    avif_image,
    bad_files,
    face_jpeg,
    huge_png,
    odd_images,
    real_faces,
    write_files,
)

WHOLE = {"mode": "whole"}  # these tests are about reading, writing and resuming: one row per image


def expected_rows(ckpt: str, items: dict[str, bytes]) -> dict[str, dict]:
    """The core's rows (``Annotator.annotate_bytes``, whole images) for the same bytes, 16 at a time."""
    ann = Annotator(ckpt, device="cpu", precision="fp32", threads=2)
    rows = {}
    names = list(items)
    for i in range(0, len(names), 16):
        chunk = names[i:i + 16]
        for r in ann.annotate_bytes([(n, items[n]) for n in chunk], faces="whole"):
            rows[r["path"]] = r
    return rows


def one_model(ckpt: str) -> dict:
    """The ``model_set`` argument of the label job's actors for one checkpoint."""
    return ModelSet(((None, ckpt),)).to_dict()


# --------------------------------------------------------------------------------------------------------
# a bucket prefix: synthetic, odd, bad and real images -> Parquet in the bucket, then a second run
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_run(s3_server, ray_session, hs_checkpoint):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket = f"label-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    images = {f"faces/{'sub/' if i % 3 == 0 else ''}face_{i:03d}.jpg": face_jpeg(i) for i in range(14)}
    images.update(odd_images())
    images.update(real_faces())
    bad = bad_files()
    put_all(client, bucket, "photos/", {**images, **bad, **NOT_INPUTS})
    ckpt = f"s3://{bucket}/models/hs.pt"
    storage.write_bytes(ckpt, Path(hs_checkpoint).read_bytes())
    output = f"s3://{bucket}/labels/run-1/"
    spec = L.LabelSpec(checkpoint=ckpt, input=f"s3://{bucket}/photos/", output=output, precision="fp32", faces=WHOLE,
                       batch_size=8, max_rows_per_file=10, max_actors=1)
    lines: list[str] = []
    summary = L.label(spec, echo=lines.append)
    return {"client": client, "bucket": bucket, "images": images, "bad": bad, "spec": spec, "summary": summary,
            "rows": read_rows(output), "ckpt": ckpt, "lines": lines}


def test_s3_prefix_one_row_per_image_with_schema_and_errors(s3_run):
    rows, images, bad = s3_run["rows"], s3_run["images"], s3_run["bad"]
    prefix = f"s3://{s3_run['bucket']}/photos/"
    expected_paths = {prefix + n for n in list(images) + list(bad)}
    paths = rows.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == len(expected_paths)
    assert set(paths) == expected_paths  # not notes.txt, meta/info.json nor the hidden file
    assert rows.schema == Annotator(s3_run["ckpt"], device="cpu", precision="fp32").schema
    by_path = {r["path"]: r for r in rows.to_pylist()}
    for name, kind in BAD.items():
        r = by_path[prefix + name]
        assert (r["ok"], r["error_kind"]) == (False, kind), r
        assert r["error_message"] and r["gender"] is None and r["width"] is None
    for name in images:
        r = by_path[prefix + name]
        assert r["ok"] and r["error_kind"] is None and r["gender"] in ("male", "female"), r
    assert by_path[prefix + "faces/face_001.jpg"]["width"] == 56
    files = [o for o in s3_run["client"].list_objects_v2(Bucket=s3_run["bucket"], Prefix="labels/run-1/labels/")
             ["Contents"] if o["Key"].endswith(".parquet")]
    assert len(files) >= 3 and all(pq.ParquetFile(io.BytesIO(s3_run["client"].get_object(Bucket=s3_run["bucket"], Key=f["Key"])
                                         ["Body"].read())).metadata.num_rows <= 10 for f in files)
    s = s3_run["summary"]
    assert (s["inputs"], s["rows_written"], s["rows_total"], s["complete"]) == (len(expected_paths),) * 3 + (True,)
    assert s["errors_by_kind"] == {"empty": 1, "not_image": 3, "too_large": 1, "truncated": 1}
    # a photo format not decoded here is an input (by extension or by signature) whose row names the format
    assert "HEIC/HEIF" in by_path[prefix + "bad/IMG_0001.HEIC"]["error_message"]
    assert "AVIF" in by_path[prefix + "bad/avif_without_extension"]["error_message"]
    # the rest is skipped and named by extension (the video is an ISO base media file too, of other brands)
    assert s["skipped_not_image"] == 3 and s["images_per_s"] > 0
    assert s["skipped_by_extension"] == {".txt": 1, ".json": 1, ".mp4": 1}
    # a hidden file is not an input either, but it is counted and named, in the summary and in a line of its own
    assert (s["skipped_hidden"], s["hidden_examples"]) == (1, [".hidden.jpg"])
    assert "1 hidden file or folder skipped (names starting with '.': .hidden.jpg): not labeled; rename or move any " \
           "photos among them to label them" in s3_run["lines"]
    body = s3_run["client"].get_object(Bucket=s3_run["bucket"], Key="labels/run-1/_summary.json")["Body"].read()
    assert json.loads(body)["rows_total"] == len(expected_paths)


def test_s3_rows_equal_the_models_answer_for_the_same_bytes(s3_run):
    prefix = f"s3://{s3_run['bucket']}/photos/"
    items = {prefix + n: d for n, d in {**s3_run["images"], **s3_run["bad"]}.items()}
    want = expected_rows(s3_run["ckpt"], items)
    fields = Annotator(s3_run["ckpt"], device="cpu", precision="fp32").schema
    for got in s3_run["rows"].to_pylist():
        assert_row_matches(got, want[got["path"]], fields)


def test_real_faces_from_shared_data_are_labeled(s3_run, shared_data):
    real = [n for n in s3_run["images"] if n.startswith("real/")]
    assert real, "shared data present but no faces were uploaded"
    prefix = f"s3://{s3_run['bucket']}/photos/"
    got = {r["path"]: r for r in s3_run["rows"].to_pylist()}
    for n in real:
        r = got[prefix + n]
        assert r["ok"] and r["width"] in (200, 89) and r["height"] in (200, 109), r


def test_second_run_over_finished_output_adds_nothing(s3_run):
    client, bucket = s3_run["client"], s3_run["bucket"]
    before = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="labels/run-1/labels/")["Contents"])
    said = []
    summary = L.label(s3_run["spec"], echo=said.append)
    after = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="labels/run-1/labels/")["Contents"])
    assert summary["rows_written"] == 0 and summary["rows_total"] == s3_run["rows"].num_rows
    # no pipeline starts (on 2 CPUs its checkpoint filter and predictor actor left none for the read: a hang)
    assert "every input is labeled already: nothing to run" in said and summary["complete"]
    assert after == before


# --------------------------------------------------------------------------------------------------------
# local folder with an RGB model; CSV manifest with relative paths, a missing file and --limit
# --------------------------------------------------------------------------------------------------------

def test_local_folder_rgb_model(tmp_path, ray_session):
    try:
        model = models.create_model("age_gender_race", image_size=32, depth=18, hidden=(16,))
    except ValueError as e:
        pytest.skip(f"age_gender_race unavailable: {e}")
    ckpt = str(tmp_path / "agr.pt")
    save_checkpoint(model, ckpt)
    folder = tmp_path / "photos"
    files = {f"p{i}.jpg": face_jpeg(i, (48, 60)) for i in range(6)}
    files.update(odd_images())
    write_files(folder, {**files, **NOT_INPUTS})
    output = str(tmp_path / "out")
    # one run (a --limit trial run finished by the same command again: tests/test_faces_e2e.py's label job)
    spec = L.LabelSpec(checkpoint=ckpt, input=str(folder), output=output, precision="fp32", batch_size=4, faces=WHOLE,
                       max_actors=1)
    summary = L.label(spec, echo=lambda *_: None)
    rows = read_rows(output)
    assert sorted(rows.column("path").to_pylist()) == sorted(str(folder / n) for n in files)
    want = expected_rows(ckpt, {str(folder / n): d for n, d in files.items()})
    fields = Annotator(ckpt, device="cpu", precision="fp32").schema
    for got in rows.to_pylist():
        assert got["ok"] and got["age"] is not None
        assert_row_matches(got, want[got["path"]], fields)
    saved = json.loads((Path(output) / "_summary.json").read_text())
    assert saved["rows_total"] == len(files) and saved["files_listed"] == len(files) + 3  # notes, info.json, clip
    assert saved["skipped_not_image"] == 3 and saved["rows_before"] == 0 and summary == saved
    import pandas as pd

    assert len(pd.read_parquet(output)) == len(files)  # reading the output folder reads just the labels


def test_csv_manifest_relative_paths_missing_file_duplicates_and_paths_outside_the_folder(tmp_path, ray_session,
                                                                                          hs_checkpoint):
    """A CSV manifest with relative paths: one row per distinct file, a missing file an ``unreadable`` row;
    issue #13 items 7 and 9: duplicates (other spellings of one file) counted, not labeled twice; rows
    outside the manifest's folder (absolute, ``..``, /proc) are ``forbidden`` rows that read nothing, alike
    for files that exist. Then the output refuses another checkpoint."""
    folder = tmp_path / "set"
    folder.mkdir()
    names = [f"a{i}.jpg" for i in range(7)]
    for i, n in enumerate(names):
        (folder / n).write_bytes(face_jpeg(100 + i))
    (tmp_path / "private.jpg").write_bytes(face_jpeg(399))  # a real image next to the folder, not in it
    dups = ["./a0.jpg", str(folder / "a0.jpg")]
    outside = ["../private.jpg", "/proc/self/environ", str(tmp_path / "nothing-here.jpg")]
    listed = names + ["gone.jpg"] + dups + outside
    (folder / "list.csv").write_text("id,path\n" + "".join(f"{i},{n}\n" for i, n in enumerate(listed)))
    spec = L.LabelSpec(checkpoint=hs_checkpoint, input=str(folder / "list.csv"), output=str(tmp_path / "out"), faces=WHOLE,
                       precision="fp32", batch_size=2, max_actors=1)
    second = L.label(spec, echo=lambda *_: None)
    rows = {r["path"]: r for r in read_rows(spec.output).to_pylist()}
    assert sorted(rows) == sorted(names + ["gone.jpg"] + outside) and second["rows_total"] == 11 and second["complete"]
    assert (second["inputs"], second["duplicates"]) == (11, 2)
    assert all(rows[n]["ok"] for n in names)
    assert (rows["gone.jpg"]["ok"], rows["gone.jpg"]["error_kind"]) == (False, "unreadable")
    assert rows["gone.jpg"]["error_message"] == "file not found"
    assert {(rows[p]["ok"], rows[p]["error_kind"], rows[p]["error_message"], rows[p]["width"]) for p in outside} == {
        (False, "forbidden", "path is outside the allowed prefixes (--allow-prefix)", None)}
    other = str(tmp_path / "other.pt")
    save_checkpoint(models.create_model("hard_sharing", hidden=8), other)
    with pytest.raises(L.LabelError, match="holds rows of checkpoint"):  # one output, one checkpoint
        L.label(dataclasses.replace(spec, checkpoint=other), echo=lambda *_: None)
    (folder / "nopath.csv").write_text("file,label\na0.jpg,1\n")  # the reader's InputError, as the job's LabelError
    with pytest.raises(L.LabelError, match="no 'path' column"):
        L.label(dataclasses.replace(spec, input=str(folder / "nopath.csv"), output=str(tmp_path / "out2")),
                echo=lambda *_: None)


# --------------------------------------------------------------------------------------------------------
# no Ray needed
# --------------------------------------------------------------------------------------------------------

def test_bad_commands_fail_clearly(tmp_path, hs_checkpoint, capsys):
    from jobs.label import main

    with pytest.raises(SystemExit):
        main(["--checkpoint", hs_checkpoint, "--input", str(tmp_path), "--output", str(tmp_path / "o"),
              "--gpu-decode"])
    err = capsys.readouterr().err
    assert "--gpu-decode" in err and "--gpus-per-actor > 0" in err
    with pytest.raises(L.LabelError, match="gpus-per-actor > 0"):
        L.LabelSpec(hs_checkpoint, str(tmp_path), str(tmp_path / "o"), gpu_decode=True).validate()
    bad = tmp_path / "m.csv"
    bad.write_text("file,label\na.jpg,1\n")
    assert issubclass(L.LabelError, inputs.InputError)  # the job's error is the reader's (#18)
    with pytest.raises(inputs.InputError, match="no 'path' column"):
        inputs.check_manifest(str(bad))
    holes = tmp_path / "holes.parquet"
    pq.write_table(pa.table({"path": ["a.jpg", None, ""]}), holes)
    with pytest.raises(inputs.InputError, match="2 of 3 rows have no path"):
        inputs.manifest_rows(str(holes))


def test_gpu_flags_against_a_cluster_without_gpus(ray_session, hs_checkpoint, tmp_path):
    spec = L.LabelSpec(hs_checkpoint, str(tmp_path), str(tmp_path / "o"), gpus_per_actor=1, gpu_decode=True,
                       faces=WHOLE)
    spec.validate()
    with pytest.raises(L.LabelError, match="has 0 GPUs"):  # a Ray this process started: nothing can add GPUs
        L.resolve_pool(spec, can_grow=False)
    # the fixture's own ray.init() is such a Ray (as a user's script or notebook): an error, not a wait forever
    # (a resumed run on a 2-CPU ray.init() waited for an autoscaler that does not exist)
    assert L.started_here()
    with pytest.raises(L.LabelError, match=r"started: start it with more logical CPUs, e.g. ray.init\(num_cpus=7\)"):
        L.resolve_pool(dataclasses.replace(spec, gpus_per_actor=0, min_actors=5), resuming=True)
    warnings = []  # a cluster: the autoscaler may add GPU nodes, so the job waits for them
    assert L.resolve_pool(dataclasses.replace(spec, max_actors=4), can_grow=True, warn=warnings.append) == (1, 4)
    assert "waiting for the autoscaler" in warnings[0]
    with pytest.raises(RuntimeError, match="--gpu-decode needs CUDA"):
        L.AnnotatorActor(one_model(hs_checkpoint), faces=WHOLE, device="cpu", gpu_decode=True)
    # with detection the actor decodes photos (tests/test_gpu_decode_photos.py), for one model or a set; whole
    # images are decoded to one model's input size, so a set is refused there
    L.LabelSpec(hs_checkpoint, str(tmp_path), str(tmp_path / "o"), gpus_per_actor=1, gpu_decode=True).validate()
    L.LabelSpec((f"a={hs_checkpoint}", f"b={hs_checkpoint}"), str(tmp_path), str(tmp_path / "o"), gpus_per_actor=1,
                gpu_decode=True).validate()
    with pytest.raises(L.LabelError, match="takes a single --checkpoint"):
        L.LabelSpec((f"a={hs_checkpoint}", f"b={hs_checkpoint}"), str(tmp_path), str(tmp_path / "o"),
                    gpus_per_actor=1, gpu_decode=True, faces=WHOLE).validate()


def test_a_batch_size_no_node_can_decode_is_refused_not_waited_for(ray_session, hs_checkpoint, tmp_path, capsys):
    """A decode task's memory grows with --batch-size; one that asks for more than any node offers is never
    scheduled: on a Ray this process started the job refuses it, naming the largest batch size that fits."""
    import ray

    from jobs.label import main
    from raytasks.label.decoding import decode_memory, largest_batch_within

    spec = L.LabelSpec(hs_checkpoint, str(tmp_path), str(tmp_path / "o"))
    faces = spec.face_options().to_dict()
    largest = max(n["Resources"].get("memory", 0.0) for n in ray.nodes() if n["Alive"])
    fits = largest_batch_within(largest, faces, [])
    assert fits > 0 and decode_memory(fits, faces, []) <= largest < decode_memory(fits + 1, faces, [])
    L.check_decode_fits(dataclasses.replace(spec, batch_size=fits), faces, [], can_grow=False)
    with pytest.raises(L.LabelError, match=f"use --batch-size {fits} or less"):
        L.check_decode_fits(dataclasses.replace(spec, batch_size=fits + 1), faces, [], can_grow=False)
    warnings: list[str] = []  # a cluster: the autoscaler may add a larger node type
    L.check_decode_fits(dataclasses.replace(spec, batch_size=fits + 1), faces, [], can_grow=True,
                        warn=warnings.append)
    assert "waiting for the autoscaler" in warnings[0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(face_jpeg(1))
    with pytest.raises(SystemExit):  # the job itself: before anything is listed or written
        main(["--checkpoint", hs_checkpoint, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
              "--batch-size", str(fits + 1)])
    assert f"use --batch-size {fits} or less" in capsys.readouterr().err
    assert not (tmp_path / "o" / "labels").exists()


def test_an_output_the_lease_cannot_be_written_to_is_a_clear_error(ray_session, hs_checkpoint, tmp_path, s3_bucket,
                                                                   capsys):
    from jobs.label import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(face_jpeg(1))
    (tmp_path / "file").write_bytes(b"x")
    for output, why in ((str(tmp_path / "file" / "out"), "NotADirectoryError"),
                        ("s3://no-such-bucket-here/out", "NoSuchBucket")):
        with pytest.raises(SystemExit):
            main(["--checkpoint", hs_checkpoint, "--input", str(tmp_path / "in"), "--output", output])
        err = capsys.readouterr().err
        assert f"error: --output {output}: the run's lease cannot be written there ({why}" in err, err[-2000:]


def test_image_signatures():
    assert inputs.looks_like_image(face_jpeg(1)[:32]) and inputs.looks_like_image(huge_png()[:32])
    assert inputs.looks_like_image(odd_images()["odd/palette.png"][:32])
    assert not inputs.looks_like_image(b"BM is also how a text can start") and not inputs.looks_like_image(b"")
    assert not inputs.looks_like_image(b'{"json": true}')
    # photo formats not decoded here are inputs (their rows name the format); videos are not
    assert inputs.looks_like_image(HEIC_HEAD) and inputs.looks_like_image(avif_image()[:32])
    assert not inputs.looks_like_image(NOT_INPUTS["clip.mp4"][:32])
    assert inputs.has_image_extension("s3://b/IMG_0001.HEIC") and not inputs.has_image_extension("a.heic.txt")
    listing = inputs.Listing(skipped_not_image=13, skipped_by_extension=Counter({f".x{i}": 1 for i in range(11)}))
    listing.skipped_by_extension[""] = 2  # the most common first
    assert listing.skipped_text().startswith("13 files skipped, not images ((no extension) 2, .x0 1,")
    assert listing.skipped_text().endswith(", ...)") and len(listing.skipped_extensions()) == 10


@pytest.mark.parametrize("resize", ["stretch", "shorter_center_crop"])
def test_gpu_decode_path_matches_cpu_decode(resize):
    """The --gpu-decode code path (torchvision decode_jpeg + the model's resize in torch), run on the CPU:
    same geometry as models.preprocess.decode, pixels within a few levels."""
    import torch

    from models.preprocess import Preprocessing, decode
    from raytasks.label import gpu_decode as G

    pre = Preprocessing(size=(40, 40), resize=resize, resize_shorter=46 if resize != "stretch" else None)
    datas = [face_jpeg(i, (50 + 10 * i, 64)) for i in range(3)]
    assert all(G.jpeg_for_gpu(d, pre) for d in datas)
    assert not G.jpeg_for_gpu(odd_images()["odd/cmyk.jpg"], pre) and not G.jpeg_for_gpu(huge_png(), pre)
    for d, res in zip(datas, G.gpu_decode_batch(datas, pre, torch.device("cpu"))):
        img, geo = res
        ref, ref_geo = decode(d, pre)
        assert img.dtype == torch.uint8 and img.shape == ref.shape
        assert {k: geo[k] for k in ("width", "height", "sx", "sy", "tx", "ty")} == pytest.approx(
            {k: ref_geo[k] for k in ("width", "height", "sx", "sy", "tx", "ty")})
        assert (img.float() - ref.float()).abs().mean() < 6.0


def test_a_replaced_checkpoint_never_mixes_two_models_rows(tmp_path, hs_checkpoint):
    """Issue 13 item 8: the run resolves --checkpoint to its hash once; an actor that loads other weights
    (the object was overwritten meanwhile) refuses to start, and a resumed run reads the provenance of every
    file of the output, not only the first row."""
    from raytasks.label.output import output_provenance

    with pytest.raises(RuntimeError, match="overwritten during the run"):
        L.AnnotatorActor(one_model(hs_checkpoint), faces=WHOLE, precision="fp32", identity="sha256:" + "0" * 64)
    labels = tmp_path / "labels"
    labels.mkdir()
    for i, (ck, det) in enumerate([("sha256:a", "whole"), ("sha256:a", "whole"), ("sha256:b", "whole")]):
        pq.write_table(pa.table({"path": [f"{i}.jpg"], "checkpoint": [ck], "detector": [det]}), labels / f"{i}.parquet")
    checkpoints, detectors = output_provenance(str(labels))
    assert checkpoints == {"sha256:a", "sha256:b"} and detectors == {"whole"}
