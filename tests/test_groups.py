"""Accuracy per group (jobs.evaluate --by): counts, confidence intervals, largest gaps, the JSON report and
the reliability diagram; a bad key is a clear error. No Ray; a few seconds."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import models
from core.engine import evaluate_table
from core.evaluation import GroupError, age_group, bootstrap_interval, group_report, group_values, wilson
from jobs import evaluate
from models.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def agr():
    torch.manual_seed(0)
    return models.create_model("age_gender_race", depth=18, image_size=32, hidden=(8,))


def synthetic(n_male=40, n_female=60, right_male=30, right_female=30):
    """A UTKFace-like table and raw outputs whose gender is right for exactly ``right_*`` rows of each
    group (so accuracies 0.75 and 0.5 by default), race always right, age off by 2 or 6 years."""
    n = n_male + n_female
    gender = np.array([0] * n_male + [1] * n_female, dtype=float)
    right = np.array([True] * right_male + [False] * (n_male - right_male)
                     + [True] * right_female + [False] * (n_female - right_female))
    race = np.arange(n) % 5
    ages = np.array([5, 20, 35, 50, 70] * (n // 5), dtype=float)
    table = pd.DataFrame({"path": [f"x{i}.jpg" for i in range(n)], "split": "test", "age": ages,
                          "gender": gender, "race": race.astype(float)})
    pred_gender = np.where(right, gender, 1 - gender).astype(int)
    g = torch.full((n, 2), -2.0)
    g[torch.arange(n), torch.as_tensor(pred_gender)] = 2.0
    r = torch.full((n, 5), -1.0)
    r[torch.arange(n), torch.as_tensor(race)] = 3.0
    off = np.where(gender == 0, 2, 6)  # men's age off by 2, women's by 6
    a = torch.full((n, 117), -30.0)
    a[torch.arange(n), torch.as_tensor((ages + off).astype(int))] = 30.0  # expected age = that bin
    raw = {"age": a, "gender": g, "race": r}
    targets = {"age": torch.as_tensor(ages, dtype=torch.float32), "gender": torch.as_tensor(gender, dtype=torch.float32),
               "race": torch.as_tensor(race, dtype=torch.float32)}
    return table, raw, targets


def test_group_counts_cis_and_largest_gap(agr):
    table, raw, targets = synthetic()
    rep = group_report(agr, table, raw, targets, ["gender", "race", "age_group"], n_boot=200, min_group=1)
    g = rep["groups"]["gender"]
    assert list(g) == ["female", "male"] and g["male"]["n"] == 40 and g["female"]["n"] == 60
    acc_m, acc_f = g["male"]["metrics"]["gender.accuracy"], g["female"]["metrics"]["gender.accuracy"]
    assert acc_m["value"] == pytest.approx(0.75) and acc_f["value"] == pytest.approx(0.5)
    assert (acc_m["lo"], acc_m["hi"]) == pytest.approx(wilson(30, 40)) and acc_m["n"] == 40
    assert g["male"]["metrics"]["age.mae"]["value"] == pytest.approx(2.0, abs=1e-3)
    assert g["female"]["metrics"]["age.mae"]["value"] == pytest.approx(6.0, abs=1e-3)
    for groups in rep["groups"].values():
        for d in groups.values():
            for k, m in d["metrics"].items():
                if not math.isfinite(m["value"]):  # Pearson of one age group whose true ages are all equal
                    assert k == "age.pearson"
                    continue
                assert m["lo"] - 1e-9 <= m["value"] <= m["hi"] + 1e-9, k
    gap = rep["gaps"]["gender"]["gender.accuracy"]
    assert gap == pytest.approx({"gap": 0.25, "max_group": "male", "max": 0.75, "min_group": "female", "min": 0.5})
    assert rep["gaps"]["gender"]["age.mae"]["gap"] == pytest.approx(4.0, abs=1e-3)
    assert list(rep["groups"]["race"]) == ["Asian", "Black", "Indian", "Others", "White"]
    assert all(d["n"] == 20 and d["metrics"]["race.accuracy"]["value"] == 1.0 for d in rep["groups"]["race"].values())
    assert list(rep["groups"]["age_group"]) == ["0-17", "18-29", "30-44", "45-59", "60+"]
    assert sum(d["n"] for d in rep["groups"]["age_group"].values()) == 100
    assert "gender.ece" in g["male"]["metrics"] and rep["missing"] == {"gender": 0, "race": 0, "age_group": 0}
    # groups below min_group are left out of the gaps
    small = group_report(agr, table, raw, targets, ["gender"], n_boot=0, min_group=50)
    assert small["gaps"]["gender"] == {}


def test_wilson_and_age_groups():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and 0.27 < hi < 0.28  # 0.2775
    lo, hi = wilson(81, 100)
    assert lo == pytest.approx(0.7222, abs=1e-4) and hi == pytest.approx(0.8749, abs=1e-4)
    assert [age_group(a) for a in (0, 17.9, 18, 29, 30, 44, 45, 59, 60, 116, float("nan"))] == \
        ["0-17", "0-17", "18-29", "18-29", "30-44", "30-44", "45-59", "45-59", "60+", "60+", None]


def test_bootstrap_interval():
    reps = np.random.default_rng(0).normal(5.0, 1.0, 4000)
    lo, hi = bootstrap_interval(5.0, reps)  # unbiased replicates: the plain percentiles
    assert lo == pytest.approx(5 - 1.96, abs=0.1) and hi == pytest.approx(5 + 1.96, abs=0.1)
    lo, hi = bootstrap_interval(0.10, [0.12, 0.13, 0.15, 0.2])  # ECE-like: every replicate above
    assert lo == 0.10 and hi >= 0.13
    assert all(math.isnan(x) for x in bootstrap_interval(1.0, [float("nan")]))


def test_missing_group_column_is_a_clear_error(agr, tmp_path):
    table, raw, targets = synthetic()
    with pytest.raises(GroupError, match=r"--by skin_tone: no such column.*it has age, gender, race, age_group"):
        group_report(agr, table, raw, targets, ["gender", "skin_tone"])
    with pytest.raises(GroupError, match="needs an 'age' column"):
        group_values(table.drop(columns=["age"]), agr, "age_group")
    with pytest.raises(GroupError, match="rows"):
        group_report(agr, table.iloc[:10], raw, targets, ["gender"])


def test_evaluate_cli_calibrates_groups_and_draws(tmp_path, agr, capsys):
    from facedata.synth import generate

    data = f"utkface:{generate('utkface', 60, str(tmp_path / 'utk'), seed=1, size=(48, 48))}"
    save_checkpoint(agr, str(tmp_path / "agr.pt"))
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(tmp_path / "agr.pt"), "--data", data, "--split", "all", "--by", "hair"])
    assert "--by hair: no such column" in capsys.readouterr().err

    metrics = evaluate.main(["--checkpoint", str(tmp_path / "agr.pt"), "--data", data, "--split", "all",
                             "--json", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert "calibrated: false" in out and "gender.ece_uncalibrated" in out
    m, _ = load_checkpoint(str(tmp_path / "agr.pt"))
    from facedata.datasets import read_dataset

    ref = evaluate_table(m, read_dataset(data).table)
    assert metrics.keys() == ref.keys() and all(math.isclose(metrics[k], ref[k], rel_tol=1e-6, abs_tol=1e-9)
                                                for k in ref)  # the same metrics as before
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["calibrated"] == 0 and "race.ece_uncalibrated" in doc and "race.ece_calibrated" not in doc

    evaluate.main(["--checkpoint", str(tmp_path / "agr.pt"), "--data", data, "--split", "all",
                   "--calibrate-on", "all", "--save-calibrated", str(tmp_path / "cal.pt"),
                   "--reliability", str(tmp_path / "rel.png"), "--by", "gender,race,age_group",
                   "--groups-json", str(tmp_path / "g.json"), "--bootstrap", "20", "--min-group", "1"])
    out = capsys.readouterr().out
    assert "calibrated: true" in out and "gender.ece_calibrated" in out and "by age_group" in out
    assert (tmp_path / "rel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((tmp_path / "g.json").read_text())
    n = int(metrics["n_images"])
    assert sum(d["n"] for d in rep["groups"]["gender"].values()) == n
    assert sum(d["n"] for d in rep["groups"]["age_group"].values()) == n
    cal, info = load_checkpoint(str(tmp_path / "cal.pt"))
    assert cal.outputs["gender"].calibrated and info.extra["calibration"]["split"] == "all"
    assert set(info.extra["calibration"]["fit"]) == {"gender", "race"}


def test_evaluate_scores_a_40_attribute_model_on_the_attributes_the_data_labels(tmp_path, capsys):
    """DMM-CNN on photos labelled only with smile and gender (GENKI-4K, LFW, a user's manifest): ``Smiling`` and
    ``Male`` are scored against them, each over the rows that have it, the other 38 are not reported, and the
    output says so; the figures are the model's own answers counted by hand."""
    from facedata.datasets import CELEBA_ATTRIBUTES
    from facedata.synth import generate
    from models.preprocess import decode

    generate("utkface", 24, str(tmp_path / "utk"), seed=2, size=(48, 48))
    paths = sorted(str(p) for p in (tmp_path / "utk").iterdir())
    rng = np.random.default_rng(0)
    smile = rng.integers(0, 2, len(paths)).astype(float)
    gender = rng.integers(0, 2, len(paths)).astype(float)
    smile[:5] = np.nan  # rows without a smile label: left out of Smiling only
    pd.DataFrame({"path": paths, "smile": smile, "gender": gender}).to_csv(tmp_path / "m.csv", index=False)
    torch.manual_seed(0)
    dmm = models.create_model("dmm_cnn", depth=18, image_size=48, num_landmarks=0)
    save_checkpoint(dmm, str(tmp_path / "dmm.pt"))
    metrics = evaluate.main(["--checkpoint", str(tmp_path / "dmm.pt"), "--data", f"manifest:{tmp_path / 'm.csv'}",
                             "--split", "all", "--faces", "whole", "--by", "gender", "--min-group", "1",
                             "--bootstrap", "10"])
    out = capsys.readouterr().out
    assert sorted(k for k in metrics if k.endswith(".accuracy")) == ["Male.accuracy", "Smiling.accuracy"]
    assert "the data labels 2 of 40 (Male, Smiling)" in out and "by gender" in out

    m, _ = load_checkpoint(str(tmp_path / "dmm.pt"))
    x = torch.stack([decode(open(p, "rb").read(), m.preprocessing)[0] for p in paths])
    with torch.no_grad():
        scores = m.eval()(m.prepare(x))["attributes"]
    said = scores > m.thresholds
    male = said[:, CELEBA_ATTRIBUTES.index("Male")].numpy()
    smiling = said[:, CELEBA_ATTRIBUTES.index("Smiling")].numpy()
    assert metrics["Male.accuracy"] == pytest.approx(np.mean(male == (gender == 0)))
    has = ~np.isnan(smile)
    assert metrics["Smiling.accuracy"] == pytest.approx(np.mean(smiling[has] == (smile[has] == 1)))
    assert metrics["n_images"] == len(paths)
