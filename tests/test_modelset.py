"""Several models in one pass (core/modelset.py, core/annotator.py): one read, decode and detection per
photo, one row per face with every model's columns, each equal to that model alone; the set's label job
equal to the core, resumable after a kill; an output of one set refuses another; a face embedding per face
that finds the same person."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.annotator import Annotator
from core.modelset import ModelSet, ModelSetError, read_set_file
from facedata.decode import Photos, Whole, decode_batch
from facedata.draw import draw_face
from models.embedding import SAME_PERSON_DISTANCE, distance
from raytasks.label.output import COMMIT_LOG_DIR
from tests.helpers import (
    assert_same,
    committed_rows,
    kill_after_commits,
    put_all,
    read_rows,
    s3_commits,
    save_model,
)
from tests.images import ROWS_PER_PHOTOS, compose, many_photos, photos, real_crops

ROOT = Path(__file__).resolve().parents[1]


CPU = dict(device="cpu", precision="fp32", threads=2)


@pytest.fixture(scope="module")
def set_annotator(three) -> Annotator:
    """The three checkpoints (conftest's ``three``) and the embedding as one set, as the label job builds it
    from ``--checkpoint NAME=URI ... --embedding``."""
    return Annotator(ModelSet.parse([f"{n}={p}" for n, p in three.items()], embedding=True), **CPU)


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
    ("version: ''\nmodels: {a: a.pt}", "string of 1-64 characters"),  # #18: one rule with the serve config
    ("version: true\nmodels: {a: a.pt}", "string of 1-64 characters"),
    ("name: has space\nmodels: {a: a.pt}", "must match"),
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
        Annotator(ModelSet.parse([three["hard_sharing"], three["hard_sharing"]]), device="cpu")
    with pytest.raises(ModelSetError, match="either --checkpoint"):
        ModelSet.parse([three["hard_sharing"]], set_file=str(f))


# --- one pass, every model ------------------------------------------------------------------------------
@pytest.mark.slow  # over ~5 s of CPU: in the full suite, not the quick tier
def test_set_rows_equal_each_models_own_rows_photos_and_whole(three, set_annotator):
    """Detection: one row per face, each model's struct equal to that model alone on the same photos; the
    embedding column filled on faces only. Whole images: the same, one row per image."""
    items = photos()
    names, datas = list(items), list(items.values())
    sp = set_annotator
    assert sp.schema.names[-2:] == ["embedding", "embedding_model"]
    assert [sp.schema.field(n).type.field(0).name for n in three] == ["model"] * 3
    batch = decode_batch(names, datas, Photos(2048))
    cols = sp.annotate(batch)
    table = sp.to_table(cols)  # the schema holds
    assert table.num_rows == ROWS_PER_PHOTOS
    singles = {name: Annotator(uri, **CPU) for name, uri in three.items()}
    for name, single in singles.items():
        assert single.flat and list(single.members) == [name]
        own = single.annotate(batch)
        assert own["path"] == cols["path"] and own["face"] == cols["face"] and own["face_box"] == cols["face_box"]
        assert all(s["checkpoint"] == single.identity and s["model"] == name for s in cols[name])
        for f in single.members[name].output_fields:
            assert [s[f.name] for s in cols[name]] == own[f.name], (name, f.name)
    faces = [f is not None for f in cols["face"]]
    assert [e is not None for e in cols["embedding"]] == faces
    assert all(len(e) == 128 for e in cols["embedding"] if e is not None)

    whole = decode_batch(names, datas, Whole(tuple(sp.preprocessings)))
    wcols = sp.annotate(whole)
    assert len(wcols["path"]) == len(names) and wcols["ok"] == [True, True, True, False]
    for name, single in singles.items():
        own = single.annotate(decode_batch(names, datas, Whole(tuple(single.preprocessings))))
        for f in single.members[name].output_fields:
            got = [s[f.name] for s in wcols[name]]
            assert got == own[f.name], (name, f.name)
    assert wcols["embedding"][3] is None and len(wcols["embedding"][0]) == 128


@pytest.mark.timeout(900)
def test_set_job_on_s3_survives_a_kill_equals_the_core_and_refuses_another_set(tmp_path, three, set_annotator,
                                                                             s3_bucket, ray_session):
    """The label job's kill test, on the S3 server: one job with three checkpoints and the embedding, its input
    a Parquet manifest on S3 (with a column of the user's own), its output on S3; the driver (a process of its
    own) SIGKILLed after its first committed file, then the same command again: every face of every input once,
    none twice, and every row (each model's struct, the embedding) equal to the set's annotator on the same
    photos (which equals each model alone: the test above; and a model's job equals its annotator:
    tests/test_label.py). Then an output of this set refuses a set with a changed checkpoint, without the
    embedding, or of another version."""
    import pyarrow as pa

    from jobs.label import main
    from raytasks import label as L

    client, bucket = s3_bucket
    many = many_photos()  # to S3 only
    paths = {name: f"s3://{bucket}/in/{name}" for name in many}
    put_all(client, bucket, "in/", many)
    manifest = pa.table({"path": list(paths.values()), "note": ["x"] * len(paths)})
    buf = io.BytesIO()
    pq.write_table(manifest, buf)
    client.put_object(Bucket=bucket, Key="manifest.parquet", Body=buf.getvalue())
    out = f"s3://{bucket}/set_out"
    members = [f"{n}={p}" for n, p in three.items()]
    argv = [a for m in members for a in ("--checkpoint", m)] + [
        "--embedding", "--input", f"s3://{bucket}/manifest.parquet", "--output", out, "--batch-size", "2",
        "--max-rows-per-file", "4", "--precision", "fp32", "--max-actors", "1"]
    kill_after_commits(argv, ray_session, s3_commits(client, bucket, f"set_out/{COMMIT_LOG_DIR}/"))
    n_rows = ROWS_PER_PHOTOS * 4
    committed = committed_rows(out)  # a write may be cut between its file and its commit
    assert 0 < committed < n_rows, "not killed midway"

    summary = main(argv)
    assert summary["complete"] and summary["images_total"] == len(many) and summary["rows_total"] == n_rows
    assert summary["rows_before"] == committed  # an uncommitted file's rows are labeled again, not kept twice
    assert [m["name"] for m in summary["models"]] == [*three, "embedding"]
    assert summary["checkpoint_hash"].startswith("set-sha256:") and summary["checkpoint_hash"] == set_annotator.identity
    table = read_rows(out)
    assert table.schema == set_annotator.schema
    assert set(pc_unique(table, "checkpoint")) == {summary["checkpoint_hash"]}
    got = table.to_pylist()
    keys = [(r["path"], r["face"]) for r in got]
    assert len(set(keys)) == len(keys) == n_rows  # every face once, nothing twice
    assert {p for p, _ in keys} == set(paths.values())  # and every input

    want = {(r["path"], r["face"]): r for r in
            set_annotator.annotate_bytes([(paths[n], d) for n, d in many.items()], faces="detect")}
    assert set(want) == set(keys)
    for row in got:  # the whole row: per-image and per-face columns, each model's struct, the embedding
        expected = want[(row["path"], row["face"])]
        assert_same(row, expected, f"{row['path']}#{row['face']}")  # floats to 1e-4: job and core batch differently
        for name in three:
            assert row[name]["checkpoint"] == set_annotator.members[name].checkpoint_hash
        assert (row["embedding"] is not None) == (row["face"] is not None)

    again = main(argv)  # finished: nothing more
    assert again["rows_written"] == 0

    other = save_model(str(tmp_path / "hs2.pt"), "hard_sharing", seed=1)
    changed = [a if not a.startswith("hard_sharing=") else f"hard_sharing={other}" for a in argv]
    for bad in (changed, [a for a in argv if a != "--embedding"]):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2
    set_file = tmp_path / "set.yaml"
    set_file.write_text("name: set\nversion: '2'\nembedding: true\nmodels:\n"
                        + "".join(f"  {n}: {p}\n" for n, p in three.items()))
    with pytest.raises(L.LabelError, match="holds rows of checkpoint"):
        L.label(L.LabelSpec(checkpoint="", model_set=str(set_file), input=f"s3://{bucket}/manifest.parquet",
                            output=out, batch_size=2, precision="fp32", max_actors=1))


def pc_unique(table, column: str) -> list:
    import pyarrow.compute as pc

    return pc.unique(table.column(column)).to_pylist()


# --- the embedding --------------------------------------------------------------------------------------
def _embeddings(sp: Annotator, photos_: dict[str, bytes]) -> dict[str, list]:
    cols = sp.annotate(decode_batch(list(photos_), list(photos_.values()), Photos(2048)))
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


@pytest.fixture(scope="module")
def embedder() -> Annotator:
    """A set of no model but the embedding."""
    return Annotator(ModelSet((), embedding=True), device="cpu", threads=2)


def test_embedding_puts_two_photos_of_one_face_closer_than_two_faces(embedder):
    sp = embedder
    crops = [draw_face(np.random.default_rng([5, i]), (178, 218))[0] for i in range(3)]
    e = _embeddings(sp, _same_and_other(crops))
    assert all(len(v) == 1 for v in e.values()), {k: len(v) for k, v in e.items()}
    same = distance(e["a1"][0], e["a2"][0])
    assert same < distance(e["a1"][0], e["b"][0]) and same < distance(e["a1"][0], e["c"][0]), same


def test_embedding_on_real_faces_from_shared_data(embedder, shared_data):
    """Real UTKFace faces: the same face in two photos is the same person by dlib's rule (< 0.6) and less
    than half as far apart as two different faces (measured: 0.14 against 0.63-0.72)."""
    sp = embedder
    crops = real_crops(3)
    e = _embeddings(sp, _same_and_other(crops))
    assert all(len(v) == 1 for v in e.values()), {k: len(v) for k, v in e.items()}
    same = distance(e["a1"][0], e["a2"][0])
    others = [distance(e["a1"][0], e[k][0]) for k in ("b", "c")] + [distance(e["b"][0], e["c"][0])]
    assert same < SAME_PERSON_DISTANCE and same < 0.5 * min(others), (same, others)


def test_the_shipped_example_set_file_reads():
    s = read_set_file(str(ROOT / "jobs" / "model_set.yaml"))
    assert (s.name, s.version, s.embedding) == ("faces", "2026-11-29", True)
    assert [n for n, _ in s.members] == ["agr", "celeba", "smile", "beauty"]
    assert all(uri.startswith("s3://models/") for _, uri in s.members)
