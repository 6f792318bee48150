"""The end of a label run (raytasks/label/job.py): its summary, written to ``OUTPUT/_summary.json`` and told in
the lines the job prints last."""

from __future__ import annotations

import json

import storage
from facedata.paths import is_manifest
from raytasks.label.labeler import Labeler
from raytasks.label.spec import LabelSpec


def write_summary(spec: LabelSpec, out: dict, labeler: Labeler, listing, review: dict, before, after,
                  unlabeled: int, seconds: float, echo=print) -> dict:
    """The run's summary, from the output's counts ``before`` and ``after`` it (``output.output_stats``), the
    listing of its inputs and its inputs not labeled yet; written to ``out["summary"]``, told in the run's last
    lines and returned."""
    options = labeler.options
    inputs = listing.inputs
    written = after.images - before.images
    folder = not is_manifest(spec.input)  # a folder's listing counts what it skipped, a manifest's its bad lines
    summary = {
        "input": spec.input, "allow_prefix": list(spec.allow_prefix), "output": spec.output, "labels": out["labels"],
        "checkpoint": labeler.checkpoint_name, "model": labeler.model_name, "checkpoint_hash": labeler.identity,
        "models": labeler.members,
        "faces_mode": options.mode, "detector": labeler.detector,
        "precision": spec.precision, "inputs": inputs,
        "files_listed": listing.files if folder else None,
        "skipped_not_image": listing.skipped_not_image if folder else None,
        "skipped_by_extension": listing.skipped_extensions() if folder else None,
        "skipped_hidden": listing.skipped_hidden if folder else None,
        "hidden_examples": listing.hidden_examples if folder else None,
        "duplicates": listing.duplicates,
        "malformed_lines": listing.malformed_lines if not folder else None,
        "malformed_examples": listing.malformed_examples if not folder else None,
        "images_before": before.images, "images_written": written, "images_total": after.images,
        "ok_total": after.ok_images, "errors_by_kind": dict(sorted(after.errors.items())),
        "faces_total": after.faces if options.detect else None,
        "images_without_faces": after.without_faces if options.detect else None,
        "rows_before": before.rows, "rows_written": after.rows - before.rows, "rows_total": after.rows,
        "faces_dropped": after.dropped if options.detect else None,
        "review_rows": after.review, "review_by_reason": dict(after.reasons.most_common()),
        "review_thresholds": review,
        "inputs_unlabeled": unlabeled, "complete": unlabeled == 0, "seconds": round(seconds, 3),
        "images_per_s": round(written / seconds, 2) if seconds > 0 else None,
        "faces_per_s": round((after.faces - before.faces) / seconds, 2) if seconds > 0 and options.detect else None,
    }
    storage.write_bytes(out["summary"], (json.dumps(summary, indent=2) + "\n").encode())
    errors = ", ".join(f"{k} {v}" for k, v in summary["errors_by_kind"].items()) or "none"
    found = (f"{after.faces} faces ({after.without_faces} images without a face), " if options.detect else "")
    echo(f"labeled {written} images in {seconds:.1f} s ({summary['images_per_s']} images/s); output holds "
         f"{after.rows} rows for {after.images} of {inputs} inputs: {found}{after.ok_images} images read, "
         f"errors: {errors}")
    if after.review:
        top = ", ".join(f"{k} {v}" for k, v in after.reasons.most_common(6))
        echo(f"{after.review} rows flagged for review ({top}); the rows to look at: "
             f"SELECT * FROM '{out['labels']}/*.parquet' WHERE review (DuckDB), or python -m jobs.report")
    if unlabeled:
        echo(f"{unlabeled} inputs are not labeled yet: run the same command again to finish")
    echo(f"summary: {out['summary']}")
    return summary
