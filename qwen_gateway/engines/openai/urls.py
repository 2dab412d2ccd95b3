"""Upstream URLs: the endpoints under a base URL, and the base URL as it may be shown.

A base URL may carry credentials, in its userinfo (``http://user:secret@host/v1``) or its query
(``...?key=secret``, some proxies' style). Everything that logs an upstream URL or puts one in an error
goes through :func:`redact_url`; exception texts that may quote the URL go through :func:`scrub`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
_CREDENTIAL_KEY = re.compile(r"key|token|secret|pass|auth|sig|cred|session|code", re.IGNORECASE)
_TOKEN_LENGTH = 16


def redact_url(url: str) -> str:
    """``url`` with its userinfo password (or a bare userinfo, often a token), every query value (a
    bare query item) and any fragment replaced by ``***``; scheme, host, port, path and the query's
    keys are kept."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if sep else f"{MASK}@{hostport}"
    return urlunsplit(
        (parts.scheme, netloc, parts.path, _mask_pairs(parts.query), MASK if parts.fragment else "")
    )


def secrets_in(url: str) -> tuple[str, ...]:
    """The credential parts of ``url`` (as written and percent-decoded) that :func:`redact_url` masks:
    what :func:`scrub` removes from a message that may quote the URL."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return (url,)
    found: list[str] = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        user, sep, password = userinfo.partition(":")
        found.append(password if sep else user)
    for key, sep, value in (p.partition("=") for p in parts.query.split("&")):
        # Replaced wherever it appears in a message, so only what may be a credential: a value under
        # a credential-like key, a long (token-like) value or a bare item; "api-version=1" would
        # otherwise turn every "1" of the message into ***.
        if not sep or _CREDENTIAL_KEY.search(key) or len(value) >= _TOKEN_LENGTH:
            found.append(value if sep else key)
    found.append(parts.fragment)
    raw = {s for s in found if s}
    return tuple(sorted(raw | {unquote(s) for s in raw}, key=len, reverse=True))


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` replaced by ``***`` (longest first, so none is left half)."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


def endpoint(base_url: str, path: str) -> str:
    """``path`` (e.g. ``/chat/completions``) under ``base_url``, before its query string if it has one
    (appending to the whole string would put the path inside the query)."""
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + path, parts.query, ""))


def _mask_pairs(text: str) -> str:
    if not text:
        return text
    pairs = (pair.partition("=") for pair in text.split("&"))
    # A bare item (no "=") may be the token itself.
    return "&".join(f"{key}={MASK}" if sep else MASK for key, sep, _ in pairs)
