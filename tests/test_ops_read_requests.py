"""An S3 image costs one HEAD and one GET. The size check (``file_size``), ``fetch``'s own look-up and
``open_input_stream`` each made a HEAD: three per image, tripling the request cost and meeting S3's per-prefix
rate limit (503 SlowDown) about three times sooner. Counted in moto's request log (a real socket), as
tests/test_core.py counts a large object's GETs."""

from __future__ import annotations

import logging

from facedata import reading
from tests.images import face_jpeg


def _counter(caplog, bucket: str):
    def count(call, keys) -> tuple[int, int, object]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="werkzeug"):
            out = call()
        lines = [r.getMessage() for r in caplog.records]
        heads = sum(f"HEAD /{bucket}/photos/{k} " in m for m in lines for k in keys)
        gets = sum(f"GET /{bucket}/photos/{k} " in m for m in lines for k in keys)
        return heads, gets, out
    return count


def test_an_s3_image_is_one_head_and_one_get(s3_bucket, caplog):
    client, bucket = s3_bucket
    images = {f"f{i}.jpg": face_jpeg(i) for i in range(5)}
    for k, v in images.items():
        client.put_object(Bucket=bucket, Key=f"photos/{k}", Body=v)
    uri = f"s3://{bucket}/photos/"
    allow = (uri,)
    count = _counter(caplog, bucket)

    # what the label job's read tasks call (raytasks/label/decoding.py): sizes first, then the chunks' reads
    heads, gets, res = count(lambda: reading.fetch_all([uri + "f0.jpg"], allow=allow), ["f0.jpg"])
    assert res == [(images["f0.jpg"], None, None)]
    assert (heads, gets) == (1, 1)

    keys = sorted(images)
    heads, gets, res = count(lambda: reading.fetch_all([uri + k for k in keys], allow=allow), keys)
    assert res == [(images[k], None, None) for k in keys]
    assert (heads, gets) == (5, 5)

    # several chunks (a batch bound of one image): each object still read through the file its HEAD opened
    small = max(len(v) for v in images.values())
    chunks = list(reading.fetch_chunks([uri + k for k in keys], max_batch_bytes=small, allow=allow))
    assert len(chunks) == 5
    heads, gets, res = count(lambda: reading.fetch_all([uri + k for k in keys], max_batch_bytes=small, allow=allow),
                             keys)
    assert res == [(images[k], None, None) for k in keys] and (heads, gets) == (5, 5)

    heads, gets, res = count(lambda: reading.fetch(uri + "f1.jpg", allow=allow), ["f1.jpg"])
    assert res == (images["f1.jpg"], None, None) and (heads, gets) == (1, 1)

    heads, gets, res = count(lambda: reading.file_size(uri + "f2.jpg", allow), ["f2.jpg"])
    assert res == (len(images["f2.jpg"]), None, None) and (heads, gets) == (1, 0)


def test_the_size_limit_still_comes_before_any_byte_is_read(s3_bucket, caplog):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="photos/big.jpg", Body=b"\xff\xd8" + b"x" * 5000)
    client.put_object(Bucket=bucket, Key="photos/sub/inner.jpg", Body=b"x")
    client.put_object(Bucket=bucket, Key="photos/empty.jpg", Body=b"")
    uri = f"s3://{bucket}/photos/"
    count = _counter(caplog, bucket)
    heads, gets, res = count(lambda: reading.fetch_all([uri + "big.jpg"], max_bytes=1000), ["big.jpg"])
    assert res == [(None, "too_large", "file is 5002 bytes, over the limit of 1000")] and (heads, gets) == (1, 0)
    heads, gets, res = count(lambda: reading.fetch(uri + "big.jpg", max_bytes=1000), ["big.jpg"])
    assert res == (None, "too_large", "file is 5002 bytes, over the limit of 1000") and (heads, gets) == (1, 0)
    # kinds the look-up gave before: a missing key, a "folder" (a prefix with objects under it), an empty object
    assert reading.fetch_all([uri + "missing.jpg", uri + "sub", uri + "empty.jpg"]) == [
        (None, "unreadable", "file not found"), (None, "unreadable", "not a regular file"), (b"", None, None)]
    assert reading.fetch(uri + "sub")[1:] == ("unreadable", "not a regular file")
    assert reading.file_size(uri + "missing.jpg")[1:] == ("unreadable", "file not found")
