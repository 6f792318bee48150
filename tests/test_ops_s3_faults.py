"""S3 faults the label job rides out or reports in one line (an audit with a fault-injecting proxy, 2026-12):
a burst of 503 SlowDown longer than the SDKs' default 3 attempts (storage.s3_client, storage's pyarrow
filesystem: 10 attempts), a listing that fails for good (one ``error:`` line naming the prefix, no traceback),
and a lease store failing transiently (retried for a bounded time, then ``LeaseLost``) or for good at release
(a warning; the run's own error is the one raised).

The faults come from tests/faultproxy.py's ``FaultProxy``, an HTTP proxy in this process in front of the moto server
(conftest's ``s3_server``), the AWS environment pointed at it; botocore's backoff is made short for the tests
(``fast_backoff``), the lease store's by its parameters."""

from __future__ import annotations

import logging
import socket
import time

import pytest

import storage
from facedata import inputs
from raytasks.label import lease_store
from raytasks.label.lease import Lease, LeaseLost
from tests.faultproxy import DENIED, FaultProxy
from tests.images import face_jpeg


@pytest.fixture
def fast_backoff(monkeypatch):
    """botocore's standard-mode backoff (1 s, 2 s, 4 s, ... for throttling) made 10 ms: the attempts are
    what the tests count."""
    from botocore.retries import standard

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, context: 0.01)


@pytest.fixture
def proxy(s3_bucket, monkeypatch, fast_backoff):
    """``(FaultProxy, bucket)``: the AWS environment points at the proxy, in front of the moto server."""
    client, bucket = s3_bucket
    p = FaultProxy(client.meta.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    try:
        yield p, bucket
    finally:
        p.close()


def _photos(bucket: str, n: int = 3) -> list[str]:
    import boto3

    client = boto3.client("s3", region_name="us-east-1")  # AWS_ENDPOINT_URL: through the proxy
    for i in range(n):
        client.put_object(Bucket=bucket, Key=f"photos/p{i}.jpg", Body=face_jpeg(i))
    return [f"s3://{bucket}/photos/p{i}.jpg" for i in range(n)]


# --- 1. a burst of SlowDown longer than 3 attempts ------------------------------------------------------------
def test_a_listing_rides_out_four_slowdowns(proxy):
    p, bucket = proxy
    want = _photos(bucket)
    p.fail("list-type=2", times=4)
    assert list(inputs.iter_folder(f"s3://{bucket}/photos/")) == want  # 3 attempts failed here before
    assert len(p.failed(503)) == 4


def test_a_pyarrow_read_rides_out_three_slowdowns(proxy):
    p, bucket = proxy
    uri = _photos(bucket, 1)[0]
    # 3 refusals, the most the default 3 attempts failed on (the C++ SDK's backoff is not shortened here: 1, 2,
    # 4 s at most for a throttling answer)
    p.fail("photos/p0.jpg", times=3, method="GET")
    assert storage.read_bytes(uri) == face_jpeg(0)
    assert len(p.failed(503)) == 3


def test_every_client_has_the_retry_settings():
    client = storage.s3_client()
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": storage.S3_MAX_ATTEMPTS}
    assert client.meta.config.connect_timeout == storage.S3_CONNECT_TIMEOUT_S
    store = lease_store._Store("s3://b/out/_lease")  # one attempt a call: the store retries, bounded in time
    assert store.client.meta.config.retries["total_max_attempts"] == 1


# --- 2. a listing that fails for good -------------------------------------------------------------------------
def test_a_listing_failing_for_good_is_an_input_error_naming_the_prefix(proxy):
    p, bucket = proxy
    _photos(bucket)
    p.fail("list-type=2")
    with pytest.raises(inputs.InputError, match=f"cannot list s3://{bucket}/photos/ .*SlowDown.*run the same "
                                                "command again"):
        list(inputs.iter_folder(f"s3://{bucket}/photos/"))
    assert len(p.failed(503)) == storage.S3_MAX_ATTEMPTS


def _label_error_line(monkeypatch, capsys, hs_checkpoint, uri: str, out) -> str:
    """``jobs.label.main`` over ``uri`` with Ray and the cluster checks stubbed out (the job fails at its inputs,
    before anything runs on Ray): exit status 2 and the one ``error:`` line it printed, no traceback."""
    import jobs.label
    import raytasks.label.job as job

    for mod, name in ((jobs.label, "ensure_ray"), (job, "ensure_ray"), (job, "check_reachable"),
                      (job, "check_decode_fits")):
        monkeypatch.setattr(mod, name, lambda *a, **k: None)
    monkeypatch.setattr(job, "resolve_pool", lambda *a, **k: (1, 1))
    with pytest.raises(SystemExit) as exit_:
        jobs.label.main(["--checkpoint", hs_checkpoint, "--input", uri, "--output", str(out), "--faces", "whole"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_the_job_prints_one_error_line_when_the_listing_fails(proxy, hs_checkpoint, tmp_path, monkeypatch, capsys):
    """``python -m jobs.label`` over a prefix whose listing S3 keeps refusing: ``error: ...`` naming the prefix,
    exit status 2, no traceback (it was a botocore ClientError traceback, rc 1). Ray is not started: the job
    fails at the listing, before anything runs on it."""
    p, bucket = proxy
    _photos(bucket)
    p.fail("list-type=2", agent="botocore")  # the job's listing (pyarrow's HEAD/list of the prefix passes)
    line = _label_error_line(monkeypatch, capsys, hs_checkpoint, f"s3://{bucket}/photos/", tmp_path / "out")
    assert f"cannot list s3://{bucket}/photos/" in line and "run the same command again" in line


# --- 3. the lease store -----------------------------------------------------------------------------------------
def test_a_fence_check_rides_out_a_burst(proxy):
    p, bucket = proxy
    lease = Lease(f"s3://{bucket}/out", renew=False).acquire()
    fence = lease.fence()
    p.fail("_lease", times=4)  # the listing and the read of the top: 4 refusals (3 attempts failed before)
    fence.check()
    assert len(p.failed(503)) == 4
    p.clear()
    lease.release()


def test_a_lease_store_failing_for_good_is_a_lost_lease_within_its_bound(proxy):
    p, bucket = proxy
    lease = Lease(f"s3://{bucket}/out", ttl_s=4.0, renew=False).acquire()
    fence = lease.fence()
    p.fail("_lease")
    start = time.monotonic()
    with pytest.raises(LeaseLost, match="cannot be read.*SlowDown.*stops writing"):
        fence.check()
    assert time.monotonic() - start < 5 and fence.retry_s == 1.0  # retried for a quarter of the ttl
    assert len(p.failed(503)) >= 3  # retried, with backoff, before it gave up
    p.clear()
    lease.release()


def test_the_store_retries_each_operation_with_its_parameters(proxy):
    p, bucket = proxy
    store = lease_store._Store(f"s3://{bucket}/x/_lease", retry_s=5.0, backoff_s=0.01)
    p.fail("_lease/000000000001.json", times=5, method="PUT")
    assert store.create("000000000001.json", b"body-1")
    p.fail("_lease/000000000001.json", times=5, method="GET")
    assert store.get("000000000001.json") == b"body-1"
    p.fail("_lease", times=5, method="DELETE")
    store.delete("000000000001.json")
    p.fail("list-type=2", times=5)
    assert store.names() == []
    assert len(p.failed(503)) == 20
    p.clear()
    p.fail("_lease", error=DENIED)  # not transient: raised at once, not retried
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="AccessDenied"):
        store.names()
    assert len(p.failed(403)) == 1


def test_a_release_that_fails_is_a_warning_under_the_runs_own_error(proxy, tmp_path, monkeypatch, caplog):
    """The store refusing the release (past its retries) left the lease ``released: false`` and raised its
    ClientError over the run's error; now the run's error is raised and the release's is a warning."""
    import raytasks.label.job as job
    from raytasks.label.spec import LabelSpec

    p, bucket = proxy
    monkeypatch.setattr(job, "ensure_ray", lambda *a, **k: None)
    monkeypatch.setattr(job, "check_reachable", lambda *a, **k: None)

    def run(spec, labeler, echo, fence):
        fence.check()
        p.fail("_lease", error=DENIED)  # from here on the lease store refuses every request
        raise RuntimeError("the run's own error")

    monkeypatch.setattr(job, "_label", run)
    spec = LabelSpec(checkpoint=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=f"s3://{bucket}/out",
                     allow_prefix=(str(tmp_path),))
    with caplog.at_level(logging.WARNING, logger=job.__name__), \
            pytest.raises(RuntimeError, match="the run's own error"):
        job.label(spec, echo=lambda line: None, labeler=object())  # no checkpoint read: the run is a stand-in
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"could not release the lease on s3://{bucket}/out" in m and "AccessDenied" in m for m in warned)


def test_the_proxy_forwards(proxy):
    """The proxy itself: requests without a rule reach moto unchanged."""
    p, bucket = proxy
    uri = _photos(bucket, 1)[0]
    assert storage.read_bytes(uri) == face_jpeg(0) and not p.failed()
    with socket.create_connection(("127.0.0.1", p.port), timeout=5):
        pass


def test_the_job_prints_one_error_line_when_pyarrows_look_at_the_input_fails(proxy, hs_checkpoint, tmp_path,
                                                                              monkeypatch, capsys):
    """The same for the first look at ``--input`` (pyarrow's ``get_file_info``: an ``OSError``); 2 attempts
    (``AWS_MAX_ATTEMPTS``) keep the C++ SDK's backoff short."""
    p, bucket = proxy
    _photos(bucket)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    p.fail("list-type=2")
    line = _label_error_line(monkeypatch, capsys, hs_checkpoint, f"s3://{bucket}/photos/", tmp_path / "out")
    assert f"cannot list --input s3://{bucket}/photos/" in line and "run the same command again" in line
    assert len(p.failed(503)) == 2
