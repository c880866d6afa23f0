"""`RayDatasetSource`: a ``ray.data.Dataset`` read in a deterministic order, in batches of NumPy arrays.

Ray is imported only when a dataset is actually used: this module is safe to import without it.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

from resilient.errors import ConfigError
from resilient.io._base import check_start, digest

__all__ = ["RayDatasetSource", "is_ray_dataset"]


def is_ray_dataset(obj: Any) -> bool:
    """Whether ``obj`` is a ``ray.data.Dataset`` (or subclass), without importing Ray."""
    return any(c.__name__ == "Dataset" and c.__module__.startswith("ray.data") for c in type(obj).__mro__)


class RayDatasetSource:
    """Batches of ``batch_size`` rows of a Ray dataset, as dicts of NumPy arrays; id = position.

    Replay needs the same rows in the same order on every pass, so this source turns on
    ``execution_options.preserve_order`` in the dataset's own `DataContext` (``ds.context``, the
    context Ray snapshotted when the dataset was created). The dataset must itself be deterministic
    (no random shuffles or samples without a seed).

    Costs: ``len()``, `fingerprint` and the first `read` run ``ds.count()`` (once; it executes the
    pipeline when row counts are not known from metadata); ``read(start)`` executes the pipeline from
    the beginning and skips ``start`` batches, so resuming costs O(start) batches of work before the
    first new batch.

    Example:
        >>> import ray  # doctest: +SKIP
        >>> src = RayDatasetSource(ray.data.range(10), batch_size=4)  # doctest: +SKIP
        >>> [b["id"].tolist() for _, b in src.read(2)]  # doctest: +SKIP
        [[8, 9]]
    """

    def __init__(self, ds: Any, batch_size: int) -> None:
        if not is_ray_dataset(ds):
            raise ConfigError("ds", type(ds).__name__, "a ray.data.Dataset")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size", batch_size, "an int >= 1")
        ds.context.execution_options.preserve_order = True
        self.ds = ds
        self.batch_size = batch_size
        self._rows: int | None = None

    def _count(self) -> int:
        if self._rows is None:
            self._rows = int(self.ds.count())
        return self._rows

    def __len__(self) -> int:
        return math.ceil(self._count() / self.batch_size)

    def read(self, start: int = 0) -> Iterator[tuple[int, Any]]:
        # count before any iteration: Ray 2.60 caches the rows an iteration saw as the dataset's count,
        # even for an iteration closed early (as `fingerprint` does), and count() then returns that
        start = check_start(start, len(self))
        self.ds.context.execution_options.preserve_order = True  # also after unpickling elsewhere
        batches = self.ds.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=False)
        for i, batch in enumerate(batches):
            if i >= start:
                yield i, batch

    def fingerprint(self) -> dict:
        rows = self._count()
        batches = self.read(0)
        try:
            first = next(batches, (0, None))[1]
        finally:
            batches.close()  # stops the pipeline's execution
        return {
            "kind": "ray_dataset",
            "schema": str(self.ds.schema()),
            "rows": rows,
            "batch_size": self.batch_size,
            "length": len(self),
            "first": digest(first),
        }

    def __repr__(self) -> str:
        return f"RayDatasetSource(batch_size={self.batch_size}, rows={self._rows})"
