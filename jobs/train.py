"""Train a model of the zoo with Ray Train (DDP over ``--workers``), resumable and fault tolerant.

    python -m jobs.train --model dmm_cnn --data celeba:s3://bucket/celeba --workers 4 --gpu \\
        --storage s3://bucket/runs --name celeba-dmm --output s3://bucket/models/dmm.pt

The same command runs under ``ray job submit --working-dir . -- python -m jobs.train ...`` on a cluster
and on a laptop, where it starts a local Ray with CPU workers. One line per epoch; the metric history
(``history.json``/``.csv``), the checkpoints and ``curves.png`` go to ``<storage>/<name>/``; the best
checkpoint is exported in the project's format to ``--output``, whose URI is the last line printed.
See raytasks/train/job.py for how training, validation, checkpoints and recovery work.

Recipes (models/recipes.py, docs/results.md "Recipes"). For a model and data format with a measured recipe
(``age_gender_race`` on ``utkface``: a frozen warm-up, then two fine-tuning stages), the job runs that
recipe's stages in order, each a run in ``<storage>/<name>/stage-<k>-<stage>/`` initialised from the
previous stage's best checkpoint (raytasks/train/stages.py), prints it at start and records it in the
exported checkpoint. ``--recipe NAME`` chooses one, ``--recipe none`` trains one run with the model's
defaults (its paper's ``model.recipe``). A flag given replaces that value in every stage; a value no stage
and no flag sets is the model's default. ``--init-from`` is the first stage's start. A recipe may say how its
images become faces (``--faces`` and the detector's settings it was measured with); the face flags replace those.

Running the same command again resumes: finished stages are skipped, the interrupted one continues from its
last checkpoint (give a larger ``--epochs`` to extend the last one); the optimizer and LR schedule then
continue from the checkpoint's state. With a recipe, a rerun with other values (``--lr``, a model argument,
...) is refused: use another ``--name``; without one, ``--lr`` and the like only apply to a new run.

The attention network's two stages (TMTL first, then the attention model initialised from it)::

    python -m jobs.train --model task_attention --model-arg attention=false --data celeba:DIR \
        --name tmtl --output tmtl.pt
    python -m jobs.train --model task_attention --init-from tmtl.pt --data celeba:DIR --name attention
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from facedata.datasets import parse_spec
from jobs._cli import (
    add_face_args,
    add_off_switch,
    check_job_paths,
    data_path,
    face_options,
    finite,
    flag,
    key_value,
    non_negative,
    positive,
)
from models.recipes import RECORD_KEY, TRAIN_FACE_MODES, TrainingRecipe, get_recipe, recipe_for, record_lines
from raytasks.reach import init_ray, joined_address, path_of
from raytasks.train import TrainError, TrainSpec
from raytasks.train.job import ray_removed_the_workers
from raytasks.train.stages import RecipeRun, summary_metrics


def _fail_at(text: str) -> tuple[int, int, int, int]:
    """``RANK:EPOCH[:STEP][@STAGE]`` -> ``(rank, epoch, step, stage)``."""
    where, _, stage = text.partition("@")
    try:
        parts = [int(x) for x in where.split(":")] + [int(stage or 1)]
    except ValueError:
        parts = []
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(f"--inject-failure expects RANK:EPOCH[:STEP][@STAGE], got {text!r}")
    return (parts[0], parts[1], parts[2] if len(parts) == 4 else 1, parts[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model name (models.list_models())")
    p.add_argument("--data", required=True, action="append", metavar="FORMAT:URI",
                   help="e.g. celeba:s3://bucket/celeba or utkface:DIR; give it several times to train on several "
                        "data sets at once, each filling the labels it has (facedata/datasets/mixed.py)")
    p.add_argument("--storage", default="runs", help="folder or s3:// prefix for checkpoints and history")
    p.add_argument("--name", default=None, help="run name (default MODEL-FORMAT); the same name resumes")
    p.add_argument("--output", default=None, help="where the best checkpoint goes (default <storage>/<name>/best.pt)")
    p.add_argument("--recipe", default=None, metavar="NAME",
                   help="the recipe to train (models/recipes.py); default: the one measured for the model and data "
                        "format, if any; none: one run with the model's defaults")
    g = p.add_argument_group("scaling")
    g.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP processes)")
    g.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL, bf16 autocast, channels_last)")
    g.add_argument("--cpus-per-worker", type=positive(float), default=1.0)
    g.add_argument("--threads", type=positive(int), default=None, help="torch threads per worker (default: its CPUs)")
    g.add_argument("--no-amp", action="store_true", help="fp32 on GPUs instead of bf16 autocast (bf16 only where the GPU computes it natively: "
                   "compute capability 8.0 and up; a V100 or T4 trains in fp32)")
    g.add_argument("--max-failures", type=int, default=2,
                   help="worker-group restarts from the last checkpoint; also, the times the job resumes a run that "
                        "Ray Train itself ended (its workers' placement group removed under them), as the same "
                        "command run again would")
    g.add_argument("--worker-logs", action="store_true",
                   help="forward the workers' and Ray Data's output here (it always stays in the Ray logs)")
    g.add_argument("--keep", type=positive(int), default=2, help="checkpoints kept (best by the primary metric)")
    r = p.add_argument_group("training values (default: the recipe's, else the model's paper recipe; a flag "
                             "replaces the value in every stage)")
    r.add_argument("--epochs", type=positive(int))
    r.add_argument("--batch-size", type=positive(int), help="global batch per step, split over the workers")
    r.add_argument("--lr", type=finite)
    r.add_argument("--optimizer", choices=("sgd", "adam", "adamw"))
    r.add_argument("--weight-decay", type=finite)
    r.add_argument("--schedule", choices=("none", "step", "milestones", "plateau", "hard_sharing"))
    r.add_argument("--patience", type=non_negative,
                   help="early stopping after this many epochs without improvement (0: off)")
    r.add_argument("--validate-every", type=non_negative, help="also validate every N steps (DMM-CNN's P; 0: off)")
    r.add_argument("--average-epochs", type=positive(int), help="validate and save the mean of the weights of "
                   "the last N epochs while training goes on from the latest (core/averaging.py; 1: off)")
    r.add_argument("--label-smoothing", type=finite, metavar="EPS",
                   help="train every categorical output (gender, race, smile, eyeglasses) against its label mixed "
                        "with EPS of the uniform distribution (0: off, the default; models/base.py Recipe); "
                        "validation and evaluation read the plain loss")
    r.add_argument("--no-augment", action="store_true", help="train without the recipe's augmentation")
    r.add_argument("--align-jitter", type=finite, default=None, metavar="K",
                   help="add random similarity jitter of the detector's alignment spread times K (1: scale 7 %%, "
                        "3 degrees, 3 %% shift), on the device in the aligned frame (core/augment.py); the same as "
                        "--augment align_jitter=K")
    r.add_argument("--augment", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="set one augmentation of the recipe, on the device in the aligned frame: hflip, rotation, "
                        "shift, scale, brightness, contrast, saturation, hue, blur, blur_sigma, erase, erase_area, "
                        "align_jitter, "
                        "color_jitter (docs/faces.md, 'Training on photos'); never applied in evaluation")
    m = p.add_argument_group("model")
    m.add_argument("--image-size", type=positive(int), help="input size (the model's image_size argument)")
    m.add_argument("--num-landmarks", type=int, help="landmark points (DMM-CNN; default from the data)")
    m.add_argument("--model-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any other constructor argument (value parsed as JSON when it can be)")
    m.add_argument("--init-from", default=None, help="initialise from a checkpoint (e.g. attention from TMTL); "
                   "with a recipe, its first stage. Its content hash is checked; URI#sha256:<hex> pins it")
    m.add_argument("--find-unused-parameters", action="store_true", help="DDP option for models with idle branches")
    m.add_argument("--template-images", type=int, default=64,
                   help="training images the face template is measured on (docs/faces.md); 0: keep the default")
    m.add_argument("--template", choices=("measured", "canonical"), default=None,
                   help="the face template: measured on --template-images training images (where the data set's "
                        "crops put a face), or the canonical one of the input size. Default: measured with --faces "
                        "whole, canonical with detect and landmarks (a photo's face sits anywhere; for a data set "
                        "of crops, detect with measured keeps its framing: docs/faces.md, 'Training on photos')")
    add_face_args(p, default_mode=None, modes=TRAIN_FACE_MODES, faces_help=(
        "how each training and validation image becomes a face: detect (the detector of label and serve, the "
        "best face or the one a manifest's face_box / face_points names, aligned to the canonical template; "
        "detections cached under --storage), landmarks (the data's own 5 points instead of the detector), "
        "whole (the image is the face crop). Default: the recipe's where it names one (with its detector "
        "settings, which the face flags replace), else the format's (faces/trainfaces.py FORMAT_FACES): detect "
        "for a manifest, genki4k, scut_fbp5500 and a mix; whole for celeba and utkface (docs/faces.md, 'Training "
        "on photos')"))
    q = p.add_argument_group("quick runs")
    q.add_argument("--seed", type=int, default=0,
                   help="seed of the initialisation, the data order, the augmentation and --limit's draw")
    q.add_argument("--split-seed", type=int, default=0,
                   help="seed of the train / val / test split of data without one of its own (CelebA without its "
                        "partition file, UTKFace, a manifest without a split column); the checkpoint records it "
                        "and jobs.evaluate reads the same split by default")
    q.add_argument("--limit", type=positive(int), help="at most this many training images, drawn at random "
                   "with --seed")
    add_off_switch(p, q, "--no-calibrate", "calibrate",
                   help="by default the best checkpoint is exported with its temperatures fitted on the validation "
                        "split (models/calibration.py); --no-calibrate exports it as trained")
    q.add_argument("--val-limit", type=positive(int), help="at most this many validation images, drawn at "
                   "random with --seed")
    q.add_argument("--steps-per-epoch", type=positive(int), help="cap on optimisation steps per epoch")
    q.add_argument("--inject-failure", type=_fail_at, default=None, metavar="RANK:EPOCH[:STEP][@STAGE]",
                   help="testing: that worker process exits once at that step of that recipe stage (default 1; "
                        "marker file in the run folder)")
    return p


def spec_from_args(args: argparse.Namespace) -> TrainSpec:
    model_kwargs = dict(args.model_arg)
    if args.image_size is not None:
        model_kwargs["image_size"] = args.image_size
    if args.num_landmarks is not None:
        model_kwargs["num_landmarks"] = args.num_landmarks
    recipe = {k: v for k, v in {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                                "optimizer": args.optimizer, "weight_decay": args.weight_decay,
                                "schedule": args.schedule, "average_epochs": args.average_epochs,
                                "label_smoothing": args.label_smoothing}.items()
              if v is not None}
    if args.patience is not None:
        recipe["early_stopping_patience"] = args.patience or None
    if args.validate_every is not None:
        recipe["validate_every"] = args.validate_every or None
    if args.no_augment:
        recipe["augment"] = {}

    data = args.data[0] if len(args.data) == 1 else tuple(args.data)  # several: one mixed data set
    fmt = data_format(args)
    return TrainSpec(
        model=args.model, data=data, storage=args.storage, name=args.name or f"{args.model}-{fmt}",
        output=args.output, model_kwargs=model_kwargs, recipe=recipe, workers=args.workers,
        use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker, threads=args.threads, amp=not args.no_amp,
        seed=args.seed, split_seed=args.split_seed, max_failures=args.max_failures, keep=args.keep, limit=args.limit,
        val_limit=args.val_limit, steps_per_epoch=args.steps_per_epoch, init_from=args.init_from,
        find_unused_parameters=args.find_unused_parameters,
        fail_at=args.inject_failure[:3] if args.inject_failure else None,
        fail_stage=args.inject_failure[3] if args.inject_failure else 1,
        template_images=args.template_images, template=args.template, align_jitter=args.align_jitter, calibrate=args.calibrate,
        augment=dict(args.augment), faces=args.faces,
        face_options={k: v for k, v in face_options(args).items() if k != "mode"},
    )


def data_format(args: argparse.Namespace) -> str:
    """The FORMAT of ``--data`` as the reader reads it (``UTKFace:DIR`` is ``utkface``: its recipe and run
    name), or ``mixed`` for several (no recipe is written for a mix). A spec that is not FORMAT:URI gives its
    text before the colon; reading it then says what is wrong."""
    if len(args.data) != 1:
        return "mixed"
    try:
        return parse_spec(args.data[0])[0]
    except ValueError:
        return args.data[0].partition(":")[0].strip()


def choose_recipe(args: argparse.Namespace) -> TrainingRecipe | None:
    """``--recipe``: a recipe by name, ``none``, or (left out) the one for the model and data format."""
    if args.recipe == "none":
        return None
    if args.recipe is None:
        return recipe_for(args.model, data_format(args))
    recipe = get_recipe(args.recipe)
    if recipe.model != args.model:
        raise ValueError(f"recipe {recipe.name} trains {recipe.model}, not {args.model}")
    return recipe


def main(argv: list[str] | None = None):
    parser = build_parser()
    args = parser.parse_args(argv)
    # under `ray job submit --working-dir`, `--storage runs` would resolve into Ray's unpacked copy of the code
    # (raytasks/reach.py job_dir_problem): refused there, before anything is read or written
    check_job_paths(parser, [*(("--data", data_path(d)) for d in args.data), flag(parser, args, "storage", "--storage"),
                             ("--output", args.output), ("--init-from", path_of(args.init_from))])
    spec = spec_from_args(args)
    if not spec.storage.startswith("s3://"):
        spec.storage = os.path.abspath(spec.storage)  # Ray Train wants an absolute local path
    import ray

    # a local Ray gets enough logical CPUs for the workers plus Ray Data's decoding
    cpus = max(os.cpu_count() or 1, math.ceil(spec.workers * spec.cpus_per_worker) + 1)
    if not ray.is_initialized() and joined_address():
        # a cluster (RAY_ADDRESS, or the one `ray start` runs on this machine): connected first, so that prepare()
        # knows where its tasks run (raytasks/reach.py) before it writes to --storage; a local Ray starts after
        # prepare(), so that bad flags or data fail before it
        init_ray(cpus, join=True, log_to_driver=args.worker_logs)
        ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        recipe = choose_recipe(args)
        if recipe is None and args.recipe is None:
            print(f"no recipe for {args.model} on {data_format(args)} data: one run with the model's "
                  f"defaults and the flags")
    except (TrainError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    job = _prepared_run(spec, recipe)  # bad flags or data fail here, before a local Ray starts
    if not ray.is_initialized():
        init_ray(cpus, log_to_driver=args.worker_logs)  # (a cluster `ray start` began meanwhile is joined)
        ray.data.DataContext.get_current().enable_progress_bars = False
    outcome = _run_resuming_ray_faults(job, spec, recipe)
    for line in record_lines({RECORD_KEY: outcome.recipe}):
        print(line)
    # per-output metrics only; CelebA's 40 per-attribute accuracies (capitalised names) are in history.json
    shown = " ".join(f"{k}={v:.4f}" for k, v in summary_metrics(outcome.best_metrics).items())
    print(f"best epoch {outcome.best_epoch}{' of the last stage' if outcome.recipe else ''}: {shown}")
    print(f"history {outcome.run_uri}/history.json, curves {outcome.curves}")
    print(outcome.output, flush=True)
    return outcome


def _prepared_run(spec: TrainSpec, recipe: TrainingRecipe | None) -> RecipeRun:
    """The run of ``spec``, prepared (its data read, its run folder checked); an error ends the job (status 1)."""
    try:
        job = RecipeRun(spec, recipe)
        job.prepare()
    except (TrainError, ValueError, OSError) as e:  # a data set's read: any failure is one (core/dataread.py)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    return job


def _run_resuming_ray_faults(job: RecipeRun, spec: TrainSpec, recipe: TrainingRecipe | None):
    """``job.run()``; a run that Ray Train itself ended (raytasks/train/job.py ``ray_removed_the_workers``) is
    resumed here from its last checkpoint, as the same command run again would resume it, up to --max-failures
    times in all; any other failure ends the job with its error (status 1)."""
    resumed = 0
    while True:
        try:
            return job.run()
        except (TrainError, ValueError, FileNotFoundError) as e:
            if not (isinstance(e, TrainError) and ray_removed_the_workers(e) and resumed < spec.max_failures):
                print(f"error: {e}", file=sys.stderr)
                raise SystemExit(1) from None
        resumed += 1
        print(f"Ray Train removed this run's workers under it (their placement group; Ray's fault, not the "
              f"training's): resuming from the last checkpoint, as the same command would "
              f"({resumed} of --max-failures {spec.max_failures})", flush=True)
        job = _prepared_run(spec, recipe)


if __name__ == "__main__":
    main()
