"""What metering adds per request: a metered key (hold at admission, settlement with the ledger row)
and a metered + rate-limited key against a plain key, on one real server in front of
``zero_cost_engine.py``'s engine (a benchmark fake that costs nothing), so the difference is the money
path alone.

Same harness as ``bench_overhead.py`` (server pinned to one core, load generator to another, raw
keep-alive HTTP/1.1). For 1 and 16 concurrent clients, non-streaming and streaming, the key kinds run
in turn (``--repeat`` rounds, interleaved so drifting machine load hits all kinds alike), and it prints
each run's latency p50/p99 and server CPU per request, then per case the median over rounds of the
p50 and CPU/request added by metering, with the lowest and highest round in brackets. At the end it
checks the money: every metered key's balance change equals the sum of its ledger costs and no hold is
left.

Reading the figures: at 1 client a metered request waits for one more writer round trip than a plain
one (the hold, committed before the engine runs: event loop -> writer thread -> SQL -> commit -> back,
about 0.2 ms on SQLite, most of it the two thread hand-offs and the statements). At 16 clients the
server's one core is saturated, so by Little's law the p50 is about 16 x the CPU per request (divided
by the share of the core the server gets): the added p50 is ~16 x the added CPU, and it moves with
whatever else runs on that core, which is why the rounds' spread is printed.

    python benchmarks/bench_metering.py [--requests 1000] [--single-requests 300] [--repeat 9]
        [--database-url postgresql://user:password@127.0.0.1/dbname]

Without ``--database-url`` the server uses a SQLite file in a fresh home; with it, that (empty,
existing) database, e.g. PostgreSQL's, for the server and the key commands alike.

The machine may be shared: CPU ms per request is the figure to trust; latencies move with whatever
else runs on the cores. ``tx/req`` (ledger-writer transactions per request, from the server's
``/metrics``) does not move with the load at all: each transaction is a commit, a thread hop and a
wake-up of the event loop, and what metering adds of them is what group commit could not share.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import Server, drive, start_server
from harness import BENCH, REPO, gateway_env
from harness import create_key as _create_key
from harness import pct as _pct

KINDS = ("plain", "metered", "metered+limited")


def create_key(home: Path, name: str, *options: str) -> str:
    # Only this checkout and benchmarks/ on the path (not the caller's PYTHONPATH), as before.
    env = {**gateway_env(BENCH), "PYTHONPATH": os.pathsep.join([str(REPO), str(BENCH)])}
    return _create_key(home, name, *options, env=env)


def ledger_transactions(port: int) -> float:
    """The server's ledger-writer transactions so far (``/metrics``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("qwen_gateway_ledger_transactions_total "):
                return float(line.split()[1])
    raise SystemExit("the server's /metrics has no qwen_gateway_ledger_transactions_total")


def measure(
    server: Server, key: str, clients: int, total: int, stream: bool
) -> tuple[float, float, float, float]:
    """(p50 ms, p99 ms, server CPU ms per request, ledger transactions per request) of ``total``
    requests with ``key``."""
    asyncio.run(drive(server.port, key, clients, max(50, total // 10), stream))  # warm-up
    tx0 = ledger_transactions(server.port)
    cpu0 = server.cpu_seconds()
    latencies, _ = asyncio.run(drive(server.port, key, clients, total, stream))
    cpu = server.cpu_seconds() - cpu0
    tx = ledger_transactions(server.port) - tx0
    latencies.sort()
    return _pct(latencies, 0.5) * 1e3, _pct(latencies, 0.99) * 1e3, cpu / total * 1e3, tx / total


def check_money(home: Path, names: list[str], database_url: str | None) -> str:
    url = database_url or f"sqlite:///{home / 'gateway.db'}"
    # Synchronous SQLAlchemy on either database (psycopg 3 for PostgreSQL, as the gateway uses).
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    lines = []
    with engine.connect() as db:
        for name in names:
            key_id, balance = db.execute(
                sa.text("SELECT id, balance_micro FROM api_keys WHERE name = :n"), {"n": name}
            ).one()
            spent, rows = db.execute(
                sa.text("SELECT coalesce(sum(cost_micro), 0), count(*) FROM usage_ledger WHERE key_id = :k"),
                {"k": key_id},
            ).one()
            held = db.execute(sa.text("SELECT count(*) FROM holds WHERE key_id = :k"), {"k": key_id}).scalar()
            start = 10**6 * 10**6
            ok = start - balance == spent and held == 0
            lines.append(
                f"{name}: {rows} rows, spent {spent} µCNY, balance change {start - balance} µCNY, "
                f"open holds {held}: {'OK' if ok else 'MISMATCH'}"
            )
    engine.dispose()
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000, help="requests per 16-client run")
    parser.add_argument("--single-requests", type=int, default=300, help="requests per 1-client run")
    parser.add_argument("--repeat", type=int, default=9, help="rounds of every case and key kind")
    cores = sorted(os.sched_getaffinity(0))
    parser.add_argument("--server-core", type=int, default=cores[0])
    parser.add_argument("--client-core", type=int, default=cores[-1])
    parser.add_argument("--only", choices=["stream", "non-stream"], help="run only these cases")
    parser.add_argument("--database-url", default=None, help="database of the server (default: SQLite file)")
    args = parser.parse_args()
    if args.database_url:
        # Every subprocess (the server, `keys create`) inherits it.
        os.environ["QWEN_GATEWAY_DATABASE_URL"] = args.database_url
    backend = "SQLite" if not args.database_url else sa.make_url(args.database_url).get_backend_name()
    home = Path(tempfile.mkdtemp(prefix="qwgw-metering-"))
    server = start_server(home, args.server_core, "warning")
    keys = {
        "plain": server.key,
        # One million CNY: never refused during the run.
        "metered": create_key(home, "bench-metered", "--balance", "1000000"),
        "metered+limited": create_key(
            home, "bench-limited", "--balance", "1000000", "--rpm", "10000000", "--tpm", "1000000000000"
        ),
    }
    os.sched_setaffinity(0, {args.client_core})
    print(
        f"server pid {server.proc.pid} on core {args.server_core}, client on core {args.client_core}, "
        f"zero-cost engine, {backend}, load {os.getloadavg()[0]:.2f} (shared machine: trust CPU/request)"
    )
    streams = [False, True] if args.only is None else [args.only == "stream"]
    results: dict[tuple[bool, int, str], list[tuple[float, float, float, float]]] = {}
    try:
        for round_ in range(args.repeat):
            # Each round starts with another kind, so that none is always measured first (right after
            # the other case's runs) and drifting load is shared out evenly.
            order = KINDS[round_ % len(KINDS) :] + KINDS[: round_ % len(KINDS)]
            for stream in streams:
                for clients in (1, 16):
                    total = args.requests if clients > 1 else args.single_requests
                    for kind in order:
                        p50, p99, cpu, tx = measure(server, keys[kind], clients, total, stream)
                        results.setdefault((stream, clients, kind), []).append((p50, p99, cpu, tx))
                        print(
                            f"{'stream' if stream else 'non-stream':10s} clients={clients:<3d} n={total:<5d} "
                            f"{kind:16s} p50={p50:7.2f} ms  p99={p99:7.2f} ms  cpu/req={cpu:5.2f} ms  "
                            f"tx/req={tx:4.2f}",
                            flush=True,
                        )
    finally:
        code = server.stop()
        print(f"server exit status {code}; log {home / 'server.log'}")
    print("\nadded by metering (median over rounds, vs the plain key):")
    for stream in streams:
        for clients in (1, 16):
            base = results[(stream, clients, "plain")]
            for kind in KINDS[1:]:
                runs = results[(stream, clients, kind)]
                p50s = [r[0] - b[0] for r, b in zip(runs, base, strict=True)]
                cpus = [r[2] - b[2] for r, b in zip(runs, base, strict=True)]
                txs = [r[3] - b[3] for r, b in zip(runs, base, strict=True)]
                # The spread over rounds says how far the median can be trusted on this machine.
                print(
                    f"  {'stream' if stream else 'non-stream':10s} clients={clients:<3d} {kind:16s} "
                    f"p50 {statistics.median(p50s):+6.2f} ms ({min(p50s):+.2f}..{max(p50s):+.2f})  "
                    f"cpu/req {statistics.median(cpus):+5.2f} ms ({min(cpus):+.2f}..{max(cpus):+.2f})  "
                    f"tx/req {statistics.median(txs):+4.2f}"
                )
    print(check_money(home, ["bench-metered", "bench-limited"], args.database_url))


if __name__ == "__main__":
    main()
