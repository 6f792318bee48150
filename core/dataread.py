"""Reading a labelled data set for a job, with every failure of the read as one message (``jobs.train``,
``jobs.evaluate``).

The readers (facedata/datasets/) report a malformed label and skip its row; what stops a read is their
``ValueError`` or ``FileNotFoundError`` with a message for the user. But a file that is a folder, a folder
that is a file, a permission, a CSV the ``csv`` module gives up on, or a cell a reader did not expect ends in
``OSError``, ``csv.Error``, ``TypeError`` or the like. A job must answer each with an ``error:`` line naming
the data, never a traceback, whatever the readers raise: :func:`read_data` is the one place that turns them
into :class:`DataReadError`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)


class DataReadError(ValueError):
    """The data set could not be read; the message names it and says why."""


def read_data(spec: str | Sequence[str], seed: int = 0):
    """``facedata.datasets.read_dataset(spec, seed=seed)``; raises :class:`DataReadError` for any failure of the
    read (the readers' own messages as they are, any other error prefixed with the data and its kind)."""
    from facedata.datasets import read_dataset

    try:
        return read_dataset(spec, seed=seed)
    except (ValueError, FileNotFoundError) as e:  # the readers' messages, written for the user
        raise DataReadError(str(e)) from None
    except Exception as e:  # any other failure of a reader is still the data's, told in one line
        log.debug("reading %s failed", spec, exc_info=True)
        shown = spec if isinstance(spec, str) else " ".join(spec)
        raise DataReadError(f"{shown}: cannot read the data set ({type(e).__name__}: {e})") from None
