"""The label job's progress line (raytasks/label/progress.py): what it counts in a real output folder of Parquet
files written by pyarrow, locally and on S3 (moto's server, behind a proxy that counts the requests), the text
a user reads, the thread that prints it and the flag. The lines of a real ``python -m jobs.label`` run, whose stdout
is a pipe as under ``ray job submit``, are checked in tests/test_ray_start_cluster.py (one Ray start for both)."""

from __future__ import annotations

import io
import os
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytasks.label import progress as P
from raytasks.label.spec import LabelError, LabelSpec
from tests.faultproxy import DENIED, FaultProxy

WRITE = "035AFVYs_c517389f6b704dbc_{:06d}"  # a commit id as Ray Data spells it: {dataset}_{write uuid}_{task}


def _rows(images: list[tuple[str, int | None, str | None]]) -> pa.Table:
    """The label job's rows of ``(path, faces, error_kind)`` per image: one row per face (face 0..n-1), one row
    with a null face for an image without a face or that failed."""
    path, face, faces, kind = [], [], [], []
    for p, n, err in images:
        for f in range(n) if n else [None]:
            path.append(p)
            face.append(f)
            faces.append(n or 0)
            kind.append(err)
    return pa.table({"path": path, "face": pa.array(face, pa.int32()), "faces": faces,
                     "error_kind": pa.array(kind, pa.string())})


class Folder:
    """An output folder, local or on S3, written as Ray Data writes one: ``labels/{id}-{n}.parquet`` data files
    and the commit log ``_checkpoint/{id}.parquet`` (``{id}.pending.parquet`` before the commit)."""

    def __init__(self, put, output: str):
        self.put, self.output = put, output

    def write(self, task: int, *tables: pa.Table, committed: bool = True) -> None:
        wid = WRITE.format(task)
        self.put(f"_checkpoint/{wid}{'' if committed else '.pending'}.parquet",
                 _bytes(pa.table({"path": pa.concat_tables(tables).column("path")})))
        for n, t in enumerate(tables):
            self.put(f"labels/{wid}-{n}.parquet", _bytes(t))

    def commit(self, task: int) -> None:
        wid = WRITE.format(task)
        self.put(f"_checkpoint/{wid}.parquet", b"")  # Ray's commit is a rename: the content is not read here


def _bytes(t: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(t, buf)
    return buf.getvalue()


@pytest.fixture
def local(tmp_path):
    def put(key, data):
        p = tmp_path / "out" / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    return Folder(put, str(tmp_path / "out"))


def _counting(monkeypatch) -> list[str]:
    reads: list[str] = []
    plain = P.CommittedCounter.read_file

    def read_file(self, path):
        reads.append(os.path.basename(path))
        return plain(self, path)

    monkeypatch.setattr(P.CommittedCounter, "read_file", read_file)
    return reads


A = _rows([("/p/a.jpg", 3, None), ("/p/b.jpg", 0, None), ("/p/c.jpg", None, "not_image")])  # 3 images, 5 rows
B = _rows([("/p/d.jpg", 1, None), ("/p/e.jpg", None, "truncated")])  # 2 images, 2 rows
C = _rows([("/p/f.jpg", 2, None)])  # 1 image, 2 rows


def test_counts_committed_files_only_and_reads_each_once(local, monkeypatch):
    reads = _counting(monkeypatch)
    counter = P.CommittedCounter(local.output)
    assert counter.count() == P.Counts()  # nothing there yet (no labels/, no commit log): no error
    local.write(0, A, B)  # one write task, two files, committed
    local.write(1, C, committed=False)  # written, not committed: a kill now deletes it
    local.put(f"labels/{WRITE.format(2)}-0.parquet", b"PAR1 cut mid-write")  # its pending commit not even listed
    assert counter.count() == P.Counts(images=5, rows=7, errors=2, files=2)
    assert sorted(reads) == [f"{WRITE.format(0)}-0.parquet", f"{WRITE.format(0)}-1.parquet"]
    assert counter.count() == P.Counts(5, 7, 2, 2) and len(reads) == 2  # counted files are not read again
    local.commit(1)  # the rename: its file counts now, read once
    assert counter.count() == P.Counts(6, 9, 2, 3)
    assert reads[2:] == [f"{WRITE.format(1)}-0.parquet"]
    assert counter.count() == P.Counts(6, 9, 2, 3) and len(reads) == 3


def test_whole_images_count_from_the_footer(local):
    """``--faces whole``: no face column, one row per image; the errors from ``error_kind``."""
    local.write(0, pa.table({"path": ["/a", "/b", "/c"], "error_kind": [None, "empty", None]}))
    assert P.CommittedCounter(local.output).count() == P.Counts(images=3, rows=3, errors=1, files=1)


@pytest.fixture
def s3(s3_bucket, monkeypatch):
    """``(Folder, FaultProxy)`` on a fresh bucket; every S3 request of the code under test goes through the proxy."""
    client, bucket = s3_bucket
    proxy = FaultProxy(client.meta.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")

    def put(key, data):
        client.put_object(Bucket=bucket, Key=f"run-1/{key}", Body=data)  # straight to moto: not in the log

    client.put_object(Bucket=bucket, Key="run-1/_inputs/part-000000.parquet", Body=_bytes(pa.table({"path": ["x"]})))
    try:
        yield Folder(put, f"s3://{bucket}/run-1/"), proxy
    finally:
        proxy.close()


def _requests(proxy: FaultProxy) -> list[tuple[str, str]]:
    with proxy.lock:
        log, proxy.log[:] = list(proxy.log), []
    return [(m, "LIST" if "list-type" in p else p.rsplit("/", 1)[-1]) for m, p, _ in log]


def test_on_s3_one_listing_per_count_and_each_file_read_once(s3):
    folder, proxy = s3
    counter = P.CommittedCounter(folder.output)
    folder.write(0, A)
    folder.write(1, B, committed=False)
    assert counter.count() == P.Counts(3, 5, 1, 1)
    got = _requests(proxy)
    assert [r for r in got if r[0] == "GET" and r[1] == "LIST"] == [("GET", "LIST")]
    assert {r[1] for r in got if r[1] != "LIST"} == {f"{WRITE.format(0)}-0.parquet"}  # the uncommitted one unread
    assert counter.count() == P.Counts(3, 5, 1, 1)
    assert _requests(proxy) == [("GET", "LIST")]  # nothing new: the listing alone
    folder.commit(1)
    folder.write(2, C)
    assert counter.count() == P.Counts(6, 9, 2, 3)
    got = _requests(proxy)
    assert got.count(("GET", "LIST")) == 1
    assert {r[1] for r in got if r[1] != "LIST"} == {f"{WRITE.format(1)}-0.parquet", f"{WRITE.format(2)}-0.parquet"}


def test_on_s3_a_failed_listing_is_one_line_and_the_next_interval_counts(s3):
    folder, proxy = s3
    folder.write(0, A)
    proxy.fail("list-type", DENIED, times=1)
    lines: list[str] = []
    with P.watch(folder.output, total=10, before=0, every_s=0.2, echo=lines.append):
        _wait_for(lambda: len(lines) >= 2)
    assert lines[0].startswith("progress: could not count the committed rows (") and "trying again in 0.2 s" in lines[0]
    assert lines[1].startswith("progress: 3 of 10 images labeled (30.0 %; 3 by this run)"), lines


def _wait_for(cond, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


# --- the text --------------------------------------------------------------------------------------------------
def test_the_line_of_a_long_run():
    line = P.progress_line(P.Counts(images=41_200, rows=51_003, errors=12), total=1_000_000, before=29_200,
                           rate=(35.2, 300.0))
    # 958,800 images left at 35.2/s: 27,239 s, 454 min
    assert line == ("progress: 41,200 of 1,000,000 images labeled (4.1 %; 12,000 by this run), 35.2 images/s over "
                    "the last 5 min, about 7 h 34 min left; 51,003 rows, errors 12")


def test_nothing_committed_yet_has_no_rate_and_no_time_left():
    line = P.progress_line(P.Counts(), total=24, before=0, rate=None, step=25_000)
    assert line == ("progress: 0 of 24 images labeled (0.0 %; 0 by this run), none committed by this run yet (rows "
                    "count when their write commits, 25,000 or more at a time); 0 rows, errors 0")
    resumed = P.progress_line(P.Counts(500, 600, 3, 2), total=1000, before=500, rate=None)
    assert resumed == ("progress: 500 of 1,000 images labeled (50.0 %; 0 by this run), none committed by this run "
                       "yet; 600 rows, errors 3")


def test_time_left_stops_at_the_limit_and_the_end():
    line = P.progress_line(P.Counts(150, 150), total=10_000, before=100, rate=(0.5, 90.0), limit=70)
    assert ", 0.5 images/s over the last 90 s, about 40 s left;" in line  # 20 more of --limit 70, not 9,850
    done = P.progress_line(P.Counts(24, 30), total=24, before=0, rate=(2.0, 12.0))
    assert ", 2.0 images/s over the last 12 s, nothing left to label; 30 rows" in done


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0 s"), (59.6, "60 s"), (119.4, "119 s"), (120, "2 min"), (3540, "59 min"),
                                               (3600, "1 h"), (27_239, "7 h 34 min"), (47 * 3600 + 1800, "47 h 30 min"),
                                               (3 * 86_400 + 4 * 3600, "3 d 4 h")])
def test_durations(seconds, text):
    assert P.duration(seconds) == text


def test_the_rate_over_the_window_and_across_coarse_commits():
    r = P.Rate(0.0, 100, window_s=300)
    r.add(60, 100)
    assert r.rate() is None  # nothing committed yet: no rate
    r.add(120, 1_300)
    assert r.rate() == (10.0, 120.0)  # from the run's start: the window is not full yet
    r.add(400, 4_100)
    assert r.rate() == (10.0, 400.0)  # the newest change at least 300 s old is the start (0 s)
    r.add(500, 5_100)
    assert r.rate() == (10.0, 380.0)  # from 120 s, the newest change 300 s before 500 s
    r.add(1000, 5_100)  # no commit in the last 500 s: from the change before the last one, not 0 images/s
    assert r.rate() == ((5_100 - 4_100) / 600, 600.0)
    assert len(r.points) == 2  # what no later window can start from is dropped


# --- the thread ------------------------------------------------------------------------------------------------
def test_watch_prints_every_interval_and_nothing_after_the_block(local):
    local.write(0, A)
    lines: list[str] = []
    with P.watch(local.output, total=8, before=0, every_s=0.1, echo=lines.append) as reporter:
        _wait_for(lambda: len(lines) >= 2)
        assert reporter.is_alive() and reporter.daemon
    n = len(lines)
    assert not reporter.is_alive()
    time.sleep(0.3)
    assert len(lines) == n
    assert lines[0].startswith("progress: 3 of 8 images labeled (37.5 %; 3 by this run), "), lines
    assert lines[0].endswith(" left; 5 rows, errors 1")


def test_a_counting_error_is_one_line_and_an_exception_in_the_block_stops_it(local, monkeypatch):
    local.write(0, A)
    plain, calls = P.CommittedCounter.count, []

    def count(self):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("When listing objects under key 'run-1' in bucket 'b': AWS Error SLOW_DOWN")
        return plain(self)

    monkeypatch.setattr(P.CommittedCounter, "count", count)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt), P.watch(local.output, 8, 0, every_s=0.1, echo=lines.append) as reporter:
        _wait_for(lambda: len(lines) >= 2)
        raise KeyboardInterrupt  # Ctrl-C in the main thread while the pipeline runs
    assert not reporter.is_alive()
    assert lines[0] == ("progress: could not count the committed rows (OSError: When listing objects under key "
                        "'run-1' in bucket 'b': AWS Error SLOW_DOWN); trying again in 0.1 s")
    assert lines[1].startswith("progress: 3 of 8 images labeled")


def test_zero_turns_it_off(local):
    before = threading.active_count()
    with P.watch(local.output, 8, 0, every_s=0, echo=pytest.fail) as reporter:
        assert reporter is None and threading.active_count() == before


def test_the_flag_and_the_spec():
    from jobs.label import build_parser

    args = build_parser().parse_args(["--checkpoint", "c.pt", "--input", "i", "--output", "o"])
    assert args.progress_every == 60.0 == LabelSpec("", "", "").progress_every_s
    assert build_parser().parse_args(["--input", "i", "--output", "o", "--progress-every", "0"]).progress_every == 0
    with pytest.raises(LabelError, match="--progress-every must be a number of seconds >= 0, got -1"):
        LabelSpec("c.pt", "i", "o", progress_every_s=-1).validate()


def test_a_negative_interval_is_an_argparse_error(capsys):
    from jobs.label import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--input", "i", "--output", "o", "--progress-every", "-5"])
    assert e.value.code == 2
    assert "argument --progress-every: must be a number of seconds >= 0, got -5" in capsys.readouterr().err
