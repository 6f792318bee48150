"""Hidden entries of a folder input (a name starting with '.') are still skipped, but counted and named: a user
whose photos sit under a hidden folder, or were synced as ``.IMG_x.jpg``, is told why they have no rows
(``Listing.skipped_hidden``, ``hidden_examples``, ``hidden_text``). Locally a hidden folder is one entry and is
not listed; on S3 each key with a hidden segment under the prefix is one. Each test failed on the code before."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq

from facedata import inputs, paths

JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 60


def _listed(listing_dir) -> list[str]:
    return [p for f in sorted(os.listdir(listing_dir)) for p in pq.read_table(os.path.join(listing_dir, f))
            .column("path").to_pylist()]


def _write(path, data: bytes = JPEG) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _local_listing(folder, tmp_path):
    stats = inputs.write_listing(str(folder), str(tmp_path / "listing"),
                                 allow=(paths.default_allow_prefix(str(folder)),))
    return stats, _listed(tmp_path / "listing")


# --- a local folder ---------------------------------------------------------------------------------------------

def test_hidden_files_and_a_hidden_folder_of_images_are_counted_and_named(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    _write(folder / ".DS_Store", b"Bud1\x00\x00\x10\x00")
    _write(folder / "._IMG_0001.jpg", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    for name in ("t1.jpg", "t2.jpg", "deep/t3.jpg"):  # 3 images, one entry: the folder is not listed
        _write(folder / ".thumbnails" / name)
    visible = ["IMG_0001.jpg", "b.png", "sub/c.jpg", "sub/deeper/d.jpeg"]
    for name in visible:
        _write(folder / name)
    _write(folder / "notes.txt", b"not an image")

    scanned = []
    scandir = os.scandir
    monkeypatch.setattr(inputs.os, "scandir",
                        lambda p: (str(p).startswith(str(folder)) and scanned.append(str(p))) or scandir(p))
    stats, listed = _local_listing(folder, tmp_path)

    assert listed == [str(folder / name) for name in visible]  # every visible image, none of the hidden ones
    assert stats.inputs == 4 and stats.files == 5 and stats.skipped_not_image == 1
    assert stats.skipped_hidden == 3
    assert stats.hidden_examples == [".DS_Store", "._IMG_0001.jpg", ".thumbnails/"]
    assert stats.hidden_text() == ("3 hidden files or folders skipped (names starting with '.': .DS_Store, "
                                   "._IMG_0001.jpg, .thumbnails/)")
    # the cost is the walk's: the hidden folder was never listed, each other folder once
    assert sorted(scanned) == sorted(str(folder / p) for p in ("", "sub", "sub/deeper")) == sorted(set(scanned))


def test_hidden_entries_in_subfolders_are_named_relative_to_the_input_and_the_rest_elided(tmp_path):
    folder = tmp_path / "in"
    _write(folder / "a.jpg")
    _write(folder / "2024" / ".IMG_0002.jpg")  # synced as hidden: the case a user does not see coming
    _write(folder / "2024" / "b.jpg")
    _write(folder / "2024" / "trip" / ".picasa.ini", b"[Picasa]\n")
    _write(folder / "2024" / "trip" / ".cache" / "x.jpg")
    _write(folder / "2024" / "trip" / "c.jpg")
    _write(folder / "zz" / "._d.jpg")
    stats, listed = _local_listing(folder, tmp_path)

    assert listed == [str(folder / p) for p in ("a.jpg", "2024/b.jpg", "2024/trip/c.jpg")]
    assert stats.skipped_hidden == 4  # .IMG_0002.jpg, .cache/, .picasa.ini, ._d.jpg
    assert stats.hidden_examples == ["2024/.IMG_0002.jpg", "2024/trip/.cache/", "2024/trip/.picasa.ini"]
    assert stats.hidden_text() == ("4 hidden files or folders skipped (names starting with '.': 2024/.IMG_0002.jpg, "
                                   "2024/trip/.cache/, 2024/trip/.picasa.ini, ...)")


def test_one_hidden_folder_holding_all_the_photos_is_said(tmp_path):
    folder = tmp_path / "in"
    for i in range(5):
        _write(folder / ".photos" / f"IMG_{i:04d}.jpg")
    stats, listed = _local_listing(folder, tmp_path)
    assert listed == [] and stats.inputs == 0 and stats.files == 0
    assert stats.skipped_hidden == 1 and stats.hidden_examples == [".photos/"]
    assert stats.hidden_text() == "1 hidden file or folder skipped (names starting with '.': .photos/)"


def test_no_hidden_entry_says_nothing(tmp_path):
    folder = tmp_path / "in"
    _write(folder / "a.jpg")
    _write(folder / "sub" / "b.jpg")
    stats, listed = _local_listing(folder, tmp_path)
    assert listed == [str(folder / "a.jpg"), str(folder / "sub" / "b.jpg")]
    assert stats.skipped_hidden == 0 and stats.hidden_examples == [] and stats.hidden_text() == ""


def test_a_hidden_name_that_is_not_utf8_is_named_with_escapes(tmp_path):
    folder = tmp_path / "in"
    _write(folder / "a.jpg")
    _write(os.fsdecode(os.fsencode(str(folder)) + b"/.\xff.jpg"))
    stats, listed = _local_listing(folder, tmp_path)
    assert listed == [str(folder / "a.jpg")]
    assert stats.skipped_hidden == 1 and stats.hidden_examples == [".\\xff.jpg"]
    json.dumps(stats.hidden_examples).encode("utf-8")  # what the summary writes
    assert stats.hidden_text().encode("utf-8")  # what the job prints


def test_hidden_text_counts_past_the_examples():
    listing = inputs.Listing(skipped_hidden=1, hidden_examples=[".thumbs/"])
    assert listing.hidden_text() == "1 hidden file or folder skipped (names starting with '.': .thumbs/)"
    for i in range(7):
        listing.hidden_entry(f".x{i}")
    assert listing.skipped_hidden == 8 and listing.hidden_examples == [".thumbs/", ".x0", ".x1"]
    assert listing.hidden_text().endswith("(names starting with '.': .thumbs/, .x0, .x1, ...)")


# --- an s3:// prefix --------------------------------------------------------------------------------------------

def test_hidden_keys_under_an_s3_prefix_are_counted_and_named(s3_bucket, tmp_path, monkeypatch):
    client, bucket = s3_bucket
    keys = {
        "photos/a.jpg": JPEG, "photos/sub/b.jpg": JPEG, "photos/sub/": b"",  # a folder marker: no file
        "photos/._b.jpg": b"\x00\x05\x16\x07", "photos/.thumbs/": b"", "photos/.thumbs/a.jpg": JPEG,
        "photos/.thumbs/c.jpg": JPEG, "photos/sub/.DS_Store": b"Bud1", "other/.x.jpg": JPEG,  # not under the prefix
    }
    for key, body in keys.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)

    calls = []
    make = inputs.storage.s3_client

    def counted(*a, **kw):
        c = make(*a, **kw)
        c.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
        return c

    monkeypatch.setattr(inputs.storage, "s3_client", counted)
    for uri in (f"s3://{bucket}/photos/", f"s3://{bucket}/photos"):
        calls.clear()
        stats = inputs.write_listing(uri, str(tmp_path / "listing"), allow=(f"s3://{bucket}/photos/",))
        assert _listed(tmp_path / "listing") == [f"s3://{bucket}/photos/a.jpg", f"s3://{bucket}/photos/sub/b.jpg"]
        assert stats.inputs == 2 and stats.files == 2 and stats.skipped_not_image == 0
        # each key with a hidden segment, not the folder marker nor the key outside the prefix
        assert stats.skipped_hidden == 4
        assert stats.hidden_examples == ["._b.jpg", ".thumbs/a.jpg", ".thumbs/c.jpg"]
        assert stats.hidden_text() == ("4 hidden files or folders skipped (names starting with '.': ._b.jpg, "
                                       ".thumbs/a.jpg, .thumbs/c.jpg, ...)")
        assert calls == ["ListObjectsV2"]  # one page, as before: counting costs no request


def test_an_s3_prefix_holding_only_hidden_keys_is_said(s3_bucket, tmp_path):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="in/.IMG_0001.jpg", Body=JPEG)
    stats = inputs.write_listing(f"s3://{bucket}/in/", str(tmp_path / "listing"))
    assert _listed(tmp_path / "listing") == [] and stats.inputs == 0
    assert stats.skipped_hidden == 1 and stats.hidden_examples == [".IMG_0001.jpg"]
    assert stats.hidden_text() == "1 hidden file or folder skipped (names starting with '.': .IMG_0001.jpg)"
