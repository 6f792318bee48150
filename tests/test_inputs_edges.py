"""The label job's inputs at their edges (the audit of 2026-12-06, findings 1, 2, 3, 6, 7 and 8, 9), without Ray:
a stray quote in a CSV manifest, the file's own line numbers for skipped lines, a folder that cannot be listed,
symlinked folders, S3 keys with an empty segment, a Parquet manifest with a corrupt page, and a file name that
is not UTF-8 next to one spelled like its escapes. Each test failed on the code before its fix."""

from __future__ import annotations

import errno
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facedata import inputs, paths, reading

JPEG_HEAD = b"\xff\xd8\xff\xe0" + b"\x00" * 60


def _listed(listing_dir) -> list[str]:
    return [p for f in sorted(os.listdir(listing_dir)) for p in pq.read_table(os.path.join(listing_dir, f))
            .column("path").to_pylist()]


def _listing(folder, tmp_path, allow=None):
    allow = (paths.default_allow_prefix(str(folder)),) if allow is None else allow
    stats = inputs.write_listing(str(folder), str(tmp_path / "listing"), allow=allow)
    return stats, _listed(tmp_path / "listing")


# --------------------------------------------------------------------------------------------------------
# 1. a quote that opens and is not closed on its line refuses the manifest, naming that line
# --------------------------------------------------------------------------------------------------------

def test_an_unclosed_quote_in_the_path_column_refuses_the_manifest_naming_its_line(tmp_path):
    m = tmp_path / "m.csv"
    # 120,000 lines (2 MB): pyarrow's reader swallowed the rest of the quote's 1 MB block, about 60,000 good lines
    m.write_text("path,label\n" + "".join(('"' if i == 70_000 else "") + f"img{i:06d}.jpg,{i % 2}\n"
                                           for i in range(120_000)))
    with pytest.raises(inputs.InputError, match=r'line 70002 opens a quote \(\"\) that is not closed on that line'):
        inputs.write_manifest_listing(str(m), str(tmp_path / "listing"), str(tmp_path))
    with pytest.raises(inputs.InputError, match="line 70002 opens a quote"):
        inputs.manifest_rows(str(m))
    early = tmp_path / "early.csv"  # in the block the header is read from: the header check refuses it already
    early.write_text('path,label\na.jpg,0\n"b.jpg,1\nc.jpg,0\n')
    with pytest.raises(inputs.InputError, match="line 3 opens a quote"):
        inputs.check_manifest(str(early))


def test_an_unclosed_quote_in_a_label_column_refuses_the_manifest(tmp_path):
    # the lines after it went into the label column of one valid row: no malformed line, nothing said at all
    m = tmp_path / "m.csv"
    m.write_text('path,label\na.jpg,0\nb.jpg,"1\nc.jpg,0\nd.jpg,"1\ne.jpg,0\n')
    with pytest.raises(inputs.InputError, match="line 3 opens a quote"):
        inputs.write_manifest_listing(str(m), str(tmp_path / "listing"), str(tmp_path))
    header = tmp_path / "h.csv"
    header.write_text('"path,label\na.jpg,0\n')
    with pytest.raises(inputs.InputError, match="line 1 opens a quote"):
        inputs.check_manifest(str(header))


def test_quotes_that_close_on_their_line_are_read_as_before(tmp_path):
    m = tmp_path / "m.csv"
    m.write_bytes(b'path,label\n"a,b.jpg",1\nx"y.jpg,2\n"p"q.jpg,3\n"r""s.jpg","4"\n"t.jpg,5",6,7\n')
    stats = inputs.write_manifest_listing(str(m), str(tmp_path / "listing"), str(tmp_path))
    assert _listed(tmp_path / "listing") == ["a,b.jpg", 'x"y.jpg', "pq.jpg", 'r"s.jpg']
    assert stats.malformed_examples == [{"line": 6, "fields": 3, "expected": 2, "text": '"t.jpg,5",6,7'}]


# --------------------------------------------------------------------------------------------------------
# 8. a skipped line is named by its line in the file
# --------------------------------------------------------------------------------------------------------

def test_malformed_lines_are_named_by_their_line_in_the_file(tmp_path):
    for end in ("\n", "\r\n", "\r"):
        m = tmp_path / "m.csv"
        lines = ["", "path,x", "", "", "a.jpg,1", "b.jpg,1,BAD", "   ", "c.jpg,2", "", "d.jpg", "e.jpg,3"]
        m.write_bytes(end.join(lines).encode())
        stats = inputs.write_manifest_listing(str(m), str(tmp_path / "listing"), str(tmp_path))
        assert [(e["line"], e["text"]) for e in stats.malformed_examples] == [
            (6, "b.jpg,1,BAD"), (7, "   "), (10, "d.jpg")], repr(end)
        assert stats.malformed_text().startswith("3 manifest lines skipped, malformed (line 6: ")
        assert _listed(tmp_path / "listing") == ["a.jpg", "c.jpg", "e.jpg"]


def test_line_numbers_hold_across_pyarrows_blocks(tmp_path):
    m = tmp_path / "m.csv"
    text = ["path,x"] + [("" if i % 7 == 0 else f"img{i:06d}.jpg,{i}") for i in range(120_000)] + ["z.jpg,1,BAD"]
    m.write_text("\r\n".join(text) + "\r\n")  # 2.4 MB: three blocks, and blank lines all the way
    stats = inputs.write_manifest_listing(str(m), str(tmp_path / "listing"), str(tmp_path))
    assert stats.malformed_examples[0]["line"] == len(text)
    assert stats.inputs == 120_000 - len(range(0, 120_000, 7))


# --------------------------------------------------------------------------------------------------------
# 2. a folder that cannot be listed fails the listing, naming it
# --------------------------------------------------------------------------------------------------------

def test_a_folder_that_cannot_be_listed_is_an_error_naming_it(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    (folder / "2024").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(JPEG_HEAD)
    (folder / "2024" / "b.jpg").write_bytes(JPEG_HEAD)
    # root lists a mode-000 folder, so the error (a stale NFS handle, EIO, EACCES) is raised where it comes from
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(folder / "2024"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(inputs.InputError, match=r"cannot list the folder .*/photos/2024 \(Input/output error\)"):
        _listing(folder, tmp_path)


# --------------------------------------------------------------------------------------------------------
# 6. a symlinked folder is followed where its target may be read, and is a forbidden row elsewhere
# --------------------------------------------------------------------------------------------------------

def _photos_and_archive(tmp_path):
    photos, archive = tmp_path / "data" / "photos", tmp_path / "data" / "archive2023"
    photos.mkdir(parents=True)
    archive.mkdir()
    (photos / "new.jpg").write_bytes(JPEG_HEAD)
    for i in range(3):
        (archive / f"old{i}.jpg").write_bytes(JPEG_HEAD)
    (photos / "2023").symlink_to(archive)
    return photos, archive


def test_a_symlinked_folder_inside_the_allowed_prefix_is_listed_and_read(tmp_path):
    photos, archive = _photos_and_archive(tmp_path)
    allow = (str(tmp_path / "data"),)
    stats, listed = _listing(photos, tmp_path, allow)
    assert listed == [str(photos / "new.jpg")] + [str(photos / "2023" / f"old{i}.jpg") for i in range(3)]
    assert (stats.files, stats.inputs) == (4, 4)
    assert reading.fetch_all(listed, allow=allow) == [(JPEG_HEAD, None, None)] * 4


@pytest.mark.parametrize("allowed", ["the folder", "the folder and the target"])
def test_a_symlinked_folder_out_of_the_folder_is_a_forbidden_row(tmp_path, allowed):
    # as a symlinked file is: a path must be inside one prefix as written and resolved (facedata.paths.is_allowed)
    photos, archive = _photos_and_archive(tmp_path)
    allow = (str(photos),) + ((str(archive),) if allowed == "the folder and the target" else ())
    (photos / "file_link.jpg").symlink_to(archive / "old0.jpg")
    stats, listed = _listing(photos, tmp_path, allow)
    assert listed == [str(photos / "2023"), str(photos / "file_link.jpg"), str(photos / "new.jpg")]
    assert stats.skipped_not_image == 0
    forbidden = (None, *paths.FORBIDDEN)
    assert reading.fetch_all(listed, allow=allow) == [forbidden, forbidden, (JPEG_HEAD, None, None)]


def test_symlinked_folders_that_loop_are_listed_once(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(JPEG_HEAD)
    (folder / "sub" / "b.jpg").write_bytes(JPEG_HEAD)
    (folder / "sub" / "up").symlink_to(folder)  # a loop
    (folder / "zz_same").symlink_to(folder / "sub")  # the same folder a second way
    stats, listed = _listing(folder, tmp_path)
    assert listed == [str(folder / "a.jpg"), str(folder / "sub" / "b.jpg")] and stats.files == 2


# --------------------------------------------------------------------------------------------------------
# 3. an S3 key with an empty segment is its own object, and an error row that says why it is not read
# --------------------------------------------------------------------------------------------------------

def test_s3_keys_with_an_empty_segment_are_other_objects(tmp_path):
    n = paths.normalize_path
    assert n("s3://b/photos//c.jpg") == "s3://b/photos//c.jpg" != n("s3://b/photos/c.jpg")
    assert n("s3://b//c.jpg") == "s3://b//c.jpg"
    assert n("s3://b/photos/x/..//c.jpg") == "s3://b/photos//c.jpg"  # dot segments still go
    m = tmp_path / "m.csv"
    m.write_text("path\ns3://bkt/photos/c.jpg\ns3://bkt/photos//c.jpg\ns3://bkt/photos/./c.jpg\n")
    stats = inputs.write_manifest_listing(str(m), str(tmp_path / "listing"), str(tmp_path))
    assert (stats.inputs, stats.duplicates) == (2, 1)


def test_an_s3_key_with_an_empty_segment_is_an_error_row_that_says_why(tmp_path):
    # pyarrow's S3 client refuses such a key ("Empty path component"); the row says what it is and what to do,
    # before anything is sent to the store
    uris = ["s3://bkt/photos//c.jpg", "s3://bkt//c.jpg", "s3://bkt/photos/sub//d.jpg"]
    rows = reading.fetch_all(uris, allow=("s3://bkt/",)) + [reading.fetch(uris[0]), reading.file_size(uris[0])]
    for data, kind, message in rows:
        assert (data, kind) == (None, "unreadable")
        assert message.startswith("S3 key with an empty segment ('//' or a leading '/')") and "copy the object" in message


# --------------------------------------------------------------------------------------------------------
# 7 (its third part). a Parquet manifest with a corrupt data page is an InputError naming the file
# --------------------------------------------------------------------------------------------------------

def test_a_parquet_manifest_with_a_corrupt_page_is_an_input_error(tmp_path):
    m = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": [f"img{i:05d}.jpg" for i in range(20_000)]}), m, compression="snappy",
                   row_group_size=5000)
    data = bytearray(m.read_bytes())
    for off in range(len(data) // 3, len(data) // 3 + 200):
        data[off] ^= 0x5A
    m.write_bytes(bytes(data))
    inputs.check_manifest(str(m))  # the footer is sound
    with pytest.raises(inputs.InputError, match=f"manifest {m} cannot be read as Parquet: "):
        inputs.write_manifest_listing(str(m), str(tmp_path / "listing"), str(tmp_path))


# --------------------------------------------------------------------------------------------------------
# 9. two files are never listed under one path
# --------------------------------------------------------------------------------------------------------

def test_a_name_that_is_not_utf8_and_one_spelled_like_its_escapes_are_refused(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    with open(os.path.join(os.fsencode(folder), b"a\xff.jpg"), "wb") as f:
        f.write(JPEG_HEAD)
    (folder / "a\\xff.jpg").write_bytes(JPEG_HEAD)
    with pytest.raises(inputs.InputError, match=r"would both be listed as '.*/in/a\\xff\.jpg'"):
        _listing(folder, tmp_path)
    os.remove(folder / "a\\xff.jpg")  # alone, the name that is not UTF-8 is listed with its escapes, as before
    stats, listed = _listing(folder, tmp_path)
    assert listed == [str(folder / "a\\xff.jpg")] and stats.inputs == 1


def test_a_folder_named_like_a_manifest_is_not_reported_as_missing(tmp_path):
    from facedata.manifest_inputs import check_manifest

    (tmp_path / "photos.csv").mkdir()
    with pytest.raises(inputs.InputError, match="is not a file"):
        check_manifest(str(tmp_path / "photos.csv"))
    with pytest.raises(inputs.InputError, match="manifest not found"):
        check_manifest(str(tmp_path / "other.csv"))
