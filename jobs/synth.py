"""Write drawn faces with known labels in a dataset's own format.

    python -m jobs.synth --format celeba --n 1000 --out /tmp/synth_celeba --seed 0 [--size 178x218]

See :mod:`facedata.synth` for what is drawn and how each label is set.
"""

from __future__ import annotations

import argparse

from facedata.synth import main


def check_out(argv: list[str] | None = None) -> None:
    """Refuse a relative ``--out`` under ``ray job submit --working-dir``, where it would resolve into Ray's
    unpacked copy of the code (raytasks/reach.py job_dir_problem); the other flags, and every error about them,
    are :func:`facedata.synth.main`'s."""
    from jobs._cli import check_job_paths

    p = argparse.ArgumentParser(prog="python -m jobs.synth", add_help=False)
    p.add_argument("--out")
    known, _ = p.parse_known_args(argv)
    check_job_paths(p, [("--out", known.out)])


if __name__ == "__main__":
    check_out()
    main()
