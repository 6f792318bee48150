"""A model-set file is configuration that may come from a bucket (issue #22): read bounded in size and time,
without YAML aliases, and naming no local path when it comes from S3."""

from __future__ import annotations

import os
import threading
import time

import pytest

from core.modelset import ModelSetError, read_set_file

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "models: *i\n"


def test_a_set_file_with_aliases_is_refused_at_once(tmp_path):
    path = tmp_path / "set.yaml"
    path.write_text(LAUGHS)
    assert len(LAUGHS) < 500  # expands to 10**9 entries through aliases
    t = time.perf_counter()
    with pytest.raises(ModelSetError, match="anchor") as e:
        read_set_file(str(path))
    assert time.perf_counter() - t < 1.0 and len(str(e.value)) < 600  # quick, and quotes little of the file


def test_a_fifo_as_set_file_fails_fast(tmp_path):
    fifo = tmp_path / "set.yaml"
    os.mkfifo(fifo)
    out: list = []
    t = threading.Thread(target=lambda: out.append(pytest.raises(ModelSetError, read_set_file, str(fifo))), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading a FIFO as a set file hung"
    assert "cannot read" in str(out[0].value)


def test_a_set_file_from_s3_names_no_local_path(s3_bucket):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="sets/a.yaml",
                      Body=b"format: 1\nname: faces\nmodels:\n  agr: /etc/passwd\n")
    with pytest.raises(ModelSetError, match="not the local path '/etc/passwd'"):
        read_set_file(f"s3://{bucket}/sets/a.yaml")
    client.put_object(Bucket=bucket, Key="sets/b.yaml", Body=b"format: 1\nmodels:\n  agr: ../models/agr.pt\n")
    s = read_set_file(f"s3://{bucket}/sets/b.yaml")  # relative to the file: stays in the bucket
    assert s.members == (("agr", f"s3://{bucket}/sets/../models/agr.pt"),)
