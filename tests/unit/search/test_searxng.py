"""The SearXNG provider against a loopback SearXNG-shaped server (tests/searx_fake.py, a FAKE)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from qwen_gateway.search import SearchFailed, SearchQuery, create_provider, host_matches
from qwen_gateway.search.searxng import SearxngProvider
from qwen_gateway.settings import SearchSettings
from tests.searx_fake import HOSTS, FakeSearxng, results_for


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeSearxng]:
    f = FakeSearxng()
    yield f
    f.close()


def search(fake: FakeSearxng, query: SearchQuery, timeout: float = 5.0) -> list:  # type: ignore[type-arg]
    async def run() -> list:  # type: ignore[type-arg]
        provider = create_provider(SearchSettings(provider="searxng", url=fake.url + "/", timeout=timeout))
        assert isinstance(provider, SearxngProvider)
        try:
            return await provider.search(query)
        finally:
            await provider.aclose()

    return asyncio.run(run())


def test_results_are_cut_to_the_count_and_keep_searxng_order(fake: FakeSearxng) -> None:
    hits = search(fake, SearchQuery("unit-order west lake", count=3))
    expected = results_for("unit-order west lake")[:3]
    assert [h.url for h in hits] == [r["url"] for r in expected]
    assert [h.title for h in hits] == [r["title"] for r in expected]
    assert hits[0].snippet == expected[0]["content"] and hits[0].site_name == HOSTS[0] and hits[0].icon == ""
    (request,) = fake.requests_for("unit-order")
    assert request["format"] == "json" and request["q"] == "unit-order west lake"
    assert "time_range" not in request


def test_freshness_maps_to_time_range_and_drops_older_dated_results(fake: FakeSearxng) -> None:
    hits = search(fake, SearchQuery("unit-fresh", count=10, freshness_days=180))
    assert fake.requests_for("unit-fresh")[0]["time_range"] == "year"
    # The fake dates every other result 400 days back: those go, the 2-day-old ones stay.
    assert [h.url for h in hits] == [r["url"] for r in results_for("unit-fresh")[::2]]
    search(fake, SearchQuery("unit-week", count=1, freshness_days=7))
    assert fake.requests_for("unit-week")[0]["time_range"] == "week"


def test_sites_go_into_the_query_and_filter_the_hosts(fake: FakeSearxng) -> None:
    hits = search(fake, SearchQuery("unit-sites", count=10, sites=("example.com",)))
    assert fake.requests_for("unit-sites")[0]["q"] == "unit-sites site:example.com"
    assert hits and {h.site_name for h in hits} == {"news.example.com", "blog.example.com"}
    search(fake, SearchQuery("unit-two-sites", count=1, sites=("a.example", "b.example")))
    assert fake.requests_for("unit-two-sites")[0]["q"] == "unit-two-sites (site:a.example OR site:b.example)"
    assert host_matches("Docs.Example.org.", ("example.org",)) and not host_matches(
        "badexample.org", ("example.org",)
    )


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("provider-500", "HTTP 500"),
        ("provider-garbage", "answer is not JSON"),
        ("provider-shape", "answer has no results list (not SearXNG's JSON format)"),
        ("provider-hang", "no answer within 0.5 s"),
    ],
)
def test_failures_are_search_failed_with_a_reason(fake: FakeSearxng, query: str, reason: str) -> None:
    with pytest.raises(SearchFailed) as info:
        search(fake, SearchQuery(f"unit {query}", count=3), timeout=0.5)
    assert info.value.reason == reason


def test_a_refused_connection_is_search_failed() -> None:
    from tests.support import free_port

    async def run() -> None:
        provider = SearxngProvider(SearchSettings(provider="searxng", url=f"http://127.0.0.1:{free_port()}"))
        try:
            await provider.search(SearchQuery("x", count=1))
        finally:
            await provider.aclose()

    with pytest.raises(SearchFailed, match="request failed"):
        asyncio.run(run())


def test_settings_need_a_url_and_name_a_known_provider() -> None:
    from pydantic import ValidationError

    from qwen_gateway.errors import StartupError

    with pytest.raises(ValidationError, match="needs its url"):
        SearchSettings(provider="searxng")
    with pytest.raises(ValidationError, match="http"):
        SearchSettings(provider="searxng", url="ftp://x")
    with pytest.raises(StartupError, match="not a known provider"):
        create_provider(SearchSettings(provider="bing", url="http://x"))
    assert create_provider(SearchSettings()) is None
