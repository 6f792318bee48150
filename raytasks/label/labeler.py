"""What labels the images of a label run (raytasks/label/job.py): the checkpoint or model set, read and hashed
before any work, and the identity of the detector that finds the faces."""

from __future__ import annotations

import dataclasses

from raytasks.label.spec import LabelError, LabelSpec


@dataclasses.dataclass(frozen=True)
class Labeler:
    """What :func:`resolve_labeler` found: what the run's steps, its first line and its summary need of it."""

    model_set: object  # core.modelset.ModelSet
    preprocessings: list
    identity: str  # the rows' ``checkpoint``: one checkpoint's hash or the set's identity
    model_name: str
    checkpoint_name: str  # how the summary and the errors name it
    members: list | None  # a set's members (``ResolvedSet.describe()``), None for one checkpoint
    what: str  # how the first line of the run names it
    options: object  # faces.finder.FaceOptions
    detector: str  # the detector's identity, "whole" without one

    @property
    def pre_dicts(self) -> list[dict]:
        """Each member's preprocessing as the decode stage and its memory check take it."""
        return [p.to_dict() for p in self.preprocessings]


def resolve_labeler(spec: LabelSpec) -> Labeler:
    from core.modelset import ModelSetError, resolve_set
    from models.checkpoint import CheckpointError
    from models.embedding import EmbeddingUnavailable

    model_set = spec.models()
    try:  # every checkpoint read and hashed here: a bad one fails before any work
        resolved = resolve_set(model_set)
    except (CheckpointError, ModelSetError, EmbeddingUnavailable) as e:
        raise LabelError(str(e)) from None
    if model_set.is_set:
        members, checkpoint_name = resolved.describe(), f"the model set {model_set.name}"
        parts = [n + "=" + a for n, a in zip(resolved.names, resolved.architectures)]
        what = f"the set {model_set.name!r} ({', '.join(parts + (['embedding'] if resolved.embedding else []))})"
    else:
        members, checkpoint_name = None, model_set.members[0][1]
        what = f"{resolved.architectures[0]} {resolved.hashes[0].split(':')[-1][:16]}"
    options = spec.face_options()
    detector = "whole"
    if options.detect:  # loads the detector's weights once here: a missing or altered package fails now
        from faces.finder import FaceFinder

        detector = FaceFinder(options).identity
    return Labeler(model_set, resolved.preprocessings, resolved.identity, resolved.name, checkpoint_name, members,
                   what, options, detector)
