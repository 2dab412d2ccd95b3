"""Our server on the llama.cpp engine beside llama.cpp's own server, on the same GGUF files, same run.

For each model (default: the embedded SmolLM2-135M Q4_1 GGUF and the tiny Qwen2.5 GGUF) it starts

- ``qwen-gateway serve --model ID=FILE`` (the .gguf goes to the ``llamacpp`` engine by itself), and
- llama.cpp's ``llama-server`` (``--llama-server PATH``, e.g. built from the llama.cpp sources vendored
  in llama-cpp-python's sdist; ``--parallel 4``, continuous batching) and/or llama-cpp-python's
  ``python -m llama_cpp.server`` (``--py-server``; one request at a time),

one after the other (never two at once), and prints for each: load time (process start to a served
request), resident memory after the runs (VmRSS) and its peak (VmHWM), and for 1 and 4 concurrent
streams the aggregate completion tokens/s (wall) and completion tokens per server CPU-second (CPU time
is steadier than wall time on a shared machine). Every request streams the same prompt greedily with
the same ``max_tokens``; tokens are the servers' own usage counts. Both servers keep a finished
request's KV cells and reuse a later prompt's common prefix (llama-server per slot, ours by
``prefix_cache``), so from the second request on the repeated prompt is not prefilled again;
``--fresh-prompts`` starts every request's message with its own number instead, so only the chat
template's shared start (its system prompt) can be reused and each request prefills the rest.

    python benchmarks/bench_llamacpp.py [--llama-server PATH] [--py-server] [--max-tokens 128]
        [--rounds 3] [--kv-cells 8192] [--fresh-prompts] [--model-path FILE ...]

Both servers get the same KV-cache cells (``--kv-cells``), since the cache is allocated at start and is
most of either one's memory. Both are llama.cpp built with OpenMP: on a busy machine its spinning
threads burn CPU while they wait at a barrier, so run both under the same ``OMP_WAIT_POLICY`` (inherited
from this script's environment; see docs/llamacpp.md).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.support import free_port, start_server  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
_requests = itertools.count()


@dataclass
class Target:
    name: str
    base_url: str  # up to /v1 (OpenAI paths appended)
    headers: dict[str, str]
    pid: int
    model: str
    load_s: float
    stop: Any
    # llama-cpp-python's server breaks its stream on stream_options: its chunks (one per token) count.
    usage_in_stream: bool = True


def _proc(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _stream(client: httpx.AsyncClient, target: Target, max_tokens: int, seed: int, fresh: bool) -> int:
    messages = PROMPT
    if fresh:
        messages = [{"role": "user", "content": f"Request {next(_requests)}. {PROMPT[0]['content']}"}]
    body = {
        "model": target.model,
        "messages": messages,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": seed,
    }
    if target.usage_in_stream:
        body["stream_options"] = {"include_usage": True}
    usage = None
    chunks = 0
    async with client.stream("POST", f"{target.base_url}/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            if data.get("choices") and data["choices"][0].get("delta", {}).get("content"):
                chunks += 1
    return int(usage["completion_tokens"]) if usage else chunks


async def _round(
    target: Target, streams: int, max_tokens: int, fresh: bool = False
) -> tuple[int, float, float]:
    async with httpx.AsyncClient(headers=target.headers, timeout=600) as client:
        cpu0, t0 = _cpu(target.pid), time.perf_counter()
        counts = await asyncio.gather(
            *(_stream(client, target, max_tokens, s, fresh) for s in range(streams))
        )
        return sum(counts), time.perf_counter() - t0, _cpu(target.pid) - cpu0


def measure(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"load_s": target.load_s}
    asyncio.run(_round(target, 1, 8, args.fresh_prompts))  # warm-up (first-request costs are not throughput)
    for streams in (1, 4):
        rates, per_cpu, tokens = [], [], []
        for _ in range(args.rounds):
            n, wall, cpu = asyncio.run(_round(target, streams, args.max_tokens, args.fresh_prompts))
            rates.append(n / wall)
            per_cpu.append(n / cpu if cpu > 0 else float("nan"))
            tokens.append(n)
        out[streams] = (statistics.median(rates), statistics.median(per_cpu), statistics.median(tokens))
    out["rss"], out["hwm"] = _proc(target.pid, "VmRSS"), _proc(target.pid, "VmHWM")
    return out


def ours(model_path: Path, home: Path, kv_cells: int) -> Target:
    """Our server on ``model_path``; with ``kv_cells`` its KV cache has that many cells (the room
    llama-server gets), else the engine's default (which may hold more: the RSS differs by the KV)."""
    args = ["--model", f"bench={model_path}"]
    if kv_cells:
        home.mkdir(parents=True, exist_ok=True)
        config = home / "bench.toml"
        config.write_text(
            f'[[models]]\nid = "bench"\npath = {json.dumps(str(model_path))}\nkv_cache_tokens = {kv_cells}\n'
        )
        args = ["--config", str(config)]
    t0 = time.perf_counter()
    server = start_server(home, *args, timeout=900)
    load = time.perf_counter() - t0
    engine = next(m["engine"] for m in httpx.get(f"{server.base_url}/health").json()["models"])
    return Target(
        f"qwen-gateway ({engine})",
        server.compat_url,
        {"Authorization": f"Bearer {server.api_key}"},
        server.proc.pid,
        "bench",
        load,
        server.stop,
    )


def _wait_ready(base: str, proc: subprocess.Popen[bytes], model: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            r = httpx.post(
                f"{base}/chat/completions",
                json={"model": model, "messages": PROMPT, "max_tokens": 1},
                timeout=30,
            )
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server not ready in time")


def _subprocess_target(name: str, cmd: list[str], port: int, log: Path) -> Target:
    t0 = time.perf_counter()
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    _wait_ready(base, proc, "bench", time.monotonic() + 600)
    load = time.perf_counter() - t0

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()

    return Target(name, base, {}, proc.pid, "bench", load, stop, usage_in_stream=False)


def llama_server(binary: Path, model_path: Path, ctx: int, tmp: Path) -> Target:
    port = free_port()
    cmd = [str(binary), "-m", str(model_path), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--parallel", "4", "--ctx-size", str(ctx), "--alias", "bench", "--no-webui"]
    return _subprocess_target("llama-server (--parallel 4)", cmd, port, tmp / "llama-server.log")


def py_server(model_path: Path, ctx: int, tmp: Path) -> Target:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--port", str(port)]
    cmd += ["--n_ctx", str(ctx), "--model_alias", "bench", "--host", "127.0.0.1"]
    return _subprocess_target("llama_cpp.server", cmd, port, tmp / "py-server.log")


def default_models(home: Path) -> list[Path]:
    from qwen_gateway.engines.local.embedded import ensure_embedded_model

    return [ensure_embedded_model(home), REPO.parent / "shared/models/tiny-gguf/tiny-qwen2.5-f16.gguf"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", type=Path, action="append")
    parser.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary")
    parser.add_argument("--py-server", action="store_true", help="also llama-cpp-python's server")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per stream count (median)")
    parser.add_argument("--home", type=Path, default=Path("~/.qwen-gateway").expanduser())
    parser.add_argument(
        "--kv-cells",
        type=int,
        default=8192,
        help="KV-cache cells of both servers (0: our engine's default, llama-server 8192)",
    )
    parser.add_argument(
        "--fresh-prompts",
        action="store_true",
        help="a different message per request (only the template's shared start can be reused)",
    )
    args = parser.parse_args()
    models = args.model_path or default_models(args.home)
    print(f"machine load before: {os.getloadavg()[0]:.2f} (1-min); {os.cpu_count()} CPUs")
    print(f"KV cells: {args.kv_cells or 'our default'}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"prompts: {'a fresh one per request' if args.fresh_prompts else 'the same for every request'}")
    for model_path in models:
        print(
            f"\n== {model_path.name} ({model_path.stat().st_size / 1e6:.0f} MB), max_tokens {args.max_tokens}"
        )
        results: list[tuple[str, dict[str, Any]]] = []
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            # Both get the same KV cells (its cache is most of either server's memory).
            ctx = args.kv_cells or 4 * 2048
            makers: list[tuple[Any, tuple[Any, ...]]] = [(ours, (model_path, tmp / "home", args.kv_cells))]
            if args.llama_server:
                makers.append((llama_server, (args.llama_server, model_path, ctx, tmp)))
            if args.py_server:
                makers.append((py_server, (model_path, 2048, tmp)))
            for make, make_args in makers:
                try:
                    target = make(*make_args)
                except Exception as exc:  # a server that can't start is reported, not fatal
                    print(f"{make.__name__}: could not start: {exc}", flush=True)
                    continue
                try:
                    results.append((target.name, measure(target, args)))
                    print(f"measured {target.name}: {results[-1][1]}", flush=True)
                except Exception as exc:
                    print(f"{target.name}: failed: {exc!r}", flush=True)
                finally:
                    target.stop()
        print(
            f"{'server':<32} {'load s':>6} {'RSS MB':>7} {'peak MB':>7} "
            f"{'1: tok/s':>8} {'tok/CPUs':>8} {'4: tok/s':>8} {'tok/CPUs':>8} {'4/1':>5} {'tokens 1/4':>10}"
        )
        for name, r in results:
            one, four = r[1], r[4]
            print(
                f"{name:<32} {r['load_s']:>6.2f} {r['rss'] / 1e6:>7.0f} {r['hwm'] / 1e6:>7.0f} "
                f"{one[0]:>8.1f} {one[1]:>8.1f} {four[0]:>8.1f} {four[1]:>8.1f} {four[0] / one[0]:>5.2f} "
                f"{one[2]:>4.0f}/{four[2]:<5.0f}"
            )
        if len(results) > 1:
            base = results[0][1]
            for name, r in results[1:]:
                print(
                    f"ours / {name}: 1 stream {base[1][0] / r[1][0]:.0%} (per CPU-s {base[1][1] / r[1][1]:.0%}), "
                    f"4 streams {base[4][0] / r[4][0]:.0%} (per CPU-s {base[4][1] / r[4][1]:.0%})"
                )
    print(f"\nmachine load after: {os.getloadavg()[0]:.2f} (1-min; shared machine: wall figures are noisy)")


if __name__ == "__main__":
    main()
