"""Issue #22 (security hardening, second round), where bytes are read from and written to, without Ray: a
symlink swapped in while a file is read, odd paths in a manifest or a folder, and the temporary file of a local
write. Each test failed on the code before its fix. (The other half of the round: tests/test_hostile_files.py.)"""

from __future__ import annotations

import os
import time
from pathlib import Path

from facedata import inputs, paths, reading
from tests.hostile import odd_paths as _odd_paths
from tests.hostile import swapping_name

FORBIDDEN = (None, *paths.FORBIDDEN)


def _listed(listing_dir: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [p for f in sorted(listing_dir.glob("part-*.parquet")) for p in pq.read_table(f).column("path").to_pylist()]


# ------------------------------------------------------------------------------------------------------
# 1: a symlink swapped in while a file is read does not escape --allow-prefix
# ------------------------------------------------------------------------------------------------------

def test_symlink_swap_during_reads_never_returns_outside_bytes(tmp_path):
    results = []
    with swapping_name(tmp_path) as (photos, target):
        allow = (str(photos),)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            results += reading.fetch_all([str(target)] * 8, allow=allow)
            results.append(reading.fetch(str(target), allow=allow))
    outside = [r for r in results if r[0] == b"OUTSIDE"]
    assert not outside, f"{len(outside)} of {len(results)} reads returned the outside file's bytes"
    assert any(r[0] == b"INSIDE" for r in results)  # the race ran both ways
    assert all(r[0] == b"INSIDE" or r[1] in ("forbidden", "unreadable") for r in results)


def test_static_symlinks_out_of_the_folder_are_forbidden_and_inside_ones_read(tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "a.png").write_bytes(b"A")
    (tmp_path / "secret.txt").write_bytes(b"OUTSIDE")
    (photos / "out.png").symlink_to(tmp_path / "secret.txt")
    (photos / "in.png").symlink_to(photos / "a.png")
    (photos / "dirlink").symlink_to(tmp_path)  # a directory link out of the folder
    allow = (str(photos),)
    assert reading.fetch(str(photos / "out.png"), allow=allow) == FORBIDDEN
    assert reading.fetch(str(photos / "dirlink" / "secret.txt"), allow=allow) == FORBIDDEN
    assert reading.file_size(str(photos / "out.png"), allow=allow) == FORBIDDEN
    assert reading.fetch(str(photos / "in.png"), allow=allow) == (b"A", None, None)
    res = reading.fetch_all([str(photos / "out.png"), str(photos / "in.png"), str(photos / "dirlink/secret.txt")],
                           allow=allow)
    assert res == [FORBIDDEN, (b"A", None, None), FORBIDDEN]


# ------------------------------------------------------------------------------------------------------
# 2: odd paths in a manifest are error rows, never an exception that fails the batch
# ------------------------------------------------------------------------------------------------------

def test_odd_paths_never_raise_and_are_error_rows(tmp_path):
    folder = tmp_path / "photos"
    (folder / "%2e%2e").mkdir(parents=True)
    (folder / "ok.jpg").write_bytes(b"OK")
    (tmp_path / "secret.txt").write_bytes(b"OUTSIDE")
    allow = (paths.default_allow_prefix(str(folder / "list.csv")),)
    odd = _odd_paths(folder)
    for p in odd + ["s3://b/photos/%2e%2e/x.jpg"]:
        paths.normalize_path(p, str(folder))
        paths.normalize_path(p)
        paths.resolve_path(p, str(folder))
        assert isinstance(paths.is_allowed(paths.resolve_path(p, str(folder)), allow), bool), p
    uris = [paths.resolve_path(p, str(folder)) for p in odd] + [str(folder / "ok.jpg")]
    for confined, res in ((True, reading.fetch_all(uris, allow=allow)), (True, [reading.fetch(u, allow=allow) for u in uris]),
                          (False, reading.fetch_all(uris)), (False, [reading.fetch(u) for u in uris])):
        assert res[-1] == (b"OK", None, None)
        for p, (data, kind, message) in zip(odd, res[:-1]):
            if not confined and ".." in p and "%" not in p:  # without --allow-prefix, ../secret.txt is a file
                continue
            assert data is None and kind in ("unreadable", "forbidden"), (p[:60], kind, message)
            assert isinstance(message, str) and 0 < len(message) < 200, (p[:60], message)
            message.encode("utf-8")  # goes to a Parquet string column
    assert reading.fetch_all(["", str(folder / "b\x00.jpg")], allow=allow)[1][1:] == ("unreadable", "path contains a NUL byte")
    assert reading.fetch_all([str(folder / ("n" * 300))], allow=allow)[0][1:] == ("unreadable", "file name too long")
    assert reading.fetch("s3://")[1:] == ("unreadable", "not an s3://bucket/key URI")
    assert reading.fetch("s3://bucket/")[1:] == ("unreadable", "not an s3://bucket/key URI")
    assert not paths.is_allowed("", allow) and not paths.is_allowed(str(folder / "%2e%2e/../../secret.txt"), allow)


def test_s3_percent_encoded_dot_segments_are_outside_the_prefix():
    allow = ("s3://photos/batch-1/",)
    for uri in ("s3://photos/batch-1/%2e%2e/other/x.jpg", "s3://photos/batch-1/%2E%2E%2Fother/x.jpg",
                "s3://photos/batch-1/..%2fx.jpg", "s3://photos/batch-1/sub/%2e%2e/%2e%2e/x.jpg"):
        assert not paths.is_allowed(uri, allow), uri
    assert paths.is_allowed("s3://photos/batch-1/sub/%2e%2e/x.jpg", allow)  # stays inside either way
    assert paths.is_allowed("s3://photos/batch-1/100%25 real.jpg", allow)


def test_odd_s3_paths_against_a_real_endpoint_are_error_rows(s3_bucket):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="photos/ok.jpg", Body=b"OK")
    client.put_object(Bucket=bucket, Key="secret.txt", Body=b"OUTSIDE")
    allow = (f"s3://{bucket}/photos/",)
    odd = [f"s3://{bucket}/photos/%2e%2e/secret.txt", f"s3://{bucket}/photos/../secret.txt", f"s3://{bucket}",
           f"s3://{bucket}/", f"s3://{bucket}/photos/b\x00.jpg", f"s3://{bucket}/photos/" + "k" * 2000,
           f"s3://{bucket}/photos/lone\ud800.jpg", "s3://", "s3:///photos/ok.jpg", f"s3://{bucket}/photos/missing.jpg"]
    res = reading.fetch_all(odd + [f"s3://{bucket}/photos/ok.jpg"], allow=allow, timeout=30)
    assert res[-1] == (b"OK", None, None)
    for p, (data, kind, message) in zip(odd, res[:-1]):
        assert data is None and kind in ("unreadable", "forbidden"), (p[:80], kind, message)
        assert 0 < len(message) < 200
    assert res[0] == res[1] == FORBIDDEN
    # '#' and '?' are part of a key, not a URL's fragment or query: the key read is the key that was checked
    tricks = [f"s3://{bucket}/secret.txt#/../photos/ok.jpg", f"s3://{bucket}/secret.txt?/../photos/ok.jpg"]
    for r in reading.fetch_all(tricks, allow=allow, timeout=30) + [reading.fetch(u, allow=allow) for u in tricks]:
        assert r[0] != b"OUTSIDE", r


def test_a_manifest_with_odd_rows_is_listed_and_each_row_is_an_error_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(b"OK")
    odd = [p for p in _odd_paths(folder) if p and "\ud800" not in p and "\udcff" not in p]
    csv = folder / "list.csv"
    csv.write_bytes(b"path\n" + b"\n".join(p.encode() for p in odd)
                    + b"\nbad\xff\xfe.jpg\nother\xff.jpg\nok.jpg\n")
    # a Parquet manifest whose string column holds bytes that are not UTF-8 (written by another tool)
    values = [p.encode() for p in odd] + [b"bad\xff\xfe.jpg", b"other\xff.jpg", b"ok.jpg"]
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v))
    col = pa.Array.from_buffers(pa.string(), len(values),
                                [None, pa.py_buffer(pa.array(offsets, pa.int32()).buffers()[1]), pa.py_buffer(b"".join(values))])
    pq.write_table(pa.table({"path": col}), folder / "list.parquet")
    allow = (str(folder),)
    for manifest in (csv, folder / "list.parquet"):
        out = tmp_path / f"listing-{manifest.suffix[1:]}"
        stats = inputs.write_manifest_listing(str(manifest), str(out), str(folder))
        listed = _listed(out)
        assert stats.files == len(values) and stats.inputs == len(listed) == len(values) - 2  # 2 spellings twice
        assert "bad\\xff\\xfe.jpg" in listed and "other\\xff.jpg" in listed  # not UTF-8: shown as \xNN escapes
        res = reading.fetch_all([paths.resolve_path(p, str(folder)) for p in listed], allow=allow)
        assert res[-1] == (b"OK", None, None)
        assert all(r[0] is None and r[1] in ("unreadable", "forbidden") for r in res[:-1])
        assert inputs.manifest_rows(str(manifest)) == len(values)


def test_a_folder_with_a_file_name_that_is_not_utf8_is_listed(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(b"OK")
    with open(os.path.join(os.fsencode(folder), b"bad\xff.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff")
    stats = inputs.write_listing(str(folder), str(tmp_path / "listing"))
    listed = _listed(tmp_path / "listing")
    assert stats.inputs == 2 and listed[1] == str(folder / "ok.jpg")
    assert listed[0] == str(folder / "bad\\xff.jpg")
    kind, message = reading.fetch(listed[0], allow=(str(folder),))[1:]
    assert kind == "unreadable" and "not valid UTF-8" in message


# ------------------------------------------------------------------------------------------------------
# 3: the temporary file of a local write is created exclusively, with a name nobody can plant a link at
# ------------------------------------------------------------------------------------------------------

def test_write_bytes_does_not_follow_a_planted_temporary_link(tmp_path):
    import storage

    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    out = tmp_path / "out" / "summary.json"
    out.parent.mkdir()
    # the old name was "<path>.tmp-<pid>": plant a link there, and at every name in the folder's listing
    (out.parent / f"summary.json.tmp-{os.getpid()}").symlink_to(victim)
    storage.write_bytes(str(out), b"new content")
    assert victim.read_bytes() == b"precious"
    assert out.read_bytes() == b"new content" and not out.is_symlink()
    left = sorted(p.name for p in out.parent.iterdir())
    assert left == sorted(["summary.json", f"summary.json.tmp-{os.getpid()}"])  # no temporary file left behind
    assert (out.stat().st_mode & 0o777) == (0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
