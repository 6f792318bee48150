"""Label a folder, bucket prefix or manifest of images with a checkpoint: one Parquet row per face.

    python -m jobs.label --checkpoint s3://bucket/models/dmm.pt --input s3://bucket/photos/ \\
        --output s3://bucket/labels/run-1/

Several models in one pass (one read, decode and detection per photo; a struct column per model):

    python -m jobs.label --checkpoint agr=s3://b/m/agr.pt --checkpoint celeba=s3://b/m/dmm.pt --embedding ...
    python -m jobs.label --model-set s3://b/m/faces-set.yaml ...

The same command runs under ``ray job submit --working-dir . -- python -m jobs.label ...`` (it connects to
the cluster through ``RAY_ADDRESS``) and on a laptop with local folders (it starts a local Ray). Running it
again over the same ``--output`` finishes an interrupted run and adds nothing to a finished one. The rows
go to ``<output>/labels/*.parquet`` (schema: docs/schema.md), the summary to ``<output>/_summary.json``.
Faces are detected and aligned by default (one row per face, one row for an image without a face);
``--faces whole`` treats every image as one aligned face crop (one row per image).
See raytasks/label/job.py for the pipeline, the input rules and how resuming works.
"""

from __future__ import annotations

import argparse
import signal
import sys

from jobs._cli import (
    STOP_STATUS,
    add_face_args,
    add_off_switch,
    add_review_args,
    check_job_paths,
    face_options,
    finite,
    init_ray_stoppably,
    positive,
    review_options,
    seconds,
    stop_on_signals,
)
from raytasks.label import LabelError, LabelSpec, ensure_ray, label
from raytasks.label.job import input_is_manifest
from raytasks.label.labeler import resolve_labeler
from raytasks.reach import path_of

STOPPED = "stopped: the rows committed so far are kept; run the same command again to label the rest"


def build_parser() -> argparse.ArgumentParser:
    d = LabelSpec("", "", "")
    p = argparse.ArgumentParser(prog="python -m jobs.label", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", action="append", metavar="[NAME=]URI",
                   help="checkpoint file (path or s3:// URI); URI#sha256:<hex> pins its content hash: the job and "
                        "every actor refuse any other file. Repeat it to label with several models in one pass "
                        "(one struct column per model, named NAME or the model's architecture; docs/schema.md)")
    g.add_argument("--model-set", metavar="FILE",
                   help="a YAML/JSON file naming a set of checkpoints, with its own name and version "
                        "(core/modelset.py): every model in one pass")
    p.add_argument("--embedding", action="store_true",
                   help="add a 128-D face embedding per face (dlib's face-recognition network: same person when "
                        "less than 0.6 apart)")
    p.add_argument("--input", required=True,
                   help="folder or s3:// prefix (read recursively), or a .parquet/.csv manifest with a 'path' column")
    p.add_argument("--output", required=True, help="folder or s3:// prefix for the Parquet rows and the summary")
    p.add_argument("--batch-size", type=positive(int), default=None,
                   help="images per decode and model batch (default 16 with --faces detect, 64 with whole)")
    p.add_argument("--min-actors", type=positive(int), default=d.min_actors, help="annotator actors at least")
    p.add_argument("--max-actors", type=positive(int), default=None,
                   help="annotator actors at most (default: as many as the cluster's GPUs or CPUs fit)")
    p.add_argument("--gpus-per-actor", type=finite, default=d.gpus_per_actor, help="GPUs per annotator actor (0: CPU)")
    p.add_argument("--cpus-per-actor", type=positive(float), default=d.cpus_per_actor,
                   help="CPUs per CPU annotator actor (also its torch threads)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=d.precision,
                   help="auto: bf16 autocast on a GPU that supports it or a CPU with AVX-512 BF16 or AMX, else fp32")
    p.add_argument("--gpu-decode", action="store_true",
                   help="decode JPEGs on the annotator actor's GPU (torchvision.io.decode_jpeg): photos for detection, or whole "
                        "images at the model's input size; needs --gpus-per-actor > 0")
    p.add_argument("--actor-decode", action="store_true",
                   help="with --faces detect: decode the photos' JPEGs in the model actors on their device (the "
                        "CPU tasks' decoder, DCT scaling included, on a CPU; nvjpeg on a GPU) instead of in CPU tasks, so decoded pixels never cross processes "
                        "(on a 2-core CPU node: 14 %% more photos/s with the slower detector of before 2026-12-05, none "
                        "since: docs/benchmarks.md)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model in each actor (tens of seconds per actor to start; 1.5x measured on a CPU)")
    add_off_switch(p, p, "--no-fold-bn", "fold_bn",
                   help="batch norm is folded into the convolutions by default (the same outputs, faster); "
                        "--no-fold-bn keeps it apart")
    p.add_argument("--max-rows-per-file", type=positive(int), default=d.max_rows_per_file,
                   help="rows per Parquet file at most")
    p.add_argument("--limit", type=positive(int), default=None,
                   help="label at most this many new images in this run (run again without it to finish)")
    p.add_argument("--allow-prefix", action="append", default=[], metavar="PREFIX",
                   help="folder or s3:// prefix the job may read (repeatable); manifest rows outside are error "
                        "rows 'forbidden' (default: the manifest's own folder or bucket prefix, or --input itself)")
    p.add_argument("--throttle", type=seconds, default=0.0, metavar="SECONDS",
                   help="sleep after each model batch (to watch progress, or to interrupt and resume a run)")
    p.add_argument("--progress-every", type=seconds, default=d.progress_every_s, metavar="SECONDS",
                   help="print a progress line this often: images committed of the inputs (%%), images/s over the "
                        "last minutes, time left, rows and errors (0: none)")
    add_face_args(p)
    add_review_args(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    # relative paths resolve into Ray's unpacked working_dir under `ray job submit`: refused there (raytasks/reach.py)
    check_job_paths(p, [*(("--checkpoint", path_of(c, named=True)) for c in args.checkpoint or ()),
                        ("--model-set", args.model_set), ("--input", args.input), ("--output", args.output),
                        *(("--allow-prefix", a) for a in args.allow_prefix)])
    checkpoint = tuple(args.checkpoint or ())
    spec = LabelSpec(checkpoint=checkpoint[0] if len(checkpoint) == 1 else checkpoint, model_set=args.model_set,
                     embedding=args.embedding, input=args.input, output=args.output, batch_size=args.batch_size,
                     min_actors=args.min_actors, max_actors=args.max_actors, gpus_per_actor=args.gpus_per_actor,
                     cpus_per_actor=args.cpus_per_actor, precision=args.precision, gpu_decode=args.gpu_decode,
                     actor_decode=args.actor_decode,
                     compile=args.compile, fold_bn=args.fold_bn,
                     max_rows_per_file=args.max_rows_per_file, limit=args.limit, throttle_s=args.throttle,
                     progress_every_s=args.progress_every,
                     faces=face_options(args), allow_prefix=tuple(args.allow_prefix), review=review_options(args))
    got: dict = {}
    with stop_on_signals(got) as reinstall:  # jobs/_cli.py
        try:
            spec.validate()  # flag errors, an input that is neither a folder nor a manifest, and a checkpoint
            input_is_manifest(spec.input)  # that is not there or not one: before starting Ray
            labeler = resolve_labeler(spec)
            init_ray_stoppably(got, reinstall, ensure_ray)  # Ray's own SIGTERM handler, then ours again
            return label(spec, echo=lambda line: print(line, flush=True), labeler=labeler)
        except LabelError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            _stopped(got.get("signum", signal.SIGINT))


def _stopped(signum: int) -> None:
    """The end of a run stopped by ``signum``: Ray shut down here, so that its own lines (Ray Data's "execution
    failed", its memory warnings) come before :data:`STOPPED`, the last line; then the exit status of that
    signal (:data:`STOP_STATUS`). Every write is committed whole or not at all (Ray Data's commit log): the next
    run of the same command removes the data of writes that never committed and labels their images again."""
    import ray

    for s in STOP_STATUS:  # the shutdown runs to its end
        signal.signal(s, signal.SIG_IGN)
    sys.stdout.flush()
    try:
        ray.shutdown()
    finally:
        print(STOPPED, file=sys.stderr, flush=True)
    raise SystemExit(STOP_STATUS.get(signum, 130))


if __name__ == "__main__":
    main()
