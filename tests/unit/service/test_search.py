"""search_options validation and the prompt block that carries the results (service/search.py)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from qwen_gateway.engines.base import ChatMessage, TextPart
from qwen_gateway.errors import InvalidParameter
from qwen_gateway.service.events import SearchResult
from qwen_gateway.service.search import (
    SearchOptions,
    parse_options,
    query_text,
    search_block,
    with_search_block,
)

RESULTS = (
    SearchResult(1, "West Lake events", "https://a.example/1", "a.example", ""),
    SearchResult(2, "Hangzhou weather", "https://b.example/2", "b.example", ""),
)
SNIPPETS = ("Flower festival in April.", "")
TODAY = dt.date(2026, 12, 1)


def test_defaults_are_dashscopes() -> None:
    assert parse_options(None) == parse_options({}) == SearchOptions()
    assert SearchOptions().citation_format == "[<number>]" and SearchOptions().strategy == "turbo"
    options = parse_options(
        {
            "forced_search": True,
            "enable_source": True,
            "enable_citation": True,
            "citation_format": "[ref_<number>]",
            "search_strategy": "max",
            "freshness": 30,
            "assigned_site_list": ["WestLake.Hangzhou.gov.cn."],
            "enable_search_extension": False,
            "prepend_search_result": True,
            "intention_options": None,
        }
    )
    assert options == SearchOptions(
        True, True, True, "[ref_<number>]", "max", 30, ("westlake.hangzhou.gov.cn",), prepend=True
    )


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"search_strategy": "agent"}, "search_options.search_strategy"),
        ({"search_strategy": "fast"}, "search_options.search_strategy"),
        ({"citation_format": "(<number>)"}, "search_options.citation_format"),
        ({"enable_search_extension": True}, "search_options.enable_search_extension"),
        ({"prepend_search_result": "yes"}, "search_options.prepend_search_result"),
        ({"intention_options": {"prompt_intervene": "parks"}}, "search_options.intention_options"),
        ({"freshness": 10}, "search_options.freshness"),
        ({"freshness": True}, "search_options.freshness"),
        ({"assigned_site_list": ["http://x.example/"]}, "search_options.assigned_site_list.0"),
        ({"assigned_site_list": "x.example"}, "search_options.assigned_site_list"),
        ({"enable_source": "yes"}, "search_options.enable_source"),
        ({"search_prompt": "x"}, "search_options.search_prompt"),
        # Unhashable values: a TypeError (a 500) before the review.
        ({"search_strategy": ["max"]}, "search_options.search_strategy"),
        ({"search_strategy": {"a": 1}}, "search_options.search_strategy"),
    ],
)
def test_options_it_cannot_honour_are_refused_by_name(options: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        parse_options(options)
    assert info.value.param == param
    with pytest.raises(InvalidParameter):
        parse_options([])


def test_block_labels_results_with_their_citation_markers() -> None:
    options = SearchOptions(enable_citation=True, citation_format="[ref_<number>]")
    block = search_block(RESULTS, SNIPPETS, options, TODAY)
    assert block.splitlines()[:6] == [
        "Web search results (searched on 2026-12-01):",
        "",
        "[ref_1] West Lake events",
        "URL: https://a.example/1",
        "Flower festival in April.",
        "",
    ]
    assert "[ref_2] Hangzhou weather" in block and block.endswith("e.g. [ref_1].")
    plain = search_block(RESULTS, SNIPPETS, SearchOptions(), TODAY)
    assert "Result 1: West Lake events" in plain and "[1]" not in plain
    assert plain.endswith("do not write citation markers.")


def test_block_goes_into_the_system_message() -> None:
    user = ChatMessage(role="user", content="hi")
    assert with_search_block((user,), "B") == (ChatMessage(role="system", content="B"), user)
    system = ChatMessage(role="system", content="Be brief.")
    assert with_search_block((system, user), "B")[0].content == "Be brief.\n\nB"
    parts = ChatMessage(role="system", content=(TextPart("Be brief."),))
    assert with_search_block((parts, user), "B")[0].content == (TextPart("Be brief."), TextPart("\n\nB"))


def test_query_is_the_last_user_text() -> None:
    messages = (
        ChatMessage(role="user", content="first"),
        ChatMessage(role="assistant", content="ok"),
        ChatMessage(role="user", content=(TextPart("  what  is\n"), TextPart("new? "))),
    )
    assert query_text(messages) == "what is new?"
    assert query_text((ChatMessage(role="system", content="s"),)) == ""
    assert len(query_text((ChatMessage(role="user", content="x" * 1000),))) == 400
