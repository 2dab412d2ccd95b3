"""The API layer over a real uvicorn on loopback, with a FAKE engine that fails on demand.

A real engine can't be made to break mid-stream at will; ``tests.fakes.FaultyEngine`` can. Everything
else (HTTP server, store, keys, ledger) is real.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from qwen_gateway.api.app import create_app
from qwen_gateway.engines.base import Usage
from qwen_gateway.service.models import ModelRegistry, ServedModel
from qwen_gateway.service.runtime import Gateway
from qwen_gateway.settings import ModelConfig, Settings
from qwen_gateway.store.db import Store
from qwen_gateway.store.usage import list_usage
from tests.fakes import FaultyEngine, GatedEngine
from tests.support import free_port


@contextmanager
def serve_fake(
    home: Path, engine: FaultyEngine | GatedEngine, model_id: str = "qwen-plus"
) -> Iterator[tuple[str, str, Gateway]]:
    """A real server in a thread; yields (base_url, api_key, gateway)."""
    settings = Settings(home=home, max_request_bytes=4096, keepalive_seconds=0.3)
    port = free_port()
    ready = threading.Event()
    state: dict[str, object] = {}

    async def main() -> None:
        store = await Store.open(f"sqlite+aiosqlite:///{home / 'gw.db'}")
        config = ModelConfig(id=model_id, engine="fake")
        served = ServedModel.build(config, engine)  # type: ignore[arg-type]
        gateway = Gateway.assemble(settings, store, ModelRegistry([served]))
        _, raw = await gateway.keys.create("t")
        app = create_app(gateway)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        _LOOPS[id(gateway)] = asyncio.get_running_loop()
        _APPS[id(gateway)] = app
        state.update(key=raw, gateway=gateway, server=server)
        ready.set()
        await server.serve()
        await store.aclose()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base}/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        yield base, str(state["key"]), state["gateway"]  # type: ignore[misc]
    finally:
        state["server"].should_exit = True  # type: ignore[attr-defined]
        thread.join(10)


def ledger(gateway: Gateway) -> list:  # type: ignore[type-arg]
    """The usage rows, read on the server's own loop (the store's connections belong to it)."""
    fut = asyncio.run_coroutine_threadsafe(list_usage(store=gateway.store), _LOOPS[id(gateway)])
    return fut.result(10)


_LOOPS: dict[int, asyncio.AbstractEventLoop] = {}
_APPS: dict[int, FastAPI] = {}


def test_error_mid_stream_goes_in_band(tmp_path: Path) -> None:
    engine = FaultyEngine(good_deltas=3, fail=True)
    with serve_fake(tmp_path, engine) as (base, key, gateway):
        with httpx.stream(
            "POST",
            f"{base}/compatible-mode/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        ) as r:
            assert r.status_code == 200
            data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        items = [json.loads(d) for d in data[:-1]]
        assert items[0]["choices"][0]["delta"] == {"content": "", "role": "assistant"}
        assert [i["choices"][0]["delta"]["content"] for i in items[1:4]] == ["tok0 ", "tok1 ", "tok2 "]
        error = items[4]
        assert set(error) == {"error", "request_id"}
        assert error["error"]["code"] == "internal_error"
        assert error["error"]["message"] == "inference internal error."
        assert error["request_id"] == r.headers["x-request-id"]
        assert len(items) == 5
        assert engine.active == 0
        (row,) = ledger(gateway)
        assert (row.status, row.prompt_tokens, row.completion_tokens) == ("error", 7, 3)
        assert row.request_id == r.headers["x-request-id"]


def test_error_before_output_is_a_plain_http_error(tmp_path: Path) -> None:
    engine = FaultyEngine(good_deltas=0, fail=True)
    with serve_fake(tmp_path, engine) as (base, key, _):
        for stream in (True, False):
            r = httpx.post(
                f"{base}/compatible-mode/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={
                    "model": "qwen-plus",
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": stream,
                },
            )
            assert r.status_code == 500
            assert r.json()["error"]["message"] == "inference internal error."
            assert "Traceback" not in r.text


def test_two_apps_in_one_process(tmp_path: Path) -> None:
    with (
        serve_fake(tmp_path / "a", FaultyEngine(2, fail=False), "qwen-plus") as (base_a, key_a, _),
        serve_fake(tmp_path / "b", FaultyEngine(4, fail=False), "qwen-max") as (base_b, key_b, _),
    ):
        a = httpx.get(f"{base_a}/v1/models", headers={"Authorization": f"Bearer {key_a}"}).json()
        b = httpx.get(f"{base_b}/v1/models", headers={"Authorization": f"Bearer {key_b}"}).json()
        assert [m["id"] for m in a["data"]] == ["qwen-plus"]
        assert [m["id"] for m in b["data"]] == ["qwen-max"]
        # Keys belong to their own gateway.
        assert (
            httpx.get(f"{base_a}/v1/models", headers={"Authorization": f"Bearer {key_b}"}).status_code == 401
        )
        r = httpx.post(
            f"{base_b}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key_b}"},
            json={"model": "qwen-max", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 "
        assert r.json()["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}


def test_body_over_the_limit_is_refused(tmp_path: Path) -> None:
    with serve_fake(tmp_path, FaultyEngine(1, fail=False)) as (base, key, _):
        big = {"model": "qwen-plus", "messages": [{"role": "user", "content": "x" * 5000}]}
        r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=big)
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "Payload Too Large."

        def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is counted while reading
            yield b'{"model": "qwen-plus", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}]}'

        r = httpx.post(
            f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, content=chunked()
        )
        assert r.status_code == 400
        small = {"model": "qwen-plus", "messages": [{"role": "user", "content": "x" * 100}]}
        r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=small)
        assert r.status_code == 200


def _stream_lines(base: str, key: str, timeout: float = 30) -> tuple[int, list[str]]:
    with httpx.stream(
        "POST",
        f"{base}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        timeout=timeout,
        json={"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    ) as r:
        return r.status_code, [line for line in r.iter_lines() if line]


def test_slow_first_token_starts_the_stream_with_keepalives(tmp_path: Path) -> None:
    with serve_fake(tmp_path, FaultyEngine(2, fail=False, delay=2.0)) as (base, key, _):
        status, lines = _stream_lines(base, key)
    assert status == 200
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert lines[:first_data] and all(line == ": keep-alive" for line in lines[:first_data])
    assert lines[-1] == "data: [DONE]"


def test_error_after_a_slow_start_goes_in_band(tmp_path: Path) -> None:
    with serve_fake(tmp_path, FaultyEngine(0, fail=True, delay=1.5)) as (base, key, gateway):
        status, lines = _stream_lines(base, key)
        data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert status == 200 and lines[-1] == "data: [DONE]"
        assert data == [
            {
                "error": {
                    "message": "inference internal error.",
                    "type": "internal_error",
                    "param": None,
                    "code": "internal_error",
                },
                "request_id": data[0]["request_id"],
            }
        ]
        (row,) = ledger(gateway)
        assert row.status == "error"


def test_disconnect_during_a_long_prefill_frees_the_engine(tmp_path: Path) -> None:
    engine = FaultyEngine(2, fail=False, delay=30.0)
    with serve_fake(tmp_path, engine) as (base, key, gateway):
        with httpx.stream(
            "POST",
            f"{base}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        ) as r:
            assert r.status_code == 200  # headers came before the first token
            for line in r.iter_lines():
                assert line in ("", ": keep-alive")
                if engine.active:
                    break  # hang up while the engine is still "prefilling"
        gone = time.monotonic()
        while engine.active:  # far above the expected few ms; a bound only for a hung server
            assert time.monotonic() - gone < 30.0
            time.sleep(0.05)
        deadline = time.monotonic() + 30
        while not (rows := ledger(gateway)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert rows[0].status == "cancelled"


class _PromptCountingFaultyEngine(FaultyEngine):
    """FaultyEngine that, like a real engine, reports the prompt tokens a request used when it is
    stopped before its first token (a queued or long prefill)."""

    async def cancelled_usage(self, request_id: str) -> Usage | None:
        return Usage(prompt_tokens=7, completion_tokens=0)


def test_a_whole_answer_interrupted_by_the_shutdown_before_its_first_token_is_a_failure(
    tmp_path: Path,
) -> None:
    """Past the grace period, a non-stream call still in its prefill is interrupted: its client gets a
    503 and nothing else, so its row is a failure charged nothing (not a client that went away)."""
    engine = _PromptCountingFaultyEngine(2, fail=False, delay=60.0)
    with serve_fake(tmp_path, engine) as (base, key, gateway):
        result: dict[str, httpx.Response] = {}

        def call() -> None:
            result["r"] = httpx.post(
                f"{base}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}]},
                timeout=60,
            )

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 30
        while not engine.active:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        shutdown = _APPS[id(gateway)].state.shutdown
        loop = _LOOPS[id(gateway)]
        # The grace period ends; the request reaches no token boundary, so the shutdown interrupts it
        # (called at once here instead of STOP_AT_BOUNDARY_SECONDS later).
        loop.call_soon_threadsafe(shutdown.expire)
        loop.call_soon_threadsafe(shutdown._interrupt)
        caller.join(60)
        r = result["r"]
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "ServiceUnavailable"
        deadline = time.monotonic() + 30
        while not (rows := ledger(gateway)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (row,) = rows
        assert (row.status, row.prompt_tokens, row.completion_tokens) == ("error", 0, 0)
