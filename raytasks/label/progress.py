"""The label job's progress line, printed by the driver every ``--progress-every`` seconds while the pipeline runs::

    progress: 41,200 of 1,000,000 images labeled (4.1 %; 12,000 by this run), 35.2 images/s over the last 5 min,
    about 7 h 40 min left; 51,003 rows, errors 12

What is counted: only committed rows, those a kill now would not lose. Ray Data writes each Parquet file of a
write task straight to its final name under ``labels/`` after a *pending* commit file in the commit log
(``_checkpoint/{id}.pending.parquet``), and renames that file to ``_checkpoint/{id}.parquet`` once the data is
complete (raytasks/label/output.py ``clean_uncommitted``). A file in ``labels/`` alone is therefore no proof: it
may be cut (a local write in progress) or belong to a write that never commits, whose rows the next run deletes
and labels again. The commit log alone holds only the ``path`` of each row: no error kind, no face rank, so no
count of images with detection or of errors. So both are read, in ONE listing of the output (recursive: on S3
one ``ListObjectsV2`` without delimiter, paginated, which holds ``_checkpoint/`` before ``labels/`` since ``_``
sorts before ``l``), and a data file counts when the commit log holds the commit whose id starts its name (the
rule of Ray's cleanup, reversed). A commit listed means its data files were complete before it, so nothing is
counted that a kill could take back; a commit that lands during the listing is counted at the next interval.
The count moves in steps of one write task: Ray bundles at least ``--max-rows-per-file / 2`` rows per write.

What it costs: one listing per interval, and each committed data file read once (its footer and two small
columns, ``face`` and ``error_kind``), its counts cached by name; a file counted is never read again. A resumed
run reads the files of the runs before once, at its first interval, and counts from what they committed.

It runs in a daemon thread of the driver (:func:`watch`, around the pipeline), stops when the pipeline ends
(return, exception, Ctrl-C), and never fails the job: an error while counting is one printed line, and the next
interval tries again.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import math
import posixpath
import threading
import time

import pyarrow.fs as pafs

import storage
from raytasks.label.output import COMMIT_LOG_DIR, LABELS_DIR, PENDING_SUFFIX, images_in

WINDOW_S = 300.0  # the rate is measured over the last 5 min at least (see Rate)


@dataclasses.dataclass(frozen=True)
class Counts:
    """What the committed files of ``labels/`` hold: ``images`` (an image's rows have face 0 or null),
    ``rows`` (one per face), ``errors`` (rows with an ``error_kind``) and the ``files`` counted."""

    images: int = 0
    rows: int = 0
    errors: int = 0
    files: int = 0


class CommittedCounter:
    """Counts the committed rows of an output (a folder or ``s3://`` prefix): :meth:`count` lists the output once
    and reads each newly committed data file once (:meth:`read_file`)."""

    def __init__(self, output: str):
        self.fs, self.root = storage.filesystem(output)
        self.cache: dict[str, tuple[int, int, int]] = {}  # data file path -> (images, rows, errors)

    def count(self) -> Counts:
        labels, commits = [], set()
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True)):
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(self.root):].lstrip("/")
            top, _, rest = rel.partition("/")
            name = posixpath.basename(rel)
            if top == LABELS_DIR and name.endswith(".parquet") and not name.startswith(("_", ".")):
                labels.append(info.path)
            elif top == COMMIT_LOG_DIR and "/" not in rest and name.endswith(".parquet") \
                    and not name.endswith(PENDING_SUFFIX):
                commits.add(name[: -len(".parquet")])
        ids = sorted(commits)
        images = rows = errors = files = 0
        for path in labels:
            if path not in self.cache:
                if not _committed(posixpath.basename(path), commits, ids):
                    continue  # written, not committed yet (or never): the next interval looks again
                self.cache[path] = self.read_file(path)
            i, r, e = self.cache[path]
            images, rows, errors, files = images + i, rows + r, errors + e, files + 1
        return Counts(images, rows, errors, files)

    def read_file(self, path: str) -> tuple[int, int, int]:
        """``(images, rows, errors)`` of one data file: its footer, and its ``face`` and ``error_kind`` columns."""
        import pyarrow.parquet as pq

        with self.fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            rows = pf.metadata.num_rows
            table = pf.read(columns=[c for c in ("face", "error_kind") if c in names])
        errors = rows - table.column("error_kind").null_count if "error_kind" in names else 0
        if "face" not in names:  # --faces whole: one row per image
            return rows, rows, errors
        return images_in(table.column("face")), rows, errors


def _committed(name: str, commits: set[str], ids: list[str]) -> bool:
    """Whether the data file ``name`` (``{id}-{n}.parquet``) belongs to a committed write: a commit id starts
    its name. Ray's ids have one width, so that id is the greatest one not above the name."""
    if name.rsplit("-", 1)[0] in commits:
        return True
    i = bisect.bisect_right(ids, name)
    return i > 0 and name.startswith(ids[i - 1])


class Rate:
    """Images per second over a recent window. It keeps the counts seen when they changed (and the first one);
    the rate runs from the newest of them at least ``window_s`` old to now, and back to the change before when
    nothing was committed since (commits come in steps of a write task: on a slow cluster a step may take
    longer than the window, and the rate would be 0 between steps). ``None`` before the first commit."""

    def __init__(self, t: float, images: int, window_s: float = WINDOW_S):
        self.window_s = window_s
        self.points = [(t, images)]
        self.now = (t, images)

    def add(self, t: float, images: int) -> None:
        if images != self.points[-1][1]:
            self.points.append((t, images))
        self.now = (t, images)

    def rate(self) -> tuple[float, float] | None:
        """``(images per second, over how many seconds)``, or None before a commit has changed the count."""
        t, images = self.now
        if len(self.points) < 2:
            return None
        i = max((k for k, (tk, _) in enumerate(self.points) if tk <= t - self.window_s), default=0)
        if i == len(self.points) - 1:  # nothing committed within the window: from the change before the last
            i -= 1
        del self.points[:i]  # a later window starts here or after
        t0, n0 = self.points[0]
        return ((images - n0) / (t - t0), t - t0) if t > t0 else None


def duration(seconds: float) -> str:
    """``40 s``, ``12 min``, ``7 h 40 min``, ``3 d 4 h``: what a person reads in a log (seconds up to 2 min)."""
    s = int(round(seconds))
    if s < 120:
        return f"{s} s"
    m = int(round(seconds / 60))
    if m < 60:
        return f"{m} min"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(h, 24)
    return f"{d} d {h} h" if h else f"{d} d"


def progress_line(counts: Counts, total: int, before: int, rate: tuple[float, float] | None,
                  limit: int | None = None, step: int | None = None) -> str:
    """The line (module docstring). ``total``: the run's inputs; ``before``: the images committed when the run
    started; ``rate``: :meth:`Rate.rate`; ``limit``: ``--limit`` (new images of this run at most); ``step``: the
    rows one write commits at least, named while this run has committed nothing."""
    done, by_run = counts.images, max(0, counts.images - before)
    pct = 100.0 * done / total if total else 100.0
    head = f"progress: {done:,} of {total:,} images labeled ({pct:.1f} %; {by_run:,} by this run)"
    remaining = max(0, total - done)
    if limit is not None:
        remaining = min(remaining, max(0, limit - by_run))
    if rate is not None and rate[0] > 0:
        per_s, span = rate
        speed = f"{per_s:,.1f}" if per_s >= 1 else f"{per_s:.2g}"
        left = "nothing left to label" if remaining == 0 else f"about {duration(remaining / per_s)} left"
        middle = f"{speed} images/s over the last {duration(span)}, {left}"
    elif by_run <= 0:
        every = f" (rows count when their write commits, {step:,} or more at a time)" if step else ""
        middle = f"none committed by this run yet{every}"
    else:
        middle = f"no image committed in the last {duration(rate[1])}" if rate else "no rate yet"
    return f"{head}, {middle}; {counts.rows:,} rows, errors {counts.errors:,}"


class _Reporter(threading.Thread):
    def __init__(self, output: str, total: int, before: int, every_s: float, echo, limit, step, window_s, clock):
        super().__init__(name="label-progress", daemon=True)
        self.counter, self.total, self.before, self.every_s = CommittedCounter(output), total, before, every_s
        self.echo, self.limit, self.step, self.clock = echo, limit, step, clock
        self.rate = Rate(clock(), before, window_s)
        self.stopping, self.lock, self.stopped = threading.Event(), threading.Lock(), False

    def run(self) -> None:
        while not self.stopping.wait(self.every_s):
            try:
                counts = self.counter.count()
                self.rate.add(self.clock(), counts.images)
                line = progress_line(counts, self.total, self.before, self.rate.rate(), self.limit, self.step)
            except Exception as e:  # noqa: BLE001 - the job runs on; the next interval counts again
                line = (f"progress: could not count the committed rows ({type(e).__name__}: {e}); trying again "
                        f"in {self.every_s:g} s")
            self._say(line)

    def _say(self, line: str) -> None:
        with self.lock:  # never a line after stop(): the summary is the last word
            if self.stopped:
                return
            try:
                self.echo(line)
            except Exception:  # noqa: BLE001, S110 - a closed stdout does not end the job from here
                pass

    def stop(self, wait_s: float) -> None:
        self.stopping.set()
        with self.lock:
            self.stopped = True
        self.join(wait_s)  # a listing in flight ends on its own: the thread is a daemon and says nothing more


@contextlib.contextmanager
def watch(output: str, total: int, before: int, every_s: float, echo=print, limit: int | None = None,
          step: int | None = None, window_s: float = WINDOW_S, clock=time.monotonic):
    """Print :func:`progress_line` every ``every_s`` seconds (0: never) while the ``with`` block runs, the first
    one ``every_s`` after it starts. ``before``: the images the output held when the run started (its summary's
    ``images_before``)."""
    if not every_s or not math.isfinite(every_s) or every_s <= 0:
        yield
        return
    reporter = _Reporter(output, total, before, every_s, echo, limit, step, window_s, clock)
    reporter.start()
    try:
        yield reporter
    finally:
        reporter.stop(wait_s=min(every_s, 5.0))


def watch_label(spec, inputs: int, before: int, echo=print):
    """:func:`watch` for a label run: ``spec`` (LabelSpec) gives the output, the interval, ``--limit`` and the
    rows of one write (raytasks/label/job.py ``_run_pipeline``: ``max_rows_per_file // 2`` at least)."""
    step = max(1, spec.max_rows_per_file // 2)
    return watch(spec.output, inputs, before, spec.progress_every_s, echo, limit=spec.limit, step=step)
