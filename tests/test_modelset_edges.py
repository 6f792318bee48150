"""Model-set files and checkpoint metadata from someone else's hand (audit /tmp/audit_rep, findings 1, 2, 3
and 6): a key written twice in a set file is an error naming it and its line (YAML and JSON readers keep the
last silently, and a model was dropped); a set's version is kept exactly as written or refused, asking for
quotes (``1.10`` was the float 1.1); a hashed checkpoint whose metadata holds a tensor outside ``state_dict``,
or whose ``extra`` fields that jobs read have another shape than jobs.train writes, is refused when it is
loaded, naming the field (jobs.evaluate ended in a traceback after its work). No Ray; each test failed on the
code before its fix."""

from __future__ import annotations

import datetime

import pytest
import torch

import models
from core.modelset import ModelSetError, check_set_version, read_set_file
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.checkpoint_hash import hash_of
from models.recipes import RECORD_KEY, record_lines


def _set(tmp_path, text: str, name: str = "set.yaml") -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


# --- 1: a key twice in a set file -----------------------------------------------------------------------
@pytest.mark.parametrize("text,key,line,first", [
    ("models:\n  agr: a.pt\n  celeba: b.pt\n  agr: c.pt\n", "agr", 4, 2),
    ('{"models": {"agr": "a.pt",\n "agr": "c.pt"}}', "agr", 2, 1),  # JSON: json.loads keeps the last too
    ("models:\n  agr: a.pt\n  celeba: b.pt\nmodels:\n  hmt: h.pt\n", "models", 4, 1),
    ("name: faces\nname: other\nmodels: {a: a.pt}\n", "name", 2, 1),
    ("models: {a: a.pt, a: b.pt}\n", "a", 1, 1),
], ids=["member", "json-member", "models-block", "name", "flow"])
def test_a_key_twice_in_a_set_file_is_an_error_naming_it_and_its_line(tmp_path, text, key, line, first):
    with pytest.raises(ModelSetError) as e:
        read_set_file(_set(tmp_path, text))
    msg = str(e.value)
    assert f"line {line}: the key {key!r} appears twice" in msg and f"first on line {first}" in msg, msg
    assert "is not YAML" not in msg


def test_yaml_without_a_repeated_key_loads_as_before():
    import yaml

    from facedata.yamlsafe import DuplicateKey, YamlError, load_yaml

    text = "format: 1\nmodels:\n  agr: a.pt\n  celeba: b.pt\nother: {agr: x}\nlist: [{a: 1}, {a: 2}]\n"
    assert load_yaml(text) == yaml.safe_load(text)
    with pytest.raises(DuplicateKey) as e:
        load_yaml("a:\n  - {x: 1, y: 2, x: 3}\n")
    assert isinstance(e.value, YamlError) and str(e.value).startswith("line 2: the key 'x' appears twice")


# --- 6: a set's version is kept as written ----------------------------------------------------------------
@pytest.mark.parametrize("written,read_as", [
    ("1.10", "a number (1.1)"), ("010", "an integer (8)"), ("1:30", "an integer (90)"), ("0x1A", "an integer (26)"),
    ("1_000", "an integer (1000)"), ("+2", "an integer (2)"), (".nan", "a number (nan)"), (".inf", "a number (inf)"),
    ("2026-11-29 10:00:00", "a date and time"), ("2026-1-9 1:02:03", "a date and time"),
])
def test_a_version_yaml_would_rewrite_is_refused_asking_for_quotes(tmp_path, written, read_as):
    with pytest.raises(ModelSetError) as e:
        read_set_file(_set(tmp_path, f"version: {written}\nmodels: {{a: a.pt}}\n"))
    msg = str(e.value)
    assert f"set version {written!r} is read by YAML as {read_as}" in msg and f'quote it (version: "{written}")' in msg


@pytest.mark.parametrize("text,version", [
    ("version: 2\n", "2"), ("version: 2026-11-29\n", "2026-11-29"), ("version: '1.10'\n", "1.10"),
    ('version: "010"\n', "010"), ("version: v1.10\n", "v1.10"), ("version: 2026-1-9\n", "2026-1-9"), ("", "1"),
])
def test_a_plain_integer_a_date_or_quoted_text_is_kept_as_written(tmp_path, text, version):
    assert read_set_file(_set(tmp_path, text + "models: {a: a.pt}\n")).version == version


def test_a_json_set_files_version_follows_the_same_rule(tmp_path):
    assert read_set_file(_set(tmp_path, '{"version": 2, "models": {"a": "a.pt"}}', "s.json")).version == "2"
    assert read_set_file(_set(tmp_path, '{"version": "1.10", "models": {"a": "a.pt"}}', "s.json")).version == "1.10"
    with pytest.raises(ModelSetError, match='quote it \\(version: "1.10"\\)'):
        read_set_file(_set(tmp_path, '{"version": 1.10, "models": {"a": "a.pt"}}', "s.json"))


def test_the_serve_configurations_version_follows_the_same_rule():
    """Without the text as written (Ray Serve's config loader), a non-integer number is refused all the same."""
    assert check_set_version(2) == "2" and check_set_version(datetime.date(2026, 11, 29)) == "2026-11-29"
    for v in (1.1, float("nan"), datetime.datetime(2026, 11, 29, 10), 10 ** 80):
        with pytest.raises(ModelSetError, match="quote it"):
            check_set_version(v)


# --- 2 and 3: checkpoint metadata -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hs(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("edges") / "hs.pt")
    save_checkpoint(models.create_model("hard_sharing"), path, metrics={"val_loss": 0.5},
                    extra={"faces": {"mode": "detect", "detector": None, "max_side": None}, "split_seed": 3})
    return path


def _tampered(src: str, dst, edit) -> str:
    """``src`` edited by ``edit(obj)`` and re-signed with the public hash, as anyone can."""
    obj = torch.load(src, weights_only=True)
    edit(obj)
    obj["hash"] = hash_of(obj)
    torch.save(obj, dst)
    return str(dst)


RECORD = {"name": "r", "version": 1, "faces": {"mode": "detect", "options": {"detector": {"size": 256}}},
          "stages": [{"index": 1, "name": "train", "epochs_done": 2, "best_epoch": 1, "primary_metric": "val_loss",
                      "best_metrics": {"val_loss": 0.25}, "train_values": {"epochs": 2}, "overrides": {}}]}


@pytest.mark.parametrize("edit,field", [
    (lambda o: o["extra"].update(faces="detect"), "extra.faces is str, not a mapping"),
    (lambda o: o["extra"].update(faces={"mode": 3}), "extra.faces.mode is int, not text"),
    (lambda o: o["extra"].update(split_seed="abc"), "extra.split_seed is str, not an integer"),
    (lambda o: o["extra"].update(split_seed=None), "extra.split_seed is null, not an integer"),
    (lambda o: o["extra"].update(split_seed=True), "extra.split_seed is bool, not an integer"),
    (lambda o: o["extra"].update({RECORD_KEY: "r"}), f"extra.{RECORD_KEY} is str, not a mapping"),
    (lambda o: o["extra"].update({RECORD_KEY: {**RECORD, "faces": "detect"}}),
     f"extra.{RECORD_KEY}.faces is str, not a mapping"),
    (lambda o: o["extra"].update({RECORD_KEY: {**RECORD, "faces": {"mode": "detect", "options": [1]}}}),
     f"extra.{RECORD_KEY}.faces.options is list, not a mapping"),
    (lambda o: o["extra"].update({RECORD_KEY: {**RECORD, "stages": 5}}),
     f"extra.{RECORD_KEY}.stages is int, not a list of mappings"),
    (lambda o: o["extra"].update({RECORD_KEY: {**RECORD, "stages": [1]}}),
     f"extra.{RECORD_KEY}.stages is list, not a list of mappings"),
    (lambda o: o["metrics"].update(val_loss="low"), "metrics.val_loss is str, not a number"),
], ids=["faces-str", "faces-mode-int", "seed-str", "seed-null", "seed-bool", "record-str", "record-faces-str",
        "record-options-list", "record-stages-int", "record-stage-int", "metric-str"])
def test_a_hashed_checkpoint_whose_extra_has_another_shape_is_refused_naming_the_field(hs, tmp_path, edit, field):
    path = _tampered(hs, tmp_path / "odd.pt", edit)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert f"its metadata is not what jobs.train writes ({field})" in str(e.value), str(e.value)


def test_jobs_evaluate_exits_2_naming_the_field_not_a_traceback(hs, tmp_path, capsys):
    from jobs import evaluate

    path = _tampered(hs, tmp_path / "seed.pt", lambda o: o["extra"].update(split_seed="abc"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", path, "--data", f"celeba:{tmp_path / 'nowhere'}"])
    assert e.value.code == 2 and "extra.split_seed is str, not an integer" in capsys.readouterr().err


@pytest.mark.parametrize("edit,where", [
    (lambda o: o["extra"].update(x=torch.zeros(3)), "checkpoint.extra.x"),
    (lambda o: o["extra"].update(runs=[{"curve": torch.zeros(3)}]), "checkpoint.extra.runs[0].curve"),
    (lambda o: o["metrics"].update(acc=torch.tensor(0.9)), "checkpoint.metrics.acc"),
    (lambda o: o["config"].update(hidden=torch.tensor(32)), "checkpoint.config.hidden"),
    (lambda o: o.update(junk=torch.zeros(2)), "checkpoint.junk"),
], ids=["extra", "extra-nested", "metrics", "config", "top-level"])
def test_a_tensor_outside_the_state_dict_is_refused_at_load(hs, tmp_path, edit, where):
    path = _tampered(hs, tmp_path / "t.pt", edit)
    with pytest.raises(CheckpointError, match="a tensor outside state_dict") as e:
        load_checkpoint(path)
    assert where in str(e.value)


def test_what_jobs_train_writes_loads_and_its_record_is_shown(hs, tmp_path):
    model, info = load_checkpoint(hs)
    assert info.extra["faces"]["mode"] == "detect" and info.extra["split_seed"] == 3
    path = _tampered(hs, tmp_path / "rec.pt", lambda o: o["extra"].update({RECORD_KEY: RECORD}))
    _, info = load_checkpoint(path)
    assert record_lines(info.extra) == ["recipe r v1", "  faces: detect (detector size=256)",
                                        "  stage 1 train: 2 of 2 epochs, best epoch 1, val_loss 0.2500; "]


def test_record_lines_shows_odd_values_inside_a_record_without_an_exception():
    odd = {"name": "r", "version": 1, "faces": "detect", "stages": [1, {"index": 2, "train_values": "x",
                                                                         "best_metrics": 5, "primary_metric": ["m"],
                                                                         "overrides": "y"}]}
    assert record_lines({RECORD_KEY: odd}) == ["recipe r v1", "  faces: detect", "  stage 1",
                                               "  stage 2 None: None of None epochs, best epoch None; "]
    assert record_lines({RECORD_KEY: {**odd, "stages": 7}}) == ["recipe r v1", "  faces: detect"]
