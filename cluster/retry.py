"""Riding out transient faults of the network: one retry policy for object storage and the
Parquet writer, built on tenacity.

A fault is *transient* when trying again later may succeed: a refused or reset connection, a
timeout, an HTTP 5xx, throttling. Everything else (no such key, access denied, a corrupt file)
fails at once. Transient faults are retried with exponential backoff and jitter until the
*budget* is spent: :data:`DEFAULT_BUDGET_S` seconds, or ``$EARMARK_RETRY_BUDGET_S`` (the jobs'
``--retry-budget`` sets it, so Ray workers see the same value).

>>> retry.call(lambda: s3.get_object(...), what="s3://audio/a.wav")   # doctest: +SKIP

The clients' own retries stay short (botocore ``standard`` mode, 3 attempts; pyarrow's
``AwsStandardS3RetryStrategy``, 3 attempts): they absorb a dropped packet within a second; this
module rides out an outage of minutes.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from typing import TypeVar

import tenacity

log = logging.getLogger(__name__)

#: Seconds a call keeps retrying a transient fault before it gives up.
DEFAULT_BUDGET_S = 180.0
BUDGET_ENV = "EARMARK_RETRY_BUDGET_S"

_T = TypeVar("_T")

#: S3 error codes that mean "try again later".
_TRANSIENT_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "PriorRequestNotComplete",
}
#: What pyarrow's (libcurl-based) S3 client says about a network fault; its errors are plain
#: OSErrors with the AWS SDK's message in the text.
_TRANSIENT_TEXT = re.compile(
    r"NETWORK_CONNECTION|curlCode|connect to server|Connection refused|Connection reset|timed out|Timeout"
    r"|SERVICE_UNAVAILABLE|SLOW_DOWN|INTERNAL_FAILURE|THROTTLING|REQUEST_TIMEOUT|HTTP response code: 5\d\d",
    re.IGNORECASE,
)


def budget_s() -> float:
    """The retry budget in seconds (``$EARMARK_RETRY_BUDGET_S``, else :data:`DEFAULT_BUDGET_S`)."""
    value = os.environ.get(BUDGET_ENV)
    if not value:
        return DEFAULT_BUDGET_S
    try:
        budget = float(value)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}={value!r}: give the retry budget in seconds, e.g. 180") from None
    if budget < 0:
        raise ValueError(f"{BUDGET_ENV}={value!r}: the retry budget cannot be negative")
    return budget


def is_transient(exc: BaseException) -> bool:
    """Whether trying ``exc``'s operation again later may succeed."""
    flagged = getattr(exc, "transient", None)  # errors that already know (cluster.storage.StorageError)
    if isinstance(flagged, bool):
        return flagged
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return error.get("Code") in _TRANSIENT_CODES or int(status) >= 500
    if isinstance(exc, ConnectionError | HTTPClientError | TimeoutError | ConnectionRefusedError):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError | PermissionError):
        return bool(_TRANSIENT_TEXT.search(str(exc)))
    return False


class _Counter:
    """How many retries this process has made (a job reports it in its summary)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self) -> None:
        with self._lock:
            self.value += 1


RETRIES = _Counter()


def call(fn: Callable[[], _T], *, what: str, budget: float | None = None) -> _T:
    """``fn()``, tried again after each transient fault until the budget (default
    :func:`budget_s`) is spent; the last fault is raised as it was, with ``retry_attempts`` and
    ``retry_seconds`` set on it."""
    budget = budget_s() if budget is None else budget
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        stop=tenacity.stop_after_delay(budget),
        wait=tenacity.wait_exponential_jitter(initial=0.5, max=15.0, jitter=1.0),
        before_sleep=lambda state: _note(state, what),
        reraise=True,
    )
    try:
        return retrying(fn)
    except BaseException as exc:
        if is_transient(exc):
            stats = retrying.statistics
            exc.retry_attempts = int(stats.get("attempt_number", 1))  # type: ignore[attr-defined]
            exc.retry_seconds = float(stats.get("delay_since_first_attempt", 0.0))  # type: ignore[attr-defined]
        raise


def _note(state: tenacity.RetryCallState, what: str) -> None:
    RETRIES.add()
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.info("%s: %s; retry %d in %.1f s", what, error, state.attempt_number, wait)
