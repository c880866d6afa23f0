"""`Backend`: what resilient asks of one replica root, whatever holds it.

Everything above a replica (the store, `resilient.storage.examine`, `resilient.storage.maintenance`,
`resilient.jobs`, the sinks of `resilient.io`) speaks to storage through this protocol and never asks
which class implements it. Two classes do (`resilient.storage.replica`): ``LocalReplica`` for local
paths and ``FsspecReplica`` for every fsspec protocol; a test or a user may bring a third.

Names are relative to the replica's root, ``/``-separated. The operations, by what they promise:

* **Reads**: `read` (a whole object; with ``owned=True`` it may come back as a
  `resilient.codec.ObjectBuffer`, hashed while read, which `resilient.codec.decode` may keep),
  `read_range`, `listdir` (``[]`` for a directory that does not exist).
* **Writes**: `write_object` and `write_objects` make objects visible whole or not at all, under their
  final name, durable when the call returns; `overwrite` replaces a small object the same way.
* **Create-only writes**: `create_exclusive` raises ``FileExistsError`` when the name is taken, and
  otherwise creates it whole (manifests, epoch claims, commit markers).
* **Pointers and markers**: `create_pointer` and `create_pointers` are create-only names holding a short
  string (a sink's commit markers), read back with `read_pointer`; they are durable once `sync_dirs`
  covers their directories. ``linked_pointers`` says a group of pointers made by one `create_pointers`
  call shares one file (cheap to make together); otherwise each pointer is a request of its own.
* **Listing for maintenance**: `manifest_paths` (every ``MANIFEST`` under the root) and `temporaries`
  (leftovers of interrupted writes, with their modification time).
* **Deletion**: `delete` removes a name (with ``recursive``, a directory and all under it), never
  following a symbolic link; a name that does not exist is not an error.
* **Health**: `probe` lists the root once, without retries: it raises what the replica answered,
  ``FileNotFoundError`` when the root does not exist.

Errors are the backend's own (``OSError`` and SDK exceptions); `resilient.storage.replica.GuardedReplica`
retries and classifies them (`resilient.retry.classify`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

from resilient.codec.buffer import ObjectBuffer

__all__ = ["Backend", "Buffer"]

Buffer = bytes | bytearray | memoryview


@runtime_checkable
class Backend(Protocol):
    """One replica root (see the module docstring for what each operation promises)."""

    url: str  #: the replica's URL with credentials masked, for messages
    protocol: str  #: ``"file"`` for local paths, else the fsspec protocol
    linked_pointers: bool  #: a `create_pointers` group shares one file

    # -- reads
    def read(self, rel: str, *, owned: bool = False) -> bytes | bytearray | ObjectBuffer: ...

    def read_range(self, rel: str, offset: int, length: int) -> bytes: ...

    def listdir(self, rel: str) -> list[str]: ...

    # -- writes
    def write_object(self, rel: str, chunks: Iterable[Buffer]) -> int: ...

    def write_objects(self, items: list[tuple[str, Iterable[Buffer]]]) -> list[int]: ...

    def overwrite(self, rel: str, data: bytes) -> None: ...

    # -- create-only writes, pointers and markers
    def create_exclusive(self, rel: str, data: bytes) -> None: ...

    def create_pointer(self, rel: str, target: str) -> None: ...

    def create_pointers(self, rels: list[str], target: str) -> list[bool]: ...

    def read_pointer(self, rel: str) -> str: ...

    def sync_dirs(self, rels: Iterable[str]) -> None: ...

    # -- listing for maintenance, deletion
    def manifest_paths(self) -> Iterator[str]: ...

    def temporaries(self) -> Iterator[tuple[str, float]]: ...

    def delete(self, rel: str, *, recursive: bool = False) -> None: ...

    # -- health
    def probe(self) -> None: ...
