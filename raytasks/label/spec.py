"""What a label run is asked to do (:class:`LabelSpec`) and the error for a command that cannot run."""

from __future__ import annotations

import dataclasses
import math

from facedata.inputs import InputError


class LabelError(InputError):
    """A problem with the command (bad flag, missing input, cluster without the resources asked for)."""


@dataclasses.dataclass
class LabelSpec:
    checkpoint: str | tuple[str, ...]  # one URI, or several (each URI or NAME=URI): a set
    input: str
    output: str
    batch_size: int | None = None  # images per batch; default 64 with --faces whole, 16 with detection
    min_actors: int = 1
    max_actors: int | None = None  # default: what the cluster fits, see resolve_pool
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    precision: str = "auto"  # auto | bf16 | fp32
    gpu_decode: bool = False
    actor_decode: bool = False  # photos' JPEGs decoded in the model actors on any device (--actor-decode)
    compile: bool = False  # torch.compile in each actor, for batches of batch_size (core/predictor.py)
    fold_bn: bool = True  # conv+bn folded (models/inference.py)
    max_rows_per_file: int = 50_000
    limit: int | None = None  # label at most this many new images in this run
    throttle_s: float = 0.0  # sleep after each predictor batch (to demonstrate and test kill + resume)
    progress_every_s: float = 60.0  # a progress line of committed rows this often (raytasks/label/progress.py); 0: none
    allow_prefix: tuple[str, ...] = ()  # what may be read (default: facedata.paths.default_allow_prefix of --input)
    faces: dict = dataclasses.field(default_factory=dict)  # faces.finder.FaceOptions: mode, max_side, detector
    model_set: str | None = None  # a --model-set file (core/modelset.py), instead of checkpoint
    embedding: bool = False  # a 128-D face embedding per face (models/embedding.py); makes the job a set
    review: dict = dataclasses.field(default_factory=dict)  # faces.quality.ReviewThresholds settings

    def __post_init__(self):
        if self.batch_size is None:
            self.batch_size = 16 if self.face_options().detect else 64

    def face_options(self):
        from faces.finder import FaceOptions

        try:
            return FaceOptions.from_dict(self.faces)
        except (ValueError, TypeError) as e:
            raise LabelError(f"face settings: {e}") from None

    def models(self):
        """The checkpoint(s) as a :class:`core.modelset.ModelSet` (one checkpoint alone is not a set)."""
        from core.modelset import ModelSet, ModelSetError

        try:
            return ModelSet.parse(None if self.model_set else self.checkpoint, self.model_set, self.embedding)
        except ModelSetError as e:
            raise LabelError(str(e)) from None

    def review_thresholds(self):
        from faces.quality import ReviewThresholds

        try:
            return ReviewThresholds.from_dict(dict(self.review))
        except (ValueError, TypeError) as e:
            raise LabelError(f"review settings: {e}") from None

    def validate(self) -> None:
        self.review_thresholds()
        if self.batch_size < 1:
            raise LabelError("--batch-size must be >= 1")
        if self.min_actors < 1 or (self.max_actors is not None and self.max_actors < self.min_actors):
            raise LabelError("need 1 <= --min-actors <= --max-actors")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise LabelError("--gpus-per-actor must be >= 0 and --cpus-per-actor > 0")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise LabelError("--precision must be auto, bf16 or fp32")
        if self.gpu_decode and self.gpus_per_actor <= 0:
            raise LabelError("--gpu-decode decodes JPEGs on the predictor's GPU: it needs --gpus-per-actor > 0")
        if self.max_rows_per_file < 1:
            raise LabelError("--max-rows-per-file must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise LabelError("--limit must be >= 1")
        # checked here, not where it is used: time.sleep(-1) would fail in the actors after the model ran
        if not math.isfinite(self.throttle_s) or self.throttle_s < 0:
            raise LabelError(f"--throttle must be a number of seconds >= 0, got {self.throttle_s}")
        if not math.isfinite(self.progress_every_s) or self.progress_every_s < 0:
            raise LabelError(f"--progress-every must be a number of seconds >= 0, got {self.progress_every_s}")
        if self.actor_decode and not self.face_options().detect:
            raise LabelError("--actor-decode decodes photos for detection and needs --faces detect; whole images are "
                             "decoded to the model's input on the CPU tasks, as it was trained on them")
        if self.gpu_decode and self.models().is_set and not self.face_options().detect:
            raise LabelError("--gpu-decode with --faces whole decodes to one model's input size: it takes a single "
                             "--checkpoint (with --faces detect, the photos it decodes serve every model of a set)")

    def decode_in_actor(self) -> bool:
        """Whether JPEG bytes travel to the model actors, which decode them (``--gpu-decode``, ``--actor-decode``)."""
        return self.gpu_decode or self.actor_decode
