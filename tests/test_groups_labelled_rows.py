"""jobs.evaluate --by: a metric's ``n`` is the rows with its label, and ``--min-group`` reads that ``n``, not the
group's rows, when it picks the groups a largest gap compares (a group of 100 faces with 2 race labels has no
race figure to compare). No Ray; a few seconds."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import models
from core.evaluation import format_groups, group_report
from core.groupstats import labelled_counts
from models.outputs import Binary


@pytest.fixture(scope="module")
def agr():
    torch.manual_seed(0)
    return models.create_model("age_gender_race", depth=18, image_size=32, hidden=(8,))


def few_labelled_women():
    """100 men and 100 women; race labelled for every man (half of them right) and for 2 women (both right);
    age labelled for every man and 3 women."""
    n = 200
    gender = np.array([0] * 100 + [1] * 100, dtype=float)
    race = np.full(n, np.nan)
    race[:100] = np.arange(100) % 5
    race[100:102] = [1, 2]
    age = np.full(n, np.nan)
    age[:100] = 30
    age[100:103] = 40
    table = pd.DataFrame({"path": [f"{i}.jpg" for i in range(n)], "gender": gender, "race": race, "age": age})
    r = torch.zeros(n, 5)
    said = np.where(np.arange(n) % 2 == 0, np.nan_to_num(race), (np.nan_to_num(race) + 1) % 5)  # men: half right
    said[100:102] = race[100:102]  # the 2 labelled women: right
    r[torch.arange(n), torch.as_tensor(said.astype(int))] = 4.0
    g = torch.zeros(n, 2)
    g[torch.arange(n), torch.as_tensor(gender.astype(int))] = 4.0
    a = torch.full((n, 117), -30.0)
    a[:, 35] = 30.0  # every age read as 35: men 5 years off, women 5
    raw = {"age": a, "gender": g, "race": r}
    targets = {k: torch.tensor(table[k].to_numpy(dtype=float), dtype=torch.float32) for k in ("age", "gender", "race")}
    return table, raw, targets


def test_min_group_reads_each_metric_s_labelled_rows_not_the_group_s(agr):
    """The audit's case: 100 women of whom 2 have a race label, both right, against 100 labelled men at 0.5: with
    --min-group 30 the women's race accuracy (a 0.5 "gap") is not compared, however many rows the group has."""
    table, raw, targets = few_labelled_women()
    rep = group_report(agr, table, raw, targets, ["gender"], n_boot=10, min_group=30)
    g = rep["groups"]["gender"]
    assert g["male"]["n"] == g["female"]["n"] == 100  # the groups' rows: both over 30
    assert g["female"]["metrics"]["race.accuracy"]["value"] == 1.0
    assert g["male"]["metrics"]["race.accuracy"]["value"] == pytest.approx(0.5)
    gaps = rep["gaps"]["gender"]
    # 2 (or 3) labelled women are under --min-group 30: no race or age gap, however large it looks
    assert sorted(k for k in gaps if k.startswith(("race.", "age.")) or k == "mean_accuracy") == []
    assert "gender.accuracy" in gaps  # 100 labelled rows each: compared
    # at a min_group the women's 2 race labels reach, their race is compared again
    low = group_report(agr, table, raw, targets, ["gender"], n_boot=0, min_group=2)["gaps"]["gender"]
    assert low["race.accuracy"] == pytest.approx({"gap": 0.5, "max_group": "female", "max": 1.0,
                                                  "min_group": "male", "min": 0.5})
    three = group_report(agr, table, raw, targets, ["gender"], n_boot=0, min_group=3)["gaps"]["gender"]
    assert "age.mae" in three and "race.accuracy" not in three  # the women's 3 ages reach 3, their 2 races not


def test_every_metric_reports_its_labelled_rows(agr):
    """A metric's ``n`` (printed as n=..., in --groups-json) is the rows with its label, bootstrapped metrics (ECE,
    loss, MAE) as well as accuracies; a mean of several, the fewest behind any of its parts."""
    table, raw, targets = few_labelled_women()
    rep = group_report(agr, table, raw, targets, ["gender"], n_boot=10, min_group=30)
    women, men = (rep["groups"]["gender"][k]["metrics"] for k in ("female", "male"))
    assert {k: women[k]["n"] for k in ("race.accuracy", "race.ece", "race.loss")} == dict.fromkeys(
        ("race.accuracy", "race.ece", "race.loss"), 2)
    assert women["age.mae"]["n"] == 3 and men["age.mae"]["n"] == 100 and men["race.ece"]["n"] == 100
    assert women["gender.accuracy"]["n"] == 100
    assert women["mean_accuracy"]["n"] == 2  # gender's 100 rows and race's 2
    assert "race.ece: female" in "\n".join(format_groups(rep)) and "n=2" in "\n".join(format_groups(rep))


def test_labelled_counts_of_binary_attributes():
    """Each attribute counts the rows that have it; the group's means count the fewest of its attributes."""
    o = Binary("attributes", labels=("Smiling", "Male", "Eyeglasses"))
    model = SimpleNamespace(outputs=(o,))
    nan = float("nan")
    target = torch.tensor([[1.0, 0.0, nan]] * 40 + [[nan, 1.0, nan]] * 10 + [[0.0, 1.0, 1.0]] * 5)
    stats = {"attributes": o.stats(torch.randn(len(target), 3), target)}
    metrics = list(o.metrics(stats["attributes"])) + ["mean_accuracy", "Smiling.ece", "attributes.mean_ece"]
    n = labelled_counts(model, stats, metrics)
    assert n["Smiling.accuracy"] == n["Smiling.ece"] == 45 and n["Male.accuracy"] == 55
    assert n["Eyeglasses.accuracy"] == 5
    assert n["attributes.mean_accuracy"] == n["attributes.loss"] == n["attributes.mean_ece"] == 5
    assert n["mean_accuracy"] == 5
