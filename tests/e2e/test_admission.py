"""Admission control through the real server: a bounded queue per engine, a fast 503 with
Retry-After past it, /health showing the queue, and a client that hangs up while queued leaving it."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import MODELS, Server, start_server, wait_for

# Two sequences run at once, two more may wait: the fifth concurrent request is refused.
CONFIG = """
[[models]]
id = "qwen-turbo"
engine = "local"
path = "{path}"
max_batch_size = 2
max_queue = 2
max_output = 4000
"""
# Random weights rarely emit EOS: each admitted stream runs for seconds, far longer than the checks.
BODY = {
    "model": "qwen-turbo",
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "stream": True,
    "max_tokens": 4000,
    "temperature": 1.0,
    "seed": 1,
}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("admission-home")
    config = home / "config.toml"
    config.write_text(CONFIG.format(path=MODELS / "tiny-qwen2.5"))
    srv = start_server(home, "--config", str(config))
    yield srv
    srv.stop()


def health(server: Server) -> dict[str, Any]:
    body = httpx.get(f"{server.base_url}/health", timeout=30).json()
    (model,) = body["models"]
    return model  # type: ignore[no-any-return]


def test_past_the_queue_requests_get_503_with_retry_after(small: Server) -> None:
    headers = {"Authorization": f"Bearer {small.api_key}"}
    url = f"{small.compat_url}/chat/completions"
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(httpx.Client(timeout=60, headers=headers))
        admitted: list[httpx.Response] = []
        # Two run; the route sends the headers of the other two after its first-event wait, queued.
        for _ in range(4):
            r = stack.enter_context(client.stream("POST", url, json=BODY))
            assert r.status_code == 200
            admitted.append(r)
        running = [r.iter_lines() for r in admitted[:2]]
        for lines in running:
            assert any(line.startswith("data: ") for line in lines)
        wait_for(lambda: health(small)["queued"] == 2, "two queued requests")
        status = health(small)
        assert status["queue_limit"] == 2
        # Active counts the two running only: the queued two are in `queued`, not in both.
        assert (status["active_generations"], status["queued"]) == (2, 2)

        refused = client.post(url, json=BODY)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "ModelServingError"
        assert "capacity" in error["message"]
        assert small.ledger(refused.headers["x-request-id"]) == []
        # The native protocol's route refuses the same way, in its own shape.
        native = client.post(
            f"{small.base_url}/api/v1/services/aigc/text-generation/generation",
            json={"model": "qwen-turbo", "input": {"prompt": "Hi"}, "parameters": {"max_tokens": 5}},
        )
        assert native.status_code == 503, native.text
        assert native.headers["retry-after"] == "1"
        assert native.json()["code"] == "ModelServingError"
        assert small.ledger(native.headers["x-request-id"]) == []

        # A queued client that hangs up gives its place back at once.
        admitted[3].close()
        wait_for(lambda: health(small)["queued"] == 1, "the hung-up request to leave the queue")
        again = stack.enter_context(client.stream("POST", url, json=BODY))
        assert again.status_code == 200
        admitted.append(again)
        ids = [r.headers["x-request-id"] for r in admitted]
    # Every admitted request, finished or hung up, has exactly one ledger row.
    for rid in ids:
        wait_for(lambda rid=rid: len(small.ledger(rid)) == 1, f"the ledger row of {rid}")
    wait_for(lambda: health(small)["active_generations"] == 0, "the engine to be idle")
    assert health(small)["queued"] == 0


def _nice_of_threads(pid: int) -> dict[str, int]:
    """Each thread's nice value, by thread id (field 19 of /proc/<pid>/task/<tid>/stat)."""
    nice: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/stat") as fh:
            nice[tid] = int(fh.read().rsplit(")", 1)[1].split()[16])
    return nice


@pytest.mark.skipif(sys.platform != "linux", reason="nice is per thread on Linux only")
def test_the_inference_thread_yields_the_cpu_to_the_event_loop(small: Server) -> None:
    # The event loop (the main thread) refuses surplus requests and answers /health; the inference
    # thread runs at a lower priority so that, on busy cores, the loop is not left in the run queue.
    nice = _nice_of_threads(small.proc.pid)
    loop = nice[str(small.proc.pid)]
    assert any(value >= min(19, loop + 10) for tid, value in nice.items() if tid != str(small.proc.pid)), nice
    assert health(small)["state"] == "ready"
