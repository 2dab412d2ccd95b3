"""Web search (enable_search) through the real server, with and without a provider.

The provider is a loopback SearXNG-shaped server started by the test (tests/searx_fake.py, a FAKE:
no real SearXNG is reachable here, and a real one can't be made to fail on demand). The tiny models
have random weights, so what the model was given is checked where it shows: the prompt token count,
which must equal the chat template's count for the conversation with the results block in its system
message, and the ledger row.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Iterator
from functools import cache
from typing import Any

import httpx
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from qwen_gateway.search import host_matches
from qwen_gateway.service.events import SearchResult
from qwen_gateway.service.search import SearchOptions, parse_options, search_block
from tests.searx_fake import FakeSearxng, results_for
from tests.support import MODELS, SHARED, Server, assert_schema, create_key, start_server

CONFIG = """
[[models]]
id = "qwen-plus"
engine = "local"
path = "{qwen25}"
max_output = 8
input_price = 0.001    # per 1K tokens: 1 micro-CNY a prompt token
output_price = 0.002   # 2 micro-CNY a generated token

[[models]]
id = "qwen-long"     # the catalog allows no search on it
engine = "local"
path = "{qwen25}"
max_output = 8

[search]
provider = "searxng"
url = "{url}"
timeout = 2
results = 3
max_results = 6
"""
SEED_002 = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "中国队在巴黎奥运会获得了多少枚金牌"},
]
SEED_003 = [{"role": "user", "content": "今天是星期几?"}]
COMPLETION_KEYS = {"choices", "object", "usage", "created", "model", "id"}


@pytest.fixture(scope="module")
def searx() -> Iterator[FakeSearxng]:
    fake = FakeSearxng()
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def search_server(tmp_path_factory: pytest.TempPathFactory, searx: FakeSearxng) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("search-home")
    config = home / "config.toml"
    config.write_text(CONFIG.format(qwen25=MODELS / "tiny-qwen2.5", url=searx.url))
    server = start_server(home, "--config", str(config))
    yield server
    server.stop()


@cache
def _tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(MODELS / "tiny-qwen2.5")


def prompt_tokens(messages: list[dict[str, str]]) -> int:
    tok = _tokenizer()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def searched_prompt_tokens(
    messages: list[dict[str, str]], count: int, options: dict[str, Any] | None = None, sent: str | None = None
) -> int:
    """The prompt the model must have been given: the fake's first ``count`` results for the last user
    message (or the query ``sent`` to the provider), after the options' filters, in a block of the
    system message."""
    parsed = parse_options(options) if options else SearchOptions()
    hits = results_for(sent or " ".join(messages[-1]["content"].split()))
    if parsed.sites:
        hits = [h for h in hits if host_matches(h["parsed_url"][1], parsed.sites)]
    if parsed.freshness is not None:
        oldest = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=parsed.freshness)
        hits = [h for h in hits if dt.datetime.fromisoformat(h["publishedDate"]) >= oldest]
    hits = hits[:count]
    results = tuple(
        SearchResult(i, h["title"], h["url"], h["parsed_url"][1], "") for i, h in enumerate(hits, 1)
    )
    block = search_block(results, tuple(h["content"] for h in hits), parsed, dt.datetime.now(dt.UTC).date())
    if messages[0]["role"] == "system":
        searched = [{"role": "system", "content": f"{messages[0]['content']}\n\n{block}"}, *messages[1:]]
    else:
        searched = [{"role": "system", "content": block}, *messages]
    return prompt_tokens(searched)


def post(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json={"model": "qwen-plus", "max_tokens": 2, **body},
        timeout=120,
    )


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_startup_line_names_the_provider(search_server: Server) -> None:
    assert (
        "enable_search: web search by searxng (timeout 2 s, 3 results, 6 for search_strategy max)"
        in search_server.log()
    )


def test_results_are_in_the_prompt_under_citation_markers_and_counted_as_input(
    search_server: Server, searx: FakeSearxng
) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "e2e-inject what is on at West Lake?"},
    ]
    options = {"enable_source": True, "enable_citation": True, "citation_format": "[ref_<number>]"}
    r = post(search_server, {"messages": messages, "enable_search": True, "search_options": options})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = searched_prompt_tokens(messages, 3, options)
    assert body["usage"]["prompt_tokens"] == expected > prompt_tokens(messages) + 60
    # The ledger charges what was answered: the injected results are input tokens.
    (row,) = search_server.ledger(r.headers["x-request-id"])
    assert (row["status"], row["prompt_tokens"]) == ("ok", expected)
    (request,) = searx.requests_for("e2e-inject")
    assert request == {"q": "e2e-inject what is on at West Lake?", "format": "json"}
    # Compatible mode returns no sources (DashScope's doesn't either): the usual body, schema-valid.
    assert set(body) == COMPLETION_KEYS
    assert_schema(body, "CreateChatCompletionResponse")
    # The citation settings are what the prompt says: other markers, or none, give other prompts.
    for other in ({"enable_citation": True}, {}):
        r = post(search_server, {"messages": messages, "enable_search": True, "search_options": other})
        assert r.json()["usage"]["prompt_tokens"] == searched_prompt_tokens(messages, 3, other) != expected


def test_a_metered_key_is_charged_for_the_injected_results_as_input(search_server: Server) -> None:
    key = create_key(search_server.home, "search-metered", "--balance", "10")
    messages = user("e2e-metered what changed today")
    r = httpx.post(
        f"{search_server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "qwen-plus", "max_tokens": 2, "messages": messages, "enable_search": True},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == searched_prompt_tokens(messages, 3)
    (row,) = search_server.ledger(r.headers["x-request-id"])
    cost = usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2
    assert row["cost_micro"] == cost
    left = 10_000_000 - cost
    assert r.headers["x-account-balance"] == f"{left // 1_000_000}.{left % 1_000_000 // 100:04d}"


def test_a_refused_key_costs_no_provider_call(search_server: Server, searx: FakeSearxng) -> None:
    """The search runs after admission: a key refused for its balance or its limits triggers none."""
    poor = create_key(search_server.home, "search-poor", "--balance", "0.0001")  # below any hold
    limited = create_key(search_server.home, "search-rpm", "--rpm", "1")

    def ask(key: str, text: str) -> httpx.Response:
        return httpx.post(
            f"{search_server.compat_url}/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "qwen-plus", "max_tokens": 2, "messages": user(text), "enable_search": True},
            timeout=120,
        )

    broke = ask(poor, "e2e-poor what is new")
    assert broke.status_code == 400 and broke.json()["error"]["code"] == "Arrearage", broke.text
    assert searx.requests_for("e2e-poor") == []
    first = ask(limited, "e2e-rpm-first what is new")
    assert first.status_code == 200, first.text
    assert len(searx.requests_for("e2e-rpm-first")) == 1  # admitted: searched once
    over = ask(limited, "e2e-rpm-over what is new")  # the second request of the minute
    assert over.status_code == 429, over.text
    assert searx.requests_for("e2e-rpm-over") == []
    assert search_server.ledger(broke.headers["x-request-id"]) == []
    assert search_server.ledger(over.headers["x-request-id"]) == []


def test_streamed_answer_counts_the_same_prompt(search_server: Server) -> None:
    messages = user("e2e-stream hangzhou weather tomorrow")
    body = {
        "messages": messages,
        "enable_search": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST",
        f"{search_server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {search_server.api_key}"},
        json={"model": "qwen-plus", "max_tokens": 2, **body},
        timeout=120,
    ) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"] == {"content": "", "role": "assistant"}
    assert chunks[-1]["usage"]["prompt_tokens"] == searched_prompt_tokens(messages, 3)


def test_search_strategy_max_gives_more_results(search_server: Server) -> None:
    messages = user("e2e-max latest news")
    for strategy, count in (("max", 6), ("pro", 6), ("turbo", 3), ("standard", 3)):
        options = {"search_strategy": strategy, "forced_search": True}
        r = post(search_server, {"messages": messages, "enable_search": True, "search_options": options})
        assert r.json()["usage"]["prompt_tokens"] == searched_prompt_tokens(messages, count), strategy


def test_freshness_and_assigned_sites_filter_the_results(search_server: Server, searx: FakeSearxng) -> None:
    messages = user("e2e-filter park events")
    options = {"freshness": 30, "assigned_site_list": ["example.com"]}
    r = post(search_server, {"messages": messages, "enable_search": True, "search_options": options})
    (request,) = searx.requests_for("e2e-filter")
    assert request["q"] == "e2e-filter park events site:example.com" and request["time_range"] == "month"
    # Of the fake's results only news/blog.example.com ones dated within 30 days remain.
    expected = searched_prompt_tokens(messages, 3, options, sent=request["q"])
    assert r.json()["usage"]["prompt_tokens"] == expected


@pytest.mark.parametrize(
    ("marker", "reason"),
    [
        ("provider-500", "HTTP 500"),
        ("provider-garbage", "answer is not JSON"),
        ("provider-shape", "answer has no results list"),
        ("provider-hang", "no answer within 2 s"),
    ],
)
def test_provider_failure_is_answered_without_results(
    search_server: Server, marker: str, reason: str
) -> None:
    messages = user(f"e2e-fail {marker}")
    options = {"forced_search": True, "enable_source": True}
    r = post(search_server, {"messages": messages, "enable_search": True, "search_options": options})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == prompt_tokens(messages)
    request_id = r.headers["x-request-id"]
    line = f"request {request_id}: web search by searxng failed ({reason}"
    assert line in search_server.log()


def test_no_hits_leave_the_prompt_alone(search_server: Server) -> None:
    messages = user("e2e-none provider-empty")
    r = post(search_server, {"messages": messages, "enable_search": True})
    assert r.json()["usage"]["prompt_tokens"] == prompt_tokens(messages)
    assert f"request {r.headers['x-request-id']}: web search" not in search_server.log()


def test_without_enable_search_nothing_is_searched(search_server: Server, searx: FakeSearxng) -> None:
    messages = user("e2e-off anything")
    r = post(search_server, {"messages": messages, "search_options": {"forced_search": True}})
    assert r.json()["usage"]["prompt_tokens"] == prompt_tokens(messages)
    assert searx.requests_for("e2e-off") == []


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"search_strategy": "agent"}, "search_options.search_strategy"),
        ({"citation_format": "<number>"}, "search_options.citation_format"),
        ({"enable_search_extension": True}, "search_options.enable_search_extension"),
        ({"prepend_search_result": True}, "search_options.prepend_search_result"),
        ({"intention_options": {"prompt_intervene": "parks"}}, "search_options.intention_options"),
        ({"freshness": 3}, "search_options.freshness"),
        ({"unknown_option": 1}, "search_options.unknown_option"),
    ],
)
def test_options_it_cannot_honour_are_refused_by_name(
    search_server: Server, options: dict[str, Any], param: str
) -> None:
    r = post(
        search_server, {"messages": user("e2e-refused"), "enable_search": True, "search_options": options}
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, "invalid_parameter_error")


def test_a_model_without_search_refuses_enable_search(search_server: Server) -> None:
    r = post(search_server, {"model": "qwen-long", "messages": user("hi"), "enable_search": True})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "This model does not support enable_search."


# -- the seeds' enable_search examples (seeds/002 Python SDK, seeds/003 curl) -------------------------


def _seed_002(server: Server) -> dict[str, Any]:
    client = OpenAI(api_key=server.api_key, base_url=server.compat_url)
    completion = client.chat.completions.create(
        model="qwen-plus",
        messages=SEED_002,  # type: ignore[arg-type]
        extra_body={"enable_search": True},
    )
    return json.loads(completion.model_dump_json())  # type: ignore[no-any-return]


def _seed_003(server: Server) -> dict[str, Any]:
    payload = json.dumps({"model": "qwen-plus", "enable_search": True, "messages": SEED_003})
    out = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{server.compat_url}/chat/completions",
         "-H", f"Authorization: Bearer {server.api_key}", "-H", "Content-Type: application/json",
         "-d", payload],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    return json.loads(out)  # type: ignore[no-any-return]


def test_seed_enable_search_examples_with_a_provider(search_server: Server, searx: FakeSearxng) -> None:
    body = _seed_002(search_server)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] == searched_prompt_tokens(SEED_002, 3)
    body = _seed_003(search_server)
    assert set(body) == COMPLETION_KEYS
    assert_schema(body, "CreateChatCompletionResponse")
    assert body["usage"]["prompt_tokens"] == searched_prompt_tokens(SEED_003, 3)
    assert {SEED_002[1]["content"], SEED_003[0]["content"]} <= set(searx.queries())


def test_seed_enable_search_examples_without_a_provider(server: Server) -> None:
    """The session server has no [search]: answered as DashScope answers when its model decides not
    to search (the plain prompt), and the startup log says why."""
    assert _seed_002(server)["usage"]["prompt_tokens"] == prompt_tokens(SEED_002)
    body = _seed_003(server)
    assert set(body) == COMPLETION_KEYS
    assert body["usage"]["prompt_tokens"] == prompt_tokens(SEED_003)
    assert "enable_search: no search provider is configured" in server.log()


# -- the native protocol: search_info and usage.plugins ------------------------------------------------

TEXT_URL = "/api/v1/services/aigc/text-generation/generation"
CAPTURES = SHARED / "reference" / "captures"


def native(
    server: Server, parameters: dict[str, Any], messages: list[dict[str, str]], *, sse: bool = False
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.api_key}"}
    if sse:
        headers["X-DashScope-SSE"] = "enable"
    body = {
        "model": "qwen-plus",
        "input": {"messages": messages},
        "parameters": {"max_tokens": 2, **parameters},
    }
    return httpx.post(server.base_url + TEXT_URL, headers=headers, json=body, timeout=120)


def native_events(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    return [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]


def expected_results(query: str, count: int) -> list[dict[str, Any]]:
    return [
        {"icon": "", "index": i, "site_name": h["parsed_url"][1], "title": h["title"], "url": h["url"]}
        for i, h in enumerate(results_for(query)[:count], 1)
    ]


def test_native_returns_search_info_and_counts_the_search(search_server: Server) -> None:
    messages = user("e2e-native 阿里股价")
    options = {
        "enable_source": True,
        "enable_citation": True,
        "citation_format": "[ref_<number>]",
        "forced_search": True,
        "search_strategy": "standard",
    }
    r = native(
        search_server,
        {"result_format": "message", "enable_search": True, "search_options": options},
        messages,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    info = body["output"]["search_info"]
    assert info == {"extra_tool_info": [], "search_results": expected_results(messages[0]["content"], 3)}
    assert body["usage"]["plugins"] == {"search": {"count": 1, "strategy": "standard"}}
    assert body["usage"]["input_tokens"] == searched_prompt_tokens(messages, 3, options)
    # The capture's shape (captures/single-generation-message-search-nosse), key for key.
    capture = json.loads((CAPTURES / "single-generation-message-search-nosse.response.body.txt").read_text())
    assert set(info) == set(capture["output"]["search_info"])
    assert set(info["search_results"][0]) == set(capture["output"]["search_info"]["search_results"][0])
    assert set(body["usage"]["plugins"]["search"]) == set(capture["usage"]["plugins"]["search"])
    # The same conversation through compatible mode gives the same prompt.
    compat = post(search_server, {"messages": messages, "enable_search": True, "search_options": options})
    assert compat.json()["usage"]["prompt_tokens"] == body["usage"]["input_tokens"]
    (row,) = search_server.ledger(r.headers["x-request-id"])
    assert row["prompt_tokens"] == body["usage"]["input_tokens"]


def test_native_without_enable_source_counts_the_search_but_shows_no_sources(search_server: Server) -> None:
    messages = user("e2e-nosource question")
    for result_format in ("text", "message"):
        r = native(search_server, {"result_format": result_format, "enable_search": True}, messages)
        body = r.json()
        assert "search_info" not in body["output"]
        assert body["usage"]["plugins"] == {"search": {"count": 1, "strategy": "turbo"}}
        assert body["usage"]["input_tokens"] == searched_prompt_tokens(messages, 3)


def test_native_stream_prepends_the_results_as_the_capture_does(search_server: Server) -> None:
    messages = user("e2e-prepend 杭州明天的天气")
    options = {
        "enable_source": True,
        "forced_search": True,
        "prepend_search_result": True,
        "search_strategy": "standard",
    }
    parameters = {
        "result_format": "message",
        "enable_search": True,
        "search_options": options,
        "incremental_output": True,
    }
    events = native_events(native(search_server, parameters, messages, sse=True))
    first, *rest = events
    assert first["output"]["search_info"]["search_results"] == expected_results(messages[0]["content"], 3)
    assert first["usage"] == {}
    assert first["output"]["choices"] == [
        {"message": {"role": "assistant", "content": ""}, "finish_reason": "null"}
    ]
    assert rest and all(
        e["output"]["search_info"] == {"extra_tool_info": [], "search_results": []} for e in rest
    )
    assert all(e["usage"]["plugins"] == {"search": {"count": 1, "strategy": "standard"}} for e in rest)
    assert rest[-1]["usage"]["input_tokens"] == searched_prompt_tokens(messages, 3, options)
    # Line for line the capture's structure: the same keys in the first event and in a later one.
    lines = (CAPTURES / "single-generation-message-search-sse.response.body.txt").read_text("utf-8-sig")
    captured = [json.loads(line[5:]) for line in lines.splitlines() if line.startswith("data:")]
    assert set(first["output"]) == set(captured[0]["output"]) and first["usage"] == captured[0]["usage"]
    assert set(rest[0]["output"]["search_info"]) == set(captured[1]["output"]["search_info"])
    assert set(rest[0]["usage"]["plugins"]) == set(captured[1]["usage"]["plugins"])


def test_native_stream_carries_the_results_once_or_in_every_full_event(search_server: Server) -> None:
    messages = user("e2e-streamed sources")
    parameters = {
        "result_format": "message",
        "enable_search": True,
        "search_options": {"enable_source": True},
    }
    expected = expected_results(messages[0]["content"], 3)
    incremental = native_events(
        native(search_server, {**parameters, "incremental_output": True}, messages, sse=True)
    )
    assert incremental[0]["output"]["search_info"]["search_results"] == expected
    assert all(e["output"]["search_info"]["search_results"] == [] for e in incremental[1:])
    full = native_events(
        native(search_server, {**parameters, "incremental_output": False}, messages, sse=True)
    )
    assert all(e["output"]["search_info"]["search_results"] == expected for e in full)


def test_native_provider_failure_has_no_search_info(search_server: Server) -> None:
    options = {"enable_source": True, "forced_search": True}
    messages = user("e2e-native-fail provider-500")
    body = native(
        search_server,
        {"result_format": "message", "enable_search": True, "search_options": options},
        messages,
    ).json()
    assert "search_info" not in body["output"] and "plugins" not in body["usage"]
    assert body["usage"]["input_tokens"] == prompt_tokens(messages)


def test_native_prepend_needs_a_stream(search_server: Server) -> None:
    options = {"prepend_search_result": True}
    r = native(search_server, {"enable_search": True, "search_options": options}, user("e2e-x"))
    assert r.status_code == 400 and r.json()["code"] == "InvalidParameter"
    assert "prepend_search_result" in r.json()["message"]


def test_native_sdk_with_search(search_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    import dashscope
    from dashscope import Generation

    monkeypatch.setattr(dashscope, "base_http_api_url", f"{search_server.base_url}/api/v1")
    messages = user("e2e-sdk 今天杭州有什么新闻")
    response = Generation.call(
        model="qwen-plus",
        api_key=search_server.api_key,
        messages=messages,
        result_format="message",
        max_tokens=2,
        enable_search=True,
        search_options={"enable_source": True, "search_strategy": "max"},
    )
    assert response.status_code == 200, response
    assert response.output.search_info["search_results"] == expected_results(messages[0]["content"], 6)
    assert response.usage["plugins"] == {"search": {"count": 1, "strategy": "max"}}


def test_native_without_a_provider(server: Server) -> None:
    messages = user("hi")
    body = native(
        server,
        {"result_format": "message", "enable_search": True, "search_options": {"enable_source": True}},
        messages,
    ).json()
    assert "search_info" not in body["output"] and "plugins" not in body["usage"]
    assert body["usage"]["input_tokens"] == prompt_tokens(messages)
    r = native(server, {"enable_search": True, "search_options": {"forced_search": True}}, messages)
    assert r.status_code == 400
    assert r.json()["code"] == "InvalidParameter" and "forced_search" in r.json()["message"]
