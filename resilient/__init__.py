"""resilient: checkpointed, resumable model inference on Ray.

The storage foundation: `CheckpointStore` saves and loads checkpoint state (nested dicts of tensors,
arrays and plain values, encoded without pickle) across several fsspec URLs, replicated or
parity-protected, compressed, checksummed and atomically committed. Configuration comes from keyword
arguments, then ``RESILIENT_*`` environment variables, then defaults (`Settings`).

Example:
    >>> import tempfile, torch, resilient
    >>> dirs = [tempfile.mkdtemp() for _ in range(3)]
    >>> with resilient.CheckpointStore(storage=dirs) as store:
    ...     _ = store.save("model", {"w": torch.zeros(2)})
    ...     store.load("model").state["w"].tolist()
    [0.0, 0.0]
"""

__version__ = "0.1.0"  # first: submodules record it in what they write

from resilient import io  # noqa: F401 - `resilient.io.RangeSource` etc. without a second import
from resilient.api import JobHandle, Pipeline, pipeline
from resilient.config import RedundancyWarning, Settings
from resilient.errors import (
    CodecError,
    ConfigError,
    CorruptionError,
    FencedError,
    NoCheckpointError,
    PermanentStorageError,
    QuorumError,
    ResilientError,
    StorageError,
    TransientStorageError,
    UnsafeCheckpointError,
    UnsupportedTypeError,
)
from resilient.retry import RetryPolicy, is_transient
from resilient.runtime.supervisor import DeadLetter, JobFailedError, JobMismatchError, JobResult, JobStoppedError
from resilient.storage import CheckpointStore, Commit, Loaded, PendingSave, ReplicaHealth, VerifyReport


__all__ = [
    "CheckpointStore",
    "CodecError",
    "Commit",
    "ConfigError",
    "CorruptionError",
    "DeadLetter",
    "FencedError",
    "JobFailedError",
    "JobHandle",
    "JobMismatchError",
    "JobResult",
    "JobStoppedError",
    "Loaded",
    "NoCheckpointError",
    "PendingSave",
    "PermanentStorageError",
    "Pipeline",
    "QuorumError",
    "RedundancyWarning",
    "ReplicaHealth",
    "ResilientError",
    "RetryPolicy",
    "Settings",
    "StorageError",
    "TransientStorageError",
    "UnsafeCheckpointError",
    "UnsupportedTypeError",
    "VerifyReport",
    "__version__",
    "is_transient",
    "pipeline",
]
