"""Reading weight files from untrusted storage within bounds: a checkpoint, a backbone's or dlib's weights.

The read itself (:func:`read_checked`: at most :func:`read_limits`' bytes and seconds, no FIFO or device) and
``torch.load(weights_only=True)`` of the bytes (:func:`torch_load_checked`: the archive checked before it is
opened, the loaded values after, ``models.checkpoint_hash``). Every refusal is a :class:`CheckpointError`.
What a checkpoint's fields mean and how its hash is checked: models/checkpoint.py.
"""

from __future__ import annotations

import io
import zipfile

import torch

from .checkpoint_hash import UnsafeContent, check_archive, check_contents


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, not our format, malformed, tampered with, or not the
    pinned one."""


# Bounds of one checkpoint read (issue #22): the largest model here is about 100 MB; 2 GiB leaves room for
# any torchvision backbone while refusing a 50 GB object or a device. A FIFO or device is refused at once;
# a read still going after the timeout (a hung mount, a slow endpoint) is refused. Both can be set per
# process with these environment variables (Ray workers inherit the driver's runtime_env), or per call.
DEFAULT_MAX_CHECKPOINT_BYTES = 2 * 1024 ** 3
DEFAULT_READ_TIMEOUT_S = 600.0
MAX_BYTES_ENV = "FACEATTR_MAX_CHECKPOINT_BYTES"
TIMEOUT_ENV = "FACEATTR_CHECKPOINT_READ_TIMEOUT_S"


def read_limits(max_bytes: int | None = None, timeout_s: float | None = None) -> tuple[int, float]:
    """``(max_bytes, timeout_s)`` of a checkpoint read: the arguments, else the environment
    (:data:`MAX_BYTES_ENV`, :data:`TIMEOUT_ENV`), else the defaults (2 GiB, 600 s)."""
    import os

    try:
        if max_bytes is None:
            max_bytes = int(os.environ.get(MAX_BYTES_ENV) or DEFAULT_MAX_CHECKPOINT_BYTES)
        if timeout_s is None:
            timeout_s = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_READ_TIMEOUT_S)
    except ValueError as e:
        raise CheckpointError(f"{MAX_BYTES_ENV} / {TIMEOUT_ENV}: {e}") from None
    return max_bytes, timeout_s


def read_checked(uri: str, max_bytes: int | None = None, timeout_s: float | None = None,
                 what: str = "checkpoint") -> bytes:
    """``uri``'s bytes, read bounded (:func:`read_limits`; backbone and dlib weights too), or a CheckpointError."""
    import storage

    max_bytes, timeout_s = read_limits(max_bytes, timeout_s)
    try:
        return storage.read_bounded(uri, max_bytes, timeout_s)
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {uri}") from None
    except storage.BoundedReadError as e:
        raise CheckpointError(f"{what} refused: {e} (limits: {MAX_BYTES_ENV}, {TIMEOUT_ENV})") from None
    except OSError as e:
        raise CheckpointError(f"{what} {uri} cannot be read ({type(e).__name__}: {e})") from None


def torch_load_checked(data: bytes, uri: str, map_location="cpu", max_bytes: int | None = None,
                       checkpoint: bool = True):
    """``torch.load(weights_only=True)`` of ``data`` in memory bounded by ``len(data)`` (see the module docstring).
    ``checkpoint=False`` (backbone weights, never hashed here): torch's legacy format too (its storages are read
    from the stream, their sizes checked by torch) and any value."""
    try:
        if checkpoint or zipfile.is_zipfile(io.BytesIO(data)):
            check_archive(data)
    except UnsafeContent as e:
        raise CheckpointError(f"{uri} is not a loadable checkpoint ({e})") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure (MemoryError too) means "not our format"
        raise CheckpointError(f"{uri} is not a loadable checkpoint ({type(e).__name__}: {e})") from None
    try:
        check_contents(obj, read_limits(max_bytes)[0], json_only=checkpoint)
    except UnsafeContent as e:
        raise CheckpointError(f"{uri} is refused: {e}") from None
    return obj
