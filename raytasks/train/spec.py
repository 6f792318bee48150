"""What a training run is asked to do (:class:`TrainSpec`), what it gives back, and the run folder's files."""

from __future__ import annotations

from dataclasses import dataclass, field

import storage

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
CURVES_PNG = "curves.png"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's checkpoint index in the run folder
# the values a run without a recipe trains with that history.json's header does not hold (seed, limits, face
# settings...), written by the driver before the run's first attempt (raytasks/train/resume.py check_values)
VALUES_FILE = "train_values.json"



class TrainError(RuntimeError):
    """A run that cannot start or did not finish; the message says what to do."""


@dataclass
class TrainSpec:
    """Everything a run needs, as plain values (what ``jobs.train``'s flags fill in)."""

    model: str
    data: str | tuple[str, ...]  # FORMAT:URI, or several read as one (facedata/datasets/mixed.py)
    storage: str
    name: str
    output: str | None = None  # default: <storage>/<name>/best.pt
    model_kwargs: dict = field(default_factory=dict)  # constructor overrides (image_size, num_landmarks...)
    recipe: dict = field(default_factory=dict)  # overrides of the model's Recipe fields
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads: int | None = None  # torch threads per worker (default: its CPUs)
    amp: bool = True  # bf16 autocast on GPUs
    seed: int = 0  # initialisation, data order, augmentation and --limit's draw
    # the train / val / test split of data without a split of its own (facedata.datasets.seeded_split): kept
    # apart from ``seed`` so that every training seed holds out the same test faces (before 2026-12-06 ``seed``
    # drew the split too, and a run with --seed 1 trained on most of the test faces of the default split)
    split_seed: int = 0
    max_failures: int = 0
    keep: int = 2  # checkpoints kept, best by the primary metric (the latest is always kept too)
    limit: int | None = None  # at most this many training images, drawn at random with ``seed``
    val_limit: int | None = None  # at most this many validation images, drawn at random with ``seed``
    steps_per_epoch: int | None = None
    init_from: str | None = None  # initialise weights from a project checkpoint (task_attention from TMTL)
    find_unused_parameters: bool = False
    fail_at: tuple[int, int, int] | None = None  # (rank, epoch, step): that worker dies once (tests)
    fail_stage: int = 1  # the stage of a recipe (raytasks/train/stages.py) whose run fail_at applies to
    template_images: int = 64  # training images the face template is measured on (faces/templates.py); 0: none
    # the face template: "measured" on template_images training images (faces/templates.py: where the data's
    # own crops put a face), or "canonical" (faces.align.default_template); None: measured for --faces whole
    # (with template_images), canonical for detect and landmarks (docs/faces.md, "Training on photos")
    template: str | None = None
    calibrate: bool = True  # fit the exported model's temperatures on the validation split (models/calibration.py)
    calibrate_limit: int = 10_000  # validation images the temperatures are fitted on, at most
    align_jitter: float | None = None  # added to the recipe's augmentation (core/augment.py)
    augment: dict = field(default_factory=dict)  # recipe augmentation entries set or overridden (core/augment.py)
    faces: str | None = None  # detect, landmarks or whole (faces/trainfaces.py); None: the format's default
    face_options: dict = field(default_factory=dict)  # faces.finder.FaceOptions (max_side, detector) for detect

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage, self.name)


@dataclass
class TrainOutcome:
    output: str  # URI of the exported best checkpoint
    best_epoch: int
    best_metrics: dict
    history: list[dict]
    run_uri: str
    resumed_from: int | None  # epoch the run resumed after, None for a fresh run
    curves: str | None
    recipe: dict | None = None  # a recipe's record, as the exported checkpoint keeps it (raytasks/train/stages.py)
    output_hash: str | None = None  # the content hash of the checkpoint exported to ``output``


