"""The transient-vs-permanent predicate, classify, and RetryPolicy with fake sleep and clock."""

from __future__ import annotations

import asyncio
import dataclasses
import doctest
import errno
import pickle
import socket
import ssl

import pytest
import tenacity
from hypothesis import given, settings
from hypothesis import strategies as st

import resilient.retry as retry_module
from resilient.config import Settings
from resilient.errors import (
    ConfigError,
    CorruptionError,
    FencedError,
    NoCheckpointError,
    PermanentStorageError,
    QuorumError,
    StorageError,
    TransientStorageError,
    UnsafeCheckpointError,
    UnsupportedTypeError,
)
from resilient.retry import RetryPolicy, classify, is_transient

botocore_exceptions = pytest.importorskip("botocore.exceptions")
aiohttp = pytest.importorskip("aiohttp")
s3fs_errors = pytest.importorskip("s3fs.errors")
fsspec_exceptions = pytest.importorskip("fsspec.exceptions")
urllib3_exceptions = pytest.importorskip("urllib3.exceptions")

ENDPOINT = "http://127.0.0.1:9"


def client_error(code: str | None, status: int | None, operation: str = "PutObject") -> Exception:
    response: dict = {"Error": {"Message": "m"}, "ResponseMetadata": {}}
    if code is not None:
        response["Error"]["Code"] = code
    if status is not None:
        response["ResponseMetadata"]["HTTPStatusCode"] = status
    return botocore_exceptions.ClientError(response, operation)


def chained(outer: BaseException, inner: BaseException, *, explicit: bool = True) -> BaseException:
    """``outer`` raised from (or, with explicit=False, while handling) ``inner``; returns the caught one."""
    try:
        try:
            raise inner
        except BaseException as e:
            if explicit:
                raise outer from e
            raise outer  # noqa: B904 - the implicit context is the point
    except BaseException as caught:
        return caught


def suppressed(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException:
            raise outer from None
    except BaseException as caught:
        return caught


class ClientConnectorCertificateError(ConnectionError):
    """Stands in for aiohttp's class of that name (which also derives from ClientConnectionError)."""


TRANSIENT = [
    TransientStorageError("x"),
    ConnectionError(), ConnectionResetError(), ConnectionRefusedError(), ConnectionAbortedError(), BrokenPipeError(),
    TimeoutError(), socket.timeout(), asyncio.TimeoutError(), fsspec_exceptions.FSTimeoutError(),
    *(OSError(getattr(errno, n), n) for n in ("ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "ETIMEDOUT", "EPIPE",
                                               "EAGAIN", "EHOSTUNREACH", "ENETUNREACH", "ENETDOWN", "EBUSY")),
    botocore_exceptions.EndpointConnectionError(endpoint_url=ENDPOINT),
    botocore_exceptions.ConnectTimeoutError(endpoint_url=ENDPOINT),
    botocore_exceptions.ReadTimeoutError(endpoint_url=ENDPOINT),
    botocore_exceptions.ConnectionClosedError(endpoint_url=ENDPOINT),
    botocore_exceptions.IncompleteReadError(actual_bytes=1, expected_bytes=2),
    botocore_exceptions.ResponseStreamingError(error=ConnectionResetError()),
    aiohttp.ServerDisconnectedError(), aiohttp.ClientPayloadError("truncated"), aiohttp.ClientConnectionError("x"),
    urllib3_exceptions.ProtocolError("Connection aborted."),
    client_error("SlowDown", 503), client_error("InternalError", 500), client_error("ServiceUnavailable", 503),
    client_error("Whatever", 502), client_error(None, 429), client_error("Throttling", 400),
    client_error("ThrottlingException", 400), client_error("RequestTimeout", 400),
    client_error("RequestTimeTooSkewed", 403), client_error("503", None),
    # s3fs translations keep the service answer as __cause__; the answer decides
    s3fs_errors.translate_boto_error(client_error("SlowDown", 503)),
    s3fs_errors.translate_boto_error(client_error("RequestTimeTooSkewed", 403)),
    s3fs_errors.translate_boto_error(client_error("InternalError", 500)),
    s3fs_errors.translate_boto_error(client_error("SomethingNew", 504)),
    s3fs_errors.translate_boto_error(client_error("RequestTimeout", 400)),
    # wrappers that say nothing themselves are judged by their cause or context
    chained(RuntimeError("wrapped"), ConnectionResetError()),
    chained(OSError(errno.EIO, "io"), ConnectionResetError()),
    chained(KeyError("k"), TimeoutError(), explicit=False),
    chained(RuntimeError("a"), chained(RuntimeError("b"), TimeoutError())),
]

PERMANENT = [
    PermissionError(), FileNotFoundError(), FileExistsError(), IsADirectoryError(), NotADirectoryError(),
    OSError(errno.ENOSPC, "full"), OSError(errno.EDQUOT, "quota"), OSError(errno.EROFS, "ro"),
    OSError(errno.EIO, "device error"), OSError("no errno"),
    CorruptionError("obj", "bad checksum"), UnsupportedTypeError("state", "lambda"), UnsafeCheckpointError("pickle"),
    PermanentStorageError("x"), FencedError("stale"), QuorumError("q", acked=1, required=2, failures={}),
    NoCheckpointError("none"), ConfigError("RESILIENT_KEEP", "0", "an integer >= 1"), StorageError("x"),
    ValueError(), TypeError(), RuntimeError(), KeyError("k"), Exception(), KeyboardInterrupt(),
    client_error("AccessDenied", 403), client_error("NoSuchKey", 404), client_error("NotImplemented", 501),
    client_error("PreconditionFailed", 412), client_error("404", None),
    s3fs_errors.translate_boto_error(client_error("AccessDenied", 403)),
    s3fs_errors.translate_boto_error(client_error("NoSuchKey", 404)),
    s3fs_errors.translate_boto_error(client_error("SomethingNew", 400)),
    ssl.SSLCertVerificationError("certificate verify failed"), ClientConnectorCertificateError(),
    # a definite outer answer wins over its cause; suppressed context is not followed; depth is bounded
    chained(PermanentStorageError("gave up"), ConnectionResetError()),
    chained(ValueError("bad"), TimeoutError()),
    chained(FileNotFoundError("gone"), TimeoutError(), explicit=False),
    suppressed(RuntimeError("x"), TimeoutError()),
    chained(RuntimeError("a"), chained(RuntimeError("b"), chained(RuntimeError("c"), TimeoutError()))),
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: f"{type(e).__name__}:{e}"[:60])
def test_transient(exc):
    assert is_transient(exc) is True


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda e: f"{type(e).__name__}:{e}"[:60])
def test_permanent(exc):
    assert is_transient(exc) is False


def test_s3fs_translation_shapes_are_what_the_predicate_expects():
    # If s3fs changes how it translates, the cause-following rule needs another look.
    slow = s3fs_errors.translate_boto_error(client_error("SlowDown", 503))
    assert type(slow) is OSError and slow.errno == errno.EBUSY
    skewed = s3fs_errors.translate_boto_error(client_error("RequestTimeTooSkewed", 403))
    assert type(skewed) is PermissionError and isinstance(skewed.__cause__, botocore_exceptions.ClientError)
    unknown = s3fs_errors.translate_boto_error(client_error("SomethingNew", 504))
    assert type(unknown) is OSError and unknown.errno == errno.EIO


def test_chain_cycles_terminate():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert is_transient(a) is False


# --- classify -------------------------------------------------------------------------------------


def test_classify_returns_storage_errors_unchanged():
    for err in (TransientStorageError("t"), PermanentStorageError("p"), FencedError("f"),
                QuorumError("q", acked=0, required=1, failures={})):
        assert classify(err, url="s3://b") is err


def test_classify_wraps_by_verdict_with_context():
    exc = TimeoutError("read timed out")
    err = classify(exc, url="s3://AKIA:SECRET@bucket/run", path="key/000001/data", generation=1)
    assert type(err) is TransientStorageError
    assert (err.url, err.path, err.generation) == ("s3://***@bucket/run", "key/000001/data", 1)
    assert str(err) == (
        "TimeoutError: read timed out | replica=s3://***@bucket/run | object=key/000001/data | generation=1")
    assert err.__cause__ is exc

    err = classify(FileNotFoundError("no such object"))
    assert type(err) is PermanentStorageError
    assert (err.url, err.path, err.generation, str(err)) == (None, None, None, "FileNotFoundError: no such object")

    assert str(classify(ConnectionResetError())) == "ConnectionResetError"
    assert "SECRET" not in str(classify(OSError(f"cannot reach s3://AKIA:SECRET@host/b")))


def test_raise_classify_from_keeps_the_original():
    exc = ConnectionResetError("peer")
    with pytest.raises(TransientStorageError) as info:
        try:
            raise exc
        except OSError as e:
            raise classify(e, url="s3://b") from e
    assert info.value.__cause__ is exc
    assert is_transient(info.value)


# --- RetryPolicy ----------------------------------------------------------------------------------


class Flaky:
    """Raises the given exceptions in order, then returns ``"ok"``; counts calls, keeps what it raised."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0
        self.raised: list[BaseException] = []

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            exc = self.failures.pop(0)
            self.raised.append(exc)
            raise exc
        return "ok"


class FakeClock:
    """Monotonic seconds advanced only by the fake sleep (and by ``tick`` per call, if set)."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now = 0.0
        self.tick = tick
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_retries_transient_errors_with_exponential_backoff():
    fn = Flaky(*(ConnectionResetError(str(i)) for i in range(4)))
    sleeps: list[float] = []
    assert RetryPolicy(attempts=5, jitter=False).retrying(sleep=sleeps.append)(fn) == "ok"
    assert fn.calls == 5
    assert sleeps == pytest.approx([0.2, 0.4, 0.8, 1.6])


def test_backoff_is_bounded_by_its_max():
    fn = Flaky(*(TimeoutError() for _ in range(6)))
    sleeps: list[float] = []
    policy = RetryPolicy(attempts=10, backoff_seconds=0.1, backoff_max_seconds=0.5, jitter=False)
    assert policy.retrying(sleep=sleeps.append)(fn) == "ok"
    assert sleeps == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5, 0.5])


@settings(max_examples=50, deadline=None)
@given(failures=st.integers(1, 8), backoff=st.floats(0.001, 2.0), ratio=st.floats(1.0, 100.0))
def test_backoff_property(failures, backoff, ratio):
    sleeps: list[float] = []
    policy = RetryPolicy(attempts=failures + 1, backoff_seconds=backoff, backoff_max_seconds=backoff * ratio,
                         jitter=False, max_seconds=1e9)
    assert policy.retrying(sleep=sleeps.append)(Flaky(*(TimeoutError() for _ in range(failures)))) == "ok"
    assert sleeps == pytest.approx([min(backoff * 2**i, backoff * ratio) for i in range(failures)])


def test_jitter_stays_within_one_backoff_and_the_max():
    for _ in range(20):
        sleeps: list[float] = []
        policy = RetryPolicy(attempts=7, backoff_seconds=0.2, backoff_max_seconds=3.0)
        policy.retrying(sleep=sleeps.append)(Flaky(*(TimeoutError() for _ in range(6))))
        assert len(sleeps) == 6
        for i, slept in enumerate(sleeps):
            base = 0.2 * 2**i
            assert min(base, 3.0) <= slept <= min(base + 0.2, 3.0)


def test_stops_at_attempts_and_reraises_the_last_exception():
    fn = Flaky(*(ConnectionResetError(f"reset {i}") for i in range(10)))
    sleeps: list[float] = []
    with pytest.raises(ConnectionResetError) as info:
        RetryPolicy(attempts=3, jitter=False).retrying(sleep=sleeps.append)(fn)
    assert fn.calls == 3
    assert info.value is fn.raised[-1]
    assert str(info.value) == "reset 2"
    assert sleeps == pytest.approx([0.2, 0.4])


def test_does_not_retry_permanent_errors():
    for exc in (FileNotFoundError("gone"), PermanentStorageError("no"), ValueError("bad")):
        fn = Flaky(exc, TimeoutError())
        sleeps: list[float] = []
        with pytest.raises(type(exc)) as info:
            RetryPolicy(attempts=5).retrying(sleep=sleeps.append)(fn)
        assert info.value is exc
        assert (fn.calls, sleeps) == (1, [])


def test_stops_when_the_time_budget_is_spent():
    clock = FakeClock()
    fn = Flaky(*(TimeoutError(str(i)) for i in range(50)))
    policy = RetryPolicy(attempts=50, max_seconds=1.0, backoff_seconds=0.4, jitter=False)
    with pytest.raises(TimeoutError) as info:
        policy.retrying(sleep=clock.sleep, clock=clock)(fn)
    # t=0 fail, sleep .4; t=.4 fail, sleep .8; t=1.2 fail -> 1.2 >= 1.0, stop
    assert fn.calls == 3
    assert clock.sleeps == pytest.approx([0.4, 0.8])
    assert str(info.value) == "2"


def test_time_budget_restarts_for_each_run_of_one_retrying():
    clock = FakeClock()
    r = RetryPolicy(attempts=50, max_seconds=1.0, backoff_seconds=0.4, jitter=False).retrying(
        sleep=clock.sleep, clock=clock)
    first, second = Flaky(*(TimeoutError() for _ in range(50))), Flaky(*(TimeoutError() for _ in range(50)))
    with pytest.raises(TimeoutError):
        r(first)
    with pytest.raises(TimeoutError):
        r(second)
    assert (first.calls, second.calls) == (3, 3)


def test_time_budget_counts_time_spent_in_attempts():
    clock = FakeClock(tick=0.3)  # each clock read: 0.3 s passes (stands for slow attempts)
    fn = Flaky(*(TimeoutError() for _ in range(50)))
    with pytest.raises(TimeoutError):
        RetryPolicy(attempts=50, max_seconds=1.0, backoff_seconds=0.01, jitter=False).retrying(
            sleep=clock.sleep, clock=clock)(fn)
    assert 1 <= fn.calls < 5


def test_default_clock_budget_is_tenacitys():
    r = RetryPolicy(attempts=4, max_seconds=7.0).retrying()
    assert isinstance(r.stop, tenacity.stop.stop_any)
    kinds = {type(s): s for s in r.stop.stops}
    assert kinds[tenacity.stop_after_attempt].max_attempt_number == 4
    assert kinds[tenacity.stop_after_delay].max_delay == 7.0
    assert r.reraise is True


def test_before_sleep_and_custom_predicates():
    seen: list[tuple[int, str]] = []

    def log(state: tenacity.RetryCallState) -> None:
        seen.append((state.attempt_number, type(state.outcome.exception()).__name__))

    fn = Flaky(KeyError("a"), KeyError("b"))
    r = RetryPolicy(attempts=5).retrying(sleep=lambda s: None, before_sleep=log,
                                         retry_on=lambda e: isinstance(e, KeyError))
    assert r(fn) == "ok"
    assert seen == [(1, "KeyError"), (2, "KeyError")]

    fn = Flaky(TimeoutError(), TimeoutError())
    r = RetryPolicy(attempts=5).retrying(sleep=lambda s: None, retry_on=tenacity.retry_if_exception_type(TimeoutError))
    assert r(fn) == "ok" and fn.calls == 3


def test_call_sleeps_for_real_but_briefly():
    fn = Flaky(ConnectionResetError())
    policy = RetryPolicy(attempts=2, backoff_seconds=0.001, backoff_max_seconds=0.002)
    assert policy.call(fn) == "ok" and fn.calls == 2
    assert RetryPolicy().call(lambda a, *, b: a + b, 1, b=2) == 3


def test_from_settings():
    s = Settings.from_env({"RESILIENT_STORAGE": "memory://a", "RESILIENT_RETRY_ATTEMPTS": "7",
                           "RESILIENT_RETRY_MAX_SECONDS": "12", "RESILIENT_RETRY_BACKOFF_SECONDS": "0.5",
                           "RESILIENT_RETRY_BACKOFF_MAX_SECONDS": "4"})
    assert RetryPolicy.from_settings(s) == RetryPolicy(attempts=7, max_seconds=12.0, backoff_seconds=0.5,
                                                       backoff_max_seconds=4.0, jitter=True)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"attempts": 0}, "RetryPolicy.attempts"), ({"attempts": True}, "RetryPolicy.attempts"),
    ({"max_seconds": 0}, "RetryPolicy.max_seconds"), ({"backoff_seconds": -1}, "RetryPolicy.backoff_seconds"),
    ({"backoff_seconds": 2.0, "backoff_max_seconds": 1.0}, "RetryPolicy.backoff_max_seconds"),
])
def test_policy_validates(kwargs, name):
    with pytest.raises(ConfigError) as info:
        RetryPolicy(**kwargs)
    assert info.value.name == name


def test_policy_pickles_and_copies():
    policy = RetryPolicy(attempts=3, max_seconds=9.0, backoff_seconds=0.1, backoff_max_seconds=1.0, jitter=False)
    clone = pickle.loads(pickle.dumps(policy))
    assert clone == policy and hash(clone) == hash(policy)
    sleeps: list[float] = []
    with pytest.raises(TimeoutError):
        clone.retrying(sleep=sleeps.append)(Flaky(*(TimeoutError() for _ in range(5))))
    assert sleeps == pytest.approx([0.1, 0.2])
    assert dataclasses.replace(policy, attempts=1).attempts == 1


def test_module_surface_and_docstring_examples():
    assert retry_module.__all__ == sorted(retry_module.__all__)
    result = doctest.testmod(retry_module)
    assert result.attempted > 5 and result.failed == 0
