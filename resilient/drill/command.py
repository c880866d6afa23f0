"""What ``resilient drill`` reads from its command line: the pipeline, the source, the options.

    resilient drill MODULE:PIPELINE --source SOURCE [--batches N] [--faults a,b] [--report DIR]
                    [--init-kwargs JSON] [--source-kwargs JSON] [--batch-size N] [--json]

``MODULE:PIPELINE`` names a `@resilient.pipeline` object (``examples.score_pipeline:Scorer``).
``SOURCE`` is one of:

* ``range:ROWS[:BATCH]``: row ids ``0..ROWS-1`` in batches of ``BATCH`` (default ``--batch-size``);
* ``MODULE:NAME``: an object of the user's, given to `resilient.io.as_source`; with
  ``--source-kwargs`` it is called with them first (a function that builds the source);
* anything else: a file glob or URL, read as a `resilient.io.FileSource` (``--batch-size`` rows a
  batch, default 1024).

Example:
    >>> parse_source("range:100:10").fingerprint()["length"]
    10
    >>> parse_target("resilient.io:FileSink")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    resilient.errors.ConfigError: pipeline='resilient.io:FileSink' is not accepted: expected ...
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Any

from resilient.api import Pipeline
from resilient.errors import ConfigError

__all__ = ["parse_json", "parse_source", "parse_target"]

_NAMED = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_TARGET = "MODULE:NAME naming a @resilient.pipeline (e.g. examples.score_pipeline:Scorer)"


def _resolve(text: str, what: str, accepted: str) -> Any:
    module, sep, name = text.partition(":")
    if not sep or not module or not name:
        raise ConfigError(what, text, accepted)
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(what, text, accepted, detail=f"module {module!r} does not import: {e}") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ConfigError(what, text, accepted, detail=f"{module} has no {name!r}")
        obj = getattr(obj, part)
    return obj


def parse_target(text: str) -> Pipeline:
    """The `@resilient.pipeline` that ``MODULE:NAME`` names."""
    obj = _resolve(text, "pipeline", _TARGET)
    if not isinstance(obj, Pipeline):
        raise ConfigError("pipeline", text, _TARGET, detail=f"it is a {type(obj).__name__}, not decorated with "
                          "@resilient.pipeline")
    return obj


def parse_source(text: str, kwargs: dict | None = None, batch_size: int | None = None) -> Any:
    """The source ``--source`` names (see the module docstring); `batch_size` is the rows per batch of a
    range without one, or of files (default 1024)."""
    from resilient.io import DEFAULT_BATCH_SIZE

    rows_per_batch = batch_size or DEFAULT_BATCH_SIZE
    if text.startswith("range:"):
        parts = text.split(":")[1:]
        try:
            rows, *rest = [int(p) for p in parts]
        except ValueError:
            raise ConfigError("source", text, "range:ROWS or range:ROWS:BATCH with integers") from None
        if len(rest) > 1:
            raise ConfigError("source", text, "range:ROWS or range:ROWS:BATCH with integers")
        from resilient.io import RangeSource

        return RangeSource(rows, rest[0] if rest else rows_per_batch)
    if _NAMED.match(text):
        obj = _resolve(text, "source", "range:ROWS[:BATCH], MODULE:NAME or a file glob")
        return obj(**kwargs) if kwargs is not None else obj
    if kwargs is not None:
        raise ConfigError("source-kwargs", kwargs, "no value for a file source (only for MODULE:NAME)")
    from resilient.io import FileSource

    return FileSource(text, rows_per_batch=rows_per_batch)


def parse_json(text: str | None, what: str) -> dict | None:
    """A JSON object given on the command line, or None."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(what, text, "a JSON object", detail=str(e)) from None
    if not isinstance(value, dict):
        raise ConfigError(what, text, "a JSON object")
    return value
