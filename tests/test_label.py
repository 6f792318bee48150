"""The label job (raytasks/label/job.py, jobs/label.py) against a real S3 endpoint (moto's server on 127.0.0.1),
local folders and manifests: one row per input image, the documented schema, the error rows, rows equal to
the model's own answer for the same bytes, and a run killed midway then resumed with exactly one row per input."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from core.predictor import Predictor
from PIL import Image

import models
from facedata import inputs, storage
from facedata.synth import draw_face, encode_jpeg
from models.checkpoint import save_checkpoint
from raytasks import label as L
from raytasks.label.output import LABELS_DIR

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WHOLE = {"mode": "whole"}  # these tests are about reading, writing and resuming: one row per image


# --------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------

def face_jpeg(i: int, size=(56, 56)) -> bytes:
    return encode_jpeg(draw_face(np.random.default_rng([7, i]), size)[0])


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def huge_png(w: int = 10_000, h: int = 10_000) -> bytes:
    """A PNG whose header says w x h (over the 40 MP limit); only the header is ever read."""
    data = bytearray(_png(Image.new("L", (8, 8))))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", w, h)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def odd_images() -> dict[str, bytes]:
    """Formats that must be labeled correctly (CMYK JPEG, 16-bit and palette PNG, no extension)."""
    face = draw_face(np.random.default_rng([7, 999]), (56, 56))[0]
    cmyk = io.BytesIO()
    face.convert("CMYK").save(cmyk, format="JPEG")
    grey16 = Image.fromarray(np.asarray(face.convert("L"), dtype=np.uint16) * 257)
    return {"odd/cmyk.jpg": cmyk.getvalue(), "odd/grey16.png": _png(grey16),
            "odd/palette.png": _png(face.convert("P", palette=Image.ADAPTIVE, colors=64)),
            "odd/IMG_0042": face_jpeg(4242)}  # no extension: an image by its content


BAD = {  # name -> expected error kind
    "bad/empty.jpg": "empty", "bad/text.jpg": "not_image", "bad/truncated.jpg": "truncated",
    "bad/huge.png": "too_large",
}


def bad_files() -> dict[str, bytes]:
    full = face_jpeg(5000, (120, 120))
    return {"bad/empty.jpg": b"", "bad/text.jpg": b"these are not the pixels you are looking for\n",
            "bad/truncated.jpg": full[: len(full) // 2], "bad/huge.png": huge_png()}


NOT_INPUTS = {"notes.txt": b"a text file next to the photos\n", "meta/info.json": b"{}",
              ".hidden.jpg": face_jpeg(1)}


def real_faces(n_utk: int = 3, n_celeba: int = 2) -> dict[str, bytes]:
    if not SHARED.is_dir():
        return {}
    utk = sorted((SHARED / "utkface").glob("*.jpg"))[:n_utk]
    celeba = sorted((SHARED / "celeba" / "img_align_celeba").glob("*.jpg"))[:n_celeba]
    return {f"real/{p.name}": p.read_bytes() for p in utk + celeba}


def put_all(client, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}{name}", Body=data)


def read_rows(output: str) -> pa.Table:
    fs, path = storage.filesystem(storage.join(output, LABELS_DIR))
    return pq.read_table(path, filesystem=fs)


def expected_rows(ckpt: str, items: dict[str, bytes]) -> dict[str, dict]:
    pred = Predictor(ckpt, device="cpu", precision="fp32", threads=2)
    rows = {}
    names = list(items)
    for i in range(0, len(names), 16):
        chunk = names[i:i + 16]
        for r in pred.predict_bytes([(n, items[n]) for n in chunk]):
            rows[r["path"]] = r
    return rows


def assert_row_matches(got: dict, want: dict, fields) -> None:
    for f in fields:
        a, b = got[f.name], want[f.name]
        if isinstance(b, float):
            assert a == pytest.approx(b, abs=1e-4), (got["path"], f.name)
        elif isinstance(b, list) and b and isinstance(b[0], float):
            assert np.allclose(a, b, atol=1e-4), (got["path"], f.name)
        else:
            assert a == b, (got["path"], f.name, a, b)


@pytest.fixture(scope="module")
def hs_checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ckpt") / "hard_sharing.pt")
    save_checkpoint(models.create_model("hard_sharing"), path)
    return path


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
    summary = L.label(spec, echo=lambda *_: None)
    return {"client": client, "bucket": bucket, "images": images, "bad": bad, "spec": spec, "summary": summary,
            "rows": read_rows(output), "ckpt": ckpt}


def test_s3_prefix_one_row_per_image_with_schema_and_errors(s3_run):
    rows, images, bad = s3_run["rows"], s3_run["images"], s3_run["bad"]
    prefix = f"s3://{s3_run['bucket']}/photos/"
    expected_paths = {prefix + n for n in list(images) + list(bad)}
    paths = rows.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == len(expected_paths)
    assert set(paths) == expected_paths  # not notes.txt, meta/info.json nor the hidden file
    assert rows.schema == Predictor(s3_run["ckpt"], device="cpu", precision="fp32").schema
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
    assert s["errors_by_kind"] == {"empty": 1, "not_image": 1, "too_large": 1, "truncated": 1}
    assert s["skipped_not_image"] == 2 and s["images_per_s"] > 0
    body = s3_run["client"].get_object(Bucket=s3_run["bucket"], Key="labels/run-1/_summary.json")["Body"].read()
    assert json.loads(body)["rows_total"] == len(expected_paths)


def test_s3_rows_equal_the_models_answer_for_the_same_bytes(s3_run):
    prefix = f"s3://{s3_run['bucket']}/photos/"
    items = {prefix + n: d for n, d in {**s3_run["images"], **s3_run["bad"]}.items()}
    want = expected_rows(s3_run["ckpt"], items)
    fields = Predictor(s3_run["ckpt"], device="cpu", precision="fp32").schema
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
    summary = L.label(s3_run["spec"], echo=lambda *_: None)
    after = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="labels/run-1/labels/")["Contents"])
    assert summary["rows_written"] == 0 and summary["rows_total"] == s3_run["rows"].num_rows
    assert after == before


# --------------------------------------------------------------------------------------------------------
# kill a run midway (SIGKILL of the driver process), run the same command again
# --------------------------------------------------------------------------------------------------------

def _committed(client, bucket: str, prefix: str) -> int:
    objs = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sum(1 for o in objs if o["Key"].endswith(".parquet") and not o["Key"].endswith(".pending.parquet"))


def test_killed_run_resumes_with_exactly_one_row_per_input(s3_bucket, ray_session, hs_checkpoint):
    client, bucket = s3_bucket
    n = 48
    files = {f"in/img_{i:03d}.jpg": face_jpeg(i, (40, 40)) for i in range(n)}
    put_all(client, bucket, "", files)
    manifest = pa.table({"path": [f"s3://{bucket}/{k}" for k in files], "note": ["x"] * n})
    buf = io.BytesIO()
    pq.write_table(manifest, buf)
    client.put_object(Bucket=bucket, Key="manifest.parquet", Body=buf.getvalue())
    ckpt = f"s3://{bucket}/hs.pt"
    storage.write_bytes(ckpt, Path(hs_checkpoint).read_bytes())
    output = f"s3://{bucket}/out/"
    argv = ["--checkpoint", ckpt, "--input", f"s3://{bucket}/manifest.parquet", "--output", output,
            "--batch-size", "4", "--max-rows-per-file", "4", "--max-actors", "1", "--precision", "fp32"]
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "jobs.label", *argv, "--faces", "whole", "--throttle", "0.4"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while _committed(client, bucket, "out/_checkpoint/") < 2:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint committed in 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    partial = read_rows(output).column("path").to_pylist()
    assert 0 < len(partial) < n, "the run was not interrupted midway"
    time.sleep(2)  # let Ray reap the killed job's workers
    summary = L.label(L.LabelSpec(checkpoint=ckpt, input=f"s3://{bucket}/manifest.parquet", output=output, faces=WHOLE,
                                  batch_size=8, max_rows_per_file=16, precision="fp32", max_actors=1),
                      echo=lambda *_: None)
    paths = read_rows(output).column("path").to_pylist()
    assert sorted(paths) == sorted(manifest.column("path").to_pylist())  # every input once, none twice
    assert summary["rows_before"] >= len(partial) and summary["rows_total"] == n and summary["complete"]
    rows = read_rows(output)
    assert all(rows.column("ok").to_pylist())


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
    for name, data in {**files, **NOT_INPUTS}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    output = str(tmp_path / "out")
    spec = L.LabelSpec(checkpoint=ckpt, input=str(folder), output=output, precision="fp32", batch_size=4, limit=3, faces=WHOLE,
                       max_actors=1)
    first = L.label(spec, echo=lambda *_: None)
    assert (first["rows_written"], first["complete"]) == (3, False)  # --limit: a trial run, finished below
    spec.limit = None
    summary = L.label(spec, echo=lambda *_: None)
    rows = read_rows(output)
    assert sorted(rows.column("path").to_pylist()) == sorted(str(folder / n) for n in files)
    want = expected_rows(ckpt, {str(folder / n): d for n, d in files.items()})
    for got in rows.to_pylist():
        assert got["ok"] and got["age"] is not None
        assert_row_matches(got, want[got["path"]], Predictor(ckpt, device="cpu", precision="fp32").schema)
    saved = json.loads((Path(output) / "_summary.json").read_text())
    assert saved["rows_total"] == len(files) and saved["files_listed"] == len(files) + 2  # + notes, info.json
    assert saved["skipped_not_image"] == 2 and saved["rows_before"] == 3 and summary == saved
    import pandas as pd

    assert len(pd.read_parquet(output)) == len(files)  # reading the output folder reads just the labels


def test_csv_manifest_relative_paths_and_missing_file(tmp_path, ray_session, hs_checkpoint):
    folder = tmp_path / "set"
    folder.mkdir()
    names = [f"a{i}.jpg" for i in range(7)]
    for i, n in enumerate(names):
        (folder / n).write_bytes(face_jpeg(100 + i))
    (folder / "list.csv").write_text("id,path\n" + "".join(f"{i},{n}\n" for i, n in enumerate(names + ["gone.jpg"])))
    spec = L.LabelSpec(checkpoint=hs_checkpoint, input=str(folder / "list.csv"), output=str(tmp_path / "out"), faces=WHOLE,
                       precision="fp32", batch_size=2, max_actors=1)
    second = L.label(spec, echo=lambda *_: None)
    rows = {r["path"]: r for r in read_rows(spec.output).to_pylist()}
    assert sorted(rows) == sorted(names + ["gone.jpg"]) and second["rows_total"] == 8 and second["complete"]
    assert (rows["gone.jpg"]["ok"], rows["gone.jpg"]["error_kind"]) == (False, "unreadable")
    assert rows["gone.jpg"]["error_message"] == "file not found"
    other = str(tmp_path / "other.pt")
    save_checkpoint(models.create_model("hard_sharing", hidden=8), other)
    with pytest.raises(L.LabelError, match="holds rows of checkpoint"):  # one output, one checkpoint
        L.label(dataclasses.replace(spec, checkpoint=other), echo=lambda *_: None)


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
    with pytest.raises(L.LabelError, match="no 'path' column"):
        inputs.check_manifest(str(bad))
    holes = tmp_path / "holes.parquet"
    pq.write_table(pa.table({"path": ["a.jpg", None, ""]}), holes)
    with pytest.raises(L.LabelError, match="2 of 3 rows have no path"):
        inputs.manifest_rows(str(holes))


def test_gpu_flags_against_a_cluster_without_gpus(ray_session, hs_checkpoint, tmp_path):
    spec = L.LabelSpec(hs_checkpoint, str(tmp_path), str(tmp_path / "o"), gpus_per_actor=1, gpu_decode=True,
                       faces=WHOLE)
    spec.validate()
    with pytest.raises(L.LabelError, match="has 0 GPUs"):  # a Ray this process started: nothing can add GPUs
        L.resolve_pool(spec, can_grow=False)
    warnings = []  # a cluster: the autoscaler may add GPU nodes, so the job waits for them
    assert L.resolve_pool(dataclasses.replace(spec, max_actors=4), can_grow=True, warn=warnings.append) == (1, 4)
    assert "waiting for the autoscaler" in warnings[0]
    with pytest.raises(RuntimeError, match="--gpu-decode needs CUDA"):
        L.PredictorActor(hs_checkpoint, device="cpu", gpu_decode=True, faces=WHOLE)
    with pytest.raises(L.LabelError, match="needs --faces whole"):  # with detection, photos decode on CPU tasks
        L.LabelSpec(hs_checkpoint, str(tmp_path), str(tmp_path / "o"), gpus_per_actor=1, gpu_decode=True).validate()


def test_image_signatures():
    assert inputs.looks_like_image(face_jpeg(1)[:32]) and inputs.looks_like_image(huge_png()[:32])
    assert inputs.looks_like_image(odd_images()["odd/palette.png"][:32])
    assert not inputs.looks_like_image(b"BM is also how a text can start") and not inputs.looks_like_image(b"")
    assert not inputs.looks_like_image(b'{"json": true}')


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


def test_manifest_duplicates_and_paths_outside_the_allowed_prefix(tmp_path, ray_session, hs_checkpoint):
    """Issue #13 items 7 and 9: one row per distinct file, duplicates counted; rows outside the manifest's
    folder (absolute, ``..``, /proc) are ``forbidden`` rows that read nothing, alike for files that exist."""
    folder = tmp_path / "set"
    folder.mkdir()
    for i, n in enumerate(["a.jpg", "b.jpg"]):
        (folder / n).write_bytes(face_jpeg(300 + i))
    (tmp_path / "private.jpg").write_bytes(face_jpeg(399))  # a real image next to the folder, not in it
    rows = ["a.jpg", "./a.jpg", str(folder / "a.jpg"), "b.jpg", "../private.jpg", "/proc/self/environ",
            str(tmp_path / "nothing-here.jpg")]
    (folder / "list.csv").write_text("path\n" + "\n".join(rows) + "\n")
    spec = L.LabelSpec(checkpoint=hs_checkpoint, input=str(folder / "list.csv"), output=str(tmp_path / "out"),
                       precision="fp32", batch_size=4, max_actors=1)
    summary = L.label(spec, echo=lambda *_: None)
    got = {r["path"]: r for r in read_rows(spec.output).to_pylist()}
    assert sorted(got) == sorted(["a.jpg", "b.jpg", "../private.jpg", "/proc/self/environ",
                                  str(tmp_path / "nothing-here.jpg")])
    assert (summary["inputs"], summary["duplicates"], summary["rows_total"]) == (5, 2, 5)
    assert got["a.jpg"]["ok"] and got["b.jpg"]["ok"]
    outside = [got[p] for p in ("../private.jpg", "/proc/self/environ", str(tmp_path / "nothing-here.jpg"))]
    assert {(r["ok"], r["error_kind"], r["error_message"], r["width"]) for r in outside} == {
        (False, "forbidden", "path is outside the allowed prefixes (--allow-prefix)", None)}


def test_a_replaced_checkpoint_never_mixes_two_models_rows(tmp_path, hs_checkpoint):
    """Issue 13 item 8: the run resolves --checkpoint to its hash once; an actor that loads other weights
    (the object was overwritten meanwhile) refuses to start, and a resumed run reads the provenance of every
    file of the output, not only the first row."""
    from raytasks.label.output import output_provenance

    with pytest.raises(RuntimeError, match="overwritten during the run"):
        L.PredictorActor(hs_checkpoint, precision="fp32", faces=WHOLE, checkpoint_hash="sha256:" + "0" * 64)
    labels = tmp_path / "labels"
    labels.mkdir()
    for i, (ck, det) in enumerate([("sha256:a", "whole"), ("sha256:a", "whole"), ("sha256:b", "whole")]):
        pq.write_table(pa.table({"path": [f"{i}.jpg"], "checkpoint": [ck], "detector": [det]}), labels / f"{i}.parquet")
    checkpoints, detectors = output_provenance(str(labels))
    assert checkpoints == {"sha256:a", "sha256:b"} and detectors == {"whole"}
