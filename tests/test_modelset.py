"""Several models in one pass (core/modelset.py): one read, decode and detection per photo, one row per
face with every model's columns, equal to one job per model; resumable; an output of one set refuses
another; a face embedding per face that finds the same person."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import models
from core.modelset import ModelSet, ModelSetError, SetPredictor, decode_for_set, read_set_file
from core.predictor import Predictor, decode_batch
from facedata.synth import draw_face
from faces.finder import FaceFinder, decode_photos
from models.checkpoint import save_checkpoint
from models.embedding import SAME_PERSON_DISTANCE, distance
from tests.test_faces_e2e import PLACES, compose, photos, real_crops

ROOT = Path(__file__).resolve().parents[1]
KEY = ["path", "face"]


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> dict[str, str]:
    """Three checkpoints of different architectures, inputs and face templates."""
    d = tmp_path_factory.mktemp("set")
    torch.manual_seed(0)
    out = {}
    for name, kw in (("hard_sharing", {}), ("dmm_cnn", {"depth": 18, "image_size": 64}), ("age_gender_race", {})):
        out[name] = str(d / f"{name}.pt")
        save_checkpoint(models.create_model(name, **kw), out[name])
    return out


@pytest.fixture(scope="module")
def finder() -> FaceFinder:
    return FaceFinder()


# --- naming a set --------------------------------------------------------------------------------------
def test_set_from_flags_and_from_a_file(tmp_path, three):
    s = ModelSet.parse([f"agr={three['age_gender_race']}", three["hard_sharing"]], embedding=True)
    assert s.members == (("agr", three["age_gender_race"]), (None, three["hard_sharing"])) and s.is_set
    assert not ModelSet.parse(three["hard_sharing"]).is_set  # one checkpoint alone: today's flat rows
    assert ModelSet.parse("s3://b/k=v/m.pt").members == ((None, "s3://b/k=v/m.pt"),)  # '=' inside a URI
    (tmp_path / "m").mkdir()
    for n, p in three.items():
        (tmp_path / "m" / f"{n}.pt").write_bytes(Path(p).read_bytes())
    f = tmp_path / "m" / "faces.yaml"
    f.write_text("format: 1\nname: faces\nversion: 2026-11-29\nembedding: true\n"
                 "models:\n  agr: age_gender_race.pt\n  celeba: dmm_cnn.pt\n")
    s = read_set_file(str(f))
    assert (s.name, s.version, s.embedding, s.from_file) == ("faces", "2026-11-29", True, True)
    assert s.members == (("agr", str(tmp_path / "m" / "age_gender_race.pt")), ("celeba", str(tmp_path / "m" / "dmm_cnn.pt")))
    j = tmp_path / "m" / "list.json"
    j.write_text(json.dumps({"models": ["hard_sharing.pt"]}))
    assert read_set_file(str(j)).members == ((None, str(tmp_path / "m" / "hard_sharing.pt")),)


@pytest.mark.parametrize("text, message", [
    ("models: {Agr: a.pt}", "must match"),  # Athena/Glue column names are lower case
    ("models: {path: a.pt}", "column of every row"),
    ("models: {a: a.pt}\nextra: 1", "unknown keys"),
    ("format: 2\nmodels: {a: a.pt}", "format 2"),
    ("models: {a: 3}", "non-empty string"),
    ("models: 5", "must map names"),
    ("[1, 2]", "a mapping"),
    ("models: {a: a.pt}\nembedding: maybe", "true or false"),
    ("models: {a: [", "not YAML"),
])
def test_bad_set_files_are_refused_clearly(tmp_path, text, message):
    f = tmp_path / "set.yaml"
    f.write_text(text)
    with pytest.raises(ModelSetError, match=message):
        read_set_file(str(f))


def test_oversized_set_file_and_name_clash(tmp_path, three):
    f = tmp_path / "big.yaml"
    f.write_text("models: {a: a.pt}\n" + "#" * 70_000)
    with pytest.raises(ModelSetError, match="at most"):
        read_set_file(str(f))
    with pytest.raises(ModelSetError, match="two models would be column 'hard_sharing'"):
        SetPredictor(ModelSet.parse([three["hard_sharing"], three["hard_sharing"]]), device="cpu")
    with pytest.raises(ModelSetError, match="either --checkpoint"):
        ModelSet.parse([three["hard_sharing"]], set_file=str(f))


# --- one pass, every model ------------------------------------------------------------------------------
def test_set_rows_equal_each_models_own_rows_photos_and_whole(three, finder):
    """Detection: one row per face, each model's struct equal to that model alone on the same photos; the
    embedding column filled on faces only. Whole images: the same, one row per image."""
    items = photos()
    names, datas = list(items), list(items.values())
    sp = SetPredictor(ModelSet.parse(list(three.values()), embedding=True), device="cpu", precision="fp32", threads=2)
    assert sp.schema.names[-2:] == ["embedding", "embedding_model"]
    assert [sp.schema.field(n).type.field(0).name for n in three] == ["model"] * 3
    batch = decode_photos(names, datas, 2048)
    cols = sp.predict_photos(batch, finder)
    table = sp.to_table(cols)  # the schema holds
    assert table.num_rows == sum(max(1, len(p)) for p in PLACES.values()) + 1
    for name, uri in three.items():
        single = Predictor(uri, device="cpu", precision="fp32", threads=2)
        own = single.predict_photos(batch, finder)
        assert own["path"] == cols["path"] and own["face"] == cols["face"] and own["face_box"] == cols["face_box"]
        assert all(s["checkpoint"] == single.checkpoint_hash and s["model"] == name for s in cols[name])
        for f in single.output_fields:
            assert [s[f.name] for s in cols[name]] == own[f.name], (name, f.name)
    faces = [f is not None for f in cols["face"]]
    assert [e is not None for e in cols["embedding"]] == faces
    assert all(len(e) == 128 for e in cols["embedding"] if e is not None)

    whole = decode_for_set(names, datas, sp.preprocessings())
    wcols = sp.predict_decoded(whole)
    assert len(wcols["path"]) == len(names) and wcols["ok"] == [True, True, True, False]
    for name, uri in three.items():
        single = Predictor(uri, device="cpu", precision="fp32", threads=2)
        own = single.predict_decoded(decode_batch(names, datas, single.preprocessing))
        for f in single.output_fields:
            got = [s[f.name] for s in wcols[name]]
            assert got == own[f.name], (name, f.name)
    assert wcols["embedding"][3] is None and len(wcols["embedding"][0]) == 128


def _copy(tmp: Path, src: str, name: str) -> str:
    dst = tmp / name
    dst.write_bytes(Path(src).read_bytes())
    return str(dst)


@pytest.mark.ray
def test_set_job_survives_a_kill_equals_three_single_jobs_and_refuses_another_set(tmp_path, three, ray_session):
    """One label job with three checkpoints and the embedding, killed after its first commit and run again:
    every face once, and each model's columns equal to that model's own label job on the same photos. Then
    an output of this set refuses a set with a changed checkpoint, without the embedding, or of another
    version."""
    from jobs.label import main
    from raytasks import label as L

    items = photos()
    many = {f"{i:02d}_{name}": data for i in range(4) for name, data in items.items()}
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in many.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "set_out"
    members = [f"{n}={p}" for n, p in three.items()]
    argv = [a for m in members for a in ("--checkpoint", m)] + [
        "--embedding", "--input", str(folder), "--output", str(out), "--batch-size", "2", "--max-rows-per-file", "4",
        "--precision", "fp32", "--max-actors", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.label", *argv, "--throttle", "1.0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list((out / "_checkpoint").glob("*.parquet")):
            time.sleep(0.2)
        assert list((out / "_checkpoint").glob("*.parquet")), "no commit before the deadline"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    n_rows = (sum(max(1, len(p)) for p in PLACES.values()) + 1) * 4
    partial = pq.read_table(out / "labels") if (out / "labels").exists() else None
    assert partial is not None and 0 < partial.num_rows < n_rows, "not killed midway"
    time.sleep(2)

    summary = main(argv)
    assert summary["complete"] and summary["images_total"] == len(many) and summary["rows_total"] == n_rows
    assert [m["name"] for m in summary["models"]] == [*three, "embedding"]
    assert summary["checkpoint_hash"].startswith("set-sha256:")
    table = pq.read_table(out / "labels")
    assert set(pc_unique(table, "checkpoint")) == {summary["checkpoint_hash"]}
    got = table.to_pandas().sort_values(KEY, na_position="first").reset_index(drop=True)
    assert not got.duplicated(KEY).any() and len(got) == n_rows

    for name, uri in three.items():  # the same photos, one job per model
        single_out = tmp_path / f"single_{name}"
        s = L.label(L.LabelSpec(checkpoint=uri, input=str(folder), output=str(single_out), batch_size=2,
                                precision="fp32", max_actors=1), echo=lambda *_: None)
        assert s["rows_total"] == n_rows
        own = pd.read_parquet(single_out / "labels").sort_values(KEY, na_position="first").reset_index(drop=True)
        assert own["path"].tolist() == got["path"].tolist()
        assert own["face"].fillna(-1).tolist() == got["face"].fillna(-1).tolist()
        fields = [c for c in own.columns if c not in got.columns]
        assert fields, name
        structs = pd.DataFrame([s if s is not None else {} for s in got[name]])
        assert (structs["checkpoint"] == s["checkpoint_hash"]).all()
        for f in fields:
            a, b = own[f].tolist(), structs[f].tolist()
            assert [_plain(v) for v in a] == [_plain(v) for v in b], (name, f)
    emb = got["embedding"]
    assert emb.notna().tolist() == got["face"].notna().tolist()

    again = main(argv)  # finished: nothing more
    assert again["rows_written"] == 0

    other = _copy(tmp_path, three["hard_sharing"], "hs2.pt")
    torch.manual_seed(1)
    save_checkpoint(models.create_model("hard_sharing"), other)
    changed = [a if not a.startswith("hard_sharing=") else f"hard_sharing={other}" for a in argv]
    for bad in (changed, [a for a in argv if a != "--embedding"]):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2
    set_file = tmp_path / "set.yaml"
    set_file.write_text("name: set\nversion: '2'\nembedding: true\nmodels:\n"
                        + "".join(f"  {n}: {p}\n" for n, p in three.items()))
    with pytest.raises(L.LabelError, match="holds rows of checkpoint"):
        L.label(L.LabelSpec(checkpoint="", model_set=str(set_file), input=str(folder), output=str(out),
                            batch_size=2, precision="fp32", max_actors=1))


def pc_unique(table, column: str) -> list:
    import pyarrow.compute as pc

    return pc.unique(table.column(column)).to_pylist()


def _plain(v):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return round(float(v), 5)
    if isinstance(v, np.integer):
        return int(v)
    return v


# --- the embedding --------------------------------------------------------------------------------------
def _embeddings(finder: FaceFinder, sp: SetPredictor, photos_: dict[str, bytes]) -> dict[str, list]:
    cols = sp.predict_photos(decode_photos(list(photos_), list(photos_.values()), 2048), finder)
    out: dict[str, list] = {}
    for p, f, e in zip(cols["path"], cols["face"], cols["embedding"]):
        if f is not None:
            out.setdefault(p, []).append(e)
    return out


def _same_and_other(crops: list[Image.Image]) -> dict[str, bytes]:
    """Face A alone in two photos (other size, place and background), face B and face C alone in a third
    and fourth."""
    a, b, c = crops[:3]
    return {"a1": compose([a], [(100, 120, 200)], size=(700, 500), seed=1),
            "a2": compose([a], [(380, 60, 280)], size=(800, 600), seed=2),
            "b": compose([b], [(250, 100, 240)], size=(700, 500), seed=3),
            "c": compose([c], [(200, 80, 220)], size=(700, 500), seed=4)}


def test_embedding_puts_two_photos_of_one_face_closer_than_two_faces(finder):
    sp = SetPredictor(ModelSet((), embedding=True), device="cpu", threads=2)
    crops = [draw_face(np.random.default_rng([5, i]), (178, 218))[0] for i in range(3)]
    e = _embeddings(finder, sp, _same_and_other(crops))
    assert all(len(v) == 1 for v in e.values()), {k: len(v) for k, v in e.items()}
    same = distance(e["a1"][0], e["a2"][0])
    assert same < distance(e["a1"][0], e["b"][0]) and same < distance(e["a1"][0], e["c"][0]), same


def test_embedding_on_real_faces_from_shared_data(finder, shared_data):
    """Real UTKFace faces: the same face in two photos is the same person by dlib's rule (< 0.6) and less
    than half as far apart as two different faces (measured: 0.14 against 0.63-0.72)."""
    sp = SetPredictor(ModelSet((), embedding=True), device="cpu", threads=2)
    crops = real_crops(3)
    e = _embeddings(finder, sp, _same_and_other(crops))
    assert all(len(v) == 1 for v in e.values()), {k: len(v) for k, v in e.items()}
    same = distance(e["a1"][0], e["a2"][0])
    others = [distance(e["a1"][0], e[k][0]) for k in ("b", "c")] + [distance(e["b"][0], e["c"][0])]
    assert same < SAME_PERSON_DISTANCE and same < 0.5 * min(others), (same, others)


def test_the_shipped_example_set_file_reads():
    s = read_set_file(str(ROOT / "jobs" / "model_set.yaml"))
    assert (s.name, s.version, s.embedding) == ("faces", "2026-11-29", True)
    assert [n for n, _ in s.members] == ["agr", "celeba", "smile", "beauty"]
    assert all(uri.startswith("s3://models/") for _, uri in s.members)
