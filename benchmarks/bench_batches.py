"""Interactive latency with and without a batch running, on the real server and the tiny Qwen checkpoint.

Starts ``qwen-gateway serve`` (tiny-qwen2.5, ``max_batch_size`` 8, ``[batches] concurrency`` as given),
then sends ``--requests`` interactive chat requests one after another (``max_tokens`` 16, greedy) and
prints their latency p50/p99:

1. with no batch, back to back, then each after the same pause as in 3. (the control for 3.: what a
   pause alone costs, an engine gone idle and cold caches, with no batch at all);
2. back to back while a batch of ``--lines`` lines (``max_tokens`` 64 each) is in progress: they start
   once the first batch line has finished (a count in the database) and stop when the batch ends or
   the requests are all sent; the printout says how many batch lines finished meanwhile (steady live
   traffic holds new batch lines back: ``[batches] idle_seconds``);
3. the worst case: each request sent only once batch lines run again (``idle_seconds`` after the last
   live request, and a line ``running`` in the database), so it shares the engine with batch work
   (``--arrivals`` of them).

Also printed: how many batch lines live requests preempted (cancelled in the engine and put back to
pending, ``qwen_gateway_batch_lines_preempted_total``), and CPU seconds of the server process over
each phase (``/proc/<pid>/stat``), since the machine may be shared and wall-clock latencies move with
whatever else runs on the cores.

    python benchmarks/bench_batches.py [--requests 40] [--lines 60] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import MODELS, start_server

CONFIG = """
[[models]]
id = "qwen-plus"
path = "{path}"
max_batch_size = 8
temperature = 0.0

[batches]
concurrency = {concurrency}
poll_seconds = 0.5
idle_seconds = {idle}
"""
IDLE_SECONDS = 1.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def interactive(client: httpx.Client, count: int, stop: object = None) -> list[float]:
    body = {
        "model": "qwen-plus",
        "messages": [{"role": "user", "content": "Say something short."}],
        "max_tokens": 16,
    }
    out: list[float] = []
    for _ in range(count):
        if callable(stop) and stop():
            break
        start = time.perf_counter()
        r = client.post("/chat/completions", json=body)
        r.raise_for_status()
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--lines", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--arrivals", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        config = home / "config.toml"
        config.write_text(
            CONFIG.format(path=MODELS / "tiny-qwen2.5", concurrency=args.concurrency, idle=IDLE_SECONDS)
        )
        server = start_server(home, "--config", str(config), "--log-level", "warning")
        db = home / "gateway.db"

        def completed(batch_id: str) -> tuple[int, str]:
            with sqlite3.connect(db, timeout=30) as conn:
                row = conn.execute(
                    "SELECT completed, status FROM batches WHERE id = ?", (batch_id,)
                ).fetchone()
            return int(row[0]), str(row[1])

        try:
            client = httpx.Client(
                base_url=server.compat_url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=600
            )
            interactive(client, 5)  # warm-up
            cpu0 = cpu_seconds(server.proc.pid)
            alone = interactive(client, args.requests)
            cpu_alone = cpu_seconds(server.proc.pid) - cpu0
            # The control for phase 3: the same pause before each request, with no batch at all, so
            # what the pause alone costs (an engine gone idle, cold caches) is not put on the batch.
            paused: list[float] = []
            for _ in range(args.arrivals):
                time.sleep(IDLE_SECONDS + 0.5)
                paused += interactive(client, 1)

            lines = "".join(
                json.dumps(
                    {
                        "custom_id": f"b-{i}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {
                            "model": "qwen-plus",
                            "messages": [{"role": "user", "content": f"Write about {i}."}],
                            "max_tokens": 64,
                        },
                    }
                )
                + "\n"
                for i in range(args.lines)
            )
            upload = client.post(
                "/files", files={"file": ("in.jsonl", lines.encode())}, data={"purpose": "batch"}
            )
            upload.raise_for_status()
            batch = client.post(
                "/batches",
                json={
                    "input_file_id": upload.json()["id"],
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                },
            ).json()
            deadline = time.monotonic() + 600
            while completed(batch["id"])[0] < 1:
                assert time.monotonic() < deadline, "the batch did not start"
                time.sleep(0.05)
            first = completed(batch["id"])[0]
            cpu0 = cpu_seconds(server.proc.pid)
            during = interactive(
                client, args.requests, stop=lambda: completed(batch["id"])[1] != "in_progress"
            )
            cpu_during = cpu_seconds(server.proc.pid) - cpu0
            finished, status = completed(batch["id"])

            def running() -> int:
                with sqlite3.connect(db, timeout=30) as conn:
                    sql = "SELECT count(*) FROM batch_lines WHERE batch_id = ? AND state = 'running'"
                    return int(conn.execute(sql, (batch["id"],)).fetchone()[0])

            shared: list[float] = []
            for _ in range(args.arrivals):
                # Past the worker's idle wait after the last live request, batch lines are in the
                # engine again (a line is 'running' in the database from its start).
                time.sleep(IDLE_SECONDS + 0.5)
                while running() == 0 and completed(batch["id"])[1] == "in_progress":
                    time.sleep(0.02)
                if completed(batch["id"])[1] != "in_progress":
                    break
                shared += interactive(client, 1)
            metrics = httpx.get(f"{server.base_url}/metrics", timeout=60).text
            preempted = sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("qwen_gateway_batch_lines_preempted_total{")
            )
        finally:
            server.stop()
    print(f"machine: {os.cpu_count()} CPUs, shared with other work (wall-clock figures are noisy)")
    print(f"batch: {args.lines} lines of 64 tokens, [batches] concurrency {args.concurrency}, engine batch 8")
    print(
        f"interactive alone:        n={len(alone):3d}  p50 {statistics.median(alone):7.1f} ms  "
        f"p99 {pct(alone, 0.99):7.1f} ms  server CPU {cpu_alone:.2f} s"
    )
    print(
        f"interactive after a pause, no batch: n={len(paused):3d}  p50 {statistics.median(paused):7.1f} ms  "
        f"p99 {pct(paused, 0.99):7.1f} ms"
    )
    if during:
        print(
            f"interactive during batch: n={len(during):3d}  p50 {statistics.median(during):7.1f} ms  "
            f"p99 {pct(during, 0.99):7.1f} ms  server CPU {cpu_during:.2f} s"
        )
    print(f"batch lines preempted by live requests (put back to pending): {preempted:.0f}")
    print(f"batch lines finished during the back-to-back requests: {finished - first} (batch {status})")
    if shared:
        print(
            f"interactive arriving while a batch line runs: n={len(shared):3d}  p50 {statistics.median(shared):7.1f} ms  "
            f"p99 {pct(shared, 0.99):7.1f} ms"
        )


if __name__ == "__main__":
    main()
