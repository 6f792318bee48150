"""What storage errors may pass if the request is sent again: the one rule for boto3's clients (a listing, the
label job's lease), pyarrow's S3 filesystem (a read) and the OS (a local or network file system). S3 answers a
burst of requests on one prefix with 503 SlowDown while it scales; a server error, a timeout or a dropped
connection may pass too. A refusal (access denied, no such key or bucket, a bad request) and a missing file do
not: the request itself is the reason. Callers retry (raytasks/label/lease_store.py) or say so in an error row
(facedata/reading.py: kind ``transient``)."""

from __future__ import annotations

import errno
import re

_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "RequestLimitExceeded", "TooManyRequests",
    "TooManyRequestsException", "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "BandwidthLimitExceeded", "PriorRequestNotComplete"})

# pyarrow's S3 errors are OSErrors without an errno whose text names the AWS SDK's error type ("AWS Error SLOW_DOWN
# during GetObject operation: Please reduce your request rate.") or, for a code the SDK does not know (and for
# every HEAD, which has no body), the HTTP status ("AWS Error UNKNOWN (HTTP status 503) during HeadObject
# operation"); a dropped or timed-out connection is the SDK's NETWORK_CONNECTION with curl's reason. Those
# answers come after the client's own retries: S3 throttling (SlowDown, 503), a server error (500, 502, 504), a
# request timeout (408, RequestTimeout), too many requests (429) or the network
_AWS_TRANSIENT = frozenset({"SLOW_DOWN", "THROTTLING", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "REQUEST_TIMEOUT",
                            "NETWORK_CONNECTION", "REQUEST_LIMIT_EXCEEDED"})
_AWS_ERROR = re.compile(r"AWS Error (\w+)(?: \(HTTP status (\d+)\))?")
_TRANSIENT_STATUS = frozenset({"500", "502", "503", "504", "408", "429"})
# an error without the SDK's type (or whose type is UNKNOWN): by its words
_TRANSIENT_TEXT = re.compile(r"SlowDown|Please reduce your request rate|RequestTimeout|[Cc]onnection (reset|refused|"
                             r"aborted)|Timeout was reached|timed out")
_TRANSIENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ETIMEDOUT", "ECONNRESET", "ECONNABORTED", "ECONNREFUSED", "ENETDOWN", "ENETUNREACH", "ENETRESET",
    "EHOSTDOWN", "EHOSTUNREACH") if hasattr(errno, name))
# pyarrow prefixes a failed request with the object's name (a row's message never echoes its path:
# facedata/reading.py): its open's HEAD ("reading information for", "opening"), and get_file_info's HEAD and LIST
# ("getting information for", "listing objects under": a missing key's folder check), as libarrow 26 words them
KEY_CONTEXT = re.compile(r"^When (reading information for|opening|getting information for|listing objects under) "
                         r"key '.*' in bucket '[^']*': ", re.S)


def _boto_transient(e: BaseException) -> bool | None:
    """A boto3 error's answer (None: not a boto3 error): a throttling or 5xx answer, 429, a connection or read
    timeout, a response cut off; not a refusal (403, 404, a bad request) or missing credentials."""
    try:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            HTTPClientError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )
    except ImportError:  # no boto3 where this runs: no boto3 error either
        return None
    if isinstance(e, ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return e.response.get("Error", {}).get("Code") in _TRANSIENT_CODES or status >= 500 or status == 429
    if isinstance(e, BotoCoreError):
        return isinstance(e, (ConnectionError, HTTPClientError, ReadTimeoutError, IncompleteReadError,
                              ResponseStreamingError))
    return None


def is_transient(e: BaseException) -> bool:
    """Whether a request to storage failed for a reason of the moment that a later read may not meet: S3 throttling (SlowDown,
    503), a server error (500, 502, 503, 504), a request timeout, too many requests, a connection refused, reset
    or timed out. From pyarrow's S3 client (an OSError without an errno): by the AWS SDK's error type
    (:data:`_AWS_TRANSIENT`; any other type, ACCESS_DENIED say, is not transient), else by the HTTP status
    (:data:`_TRANSIENT_STATUS`) or the words (:data:`_TRANSIENT_TEXT`); from the OS: a connection or timeout
    error (:data:`_TRANSIENT_ERRNOS`). A missing file, access denied, a file that is not an image and every other
    failure are not: the file itself is the reason, and reading it again fails again."""
    boto = _boto_transient(e)
    if boto is not None:
        return boto
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if not isinstance(e, OSError):
        return False
    if e.errno in _TRANSIENT_ERRNOS:
        return True
    text = KEY_CONTEXT.sub("", str(e))  # not the key's name, whatever it says
    aws = _AWS_ERROR.search(text)
    if aws is not None and aws.group(1) != "UNKNOWN":  # the SDK's error type says it: ACCESS_DENIED is not transient
        return aws.group(1) in _AWS_TRANSIENT
    if aws is not None and aws.group(2) in _TRANSIENT_STATUS:
        return True
    return bool(_TRANSIENT_TEXT.search(text))


