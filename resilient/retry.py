"""Retry policies for storage operations, and the transient-vs-permanent predicate they key on.

`is_transient` decides whether an exception is worth another attempt; `classify` turns any exception
into a `resilient.errors.StorageError` subclass that says the same thing by its type; `RetryPolicy` is
the small frozen policy (attempts, time budget, exponential backoff with jitter) that builds
``tenacity.Retrying`` objects. Sleep and the clock are injectable so tests run without waiting.

How errors are judged (`is_transient`), first answer wins:

1. `resilient` errors say it by type: `TransientStorageError` is transient, every other
   `ResilientError` (codec errors, `PermanentStorageError`, `QuorumError`, `FencedError`,
   `ConfigError`...) is not; a retry at this level will not fix them.
2. An S3 service answer (a botocore ``ClientError``, recognized by its ``response`` dict, without
   importing botocore; read by `service_answer`, the one reader of SDK answers, which
   `resilient.storage.sdk` uses too) is transient for HTTP 5xx other than 501, 429, and
   throttling/timeout codes.
   s3fs translates ``ClientError`` into builtin ``OSError`` subclasses and keeps the original as
   ``__cause__`` (``s3fs.errors.translate_boto_error``); that translation loses information (``SlowDown``
   becomes ``EBUSY``, ``RequestTimeTooSkewed`` becomes ``PermissionError``, unknown codes ``EIO``), so for
   an ``OSError`` caused by a service answer the answer decides.
3. Builtins: ``PermissionError``, ``FileNotFoundError``, ``FileExistsError``, ``IsADirectoryError``,
   ``NotADirectoryError``, ``ValueError``, ``TypeError`` and ``OSError`` with ``ENOSPC``, ``EDQUOT``,
   ``EROFS`` are permanent; ``ConnectionError``, ``TimeoutError`` (``socket.timeout``, asyncio's and
   fsspec's timeouts) and ``OSError`` with a network errno or ``EAGAIN``/``EBUSY`` are transient.
4. HTTP client errors by class name anywhere in the MRO (botocore, urllib3, aiohttp), so none of them is
   imported: connection, read and connect timeouts, closed connections, truncated bodies are transient;
   TLS certificate failures are not.
5. Otherwise the exception says nothing by itself: follow ``__cause__`` (or ``__context__`` when there is
   no cause and it is not suppressed) up to two levels and judge that; nothing found means permanent.

``EIO`` is deliberately not transient by itself: on a local disk it reports a device fault that no
retry within seconds repairs (the replica layer should move on to other replicas instead), and s3fs uses
it for service codes it does not know, where rule 2 judges the original answer. An ``EIO`` raised while
handling a connection reset is still judged by that reset (rule 5).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import inspect
import socket
import ssl
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import tenacity
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from resilient.config import redact_url
from resilient.errors import (
    ConfigError,
    PermanentStorageError,
    ResilientError,
    StorageError,
    TransientStorageError,
)

if TYPE_CHECKING:
    from resilient.config import Settings

__all__ = [
    "RetryPolicy",
    "ServiceAnswer",
    "classify",
    "is_transient",
    "service_answer",
]

T = TypeVar("T")

_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "ETIMEDOUT", "EPIPE", "EAGAIN", "EHOSTUNREACH",
        "ENETUNREACH", "ENETDOWN", "ENETRESET", "EHOSTDOWN", "EBUSY",
    )
    if hasattr(errno, name)
)
_PERMANENT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS") if hasattr(errno, name)
)
_TRANSIENT_TYPES = (ConnectionError, TimeoutError, socket.timeout, asyncio.TimeoutError,
                    concurrent.futures.TimeoutError)
_PERMANENT_TYPES = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError,
                    NotADirectoryError, ValueError, TypeError)
_TRANSIENT_NAMES = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError", "IncompleteReadError",
    "IncompleteRead", "ResponseStreamingError", "ProtocolError",
})
# Checked before the names above: aiohttp's certificate error is also a ClientConnectionError.
_PERMANENT_NAMES = frozenset({"SSLCertVerificationError", "CertificateError", "ClientConnectorCertificateError"})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "RequestTimeout", "RequestTimeoutException", "Throttling", "ThrottlingException",
    "ThrottledException", "RequestThrottled", "RequestThrottledException", "TooManyRequestsException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "InternalError", "ServiceUnavailable",
    "RequestTimeTooSkewed", "OperationAborted", "PriorRequestNotComplete",
})
_CHAIN_DEPTH = 2
# tenacity 9 renamed wait_exponential_jitter's ``initial`` to ``multiplier`` (``initial`` now warns).
_JITTER_SCALE = (
    "multiplier" if "multiplier" in inspect.signature(tenacity.wait_exponential_jitter).parameters else "initial"
)


@dataclass(frozen=True)
class ServiceAnswer:
    """A storage service's answer to one request, as its SDK reports it (a botocore ``ClientError``'s
    ``response``): the error code and the HTTP status. What it means is decided here and nowhere else.

    Example:
        >>> ServiceAnswer("SlowDown", 503).transient, ServiceAnswer("AccessDenied", 403).transient
        (True, False)
        >>> class ClientError(Exception):
        ...     response = {"Error": {"Code": "412"}}  # HEAD errors carry the status as the code
        >>> service_answer(OSError("exists").with_traceback(None)) is None, service_answer(ClientError())
        (True, ServiceAnswer(code='412', status=412))
        >>> service_answer(ClientError()).precondition_failed
        True
    """

    code: str
    status: int | None

    @property
    def transient(self) -> bool:
        """Throttling, a timeout, 429, or a 5xx other than 501 (not implemented)."""
        if self.code in _TRANSIENT_CODES:
            return True
        s = self.status
        return isinstance(s, int) and (s == 429 or (s >= 500 and s != 501))

    @property
    def precondition_failed(self) -> bool:
        """A conditional write refused because its precondition failed (``If-None-Match: *`` on an
        existing object): code ``PreconditionFailed`` or status 412."""
        return self.code == "PreconditionFailed" or self.status == 412


def _answer(exc: BaseException | None) -> ServiceAnswer | None:
    """The answer ``exc`` itself carries (a botocore-style ``response`` dict), if any."""
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping) or not ("Error" in response or "ResponseMetadata" in response):
        return None
    error = response.get("Error") or {}
    code = str(error.get("Code", "")) if isinstance(error, Mapping) else ""
    meta = response.get("ResponseMetadata") or {}
    status = meta.get("HTTPStatusCode") if isinstance(meta, Mapping) else None
    if not isinstance(status, int) and code.isdigit():  # HEAD errors carry the status as the code
        status = int(code)
    return ServiceAnswer(code, status if isinstance(status, int) else None)


def service_answer(exc: BaseException) -> ServiceAnswer | None:
    """The service answer behind ``exc``: its own, else that of what caused it (followed as
    `is_transient` follows it; s3fs keeps botocore's ``ClientError`` as ``__cause__``), or None.
    Only structured answers count: a status code in an error's text is never read."""
    for link in _chain(exc):
        answer = _answer(link)
        if answer is not None:
            return answer
    return None


def _verdict(exc: BaseException) -> bool | None:
    """True/False when ``exc`` itself says whether it is transient, None when it says nothing."""
    if isinstance(exc, ResilientError):
        return isinstance(exc, TransientStorageError)
    answer = _answer(exc)
    if answer is None and isinstance(exc, OSError):
        answer = _answer(exc.__cause__)  # s3fs: translate_boto_error sets __cause__
    if answer is not None:
        return answer.transient
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _PERMANENT_NAMES or isinstance(exc, _PERMANENT_TYPES):
        return False
    if isinstance(exc, _TRANSIENT_TYPES) or names & _TRANSIENT_NAMES:
        return True
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError):  # ssl errnos are not errnos
        if exc.errno in _TRANSIENT_ERRNOS:
            return True
        if exc.errno in _PERMANENT_ERRNOS:
            return False
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and up to two levels of what caused it, as Python's traceback display follows them."""
    chain = [exc]
    while len(chain) <= _CHAIN_DEPTH:
        last = chain[-1]
        nxt = last.__cause__ if last.__cause__ is not None else (
            None if last.__suppress_context__ else last.__context__)
        if nxt is None or any(nxt is seen for seen in chain):
            break
        chain.append(nxt)
    return chain


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying (the rules are in this module's docstring).

    Args:
        exc: any exception; it is only inspected.

    Returns:
        True for timeouts, connection failures, throttling and 5xx answers; False otherwise.

    Example:
        >>> is_transient(ConnectionResetError()), is_transient(FileNotFoundError("ckpt"))
        (True, False)
    """
    for link in _chain(exc):
        verdict = _verdict(link)
        if verdict is not None:
            return verdict
    return False


def classify(
    exc: BaseException,
    *,
    url: str | None = None,
    path: str | None = None,
    generation: int | None = None,
) -> StorageError:
    """``exc`` as a `StorageError`: itself if it already is one, else a `TransientStorageError` or
    `PermanentStorageError` (by `is_transient`) whose message is the type name and message of ``exc``.

    The result's ``__cause__`` is ``exc``; raise it with ``raise classify(e, url=...) from e`` so the
    traceback shows both. Credentials in ``url`` and in the message are masked.

    Example:
        >>> err = classify(TimeoutError("read timed out"), url="s3://K:S@bucket/run", path="a/b")
        >>> type(err).__name__, str(err)
        ('TransientStorageError', 'TimeoutError: read timed out | replica=s3://***@bucket/run | object=a/b')
    """
    if isinstance(exc, StorageError):
        return exc
    text = str(exc)
    message = redact_url(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
    cls = TransientStorageError if is_transient(exc) else PermanentStorageError
    err = cls(message, url=redact_url(url) if url is not None else None, path=path, generation=generation)
    err.__cause__ = exc
    return err


class _StopAfterDelay(stop_base):
    """``stop_after_delay`` measured with an injected clock (tenacity itself reads ``time.monotonic``).

    ``mark_start`` must run before every attempt (it is the Retrying's ``before`` hook); it records the
    clock at the first attempt of each retry run.
    """

    def __init__(self, max_seconds: float, clock: Callable[[], float]) -> None:
        self.max_seconds = max_seconds
        self.clock = clock
        self._starts: weakref.WeakKeyDictionary[tenacity.RetryCallState, float] = weakref.WeakKeyDictionary()

    def mark_start(self, retry_state: tenacity.RetryCallState) -> None:
        if retry_state.attempt_number == 1 or retry_state not in self._starts:
            self._starts[retry_state] = self.clock()

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        start = self._starts.get(retry_state, self.clock())
        return self.clock() - start >= self.max_seconds


@dataclass(frozen=True)
class RetryPolicy:
    """How a storage operation is retried: at most ``attempts`` attempts within ``max_seconds``,
    sleeping ``backoff_seconds * 2**(n-1)`` (capped at ``backoff_max_seconds``) after failed attempt n,
    plus up to ``backoff_seconds`` of random jitter when ``jitter`` is on.

    The time budget is checked after each failed attempt, so the last sleep and attempt may run past it
    by at most ``backoff_max_seconds`` plus one attempt.

    Example:
        >>> calls = []
        >>> def flaky():
        ...     calls.append(1)
        ...     if len(calls) < 3:
        ...         raise ConnectionResetError("peer reset")
        ...     return "ok"
        >>> sleeps = []
        >>> RetryPolicy(attempts=5, jitter=False).retrying(sleep=sleeps.append)(flaky)
        'ok'
        >>> sleeps
        [0.2, 0.4]
    """

    attempts: int = 5
    max_seconds: float = 60.0
    backoff_seconds: float = 0.2
    backoff_max_seconds: float = 10.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigError("RetryPolicy.attempts", self.attempts, "an integer >= 1")
        for name in ("max_seconds", "backoff_seconds", "backoff_max_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"RetryPolicy.{name}", value, "a number > 0")
        if self.backoff_max_seconds < self.backoff_seconds:
            raise ConfigError("RetryPolicy.backoff_max_seconds", self.backoff_max_seconds,
                              f"a number >= backoff_seconds ({self.backoff_seconds:g})")

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The policy the ``RESILIENT_RETRY_*`` settings describe (with jitter).

        Example:
            >>> from resilient.config import Settings
            >>> s = Settings.from_env({"RESILIENT_STORAGE": "memory://a", "RESILIENT_RETRY_ATTEMPTS": "2"})
            >>> RetryPolicy.from_settings(s).attempts
            2
        """
        return cls(
            attempts=settings.retry_attempts,
            max_seconds=settings.retry_max_seconds,
            backoff_seconds=settings.retry_backoff_seconds,
            backoff_max_seconds=settings.retry_backoff_max_seconds,
        )

    def retrying(
        self,
        *,
        sleep: Callable[[float], None] = time.sleep,
        before_sleep: Callable[[tenacity.RetryCallState], None] | None = None,
        retry_on: Callable[[BaseException], bool] | tenacity.retry_base = is_transient,
        clock: Callable[[], float] | None = None,
    ) -> tenacity.Retrying:
        """A ``tenacity.Retrying`` that applies this policy.

        It reraises the last exception itself (never ``tenacity.RetryError``) once attempts or time run
        out or the exception is not one to retry.

        Args:
            sleep: called with each backoff in seconds; pass a fake in tests.
            before_sleep: tenacity hook called before each sleep (logging, metrics).
            retry_on: predicate over the exception (or a tenacity ``retry_*`` object); `is_transient`.
            clock: monotonic seconds for the time budget; tenacity's ``time.monotonic`` when None.

        Example:
            >>> RetryPolicy(attempts=3).retrying(sleep=lambda s: None)(lambda: 42)
            42
        """
        retry = retry_on if isinstance(retry_on, tenacity.retry_base) else tenacity.retry_if_exception(retry_on)
        before: Callable[[tenacity.RetryCallState], None] = tenacity.before_nothing
        if clock is None:
            budget: stop_base = tenacity.stop_after_delay(self.max_seconds)
        else:
            budget = _StopAfterDelay(self.max_seconds, clock)
            before = budget.mark_start
        if self.jitter:
            wait: wait_base = tenacity.wait_exponential_jitter(
                max=self.backoff_max_seconds, jitter=self.backoff_seconds, **{_JITTER_SCALE: self.backoff_seconds})
        else:
            wait = tenacity.wait_exponential(multiplier=self.backoff_seconds, max=self.backoff_max_seconds)
        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts) | budget,
            wait=wait,
            retry=retry,
            sleep=sleep,
            before=before,
            before_sleep=before_sleep if before_sleep is not None else tenacity.before_sleep_nothing,
            reraise=True,
        )

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` under this policy, sleeping for real.

        Example:
            >>> RetryPolicy().call(max, 3, 7)
            7
        """
        return self.retrying()(fn, *args, **kwargs)
