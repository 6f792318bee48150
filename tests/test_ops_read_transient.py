"""A read that failed for a reason of the moment (S3 throttling, a 5xx, a connection reset or timed out, a read over
its timeout) is a ``transient`` row, not ``unreadable``: a missing file and a transient failure were one kind, and a
rerun (rows are committed by path) never read the throttled image again. Mapped from the exception texts pyarrow's
S3 client gives (collected against moto's server behind a fault-injecting proxy), and end to end through that proxy."""

from __future__ import annotations

import errno
import threading

import pytest

from facedata import reading
from tests.faultproxy import DENIED, RESET, SLOWDOWN, FaultProxy
from tests.images import face_jpeg

# the texts of pyarrow's OSErrors (errno None) after the client's retries, as its S3 client words them
WHERE = "When reading information for key 'photos/secret-name.jpg' in bucket 'bkt1': "
TRANSIENT = {
    "GET 503 SlowDown": "AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.",
    "HEAD 503": WHERE + "AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body.",
    "GET 503 ServiceUnavailable": "AWS Error SERVICE_UNAVAILABLE during GetObject operation: Service unavailable",
    "GET 500": "AWS Error INTERNAL_FAILURE during GetObject operation: We encountered an internal error. Please "
               "try again.",
    "HEAD 500": WHERE + "AWS Error UNKNOWN (HTTP status 500) during HeadObject operation: No response body.",
    "GET 502": "AWS Error UNKNOWN (HTTP status 502) during GetObject operation: ",
    "GET throttling": "AWS Error THROTTLING during GetObject operation: Rate exceeded",
    "GET reset": "AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 56, Failure when receiving "
                 "data from the peer; Details: Recv failure: Connection reset by peer",
    "HEAD reset": WHERE + "AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 56, Failure when "
                  "receiving data from the peer; Details: Recv failure: Connection reset by peer",
    "GET timeout": "AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 28, Timeout was reached",
    "GET refused": "AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7, Couldn't connect to "
                   "server; Details: Failed to connect to 127.0.0.1 port 9: Connection refused",
    "RequestTimeout": "AWS Error REQUEST_TIMEOUT during GetObject operation: Your socket connection to the server "
                      "was not read from or written to within the timeout period.",
    "429": "AWS Error UNKNOWN (HTTP status 429) during GetObject operation: ",
    # get_file_info's HEAD and LIST after a missing key's open (is it a folder?), throttled
    "info HEAD 503": "When getting information for key 'photos/secret-name.jpg' in bucket 'bkt1': AWS Error "
                     "UNKNOWN (HTTP status 503) during HeadObject operation: No response body.",
    "LIST SlowDown": "When listing objects under key 'photos/secret-name.jpg/' in bucket 'bkt1': AWS Error "
                     "SLOW_DOWN during ListObjectsV2 operation: Please reduce your request rate.",
}
AGAIN = "may succeed if run again"  # the end of every transient row's message
PERMANENT = {
    "GET 403": "AWS Error ACCESS_DENIED during GetObject operation: Access Denied",
    "HEAD 403": WHERE + "AWS Error ACCESS_DENIED during HeadObject operation: No response body.",
    "GET NoSuchKey": "AWS Error NO_SUCH_KEY during GetObject operation: The specified key does not exist.",
    "HEAD 400": WHERE + "AWS Error UNKNOWN (HTTP status 400) during HeadObject operation: No response body.",
    "403 with odd words": "AWS Error ACCESS_DENIED during GetObject operation: Please reduce your request rate.",
    "key named like an error": "When reading information for key 'AWS Error SLOW_DOWN' in bucket 'bkt1': AWS Error "
                               "ACCESS_DENIED during HeadObject operation: No response body.",
    "info HEAD 403": "When getting information for key 'photos/secret-name.jpg' in bucket 'bkt1': AWS Error "
                     "ACCESS_DENIED during HeadObject operation: No response body.",
    "LIST 403": "When listing objects under key 'photos/secret-name.jpg/' in bucket 'bkt1': AWS Error ACCESS_DENIED "
                "during ListObjectsV2 operation: Access Denied",
    "skewed": "AWS Error REQUEST_TIME_TOO_SKEWED during GetObject operation: The difference between the request "
              "time and the current time is too large.",
}


def _ends_again(message: str) -> bool:
    return message.endswith(f"({AGAIN})") and len(message) <= 160


@pytest.mark.parametrize("name", sorted(TRANSIENT))
def test_s3_throttling_server_errors_and_dropped_connections_are_transient(name):
    data, kind, message = reading._error(OSError(TRANSIENT[name]), "s3://bkt1/photos/secret-name.jpg")
    assert (data, kind) == (None, "transient"), (name, kind, message)
    assert _ends_again(message), message
    assert "secret-name" not in message  # the path is in the row already: never echoed


@pytest.mark.parametrize("name", sorted(PERMANENT))
def test_s3_refusals_keep_their_kind(name):
    data, kind, message = reading._error(OSError(PERMANENT[name]), "s3://bkt1/photos/secret-name.jpg")
    assert (data, kind) == (None, "unreadable"), (name, kind, message)
    assert "run again" not in message and "secret-name" not in message


def test_local_failures_keep_their_kind_and_network_ones_are_transient():
    missing = FileNotFoundError(errno.ENOENT, "Path does not exist 'bkt1/photos/a.jpg'. Detail: [errno 2] No such "
                                              "file or directory")
    assert reading._error(missing) == (None, "unreadable", "file not found")
    assert reading._error(FileNotFoundError(errno.ENOENT, "No such file or directory")) == (
        None, "unreadable", "file not found")
    assert reading._error(PermissionError(errno.EACCES, "Permission denied")) == (None, "unreadable",
                                                                                   "permission denied")
    assert reading._error(IsADirectoryError(errno.EISDIR, "Is a directory"))[1] == "unreadable"
    assert reading._error(OSError(errno.EIO, "Input/output error"))[1:] == ("unreadable", "OSError: Input/output error")
    assert reading._error(OSError(errno.ENAMETOOLONG, "File name too long"))[1:] == ("unreadable", "file name too long")
    assert reading._error(ValueError("embedded null byte"))[1] == "unreadable"
    assert reading._error(RuntimeError("boom"))[1] == "unreadable"
    for e in (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), TimeoutError("timed out"),
              OSError(errno.ETIMEDOUT, "Connection timed out"), OSError(errno.EHOSTUNREACH, "No route to host"),
              ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")):
        data, kind, message = reading._error(e)
        assert (data, kind) == (None, "transient") and _ends_again(message), (e, kind, message)


def test_a_long_transient_message_still_says_it_may_succeed_again():
    _, kind, message = reading._error(OSError("AWS Error SLOW_DOWN during GetObject operation: " + "x" * 500))
    assert kind == "transient" and _ends_again(message) and "SLOW_DOWN" in message


def test_a_read_over_its_timeout_is_transient():
    release = threading.Event()
    try:
        res = reading.gather(lambda u: (release.wait(), (b"x", None, None))[1], ["hung"], 0.2)
    finally:
        release.set()
    assert res == [(None, "transient", f"read timed out after 0.2 s ({AGAIN})")]


@pytest.fixture
def faults(s3_server, monkeypatch):
    proxy = FaultProxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the reads go through the proxy
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the client's retries, fewer (where storage reads it): a quicker test
    yield proxy
    proxy.close()


def _read(*uris: str, allow: tuple[str, ...]) -> list:
    """``reading.fetch_all`` of ``uris``, read again (at most twice) where a read's row is the batch's own "read
    timed out" (also a transient row, :func:`test_a_read_over_its_timeout_is_transient`). In CI (2026-12-06) a read
    that another test abandoned held pyarrow's S3 lock for ~105 s, so the S3FileSystem made for this test's proxy
    waited for it and the throttled read came back "timed out after 60 s" (mended at its source:
    tests/test_hostile_files.py); this test is about the kind S3's own answer gets, not about the process's past."""
    for _ in range(3):
        res = reading.fetch_all(list(uris), allow=allow, timeout=60)
        if not any(r[2] and r[2].startswith("read timed out") for r in res):
            break
    return res


def test_a_throttled_or_dropped_s3_read_is_a_transient_row_and_a_missing_one_is_not(s3_bucket, faults):
    client, bucket = s3_bucket
    data = face_jpeg(0)
    for name in ("slow.jpg", "head.jpg", "reset.jpg", "ok.jpg", "denied.jpg"):
        client.put_object(Bucket=bucket, Key=f"photos/{name}", Body=data)
    uri = f"s3://{bucket}/photos/"
    allow = (uri,)

    faults.fail("slow.jpg", SLOWDOWN, method="GET")  # S3's SlowDown on the GET, after every retry
    (slow,) = _read(uri + "slow.jpg", allow=allow)
    # another object goes through (the rule is per key); read again if the loaded proxy itself dropped it: that
    # is a transient row too, the kind this test is about, and a later read passes
    ok = next(r for r in (reading.fetch(uri + "ok.jpg", allow=allow) for _ in range(3)) if r[1] != "transient")
    assert ok == (data, None, None)
    # the SDK words a 503 as SLOW_DOWN with S3's message, or (its body not parsed, now and then) SERVICE_UNAVAILABLE
    assert slow[:2] == (None, "transient") and _ends_again(slow[2]), slow
    assert slow[2] in (f"S3 GetObject: SLOW_DOWN: Please reduce your request rate. ({AGAIN})",
                       f"S3 GetObject: SERVICE_UNAVAILABLE ({AGAIN})"), slow
    assert reading.fetch(uri + "slow.jpg", allow=allow)[1] == "transient"
    assert any(m == "GET" and "slow.jpg" in p for m, p, _ in faults.log)  # it did go through the proxy

    faults.clear()
    faults.fail("head.jpg", SLOWDOWN, method="HEAD")  # the size look-up throttled
    (res,) = _read(uri + "head.jpg", allow=allow)
    assert res[:2] == (None, "transient") and "head.jpg" not in res[2], res
    assert reading.file_size(uri + "head.jpg", allow)[1] == "transient"

    faults.clear()
    faults.fail("reset.jpg", RESET, method="GET")  # the connection reset on every attempt
    (res,) = _read(uri + "reset.jpg", allow=allow)
    assert res[:2] == (None, "transient") and "Connection reset" in res[2], res

    faults.clear()
    faults.fail("denied.jpg", DENIED, method="GET")  # a refusal keeps its kind
    (res,) = _read(uri + "denied.jpg", allow=allow)
    assert res[:2] == (None, "unreadable") and ("ACCESS_DENIED" in res[2] or "403" in res[2]), res

    faults.clear()
    assert _read(uri + "missing.jpg", uri + "slow.jpg", allow=allow) == [
        (None, "unreadable", "file not found"), (data, None, None)]
