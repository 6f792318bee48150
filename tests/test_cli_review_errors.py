"""A wrong ``--review SETTING=VALUE`` is refused as every other bad flag is (docs/api.md): argparse's usage and
its ``error:`` line, exit status 2, for label and serve (evaluate takes no ``--review``: argparse refuses the flag
itself, the same way). And the help of the ``--no-...`` flags says what happens by default, not
"(default: True)". In-process ``main()`` and the parsers only: no Ray, no data, no checkpoint read."""

from __future__ import annotations

import argparse

import pytest

# an unknown setting, a value that is no number, a NaN, no '=' at all, per_output without an output's name
BAD = ["bogus=1", "min_face_size=abc", "max_yaw=nan", "min_confidence", "per_output=0.8"]


class Reached(Exception):
    """The first step past the flags was reached: the flags were accepted."""


def _reached(*a, **k):
    raise Reached


@pytest.fixture
def plain_dir(tmp_path, monkeypatch):
    """A shell's folder: no Ray job (relative paths are not refused) and no cluster to join."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def _label(monkeypatch, argv):
    from jobs import label

    monkeypatch.setattr(label, "input_is_manifest", _reached)  # the step after the flags: the first read
    return lambda: label.main(["--checkpoint", "m.pt", "--input", "photos", "--output", "labels", *argv])


def _serve(monkeypatch, argv):
    from jobs import serve

    monkeypatch.setattr(serve, "check_auth", _reached)  # the step after build_args, before the app and Ray
    return lambda: serve.main(["--model", "agr=m.pt", *argv])


def _evaluate(monkeypatch, argv):
    from jobs import evaluate

    monkeypatch.setattr(evaluate, "load_checkpoint", _reached)
    return lambda: evaluate.main(["--checkpoint", "m.pt", "--data", "utkface:data/utk", *argv])


def _usage_error(capsys, run, prog: str, *said: str) -> str:
    """``run()`` exits with status 2, and stderr is argparse's: usage lines, then one ``PROG: error:`` line."""
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 2, e.value.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: "), err
    assert lines[-1].startswith(f"{prog}: error: "), err
    for s in said:
        assert s in lines[-1], (s, err)
    return lines[-1]


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("job", ["label", "serve"])
def test_a_wrong_review_setting_is_an_argparse_error_with_status_2(job, bad, plain_dir, capsys, monkeypatch):
    run = {"label": _label, "serve": _serve}[job](monkeypatch, ["--review", "min_sharpness=40", "--review", bad])
    line = _usage_error(capsys, run, f"python -m jobs.{job}", "argument --review")
    if bad == "bogus=1":
        assert "bogus" in line and "min_face_size" in line  # the wrong name and the known ones


@pytest.mark.parametrize("bad", ["bogus=1", "min_face_size=abc"])
def test_evaluate_takes_no_review_flag_and_says_so_with_status_2(bad, plain_dir, capsys, monkeypatch):
    _usage_error(capsys, _evaluate(monkeypatch, ["--review", bad]), "python -m jobs.evaluate",
                 "unrecognized arguments: --review")


def test_good_review_settings_still_reach_the_job(plain_dir, monkeypatch):
    from jobs import serve
    from jobs._cli import review_options

    good = ["--review", "min_face_size=30", "--review", "per_output.gender=0.8", "--review", "max_yaw=-3"]
    with pytest.raises(Reached):
        _label(monkeypatch, good)()
    with pytest.raises(Reached):
        _serve(monkeypatch, good)()
    review = review_options(serve.parser().parse_args(["--model", "agr=m.pt", *good]))
    assert review["min_face_size"] == 30 and review["per_output"] == {"gender": 0.8} and review["max_yaw"] == -3


def test_review_options_of_a_namespace_not_from_the_parser_is_an_error_line_and_status_2(capsys):
    from jobs._cli import review_options

    with pytest.raises(SystemExit) as e:
        review_options(argparse.Namespace(review=["bogus=1"]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bogus" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("job, flag, dest", [("label", "--no-fold-bn", "fold_bn"), ("train", "--no-calibrate", "calibrate")])
def test_the_help_of_a_no_flag_says_what_happens_by_default(job, flag, dest):
    import importlib

    mod = importlib.import_module(f"jobs.{job}")
    p = mod.build_parser()
    text = " ".join(p.format_help().split())
    said = text[text.index(f"{flag} ") + len(flag):]
    said = said[:said.index(" --")]  # up to the next flag (or this one, named again in its own help)
    assert "(default: True)" not in said and "by default" in said, said
    base = (["--checkpoint", "m.pt", "--input", "i", "--output", "o"] if job == "label"
            else ["--model", "age_gender_race", "--data", "utkface:data/utk"])
    assert getattr(p.parse_args(base), dest) is True  # the behaviour is unchanged: on unless the flag is given
    assert getattr(p.parse_args([*base, flag]), dest) is False
