"""What resilient asks of each storage SDK, in one place: its own retries, and what its answers mean.

Retries must not multiply. `resilient.retry.RetryPolicy` retries every storage operation (5 attempts
by default); s3fs retries what it considers retryable (``S3FileSystem.retries``, a class attribute: 5,
not a constructor option in s3fs 2026.9, see ``s3fs.core._error_wrapper``), and under it botocore
retries each request by its ``retries`` config (legacy mode: 5 attempts). Left alone, one call to a
dead endpoint makes up to 5 x 5 x 5 attempts, each waiting for its connect or read timeout. So for
S3 (s3fs):

* botocore makes one attempt per request: ``config_kwargs["retries"] = {"total_max_attempts": 1,
  "mode": "standard"}`` (``total_max_attempts`` counts the first attempt; botocore's own
  ``max_attempts`` counts retries only, see ``botocore.args._compute_retry_max_attempts``);
* each attempt is bounded: ``connect_timeout`` 5 s and ``read_timeout`` 15 s (s3fs's defaults, set
  explicitly so they do not depend on its class attributes);
* s3fs makes one attempt: `configure` sets ``retries = 1`` on the filesystem object.

Whatever the user sets in ``config_kwargs`` (through ``RESILIENT_STORAGE_OPTIONS``) wins, key by key.

`precondition_failed` says whether an SDK error is a conditional write refused because the object
exists. Like every reading of an SDK's answers (transient or permanent, see `resilient.retry`), it goes
through `resilient.retry.service_answer`: the structured answer (the botocore ``ClientError`` that s3fs
keeps as ``__cause__``), never a status code matched in an error's text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from resilient.retry import service_answer

__all__ = ["S3_DEFAULTS", "configure", "precondition_failed", "sdk_options"]

#: botocore client settings resilient applies to S3 replicas unless the user set them
S3_DEFAULTS: Mapping[str, Any] = {
    "retries": {"total_max_attempts": 1, "mode": "standard"},
    "connect_timeout": 5,
    "read_timeout": 15,
}
_S3 = frozenset({"s3", "s3a"})


def sdk_options(protocol: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The fsspec options for a replica of ``protocol``: ``options`` with resilient's SDK defaults
    filled in where the user set nothing (a new dict; ``options`` is not changed).

    Example:
        >>> sdk_options("s3", {"config_kwargs": {"read_timeout": 60}})["config_kwargs"]
        {'read_timeout': 60, 'retries': {'total_max_attempts': 1, 'mode': 'standard'}, 'connect_timeout': 5}
        >>> sdk_options("memory", {"x": 1})
        {'x': 1}
    """
    out = dict(options)
    if protocol in _S3:
        config = dict(out.get("config_kwargs") or {})
        for name, value in S3_DEFAULTS.items():
            config.setdefault(name, dict(value) if isinstance(value, Mapping) else value)
        out["config_kwargs"] = config
    return out


def configure(fs: Any) -> Any:
    """Set what cannot be passed as an option on a new filesystem object (s3fs: one attempt per call,
    resilient's policy retries); returns ``fs``."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in _S3:
        fs.retries = 1
    return fs


def precondition_failed(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a service's answer that a conditional write's precondition
    failed: error code ``PreconditionFailed`` or HTTP status 412.

    Example:
        >>> class ClientError(Exception):
        ...     def __init__(self, code, status):
        ...         self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        >>> err = OSError("exists")
        >>> err.__cause__ = ClientError("PreconditionFailed", 412)
        >>> precondition_failed(err), precondition_failed(OSError("412 in a message is not an answer"))
        (True, False)
    """
    answer = service_answer(e)
    return answer is not None and answer.precondition_failed
