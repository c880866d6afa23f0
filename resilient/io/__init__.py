"""Replayable sources and idempotent sinks: the edges of a batch inference job.

A `Source` yields ``(batch_id, batch)`` for ids ``0..n-1`` and can start again from any id (resume
is offset-based); its `fingerprint` lets a resumed job refuse an input that changed (`check_fingerprint`).
A `FileSink` writes a dataset that pandas, pyarrow, Ray Data, DuckDB and Polars read (or a Delta Lake
table), each batch's output visible at most once: workers `stage <FileSink.stage>` the bytes, the driver
`commit <FileSink.commit>`s with a create-only publish (the protocol is in `resilient.io.sinks`).

Example:
    >>> import tempfile
    >>> from resilient.io import FileSink, as_source
    >>> source, sink = as_source(range(5), batch_size=2), FileSink(tempfile.mkdtemp(), format="parquet")
    >>> for batch_id, batch in source.read(0):
    ...     _ = sink.commit(sink.stage(batch_id, {"y": batch["id"] * 10}, epoch=0))
    >>> [out["y"].tolist() for _, out in sink.read_all()]
    [[0, 10], [20, 30], [40]]
"""

from resilient.io.sinks import DEFAULT_RETRY, FileSink, NotCommittedError, StagedOutput
from resilient.io.sources import (
    DEFAULT_BATCH_SIZE,
    FileSource,
    IterableSource,
    RangeSource,
    RayDatasetSource,
    SequenceSource,
    Source,
    SourceChangedError,
    as_source,
    check_fingerprint,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_RETRY",
    "FileSink",
    "FileSource",
    "IterableSource",
    "NotCommittedError",
    "RangeSource",
    "RayDatasetSource",
    "SequenceSource",
    "Source",
    "SourceChangedError",
    "StagedOutput",
    "as_source",
    "check_fingerprint",
]
