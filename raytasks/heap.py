"""Freed memory back to the system in a long-lived worker process: glibc's ``malloc_trim``.

A Ray Train worker's resident memory grew with every image it trained on, although nothing kept the images:
``age_gender_race`` through detection on UTKFace (150 px, batch 32, one worker) grew by about 170 KB an image,
about 500 MB an epoch of 3,000 images, and a run of the recipe was killed by Ray's memory monitor in its fourth
epoch of 16,006 images with the worker at 18.3 GB (2026-12-05, on this 24 GB machine). The memory was freed but
not given back: with glibc's mmap threshold fixed at 128 KB or 4 MB (``MALLOC_MMAP_THRESHOLD_``, which turns
off its sliding threshold) the worker stayed flat at 0.6-0.8 GB, at a cost of 20-45 % of the samples/s, as
every large activation was mapped and zeroed again; fewer arenas (``MALLOC_ARENA_MAX=2``) did not help.
``malloc_trim(0)`` every :data:`TRIM_EVERY_STEPS` steps gives the freed pages back without changing how
memory is handed out (docs/benchmarks.md, "A training worker's memory"). Elsewhere than glibc it does nothing.

The label job's model actors live as long and call it every :data:`TRIM_EVERY_BATCHES` batches. Theirs did
not climb (12,000 UTKFace chips, one actor, batches of 64), but swung between 0.7 and 1.9 GB as freed
batches piled up below the heap's top until glibc could give them back; trimmed every 10 batches it stayed
within 0.64-1.21 GB for about 3 % fewer images/s (96.2 and 99.8 against 101.0 and 102.0), trimmed every batch
within 0.56-0.72 GB for 13 % fewer (each batch faults its pages in again). A trim took 14 ms on average
(docs/benchmarks.md, "A label actor's memory").
"""

from __future__ import annotations

import ctypes
import functools

TRIM_EVERY_STEPS = 20  # the training worker's optimisation steps
TRIM_EVERY_BATCHES = 10  # the label actors' batches


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim this way
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim() -> bool:
    """Give the process's free heap pages back to the system; True when glibc released any."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
