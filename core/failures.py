"""What happens when the detector or a model raises on a batch: one image cannot fail its batch.

Each image of the batch is run again alone. One that fails alone gets an error row (``error_kind``
``model_error``, the exception in ``error_message``) while the others get the rows they would have got in any
batch (rows never depend on which images share a batch: tests/test_tiles.py, tests/test_failures.py). When any
image fails alone (a batch of one image with pixels included), the networks are run once on a dummy input
(``Annotator.warm_up``: every network's forward pass and every model's columns): if that fails too, the models
or the device are broken, not the images, and the failure is raised as before (a broken checkpoint fails the
job, it does not become a million error rows, even beside photos without a face, which never reach a model);
otherwise each such image gets its error row, so that an image's answer does not depend on its companions.
A batch that fails only together (the GPU's memory, for a batch of crowds) is answered image by image. The
label job's actors and the serving replicas call ``core.annotator.Annotator``, which calls this: one rule for
both (an image a request sent that fails alone is that request's error row, and the other requests of its
batch are answered).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from facedata.decode import fail, rows_of

MODEL_ERROR = "model_error"  # the error kind of an image the detector or a model failed on alone (docs/schema.md)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageFailed:
    """``Annotator.find``'s entry for an image the detector failed on alone; ``Annotator.annotate`` gives it a
    ``model_error`` row."""

    message: str


def image_by_image_on_failure(batch: dict, run: Callable[[dict, Any], Any], check: Callable[[], None] | None,
                              join: Callable[[list], Any], failed: Callable[[dict, str, Any], Any],
                              before_retry: Callable[[], None], healthy: Callable[[], bool]) -> Any:
    """``run(batch, check)``; when it raises (not in ``check``: a stop is a stop), ``run`` on each image
    alone, and ``failed(its one-image batch, why, check)`` for an image that fails alone; ``join`` puts the
    images' results together in the batch's order. When any image fails alone (a batch of one such image too),
    ``healthy()`` tells the images' fault from the models' or the device's: the failure is raised unless the
    networks still run on a dummy input. Images without pixels (decoding errors) are not retried."""
    stopped: list = []

    def guarded() -> None:
        try:
            check()
        except BaseException:
            stopped.append(True)
            raise

    guard = guarded if check is not None else None
    try:
        return run(batch, guard)
    except Exception as e:  # noqa: BLE001 - any failure may be one image's: each is tried alone below
        if stopped:
            raise
        first = e
    live = {int(i) for i in np.flatnonzero(np.asarray(batch["ok"], dtype=bool))}
    if not live:
        raise first
    # The failed batch's frames hold its tensors (pictures, crops, activations): freed before the images are run
    # alone, or a batch that ran out of device memory would still hold it; the traceback keeps its lines.
    traceback.clear_frames(first.__traceback__)
    before_retry()
    parts: list = []  # per image its result, or the one-image batch it failed on (its error row comes below)
    why: dict[int, str] = {}
    for i in range(len(batch["ok"])):
        one = rows_of(batch, [i])  # one at a time: a copy of the whole batch would hold its memory again
        if i not in live:  # no pixels (a decoding error): its own row, never counted as the models' failure
            parts.append(run(one, guard))
            continue
        if live == {i}:  # the batch's one image with pixels: the batch's failure is its own (or the models')
            why[i] = _reason(first)
            parts.append(one)
            continue
        try:
            parts.append(run(one, guard))
            continue
        except Exception as e:  # noqa: BLE001 - this image's failure: its error row
            if stopped:
                raise
            why[i] = _reason(e)
        parts.append(one)
    # Any image failing alone: are the networks still sound? A model broken for every face fails on a dummy
    # input too, whatever else the batch held (a photo without a face never reaches the models).
    if why and not healthy():
        raise first
    log.warning("a batch of %d images failed (%s); %d failed alone, each an error row (%s)", len(live),
                _reason(first)[:200], len(why), "; ".join(f"{batch['path'][i]}: {m[:200]}"
                                                        for i, m in list(why.items())[:3]))
    return join([failed(p, why[i], guard) if i in why else p for i, p in enumerate(parts)])


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:1000]


def failed_batch(batch: dict, why: dict[int, str]) -> dict:
    """A copy of ``batch`` whose images ``why`` names are failed, ``model_error`` with their reasons."""
    out = {**batch, "ok": np.array(batch["ok"], dtype=bool), "error_kind": list(batch["error_kind"]),
           "error_message": list(batch["error_message"])}
    for i, message in why.items():
        fail(out, i, MODEL_ERROR, message)
    return out


def concat_columns(parts: list[dict[str, list]]) -> dict[str, list]:
    """Columns of consecutive images' rows -> the columns of all of them, in order."""
    return {k: [v for p in parts for v in p[k]] for k in parts[0]}
