"""Graceful shutdown through the real server (issue 6, case 4): SIGTERM and SIGINT alike stop accepting,
give running requests the grace period, then end each stream with an in-band error and ``[DONE]``;
every request keeps its ledger row with the tokens it really used, and the process exits 0.
"""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support import MODELS, Server, start_server, wait_for

STREAMS = 10

CONFIG = """
[server]
shutdown_grace_seconds = 1.0

# Long answers, and a batch that holds every stream of the test at once.
[[models]]
id = "qwen-turbo"
path = "{qwen25}"
max_output = 4096
max_batch_size = 16
"""


def serve(tmp_path: Path) -> Server:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(qwen25=MODELS / "tiny-qwen2.5"))
    return start_server(tmp_path / "home", "--config", str(config))


@dataclass
class StreamClient:
    server: Server
    index: int
    started: threading.Event = field(default_factory=threading.Event)
    lines: list[str] = field(default_factory=list)
    request_id: str = ""
    failure: BaseException | None = None

    def run(self) -> None:
        body = {
            "model": "qwen-turbo",
            "messages": [{"role": "user", "content": f"stream {self.index}"}],
            "stream": True,
            "max_tokens": 4000,
            "stream_options": {"include_usage": True},
        }
        try:
            with httpx.stream(
                "POST",
                f"{self.server.compat_url}/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {self.server.api_key}"},
                timeout=120,
            ) as r:
                self.request_id = r.headers["x-request-id"]
                for line in r.iter_lines():
                    if not line:
                        continue
                    self.lines.append(line)
                    if '"content":"' in line and '"content":""' not in line:
                        self.started.set()
        except BaseException as exc:
            self.failure = exc
        finally:
            self.started.set()

    def payloads(self) -> list[dict]:
        return [json.loads(line[len("data: ") :]) for line in self.lines if line.startswith("data: {")]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_streams_ends_each_in_band_with_its_usage_and_exits_0(
    tmp_path: Path, sig: signal.Signals
) -> None:
    server = serve(tmp_path)
    try:
        clients = [StreamClient(server, i) for i in range(STREAMS)]
        threads = [threading.Thread(target=c.run) for c in clients]
        for t in threads:
            t.start()
        # Signal once every stream is generating (each has received answer text).
        for c in clients:
            assert c.started.wait(timeout=180), f"stream {c.index} never started"
        server.proc.send_signal(sig)
        for t in threads:
            t.join(timeout=120)
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()

    log = server.log()
    assert "Traceback" not in log and "CancelledError" not in log
    for c in clients:
        assert c.failure is None, c.failure
        assert c.lines[-1] == "data: [DONE]", c.lines[-3:]
        payloads = c.payloads()
        error = payloads[-1]
        assert error["error"]["code"] == "ServiceUnavailable" and error["request_id"] == c.request_id
        # The usage chunk just before the error is what the client is told it spent...
        usage = payloads[-2]["usage"]
        assert payloads[-2]["choices"] == [] and usage["completion_tokens"] > 0
        # ... and exactly what the ledger charged.
        (row,) = server.ledger(c.request_id)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        # One clean log line per stopped request.
        assert (
            sum(
                c.request_id in line and "stopped by the server's shutdown" in line
                for line in log.splitlines()
            )
            == 1
        )
    assert "qwen-gateway stopped" in log


@pytest.mark.slow
def test_sigterm_when_idle_exits_0(tmp_path: Path) -> None:
    server = serve(tmp_path)
    try:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
    log = server.log()
    assert "Traceback" not in log
    # Nothing after the last line of ours (native extensions' teardown reports, e.g. nanobind's).
    assert log.rstrip().endswith("qwen-gateway stopped"), log[-2000:]


def test_a_second_ctrl_c_exits_0_without_a_traceback(tmp_path: Path) -> None:
    """The second SIGINT skips the grace period (the server's docstring), not the wrap-up: the running
    stream still ends in-band, and the exit is clean."""
    server = serve(tmp_path)
    client = StreamClient(server, 0)
    thread = threading.Thread(target=client.run)
    try:
        thread.start()
        # A running stream holds the server in its grace period between the two signals.
        assert client.started.wait(timeout=180), "the stream never started"
        server.proc.send_signal(signal.SIGINT)
        wait_for(lambda: "received SIGINT" in server.log(), "the first SIGINT to be seen", 60)
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=60) == 0
        thread.join(timeout=120)
    finally:
        server.stop()
    # Ended in-band at a token boundary (error event, [DONE]) even so, and ledgered.
    assert client.failure is None and client.lines[-1] == "data: [DONE]", client.lines[-3:]
    assert len(server.ledger(client.request_id)) == 1
    log = server.log()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    assert log.rstrip().endswith("qwen-gateway stopped"), log[-2000:]


@pytest.mark.slow
def test_a_non_stream_call_cut_by_shutdown_answers_503_and_keeps_its_row(tmp_path: Path) -> None:
    server = serve(tmp_path)
    result: dict[str, httpx.Response] = {}
    stream = StreamClient(server, 0)
    try:

        def call() -> None:
            result["r"] = httpx.post(
                f"{server.compat_url}/chat/completions",
                json={
                    "model": "qwen-turbo",
                    "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": 4000,
                },
                headers={"Authorization": f"Bearer {server.api_key}"},
                timeout=120,
            )

        # A stream beside it shows when the engine is generating; then the non-stream call is too.
        threads = [threading.Thread(target=stream.run), threading.Thread(target=call)]
        for t in threads:
            t.start()
        assert stream.started.wait(timeout=180)
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=120)
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
    r = result["r"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "ServiceUnavailable"
    (row,) = server.ledger(r.headers["x-request-id"])
    assert row["status"] in ("cancelled", "error")
    assert "Traceback" not in server.log()
