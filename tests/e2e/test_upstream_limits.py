"""The ``openai`` engine's limits end to end: at most ``max_concurrency`` requests in flight upstream
(the rest queued in order, a queued client that hangs up gone at once, /health telling the queue), and
the context: a prompt too long for it refused, the upstream's ``max_tokens`` cut to what fits.

Upstream: :class:`tests.upstream_fakes.FaultyUpstream` (FAKE; its "held" mode answers only when the
test releases a request, which makes what is in flight at the upstream something a test can pin down).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from qwen_gateway.engines.base import ChatMessage
from qwen_gateway.engines.openai.counting import TokenCounter
from tests.support import MODELS, Server, start_server, wait_for
from tests.upstream_fakes import CONTEXT, FaultyUpstream


@pytest.fixture(scope="module")
def fake() -> Iterator[FaultyUpstream]:
    upstream = FaultyUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, fake: FaultyUpstream) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("front-limits")
    config = home / "config.toml"
    config.write_text(
        f"""
[[models]]
id = "fake-gated"
engine = "openai"
base_url = "{fake.url}"
upstream_model = "held"
max_concurrency = 1
max_queue = 3

[[models]]
id = "fake-short"
engine = "openai"
base_url = "{fake.url}"
upstream_model = "ok"
tokenizer = "{MODELS / "tiny-qwen2.5"}"
context_length = 256

[[models]]
id = "fake-think"
engine = "openai"
base_url = "{fake.url}"
upstream_model = "ok"
tokenizer = "{MODELS / "tiny-qwen3"}"
reasoning = true
thinking_budget = true

[[models]]
id = "fake-estimated"
engine = "openai"
base_url = "{fake.url}"
upstream_model = "ok"
"""
    )
    srv = start_server(home, "--config", str(config))
    yield srv
    srv.stop()


def health_of(server: Server, model: str) -> dict[str, Any]:
    models = httpx.get(f"{server.base_url}/health", timeout=30).json()["models"]
    return next(m for m in models if m["id"] == model)


def post(server: Server, body: dict[str, Any]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.api_key}"}
    return httpx.post(f"{server.compat_url}/chat/completions", json=body, headers=headers, timeout=120)


def gated(marker: str, *, stream: bool = True) -> dict[str, Any]:
    return {"model": "fake-gated", "messages": [{"role": "user", "content": marker}], "stream": stream}


def arrived(fake: FaultyUpstream) -> list[str]:
    """The markers of the gated requests the upstream received, in arrival order."""
    return [
        r.body["messages"][0]["content"]
        for r in list(fake.received)
        if isinstance(r.body, dict) and r.body.get("model") == "held"
    ]


# -- max_concurrency ---------------------------------------------------------------------------------


def test_max_concurrency_is_what_the_upstream_sees_in_flight_the_rest_wait_in_order(
    front: Server, fake: FaultyUpstream
) -> None:
    before = len(arrived(fake))
    markers = [f"order-{i}" for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        futures: list[Future[httpx.Response]] = []
        for i, marker in enumerate(markers):
            # One at a time, each once the one before is in flight or queued: their queue order is known.
            futures.append(pool.submit(post, front, gated(marker, stream=i % 2 == 0)))
            if i == 0:
                wait_for(lambda: len(arrived(fake)) == before + 1, "the first request at the upstream")
            else:
                wait_for(lambda n=i: health_of(front, "fake-gated")["queued"] == n, f"{i} queued")  # type: ignore[misc]
        # max_concurrency = 1: one in flight upstream, three waiting in the gateway, as /health says.
        status = health_of(front, "fake-gated")
        assert (status["active_generations"], status["queued"], status["queue_limit"]) == (1, 3, 3)
        assert arrived(fake)[before:] == markers[:1]
        # A fifth is past max_concurrency + max_queue: refused at once, never sent.
        refused = post(front, gated("order-refused", stream=False))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "ModelServingError"
        for i in range(4):
            fake.release()
            assert futures[i].result(timeout=60).status_code == 200
            if i < 3:
                wait_for(lambda n=i: len(arrived(fake)) == before + n + 2, f"request {i + 1} sent")  # type: ignore[misc]
    assert arrived(fake)[before:] == markers  # first come, first served
    assert fake.max_in_flight == 1
    assert health_of(front, "fake-gated")["queued"] == 0


def test_a_queued_client_that_hangs_up_leaves_the_queue_at_once(front: Server, fake: FaultyUpstream) -> None:
    before = len(arrived(fake))
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, front, gated("hold-first"))
        wait_for(lambda: len(arrived(fake)) == before + 1, "the first request at the upstream")
        body = json.dumps(gated("gone")).encode()
        host, port = "127.0.0.1", int(front.compat_url.split(":")[2].split("/")[0])
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(
                f"POST /compatible-mode/v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {front.api_key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            wait_for(lambda: health_of(front, "fake-gated")["queued"] == 1, "the second request queued")
        # Hung up while queued: gone from the queue while the first is still in flight (nothing was
        # released yet).
        wait_for(lambda: health_of(front, "fake-gated")["queued"] == 0, "the queue to empty")
        assert health_of(front, "fake-gated")["active_generations"] == 1
        fake.release()
        assert first.result(timeout=60).status_code == 200
        # The next request goes straight upstream: the one that left took no slot and nothing was
        # sent for it.
        third = pool.submit(post, front, gated("after"))
        wait_for(lambda: len(arrived(fake)) == before + 2, "the next request at the upstream")
        fake.release()
        assert third.result(timeout=60).status_code == 200
    assert arrived(fake)[before:] == ["hold-first", "after"]


# -- the context ---------------------------------------------------------------------------------------


def test_a_prompt_longer_than_the_context_is_refused_before_the_upstream(
    front: Server, fake: FaultyUpstream
) -> None:
    words = " ".join(f"word{i % 97}" for i in range(41_000))  # ~250 KB: counted in pieces off the loop
    r = post(front, {"model": "fake-short", "messages": [{"role": "user", "content": words}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"] == "Range of input length should be [1, 255]"
    assert (error["code"], error["param"]) == ("invalid_parameter_error", "messages")
    assert not [x for x in fake.received if x.headers.get("x-request-id") == r.headers["x-request-id"]]
    # Streamed too: before any output (a 400, or in-band if the stream's headers had gone out first).
    with httpx.stream(
        "POST",
        f"{front.compat_url}/chat/completions",
        json={"model": "fake-short", "stream": True, "messages": [{"role": "user", "content": words}]},
        headers={"Authorization": f"Bearer {front.api_key}"},
        timeout=120,
    ) as streamed:
        assert streamed.status_code in (200, 400)
        text = streamed.read().decode()
        assert "Range of input length should be [1, 255]" in text and "tok0" not in text
    ok = post(front, {"model": "fake-short", "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200, ok.text


def test_max_tokens_sent_upstream_fits_the_context_beside_the_prompt(
    front: Server, fake: FaultyUpstream
) -> None:
    counter = TokenCounter(str(MODELS / "tiny-qwen3"))

    def sent(body: dict[str, Any]) -> dict[str, Any]:
        r = post(front, {"model": "fake-think", "stream": True, **body})
        assert r.status_code == 200, r.text
        return next(
            x.body for x in fake.received if x.headers.get("x-request-id") == r.headers["x-request-id"]
        )

    def prompt_tokens(text: str) -> int:
        return counter.prompt([ChatMessage(role="user", content=text)], [])

    # Thinking on, no max_tokens: the answer's cap (the context, for an id outside the catalog) plus
    # the thinking budget (the context too) was 2 x CONTEXT; vLLM refuses that. Now: what fits.
    body = sent({"messages": [{"role": "user", "content": "think"}], "enable_thinking": True})
    assert body["chat_template_kwargs"]["enable_thinking"] is True
    assert body["max_tokens"] == CONTEXT - prompt_tokens("think")
    # A long prompt leaves less room, counted the same way.
    long = "many words here " * 200
    body = sent({"messages": [{"role": "user", "content": long}], "max_tokens": 50, "enable_thinking": True})
    assert body["max_tokens"] == CONTEXT - prompt_tokens(long)
    # Room to spare: the request's own caps, untouched (answer plus budget while thinking).
    body = sent({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "enable_thinking": False})
    assert body["max_tokens"] == 50
    body = sent(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 50,
            "enable_thinking": True,
            "thinking_budget": 100,
        }
    )
    assert body["max_tokens"] == 150
    assert all(json.dumps(b).count("max_tokens") == 1 for b in fake.bodies("ok")[-4:])


def test_without_an_exact_count_max_tokens_goes_upstream_as_asked(
    front: Server, fake: FaultyUpstream
) -> None:
    """No tokenizer: the prompt is only estimated (4 bytes a token), which may be off either way, so
    nothing is cut on it: the upstream's own check decides. ("hello " x 2000 is ~2000 tokens, estimated
    3000: a clamp on the estimate sent 1096 instead of the 2000 asked, which fit.)"""
    r = post(
        front,
        {
            "model": "fake-estimated",
            "messages": [{"role": "user", "content": "hello " * 2000}],
            "max_tokens": 2000,
        },
    )
    assert r.status_code == 200, r.text
    (body,) = [x.body for x in fake.received if x.headers.get("x-request-id") == r.headers["x-request-id"]]
    assert body["max_tokens"] == 2000
