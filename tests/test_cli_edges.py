"""The train and evaluate command lines at their edges: values they must refuse with one ``error:`` line,
labels they must not score, faces and splits they must read as asked, and what they write. In-process
``main()`` on tiny synthetic data (facedata/synth.py), no Ray; each test a second or two."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import models
from facedata.synth import generate
from jobs import evaluate
from jobs import train as train_job
from models.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def agr(tmp_path_factory) -> str:
    """A small age_gender_race (UTKFace's five races) checkpoint, trained whole (no extra["faces"])."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "agr.pt")
    save_checkpoint(models.create_model("age_gender_race", depth=18, image_size=32, hidden=(8,)), path)
    return path


@pytest.fixture(scope="module")
def hs(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "hs.pt")
    save_checkpoint(models.create_model("hard_sharing"), path)
    return path


@pytest.fixture(scope="module")
def utk(tmp_path_factory) -> str:
    return f"utkface:{generate('utkface', 24, str(tmp_path_factory.mktemp('utk')), seed=1, size=(48, 48))}"


def _refused(capsys, main, argv, code=2) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code, argv
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err, err
    return err


# --- #2: class codes that mean other classes are not scored --------------------------------------------
def test_evaluate_does_not_score_race_coded_with_other_classes(agr, tmp_path, capsys):
    scut = f"scut_fbp5500:{generate('scut_fbp5500', 16, str(tmp_path / 'scut'), seed=3, size=(48, 48))}"
    base = ["--checkpoint", agr, "--data", scut, "--split", "all", "--faces", "whole"]
    metrics = evaluate.main(base)
    out = capsys.readouterr()
    assert "race.accuracy" not in metrics and "gender.accuracy" in metrics  # SCUT's 0 = Asian is not White
    assert "race: not scored (scut_fbp5500:" in out.err and "0=Asian, 1=Caucasian" in out.err
    err = _refused(capsys, evaluate.main, base + ["--by", "race"])
    assert "--by race" in err and "0=White" in err

    # the reverse: an hmtnet with SCUT's two races on UTKFace's five codes crashed (shape '[2, 2]')
    hm = str(tmp_path / "hmt2.pt")
    save_checkpoint(models.create_model("hmtnet", race_classes=2, image_size=96, anet_width=64), hm)
    utk = f"utkface:{generate('utkface', 8, str(tmp_path / 'utk'), seed=2, size=(48, 48))}"
    metrics = evaluate.main(["--checkpoint", hm, "--data", utk, "--split", "all", "--faces", "whole"])
    assert "race.accuracy" not in metrics and "gender.accuracy" in metrics
    assert "race: not scored (utkface:" in capsys.readouterr().err

    # a manifest's codes are the model's classes when they are among them; a code the head lacks is not scored
    paths = sorted(str(p) for p in (tmp_path / "utk").iterdir())
    pd.DataFrame({"path": paths, "gender": 0.0, "race": [0, 1, 2, 3, 4, 0, 1, 7][:len(paths)]}).to_csv(
        tmp_path / "m.csv", index=False)
    metrics = evaluate.main(["--checkpoint", agr, "--data", f"manifest:{tmp_path / 'm.csv'}", "--split", "all",
                             "--faces", "whole"])
    assert "race.accuracy" not in metrics and "has race 7" in capsys.readouterr().err


# --- #5: through detection, a row that names its face is judged on that face ---------------------------
def test_evaluate_through_detection_reads_the_face_each_row_names(hs, tmp_path, capsys):
    from core.evalinputs import NamedFaces
    from core.evaluation import run_model
    from faces.finder import FaceFinder
    from faces.trainfaces import ALIGN_POINTS
    from models.checkpoint import load_checkpoint
    from tests.images import face_photo

    two, faces = face_photo([40, 41], size=(420, 240), seed=40)
    (tmp_path / "two.jpg").write_bytes(two)
    rows = [("two.jpg", 0.0, faces[0]["box"]), ("two.jpg", 1.0, faces[1]["box"]),
            ("two.jpg", 1.0, [5, 5, 40, 40])]  # the last names no face of the photo
    pd.DataFrame({"path": [r[0] for r in rows], "gender": [r[1] for r in rows],
                  "face_box": [json.dumps(r[2]) for r in rows]}).to_csv(tmp_path / "m.csv", index=False)
    metrics = evaluate.main(["--checkpoint", hs, "--data", f"manifest:{tmp_path / 'm.csv'}", "--split", "all",
                             "--faces", "detect"])
    assert metrics["n_images"] == 2 and metrics["images_without_face"] == 1  # the unmatched row is not scored
    assert "unmatched 1" in capsys.readouterr().err

    # each of the two rows read its own face, as training finds it (the points inside that row's box)
    from facedata.datasets import read_dataset

    table = read_dataset(f"manifest:{tmp_path / 'm.csv'}").table
    finder = FaceFinder()
    resolved, report = NamedFaces(finder).resolve(table)
    assert len(resolved) == 2 and report.kinds() == {"unmatched": 1}
    for k in (0, 1):
        x1, y1, x2, y2 = faces[k]["box"]
        pts = np.asarray(resolved[ALIGN_POINTS][k]).reshape(5, 2)
        assert ((pts[:, 0] > x1) & (pts[:, 0] < x2) & (pts[:, 1] > y1) & (pts[:, 1] < y2)).all()
    model, _ = load_checkpoint(hs)
    ev = run_model(model, resolved, 8, max_side=finder.options.max_side)
    assert list(ev.rows) == [0, 1] and not torch.equal(ev.raw["gender"][0], ev.raw["gender"][1])


# --- #8: --patience below 0 ---------------------------------------------------------------------------
def test_patience_below_zero_is_refused_and_zero_is_off(capsys):
    base = ["--model", "hard_sharing", "--data", "celeba:/d"]
    for flag in ("--patience", "--validate-every"):
        err = _refused(capsys, train_job.build_parser().parse_args, base + [flag, "-1"])
        assert flag in err and "must be >= 0" in err
    spec = train_job.spec_from_args(train_job.build_parser().parse_args(base + ["--patience", "0"]))
    assert spec.recipe["early_stopping_patience"] is None  # off
    spec = train_job.spec_from_args(train_job.build_parser().parse_args(base + ["--patience", "3"]))
    assert spec.recipe["early_stopping_patience"] == 3


def test_a_recipe_stage_with_negative_patience_is_a_problem_of_the_table(monkeypatch):
    from models.recipes import RECIPES, Stage, TrainingRecipe, check_table

    bad = TrainingRecipe("x-celeba", 1, "hard_sharing", ("nothing",), (Stage("one", patience=-1),), "test")
    monkeypatch.setitem(RECIPES, bad.name, bad)
    assert check_table() == ["x-celeba/one: patience must be None or an integer >= 0 (0: off), got -1"]


# --- #9: detection flags with --faces whole ------------------------------------------------------------
def test_evaluate_refuses_detection_flags_when_faces_are_read_whole(agr, utk, capsys):
    base = ["--checkpoint", agr, "--data", utk, "--split", "all"]  # trained whole: --faces defaults to whole
    for extra, named in ((["--face-pick", "largest"], "--face-pick"), (["--det-size", "256"], "--det-*"),
                         (["--min-face", "40"], "--min-face"), (["--max-side", "512"], "--max-side"),
                         (["--faces", "whole", "--face-pick", "score"], "--face-pick")):
        err = _refused(capsys, evaluate.main, base + extra)
        assert named in err and "--faces detect" in err, extra


# --- #10: the data format as the reader reads it ------------------------------------------------------
@pytest.mark.parametrize("data", ["UTKFace:/x", " utkface:/x", "UTKFACE :/x"])
def test_recipe_and_run_name_use_the_format_as_read(data):
    args = train_job.build_parser().parse_args(["--model", "age_gender_race", "--data", data])
    assert train_job.data_format(args) == "utkface"
    recipe = train_job.choose_recipe(args)
    assert recipe is not None and recipe.name == "age_gender_race-utkface"
    assert train_job.spec_from_args(args).name == "age_gender_race-utkface"


# --- #11: bad values are usage errors, before any work -------------------------------------------------
def test_evaluate_bad_values_are_one_error_line(agr, utk, tmp_path, capsys):
    base = ["--checkpoint", agr, "--faces", "whole"]
    cases = [
        (["--data", utk, "--split", "bogus"], "--split"),
        (["--data", utk, "--calibrate-on", "tst"], "--calibrate-on"),
        (["--data", utk, "--batch-size", "0"], "--batch-size"),
        (["--data", utk, "--batch-size", "-1"], "--batch-size"),
        (["--data", utk, "--bootstrap", "-1"], "--bootstrap"),
        (["--data", utk.replace("utkface:", "utk:")], "not FORMAT:URI"),
        (["--data", f"utkface:{tmp_path / 'missing'}"], "does not exist"),
        (["--data", f"manifest:{tmp_path}"], str(tmp_path)),  # a folder given as a manifest file
    ]
    for argv, message in cases:
        assert message in _refused(capsys, evaluate.main, base + argv), argv


# --- #12: any failure of a data set's read is one error line -------------------------------------------
@pytest.mark.parametrize("error", [TypeError("float() argument must be a string or a real number, not 'NoneType'"),
                                   OSError("Cannot open for reading: path is a directory"),
                                   __import__("csv").Error("field larger than field limit (131072)")])
def test_a_reader_failure_is_an_error_line_in_train_and_evaluate(error, agr, tmp_path, capsys, monkeypatch):
    import facedata.datasets as datasets

    def broken(uri, splitter):
        raise error

    monkeypatch.setitem(datasets._READERS, "manifest", broken)
    data = f"manifest:{tmp_path / 'labels.csv'}"
    err = _refused(capsys, train_job.main, ["--model", "hard_sharing", "--data", data, "--storage",
                                            str(tmp_path / "runs"), "--recipe", "none", "--faces", "whole"], code=1)
    assert f"{data}: cannot read the data set ({type(error).__name__}: {error})" in err
    err = _refused(capsys, evaluate.main, ["--checkpoint", agr, "--data", data, "--faces", "whole"])
    assert type(error).__name__ in err


def test_train_data_that_is_not_what_its_format_expects_is_an_error_line(tmp_path, capsys):
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for model, data in (("hard_sharing", f"manifest:{tmp_path / 'folder.csv'}"),
                        ("age_gender_race", f"utkface:{tmp_path / 'file.txt'}")):
        err = _refused(capsys, train_job.main, ["--model", model, "--data", data, "--storage", str(tmp_path / "runs"),
                                                "--recipe", "none", "--faces", "whole"], code=1)
        assert str(tmp_path) in err, data


# --- #14: calibrating and evaluating on the same rows --------------------------------------------------
def test_calibration_on_the_split_the_evaluation_falls_back_to_is_refused(hs, tmp_path, capsys):
    generate("utkface", 48, str(tmp_path / "utk"), seed=4, size=(32, 32))
    paths = sorted(str(p) for p in (tmp_path / "utk").iterdir())
    rng = np.random.default_rng(0)
    pd.DataFrame({"path": paths, "gender": rng.integers(0, 2, len(paths)).astype(float),
                  "split": ["train", "val"] * (len(paths) // 2)}).to_csv(tmp_path / "m.csv", index=False)
    base = ["--checkpoint", hs, "--data", f"manifest:{tmp_path / 'm.csv'}", "--faces", "whole"]
    err = _refused(capsys, evaluate.main, base + ["--calibrate-on", "val"])  # --split test falls back to val
    assert "no test rows" in err and "in-sample" in err and "--split val" in err

    evaluate.main(base + ["--split", "val", "--calibrate-on", "val"])  # asked for: said loudly, not refused
    out = capsys.readouterr()
    assert "calibrated figures are in-sample" in out.err and "split val " in out.out
    evaluate.main(base)  # the header says the split read, not the one asked for
    assert "split val (no test rows)" in capsys.readouterr().out


# --- #18: --json is strict JSON --------------------------------------------------------------------------
def test_evaluate_json_writes_null_for_a_figure_that_is_not_a_number(agr, utk, tmp_path, capsys):
    out = tmp_path / "m.json"
    metrics = evaluate.main(["--checkpoint", agr, "--data", utk, "--split", "all", "--faces", "whole",
                             "--limit", "1", "--json", str(out)])
    assert math.isnan(metrics["age.pearson"])  # one row: no correlation

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    doc = json.loads(out.read_text(), parse_constant=refuse)
    assert doc["age.pearson"] is None and doc["n_images"] == 1


# --- #19: the jitter's error names the jitter ------------------------------------------------------------
def test_align_jitter_out_of_range_names_its_flag():
    from core.augment import Augment

    for augment in ({"align_jitter": -1}, {"align_jitter": 20}, {"align_jitter": 1, "rotation": 44}):
        with pytest.raises(ValueError, match=r"align_jitter \(--align-jitter K") as exc:
            Augment.from_recipe(augment)
        assert "rotation must be" not in str(exc.value)
    with pytest.raises(ValueError, match="color_jitter"):
        Augment.from_recipe({"color_jitter": 2})
    with pytest.raises(ValueError, match="augment rotation must be between 0 and 45, got 50"):
        Augment.from_recipe({"rotation": 50, "align_jitter": 1})  # the user's own value, as given
    a = Augment.from_recipe({"align_jitter": 1, "color_jitter": 0.2})
    assert (a.rotation, a.shift, a.scale, a.brightness, a.hue) == pytest.approx((3.0, 0.03, 0.07, 0.2, 0.05))


# --- #20: --help says each format's --faces default as the code has it ----------------------------------
def test_train_help_states_the_faces_default_of_every_format():
    from faces.trainfaces import FORMAT_FACES

    text = " ".join(train_job.build_parser().format_help().split())
    said = text[text.index("else the format's"):]
    said = said[:said.index("(docs/faces.md")]
    detect, whole = said.split("whole for")
    for fmt, mode in FORMAT_FACES.items():
        name = "a mix" if fmt == "mixed" else fmt
        assert name in (detect if mode == "detect" else whole), (fmt, mode, said)
        assert name not in (whole if mode == "detect" else detect), (fmt, mode, said)
