"""CPU per request of the openai engine's HTTP side alone: which client, and the engine itself.

Against bench_upstream.py's mock upstream (``tests/upstream_fakes.FaultyUpstream``, 20 one-token
chunks and a usage chunk per stream) in its own process on one core, this process on another runs
``--requests`` chat-completion requests at 1 and 16 concurrent (keep-alive pool) through:

- ``httpx``: ``AsyncClient.send(stream=True)`` + ``aiter_lines`` (what the engine used before);
- ``aiohttp-lines``: an ``aiohttp.ClientSession``, the body read line by line (``async for``);
- ``aiohttp``: the same session, the body read as it arrives and split into lines here (the engine's
  ``EventStream``);
- ``aiohttp-whole``: a non-streamed request and its whole JSON answer (what a non-stream upstream
  call would cost; the engine always streams);
- ``engine``: ``OpenAIEngine.generate`` itself (request body, SSE, chunk translation, usage).

Every payload is parsed with orjson in every client, so the difference is the HTTP side. It prints
this process's CPU ms per request (user + system over the measured requests, after a warm-up).

    python benchmarks/bench_http_clients.py [--requests 2000] [--clients httpx,aiohttp,engine]

The machine may be shared: CPU ms per request is the figure to trust.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_upstream import start_mock

CLIENTS = ("httpx", "aiohttp-lines", "aiohttp", "aiohttp-whole", "engine")
STREAM = json.dumps(
    {"model": "ok", "messages": [{"role": "user", "content": "Hello"}], "stream": True}
).encode()
WHOLE = json.dumps({"model": "ok", "messages": [{"role": "user", "content": "Hello"}]}).encode()
HEADERS = {"Content-Type": "application/json"}

One = Callable[[], Awaitable[None]]


def _payload(line: bytes) -> None:
    if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
        orjson.loads(line[5:])


async def make(name: str, base: str) -> tuple[One, Callable[[], Awaitable[None]]]:
    """(one request, close) for client ``name`` against the upstream at ``base`` (…/v1)."""
    url = f"{base}/chat/completions"
    if name == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        hc = httpx.AsyncClient(limits=limits, trust_env=False)

        async def one_httpx() -> None:
            response = await hc.send(
                hc.build_request("POST", url, content=STREAM, headers=HEADERS), stream=True
            )
            async for line in response.aiter_lines():
                _payload(line.encode())
            await response.aclose()

        return one_httpx, hc.aclose
    if name == "engine":
        from qwen_gateway.engines.base import ChatMessage, GenerationRequest, SamplingParams
        from qwen_gateway.engines.openai.engine import OpenAIEngine
        from qwen_gateway.engines.openai.options import OpenAIModelConfig

        config = OpenAIModelConfig(id="qwen-plus", engine="openai", base_url=base, upstream_model="ok")
        engine = OpenAIEngine(config)
        await engine.start()
        request = GenerationRequest(
            "bench", "qwen-plus", (ChatMessage("user", "Hello"),), SamplingParams(max_tokens=100)
        )

        async def one_engine() -> None:
            async for _ in engine.generate(request):
                pass

        return one_engine, engine.aclose
    from qwen_gateway.engines.openai.http import EventStream, session

    s = session(max_connections=256, connect_timeout=5.0, headers={})

    async def one_lines() -> None:
        async with s.post(url, data=STREAM, headers=HEADERS) as response:
            async for line in response.content:
                _payload(line)

    async def one_events() -> None:
        async with s.post(url, data=STREAM, headers=HEADERS) as response:
            events = EventStream(response.content)
            while await events.next() is not None:
                pass

    async def one_whole() -> None:
        async with s.post(url, data=WHOLE, headers=HEADERS) as response:
            orjson.loads(await response.read())

    one = {"aiohttp-lines": one_lines, "aiohttp": one_events, "aiohttp-whole": one_whole}[name]
    return one, s.close


async def measure(name: str, base: str, clients: int, total: int) -> float:
    one, close = await make(name, base)

    async def run(n: int) -> None:
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await one()

        await asyncio.gather(*(worker() for _ in range(clients)))

    try:
        await run(max(100, total // 10))  # warm-up: connections open, caches warm
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        await run(total)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await close()
    return (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / total * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", default=",".join(CLIENTS), help=f"some of {','.join(CLIENTS)}")
    parser.add_argument("--repeat", type=int, default=1)
    cores = sorted(os.sched_getaffinity(0))
    parser.add_argument("--client-core", type=int, default=cores[0])
    parser.add_argument("--mock-core", type=int, default=cores[-1])
    args = parser.parse_args()
    mock = start_mock(args.mock_core, Path(tempfile.mkdtemp(prefix="qwgw-http-clients-")))
    os.sched_setaffinity(0, {args.client_core})
    base = f"http://127.0.0.1:{mock.port}/v1"
    print(f"client on core {args.client_core}, mock on core {args.mock_core}, load {os.getloadavg()[0]:.2f}")
    try:
        for _ in range(args.repeat):
            for name in args.clients.split(","):
                figures = [asyncio.run(measure(name, base, c, args.requests)) for c in (1, 16)]
                print(f"{name:14s} cpu ms/req  c=1 {figures[0]:6.3f}  c=16 {figures[1]:6.3f}", flush=True)
    finally:
        mock.stop()


if __name__ == "__main__":
    main()
