"""Sequential refusals against a full engine (HOLD streams on a batch of HOLD, no queue) over one
keep-alive raw socket: the server loop thread's CPU per refusal (from /proc) and the latency a client
that costs almost nothing sees. A measurement tool. From the repository root:

    N=1000 HOLD=1 PYTHONPATH=. python benchmarks/overload_probe/refuse_profile.py

SPY=<file> py-spy records the server meanwhile (BURST_SPY_BIN names py-spy). With HOLD > 1 a stream
of random weights may end early and free a slot (the run then stops at its 200).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, os.getcwd())
from tests.support import MODELS, start_server

CONFIG = """
[[models]]
id = "qwen-plus"
path = "{path}"
max_batch_size = {hold}
max_queue = 0
max_output = 8000
"""
N = int(os.environ.get("N", "1000"))


def main():
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        cfg = home / "config.toml"
        HOLD = int(os.environ.get("HOLD", "1"))
        cfg.write_text(CONFIG.format(path=MODELS / "tiny-qwen2.5", hold=HOLD))
        server = start_server(home, "--config", str(cfg), "--log-level", "warning")
        try:
            port = int(server.base_url.rsplit(":", 1)[1])
            body = json.dumps(
                {
                    "model": "qwen-plus",
                    "messages": [{"role": "user", "content": "Tell me a story."}],
                    "max_tokens": 64,
                    "temperature": 1.0,
                    "seed": 3,
                }
            ).encode()
            req = (
                f"POST /compatible-mode/v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {server.api_key}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            ).encode() + body
            hold = httpx.Client(timeout=600)
            ctxs = [
                hold.stream(
                    "POST",
                    server.base_url + "/compatible-mode/v1/chat/completions",
                    json={
                        "model": "qwen-plus",
                        "messages": [{"role": "user", "content": "Hi"}],
                        "stream": True,
                        "max_tokens": 8000,
                        "temperature": 1.0,
                        "seed": 1,
                    },
                    headers={"Authorization": f"Bearer {server.api_key}"},
                )
                for _ in range(HOLD)
            ]
            for ctx in ctxs:
                r = ctx.__enter__()
                it = r.iter_lines()
                next(it)
            pid = server.proc.pid
            tid = pid  # the main thread runs the loop

            def cpu():
                with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                    f = fh.read().rsplit(")", 1)[1].split()
                return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def one():
                s.sendall(req)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    buf += s.recv(65536)
                head, _, rest = buf.partition(b"\r\n\r\n")
                n = int(
                    next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(
                        b":"
                    )[1]
                )
                while len(rest) < n:
                    rest += s.recv(65536)
                assert head.startswith(b"HTTP/1.1 503"), head[:40]

            for _ in range(50):
                one()
            spy = None
            if os.environ.get("SPY"):
                spy = subprocess.Popen(
                    [
                        os.environ.get("BURST_SPY_BIN", "py-spy"),
                        "record",
                        "-p",
                        str(pid),
                        "-r",
                        "200",
                        "--gil",
                        "-f",
                        "raw",
                        "-o",
                        os.environ["SPY"],
                        "-d",
                        "120",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1)

            def threads():
                out = {}
                for t in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{t}/stat") as fh:
                        st = fh.read()
                    name = st[st.index("(") + 1 : st.rindex(")")]
                    f = st.rsplit(")", 1)[1].split()
                    out[(t, name)] = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
                return out

            th0 = threads()
            c0, t0, lat = cpu(), time.perf_counter(), []
            for _ in range(N):
                a = time.perf_counter()
                one()
                lat.append(time.perf_counter() - a)
            c1, t1 = cpu(), time.perf_counter()
            th1 = threads()
            print(
                "server threads' CPU over the run (s):",
                {
                    k[1] + ":" + k[0]: round(th1[k] - th0.get(k, 0), 2)
                    for k in th1
                    if th1[k] - th0.get(k, 0) > 0.01
                },
                f"wall {t1 - t0:.2f}s",
            )
            if spy:
                spy.send_signal(2)
                spy.wait()
            lat.sort()
            print(
                f"{N} sequential refusals: server loop thread CPU {(c1 - c0) / N * 1000:.3f} ms each; "
                f"client-seen latency p50 {lat[N // 2] * 1000:.2f} ms p99 {lat[int(N * 0.99)] * 1000:.2f}; wall {(t1 - t0) / N * 1000:.2f} ms each"
            )
            for ctx in ctxs:
                ctx.__exit__(None, None, None)
        finally:
            server.stop()


main()
