"""Web-search providers: what ``enable_search`` asks the web, behind one small interface.

A provider is built once per app from the operator's ``[search]`` settings (:func:`create_provider`)
and closed with ``await provider.aclose()`` when the app stops. Per request::

    hits = await provider.search(SearchQuery("hangzhou weather", count=5))

Every failure of the provider (timeout, refused connection, non-200 answer, a body that is not its
JSON) is raised as :class:`SearchFailed` with a short reason fit for the server log (never the URL,
which may carry credentials); callers degrade it to "no results". Nothing here knows a request, a wire
protocol or a prompt: ``service/search.py`` decides when to search and what the model sees.

Providers by name, imported lazily (``PROVIDERS``); any other ``"module:Class"`` string names a class
taking the :class:`~qwen_gateway.settings.SearchSettings`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

from qwen_gateway.errors import StartupError
from qwen_gateway.settings import SearchSettings

PROVIDERS: dict[str, str] = {
    "searxng": "qwen_gateway.search.searxng:SearxngProvider",
}


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """One search: the query text and how many results to keep (best first)."""

    text: str
    count: int
    # Only results of the last this-many days (DashScope's ``freshness``: 7, 30, 180 or 365).
    freshness_days: int | None = None
    # Only results from these sites (host names; subdomains match too).
    sites: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One result, as a provider found it."""

    title: str
    url: str
    snippet: str
    # The site's display name ("" when the provider doesn't know it) and its icon URL ("" likewise).
    site_name: str = ""
    icon: str = ""


class SearchFailed(Exception):
    """The provider could not answer; ``reason`` says why, without secrets."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SearchProvider(Protocol):
    """What a web-search backend offers the service."""

    name: str

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        """At most ``query.count`` hits, best first; raises :class:`SearchFailed`."""
        ...

    async def aclose(self) -> None:
        """Release the provider's connections."""
        ...


def create_provider(settings: SearchSettings) -> SearchProvider | None:
    """The configured provider (None when ``[search]`` names none)."""
    if settings.provider is None:
        return None
    target = PROVIDERS.get(settings.provider, settings.provider)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise StartupError(
            f"search provider {settings.provider!r} is not a known provider "
            f"({', '.join(PROVIDERS)}) or a 'module:Class' string"
        )
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise StartupError(f"cannot load search provider {target!r}: {exc}") from None
    provider: SearchProvider = cls(settings)
    return provider


def host_matches(host: str, sites: tuple[str, ...]) -> bool:
    """``host`` is one of ``sites`` or a subdomain of one (case and a trailing dot ignored)."""
    host = host.lower().rstrip(".")
    for site in sites:
        site = site.lower().rstrip(".")
        if host == site or host.endswith("." + site):
            return True
    return False
