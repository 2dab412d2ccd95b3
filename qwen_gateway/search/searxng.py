"""SearXNG's JSON API (``GET {url}/search?q=...&format=json``): the self-hostable metasearch engine.

SearXNG answers ``{"query", "results": [{"url", "title", "content", "publishedDate"?, ...}], ...}``
(an instance must list ``json`` in its ``search.formats`` setting, else it answers 403). It has no
result-count parameter: the first page is read and cut to the query's count. ``freshness`` maps to
its ``time_range`` (the smallest of week/month/year that covers the days), and results that carry a
``publishedDate`` older than the window are dropped too, since 180 days has no ``time_range`` of its
own. Site restrictions go into the query as ``site:`` terms, which most engines honour, and are
enforced on the results' hosts, since some engines don't.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from qwen_gateway.search import SearchFailed, SearchHit, SearchQuery, host_matches
from qwen_gateway.settings import SearchSettings

# Bytes of one answer read at most: a first page is a few tens of KB; more is not SearXNG.
MAX_BODY_BYTES = 4 * 1024 * 1024
# Characters kept of a title and of a snippet (the prompt carries them; a page's text is not needed).
MAX_TITLE_CHARS = 200
MAX_SNIPPET_CHARS = 600
_TIME_RANGES = ((7, "week"), (30, "month"), (366, "year"))


class SearxngProvider:
    """A :class:`~qwen_gateway.search.SearchProvider` over one SearXNG instance."""

    name = "searxng"

    def __init__(self, settings: SearchSettings) -> None:
        assert settings.url is not None  # SearchSettings guarantees a URL with a provider
        self._endpoint = settings.url.rstrip("/") + "/search"
        self._timeout = settings.timeout
        # The operator's URL, as given: no proxy from the environment, no redirects followed.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.timeout),
            follow_redirects=False,
            trust_env=False,
            headers={"Accept": "application/json"},
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        params = {"q": _query_text(query), "format": "json"}
        if query.freshness_days is not None:
            params["time_range"] = next(
                (name for days, name in _TIME_RANGES if query.freshness_days <= days), "year"
            )
        try:
            # httpx's timeout bounds each read; this bounds the whole exchange (a server trickling
            # bytes would pass every read timeout).
            async with asyncio.timeout(self._timeout):
                body = await self._get(params)
        except TimeoutError:
            raise SearchFailed(f"no answer within {self._timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise SearchFailed(f"request failed ({type(exc).__name__})") from None
        return _hits(body, query)

    async def _get(self, params: dict[str, str]) -> bytes:
        async with self._client.stream("GET", self._endpoint, params=params) as response:
            if response.status_code != 200:
                raise SearchFailed(f"HTTP {response.status_code}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise SearchFailed(f"answer larger than {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
            return b"".join(chunks)


def _query_text(query: SearchQuery) -> str:
    if not query.sites:
        return query.text
    sites = " OR ".join(f"site:{s}" for s in query.sites)
    return f"{query.text} ({sites})" if len(query.sites) > 1 else f"{query.text} {sites}"


def _hits(body: bytes, query: SearchQuery) -> list[SearchHit]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise SearchFailed("answer is not JSON") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        raise SearchFailed("answer has no results list (not SearXNG's JSON format)")
    oldest = (
        dt.datetime.now(dt.UTC) - dt.timedelta(days=query.freshness_days)
        if query.freshness_days is not None
        else None
    )
    hits: list[SearchHit] = []
    seen: set[str] = set()
    for item in results:
        hit = _hit(item)
        if hit is None or hit.url in seen:
            continue
        if query.sites and not host_matches(urlsplit(hit.url).hostname or "", query.sites):
            continue
        if oldest is not None and _older(item, oldest):
            continue
        seen.add(hit.url)
        hits.append(hit)
        if len(hits) == query.count:
            break
    return hits


def _hit(item: Any) -> SearchHit | None:
    """A result entry as a hit; None for an entry without an http(s) URL (skipped, not fatal)."""
    if not isinstance(item, dict):
        return None
    url, title, content = item.get("url"), item.get("title"), item.get("content")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return None
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:  # "https://[::1": one broken entry is skipped, not the whole answer lost
        return None
    return SearchHit(
        title=(title if isinstance(title, str) and title.strip() else host)[:MAX_TITLE_CHARS].strip(),
        url=url,
        snippet=(content if isinstance(content, str) else "")[:MAX_SNIPPET_CHARS].strip(),
        # SearXNG names no site: its host is the honest display name.
        site_name=host,
    )


def _older(item: dict[str, Any], oldest: dt.datetime) -> bool:
    """The result says it was published before ``oldest`` (undated results are kept)."""
    published = item.get("publishedDate")
    if not isinstance(published, str) or not published:
        return False
    try:
        when = dt.datetime.fromisoformat(published)
    except ValueError:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when < oldest
