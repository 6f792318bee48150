"""Places that did one thing twice, now done once; each test pins where the two old copies disagreed:

1. what a source's class codes mean (``facedata.datasets.classcodes.class_mismatches``): training's refusal
   of a mix and ``jobs.evaluate``'s unscored column (``core.evalinputs.class_disagreements``) apply the same
   rule;
2. a CSV quote left open (``facedata.manifest_inputs.quotes_close``): the label job's manifests and the data
   sets' CSV label files (``facedata.datasets.textfiles.csv_records``) ask the same test;
3. a file's key (``facedata.paths.normalize_path``, which the data sets' readers use too);
4. the argparse types of jobs/_cli.py (report's ``--seed`` uses ``non_negative``).
"""

from __future__ import annotations

import argparse
import types

import numpy as np
import pandas as pd
import pytest

from core.evalinputs import class_disagreements
from facedata import paths
from facedata.datasets import UTKFACE_RACES, FaceDataset, mix
from facedata.datasets.base import _Skips
from facedata.datasets.classcodes import class_mismatches
from facedata.datasets.manifest import _split_keys
from facedata.datasets.mixed import _one_split_per_file
from facedata.datasets.textfiles import csv_records
from facedata.manifest_inputs import quotes_close
from jobs._cli import non_negative, positive
from models.outputs import Categorical


def _manifest(race, root="/m") -> FaceDataset:
    table = pd.DataFrame({"path": [f"{root}/{i}.jpg" for i in range(len(race))], "split": "train",
                          "race": np.asarray(race, dtype=float)})
    return FaceDataset("manifest", f"{root}.csv", table)


def _utkface(root="/u") -> FaceDataset:
    table = pd.DataFrame({"path": [f"{root}/0_0_0_x.jpg"], "split": "train", "race": [0.0]})
    return FaceDataset("utkface", root, table)


def _checkpoint(classes) -> types.SimpleNamespace:
    return types.SimpleNamespace(outputs=[Categorical("race", classes=tuple(classes))])


# ------------------------------------------------------------------------------- 1: class codes, one rule


@pytest.mark.parametrize("race", [[0, 7, 9], [0, -1, 3], [0, 2.5, 3]])
def test_a_manifest_code_the_head_lacks_is_refused_by_training_and_not_scored_by_evaluation_alike(race):
    """Training checked only a manifest's largest code (a negative or fractional one passed it: the reader
    refuses those, a table built in code did not); evaluation checked all three. Both now name the first code
    that is no class."""
    ds = _manifest(race)
    bad = race[1]
    assert [(m.source, m.meaning, m.code) for m in class_mismatches(ds, "race", UTKFACE_RACES)] == [
        ("manifest:/m.csv", None, bad)]
    with pytest.raises(ValueError, match=f"age_gender_race learns race as 0=White.*4=Others; manifest:/m.csv has "
                                         f"race {bad:g}, which is none of them"):
        ds.model_overrides("age_gender_race")
    assert class_disagreements(ds, _checkpoint(UTKFACE_RACES)) == {
        "race": f"manifest:/m.csv has race {bad:g}, which is none of the checkpoint's race classes "
                "(0=White, 1=Black, 2=Asian, 3=Indian, 4=Others)"}


def test_a_mix_is_judged_by_one_rule_for_training_and_evaluation():
    good, scut = _manifest([0, 4]), FaceDataset("scut_fbp5500", "/s", pd.DataFrame(
        {"path": ["/s/AF1.jpg"], "split": "train", "race": [0.0]}))
    both = mix([_utkface(), good, scut])
    assert [m.source for m in class_mismatches(both, "race", UTKFACE_RACES)] == ["scut_fbp5500:/s"]
    with pytest.raises(ValueError, match="utkface:/u codes race as 0=White.* but scut_fbp5500:/s codes it as "
                                         "0=Asian, 1=Caucasian"):
        both.model_overrides("age_gender_race")
    assert class_disagreements(both, _checkpoint(UTKFACE_RACES)) == {
        "race": "scut_fbp5500:/s codes race as 0=Asian, 1=Caucasian; the checkpoint's race output is "
                "0=White, 1=Black, 2=Asian, 3=Indian, 4=Others"}
    agree = mix([_utkface(), good])
    assert class_mismatches(agree, "race", UTKFACE_RACES) == [] and class_disagreements(
        agree, _checkpoint(UTKFACE_RACES)) == {}
    assert agree.model_overrides("age_gender_race") == {}


# ------------------------------------------------------------------------------- 2: a quote left open


def test_quotes_close_by_pyarrows_rule_and_by_csvs_strict_one():
    assert quotes_close('"a,b.jpg",1') and quotes_close('x"y.jpg,2') and quotes_close('"r""s.jpg","4"')
    assert not quotes_close('"b.jpg,1') and not quotes_close('b.jpg,"1')
    # pyarrow reads on after a closing quote ("a"b is ab), so the second value's quote is open; csv's strict
    # rule calls the line malformed at the b and reads no further
    assert not quotes_close('"a"b,"c') and quotes_close('"a"b,"c', strict=True)
    assert quotes_close('"a\tb"\t1', sep="\t") and not quotes_close('a\t"b', sep="\t")
    assert quotes_close('"b.jpg,1\nc\nd.jpg",1\n', strict=True)  # a record's text: the line ends are text


def _records(text: str, sep: str = ","):
    skips = _Skips()
    header, rows = csv_records(text, "m.csv", skips, sep)
    return header, [r["path"] for _, r in rows], dict(skips)


def test_the_data_sets_reader_refuses_only_a_quote_left_open_and_skips_the_other_malformed_lines():
    # a quote open on the last line: csv's "unexpected end of data" on the line itself
    with pytest.raises(ValueError, match=r"m\.csv: line 3 opens a quote .* never closed"):
        _records('path,gender\na.jpg,0\n"b.jpg,1\n')
    # one line past csv's 128 KiB field limit without any quote: skipped and named, not called a stray quote
    # (it was refused as "line 3 opens a quote")
    header, kept, skipped = _records(f"path,gender\na.jpg,0\n{'x' * 140_000}.jpg,1\nc.jpg,0\n")
    assert kept == ["a.jpg", "c.jpg"] and "field larger than field limit" in skipped["m.csv:line 3"]
    # a quote that closes two lines later, then text after it: those lines are skipped, the rest read
    header, kept, skipped = _records('path,gender\na.jpg,0\n"b.jpg,1\nc.jpg,0\nd.jpg"x,1\n"e"x.jpg,"1\nf.jpg,1\n')
    assert kept == ["a.jpg", "f.jpg"] and sorted(skipped) == ["m.csv:line 6", "m.csv:lines 3-5"]
    # a tab-separated file: the quote test takes its separator
    header, kept, skipped = _records('path\tgender\n"a\tb.jpg"\t0\n', sep="\t")
    assert kept == ["a\tb.jpg"] and not skipped
    with pytest.raises(ValueError, match="line 2 opens a quote"):
        _records('path\tgender\na.jpg\t"0\nb.jpg\t1\n', sep="\t")


# ------------------------------------------------------------------------------- 3: one key per file


def test_a_files_key_is_the_label_jobs_identity_of_it():
    key = paths.normalize_path  # what mixed.py and manifest.py key a row's file by
    assert key("file:///d/./a/../x.jpg") == key("/d/x.jpg") == "/d/x.jpg"
    # an S3 key's dot segments go (as the label job has it; the readers' key had kept them), an empty one stays
    assert key("s3://b/p/./x.jpg") == key("s3://b/p/q/../x.jpg") == "s3://b/p/x.jpg"
    assert key("s3://b/p//x.jpg") == "s3://b/p//x.jpg"


def test_one_s3_object_spelled_two_ways_is_in_one_split_of_a_mix_and_of_a_manifest():
    table = pd.DataFrame({"path": ["s3://b/p/x.jpg", "s3://b/p/./x.jpg", "s3://b/p//x.jpg"],
                          "split": ["train", "test", "val"]})
    _one_split_per_file(table, np.array([0, 1, 2]))
    assert table["split"].tolist() == ["train", "train", "val"]  # a//x.jpg is another object
    keys = _split_keys([("x.jpg", "s3://b/p/x.jpg"), ("./x.jpg", "s3://b/p/./x.jpg"),
                        ("y.jpg", "s3://b/p/y.jpg")], "s3://b/p/")
    assert keys == {"x.jpg": "x.jpg", "./x.jpg": "x.jpg", "y.jpg": "y.jpg"}


# ------------------------------------------------------------------------------- 4: the argparse types


def test_the_argparse_types_say_what_they_expected():
    with pytest.raises(argparse.ArgumentTypeError, match="must be > 0, got nan"):
        positive(float)("nan")  # NaN <= 0 is False: it was taken as a size
    with pytest.raises(argparse.ArgumentTypeError, match="must be a number > 0, got 'x'"):
        positive(float)("x")
    with pytest.raises(argparse.ArgumentTypeError, match="must be a whole number > 0, got '1.5'"):
        positive(int)("1.5")
    with pytest.raises(argparse.ArgumentTypeError, match="must be a whole number >= 0, got 'x'"):
        non_negative("x")
    with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number, got inf"):
        positive(float)("inf")
    assert positive(float)("0.5") == 0.5 and non_negative("0") == 0


def _float_flags(p: argparse.ArgumentParser) -> list[str]:
    """The long flags of ``p`` whose ``type`` parses a float (any of them: ``finite``, ``seconds``, ``positive``)."""
    return [a.option_strings[-1] for a in p._actions if a.option_strings and a.type is not None
            and _parses_floats(a.type)]


def _parses_floats(kind) -> bool:
    try:
        return isinstance(kind("0.5"), float)
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return False


def test_every_number_flag_of_every_job_refuses_nan_and_inf_when_parsed():
    """``type=float`` took ``--lr nan`` (``lr < 0`` is False for NaN: a run that trains on NaN) and
    ``--det-threshold inf``; every float flag of train, label, serve and evaluate now refuses both at once, with
    argparse's status 2 and a message naming the flag."""
    from jobs import evaluate, label, serve, train

    base = {"train": ["--model", "hard_sharing", "--data", "celeba:/d"],
            "label": ["--checkpoint", "m.pt", "--input", "in", "--output", "out"],
            "serve": ["--model", "m=m.pt"], "evaluate": ["--checkpoint", "m.pt", "--data", "celeba:/d"]}
    parsers = {"train": train.build_parser(), "label": label.build_parser(), "serve": serve.parser(),
               "evaluate": evaluate.build_parser()}
    seen = set()
    for job, p in parsers.items():
        flags = _float_flags(p)
        seen.update(flags)
        for f in flags:
            for bad in ("nan", "inf", "-inf"):
                with pytest.raises(SystemExit) as e:
                    p.parse_args(base[job] + [f, bad])
                assert e.value.code == 2, (job, f, bad)
    # the flags that took NaN before, each checked above
    assert {"--lr", "--weight-decay", "--label-smoothing", "--align-jitter", "--det-threshold", "--min-face",
            "--gpus-per-actor", "--throttle", "--progress-every", "--max-request-mb", "--cpus-per-worker",
            "--cpus-per-actor"} <= seen
    args = train.build_parser().parse_args(base["train"] + ["--lr", "1e-3", "--det-threshold", "0.5"])
    assert args.lr == 0.001 and args.det_threshold == 0.5


def test_the_argparse_number_messages(capsys):
    from jobs._cli import finite, seconds
    from jobs.train import build_parser

    with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number, got 'nan'"):
        finite("nan")
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be a number \(finite\), got 'x'"):
        finite("x")
    with pytest.raises(argparse.ArgumentTypeError, match="must be a number of seconds >= 0, got inf"):
        seconds("inf")
    assert finite("-2.5") == -2.5 and seconds("0") == 0.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "hard_sharing", "--data", "celeba:/d", "--lr", "nan"])
    assert "argument --lr: must be a finite number, got 'nan'" in capsys.readouterr().err
