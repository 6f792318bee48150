"""Write the HTML report of a label output: one self-contained file a person opens in a browser.

    python -m jobs.report OUT [--html REPORT.html] [--max-thumbnails 300] [--seed 0] [--allow-prefix DIR]

``OUT`` is a label job's ``--output`` (a folder or an ``s3://`` prefix). The report (core/report.py;
docs/quality.md, "The report") shows the distribution of every attribute, the confidence, pose and quality
histograms, the rows per review reason with the thresholds, and thumbnails of a sample of the flagged
faces cropped from the original photos, read only under ``--allow-prefix``, or else where the run's summary
says the label run could read when that prefix passes the checks of ``core.report_thumbs.prefix_problem``
(not a root, a top-level, system, hidden or home folder, nor a whole bucket: the summary sits next to the
Parquet and is no more trusted than its paths); the report and a ``note:`` line say which prefix was used.
The Parquet is streamed, so memory does not grow with the rows; a row group over the report's limits is
refused with a message (status 2).
The default ``--html`` is ``OUT/_report.html`` (the ``_`` keeps Parquet readers of ``OUT`` away from it).
An output without labels, or none of whose Parquet files can be read, exits with status 2 and a message; one
without a summary, with some files that cannot be read (cut short by an interrupted run), or from an older
version without some columns, gives a report that says what is missing.
"""

from __future__ import annotations

import argparse
import sys

import storage
from core.report import DEFAULT_MAX_THUMBNAILS, ReportError, label_report
from jobs._cli import check_job_paths, non_negative


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n\n")[0])
    p.add_argument("output", metavar="OUT", help="a label output: folder or s3:// prefix")
    p.add_argument("--html", default=None, help="where to write the report (path or s3://; default OUT/_report.html)")
    p.add_argument("--max-thumbnails", type=int, default=DEFAULT_MAX_THUMBNAILS,
                   help=f"flagged faces shown at most (default {DEFAULT_MAX_THUMBNAILS}; 0: none)")
    p.add_argument("--seed", type=non_negative, default=0,  # numpy's generators take no negative seed
                   help="seed of the sample of flagged faces shown (a whole number >= 0)")
    p.add_argument("--allow-prefix", action="append", default=[], metavar="PREFIX",
                   help="read thumbnails' photos only under this folder or s3:// prefix (repeatable; default: what "
                        "the label run was allowed to read, from its summary, unless that is a root, top-level, "
                        "system, hidden or home folder or a whole bucket)")
    args = p.parse_args(argv)
    # relative paths resolve into Ray's unpacked working_dir under `ray job submit`: refused there (raytasks/reach.py)
    check_job_paths(p, [("OUT", args.output), ("--html", args.html),
                        *(("--allow-prefix", a) for a in args.allow_prefix)])
    if not 0 <= args.max_thumbnails <= 5000:
        p.error("--max-thumbnails must be between 0 and 5000")
    try:
        doc, info = label_report(args.output, args.max_thumbnails, args.seed, tuple(args.allow_prefix))
    except ReportError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    target = args.html or storage.join(args.output, "_report.html")
    try:  # the page's text is escaped to UTF-8 (core/report_html.py esc); backslashreplace is the last guard
        storage.write_bytes(target, doc.encode("utf-8", "backslashreplace"))
    except (OSError, ValueError) as e:  # ValueError: a path the filesystem cannot take (a NUL byte)
        p.exit(2, f"{p.prog}: error: cannot write {_text(target)}: {_text(e)}\n")
    for m in info["missing"] + ([info["photos"]] if info["photos"] else []):
        print(f"note: {_text(m)}", file=sys.stderr)
    print(f"report {_text(target)}: {info['rows']} rows, {info['faces']} faces, {info['flagged']} flagged, "
          f"{info['thumbnails']} thumbnails")
    return {**info, "html": target}


def _text(x) -> str:
    """``x`` printable on any terminal: a path from argv that is not UTF-8 holds lone surrogates."""
    return str(x).encode("utf-8", "backslashreplace").decode("utf-8")


if __name__ == "__main__":
    main()
