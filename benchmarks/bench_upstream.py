"""Gateway overhead in front of an upstream: direct vs through qwen-gateway vs through LiteLLM's proxy.

One fast mock upstream on loopback (``tests/upstream_fakes.FaultyUpstream`` in its "ok" mode, a raw
asyncio HTTP/1.1 server: 20 one-token chunks and a usage chunk when streaming, a whole JSON answer
otherwise) in its own process. In the same run, alternating case by case, the load generator drives:

- direct: the mock itself;
- qwen-gateway: ``qwen-gateway serve`` with the ``openai`` engine pointed at the mock, one worker,
  keys on (a metered key with a balance and rpm/tpm limits, so limits and metering run), ledger on;
- litellm: LiteLLM's proxy (its own venv, ``--litellm``; a pinned release, 1.109.1 here), one worker,
  master key on, no database (so no spend tracking: it does less work than ours per request).

Each gateway is pinned to its own core (``--gateway-core``); load generator and mock share the other
(``--client-core``). At 1, 4, 16 and 64 concurrent keep-alive connections, streaming and not, it prints
p50/p99 of the whole answer (streams: also time to the first byte of the body), the added p50/p99 over
direct, requests/s and CPU ms per request of the gateway process (/proc utime+stime, all threads).
Then it measures qwen-gateway's RSS before and along 10,000 more requests (``--memory-requests``),
printed every fifth of them. ``--py-spy FILE`` samples qwen-gateway during its 16-client cases.
Process handling and the load generator are ``harness.py``'s, shared with bench_overhead/bench_metering.

    python benchmarks/bench_upstream.py --litellm /work/litellm-venv/bin/litellm [--requests 1000]

The machine may be shared with other work: CPU ms per request is the figure to trust; latencies and
requests/s move with whatever else runs on the cores. Run from the repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from harness import REPO, pct

CHUNKS = 20


@dataclass
class Target:
    name: str
    port: int
    path: str
    key: str
    model: str
    proc: subprocess.Popen[bytes] | None = None

    def cpu_seconds(self) -> float:
        return 0.0 if self.proc is None else harness.cpu_seconds(self.proc.pid)

    def rss_mb(self) -> float:
        assert self.proc is not None
        return harness.rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            harness.stop(self.proc)


def start_mock(core: int, home: Path) -> Target:
    code = (
        "import time; from tests.upstream_fakes import FaultyUpstream as F; "
        f"u = F(tokens={CHUNKS}); u.port = 0; u.start(); print(u.port, flush=True); time.sleep(10**6)"
    )
    log = home / "mock.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=log.open("wb"),
        preexec_fn=harness.pinned(core),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return Target("direct", port, "/v1/chat/completions", "none", "ok", proc)


def start_gateway(core: int, home: Path, upstream: int) -> Target:
    env = harness.gateway_env(harness.BENCH)
    config = home / "config.toml"
    config.write_text(
        f"""
[[models]]
id = "qwen-plus"
engine = "openai"
base_url = "http://127.0.0.1:{upstream}/v1"
upstream_model = "ok"
max_concurrency = 256
max_queue = 1024

# --zero-cost: the same process and key in front of an engine that costs nothing (a benchmark fake),
# so the difference to qwen-plus is what the openai engine costs inside the gateway.
[[models]]
id = "qwen-turbo"
engine = "zero_cost_engine:ZeroCostEngine"
"""
    )
    limits = ("--balance", "1000000", "--rpm", "10000000", "--tpm", "10000000000")
    key = harness.create_key(home, "bench", *limits, env=env)
    proc, port = harness.serve(config, home, core, env=env)
    return Target("qwen-gateway", port, "/compatible-mode/v1/chat/completions", key, "qwen-plus", proc)


def start_litellm(binary: str, core: int, home: Path, upstream: int) -> Target:
    config = home / "litellm.yaml"
    config.write_text(
        f"""model_list:
  - model_name: qwen-plus
    litellm_params:
      model: openai/ok
      api_base: http://127.0.0.1:{upstream}/v1
      api_key: none
general_settings:
  master_key: sk-bench-master
litellm_settings:
  drop_params: true
"""
    )
    port = harness.free_port()
    log = home / "litellm.log"
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen(
        [binary, "--config", str(config), "--port", str(port), "--num_workers", "1"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=harness.pinned(core),
    )
    harness.wait_healthy(f"http://127.0.0.1:{port}/health/liveliness", proc, log)
    return Target("litellm", port, "/v1/chat/completions", "sk-bench-master", "qwen-plus", proc)


def checker(t: Target, stream: bool) -> harness.Check:
    def check(status: int, body: bytes) -> None:
        if status != 200:
            raise SystemExit(f"{t.name} answered {status}: {body[:300]!r}")
        last = b"t19 " if t.model == "qwen-turbo" else b"tok19"
        ok = body.rstrip().endswith(b"data: [DONE]") if stream else last in body
        if not ok:
            raise SystemExit(f"{t.name}: unexpected answer: {body[:300]!r}")

    return check


async def drive(t: Target, clients: int, total: int, stream: bool) -> harness.Run:
    payload = harness.chat_request(t.port, t.path, t.key, t.model, stream=stream)
    return await harness.drive(t.port, payload, clients, total, checker(t, stream))


@dataclass
class Result:
    p50: float
    p99: float
    ttfb50: float
    ttfb99: float
    rps: float
    cpu_ms: float


def run_case(t: Target, clients: int, total: int, stream: bool) -> Result:
    asyncio.run(drive(t, clients, max(clients * 4, total // 10), stream))  # warm-up
    cpu0 = t.cpu_seconds()
    run = asyncio.run(drive(t, clients, total, stream))
    cpu = t.cpu_seconds() - cpu0
    return Result(
        pct(run.latencies, 0.5) * 1e3,
        pct(run.latencies, 0.99) * 1e3,
        pct(run.ttfb, 0.5) * 1e3,
        pct(run.ttfb, 0.99) * 1e3,
        total / run.wall,
        cpu / total * 1e3,
    )


def memory(t: Target, total: int, steps: int = 5) -> None:
    """RSS of the gateway before and along ``total`` more requests (16 clients, non-stream): flat
    means no per-request growth, so each step's figure is printed, not only the ends."""
    before = t.rss_mb()
    marks = [before]
    for _ in range(steps):
        asyncio.run(drive(t, 16, total // steps, False))
        marks.append(t.rss_mb())
    after = marks[-1]
    peak = max(marks)
    print(
        f"qwen-gateway RSS: {before:.1f} MB before, {after:.1f} MB after {total // steps * steps} more "
        f"requests ({(after - before) / before * 100:+.1f} %; peak {(peak - before) / before * 100:+.1f} %); "
        f"every {total // steps}: " + " ".join(f"{m:.1f}" for m in marks)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--litellm", help="path of the litellm proxy executable (its own venv)")
    parser.add_argument("--requests", type=int, default=1000, help="requests per case at c>=4")
    parser.add_argument("--single-requests", type=int, default=300, help="requests per case at c=1")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--memory-requests", type=int, default=10_000)
    cores = sorted(os.sched_getaffinity(0))
    parser.add_argument("--gateway-core", type=int, default=cores[0])
    parser.add_argument("--client-core", type=int, default=cores[-1])
    parser.add_argument(
        "--zero-cost",
        action="store_true",
        help="also drive qwen-gateway's zero-cost model (same process): the engine's share of its CPU",
    )
    parser.add_argument("--py-spy", metavar="FILE", help="sample qwen-gateway during its 16-client cases")
    parser.add_argument("--py-spy-format", default="flamegraph", choices=["flamegraph", "raw", "speedscope"])
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="qwgw-upstream-bench-"))
    mock = start_mock(args.client_core, home)
    targets = [mock, start_gateway(args.gateway_core, home, mock.port)]
    if args.zero_cost:
        ours = targets[1]
        targets.append(Target("zero-cost", ours.port, ours.path, ours.key, "qwen-turbo", ours.proc))
    if args.litellm:
        targets.append(start_litellm(args.litellm, args.gateway_core, home, mock.port))
    os.sched_setaffinity(0, {args.client_core})
    try:
        print(
            f"gateways on core {args.gateway_core}; load generator and mock upstream on core "
            f"{args.client_core}; load average {os.getloadavg()[0]:.2f}; {CHUNKS} chunks per stream"
        )
        header = (
            f"{'mode':10s} {'c':>3s} {'target':13s} {'p50 ms':>8s} {'p99 ms':>8s} {'ttfb50':>8s} "
            f"{'ttfb99':>8s} {'+p50':>7s} {'+p99':>7s} {'+ttfb50':>8s} {'rps':>8s} {'cpu ms/req':>10s}"
        )
        print(header)
        for stream in (False, True):
            for clients in (int(c) for c in args.concurrency.split(",")):
                total = args.single_requests if clients == 1 else args.requests
                results = {}
                for t in targets:  # alternating, case by case
                    spy = None
                    if args.py_spy and t.name == "qwen-gateway" and clients == 16 and t.proc is not None:
                        out = f"{args.py_spy}.{'stream' if stream else 'nonstream'}"
                        spy = harness.py_spy(t.proc.pid, out, args.py_spy_format)
                        time.sleep(1.0)  # py-spy attaches before the load starts
                    results[t.name] = run_case(t, clients, total, stream)
                    if spy is not None:
                        spy.send_signal(signal.SIGINT)
                        spy.wait(timeout=60)
                base = results["direct"]
                for name, r in results.items():
                    added = (
                        ""
                        if name == "direct"
                        else f"{r.p50 - base.p50:7.2f} {r.p99 - base.p99:7.2f} {r.ttfb50 - base.ttfb50:8.2f}"
                    )
                    cpu = "" if name == "direct" else f"{r.cpu_ms:10.2f}"
                    print(
                        f"{'stream' if stream else 'non-stream':10s} {clients:3d} {name:13s} {r.p50:8.2f} "
                        f"{r.p99:8.2f} {r.ttfb50:8.2f} {r.ttfb99:8.2f} {added:>24s} {r.rps:8.1f} {cpu}",
                        flush=True,
                    )
        memory(targets[1], args.memory_requests)
    finally:
        for t in targets:
            t.stop()
        print(f"logs in {home}")


if __name__ == "__main__":
    main()
