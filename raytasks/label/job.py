"""Bulk labeling with Ray Data: a folder, prefix or manifest of images -> Parquet rows, one per face found.

    label(LabelSpec(checkpoint="s3://b/models/dmm.pt", input="s3://b/photos/", output="s3://b/labels/run-1/"))

The pipeline reads as a chain (the stages: :func:`build_dataset`, raytasks/label/stages.py)::

    read_parquet(paths) -> [Ray's CheckpointFilter] -> map_batches(read_and_decode)       CPU tasks
                        -> map_batches(AnnotatorActor, ActorPoolStrategy(min, max))  detector + every model
                        -> write_parquet(OUTPUT/labels/)                               committed per file

What goes in
    ``--input`` is a folder or ``s3://`` prefix, read recursively, or a manifest: a ``.parquet`` or ``.csv``
    file with a ``path`` column (absolute paths or ``s3://`` URIs; relative ones are resolved against the
    manifest's folder). In a folder, an input image is

    * every file whose extension is an image extension (``storage.IMAGE_EXTENSIONS``), whatever it
      holds: a ``.jpg`` that is empty, text or truncated becomes an error row, not a silent skip;
    * every other file whose first bytes are a JPEG, PNG, GIF, BMP, WebP or TIFF signature (a photo saved
      without extension, ``IMG_0001.JPG.bak``). Other files (text, JSON, videos, our own Parquet) are not
      inputs: they are counted in the summary (``skipped_not_image``, ``skipped_by_extension``) and named,
      by extension, in a line the job prints. Hidden names (``.x``) are skipped, counted and named too.
    * every file of a photo format we do not decode, by extension or signature (HEIC/HEIF, AVIF, JPEG XL,
      JPEG 2000, PSD, camera RAW: ``models.imagebytes.FOREIGN_EXTENSIONS``, ``foreign_format``): an input
      whose row is a ``not_image`` error naming the format, so that a bucket of iPhone photos is not
      "labeled" with nothing said about them.

    A manifest's paths are all inputs, whatever their extension. A manifest's column must be named exactly
    ``path`` (the header is checked by the parser that reads the rows: a CSV's UTF-8 BOM is dropped, ``path ``
    is refused naming the columns); ``--input file:///...`` is the same file as its path. A CSV line with more
    or fewer fields than the header is skipped, counted in the summary (``malformed_lines``, the first few in
    ``malformed_examples``: line number and text) and named in a line the job prints; a file that cannot be
    read as CSV or Parquet at all is refused before the run. Bytes that are not UTF-8 (a CSV, a Parquet
    binary column) are kept with ``\\xNN`` escapes (``facedata.paths.storable``). The folder is listed by streaming
    (``os.scandir`` locally, symlinked folders followed where allowed and each folder once, a folder that
    cannot be listed refusing the run; the S3 ``ListObjectsV2`` paginator for buckets: pyarrow's ``get_file_info`` and Ray's
    ``read_binary_files`` both build the whole listing in one process) into ``OUTPUT/_inputs/part-*.parquet``
    of at most ``LISTING_CHUNK`` paths each, so the driver never holds all paths; a manifest's ``path``
    column is streamed into the same listing, one row per distinct file: ``a.jpg``, ``./a.jpg`` and
    ``/abs/a.jpg`` are one file (``facedata.paths.normalize_path``), labeled once under its first spelling, and the
    summary counts the other rows in ``duplicates``. Either way the pipeline starts from a dataset of paths, so a resumed
    run skips finished images without reading their bytes.

What comes out (the schema is ``Annotator.schema``, documented in docs/schema.md)
    ``OUTPUT/labels/*.parquet``: one row per face found (``--faces whole``: per image), one row for an input with
    no face or an error (an image the detector or a model fails on alone is a ``model_error`` row, and the
    rest of its batch is labeled: core/failures.py), at most ``--max-rows-per-file`` rows per file (bounded).
    ``pandas.read_parquet(OUTPUT)`` reads the labels: pyarrow's dataset discovery ignores the ``_``-prefixed
    bookkeeping next to them: ``_checkpoint/`` (Ray Data's committed row ids), ``_inputs/`` (the listing of a
    folder input), ``_lease/`` (the lease of the run writing it) and ``_summary.json`` (the summary printed
    at the end).

Resumable and idempotent: Ray Data's row-level checkpointing (``DataContext.checkpoint_config``, Ray 2.60)
    with ``id_column="path"``. Every write task first writes a *pending* checkpoint file naming the paths it
    is about to write, then its Parquet file(s), then renames the pending file to *committed*. A run that
    is killed leaves committed files (complete data) and maybe pending ones (data possibly partial: Ray
    writes each Parquet file straight to its final name, so a kill mid-write leaves a truncated one in
    ``labels/``). The next run, before reading anything (its own counts of ``labels/`` included), deletes each
    pending checkpoint's data files and the pending file itself (:func:`recover_output`, by the rule of Ray's
    ``_clean_pending_checkpoints``, which only runs inside the pipeline), loads the committed paths into the
    object store (not the driver), and drops those paths right after the read (a ``CheckpointFilter`` actor), so every path is written
    exactly once across all runs; a run over a finished output writes nothing. On S3 the rename is a copy
    then a delete; a kill between the two leaves both files, and the data file is complete (the commit only
    starts after it is written), so :func:`repair_commit_log` deletes such pending files before Ray's
    cleanup would wrongly delete the data. The checkpoint is kept after success
    (``delete_checkpoint_on_success=False``): it is what makes a second run add nothing. The identity of a
    row is its path (a manifest's duplicates are dropped, see above); a resumed run lists a file that is labeled
    already under another spelling (a manifest rewritten with absolute paths, a folder given through a symlink:
    ``output.input_identity``) under the spelling of its rows (``output.labeled_spellings``), so the filter drops
    it, and files added to a folder after a run are
    labeled by the next run over the same output. Two runs on one output at the same time are refused: a run
    holds a lease on ``OUTPUT/_lease/`` (raytasks/label/lease.py: created atomically, renewed while it runs, taken
    over once expired when a run was killed; a write task checks it again at commit time, and a run taking over
    an expired lease waits its ttl first: docs/deploy.md). ``complete`` in the summary means every input of the
    listing has a row (by path). The resolved ``--review`` thresholds are recorded in ``_settings.json``; a rerun
    with other ones is refused, as one with another checkpoint or detector.

    Ray's CheckpointFilter actor (present when the output already has rows) reserves one CPU; with CPU
    annotator actors the pipeline therefore needs their CPUs plus one for the decode and write tasks plus
    one for that filter (:func:`resolve_pool`). On a laptop the local Ray gets ``max(4, cores)`` logical CPUs.

Precision and devices: ``Annotator`` (core/annotator.py) loads the checkpoint(s) once per actor and runs
    ``inference_mode``, ``channels_last`` and bf16 autocast (``--precision auto``: bf16 on GPUs that support it and on CPUs
    that compute it natively, core/runner.py ``cpu_has_bf16``; ``fp32`` turns it off). ``--gpu-decode`` moves JPEG decoding into the GPU actor
    (``torchvision.io.decode_jpeg(device="cuda")``): photos for detection (``gpu_decode_photos``) or whole
    images at the model's input size (``gpu_decode_batch``), raytasks/label/gpu_decode.py; it needs
    ``--gpus-per-actor > 0`` and fails with a clear error otherwise. The decode functions are tested on the
    CPU (decode_jpeg and the resize in torch) and timed on a GPU by bench/bench_gpu_photos.py.

One output holds the rows of one checkpoint: a run refuses an output whose rows came from another one.

Several models in one pass (core/modelset.py): ``--checkpoint`` given several times (``NAME=URI``), or
``--model-set FILE``, and/or ``--embedding``. Each photo is still listed, read, decoded and searched for faces
once; one actor holds every model of the set (and the embedding network) on its device, aligns each face once
per distinct face template and runs every model on its crop: one row per face with a struct column per model.
Batch sizes: ``--batch-size`` photos per decode task and per actor call; each model then runs all faces of
those photos in forward passes of at most 256 faces (``Annotator``'s ``max_batch``). With ``--faces whole`` the
decode tasks decode each image once per distinct preprocessing of the set. The rows' ``checkpoint`` is the
set's identity, so an output made with one set refuses another (a changed member, name, version or embedding).

What may be read: ``--allow-prefix`` (repeatable; default: the manifest's own folder or bucket prefix, or the
input folder or prefix). A manifest row outside every allowed prefix (``/etc/passwd``, ``/proc/self/environ``,
``../../x``, another bucket, a symlink out of the folder) is an error row ``forbidden`` that is the same
whether or not the file exists; the job never touches it with its credentials. The listing of a folder
does not either: a symlink out of it without an image extension is not opened to look for a signature
(``facedata.paths.open_local`` with the same prefixes); it is an input, whose row is ``forbidden``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import time

import pyarrow as pa
import pyarrow.fs as pafs

import storage
from facedata.inputs import InputError, check_manifest, write_listing, write_manifest_listing
from facedata.paths import default_allow_prefix, is_manifest, normalize_path
from raytasks.label.cluster import check_decode_fits, ensure_ray, resolve_pool
from raytasks.label.labeler import Labeler, resolve_labeler
from raytasks.label.output import (
    all_labeled,
    clean_uncommitted,
    labeled_spellings,
    output_paths,
    output_provenance,
    output_stats,
    read_settings,
    repair_commit_log,
    unlabeled_inputs,
)
from raytasks.label.progress import watch_label
from raytasks.label.spec import LabelError, LabelSpec
from raytasks.label.stages import build_dataset, fenced_parquet_sink
from raytasks.label.summary import write_summary
from raytasks.reach import check_reachable

log = logging.getLogger(__name__)


def label(spec: LabelSpec, echo=print, labeler: Labeler | None = None) -> dict:
    """Run the label job (see the module docstring); returns the summary, also written to
    ``OUTPUT/_summary.json``. Holds a lease on ``--output`` for the whole run (raytasks/label/lease.py): a second
    live run on the same output is refused, naming the holder. ``labeler``: ``resolve_labeler(spec)`` when the
    caller has read the checkpoints already (jobs/label.py does, before Ray starts), else they are read here,
    after the checks that read nothing but the lease and before the lease is taken."""
    from botocore.exceptions import BotoCoreError, ClientError

    from raytasks.label.lease import Lease, LeaseError, refuse_if_held

    spec.validate()
    # one spelling of the output from here on (``file://`` and relative paths made absolute): the lease, the
    # fence in the write tasks and every writer see the same folder
    spec = dataclasses.replace(spec, output=storage.to_uri(*storage.filesystem(spec.output)),
                               allow_prefix=tuple(spec.allow_prefix) or (default_allow_prefix(spec.input),))
    try:
        refuse_if_held(spec.output)  # a live run's output: refused at once, before Ray starts (a read only)
    except LeaseError as e:
        raise LabelError(str(e)) from None
    ensure_ray()
    # before anything is read or written (the lease too): an output on this machine's disk is refused where the
    # cluster runs the job's tasks on other nodes, inputs there are warned about (raytasks/reach.py); every row
    # is read under an allowed prefix
    check_reachable([("--output", spec.output)], [("the input files under", p) for p in spec.allow_prefix],
                    LabelError, echo)
    labeler = labeler or resolve_labeler(spec)  # every checkpoint read and hashed: a bad one fails before any write
    lease = Lease(spec.output)
    try:
        lease.acquire()
    except LeaseError as e:
        raise LabelError(str(e)) from None
    except (OSError, BotoCoreError, ClientError) as e:  # no such bucket, a file in the path, no access
        raise LabelError(f"--output {spec.output}: the run's lease cannot be written there "
                         f"({type(e).__name__}: {e})") from None
    try:
        grace = lease.takeover_grace_s()
        if grace:  # the stalled run's in-flight writes end (commit-time fence) before recover_output looks
            echo(f"took over the lease of a run that stopped renewing it (owner {lease.taken_from.get('owner')}, "
                 f"host {lease.taken_from.get('host')}): waiting {grace:.0f} s for its in-flight writes to end")
            time.sleep(grace)
        summary = _label(spec, labeler, echo, lease.fence())
    except InputError as e:
        if isinstance(e, LabelError):
            raise
        raise LabelError(str(e)) from None
    except Exception as e:
        if "LeaseLost" in f"{type(e).__name__}: {e}":  # raised in a write task, wrapped by Ray
            raise LabelError(f"this run lost its lease on {spec.output} and stopped writing (it stalled past its "
                             "expiry, or another run took over): run the same command again to finish") from None
        raise
    finally:
        try:
            lease.release()
        except Exception as e:  # noqa: BLE001 - never raised over the run's own outcome (or its error)
            log.warning("could not release the lease on %s (%s: %s): it expires within %g s, and a run started "
                        "before then is refused until it does", spec.output, type(e).__name__, e, lease.ttl_s)
    if lease.lost:
        raise LabelError(f"this run lost its lease on {spec.output} (stalled past its expiry, another run took "
                         "over): its rows may overlap with that run's; run the same command again to check")
    return summary


def _label(spec: LabelSpec, labeler: Labeler, echo=print, fence=None) -> dict:
    """The run itself, on a spec :func:`label` validated and holding the output's lease (``fence``)."""
    start = time.perf_counter()
    options = labeler.options
    out = output_paths(spec.output)
    # before anything reads labels/ (a file cut by a kill mid-write is unreadable), and before ``resuming``,
    # so that a log holding only pending files of a killed first run is not taken for a resumed one
    recover_output(out, echo)
    commits_fs, commits_path = storage.filesystem(out["commits"])
    resuming = any(i.type == pafs.FileType.File for i in
                   commits_fs.get_file_info(pafs.FileSelector(commits_path, allow_not_found=True)))
    pool = resolve_pool(spec, resuming, warn=echo)
    check_decode_fits(spec, options.to_dict(), labeler.pre_dicts, warn=echo)

    base = manifest_base(spec.input) if is_manifest(spec.input) else None
    listing = _list_inputs(spec, out, base)
    review = spec.review_thresholds().resolve(labeler.preprocessings, options.detector_config().network).to_dict()
    review = json.loads(json.dumps(review))  # as _settings.json holds it
    before = _read_output(output_stats, out)
    _check_same_labeling(spec, out, before.rows, labeler, review)
    _echo_start(spec, listing, before.images, labeler, pool, echo)

    if before.images >= listing.inputs and _read_output(all_labeled, out, out["inputs"]):
        echo("every input is labeled already: nothing to run")
    else:  # a line of the committed rows every --progress-every seconds meanwhile (raytasks/label/progress.py)
        with watch_label(spec, listing.inputs, before.images, echo):
            _run_pipeline(spec, labeler, base, pool, fence, out, commits_fs, commits_path)

    seconds = time.perf_counter() - start
    after = _read_output(output_stats, out)
    unlabeled = _read_output(unlabeled_inputs, out, out["inputs"])  # by path: rows of removed files do not count
    return write_summary(spec, out, labeler, listing, review, before, after, unlabeled, seconds, echo)


def input_is_manifest(uri: str) -> bool:
    """True for a .parquet/.csv manifest, False for a folder or prefix; any other ``--input`` is a
    :class:`LabelError` (jobs/label.py asks before Ray starts, :func:`_list_inputs` when it lists)."""
    if is_manifest(uri):
        return True
    try:
        if storage.is_dir(uri):
            return False
    except OSError as e:  # pyarrow's S3 error past its retries (throttling, the endpoint gone, no access)
        raise LabelError(f"cannot list --input {uri} ({e}); run the same command again (it resumes where this run "
                         "stopped)") from None
    raise LabelError(f"--input {uri} is neither a folder/prefix nor a .parquet/.csv manifest")


def _list_inputs(spec: LabelSpec, out: dict, base: str | None):
    """The listing of ``--input`` (a manifest's rows or a folder's files) written to ``OUTPUT/_inputs/``;
    refused when it holds no image."""
    # a file labeled before under another spelling is listed under that one, so the resume matches it
    respell = _read_output(labeled_spellings, out, base)
    if input_is_manifest(spec.input):
        check_manifest(spec.input)
        listing = write_manifest_listing(spec.input, out["inputs"], base, respell=respell)  # one row per file
    else:
        listing = write_listing(spec.input, out["inputs"], allow=spec.allow_prefix, respell=respell)
    if listing.inputs == 0:
        raise LabelError(f"no images in {spec.input} ({listing.files} files, none an image"
                         + (f"; {listing.malformed_text()}" if listing.malformed_lines else "") + ")")
    return listing


def _check_same_labeling(spec: LabelSpec, out: dict, rows: int, labeler: Labeler, review: dict) -> None:
    """Refuses an output whose ``rows`` were labeled otherwise (another checkpoint or set, detector or review
    thresholds), then records this run's review thresholds in ``_settings.json``."""
    settings = read_settings(out["settings"])
    if rows:
        previous, previous_detectors = _read_output(output_provenance, out)
        if previous != {labeler.identity}:
            raise LabelError(f"{spec.output} holds rows of checkpoint(s) {', '.join(sorted(map(str, previous)))}; "
                             f"{labeler.checkpoint_name} is {labeler.identity}: label with another checkpoint (or "
                             "set) into another --output")
        if previous_detectors != {labeler.detector}:
            raise LabelError(f"{spec.output} holds rows whose faces were found by "
                             f"{', '.join(map(repr, sorted(map(str, previous_detectors))))}; this run finds them by "
                             f"{labeler.detector!r}: use the same --faces and detector settings, or another --output")
        previous_review = (settings or {}).get("review_thresholds")
        if previous_review is not None and previous_review != review:
            raise LabelError(f"{spec.output} holds rows flagged for review with the thresholds "
                             f"{json.dumps(previous_review, sort_keys=True)}; this run's are "
                             f"{json.dumps(review, sort_keys=True)}: use the same --review settings, or another "
                             "--output")
    if (settings or {}).get("review_thresholds") != review:  # recorded before any row of this run is written
        storage.write_bytes(out["settings"], (json.dumps({**(settings or {}), "review_thresholds": review},
                                                         indent=2) + "\n").encode())


def _echo_start(spec: LabelSpec, listing, images_before: int, labeler: Labeler, pool, echo) -> None:
    """The run's first lines: what it labels, with what, and the files of the input it does not label."""
    echo(f"labeling {spec.input}: {listing.inputs} images ({images_before} already labeled in {spec.output}) with "
         f"{labeler.what}, faces: {labeler.options.mode}, annotator actors {pool[0]}..{pool[1]}")
    if listing.skipped_not_image:
        echo(f"{listing.skipped_text()}: only images are labeled (a HEIC, AVIF or RAW photo is an input whose "
             "row names its format)")
    if listing.skipped_hidden:
        echo(f"{listing.hidden_text()}: not labeled; rename or move any photos among them to label them")
    if listing.malformed_lines:
        echo(f"{listing.malformed_text()}: fix them and run again to label them too")


def manifest_base(manifest: str) -> str:
    """The folder a manifest's relative paths are resolved against: its own. ``normalize_path`` strips
    ``file://`` as ``default_allow_prefix`` does, so that folder is the default allowed prefix; with
    ``os.path.abspath`` alone, ``file:///m/list.csv`` gave ``$PWD/file:/m`` and every relative row was
    ``forbidden``."""
    return posixpath.dirname(manifest) if storage.is_s3(manifest) else os.path.dirname(normalize_path(manifest))


def recover_output(out: dict, echo=print) -> None:
    """Finish or undo what a killed run left in ``out`` (:func:`output_paths`): first the S3 commits killed
    between their copy and their delete (complete data, :func:`repair_commit_log`), then the writes that never
    committed (:func:`clean_uncommitted`). Called with the run's lease held, before ``labels/`` is read."""
    removed = repair_commit_log(out["commits"])
    if removed:
        echo(f"repaired {removed} commit file(s) left by an interrupted commit")
    pending, deleted = clean_uncommitted(out["commits"], out["labels"])
    if pending:
        echo(f"removed {deleted} data file(s) of {pending} write(s) that a killed run never committed: "
             "their images are labeled again")


def _read_output(read, out: dict, *args):
    """``read(*args, labels)`` (the counts, the provenance, ...) with a file under ``labels/`` that is not
    Parquet (one no pending commit names, so :func:`recover_output` kept it) as a :class:`LabelError`."""
    try:
        return read(*args, out["labels"])
    except pa.ArrowInvalid as e:  # not OSError: a storage error is not a bad file, and says so itself
        raise LabelError(f"cannot read the rows already in {out['labels']} ({e}): a file there is not a complete "
                         "Parquet file written by this job; move it out of that folder and run again") from None


def _run_pipeline(spec, labeler, base, pool, fence, out, commits_fs, commits_path) -> None:
    """The Ray Data pipeline over the listing, committed through Ray Data's checkpoint log (resumable)."""
    import ray
    from ray.data.checkpoint import CheckpointConfig

    ctx = ray.data.DataContext.get_current()
    labels_fs, labels_path = storage.filesystem(out["labels"])
    old_config, old_v2 = ctx.checkpoint_config, ctx.use_datasource_v2
    ctx.checkpoint_config = CheckpointConfig(id_column="path", checkpoint_path=commits_path,
                                             delete_checkpoint_on_success=False, override_filesystem=commits_fs)
    # Ray 2.60's V2 Parquet reader spends 5-10 s in its ListFiles step per dataset here (measured: a
    # read_parquet + map_batches of one small file takes 8-10 s with V2, 0.2 s with V1); our reads are a
    # few small path files, and the checkpoint filter supports both.
    ctx.use_datasource_v2 = False
    try:
        in_fs, in_path = storage.filesystem(out["inputs"])
        paths_ds = ray.data.read_parquet(in_path, filesystem=in_fs).select_columns(["path"])
        ds = build_dataset(spec, labeler, paths_ds, base, pool, fence)
        min_rows = max(1, spec.max_rows_per_file // 2)
        if fence is None:
            ds.write_parquet(labels_path, filesystem=labels_fs, max_rows_per_file=spec.max_rows_per_file,
                             min_rows_per_file=min_rows)
        else:  # the lease checked again at commit time (stages.commit_fence)
            ds.write_datasink(fenced_parquet_sink(labels_path, labels_fs, min_rows, spec.max_rows_per_file,
                                                  getattr(ds, "_uuid", None), fence, commits_fs, commits_path))
    finally:
        ctx.checkpoint_config, ctx.use_datasource_v2 = old_config, old_v2
