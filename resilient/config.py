"""Settings: every knob of `resilient`, resolved once into one frozen object.

Precedence, highest first:

1. keyword arguments passed in code (``Settings.from_env(keep=5)``, ``settings.with_options(keep=5)``);
2. ``RESILIENT_*`` variables of the environment mapping given to `Settings.from_env` (``os.environ``
   by default, read when the function is called, never at import);
3. the defaults in `FIELDS`.

Resolution happens on the driver. The resulting `Settings` is plain, immutable data: it pickles and
travels to Ray actors as an argument, so workers never consult their own environment and every process
of a job sees the same configuration. It carries storage URLs and fsspec options, never live
filesystem handles.

Every field is declared once, in `FIELDS`; parsing, validation, error messages, `Settings.describe`
and `reference_table` (the README table) all read that table. A value that is not accepted raises
`resilient.errors.ConfigError` naming the variable (or keyword), the value and what is accepted; there
is no silent fallback to a default. Credentials (URL user info, secret-looking storage options) are
masked in ``repr``, in errors and in `Settings.describe`.

Secrets never travel in a pickle
--------------------------------
A secret value is a secret field's value (``signing_key``), or anything `resilient.redaction` recognizes
by its shape: a storage option under a secret-looking name (``key``, ``secret``, ``token``, ``passphrase``,
``connection_string``...), every value under ``headers``, and text carrying a credential (URL user info,
``AccountKey=``/``sig=`` parameters, ``Bearer ...`` authorizations, PEM private keys).
Pickling a `Settings` (for instance inside the job spec shipped to Ray actors) replaces every secret
value with a reference, and unpickling resolves the reference again (`seal_secrets`, `unseal_secrets`):

* a value that came from this process's environment (``os.environ``, e.g. ``RESILIENT_SIGNING_KEY`` or a
  ``"secret"`` inside ``RESILIENT_STORAGE_OPTIONS``) travels as the variable's name and is read again
  from the receiving process's environment. Actors of a local ``ray.init`` inherit the driver's
  environment; under ``ray job submit`` pass the variables with ``runtime_env={"env_vars": {...}}``.
  A variable missing there raises `ConfigError` naming it; a signing key that differs (by key id) too.
* a value given in code (a keyword, or an environment mapping passed to `Settings.from_env`) travels as
  a random token known only to the process that created it: copies within that process (``copy``,
  ``pickle`` round trips, forked children) get the value back, any other process refuses to unpickle
  it with a `ConfigError` that says to provide the secret through the environment instead. Secrets are
  never written into a pickle, so they never reach Ray's object store, task specs or spill files.

Credentials the cloud SDKs read themselves (``AWS_*`` variables, ``~/.aws``, instance roles) are not
part of `Settings` at all: every process resolves them through its SDK's usual chain.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import hashlib
import math
import os
import re
import secrets
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from resilient.errors import ConfigError
from resilient.redaction import MASK, redact_options, redact_text, secret_leaves

__all__ = [
    "FIELDS",
    "Field",
    "RedundancyWarning",
    "Settings",
    "redact_url",
    "redundancy_shape",
    "reference_table",
    "seal_secrets",
    "signing_key_ids",
    "sink_resolver",
    "unseal_secrets",
]

ENV_PREFIX = "RESILIENT_"

_SOURCES = ("keyword", "environment", "default")
# "scheme://user:password@" anywhere in a text.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]+@")
# "?name=value" / "&name=value" query parameters whose name looks secret (presigned URLs, SAS tokens).
_SCHEME = re.compile(r"^(?P<protocol>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$", re.DOTALL)
_PROTOCOL = re.compile(r"^[a-z][a-z0-9+.-]*$")
_INTEGER = re.compile(r"^[+-]?[0-9]+$")


class RedundancyWarning(UserWarning):
    """The configuration stores checkpoints in one place only (no replica to fall back on)."""


def redact_url(url: str) -> str:
    """Mask credentials in a URL, or in any text: `resilient.redaction.redact_text` (user info, secret query
    or connection-string parameters, authorization headers, private keys).

    Example:
        >>> redact_url("s3://AKIAEXAMPLE:wJalrXUtn@bucket/run1")
        's3://***@bucket/run1'
        >>> redact_url("https://host/obj?X-Amz-Signature=abc&part=1")
        'https://host/obj?X-Amz-Signature=***&part=1'
    """
    return redact_text(url)


class _FrozenDict(Mapping[str, Any]):
    """An immutable mapping that pickles (``types.MappingProxyType`` does not)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] = ()) -> None:  # type: ignore[assignment]
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_FrozenDict, (self._data,))

    def __repr__(self) -> str:
        return repr(self._data)


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return _FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


# --- parsers: text (from the environment) or native values (from keywords) -> normalized value ---


class _Refused(Exception):
    """Internal: a parser's refusal; `Settings` turns it into a ConfigError with the right name."""

    def __init__(self, detail: str = "", *, shown: Any = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.shown = shown


class _Parser:
    kind = "text"
    accepted = "a value"

    def parse(self, raw: Any) -> Any:
        raise NotImplementedError

    def format(self, value: Any) -> str:
        """The value written the way the environment variable takes it."""
        return str(value)

    def show(self, raw: Any) -> Any:
        """The raw value as an error may display it (credentials masked)."""
        return redact_url(raw) if isinstance(raw, str) else raw


class _Integer(_Parser):
    def __init__(self, lo: int, hi: int | None = None) -> None:
        self.lo, self.hi = lo, hi
        self.kind = f"integer {lo}..{hi}" if hi is not None else f"integer >= {lo}"
        self.accepted = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"

    def parse(self, raw: Any) -> int:
        if isinstance(raw, str) and _INTEGER.match(raw.strip()):
            value = int(raw.strip())
        elif isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        else:
            raise _Refused("not an integer")
        if value < self.lo or (self.hi is not None and value > self.hi):
            raise _Refused("out of range")
        return value


class _Number(_Parser):
    kind = "number > 0"
    accepted = "a finite number > 0"

    def __init__(self, *, allow_zero: bool = False) -> None:
        self.allow_zero = allow_zero
        if allow_zero:
            self.kind = "number >= 0"
            self.accepted = "a finite number >= 0"

    def parse(self, raw: Any) -> float:
        if isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise _Refused("not a number") from None
        elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        else:
            raise _Refused("not a number")
        if not math.isfinite(value) or value < 0 or (value == 0 and not self.allow_zero):
            raise _Refused("out of range")
        return value

    def format(self, value: Any) -> str:
        return f"{value:g}"


class _Choice(_Parser):
    def __init__(self, *options: str) -> None:
        self.options = options
        self.kind = " | ".join(f"`{o}`" for o in options)
        self.accepted = "one of " + ", ".join(f'"{o}"' for o in options)

    def parse(self, raw: Any) -> str:
        if isinstance(raw, str) and raw.strip().lower() in self.options:
            return raw.strip().lower()
        raise _Refused()


_RS = re.compile(r"^rs:(?P<k>[0-9]+)\+(?P<m>[0-9]+)$")


def redundancy_shape(value: str) -> tuple[str, int, int]:
    """(mode, data shards, parity shards) of a normalized redundancy setting (0, 0 for "replicate";
    for "parity" the shard counts follow from the number of replicas: 0, 1).

    >>> redundancy_shape("rs:4+2"), redundancy_shape("parity")
    (('rs', 4, 2), ('parity', 0, 1))
    """
    m = _RS.match(value)
    if m:
        return "rs", int(m["k"]), int(m["m"])
    return (value, 0, 1) if value == "parity" else (value, 0, 0)


class _Redundancy(_Parser):
    kind = "`replicate` | `parity` | `rs:K+M`"
    accepted = ('"replicate", "parity", or "rs:K+M" (Reed-Solomon: K >= 2 data shards and M >= 1 parity shards, '
                "K + M at most 256 and equal to the number of storage URLs)")

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str):
            raise _Refused()
        text = raw.strip().lower().replace(" ", "")
        if text in ("replicate", "parity"):
            return text
        m = _RS.match(text)
        if m is None:
            raise _Refused()
        k, parity = int(m["k"]), int(m["m"])
        if k < 2 or parity < 1 or k + parity > 256:
            raise _Refused(f"K={k}, M={parity}")
        return f"rs:{k}+{parity}"


class _Flag(_Parser):
    kind = "boolean"
    accepted = "1/0, true/false, yes/no or on/off (any case)"
    _WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}

    def parse(self, raw: Any) -> bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in self._WORDS:
            return self._WORDS[raw.strip().lower()]
        raise _Refused()

    def format(self, value: Any) -> str:
        return "true" if value else "false"


class _WordOrInteger(_Parser):
    """One of a few words (any case), or an integer from `lo` up to `hi` (None: no upper bound)."""

    def __init__(self, words: tuple[str, ...], lo: int, hi: int | None, kind: str, accepted: str) -> None:
        self.words, self.lo, self.hi, self.kind, self.accepted = words, lo, hi, kind, accepted

    def parse(self, raw: Any) -> int | str:
        if isinstance(raw, str):
            text = raw.strip().lower()
            if text in self.words:
                return text
            if not _INTEGER.match(text):
                raise _Refused()
            raw = int(text)
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise _Refused()
        if raw < self.lo or (self.hi is not None and raw > self.hi):
            raise _Refused()
        return raw


_QUORUM = _WordOrInteger(("majority", "all"), 1, None, "`majority` | `all` | integer",
                         '"majority", "all", or an integer from 1 to the number of storage URLs')
_PER_CALL = _WordOrInteger(("auto",), 1, 64, "`auto` | integer 1..64", '"auto", or an integer from 1 to 64')


class _Storage(_Parser):
    kind = "comma-separated URLs"
    accepted = (
        "comma-separated storage URLs or paths (file:///abs/path, /abs/path, s3://bucket/prefix, "
        "gs://bucket/prefix, memory://name), no empty entry, no duplicate"
    )

    def parse(self, raw: Any) -> tuple[str, ...]:
        if isinstance(raw, str):
            entries: list[Any] = raw.split(",")
        elif isinstance(raw, (list, tuple)):
            entries = list(raw)
        else:
            raise _Refused("not a comma-separated string or a list of URLs")
        if not entries:
            raise _Refused("at least one URL is needed")
        urls: list[str] = []
        for entry in entries:
            url = self._normalize(entry)
            if url in urls:
                raise _Refused(f"duplicate entry {redact_url(url)}", shown=self.show(raw))
            urls.append(url)
        return tuple(urls)

    def _normalize(self, entry: Any) -> str:
        if isinstance(entry, os.PathLike):
            entry = os.fspath(entry)
        if not isinstance(entry, str):
            raise _Refused(f"entry {entry!r} is not a string")
        entry = entry.strip()
        if not entry:
            raise _Refused("empty entry")
        m = _SCHEME.match(entry)
        if m is None:  # a plain path: absolute, as a file:// URL
            return "file://" + os.path.abspath(os.path.expanduser(entry))
        protocol, rest = m["protocol"].lower(), m["rest"]
        if protocol in ("file", "local"):
            if not rest.startswith("/"):
                raise _Refused(f"{redact_url(entry)} is not an absolute file:// URL (file:///abs/path)")
            return "file://" + os.path.normpath(rest)
        if not rest.strip("/"):
            raise _Refused(f"{redact_url(entry)} names no bucket or location")
        return f"{protocol}://{rest.rstrip('/')}"

    def format(self, value: Any) -> str:
        return ",".join(redact_url(u) for u in value)

    def show(self, raw: Any) -> Any:
        if isinstance(raw, (list, tuple)):
            return [redact_url(e) if isinstance(e, str) else e for e in raw]
        return super().show(raw)


class _StorageOptions(_Parser):
    kind = "JSON object"
    accepted = (
        'a JSON object mapping a protocol ("s3") or a URL prefix ("s3://bucket") to an object of '
        "fsspec options"
    )

    def parse(self, raw: Any) -> Mapping[str, Mapping[str, Any]]:
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise _Refused(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if not isinstance(raw, Mapping):
            raise _Refused("not an object")
        for key, options in raw.items():
            if not isinstance(key, str) or not (_PROTOCOL.match(key) or _SCHEME.match(key)):
                raise _Refused(f"key {key!r} is neither a protocol nor a URL prefix")
            if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
                raise _Refused(f"options for {redact_url(key)!r} are not an object with string keys")
        return _freeze(raw)

    def format(self, value: Any) -> str:
        return json.dumps(redact_options(value), sort_keys=True, default=repr)

    def show(self, raw: Any) -> Any:
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                return MASK  # unparsable text may hold credentials anywhere
        if not isinstance(raw, Mapping):
            return MASK  # not the expected shape: no telling which parts are credentials
        return {
            k: redact_options(v) if isinstance(v, Mapping) else MASK
            for k, v in raw.items()
        }

class _RemoteArgs(_Parser):
    kind = "JSON object"
    accepted = "a JSON object of Ray actor options (see resilient.placement)"

    def parse(self, raw: Any) -> Mapping[str, Any]:
        from resilient.placement import check_remote_args

        if isinstance(raw, str):
            try:
                raw = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError as e:
                raise _Refused(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        try:
            return _freeze(check_remote_args(raw))
        except ValueError as e:
            raise _Refused(str(e)) from None

    def format(self, value: Any) -> str:
        return json.dumps(_thaw(value), sort_keys=True, default=repr)


class _SigningKeys(_Parser):
    kind = "secret text"
    accepted = (
        "one key of at least 16 characters, or several separated by commas (the first signs, every one "
        "verifies: key rotation); no spaces around them"
    )
    MIN = 16

    def parse(self, raw: Any) -> str | None:
        if raw is None:
            return None
        if not isinstance(raw, str):
            raise _Refused("not text")
        keys = raw.split(",")
        if any(len(k) < self.MIN for k in keys):
            raise _Refused(f"every key needs at least {self.MIN} characters")
        if any(k != k.strip() for k in keys):
            raise _Refused("a key starts or ends with white space")
        if len(set(keys)) != len(keys):
            raise _Refused("a key is listed twice")
        return raw

    def format(self, value: Any) -> str:
        return "" if value is None else MASK

    def show(self, raw: Any) -> Any:
        return MASK


def signing_key_ids(value: str | None) -> tuple[str, ...]:
    """The public ids of the keys in a ``signing_key`` setting, in order (the first one signs).

    An id is the first 8 bytes (16 hex digits) of ``sha256(b"resilient-signing-key-id\\0" + key)``: it
    names a key in manifests and errors (so a rotated key is recognized) and reveals nothing usable
    about it.

    Example:
        >>> signing_key_ids(None)
        ()
        >>> [len(i) for i in signing_key_ids("0123456789abcdef,fedcba9876543210")]
        [16, 16]
    """
    if not value:
        return ()
    return tuple(
        hashlib.sha256(b"resilient-signing-key-id\0" + k.encode()).hexdigest()[:16] for k in value.split(",")
    )


@dataclass(frozen=True)
class Field:
    """One setting: where it lives, how it is read, what it defaults to.

    Attributes:
        attr: the `Settings` attribute and the keyword-override name.
        env: the environment variable.
        parser: turns environment text or a native keyword value into the normalized value.
        default: the default value (``()`` for storage: resolved against the working directory).
        doc: one line of meaning, for errors and the README table.
        example: an example value as it would be written in the environment.
        secret: mask the whole value wherever it is shown.
        default_text: how the README shows the default when the value alone does not say it.
    """

    attr: str
    env: str
    parser: _Parser
    default: Any
    doc: str
    example: str
    secret: bool = False
    default_text: str = ""

    def shown_default(self) -> str:
        return self.default_text or self.parser.format(self.default)


FIELDS: tuple[Field, ...] = (
    Field("storage", "RESILIENT_STORAGE", _Storage(), (), "storage replicas, one fsspec URL each",
          "s3://ckpt-a/run1,gs://ckpt-b/run1,/mnt/nfs/run1", default_text="`file://<cwd>/.resilient/store` (warns)"),
    Field("storage_options", "RESILIENT_STORAGE_OPTIONS", _StorageOptions(), _FrozenDict(),
          "fsspec options per protocol or URL prefix", '{"s3": {"endpoint_url": "http://127.0.0.1:5000"}}'),
    Field("redundancy", "RESILIENT_REDUNDANCY", _Redundancy(), "replicate",
          "full copies on every replica, XOR parity across them (needs 3+), or Reed-Solomon rs:K+M "
          "(K data and M parity shards, one per replica: any M may be lost)", "rs:2+1"),
    Field("write_quorum", "RESILIENT_WRITE_QUORUM", _QUORUM, "majority",
          "replicas that must acknowledge a write before it counts", "2"),
    Field("keep", "RESILIENT_KEEP", _Integer(1), 3, "checkpoint generations retained per key", "5"),
    Field("compression", "RESILIENT_COMPRESSION", _Choice("auto", "zstd", "off"), "auto",
          "zstd compression: chosen per tensor, always, or never", "zstd"),
    Field("compression_level", "RESILIENT_COMPRESSION_LEVEL", _Integer(-7, 22), 1, "zstd level", "3"),
    Field("io_threads", "RESILIENT_IO_THREADS", _Integer(1, 64), 2, "threads compressing one checkpoint while it is written", "8"),
    Field("retry_attempts", "RESILIENT_RETRY_ATTEMPTS", _Integer(1), 5,
          "attempts per storage operation (1 = no retry)", "8"),
    Field("retry_max_seconds", "RESILIENT_RETRY_MAX_SECONDS", _Number(), 60.0,
          "time budget for one storage operation's retries", "120"),
    Field("retry_backoff_seconds", "RESILIENT_RETRY_BACKOFF_SECONDS", _Number(), 0.2,
          "first backoff between attempts; doubles after each", "0.5"),
    Field("retry_backoff_max_seconds", "RESILIENT_RETRY_BACKOFF_MAX_SECONDS", _Number(), 10.0,
          "longest backoff between attempts", "30"),
    Field("degraded_after", "RESILIENT_DEGRADED_AFTER", _Integer(1), 3,
          "consecutive failed operations before a replica is reported degraded", "5"),
    Field("allow_pickle", "RESILIENT_ALLOW_PICKLE", _Flag(), False,
          "store values the codec does not know with pickle (and load them back)", "true"),
    Field("signing_key", "RESILIENT_SIGNING_KEY", _SigningKeys(), None,
          "HMAC-SHA256 key(s) signing checkpoint manifests; every load then refuses unsigned or altered "
          "ones. `new,old` while rotating", "$(openssl rand -hex 32)", secret=True,
          default_text="none: manifests unsigned"),
    Field("num_actors", "RESILIENT_NUM_ACTORS", _Integer(1, 4096), 2,
          "worker actors (slots) running the pipeline", "8"),
    Field("actor_cpus", "RESILIENT_ACTOR_CPUS", _Number(), 0.25, "CPUs Ray reserves per worker actor", "1"),
    Field("actor_gpus", "RESILIENT_ACTOR_GPUS", _Number(allow_zero=True), 0.0,
          "GPUs Ray reserves per worker actor", "1"),
    Field("ray_remote_args", "RESILIENT_RAY_REMOTE_ARGS", _RemoteArgs(), _FrozenDict(),
          "Ray actor options for every worker actor and standby: memory, resources, accelerator_type, "
          "label_selector, runtime_env, scheduling_strategy, placement_group_bundles (see Placing the actors)",
          '{"memory": 4294967296, "resources": {"special": 1}}'),
    Field("standby", "RESILIENT_STANDBY", _Integer(0, 64), 1,
          "spare worker actors started ahead, model loaded, to replace a failed one at once", "2"),
    Field("queue_depth", "RESILIENT_QUEUE_DEPTH", _Integer(1, 64), 2,
          "actor calls queued on one worker actor at a time", "4"),
    Field("batches_per_call", "RESILIENT_BATCHES_PER_CALL", _PER_CALL, "auto",
          "batches one actor call carries; `auto`: several when batches are short (a call's batches "
          "together under about 0.2 s, 0.05 s when stateful, and a quarter of the batch timeout), else 1", "1"),
    Field("checkpoint_every", "RESILIENT_CHECKPOINT_EVERY", _Integer(1), 100,
          "stateful pipelines: checkpoint a slot's state every N batches", "500"),
    Field("hot_snapshot_max_mb", "RESILIENT_HOT_SNAPSHOT_MAX_MB", _Integer(0), 64,
          "stateful pipelines: each slot's newest snapshot up to this size is also kept in the Ray object "
          "store, so a replacement starts from it instead of the older persisted checkpoint; 0: never", "512"),
    Field("checkpoint_interval_seconds", "RESILIENT_CHECKPOINT_INTERVAL_SECONDS", _Number(), 60.0,
          "stateful pipelines: checkpoint a slot's state at least this often", "30"),
    Field("batch_timeout_seconds", "RESILIENT_BATCH_TIMEOUT_SECONDS", _Number(), 600.0,
          "a batch (or a call of several, see RESILIENT_BATCHES_PER_CALL) running longer is a hang: its actor "
          "is killed and replaced", "120"),
    Field("max_attempts", "RESILIENT_MAX_ATTEMPTS", _Integer(1), 3,
          "attempts per batch (exceptions, crashes, hangs) before it is a poison batch", "5"),
    Field("on_poison", "RESILIENT_ON_POISON", _Choice("dead-letter", "fail"), "dead-letter",
          "what a poison batch does: recorded as a dead letter (job goes on), or fails the job", "fail"),
    Field("fail_fast_after", "RESILIENT_FAIL_FAST_AFTER", _Integer(0, 1_000_000), 3,
          "fail the job at once when this many distinct batches raise the same error (type and line) before "
          "any batch succeeds; 0: never, every batch gets its attempts", "5"),
    Field("start_deaths", "RESILIENT_START_DEATHS", _Integer(1, 1_000_000), 20,
          "actors of one slot that may die in a row while starting (killed, out of memory, node lost: not an "
          "exception of the pipeline) before the job fails; each is retried after a growing backoff", "50"),
    Field("start_timeout_seconds", "RESILIENT_START_TIMEOUT_SECONDS", _Number(), 600.0,
          "an actor that has not built the pipeline and restored its state within this long is killed and "
          "started again (counts as a death while starting)", "1800"),
    Field("preemptions", "RESILIENT_PREEMPTIONS", _WordOrInteger(("unlimited",), 0, None, "`unlimited` | integer >= 0",
                                                                  '"unlimited", or an integer >= 0'),
          "unlimited", "worker actors the job may lose to preemption (announced by a drain, or reported by Ray) "
          "before it fails; never charged to a batch or a start", "100"),
    Field("stop_timeout_seconds", "RESILIENT_STOP_TIMEOUT_SECONDS", _Number(), 2.5,
          "on SIGTERM, Ctrl-C or `ray job stop`, the driver commits what has answered, persists the slots and the "
          "progress, and exits within this long; keep it under Ray's RAY_JOB_STOP_WAIT_TIME_S (3 s by default)",
          "20"),
    Field("commit_group_size", "RESILIENT_COMMIT_GROUP_SIZE", _Integer(1, 100_000), 256,
          "most batch outputs the driver publishes together (one record under the sink's _commit/, one directory "
          "sync; a Delta table: one transaction)", "64"),
    Field("commit_interval_seconds", "RESILIENT_COMMIT_INTERVAL_SECONDS", _Number(allow_zero=True), 0.1,
          "the driver starts at most one group commit per this many seconds (an output waits at most about "
          "this long to be committed); 0: whenever the committer is idle", "0.5"),
)

_BY_ATTR = {f.attr: f for f in FIELDS}
_BY_ENV = {f.env: f for f in FIELDS}


def _label(field: Field, source: str) -> str:
    """How an error names a setting: its keyword when it was given as one, else its variable."""
    return f"keyword '{field.attr}'" if source == "keyword" else field.env


def _default_storage() -> str:
    return "file://" + os.path.join(os.path.abspath(os.getcwd()), ".resilient", "store")


@dataclass(frozen=True, repr=False)
class Settings:
    """Every setting of `resilient`, validated, immutable and picklable.

    Build it with `Settings.from_env` (or copy one with `with_options`); the constructor validates too.
    The meaning, variable and default of each attribute are in `FIELDS` (see `reference_table`).

    Example:
        >>> s = Settings.from_env({"RESILIENT_STORAGE": "memory://a,memory://b,memory://c"}, keep=5)
        >>> s.keep, s.quorum, s.storage[0]
        (5, 2, 'memory://a')
        >>> s.describe()[4]
        ('RESILIENT_KEEP', '5', 'keyword')
    """

    storage: tuple[str, ...]
    storage_options: Mapping[str, Mapping[str, Any]]
    redundancy: str
    write_quorum: int | str
    keep: int
    compression: str
    compression_level: int
    io_threads: int
    retry_attempts: int
    retry_max_seconds: float
    retry_backoff_seconds: float
    retry_backoff_max_seconds: float
    degraded_after: int
    allow_pickle: bool
    signing_key: str | None
    num_actors: int
    actor_cpus: float
    actor_gpus: float
    ray_remote_args: Mapping[str, Any]
    standby: int
    queue_depth: int
    batches_per_call: int | str
    checkpoint_every: int
    hot_snapshot_max_mb: int
    checkpoint_interval_seconds: float
    batch_timeout_seconds: float
    max_attempts: int
    on_poison: str
    fail_fast_after: int
    start_deaths: int
    start_timeout_seconds: float
    preemptions: int | str
    stop_timeout_seconds: float
    commit_group_size: int
    commit_interval_seconds: float
    #: attribute -> "keyword" | "environment" | "default"; not part of equality.
    sources: Mapping[str, str] = dataclasses.field(default_factory=_FrozenDict, compare=False)

    def __post_init__(self) -> None:
        sources = {f.attr: self.sources.get(f.attr, "keyword") for f in FIELDS}
        for field in FIELDS:
            raw = getattr(self, field.attr)
            try:
                value = field.parser.parse(raw)
            except _Refused as e:
                shown = MASK if field.secret else (e.shown if e.shown is not None else field.parser.show(raw))
                raise ConfigError(_label(field, sources[field.attr]), shown, field.parser.accepted,
                                  detail=e.detail) from None
            object.__setattr__(self, field.attr, value)
        object.__setattr__(self, "sources", _FrozenDict(sources))
        self._check_together()

    def _check_together(self) -> None:
        n = len(self.storage)
        label = {f.attr: _label(f, self.sources[f.attr]) for f in FIELDS}
        storage_note = f"{label['storage']} lists {n} URL{'s' if n != 1 else ''}"
        mode, k, parity = redundancy_shape(self.redundancy)
        if mode == "parity" and n < 3:
            raise ConfigError(label["redundancy"], self.redundancy,
                              '"replicate", or "parity" with at least 3 storage URLs', detail=storage_note)
        if mode == "rs" and k + parity != n:
            raise ConfigError(label["redundancy"], self.redundancy,
                              f'"replicate", "parity", or "rs:K+M" with K + M = {n} (one shard per storage URL)',
                              detail=storage_note)
        wq = self.write_quorum
        if isinstance(wq, int):
            low = {"parity": n - 1, "rs": k}.get(mode, 1)
            if not low <= wq <= n:
                why = f"; {mode} needs its {low} data shards" if mode != "replicate" else ""
                raise ConfigError(label["write_quorum"], wq,
                                  f'"majority", "all", or an integer from {low} to {n}', detail=storage_note + why)
        try:
            from resilient.placement import placement_bundles

            placement_bundles(self.ray_remote_args, self.actor_cpus, self.actor_gpus)
        except ValueError as e:
            raise ConfigError(label["ray_remote_args"], _RemoteArgs().format(self.ray_remote_args),
                              "placement_group_bundles whose first bundle holds RESILIENT_ACTOR_CPUS and "
                              "RESILIENT_ACTOR_GPUS", detail=str(e)) from None
        if self.retry_backoff_max_seconds < self.retry_backoff_seconds:
            raise ConfigError(label["retry_backoff_max_seconds"], self.retry_backoff_max_seconds,
                              f"a number >= {label['retry_backoff_seconds']} ({self.retry_backoff_seconds:g})")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Resolve settings: keyword overrides, then ``RESILIENT_*`` variables, then defaults.

        Args:
            environ: the environment to read; ``os.environ`` (at call time) when None.
            **overrides: native values by attribute name (``storage=["/a", "/b"]``, ``keep=5``).

        Returns:
            The validated settings, with each value's source recorded in ``sources``.

        Raises:
            ConfigError: a value is not accepted, a ``RESILIENT_*`` variable or a keyword is unknown,
                or two settings contradict each other.

        Warns:
            RedundancyWarning: no storage was configured; one local directory is used.

        Example:
            >>> env = {"RESILIENT_STORAGE": "memory://a,memory://b", "RESILIENT_KEEP": "4"}
            >>> s = Settings.from_env(env, keep=2)
            >>> s.keep, s.sources["keep"], s.sources["storage"], s.sources["io_threads"]
            (2, 'keyword', 'environment', 'default')
        """
        environ = os.environ if environ is None else environ
        _check_names(environ, overrides)
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for field in FIELDS:
            if field.attr in overrides:
                values[field.attr], sources[field.attr] = overrides[field.attr], "keyword"
            elif field.env in environ:
                values[field.attr], sources[field.attr] = environ[field.env], "environment"
            else:
                values[field.attr], sources[field.attr] = field.default, "default"
        if sources["storage"] == "default":
            values["storage"] = (_default_storage(),)
            warnings.warn(
                f"RESILIENT_STORAGE is not set: checkpoints go to {values['storage'][0]} only, with no "
                "redundancy; set RESILIENT_STORAGE to two or more URLs to survive the loss of one",
                RedundancyWarning,
                stacklevel=2,
            )
        return cls(**values, sources=_FrozenDict(sources))

    def with_options(self, **overrides: Any) -> Settings:
        """A validated copy with some settings replaced (they are recorded as keyword-sourced).

        Example:
            >>> s = Settings.from_env({"RESILIENT_STORAGE": "memory://a"})
            >>> s.with_options(keep=9).keep
            9
        """
        _check_names({}, overrides)
        sources = {**self.sources, **{k: "keyword" for k in overrides}}
        return dataclasses.replace(self, **overrides, sources=_FrozenDict(sources))

    @property
    def quorum(self) -> int:
        """How many replicas must acknowledge a write.

        ``"majority"`` is ``n // 2 + 1`` with replication, ``n - 1`` with parity (every data shard), and
        ``max(K, n // 2 + 1)`` with ``rs:K+M`` (every data shard, and a majority of the shards);
        ``"all"`` is ``n``; an integer is itself.

        Example:
            >>> Settings.from_env({"RESILIENT_STORAGE": "memory://a,memory://b,memory://c,memory://d"}).quorum
            3
        """
        n = len(self.storage)
        if self.write_quorum == "all":
            return n
        if self.write_quorum == "majority":
            mode, k, _ = redundancy_shape(self.redundancy)
            return {"parity": n - 1, "rs": max(k, n // 2 + 1)}.get(mode, n // 2 + 1)
        return int(self.write_quorum)

    def storage_options_for(self, url: str) -> dict[str, Any]:
        """The fsspec options for one storage URL: its protocol's entry, overlaid with the entry of the
        longest matching URL prefix (nested objects merge; the prefix wins).

        Example:
            >>> s = Settings.from_env({"RESILIENT_STORAGE": "s3://a/run,s3://b/run"}, storage_options={
            ...     "s3": {"anon": False, "client_kwargs": {"region_name": "eu-west-1"}},
            ...     "s3://b": {"client_kwargs": {"endpoint_url": "http://127.0.0.1:5000"}}})
            >>> s.storage_options_for("s3://b/run")["client_kwargs"]
            {'region_name': 'eu-west-1', 'endpoint_url': 'http://127.0.0.1:5000'}
        """
        return _options_for(self.storage_options, url)

    def redacted(self) -> dict[str, Any]:
        """Every setting by attribute, with credentials masked (safe to log).

        Example:
            >>> Settings.from_env({"RESILIENT_STORAGE": "s3://KEY:SECRET@bucket/run"}).redacted()["storage"]
            ('s3://***@bucket/run',)
        """
        out: dict[str, Any] = {}
        for field in FIELDS:
            value = getattr(self, field.attr)
            if field.secret:
                value = MASK if value is not None else None
            elif field.attr == "storage":
                value = tuple(redact_url(u) for u in value)
            elif field.attr == "storage_options":
                value = redact_options(value)
            elif isinstance(value, str):
                value = redact_url(value)
            out[field.attr] = value
        return out

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, value as the variable would be written with credentials masked, source) for every
        setting, in `FIELDS` order; source is ``"keyword"``, ``"environment"`` or ``"default"``.

        Example:
            >>> Settings.from_env({"RESILIENT_STORAGE": "memory://a"}).describe()[0]
            ('RESILIENT_STORAGE', 'memory://a', 'environment')
        """
        return [
            (f.env, _shown_secret(getattr(self, f.attr)) if f.secret else f.parser.format(getattr(self, f.attr)),
             self.sources[f.attr])
            for f in FIELDS
        ]

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in self.redacted().items()) + ")"

    def in_code_secrets(self) -> list[str]:
        """Settings holding a secret value that was given in code rather than taken from this process's
        environment: another process (a Ray actor) refuses to unpickle them (see the module docstring).
        A runtime can call this before shipping the settings, to fail early.

        Example:
            >>> s = Settings.from_env({"RESILIENT_STORAGE": "memory://a"}, signing_key="k" * 16)
            >>> s.in_code_secrets()
            ["keyword 'signing_key'"]
        """
        out = []
        for field in FIELDS:
            _, refs = seal_secrets(getattr(self, field.attr), _field_resolver(self, field), whole=field.secret)
            if any(ref[0] == "local" for _, ref in refs):
                out.append(_label(field, self.sources[field.attr]))
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle without secret values: each travels as a reference (see the module docstring)."""
        state: dict[str, Any] = {}
        sealed: dict[str, list[tuple[tuple[Any, ...], tuple[Any, ...]]]] = {}
        for field in FIELDS:
            value, refs = seal_secrets(getattr(self, field.attr), _field_resolver(self, field), whole=field.secret)
            state[field.attr] = value
            if refs:
                sealed[field.attr] = refs
        return (_rebuild_settings, (state, dict(self.sources), sealed))


def _shown_secret(value: Any) -> str:
    return "" if value is None else MASK


def _options_for(storage_options: Mapping[str, Any], url: str) -> dict[str, Any]:
    """`Settings.storage_options_for` over any (frozen or plain) storage options mapping."""
    m = _SCHEME.match(url)
    protocol = m["protocol"].lower() if m else "file"
    plain = _USERINFO.sub(lambda g: g["scheme"], url)
    options = _thaw(storage_options.get(protocol, {}))
    prefixes = [
        p for p in storage_options
        if "://" in p and (plain == p.rstrip("/") or plain.startswith(p.rstrip("/") + "/"))
    ]
    if prefixes:
        options = _merge(options, _thaw(storage_options[max(prefixes, key=len)]))
    return options


# --- secrets in pickles: references instead of values ---------------------------------------------

_MISSING = object()
_LOCAL_LOCK = threading.Lock()
_LOCAL_TOKENS: dict[str, str] = {}  # canonical text of a secret value -> its token in this process
_LOCAL_VALUES: dict[str, Any] = {}  # token -> secret value


class _Resolver:
    """Where a secret value can be found again in another process: one environment variable, parsed,
    and the secret taken at the same place in the result (``lookup``)."""

    def __init__(self, variable: str, parse: Callable[[str], Any], label: str, *, trusted: bool) -> None:
        self.variable = variable
        self.parse = parse
        self.label = label
        self.trusted = trusted  # the value may have come from os.environ (not from code)

    def current(self, environ: Mapping[str, str]) -> Any:
        if self.variable not in environ:
            return _MISSING
        try:
            return self.parse(environ[self.variable])
        except (ConfigError, _Refused):
            return _MISSING


def _field_resolver(settings: Settings, field: Field) -> _Resolver:
    def parse(text: str) -> Any:
        return field.parser.parse(text)

    return _Resolver(field.env, parse, _label(field, settings.sources[field.attr]),
                     trusted=settings.sources[field.attr] == "environment")


def sink_resolver(url: str, *, part: str = "options") -> _Resolver:
    """Where the secrets of an output location come from (used by `resilient.io.FileSink` pickling):
    with ``part="options"``, ``RESILIENT_STORAGE_OPTIONS`` resolved for `url`; with ``part="url"``,
    nowhere (a URL is always given in code)."""

    def parse(text: str) -> Any:
        return _options_for(_StorageOptions().parse(text), url)

    if part == "url":
        return _Resolver("RESILIENT_STORAGE_OPTIONS", parse, f"output URL {redact_url(url)}", trusted=False)
    return _Resolver("RESILIENT_STORAGE_OPTIONS", parse, f"storage options of {redact_url(url)}", trusted=True)


def _at(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        try:
            value = value[step]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return value


def _put(value: Any, path: tuple[Any, ...], leaf: Any) -> Any:
    if not path:
        return leaf
    container = value
    for step in path[:-1]:
        container = container[step]
    container[path[-1]] = leaf
    return value


def _local_token(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, default=repr)
    with _LOCAL_LOCK:
        token = _LOCAL_TOKENS.get(canonical)
        if token is None:
            token = _LOCAL_TOKENS[canonical] = secrets.token_hex(16)
            _LOCAL_VALUES[token] = value
        return token


def seal_secrets(
    value: Any, resolver: _Resolver, *, whole: bool = False, environ: Mapping[str, str] | None = None
) -> tuple[Any, list[tuple[tuple[Any, ...], tuple[Any, ...]]]]:
    """A copy of `value` with every secret in it replaced by ``"***"``, and the references that bring the
    secrets back (`unseal_secrets`): ``("env", variable, check)`` when the process environment holds the
    same secret at the same place (per `resolver`), else ``("local", token)``.

    Args:
        value: a setting's value (plain or frozen containers).
        resolver: the environment variable the value may have come from.
        whole: the whole value is secret (a secret field), not only the parts that look secret.
        environ: the environment to compare with; ``os.environ`` when None.

    Example:
        >>> plain, refs = seal_secrets({"key": "AKIA", "region": "x"}, sink_resolver("s3://b"), environ={})
        >>> plain, [r[0] for _, r in refs]
        ({'key': '***', 'region': 'x'}, ['local'])
    """
    environ = os.environ if environ is None else environ
    if whole:
        leaves = [((), value)] if value is not None else []
    else:
        leaves = list(secret_leaves(value))
    if not leaves:
        return _thaw(value), []
    current = resolver.current(environ) if resolver.trusted else _MISSING
    plain = _thaw(value)
    refs = []
    for path, leaf in leaves:
        leaf = _thaw(leaf)
        there = _at(current, path) if current is not _MISSING else _MISSING
        if there is not _MISSING and _thaw(there) == leaf:
            check = ",".join(signing_key_ids(leaf)) if whole and isinstance(leaf, str) else ""
            refs.append((path, ("env", resolver.variable, check)))
        else:
            refs.append((path, ("local", _local_token(leaf))))
        plain = _put(plain, path, MASK)
    return plain, refs


def unseal_secrets(
    plain: Any,
    refs: list[tuple[tuple[Any, ...], tuple[Any, ...]]],
    resolver: _Resolver,
    *,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """`plain` with every secret that `seal_secrets` took out put back, read from this process's
    environment or its own in-process tokens.

    Raises:
        ConfigError: a secret is not available here: its variable is not set (or holds no value at that
            place), a signing key differs from the sender's, or a value given in code reached another
            process.
    """
    environ = os.environ if environ is None else environ
    current: Any = None
    for path, ref in refs:
        if ref[0] == "env":
            _, variable, check = ref
            if current is None:
                current = resolver.current(environ)
            leaf = _at(current, path) if current is not _MISSING else _MISSING
            if leaf is _MISSING:
                raise ConfigError(
                    variable, MASK, f"the variable set in this process too (pid {os.getpid()})",
                    detail="settings and sinks travel between processes without their secrets, which each "
                    "process reads from its own environment; for Ray workers started elsewhere pass it with "
                    'runtime_env={"env_vars": {...}}',
                )
            leaf = _thaw(leaf)
            if check and ",".join(signing_key_ids(leaf)) != check:
                raise ConfigError(
                    variable, MASK, f"the same keys as the process that sent the settings (key ids {check})",
                    detail=f"this process has key ids {','.join(signing_key_ids(leaf))}",
                )
        else:
            with _LOCAL_LOCK:
                leaf = _LOCAL_VALUES.get(ref[1], _MISSING)
            if leaf is _MISSING:
                raise ConfigError(
                    resolver.label, MASK,
                    f"a secret taken from the environment ({resolver.variable}, or the storage SDK's own "
                    "credential chain such as AWS_* variables) when settings or sinks go to another process",
                    detail=f"a secret given in code never leaves its process in a pickle; this process "
                    f"(pid {os.getpid()}) did not create it",
                )
        plain = _put(plain, path, leaf)
    return plain


def _rebuild_settings(
    state: dict[str, Any], sources: dict[str, str], sealed: dict[str, list[Any]]
) -> Settings:
    stub = _SourcesOnly(sources)
    values = dict(state)
    for attr, refs in sealed.items():
        field = _BY_ATTR[attr]
        values[attr] = unseal_secrets(values[attr], refs, _field_resolver(stub, field))  # type: ignore[arg-type]
    return Settings(**values, sources=_FrozenDict(sources))


class _SourcesOnly:
    def __init__(self, sources: Mapping[str, str]) -> None:
        self.sources = sources


def _check_names(environ: Mapping[str, str], overrides: Mapping[str, Any]) -> None:
    for name in overrides:
        if name not in _BY_ATTR:
            close = difflib.get_close_matches(name, list(_BY_ATTR), n=1)
            raise ConfigError(
                f"keyword '{name}'", MASK, "one of the keywords " + ", ".join(_BY_ATTR),
                detail=f"unknown setting; did you mean '{close[0]}'?" if close else "unknown setting",
            )
    for name in environ:
        if name.startswith(ENV_PREFIX) and name not in _BY_ENV:
            close = difflib.get_close_matches(name, list(_BY_ENV), n=1)
            raise ConfigError(
                name, MASK, "one of the known variables " + ", ".join(_BY_ENV),
                detail=f"unknown variable; did you mean {close[0]}?" if close else "unknown variable",
            )


def reference_table() -> str:
    """The settings as a Markdown table (variable | meaning | type | default | example), for the README.

    Example:
        >>> print(reference_table().splitlines()[0])
        | Variable | Meaning | Type | Default | Example |
    """

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| Variable | Meaning | Type | Default | Example |", "|---|---|---|---|---|"]
    for f in FIELDS:
        default = f.shown_default() if f.default_text else f"`{cell(f.shown_default())}`"
        rows.append(f"| `{f.env}` | {cell(f.doc)} | {cell(f.parser.kind)} | {default} | `{cell(f.example)}` |")
    return "\n".join(rows)

