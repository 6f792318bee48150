"""A label run stopped before its first commit (operations audit, 2026-12-06): an output whose ``labels/`` folder
exists but holds no file yet (what Ray Data leaves when the write has started and nothing committed: an empty
folder locally, a marker object on S3) is an output with no rows, not an unreadable one.

A run stopped by a signal (SIGTERM, ``ray job stop``: one last line and the signal's exit status) and the same
command run again, which labels every input exactly once: tests/test_ray_start_cluster.py, end to end (one test
with the ``ray start`` cluster's: each run there costs a Ray start)."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytasks.label.output import (
    all_labeled,
    labeled_spellings,
    output_provenance,
    output_stats,
    unlabeled_inputs,
)


def _assert_nothing_labeled(inputs_uri: str, labels_uri: str, n: int) -> None:
    st = output_stats(labels_uri)
    assert (st.rows, st.images, st.faces) == (0, 0, 0)
    assert labeled_spellings(None, labels_uri) is None
    assert output_provenance(labels_uri) == (set(), set())
    assert not all_labeled(inputs_uri, labels_uri)
    assert unlabeled_inputs(inputs_uri, labels_uri) == n


def test_an_empty_labels_folder_is_an_output_with_no_rows(tmp_path):
    from raytasks.label.job import LabelError, _read_output

    listing = tmp_path / "_inputs"
    listing.mkdir()
    pq.write_table(pa.table({"path": ["/d/a.jpg", "/d/b.jpg", "/d/c.jpg"]}), str(listing / "part-000000.parquet"))
    (tmp_path / "labels" / "sub").mkdir(parents=True)  # no file at any depth
    _assert_nothing_labeled(str(listing), str(tmp_path / "labels"), 3)
    # a file there that is not Parquet is still refused, with the message that names it
    (tmp_path / "labels" / "x_000000.parquet").write_bytes(b"")
    with pytest.raises(LabelError, match="not a complete Parquet file.*move it out"):
        _read_output(output_stats, {"labels": str(tmp_path / "labels")})


def test_an_empty_labels_prefix_on_s3_is_an_output_with_no_rows(s3_bucket):
    client, bucket = s3_bucket
    buf = io.BytesIO()
    pq.write_table(pa.table({"path": ["s3://x/a.jpg", "s3://x/b.jpg"]}), buf)
    client.put_object(Bucket=bucket, Key="out/_inputs/part-000000.parquet", Body=buf.getvalue())
    client.put_object(Bucket=bucket, Key="out/labels/", Body=b"")  # the folder marker Ray Data's write makes
    _assert_nothing_labeled(f"s3://{bucket}/out/_inputs", f"s3://{bucket}/out/labels", 2)
