"""`Problem`: one thing `verify` (or a load that found nothing to load) found wrong, as a record.

Problems are made where they are found (`resilient.storage.examine`, `resilient.storage.maintenance`)
with every field known there, and shown as they are: ``resilient verify`` prints ``str(problem)`` and
its JSON carries the fields. Nothing parses a problem back from its text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from resilient.storage import layout

__all__ = ["KINDS", "Problem"]

#: what a problem can be about, in words
KINDS = (
    "missing",  # a manifest or piece that should be there is not
    "corrupt",  # present, but fails its checks (checksum, length, signature, format, a special file)
    "unreachable",  # the replica did not answer, or could not be connected to
    "refused",  # an object that verifies but is not a checkpoint its manifest vouches for (decode, sha256, fenced)
    "unrecoverable",  # no verifying copy of the generation could be assembled from any replica
    "uncommitted",  # a generation directory without a manifest on any replica
    "unexamined",  # a key whose examination failed as a whole
)


@dataclass(frozen=True)
class Problem:
    """One problem and exactly where it is.

    Attributes:
        kind: one of `KINDS`.
        detail: what is wrong, in words.
        url: the replica's URL (credentials masked); "" for a problem of the generation as a whole.
        key: the checkpoint key ("" for a problem of a replica as a whole).
        generation: the generation, or None.
        name: the object inside the generation's directory (``MANIFEST``, ``<id>.data``, ``<id>.s<i>``),
            or "" for the generation (or key, or replica) as a whole.

    Example:
        >>> p = Problem("corrupt", "checksum mismatch", url="file:///r0", key="k", generation=3, name="ab.data")
        >>> p.object
        'file:///r0/k/g00000000000000000003/ab.data'
        >>> str(p)
        'file:///r0/k/g00000000000000000003/ab.data: checksum mismatch'
    """

    kind: str
    detail: str
    url: str = ""
    key: str = ""
    generation: int | None = None
    name: str = ""

    @property
    def object(self) -> str:
        """The object's full address: ``url/key/g<generation>/name``, as much of it as applies."""
        where = layout.gen_dir(self.key, self.generation) if self.generation is not None else self.key
        return "/".join(p for p in (self.url, where, self.name) if p)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields and ``object``."""
        return {"object": self.object, **asdict(self)}

    def __str__(self) -> str:
        where = self.object
        return f"{where}: {self.detail}" if where else self.detail
