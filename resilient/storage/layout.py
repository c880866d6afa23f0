"""Where things live inside one replica root: pure path functions, no I/O.

Every replica root holds the same tree::

    <root>/<key>/g<generation:020d>/MANIFEST              commit marker, created last, create-only
    <root>/<key>/g<generation:020d>/<checkpoint_id>.data  replicated object (mode "replicate")
    <root>/<key>/g<generation:020d>/<checkpoint_id>.s<i>  shard i of the object (mode "parity")
    <root>/<key>/epochs/e<epoch:020d>                     epoch claims, create-only
    <anywhere>/.tmp-<random>-<name>                       a write in progress (local replicas only)

A key is one owner's checkpoint series, e.g. ``"job-7/slot-3"``: one or more ``/``-separated segments of
letters, digits, ``.``, ``_`` and ``-``, none of them ``.`` or ``..``. Generations sort as text because
they are zero-padded. Names read back from storage are parsed strictly: a manifest that names an object
outside its own generation directory is refused (see `object_name_ok`).
"""

from __future__ import annotations

import re

__all__ = [
    "EPOCHS_DIR",
    "MANIFEST",
    "TMP_PREFIX",
    "data_name",
    "epoch_name",
    "gen_dir",
    "gen_name",
    "object_name_ok",
    "parse_epoch_name",
    "parse_gen_name",
    "shard_name",
    "validate_key",
]

MANIFEST = "MANIFEST"
EPOCHS_DIR = "epochs"
TMP_PREFIX = ".tmp-"

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_GEN = re.compile(r"g(\d{20})")
_EPOCH = re.compile(r"e(\d{20})")
_OBJECT = re.compile(r"[0-9a-f]{32}\.(data|s\d{1,3})")
_MAX_COUNTER = 10**20 - 1


def validate_key(key: str) -> str:
    """Return `key` if it is a safe checkpoint key, else raise ValueError naming it.

    >>> validate_key("job-7/slot-3")
    'job-7/slot-3'
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"checkpoint key {key!r} is not accepted: expected a non-empty str")
    for seg in key.split("/"):
        if not _SEGMENT.fullmatch(seg) or seg in (EPOCHS_DIR,) or _GEN.fullmatch(seg):
            raise ValueError(
                f"checkpoint key {key!r} is not accepted: expected '/'-separated segments of letters, "
                f"digits, '.', '_' and '-' (not starting with '.' or '-', at most 128 characters, not "
                f"'{EPOCHS_DIR}' nor a generation name like g00000000000000000001); bad segment {seg!r}"
            )
    return key


def _counter(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_COUNTER:
        raise ValueError(f"{what} {value!r} is not accepted: expected an int in 0..{_MAX_COUNTER}")
    return value


def gen_name(generation: int) -> str:
    return f"g{_counter(generation, 'generation'):020d}"


def parse_gen_name(name: str) -> int | None:
    m = _GEN.fullmatch(name)
    return int(m.group(1)) if m else None


def epoch_name(epoch: int) -> str:
    return f"e{_counter(epoch, 'epoch'):020d}"


def parse_epoch_name(name: str) -> int | None:
    m = _EPOCH.fullmatch(name)
    return int(m.group(1)) if m else None


def gen_dir(key: str, generation: int) -> str:
    """Path of a generation directory relative to the replica root."""
    return f"{validate_key(key)}/{gen_name(generation)}"


def data_name(checkpoint_id: str) -> str:
    return f"{checkpoint_id}.data"


def shard_name(checkpoint_id: str, index: int) -> str:
    return f"{checkpoint_id}.s{index}"


def object_name_ok(name: object) -> bool:
    """True if a name read from a manifest is a plain object name of this layout (no path, no ``..``)."""
    return isinstance(name, str) and _OBJECT.fullmatch(name) is not None
