"""The ``openai`` engine end to end: a front gateway whose models are served by upstreams on loopback.

Upstreams: a second qwen-gateway serving the tiny checkpoints as a plain OpenAI-compatible server (a
real upstream), and :class:`tests.upstream_fakes.FaultyUpstream` (FAKE, fault-injecting) for hangs,
resets, garbage, death mid-stream and replays of recorded vLLM / Ollama stream shapes.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.media_support import png_bytes, running_media_server
from tests.support import MODELS, Server, start_server, wait_for
from tests.upstream_fakes import UPSTREAM_SECRET, FaultyUpstream

UPSTREAM_CONFIG = """
[[models]]
id = "qwen-plus"
engine = "local"
path = "{qwen25}"
max_output = 48

[[models]]
id = "qwen3-8b"
engine = "local"
path = "{qwen3}"
max_output = 48
max_reasoning = 64
"""

FAULT_MODES = [
    "ok",
    "no-usage",
    "hang",
    "headers-then-hang",
    "reset",
    "garbage",
    "die",
    "slow",
    "status-500",
    "status-429",
    "status-400",
    "replay-vllm017_reasoning_tools",
    "replay-ollama_reasoning_tools",
    "replay-ollama_old_tools",
    "replay-vllm_reasoning",
]


def front_config(upstream: Server, fake: FaultyUpstream) -> str:
    out = [
        f"""
[media]
allow_hosts = ["127.0.0.1"]

[[models]]
id = "fake-vision"
engine = "openai"
base_url = "{fake.url}"
upstream_model = "ok"
modalities = ["text", "image"]

[[models]]
id = "qwen-plus"
engine = "openai"
base_url = "{upstream.compat_url}"
api_key_env = "QG_TEST_UPSTREAM_KEY"
tokenizer = "{MODELS / "tiny-qwen2.5"}"
max_output = 48

# A qwen-gateway speaks DashScope's compatible mode: the dashscope engine, pointed at it.
[[models]]
id = "qwen3-8b"
engine = "dashscope"
base_url = "{upstream.compat_url}"
api_key_env = "QG_TEST_UPSTREAM_KEY"
tokenizer = "{MODELS / "tiny-qwen3"}"
max_output = 48
max_reasoning = 64
"""
    ]
    for mode in FAULT_MODES:
        out.append(
            f"""
[[models]]
id = "fake-{mode}"
engine = "openai"
base_url = "{fake.url}"
upstream_model = "{mode}"
tokenizer = "{MODELS / "tiny-qwen2.5"}"
first_byte_timeout = 2
idle_timeout = 2
answer_timeout = 2
reasoning = true
"""
        )
    # A non-stream call the upstream holds (it never answers) for longer than any test waits: only the
    # client's disconnect ends it.
    out.append(
        f"""
[[models]]
id = "fake-hold"
engine = "openai"
base_url = "{fake.url}"
upstream_model = "hang"
answer_timeout = 300
"""
    )
    return "".join(out)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("upstream-home")
    config = home / "config.toml"
    config.write_text(UPSTREAM_CONFIG.format(qwen25=MODELS / "tiny-qwen2.5", qwen3=MODELS / "tiny-qwen3"))
    srv = start_server(home, "--config", str(config))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def fake() -> Iterator[FaultyUpstream]:
    upstream = FaultyUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def resetting() -> Iterator[FaultyUpstream]:
    """A replica whose health checks pass but which resets every chat request."""
    upstream = FaultyUpstream(force_mode="reset").start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def front(
    tmp_path_factory: pytest.TempPathFactory,
    upstream: Server,
    fake: FaultyUpstream,
    resetting: FaultyUpstream,
) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("front-home")
    config = home / "config.toml"
    # One entry per retry test: a replica that failed a request is passed over while a healthy one
    # is there (until a health check finds it answering), so each test starts from fresh replica state.
    retry = "".join(
        f"""
[[models]]
id = "{name}"
engine = "openai"
replicas = ["{resetting.url}", "{fake.url}"]
upstream_model = "ok"
breaker_failures = 1000
"""
        for name in ("fake-retry", "fake-retry-whole")
    )
    config.write_text(front_config(upstream, fake) + retry)
    os.environ["QG_TEST_UPSTREAM_KEY"] = upstream.api_key  # inherited by the server process only
    try:
        srv = start_server(home, "--config", str(config))
    finally:
        del os.environ["QG_TEST_UPSTREAM_KEY"]
    yield srv
    srv.stop()


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(api_key=server.api_key, base_url=server.compat_url, max_retries=0, timeout=60)


def sse(server: Server, body: dict[str, Any]) -> tuple[int, str, list[Any]]:
    """(status, request id, parsed data payloads; "[DONE]" kept as the string)."""
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.stream(
        "POST", f"{server.compat_url}/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        if response.status_code != 200:
            return response.status_code, response.headers["x-request-id"], [json.loads(response.read())]
        payloads: list[Any] = []
        for line in response.iter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                payloads.append(data if data == "[DONE]" else json.loads(data))
        return response.status_code, response.headers["x-request-id"], payloads


def text_of(payloads: list[Any]) -> str:
    return "".join(
        c["delta"].get("content") or "" for p in payloads if isinstance(p, dict) for c in p.get("choices", [])
    )


def ledger_row(server: Server, request_id: str) -> Any:
    wait_for(lambda: bool(server.ledger(request_id)), "the ledger row")
    return server.ledger(request_id)[0]


# -- a real upstream: a second qwen-gateway ------------------------------------------------------------


def test_chat_through_a_real_upstream(front: Server, upstream: Server) -> None:
    completion = client(front).chat.completions.create(
        model="qwen-plus", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    direct = client(upstream).chat.completions.create(
        model="qwen-plus", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    # Greedy on the same checkpoint: the same answer and the same (upstream-reported) usage.
    assert completion.choices[0].message.content == direct.choices[0].message.content
    assert completion.usage is not None and direct.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        direct.usage.prompt_tokens,
        direct.usage.completion_tokens,
    )


def test_non_stream_through_a_real_dashscope_upstream_matches_it_and_is_billed_from_its_usage(
    front: Server, upstream: Server
) -> None:
    # The dashscope engine's non-streamed call (enable_thinking false: a hybrid Qwen3 refuses thinking
    # without a stream) to a second qwen-gateway: the same greedy answer and usage as asking it directly.
    body = {
        "model": "qwen3-8b",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 6,
        "temperature": 0,
        "enable_thinking": False,
    }
    through, direct = post(front, body), post(upstream, body)
    assert through.status_code == direct.status_code == 200, (through.text, direct.text)
    assert through.json()["choices"][0]["message"] == direct.json()["choices"][0]["message"]
    usage = direct.json()["usage"]
    assert through.json()["usage"]["completion_tokens"] == usage["completion_tokens"]
    row = ledger_row(front, through.headers["x-request-id"])
    assert (row["status"], row["usage_source"]) == ("ok", "engine")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )


def test_stream_through_a_real_upstream_is_billed_from_its_usage(front: Server) -> None:
    body = {
        "model": "qwen-plus",
        "messages": [{"role": "user", "content": "Count"}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, request_id, payloads = sse(front, body)
    assert status == 200 and payloads[-1] == "[DONE]"
    usage = payloads[-2]["usage"]
    row = ledger_row(front, request_id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert row["usage_source"] == "engine" and row["status"] == "ok"


def test_thinking_reaches_the_upstream_and_reasoning_comes_back(front: Server) -> None:
    body = {
        "model": "qwen3-8b",
        "messages": [{"role": "user", "content": "Think"}],
        "max_tokens": 4,
        "stream": True,
        "enable_thinking": True,
        "thinking_budget": 8,  # dashscope takes it as its own field
    }
    status, _, payloads = sse(front, body)
    assert status == 200, payloads
    reasoning = "".join(
        c["delta"].get("reasoning_content") or ""
        for p in payloads
        if isinstance(p, dict)
        for c in p["choices"]
    )
    assert reasoning  # the upstream's reasoning_content, passed on as ours
    # An openai upstream whose config doesn't say it enforces thinking_budget: refused, never ignored.
    status, _, payloads = sse(front, {**body, "model": "fake-ok"})
    assert status == 400 and payloads[0]["error"]["param"] == "thinking_budget"


# -- the fault-injecting upstream ------------------------------------------------------------------------


def test_request_is_translated_for_the_upstream(front: Server, fake: FaultyUpstream) -> None:
    status, request_id, _ = sse(
        front,
        {
            "model": "fake-ok",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,  # without stream_options: usage is still asked for upstream
            "enable_thinking": False,
            "top_k": 3,
        },
    )
    assert status == 200
    sent = [r for r in fake.received if r.headers.get("x-request-id") == request_id]
    assert len(sent) == 1, "the request id is forwarded upstream"
    body = sent[0].body
    assert body["stream_options"] == {"include_usage": True} and body["stream"] is True
    assert body["model"] == "ok" and body["top_k"] == 3
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert "authorization" not in sent[0].headers  # this model has no api_key_env


def test_image_is_fetched_by_the_gateway_and_sent_as_data(front: Server, fake: FaultyUpstream) -> None:
    with running_media_server() as media:
        url = media.url("/img.png")
        content = [{"type": "text", "text": "?"}, {"type": "image_url", "image_url": {"url": url}}]
        messages = [{"role": "user", "content": content}]
        status, request_id, _ = sse(front, {"model": "fake-vision", "stream": True, "messages": messages})
        assert status == 200
        assert media.hits.get("/img.png") == 1  # the gateway's safe fetcher opened it
        # fake-ok is text-only (no modalities option): images are refused before anything goes upstream.
        status, refused_id, _ = sse(front, {"model": "fake-ok", "stream": True, "messages": messages})
        assert status == 400
    sent = [r.body for r in fake.received if r.headers.get("x-request-id") == request_id]
    part = sent[0]["messages"][0]["content"][1]
    prefix = "data:image/png;base64,"
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith(prefix)
    assert base64.b64decode(part["image_url"]["url"][len(prefix) :]) == png_bytes()
    assert url not in json.dumps(sent)
    assert not [r for r in fake.received if r.headers.get("x-request-id") == refused_id]


@pytest.mark.parametrize(
    "mode", ["hang", "headers-then-hang", "reset", "garbage", "status-500", "status-429"]
)
def test_failure_before_the_first_byte_is_a_clean_error(front: Server, mode: str) -> None:
    status, request_id, payloads = sse(
        front, {"model": f"fake-{mode}", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    if status == 200:  # the stream's keep-alive had already sent the headers: in-band, then the end
        assert len(payloads) == 2 and payloads[1] == "[DONE]", payloads
    else:
        assert status == 503, payloads
    error = payloads[0]["error"]
    assert UPSTREAM_SECRET not in json.dumps(payloads)
    assert error["code"] in {"ModelUnavailable", "ModelServingError"}
    rows = front.ledger(request_id)
    assert not rows or (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (0, 0)


def test_upstream_refusal_is_a_400_without_its_message(front: Server) -> None:
    status, _, payloads = sse(
        front, {"model": "fake-status-400", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    assert status == 400
    assert UPSTREAM_SECRET not in json.dumps(payloads)
    wait_for(lambda: UPSTREAM_SECRET in front.log(), "the upstream's message in the server log")


def test_death_mid_stream_is_an_in_band_error_charged_for_delivered_tokens(front: Server) -> None:
    status, request_id, payloads = sse(
        front, {"model": "fake-die", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    assert status == 200
    assert payloads[-1] == "[DONE]" and "error" in payloads[-2], payloads[-3:]
    delivered = text_of(payloads)
    assert delivered == "tok0 tok1 tok2 "
    row = ledger_row(front, request_id)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(MODELS / "tiny-qwen2.5" / "tokenizer.json"))
    assert row["status"] == "error" and row["usage_source"] == "local"
    assert row["completion_tokens"] == len(tokenizer.encode(delivered, add_special_tokens=False).ids)
    assert row["prompt_tokens"] > 0


def test_missing_usage_is_counted_locally(front: Server) -> None:
    status, request_id, payloads = sse(
        front,
        {
            "model": "fake-no-usage",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert status == 200 and payloads[-1] == "[DONE]"
    row = ledger_row(front, request_id)
    assert row["usage_source"] == "local" and row["status"] == "ok"
    assert payloads[-2]["usage"]["completion_tokens"] == row["completion_tokens"] > 0


def test_client_disconnect_cancels_the_upstream_request(front: Server, fake: FaultyUpstream) -> None:
    gone = threading.Event()
    before = fake.disconnects
    fake.on_disconnect = gone.set
    headers = {"Authorization": f"Bearer {front.api_key}"}
    body = {"model": "fake-slow", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream(
        "POST", f"{front.compat_url}/chat/completions", json=body, headers=headers, timeout=60
    ) as r:
        request_id = r.headers["x-request-id"]
        for line in r.iter_lines():
            if "tok2" in line:
                break  # leave mid-stream
    assert gone.wait(30), "the upstream never saw the disconnect"
    assert fake.disconnects > before
    row = ledger_row(front, request_id)
    assert row["status"] == "cancelled" and row["usage_source"] == "local" and row["completion_tokens"] >= 3


@pytest.mark.parametrize(
    ("mode", "expected_calls"),
    [
        (
            "replay-vllm017_reasoning_tools",
            [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Lyon"})],
        ),
        ("replay-ollama_reasoning_tools", [("get_weather", {"city": "Paris"})]),
        ("replay-ollama_old_tools", [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]),
    ],
)
def test_recorded_tool_call_streams_reach_clients_in_dashscope_shape(
    front: Server, mode: str, expected_calls: list[tuple[str, dict[str, Any]]]
) -> None:
    tools = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in ("get_weather", "get_time")
    ]
    status, _, payloads = sse(
        front,
        {
            "model": f"fake-{mode}",
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": tools,
            "stream": True,
        },
    )
    assert status == 200, payloads
    deltas = [
        tc
        for p in payloads
        if isinstance(p, dict)
        for c in p["choices"]
        for tc in (c["delta"].get("tool_calls") or [])
    ]
    assert all("index" in d for d in deltas)
    calls: dict[int, list[Any]] = {}
    for d in deltas:
        calls.setdefault(d["index"], []).append(d)
    got = []
    for _, parts in sorted(calls.items()):
        assert parts[0].get("id") and parts[0]["function"].get("name")
        assert all(not p.get("id") for p in parts[1:]), "id only on a call's first delta"
        args = "".join(p["function"].get("arguments") or "" for p in parts)
        got.append((parts[0]["function"]["name"], json.loads(args)))
    assert got == expected_calls
    finish = [
        c["finish_reason"]
        for p in payloads
        if isinstance(p, dict)
        for c in p["choices"]
        if c["finish_reason"]
    ]
    assert finish == ["tool_calls"]


def test_recorded_reasoning_reaches_clients_as_reasoning_content(front: Server) -> None:
    completion = client(front).chat.completions.create(
        model="fake-replay-vllm_reasoning",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"enable_thinking": True},
        stream=True,
    )
    reasoning, content = [], []
    for chunk in completion:
        for choice in chunk.choices:
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            content.append(choice.delta.content or "")
    assert "".join(reasoning) == "The user greets me." and "".join(content) == "Hello!"


def test_a_replica_failing_before_the_first_byte_is_retried_and_charged_once(
    front: Server, resetting: FaultyUpstream
) -> None:
    before = len(resetting.received)
    for _ in range(6):
        status, request_id, payloads = sse(
            front, {"model": "fake-retry", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        )
        assert status == 200 and text_of(payloads) == "tok0 tok1 tok2 tok3 tok4 ", payloads
        row = ledger_row(front, request_id)
        assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == ("ok", 7, 5)
    assert len(resetting.received) > before  # the resetting replica was tried, and the client never knew


def test_metrics_and_overhead_header(front: Server) -> None:
    headers = {"Authorization": f"Bearer {front.api_key}"}
    body = {"model": "fake-ok", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{front.compat_url}/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200
    assert float(r.headers["x-gateway-overhead-ms"]) >= 0
    with httpx.stream(
        "POST", f"{front.compat_url}/chat/completions", json={**body, "stream": True}, headers=headers
    ) as s:
        assert float(s.headers["x-gateway-overhead-ms"]) >= 0
        s.read()
    sse(front, {"model": "fake-die", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    text = httpx.get(f"{front.base_url}/metrics", timeout=30).text
    assert 'qwen_gateway_upstream_errors_total{kind="mid_stream",model="fake-die",replica="0"}' in text
    assert 'qwen_gateway_requests_total{model="fake-ok",status="ok"}' in text
    assert 'qwen_gateway_tokens_total{kind="completion",model="fake-ok"}' in text
    assert 'qwen_gateway_time_to_first_token_seconds_count{model="fake-ok"}' in text
    assert 'qwen_gateway_queue_depth{model="fake-ok"} 0.0' in text
    # Key names never appear as labels.
    assert "test-" not in text and front.api_key not in text


# -- non-stream clients: one non-streamed upstream call -------------------------------------------------


def post(server: Server, body: dict[str, Any]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.api_key}"}
    return httpx.post(f"{server.compat_url}/chat/completions", json=body, headers=headers, timeout=60)


def test_a_non_stream_client_makes_a_non_streamed_upstream_call(front: Server, fake: FaultyUpstream) -> None:
    r = post(front, {"model": "fake-ok", "messages": [{"role": "user", "content": "whole"}], "top_k": 3})
    assert r.status_code == 200, r.text
    request_id = r.headers["x-request-id"]
    sent = [x for x in fake.received if x.headers.get("x-request-id") == request_id]
    assert len(sent) == 1
    # One JSON answer asked for (the fake answers stream false with one body, never a stream); no
    # stream_options, which vLLM refuses without stream: a whole answer always has its usage.
    assert sent[0].body["stream"] is False and "stream_options" not in sent[0].body
    assert sent[0].body["top_k"] == 3 and sent[0].headers["accept"] == "application/json"
    answer = r.json()
    assert answer["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 "
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == (7, 5)
    row = ledger_row(front, request_id)
    assert (row["status"], row["usage_source"], row["prompt_tokens"], row["completion_tokens"]) == (
        "ok",
        "engine",
        7,
        5,
    )


def test_a_whole_answer_without_usage_is_counted_locally(front: Server) -> None:
    r = post(front, {"model": "fake-no-usage", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    row = ledger_row(front, r.headers["x-request-id"])
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(MODELS / "tiny-qwen2.5" / "tokenizer.json"))
    text = r.json()["choices"][0]["message"]["content"]
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert row["usage_source"] == "local" and row["status"] == "ok"
    assert row["completion_tokens"] == len(tokenizer.encode(text, add_special_tokens=False).ids)
    assert r.json()["usage"]["completion_tokens"] == row["completion_tokens"]


@pytest.mark.parametrize(
    "mode", ["hang", "headers-then-hang", "reset", "garbage", "die", "status-500", "status-429"]
)
def test_a_failed_non_streamed_upstream_call_is_a_clean_error_charged_nothing(
    front: Server, mode: str
) -> None:
    r = post(front, {"model": f"fake-{mode}", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503, r.text  # an upstream's 429 too: our capacity is what is short
    assert UPSTREAM_SECRET not in r.text
    if mode == "status-429":  # with the upstream's own back-off
        assert r.headers["retry-after"] == "7"
    assert r.json()["error"]["code"] in {"ModelUnavailable", "ModelServingError"}
    rows = front.ledger(r.headers["x-request-id"])
    assert not rows or (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (0, 0)


def test_a_non_stream_call_is_retried_on_another_replica_and_charged_once(
    front: Server, resetting: FaultyUpstream, fake: FaultyUpstream
) -> None:
    before = len(resetting.received)
    for _ in range(4):
        r = post(front, {"model": "fake-retry-whole", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 "
        request_id = r.headers["x-request-id"]
        row = ledger_row(front, request_id)
        assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == ("ok", 7, 5)
        answered = [x for x in fake.received if x.headers.get("x-request-id") == request_id]
        assert [x.body["stream"] for x in answered] == [False]
    assert len(resetting.received) > before


@pytest.mark.parametrize(
    ("mode", "expected_calls", "reasoning"),
    [
        (
            "replay-vllm017_reasoning_tools",
            [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Lyon"})],
            "Need the weather for two cities.",
        ),
        ("replay-ollama_reasoning_tools", [("get_weather", {"city": "Paris"})], "Let me check."),
        ("replay-ollama_old_tools", [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})], ""),
    ],
)
def test_recorded_whole_answers_reach_non_stream_clients_in_dashscope_shape(
    front: Server, fake: FaultyUpstream, mode: str, expected_calls: list[tuple[str, Any]], reasoning: str
) -> None:
    tools = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in ("get_weather", "get_time")
    ]
    body = {"model": f"fake-{mode}", "messages": [{"role": "user", "content": "weather?"}], "tools": tools}
    r = post(front, body)
    assert r.status_code == 200, r.text
    sent = [x.body for x in fake.received if x.headers.get("x-request-id") == r.headers["x-request-id"]]
    assert sent[0]["stream"] is False  # the recorded whole answer was what came back
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert (message.get("reasoning_content") or "") == reasoning
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]
    assert got == expected_calls
    assert all(c["id"] and c["type"] == "function" for c in message["tool_calls"])
    assert len({c["id"] for c in message["tool_calls"]}) == len(expected_calls)


def test_recorded_whole_reasoning_reaches_non_stream_clients_as_reasoning_content(front: Server) -> None:
    completion = client(front).chat.completions.create(
        model="fake-replay-vllm_reasoning",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"enable_thinking": True},
    )
    message = completion.choices[0].message
    assert getattr(message, "reasoning_content", None) == "The user greets me."
    assert message.content == "Hello!"
    assert completion.usage is not None and completion.usage.completion_tokens == 8


def test_a_non_stream_client_that_hangs_up_cancels_the_upstream_call(
    front: Server, fake: FaultyUpstream
) -> None:
    gone = threading.Event()
    fake.on_disconnect = gone.set
    marker = f"hold-{os.getpid()}-{threading.get_ident()}"
    body = json.dumps({"model": "fake-hold", "messages": [{"role": "user", "content": marker}]}).encode()
    host, port = "127.0.0.1", int(front.compat_url.split(":")[2].split("/")[0])
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(
            f"POST /compatible-mode/v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {front.api_key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

        def arrived() -> bool:
            return any(marker in json.dumps(x.body) for x in fake.received)

        wait_for(arrived, "the call at the upstream")
    # The client is gone while the upstream holds the answer (its answer_timeout is 300 s): the
    # gateway drops the upstream connection at once.
    assert gone.wait(30), "the upstream never saw the disconnect"
    sent = [x for x in fake.received if marker in json.dumps(x.body)]
    assert len(sent) == 1 and sent[0].body["stream"] is False
    row = ledger_row(front, sent[0].headers["x-request-id"])
    assert row["status"] == "cancelled" and (row["prompt_tokens"], row["completion_tokens"]) == (0, 0)
