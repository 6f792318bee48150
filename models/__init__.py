"""The model zoo: five multi-task face networks behind one registry.

    >>> import models
    >>> models.list_models()
    ['age_gender_race', 'dmm_cnn', 'hard_sharing', 'hmtnet', 'task_attention']
    >>> m = models.create_model("hard_sharing")

A new model is one new module in this package whose class is decorated with ``@register_model``, and its
name added to ``_MODEL_MODULES``: the registry imports those modules, and only those, when first asked.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import FaceModel

_MODEL_MODULES = ("age_gender_race", "dmm_cnn", "hard_sharing", "hmtnet", "task_attention")
_REGISTRY: dict[str, type[FaceModel]] = {}
_loaded = False


def __getattr__(name: str):
    # ``FaceModel`` and ``Recipe`` (models/base.py, torch) are imported when first asked for, so that
    # ``models.imagebytes`` and ``models.photo`` import without torch (the label job's decode tasks)
    if name in ("FaceModel", "Recipe"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_model(name: str):
    def wrap(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for name in _MODEL_MODULES:
        importlib.import_module(f"{__name__}.{name}")
    _loaded = True


def list_models() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def model_class(name: str) -> type[FaceModel]:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(name: str, **overrides) -> FaceModel:
    """Build a model by name; every keyword overrides a default of its constructor. The resolved
    arguments are kept on ``model.config`` (and in checkpoints) so the model can be rebuilt. ``mirror``
    (every model): read each face with its mirror image too (models/preprocess.py ``Preprocessing.mirror``)."""
    overrides = dict(overrides)
    mirror = overrides.pop("mirror", None)
    if mirror is not None and not isinstance(mirror, bool):
        raise ValueError(f"{name}: mirror must be true or false, got {mirror!r}")
    cls = model_class(name)
    sig = inspect.signature(cls.__init__)
    try:
        bound = sig.bind(None, **overrides)
    except TypeError as e:
        params = [p for p in sig.parameters if p != "self"]
        raise ValueError(f"{name}: {e}; accepted: {', '.join(params)}") from None
    bound.apply_defaults()
    model = cls(**overrides)
    model.config = {k: _plain(v) for k, v in bound.arguments.items() if k != "self"}
    if mirror is not None:
        model.set_mirror(mirror)
        model.config["mirror"] = mirror
    return model


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


__all__ = ["FaceModel", "Recipe", "create_model", "list_models", "model_class", "register_model"]
