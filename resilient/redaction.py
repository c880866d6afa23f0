"""Masking credentials by their shape: pure functions over names, text and option trees.

A value is secret when

* its name looks secret (`secret_name`): ``key``, ``secret``, ``token``, ``password``/``passwd``/``pwd``,
  ``passphrase``, ``credential``, ``session``, ``signature``/``sig``, anything with ``auth`` (``Authorization``,
  ``oauth_token``...), ``cookie``, ``connection_string``, ``private`` (``private_key``...), ``sas``; or
* it sits anywhere under a name ending in ``headers`` (every HTTP header value: ``Authorization``,
  ``Cookie``, ``Proxy-Authorization``, and any the library does not know of); or
* it is text carrying one (`redact_text`): user info in a URL (``scheme://user:password@``), a
  ``name=value`` pair with a secret-looking name in a query string or a connection string (Azure
  ``AccountKey=...``, ``SharedAccessSignature=...``, ``sig=...``), an HTTP authorization
  (``Bearer ...``, ``Basic ...``), a header line (``Authorization: ...``, ``Cookie: ...``), or a PEM
  private key (``-----BEGIN ... PRIVATE KEY-----``).

`resilient.config` masks settings with these in ``repr``, `Settings.describe` and errors, and takes
every secret out of a pickle (`resilient.config.seal_secrets` walks `secret_leaves`). Masking a value
that only looked secret costs a ``***`` in a listing; missing one leaks it, so names match loosely.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["MASK", "redact_options", "redact_text", "secret_leaves", "secret_name"]

MASK = "***"

_NAME = re.compile(
    r"key|secret|token|pass(?:w|phrase)|pwd|credential|session|signature|^sig$|auth|cookie|"
    r"conn(?:ection)?[_-]?str|private|(?:^|[_-])sas(?:[_-]|$)",
    re.IGNORECASE,
)
_HEADERS = re.compile(r"headers$", re.IGNORECASE)
# "scheme://user:password@" anywhere in a text.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]+@")
# "name=value" after a start, "?", "&", ";", a space, a quote or a comma: query strings, connection strings.
_PAIR = re.compile(r"(?P<lead>^|[?&;\s\"',])(?P<name>[A-Za-z][A-Za-z0-9_.-]*)=(?P<value>[^&;\s\"',]*)")
_SCHEME_AUTH = re.compile(r"\b(?P<scheme>Bearer|Basic|Digest|Negotiate)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_HEADER_LINE = re.compile(
    r"(?P<name>\b(?:proxy-)?authorization|\b(?:set-)?cookie|\bx-[a-z-]*(?:key|token|auth)[a-z-]*)\s*:\s*[^\r\n]+",
    re.IGNORECASE,
)
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.DOTALL)


def secret_name(name: object) -> bool:
    """Whether a value under this name is a secret.

    >>> [secret_name(n) for n in ("passphrase", "connection_string", "client_secret", "region_name")]
    [True, True, True, False]
    """
    return isinstance(name, str) and _NAME.search(name) is not None


def _headers(name: object) -> bool:
    return isinstance(name, str) and _HEADERS.search(name) is not None


def redact_text(text: str) -> str:
    """``text`` with every credential it carries masked (see the module docstring for the shapes).

    Example:
        >>> redact_text("s3://AKIAEXAMPLE:wJalrXUtn@bucket/run1")
        's3://***@bucket/run1'
        >>> redact_text("https://host/obj?X-Amz-Signature=abc&part=1")
        'https://host/obj?X-Amz-Signature=***&part=1'
        >>> redact_text("DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=c2VjcmV0==;EndpointSuffix=x")
        'DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=***;EndpointSuffix=x'
        >>> redact_text("Authorization: Bearer eyJhbGciOi.x.y")
        'Authorization: ***'
        >>> redact_text("-----BEGIN RSA PRIVATE KEY-----\\nMIIE...\\n-----END RSA PRIVATE KEY-----")
        '***'
    """
    out = _PEM.sub(MASK, text)
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", out)
    out = _HEADER_LINE.sub(lambda m: f"{m['name']}: {MASK}", out)
    out = _SCHEME_AUTH.sub(lambda m: f"{m['scheme']} {MASK}", out)

    def pair(m: re.Match[str]) -> str:
        if secret_name(m["name"]) and m["value"] != MASK:
            return f"{m['lead']}{m['name']}={MASK}"
        return m[0]

    return _PAIR.sub(pair, out)


def secret_leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, value) of every secret inside a tree of mappings, lists and strings.

    >>> [p for p, _ in secret_leaves({"passphrase": "x", "headers": {"Cookie": "c", "Accept": "a"},
    ...                               "conn": "AccountKey=k;AccountName=n", "region": "eu"})]
    [('passphrase',), ('headers', 'Cookie'), ('headers', 'Accept'), ('conn',)]
    """
    if isinstance(value, Mapping):
        for k, v in value.items():
            if secret_name(k):
                yield path + (k,), v
            elif _headers(k) and isinstance(v, Mapping):
                for h in v:
                    yield path + (k, h), v[h]
            elif _headers(k):
                yield path + (k,), v
            else:
                yield from secret_leaves(v, path + (k,))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from secret_leaves(v, path + (i,))
    elif isinstance(value, str) and redact_text(value) != value:
        yield path, value


def redact_options(value: Any) -> Any:
    """A plain deep copy of a tree of options with every secret masked.

    >>> redact_options({"headers": {"Authorization": "Bearer t"}, "passphrase": "p", "anon": False})
    {'headers': {'Authorization': '***'}, 'passphrase': '***', 'anon': False}
    """
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if secret_name(k):
                out[k] = MASK
            elif _headers(k):
                out[k] = {h: MASK for h in v} if isinstance(v, Mapping) else MASK
            else:
                out[k] = redact_options(v)
        return out
    if isinstance(value, (list, tuple)):
        return [redact_options(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
