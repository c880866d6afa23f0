"""Every error `resilient` raises, under one root.

The hierarchy::

    ResilientError
    ├── ConfigError (also ValueError)        a bad setting: names the variable, the value, what is accepted
    ├── CodecError                           state that cannot be encoded or decoded
    │   ├── UnsupportedTypeError (TypeError) a value the codec does not store without explicit pickle opt-in
    │   ├── CorruptionError                  bytes that fail magic, version, length or checksum checks
    │   │   └── SignatureError               a manifest's signature is missing, unknown or wrong
    │   └── UnsafeCheckpointError            refused before deserialization: pickle payload, path escape
    └── StorageError                         a storage operation failed (carries url, path, generation)
        ├── TransientStorageError            worth retrying: timeouts, 5xx, connection resets
        │   └── UnreachableError             a replica did not answer in time; its call goes on unwaited
        ├── PermanentStorageError            not worth retrying: 403, missing required object, no space
        ├── QuorumError                      fewer replicas acknowledged than the write quorum
        ├── FencedError                      a writer with a stale epoch or generation was refused
        └── NoCheckpointError (LookupError)  no committed checkpoint verifies for the key

Retry predicates key on these types (see `resilient.retry`). Errors keep their context as attributes so a
caller can act on them without parsing messages; messages never include credentials.
"""

from __future__ import annotations

__all__ = [
    "CodecError",
    "ConfigError",
    "CorruptionError",
    "FencedError",
    "NoCheckpointError",
    "PermanentStorageError",
    "QuorumError",
    "ResilientError",
    "SignatureError",
    "StorageError",
    "TransientStorageError",
    "UnreachableError",
    "UnsafeCheckpointError",
    "UnsupportedTypeError",
]


class ResilientError(Exception):
    """Root of every error raised by `resilient`.

    Every subclass pickles with its message and attributes (errors cross process boundaries: a Ray
    actor's error reaches the driver), whatever its constructor's signature.
    """

    def __reduce__(self) -> tuple:
        return (_rebuild_error, (type(self), self.args, self.__dict__))


def _rebuild_error(cls: type, args: tuple, state: dict) -> ResilientError:
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class ConfigError(ResilientError, ValueError):
    """A setting has a value that is not accepted.

    Attributes:
        name: the setting's environment variable (``RESILIENT_...``) or keyword name.
        value: the offending value, already redacted if it could hold a secret.
        accepted: a human description of what is accepted.
    """

    def __init__(self, name: str, value: object, accepted: str, *, detail: str = "") -> None:
        self.name = name
        self.value = value
        self.accepted = accepted
        msg = f"{name}={value!r} is not accepted: expected {accepted}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class CodecError(ResilientError):
    """State could not be encoded or decoded."""


class UnsupportedTypeError(CodecError, TypeError):
    """A value has a type the codec does not store without an explicit pickle opt-in.

    Attributes:
        path: where in the state the value sits, e.g. ``state['opt']['lr_fn']``.
        type_name: the qualified name of its type.
    """

    def __init__(self, path: str, type_name: str) -> None:
        self.path = path
        self.type_name = type_name
        super().__init__(
            f"{path} has type {type_name}, which is not stored without pickle; supported: dict, list, "
            "tuple, torch.Tensor, numpy.ndarray, int, float, bool, None, str, bytes "
            "(pass allow_pickle=True / RESILIENT_ALLOW_PICKLE=1 to store anything else with pickle)"
        )


class CorruptionError(CodecError):
    """Stored bytes failed a magic, version, length or checksum check; they were not loaded.

    Attributes:
        where: the object (URL or description) that failed.
        reason: what check failed.
    """

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}")


class SignatureError(CorruptionError):
    """A manifest failed its signature check (a signing key is configured); nothing it names was read.

    Loads treat it like any corrupt manifest: the generation is skipped and an older one that verifies
    is loaded.

    Attributes:
        where: the manifest's URL (credentials removed).
        reason: what was wrong: not signed, signed by a key that is not configured, or altered.
        key: the checkpoint key, if known.
        generation: the checkpoint generation, if known.
        key_id: the id of the key the manifest claims to be signed with ("" when unsigned).
        configured: the ids of the configured keys.
    """

    def __init__(
        self,
        where: str,
        reason: str,
        *,
        key: str | None = None,
        generation: int | None = None,
        key_id: str = "",
        configured: tuple[str, ...] = (),
    ) -> None:
        self.key = key
        self.generation = generation
        self.key_id = key_id
        self.configured = tuple(configured)
        context = []
        if key is not None:
            context.append(f"key {key!r}")
        if generation is not None:
            context.append(f"generation {generation}")
        if configured:
            context.append(f"configured key ids {','.join(configured)}")
        super().__init__(where, f"{reason} ({'; '.join(context)})" if context else reason)


class UnsafeCheckpointError(CodecError):
    """A checkpoint was refused before any deserialization (pickle payload, path escaping its root...)."""


class StorageError(ResilientError):
    """A storage operation failed.

    Attributes:
        url: the replica root URL involved (credentials removed), if any.
        path: the object path inside the replica, if any.
        generation: the checkpoint generation involved, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        path: str | None = None,
        generation: int | None = None,
    ) -> None:
        self.url = url
        self.path = path
        self.generation = generation
        parts = [message]
        if url is not None:
            parts.append(f"replica={url}")
        if path is not None:
            parts.append(f"object={path}")
        if generation is not None:
            parts.append(f"generation={generation}")
        super().__init__(" | ".join(parts))


class TransientStorageError(StorageError):
    """A storage failure worth retrying (timeout, 5xx, connection reset...)."""


class UnreachableError(TransientStorageError):
    """A replica did not answer within the time an operation gives it (others answered), or is known not
    to answer: it is left behind, and its call, if one was made, goes on without being waited for."""


class PermanentStorageError(StorageError):
    """A storage failure retrying will not fix (403, missing required object, no space left...)."""


class QuorumError(StorageError):
    """Fewer replicas acknowledged a write than the write quorum requires.

    Attributes:
        acked: how many replicas acknowledged.
        required: the write quorum.
        failures: replica URL -> the error it gave.
    """

    def __init__(
        self,
        message: str,
        *,
        acked: int,
        required: int,
        failures: dict[str, BaseException],
        generation: int | None = None,
    ) -> None:
        self.acked = acked
        self.required = required
        self.failures = dict(failures)
        detail = "; ".join(f"{u}: {type(e).__name__}: {e}" for u, e in self.failures.items())
        super().__init__(
            f"{message}: {acked} of {required} required replicas acknowledged ({detail})",
            generation=generation,
        )


class FencedError(StorageError):
    """A writer holding a stale epoch or generation was refused; a newer writer owns the key."""


class NoCheckpointError(StorageError, LookupError):
    """No committed checkpoint that verifies exists for the key (on any replica)."""
