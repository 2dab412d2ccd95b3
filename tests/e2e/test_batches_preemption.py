"""Batch lines and live traffic through the real server, on SQLite and PostgreSQL: a live request
preempts the batch lines running in its model's engine (they go back to pending, are charged nothing and
run again once the model is idle); a line over its key's rate limit waits and completes; the ``/v1``
alias and ``after`` pagination of the list; a server that is still running takes over the batch of a
process that died (gone from ``gateway_instances``).

Preemptions are observed through the server's own signals (the ``/metrics`` counter, the lines'
``attempts`` in the database), never through timings.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.databases import BACKENDS, database_for
from tests.e2e.test_batches import (
    BATCH_DEADLINE,
    MICRO,
    TIMEOUT,
    Gw,
    _charges,
    _half_price,
    _jsonl,
    _line,
    _submit,
    _upload,
    _wait_status,
    query,
)
from tests.support import MODELS, start_server, start_servers, wait_for

# qwen-max: long answers (48 tokens), only for the preemption test, so that its metrics are that
# test's alone. qwen-plus: short lines. qwen-turbo: long live streams, only for the tests of lines held
# back while one runs.
CONFIG = """
[[models]]
id = "qwen-turbo"
path = "{path}"
max_output = 4000
input_price = 1.0
output_price = 2.0

[[models]]
id = "qwen-max"
path = "{path}"
max_output = 48
temperature = 0.0
input_price = 1.0
output_price = 2.0

[[models]]
id = "qwen-plus"
path = "{path}"
max_output = 8
temperature = 0.0
input_price = 1.0
output_price = 2.0

[batches]
concurrency = 2
poll_seconds = 0.5
idle_seconds = 0.5
"""


# Random weights rarely emit EOS: this stream runs for seconds, far longer than the checks made while
# it runs (each test proves it afterwards: closed by the client, its ledger row says "cancelled").
LONG_STREAM = {
    "model": "qwen-turbo",
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "stream": True,
    "max_tokens": 4000,
    "temperature": 1.0,
    "seed": 1,
}


def _config(home: Path, server: str = "") -> Path:
    """The config file; ``server``: lines of a ``[server]`` table."""
    config = home / "config.toml"
    table = f"[server]\n{server}\n" if server else ""
    config.write_text(table + CONFIG.format(path=MODELS / "tiny-qwen2.5"))
    return config


@pytest.fixture(scope="module", params=BACKENDS)
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    with database_for(str(request.param)) as url:
        home = tmp_path_factory.mktemp(f"preempt-{request.param}")
        server = start_server(home, "--config", str(_config(home)), database_url=url)
        try:
            yield Gw(server, url)
        finally:
            server.stop()


def _status(gw: Gw, batch_id: str) -> str:
    """The batch's status as stored (no API call: the checks run while the worker is busy)."""
    return str(gw.query("SELECT status FROM batches WHERE id = ?", batch_id)[0][0])


def _metric(gw: Gw, name: str, model: str) -> float:
    text = httpx.get(f"{gw.server.base_url}/metrics", timeout=TIMEOUT).text
    match = re.search(rf'^{name}\{{model="{model}"\}} (\S+)$', text, re.MULTILINE)
    return 0.0 if match is None else float(match.group(1))


def test_a_live_request_preempts_running_batch_lines_which_finish_later(gw: Gw, tmp_path: Path) -> None:
    # Limited (a large rpm), so that its rate window is kept: a preempted attempt leaves it.
    key, key_id = gw.new_key("--balance", "100", "--rpm", "1000")
    live_key, _ = gw.new_key()
    client = gw.client(key)
    live = gw.client(live_key)
    lines = [_line(f"p-{i}", model="qwen-max") for i in range(4)]
    batch = _submit(client, tmp_path, lines)

    def status() -> str:
        return _status(gw, batch.id)

    def most_attempts() -> int:
        return int(gw.query("SELECT max(attempts) FROM batch_lines WHERE batch_id = ?", batch.id)[0][0] or 0)

    # Live requests, each sent while batch lines are in qwen-max's engine (its active generations: no
    # live request runs then), until a line was preempted twice (started a third time: preempted lines
    # are pending again, and pending lines are taken in line order). Bounded: a line may end between the
    # look and the request.
    before = _metric(gw, "qwen_gateway_batch_lines_preempted_total", "qwen-max")
    for _ in range(40):
        if most_attempts() >= 3:
            break
        wait_for(
            lambda: (
                _metric(gw, "qwen_gateway_active_generations", "qwen-max") > 0 or status() != "in_progress"
            ),
            "batch lines in the engine",
            timeout=BATCH_DEADLINE,
        )
        if status() != "in_progress":
            break
        answer = live.chat.completions.create(
            model="qwen-max", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        assert answer.choices[0].message.content is not None
    assert most_attempts() >= 3
    # Counted when the live requests were admitted.
    assert _metric(gw, "qwen_gateway_batch_lines_preempted_total", "qwen-max") - before >= 2

    # Live traffic pauses: every line, preempted or not, finishes once.
    done = _wait_status(client, batch.id, "completed", "failed")
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (4, 4, 0)
    assert done.output_file_id is not None and done.error_file_id is None
    outputs = _jsonl(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == [f"p-{i}" for i in range(4)]
    assert all(o["response"]["body"]["usage"]["completion_tokens"] == 48 for o in outputs)
    charges = _charges(gw, batch.id)
    assert len(charges) == 4 and len({c[0] for c in charges}) == 4
    assert all(c[1] == "ok" and c[4] == _half_price(c[2], c[3]) for c in charges)
    # The preempted attempts left nothing: no ledger row but the four charges, no hold, the balance
    # lost exactly the charges, and the key's rate window counts only the attempts that finished.
    assert gw.query("SELECT count(*) FROM usage_ledger WHERE key_id = ?", key_id)[0][0] == 4
    assert gw.query("SELECT count(*) FROM holds WHERE key_id = ?", key_id)[0][0] == 0
    balance = gw.query("SELECT balance_micro FROM api_keys WHERE id = ?", key_id)[0][0]
    assert balance == 100 * MICRO - sum(c[4] for c in charges)
    counted = gw.query("SELECT coalesce(sum(requests), 0) FROM rate_windows WHERE key_id = ?", key_id)
    assert counted[0][0] <= 4, counted


def _first_data(stream: httpx.Response) -> Iterator[str]:
    """Read up to the stream's first data line; the caller keeps the iterator until it closes the
    stream (a line iterator dropped closes the connection, and so ends the request)."""
    assert stream.status_code == 200, stream.read()
    lines = stream.iter_lines()
    assert any(line.startswith("data: ") for line in lines)
    return lines


def _live_status(gw: Gw, request_id: str) -> str:
    def row() -> list[tuple[Any, ...]]:
        return gw.query("SELECT status FROM usage_ledger WHERE request_id = ?", request_id)

    wait_for(lambda: bool(row()), "the live request's ledger row")
    return str(row()[0][0])


def test_no_line_starts_while_a_live_request_runs_on_its_model(gw: Gw, tmp_path: Path) -> None:
    key, _ = gw.new_key("--balance", "100")
    live_key, _ = gw.new_key()
    client = gw.client(key)
    with gw.http(live_key) as live, live.stream("POST", "/chat/completions", json=LONG_STREAM) as stream:
        _kept = _first_data(stream)  # the request runs while this is kept
        lines = [_line(f"w-{i}", model="qwen-turbo", max_tokens=4) for i in range(3)]
        batch = _submit(client, tmp_path, lines)
        # The worker took the lines (validated, a task each up to its concurrency) and holds them back.
        wait_for(
            lambda: _metric(gw, "qwen_gateway_batch_lines_waiting", "qwen-turbo") >= 2,
            "batch lines held back",
            timeout=BATCH_DEADLINE,
        )
        # Not started at all: no attempt counted, nothing "running" in the database.
        rows = gw.query("SELECT state, attempts FROM batch_lines WHERE batch_id = ?", batch.id)
        assert sorted(rows) == [("pending", 0)] * 3, rows
    # Closed by the client while it generated: it ran throughout the looks above.
    assert _live_status(gw, stream.headers["x-request-id"]) == "cancelled"
    done = _wait_status(client, batch.id, "completed", "failed")
    assert done.status == "completed", done
    rows = gw.query("SELECT state, attempts FROM batch_lines WHERE batch_id = ?", batch.id)
    assert sorted(rows) == [("done", 1)] * 3, rows
    assert _metric(gw, "qwen_gateway_batch_lines_waiting", "qwen-turbo") == 0


def test_a_preempted_line_waits_until_the_live_request_has_ended(gw: Gw, tmp_path: Path) -> None:
    key, _ = gw.new_key("--balance", "100")
    live_key, _ = gw.new_key()
    client = gw.client(key)
    lines = [_line(f"q-{i}", model="qwen-turbo", max_tokens=100) for i in range(2)]
    batch = _submit(client, tmp_path, lines)

    def status() -> str:
        return _status(gw, batch.id)

    def running() -> int:
        sql = "SELECT count(*) FROM batch_lines WHERE batch_id = ? AND state = 'running'"
        return int(gw.query(sql, batch.id)[0][0])

    before = _metric(gw, "qwen_gateway_batch_lines_preempted_total", "qwen-turbo")
    live_id = None
    with gw.http(live_key) as live:
        # Bounded: a line may end between the look and the live request.
        for _ in range(40):
            wait_for(
                lambda: (
                    _metric(gw, "qwen_gateway_active_generations", "qwen-turbo") > 0
                    or status() != "in_progress"
                ),
                "batch lines in the engine",
                timeout=BATCH_DEADLINE,
            )
            if status() != "in_progress":
                break
            with live.stream("POST", "/chat/completions", json=LONG_STREAM) as stream:
                _kept = _first_data(stream)  # the request runs while this is kept
                if _metric(gw, "qwen_gateway_batch_lines_preempted_total", "qwen-turbo") == before:
                    continue
                # The preempted lines went back to pending and their tasks hold them there: no line
                # runs again, none was started a second time.
                wait_for(
                    lambda: (
                        _metric(gw, "qwen_gateway_batch_lines_waiting", "qwen-turbo") >= 1 and running() == 0
                    ),
                    "the preempted lines back to pending, held back",
                )
                attempts = gw.query("SELECT attempts FROM batch_lines WHERE batch_id = ?", batch.id)
                assert max(a[0] for a in attempts) == 1, attempts
                live_id = stream.headers["x-request-id"]
                break
    assert live_id is not None, "no batch line was preempted"
    assert _live_status(gw, live_id) == "cancelled"
    # Once the model is idle again, the preempted lines run from the start and complete.
    done = _wait_status(client, batch.id, "completed", "failed")
    assert done.status == "completed", done
    attempts = gw.query("SELECT attempts FROM batch_lines WHERE batch_id = ?", batch.id)
    assert max(a[0] for a in attempts) == 2, attempts


def test_a_batch_in_the_end_of_its_window_no_longer_gives_way(gw: Gw, tmp_path: Path) -> None:
    key, _ = gw.new_key("--balance", "100")
    live_key, _ = gw.new_key()
    client = gw.client(key)
    lines = [_line(f"u-{i}", model="qwen-turbo", max_tokens=300) for i in range(2)]

    def lines_now() -> list[tuple[Any, ...]]:
        return sorted(gw.query("SELECT state, attempts FROM batch_lines WHERE batch_id = ?", batch.id))

    before = _metric(gw, "qwen_gateway_batch_lines_preempted_total", "qwen-turbo")
    with gw.http(live_key) as live, live.stream("POST", "/chat/completions", json=LONG_STREAM) as stream:
        _kept = _first_data(stream)  # the request runs while this is kept
        batch = _submit(client, tmp_path, lines)
        wait_for(
            lambda: _metric(gw, "qwen_gateway_batch_lines_waiting", "qwen-turbo") >= 2,
            "batch lines held back",
            timeout=BATCH_DEADLINE,
        )
        # Created 300 hours ago: 24 of its 324 hours are left, under a tenth. The worker's next pass
        # over the batches sees it, and its lines start beside the live stream.
        created = datetime.now(UTC) - timedelta(hours=300)
        stored: object = created if gw.database_url else created.replace(tzinfo=None).isoformat(" ")
        gw.query("UPDATE batches SET created_at = ? WHERE id = ?", stored, batch.id)
        wait_for(lambda: lines_now() == [("running", 1)] * 2, "both lines running", timeout=BATCH_DEADLINE)
        # A live request admitted now preempts neither (each is 300 tokens long, the request 2).
        answer = gw.client(live_key).chat.completions.create(
            model="qwen-turbo", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        assert answer.choices[0].message.content is not None
        assert lines_now() == [("running", 1)] * 2
    assert _live_status(gw, stream.headers["x-request-id"]) == "cancelled"
    assert _metric(gw, "qwen_gateway_batch_lines_preempted_total", "qwen-turbo") == before
    done = _wait_status(client, batch.id, "completed", "failed")
    assert done.status == "completed", done
    assert lines_now() == [("done", 1)] * 2


def test_cancel_with_preempted_lines_ends_cancelled(gw: Gw, tmp_path: Path) -> None:
    key, key_id = gw.new_key("--balance", "100")
    live_key, _ = gw.new_key()
    client = gw.client(key)
    live = gw.client(live_key)
    lines = [_line(f"x-{i}", model="qwen-max") for i in range(6)]
    batch = _submit(client, tmp_path, lines)
    before = _metric(gw, "qwen_gateway_batch_lines_preempted_total", "qwen-max")
    for _ in range(40):
        wait_for(
            lambda: _metric(gw, "qwen_gateway_active_generations", "qwen-max") > 0,
            "batch lines in the engine",
            timeout=BATCH_DEADLINE,
        )
        # Streamed, and cancelled while the live request runs: the preempted lines are pending then.
        with live.chat.completions.create(
            model="qwen-max", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True
        ) as stream:
            next(iter(stream))
            if _metric(gw, "qwen_gateway_batch_lines_preempted_total", "qwen-max") > before:
                client.batches.cancel(batch.id)
                break
    else:
        pytest.fail("no batch line was preempted")
    done = _wait_status(client, batch.id, "cancelled")
    counts = done.request_counts
    assert counts is not None and counts.total == 6 and counts.completed + counts.failed == 6
    assert counts.failed >= 1
    assert done.error_file_id is not None
    assert {e["error"]["code"] for e in _jsonl(client, done.error_file_id)} == {"batch_cancelled"}
    charges = _charges(gw, batch.id)
    assert len(charges) == counts.completed and all(c[1] == "ok" for c in charges)
    assert gw.query("SELECT count(*) FROM holds WHERE key_id = ?", key_id)[0][0] == 0
    assert gw.query("SELECT count(*) FROM usage_ledger WHERE key_id = ?", key_id)[0][0] == counts.completed


def test_a_line_over_the_rate_limit_goes_back_to_pending_then_completes(gw: Gw, tmp_path: Path) -> None:
    # Two requests a minute, one taken by a live request: of the two lines started together, one is
    # admitted and the other refused, to wait until the live request's second leaves the key's window.
    # That second is moved back in the database (as if the request had come `age` s earlier), so the
    # wait is 60 - age seconds instead of a whole minute (the lines start within the batch runner's
    # 0.5 s poll, well inside the first 5 s). Should the lines start only after the moved second has
    # left the window (a very busy machine), neither is refused: the scenario runs again on a fresh
    # key with less moved, down to nothing (a full minute's wait, which cannot be missed).
    for age in (55, 45, 30, 0):
        if _refused_line_completes(gw, tmp_path, age):
            return
    pytest.fail("no line was refused by the rate limit")


def _refused_line_completes(gw: Gw, tmp_path: Path, age: int) -> bool:
    """The scenario above; False if no line was refused (the moved second had left the window)."""
    key, key_id = gw.new_key("--balance", "100", "--rpm", "2")
    client = gw.client(key)
    live = client.chat.completions.create(
        model="qwen-plus", messages=[{"role": "user", "content": "Hi"}], max_tokens=1
    )
    assert live.choices[0].message.content is not None
    (second,) = [r[0] for r in gw.query("SELECT second FROM rate_windows WHERE key_id = ?", key_id)]
    gw.query("UPDATE rate_windows SET second = ? WHERE key_id = ?", second - age, key_id)
    batch = _submit(client, tmp_path, [_line("r-0"), _line("r-1")])
    done = _wait_status(client, batch.id, "completed", "failed")
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 0)
    assert done.output_file_id is not None and done.error_file_id is None
    assert sorted(o["custom_id"] for o in _jsonl(client, done.output_file_id)) == ["r-0", "r-1"]
    charges = _charges(gw, batch.id)
    assert len(charges) == 2 and all(c[1] == "ok" and c[4] == _half_price(c[2], c[3]) for c in charges)
    assert gw.query("SELECT count(*) FROM holds WHERE key_id = ?", key_id)[0][0] == 0
    # The two lines and the live request.
    assert gw.query("SELECT count(*) FROM usage_ledger WHERE key_id = ?", key_id)[0][0] == 3
    # The refused line went back to pending and was started again.
    attempts = [r[0] for r in gw.query("SELECT attempts FROM batch_lines WHERE batch_id = ?", batch.id)]
    return max(attempts) >= 2


def test_v1_alias_and_after_pagination(gw: Gw, tmp_path: Path) -> None:
    key, _ = gw.new_key("--balance", "100")
    client = gw.client(key)
    v1 = httpx.Client(
        base_url=f"{gw.server.base_url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT
    )
    body = {
        "input_file_id": _upload(client, tmp_path, [_line("v-0")]),
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    made = []
    for _ in range(3):
        r = v1.post("/batches", json=body)
        assert r.status_code == 200, r.text
        made.append(r.json()["id"])
    # Pages of two, each following the previous page's last id: every batch once, newest first.
    first = v1.get("/batches", params={"limit": 2}).json()
    assert len(first["data"]) == 2 and first["has_more"] is True
    assert first["first_id"] == first["data"][0]["id"] and first["last_id"] == first["data"][-1]["id"]
    second = v1.get("/batches", params={"limit": 2, "after": first["last_id"]}).json()
    assert second["has_more"] is False and len(second["data"]) == 1
    seen = [b["id"] for b in first["data"] + second["data"]]
    assert sorted(seen) == sorted(made) and len(set(seen)) == 3
    everything = [b["id"] for b in v1.get("/batches").json()["data"]]
    assert everything == seen
    # The openai SDK follows the same cursor.
    assert [b.id for b in client.batches.list(limit=1)] == seen
    # Another key's id as the cursor: an empty page.
    other_key, _ = gw.new_key()
    other = gw.http(other_key).get("/batches", params={"after": made[0]}).json()
    assert other["data"] is None and other["has_more"] is False
    for batch_id in made:
        assert _wait_status(client, batch_id, "completed", "failed").status == "completed"
    # The same batch through both prefixes (once it has ended: a running batch's counts move between
    # two reads).
    assert v1.get(f"/batches/{made[0]}").json() == gw.http(key).get(f"/batches/{made[0]}").json()


@pytest.mark.timeout(1200)  # two servers, a kill and the survivor's sweep on a busy 2-core machine
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_running_server_takes_over_the_batch_of_a_dead_one(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with database_for(backend) as url:
        home = tmp_path_factory.mktemp(f"batch-takeover-{backend}")
        # The documented sweep interval, at its shortest: the survivor notices the death within a
        # second or so instead of up to 30 s (the default).
        config = _config(home, "sweep_seconds = 1")
        servers = start_servers(home, 2, "--config", str(config), database_url=url)
        try:
            gw = Gw(servers[0], url)
            key, key_id = gw.new_key("--balance", "100")
            client = gw.client(key)
            lines = [_line(f"t-{i}", model="qwen-max") for i in range(8)]
            batch = _submit(client, home, lines)
            wait_for(
                lambda: query(home, url, "SELECT completed FROM batches WHERE id = ?", batch.id)[0][0] >= 2,
                "two finished lines",
                timeout=BATCH_DEADLINE,
            )
            # Whichever server claimed it dies, with no grace; the other one, still running, sweeps the
            # dead process out of gateway_instances and takes the batch over.
            owner = query(home, url, "SELECT owner FROM batches WHERE id = ?", batch.id)[0][0]
            pid = query(home, url, "SELECT pid FROM gateway_instances WHERE id = ?", owner)[0][0]
            (victim,) = [s for s in servers if s.proc.pid == pid]
            (survivor,) = [s for s in servers if s is not victim]
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(timeout=60)
            before = query(home, url, "SELECT completed FROM batches WHERE id = ?", batch.id)[0][0]
            assert before < 8, before
            gw = Gw(survivor, url)
            client = gw.client(key)
            start = time.monotonic()
            done = _wait_status(client, batch.id, "completed", "failed")
            assert done.status == "completed", (done, time.monotonic() - start)
            assert done.request_counts is not None
            assert (done.request_counts.completed, done.request_counts.failed) == (8, 0)
            new_owner = gw.query("SELECT owner FROM batches WHERE id = ?", batch.id)[0][0]
            assert new_owner != owner
            assert gw.query("SELECT count(*) FROM gateway_instances WHERE id = ?", owner)[0][0] == 0
            assert done.output_file_id is not None
            outputs = _jsonl(client, done.output_file_id)
            assert sorted(o["custom_id"] for o in outputs) == sorted(f"t-{i}" for i in range(8))
            charges = _charges(gw, batch.id)
            assert len(charges) == 8 and all(
                c[1] == "ok" and c[4] == _half_price(c[2], c[3]) for c in charges
            )
            balance = gw.query("SELECT balance_micro FROM api_keys WHERE id = ?", key_id)[0][0]
            assert balance == 100 * MICRO - sum(c[4] for c in charges)
            assert gw.query("SELECT count(*) FROM holds WHERE key_id = ?", key_id)[0][0] == 0
            assert gw.query("SELECT count(*) FROM usage_ledger WHERE key_id = ?", key_id)[0][0] == 8
        finally:
            for server in servers:
                server.stop()
