"""Two real upstream replicas (qwen-gateway processes serving a tiny checkpoint) behind one front
gateway; one is killed while requests are in flight."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from tokenizers import Tokenizer

from tests.support import MODELS, Server, start_server, start_servers, wait_for

UPSTREAM_CONFIG = f"""
[[models]]
id = "qwen-turbo"
engine = "local"
path = "{MODELS / "tiny-qwen2.5"}"
max_output = 4096
"""


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    # Two processes sharing one home (one database, so one key works on both), as two vLLM replicas
    # behind one served-model name would.
    home = tmp_path_factory.mktemp("replicas")
    (home / "config.toml").write_text(UPSTREAM_CONFIG)
    servers = start_servers(home, 2, "--config", str(home / "config.toml"))
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, replicas: list[Server]) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("front-replicas")
    urls = ", ".join(f'"{r.compat_url}"' for r in replicas)
    (home / "config.toml").write_text(
        f"""
[[models]]
id = "qwen-turbo"
engine = "openai"
replicas = [{urls}]
api_key_env = "QG_TEST_REPLICA_KEY"
tokenizer = "{MODELS / "tiny-qwen2.5"}"
health_interval = 0.5
max_output = 64
"""
    )
    os.environ["QG_TEST_REPLICA_KEY"] = replicas[0].api_key
    try:
        srv = start_server(home, "--config", str(home / "config.toml"))
    finally:
        del os.environ["QG_TEST_REPLICA_KEY"]
    yield srv
    srv.stop()


class Call:
    """One streamed request: what the client received."""

    def __init__(self) -> None:
        self.status = 0
        self.request_id = ""
        self.payloads: list[Any] = []
        self.first_content = threading.Event()

    @property
    def text(self) -> str:
        return "".join(
            c["delta"].get("content") or ""
            for p in self.payloads
            if isinstance(p, dict)
            for c in p.get("choices", [])
        )

    @property
    def error_index(self) -> int | None:
        for i, p in enumerate(self.payloads):
            if isinstance(p, dict) and "error" in p:
                return i
        return None


def stream(front: Server, call: Call, max_tokens: int) -> Call:
    body = {
        "model": "qwen-turbo",
        "messages": [{"role": "user", "content": "Tell a long story"}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {front.api_key}"}
    with httpx.stream(
        "POST", f"{front.compat_url}/chat/completions", json=body, headers=headers, timeout=120
    ) as r:
        call.status, call.request_id = r.status_code, r.headers["x-request-id"]
        for line in r.iter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                call.payloads.append(data if data == "[DONE]" else json.loads(data))
                if call.text:
                    call.first_content.set()
    return call


def whole(front: Server, max_tokens: int) -> httpx.Response:
    """One non-stream call (a non-streamed upstream call: retried on another replica whenever its
    replica fails, since nothing has reached the client before the whole answer)."""
    body = {
        "model": "qwen-turbo",
        "messages": [{"role": "user", "content": "Tell a long story"}],
        "max_tokens": max_tokens,
    }
    headers = {"Authorization": f"Bearer {front.api_key}"}
    return httpx.post(f"{front.compat_url}/chat/completions", json=body, headers=headers, timeout=120)


def test_a_replica_killed_under_load(front: Server, replicas: list[Server]) -> None:
    tokenizer = Tokenizer.from_file(str(MODELS / "tiny-qwen2.5" / "tokenizer.json"))
    first = [Call() for _ in range(8)]
    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(stream, front, c, 64) for c in first]
        wholes = [pool.submit(whole, front, 64) for _ in range(4)]
        # Least-outstanding balancing spreads 8 requests over both replicas: wait until they stream.
        wait_for(lambda: sum(c.first_content.is_set() for c in first) >= 4, "first tokens", timeout=120)
        replicas[1].proc.kill()  # SIGKILL: connections reset mid-stream, new connections refused
        replicas[1].proc.wait()
        second = [Call() for _ in range(8)]
        futures += [pool.submit(stream, front, c, 8) for c in second]
        wholes += [pool.submit(whole, front, 8) for _ in range(4)]
        for future in futures:
            future.result(timeout=300)
        answers = [w.result(timeout=300) for w in wholes]
    # Non-stream calls never fail on the kill (one in flight on the killed replica is asked again of
    # the other) and are charged once, what the replica that answered reported.
    for answer in answers:
        assert answer.status_code == 200, answer.text
        request_id = answer.headers["x-request-id"]
        wait_for(lambda r=request_id: bool(front.ledger(r)), "ledger row")  # type: ignore[misc]
        row = front.ledger(request_id)[0]
        usage = answer.json()["usage"]
        assert (row["status"], row["usage_source"]) == ("ok", "engine")
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
    for call in first + second:
        assert call.status == 200, call.payloads
        assert call.payloads[-1] == "[DONE]", call.payloads[-3:]
        error = call.error_index
        row = front.ledger(call.request_id)
        wait_for(lambda c=call: bool(front.ledger(c.request_id)), "ledger row")  # type: ignore[misc]
        row = front.ledger(call.request_id)[0]
        if error is None:
            usage = call.payloads[-2]["usage"]
            assert row["status"] == "ok" and row["usage_source"] == "engine"
            assert (row["prompt_tokens"], row["completion_tokens"]) == (
                usage["prompt_tokens"],
                usage["completion_tokens"],
            )
        else:
            # Only a request already streaming from the killed replica may fail, in-band, after output;
            # it is charged the tokens it delivered, counted here.
            assert call in first and error > 0 and call.text, call.payloads[:3]
            assert row["status"] == "error" and row["usage_source"] == "local"
            assert row["completion_tokens"] == len(tokenizer.encode(call.text, add_special_tokens=False).ids)
    # Requests sent after the kill never see it: retried before the first byte, then the breaker and
    # the health checks keep them off the dead replica.
    assert all(c.error_index is None for c in second)
    assert sum(c.error_index is not None for c in first) < len(first)
