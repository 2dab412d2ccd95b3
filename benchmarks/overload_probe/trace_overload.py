"""bench_overload's scenario (httpx burst) with per-request client timestamps joined to the server probe's.

A measurement tool, not a benchmark of record: it monkeypatches the server (sitecustomize.py beside it)
to timestamp accept, first byte, head, body, route, the capacity check and the 503 written, and reads
each thread's CPU and run-queue wait from /proc. Run from the repository root:

    BURST_PROBE_OUT=/tmp/probe.jsonl PYTHONPATH=benchmarks/overload_probe:. \
        python benchmarks/overload_probe/trace_overload.py [--warm]

Optional: BURST_SWITCH=<seconds> (the server's GIL switch interval), BURST_NICE=<n> (nice the
inference thread), BURST_SPY=gil|idle with BURST_SPY_OUT=<file> (py-spy record the server; BURST_SPY_BIN
names py-spy). ``--warm`` opens the surplus connections before the burst.
"""

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, os.getcwd())
from benchmarks.bench_overload import CONFIG
from tests.support import MODELS, start_server

mono = time.monotonic


def sched(pid):
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as fh:
                run, wait, _ = fh.read().split()
        except OSError:
            continue
        out[t] = (int(run) / 1e6, int(wait) / 1e6)
    return out


SERVER_PID = [0]


async def run(base, key, clients, max_tokens, fill, warm):
    body = {
        "model": "qwen-plus",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": 3,
    }
    rows = []
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def one(kind):
            t0 = mono()
            tr = {}

            async def trace(name, info):
                tr[name] = mono()

            r = await client.post(
                "/compatible-mode/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
                extensions={"trace": trace},
            )
            rows.append(
                {
                    "kind": kind,
                    "c0": t0,
                    "c1": mono(),
                    "status": r.status_code,
                    "rid": r.headers["x-request-id"],
                    "tr": tr,
                }
            )

        capacity = [asyncio.create_task(one("fill")) for _ in range(fill)]
        while True:
            m = (await client.get("/health")).json()["models"][0]
            if m["queued"] >= m["queue_limit"] or all(t.done() for t in capacity):
                break
            await asyncio.sleep(0.02)
        if warm:
            # open the surplus' connections first (a request to /health each), so the burst reuses them
            await asyncio.gather(*(client.get("/health") for _ in range(clients - fill)))

        def cq():
            with open("/proc/thread-self/schedstat") as fh:
                return int(fh.read().split()[1]) / 1e9

        fill_s0 = sched(SERVER_PID[0])
        fill_t0 = mono()
        await asyncio.sleep(0.3)
        fill_s1 = sched(SERVER_PID[0])
        fill_t1 = mono()
        burst0 = mono()
        cpu0 = time.thread_time()
        q0 = cq()
        s0 = sched(SERVER_PID[0])
        await asyncio.gather(*(one("burst") for _ in range(clients - fill)))
        s1 = sched(SERVER_PID[0])
        w = (mono() - burst0) * 1000

        def show(label, a, b, wall):
            rows_ = sorted(((b[t][0] - a[t][0], b[t][1] - a[t][1], t) for t in b if t in a), reverse=True)
            print(
                f"server threads over {label} ({wall:.0f} ms): "
                + ", ".join(f"tid {t}: run {r:.0f} wait {q:.0f}" for r, q, t in rows_ if r + q > 1)
            )

        show("300 ms of full load before the burst", fill_s0, fill_s1, (fill_t1 - fill_t0) * 1000)
        show("the burst", s0, s1, w)

        def nice(t):
            try:
                return open(f"/proc/{SERVER_PID[0]}/task/{t}/stat").read().rsplit(")", 1)[1].split()[16]
            except OSError:
                return "?"

        print(
            "server main (loop) thread tid",
            SERVER_PID[0],
            "nice:",
            {t: nice(t) for t in s1 if s1[t][0] - s0.get(t, (0, 0))[0] > 1 or t == str(SERVER_PID[0])},
        )
        print(
            f"client over the burst: wall {(mono() - burst0) * 1000:.1f} ms, CPU {(time.thread_time() - cpu0) * 1000:.1f} ms "
            f"({(time.thread_time() - cpu0) * 1000 / (clients - fill):.2f} per request), runqueue {(cq() - q0) * 1000:.1f} ms"
        )
        for _ in range(20):
            if all(t.done() for t in capacity):
                break
            await one("single")
        await asyncio.gather(*capacity)
    return rows, burst0


def main():
    clients, batch, queue, mt = 64, 8, 16, 64
    warm = "--warm" in sys.argv
    out = Path(os.environ["BURST_PROBE_OUT"])
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        cfg = home / "config.toml"
        cfg.write_text(CONFIG.format(path=MODELS / "tiny-qwen2.5", batch=batch, queue=queue))
        server = start_server(home, "--config", str(cfg), "--log-level", "warning")
        spy = None
        if os.environ.get("BURST_SPY"):
            import subprocess

            spy = subprocess.Popen(
                [
                    os.environ.get("BURST_SPY_BIN", "py-spy"),
                    "record",
                    "-p",
                    str(server.proc.pid),
                    "-r",
                    "400",
                    "--threads",
                    "--nonblocking",
                    "--gil" if os.environ["BURST_SPY"] == "gil" else "--idle",
                    "-f",
                    "raw",
                    "-o",
                    os.environ["BURST_SPY_OUT"],
                    "-d",
                    "30",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        SERVER_PID[0] = server.proc.pid
        try:
            rows, burst0 = asyncio.run(run(server.base_url, server.api_key, clients, mt, batch + queue, warm))
        finally:
            if spy is not None:
                spy.send_signal(2)
                spy.wait()
            server.stop()
    srv = {}
    lags = []
    for line in out.read_text().splitlines():
        d = json.loads(line)
        if "rid" in d:
            srv[d["rid"]] = d
        elif "lag" in d:
            lags.append(d)
        else:
            print("server:", d)
    burst = [r for r in rows if r["kind"] == "burst" and r["status"] == 503]

    def ms(x):
        return f"{statistics.median(x) * 1000:7.1f} {max(x) * 1000:7.1f}"

    order = [
        "c0",
        "c_conn0",
        "c_conn1",
        "accept",
        "first_byte",
        "c_sent",
        "head",
        "msg",
        "app",
        "auth0",
        "auth1",
        "route",
        "body",
        "refuse_check",
        "start",
        "written",
        "c_hdr",
        "c1",
    ]
    names = {
        "c_conn0": "connection.connect_tcp.started",
        "c_conn1": "connection.connect_tcp.complete",
        "c_sent": "http11.send_request_body.complete",
        "c_hdr": "http11.receive_response_headers.complete",
    }
    since_c0 = {k: [] for k in order}
    since_b = {k: [] for k in order}
    srv_span = []
    for r in burst:
        s = srv[r["rid"]]
        t = {"c0": r["c0"], "c1": r["c1"]}
        for k, n in names.items():
            if n in r["tr"]:
                t[k] = r["tr"][n]
        for k in order:
            if s.get(k) is not None and k not in t:
                t[k] = s[k]
        for k, v in t.items():
            since_c0[k].append(v - r["c0"])
            since_b[k].append(v - burst0)
        srv_span.append(s["written"] - (s.get("first_byte") or s["msg"]))
    print(
        f"burst 503s: {len(burst)}; ms since the request's own start (c0) and since the burst began: p50 / max"
    )
    for k in order:
        if since_c0[k]:
            print(f"  {k:13s} n={len(since_c0[k]):2d}  own {ms(since_c0[k])}   burst {ms(since_b[k])}")
    print("  server first byte -> 503 written:", ms(srv_span))
    ss = [srv[r["rid"]] for r in burst]
    a = min((x for x in ss if x.get("k0")), key=lambda x: x["k0"][0])["k0"]
    b = max(ss, key=lambda x: x["k1"][0])["k1"]
    W, C, Q, S = (b[i] - a[i] for i in range(4))
    print(
        f"  loop thread over the burst (first byte of the first .. last 503 written): wall {W * 1000:.1f} ms = "
        f"CPU {C * 1000:.1f} + runqueue {Q * 1000:.1f} + idle in select, GIL reacquire after epoll included {S * 1000:.1f} + other waits (GIL elsewhere) {(W - C - Q - S) * 1000:.1f};"
        f" CPU per refusal {C * 1000 / len(burst):.2f} ms"
    )
    single = [r for r in rows if r["kind"] == "single" and r["status"] == 503]
    if single:
        print("single 503 client ms p50/max", ms([r["c1"] - r["c0"] for r in single]))
        ks = [srv[r["rid"]] for r in single if srv[r["rid"]].get("k0")]
        print(
            "single 503 server loop CPU first byte..written ms p50/max",
            ms([k["k1"][1] - k["k0"][1] for k in ks]),
            " wall",
            ms([k["k1"][0] - k["k0"][0] for k in ks]),
            " runqueue",
            ms([k["k1"][2] - k["k0"][2] for k in ks]),
        )
    bl = [g for g in lags if burst0 - 0.05 <= g["at"] <= burst0 + 0.5]
    print("loop lags >4ms during burst window:", [round(g["lag"] * 1000, 1) for g in bl])
    print("all loop lags >4ms: n", len(lags), "max", round(max([g["lag"] for g in lags] or [0]) * 1000, 1))


main()
