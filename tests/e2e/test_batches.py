"""The Batch API through the real server, with the openai SDK exactly as against DashScope, on SQLite and
PostgreSQL: a batch of 20 lines charged at half price, a bad line failing alone, cancel, another key's
batch, validation, and a server SIGKILLed half-way through a batch and restarted on the same database.

Every wait is on a real signal (the batch's status through the API, a count of finished lines in the
database), bounded far above the expected time.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.databases import BACKENDS, database_for
from tests.searx_fake import FakeSearxng
from tests.support import MODELS, Server, create_key, start_server, wait_for

# qwen-plus: greedy and short (every line costs the same: the random-weight model runs to max_tokens).
# qwen-turbo: longer answers, for a batch still running when it is cancelled or killed.
CONFIG = """
[[models]]
id = "qwen-plus"
path = "{path}"
max_output = 8
temperature = 0.0
input_price = 1.0
output_price = 2.0

[[models]]
id = "qwen-turbo"
path = "{path}"
max_output = 48
temperature = 0.0
input_price = 1.0
output_price = 2.0

[batches]
concurrency = 2
poll_seconds = 0.5

[search]
provider = "searxng"
url = "{searx}"
"""
TIMEOUT = 120.0
# Far above a batch's expected time on a busy 2-core machine.
BATCH_DEADLINE = 600.0
MICRO = 1_000_000


@dataclass
class Gw:
    server: Server
    database_url: str | None

    def new_key(self, *options: str) -> tuple[str, str]:
        name = f"k-{time.monotonic_ns()}"
        key = create_key(self.server.home, name, *options, database_url=self.database_url)
        return key, str(self.query("SELECT id FROM api_keys WHERE name = ?", name)[0][0])

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(api_key=key, base_url=self.server.compat_url, timeout=TIMEOUT, max_retries=0)

    def http(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.compat_url, headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT
        )

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return query(self.server.home, self.database_url, sql, *args)


def query(home: Path, database_url: str | None, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows straight from the server's database (``?`` placeholders)."""
    if database_url is None:
        with sqlite3.connect(home / "gateway.db", timeout=30) as db:
            return list(db.execute(sql, args))
    import psycopg

    with psycopg.connect(database_url) as conn:
        cursor = conn.execute(sql.replace("?", "%s"), args)
        return [] if cursor.description is None else [tuple(r) for r in cursor.fetchall()]


def _config(home: Path, searx_url: str = "http://127.0.0.1:9") -> Path:
    config = home / "config.toml"
    config.write_text(CONFIG.format(path=MODELS / "tiny-qwen2.5", searx=searx_url))
    return config


@pytest.fixture(scope="module")
def searx() -> Iterator[FakeSearxng]:
    fake = FakeSearxng()
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture(scope="module", params=BACKENDS)
def gw(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, searx: FakeSearxng
) -> Iterator[Gw]:
    with database_for(str(request.param)) as url:
        home = tmp_path_factory.mktemp(f"batches-{request.param}")
        server = start_server(home, "--config", str(_config(home, searx.url)), database_url=url)
        try:
            yield Gw(server, url)
        finally:
            server.stop()


def _line(custom_id: str, model: str = "qwen-plus", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"Say {custom_id}."}], **body},
    }


def _upload(client: openai.OpenAI, tmp: Path, lines: list[dict[str, Any]]) -> str:
    path = tmp / f"input-{time.monotonic_ns()}.jsonl"
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return client.files.create(file=path, purpose="batch").id


def _submit(client: openai.OpenAI, tmp: Path, lines: list[dict[str, Any]]) -> Any:
    """A batch of ``lines`` for the chat endpoint, in the 24 h window, as a client makes one."""
    return client.batches.create(
        input_file_id=_upload(client, tmp, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )


def _wait_status(client: openai.OpenAI, batch_id: str, *statuses: str) -> Any:
    found: list[Any] = []

    def done() -> bool:
        batch = client.batches.retrieve(batch_id)
        found[:] = [batch]
        return batch.status in statuses

    wait_for(done, f"batch {batch_id} to be {statuses}", timeout=BATCH_DEADLINE)
    return found[0]


def _jsonl(client: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line]


def _charges(db: Gw | tuple[Path, str | None], batch_id: str) -> list[tuple[Any, ...]]:
    """(request id, status, prompt, completion, cost, endpoint) of the batch's lines' ledger rows."""
    sql = (
        "SELECT u.request_id, u.status, u.prompt_tokens, u.completion_tokens, u.cost_micro, u.endpoint"
        " FROM usage_ledger u JOIN batch_lines l ON l.request_id = u.request_id WHERE l.batch_id = ?"
    )
    if isinstance(db, Gw):
        return db.query(sql, batch_id)
    return query(db[0], db[1], sql, batch_id)


def _half_price(prompt: int, completion: int) -> int:
    # 1 and 2 CNY per 1K tokens = 1000 and 2000 µCNY per token; half, rounded up once.
    return -(-(prompt * 1000 + completion * 2000) // 2)


# -- the whole path ------------------------------------------------------------------------------


def test_batch_of_twenty_completes_with_twenty_outputs_charged_at_half_price(gw: Gw, tmp_path: Path) -> None:
    key, key_id = gw.new_key("--balance", "100")
    client = gw.client(key)
    lines = [_line(f"req-{i}") for i in range(20)]
    input_id = _upload(client, tmp_path, lines)
    metadata = {"ds_name": "测试任务", "ds_description": "任务描述"}
    batch = client.batches.create(
        input_file_id=input_id, endpoint="/v1/chat/completions", completion_window="24h", metadata=metadata
    )
    assert batch.id.startswith("batch_") and batch.object == "batch"
    assert batch.status == "validating" and batch.metadata == metadata
    assert batch.request_counts is not None and batch.request_counts.total == 0
    raw = gw.http(key).get(f"/batches/{batch.id}").json()
    # The captures' keys, in their order.
    assert list(raw) == [
        "id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
        "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at",
        "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts",
        "metadata",
    ]  # fmt: skip

    done = _wait_status(client, batch.id, "completed", "failed")
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
        20,
        20,
        0,
    )
    assert done.error_file_id is None and done.output_file_id is not None
    assert done.output_file_id.startswith("file-batch_output-")
    assert done.in_progress_at and done.finalizing_at and done.completed_at

    outputs = _jsonl(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"req-{i}" for i in range(20))
    for out in outputs:
        assert out["error"] is None and out["response"]["status_code"] == 200
        assert out["response"]["request_id"] == out["id"]
        body = out["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "qwen-plus"
        assert body["usage"]["completion_tokens"] == 8

    charges = _charges(gw, batch.id)
    assert len(charges) == 20 and len({c[0] for c in charges}) == 20
    assert {c[0] for c in charges} == {o["id"] for o in outputs}
    for _rid, status, prompt, completion, cost, endpoint in charges:
        assert (status, endpoint) == ("ok", "batch.chat.completions")
        assert cost == _half_price(prompt, completion)
    balance = gw.query("SELECT balance_micro FROM api_keys WHERE id = ?", key_id)[0][0]
    assert balance == 100 * MICRO - sum(c[4] for c in charges)
    assert gw.query("SELECT count(*) FROM holds WHERE key_id = ?", key_id)[0][0] == 0

    # The output file is a file of the key's: retrievable, listed under its id.
    assert client.files.retrieve(done.output_file_id).bytes > 0
    # List, with the reference's filters.
    assert [b.id for b in client.batches.list()] == [batch.id]
    assert [b.id for b in client.batches.list(extra_query={"status": "completed,cancelled"})] == [batch.id]
    assert [b.id for b in client.batches.list(extra_query={"input_file_ids": input_id})] == [batch.id]
    assert [b.id for b in client.batches.list(extra_query={"ds_name": "任务"})] == [batch.id]
    assert list(client.batches.list(extra_query={"ds_name": "其他"})) == []
    empty = gw.http(key).get("/batches", params={"status": "failed"}).json()
    assert empty == {"object": "list", "data": None, "first_id": None, "last_id": None, "has_more": False}
    assert gw.http(key).get("/batches", params={"create_before": "20000101000000"}).json()["data"] is None


def test_a_bad_line_fails_alone_with_dashscope_error_in_the_error_file(gw: Gw, tmp_path: Path) -> None:
    key, _ = gw.new_key("--balance", "100")
    client = gw.client(key)
    lines = [
        _line("ok-1"),
        _line("bad-temperature", temperature=5),
        _line("no-such-model", model="qwen-nope"),
        _line("ok-2"),
    ]
    batch = client.batches.create(
        input_file_id=_upload(client, tmp_path, lines),
        endpoint="/v1/chat/completions",
        completion_window="1d",
    )
    done = _wait_status(client, batch.id, "completed", "failed")
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (4, 2, 2)
    assert done.output_file_id is not None and done.error_file_id is not None
    assert sorted(o["custom_id"] for o in _jsonl(client, done.output_file_id)) == ["ok-1", "ok-2"]
    errors = {e["custom_id"]: e for e in _jsonl(client, done.error_file_id)}
    assert set(errors) == {"bad-temperature", "no-such-model"}
    bad = errors["bad-temperature"]
    assert bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"] == {
        "message": "Temperature should be in [0.0, 2.0)",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "invalid_parameter_error",
    }
    assert bad["error"] == {
        "code": "invalid_parameter_error",
        "message": "Temperature should be in [0.0, 2.0)",
    }
    missing = errors["no-such-model"]
    assert missing["response"]["status_code"] == 404
    assert missing["response"]["body"]["error"]["code"] == "model_not_found"
    # Only the lines that ran are charged; the refused ones never reached the ledger.
    charges = _charges(gw, batch.id)
    assert len(charges) == 2 and all(c[1] == "ok" for c in charges)


def test_invalid_lines_fail_the_batch_as_dashscope_does(gw: Gw, tmp_path: Path) -> None:
    key, _ = gw.new_key()
    client = gw.client(key)
    lines = [_line("a"), {**_line("b"), "url": "/v1/chat/completion"}]
    batch = _submit(client, tmp_path, lines)
    failed = _wait_status(client, batch.id, "failed", "completed")
    assert failed.status == "failed" and failed.failed_at is not None
    raw = gw.http(key).get(f"/batches/{batch.id}").json()
    assert raw["errors"] == {
        "object": "list",
        "data": [
            {
                "code": "url_not_found",
                "message": "The provided url '/v1/chat/completion' is not supported by the Batch API.",
                "param": "url",
                "line": 2,
            }
        ],
    }
    assert raw["request_counts"] == {"total": 0, "completed": 0, "failed": 0}


def test_create_refusals_name_their_parameter(gw: Gw, tmp_path: Path) -> None:
    key, _ = gw.new_key()
    client = gw.client(key)
    http = gw.http(key)
    input_id = _upload(client, tmp_path, [_line("a")])
    base = {"input_file_id": input_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    cases = [
        ({**base, "endpoint": "/v1/embeddings"}, "endpoint", "not served"),
        ({**base, "endpoint": "/v1/completions"}, "endpoint", "not supported"),
        ({**base, "completion_window": "1h"}, "completion_window", "[24h, 336h]"),
        ({**base, "completion_window": "15d"}, "completion_window", "[24h, 336h]"),
        ({**base, "completion_window": "soon"}, "completion_window", "24h or 14d"),
        ({**base, "metadata": {"ds_name": 3}}, "metadata", "strings"),
        ({**base, "priority": "high"}, "priority", "Unknown parameter"),
        ({k: v for k, v in base.items() if k != "input_file_id"}, "input_file_id", "required"),
    ]
    for body, param, text in cases:
        r = http.post("/batches", json=body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and text in error["message"], (body, error)
        assert error["code"] == "invalid_parameter_error"
    fe = client.files.create(file=("a.txt", b"hello"), purpose="file-extract").id
    r = http.post("/batches", json={**base, "input_file_id": fe})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_file_id"
    r = http.post("/batches", json={**base, "input_file_id": "file-batch-" + "0" * 24})
    assert r.status_code == 404
    assert http.get("/batches", params={"limit": "0"}).status_code == 400
    assert http.get("/batches", params={"status": "done"}).json()["error"]["param"] == "status"
    assert (
        http.get("/batches", params={"create_after": "2026-01-01"}).json()["error"]["param"] == "create_after"
    )


def test_another_keys_batch_is_not_found(gw: Gw, tmp_path: Path) -> None:
    owner_key, _ = gw.new_key()
    other_key, _ = gw.new_key()
    owner, other = gw.client(owner_key), gw.client(other_key)
    batch = owner.batches.create(
        input_file_id=_upload(owner, tmp_path, [_line("a")]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(batch.id)
    assert list(other.batches.list()) == []
    assert list(other.batches.list(extra_query={"input_file_ids": batch.input_file_id})) == []
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve("batch_not-a-uuid")
    done = _wait_status(owner, batch.id, "completed")
    assert done.output_file_id is not None
    with pytest.raises(openai.NotFoundError):
        other.files.content(done.output_file_id)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(done.output_file_id)


def test_cancel_stops_new_lines_and_ends_cancelled(gw: Gw, tmp_path: Path) -> None:
    key, _ = gw.new_key("--balance", "100")
    client = gw.client(key)
    lines = [_line(f"c-{i}", model="qwen-turbo") for i in range(40)]
    batch = _submit(client, tmp_path, lines)
    # A real signal: the first line's result is in the database.
    wait_for(
        lambda: gw.query("SELECT completed FROM batches WHERE id = ?", batch.id)[0][0] >= 1,
        "a first finished line",
        timeout=BATCH_DEADLINE,
    )
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    done = _wait_status(client, batch.id, "cancelled")
    assert done.cancelled_at is not None and done.completed_at is None
    counts = done.request_counts
    assert counts is not None and counts.total == 40
    assert counts.completed + counts.failed == 40 and counts.failed >= 1 and counts.completed >= 1
    assert done.error_file_id is not None
    errors = _jsonl(client, done.error_file_id)
    assert len(errors) == counts.failed
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    outputs = _jsonl(client, done.output_file_id) if done.output_file_id else []
    assert len(outputs) == counts.completed
    # Lines finished before the cancellation are charged; the others are not.
    assert len(_charges(gw, batch.id)) == counts.completed
    # Cancelling again says where it stands; a finished batch can't be cancelled.
    assert client.batches.cancel(batch.id).status == "cancelled"


def test_lines_not_run_when_the_window_ends_fail_as_expired(gw: Gw, tmp_path: Path) -> None:
    key, _ = gw.new_key("--balance", "100")
    client = gw.client(key)
    lines = [_line(f"e-{i}", model="qwen-turbo") for i in range(40)]
    batch = _submit(client, tmp_path, lines)
    wait_for(
        lambda: gw.query("SELECT completed FROM batches WHERE id = ?", batch.id)[0][0] >= 1,
        "a first finished line",
        timeout=BATCH_DEADLINE,
    )
    # The window is at least 24 hours: its end is brought forward in the database instead of waited for.
    gw.query("UPDATE batches SET deadline = created_at WHERE id = ?", batch.id)
    done = _wait_status(client, batch.id, "expired", "completed")
    assert done.status == "expired" and done.expired_at is not None and done.completed_at is None
    counts = done.request_counts
    assert counts is not None and counts.completed + counts.failed == 40 and counts.failed >= 1
    assert done.error_file_id is not None
    assert {e["error"]["code"] for e in _jsonl(client, done.error_file_id)} == {"batch_expired"}
    assert len(_charges(gw, batch.id)) == counts.completed


def test_file_deleted_from_disk_before_content_is_sent_is_a_404(gw: Gw) -> None:
    key, _ = gw.new_key()
    client = gw.client(key)
    file = client.files.create(file=("gone.jsonl", json.dumps(_line("a")).encode() + b"\n"), purpose="batch")
    # The moment of the race: the row is still found, the bytes are gone.
    (gw.server.home / "files" / file.id).unlink()
    r = gw.http(key).get(f"/files/{file.id}/content")
    assert r.status_code == 404, r.text
    assert r.json()["error"]["message"] == f"File [id:{file.id}] cannot be found."


# -- a server killed half-way --------------------------------------------------------------------


@pytest.mark.timeout(1200)  # two server starts and a batch on a busy 2-core machine
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_half_way_resumes_without_running_or_charging_a_line_twice(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with database_for(backend) as url:
        home = tmp_path_factory.mktemp(f"batch-kill-{backend}")
        config = _config(home)
        server = start_server(home, "--config", str(config), database_url=url)
        try:
            gw = Gw(server, url)
            key, key_id = gw.new_key("--balance", "100")
            client = gw.client(key)
            lines = [_line(f"k-{i}", model="qwen-turbo") for i in range(20)]
            batch = _submit(client, home, lines)
            # Half-way: a real count of finished lines in the database, then no grace at all.
            wait_for(
                lambda: gw.query("SELECT completed FROM batches WHERE id = ?", batch.id)[0][0] >= 8,
                "eight finished lines",
                timeout=BATCH_DEADLINE,
            )
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(timeout=60)
        finally:
            server.stop()
        before = gw.query("SELECT completed FROM batches WHERE id = ?", batch.id)[0][0]
        assert 8 <= before < 20, before

        server = start_server(home, "--config", str(config), database_url=url, log_name="server-2.log")
        try:
            gw = Gw(server, url)
            client = gw.client(key)
            done = _wait_status(client, batch.id, "completed", "failed")
            assert done.status == "completed", done
            assert done.request_counts is not None
            assert (done.request_counts.completed, done.request_counts.failed) == (20, 0)
            assert done.output_file_id is not None
            outputs = _jsonl(client, done.output_file_id)
            assert len(outputs) == 20
            assert sorted(o["custom_id"] for o in outputs) == sorted(f"k-{i}" for i in range(20))
            charges = _charges(gw, batch.id)
            assert len(charges) == 20 and len({c[0] for c in charges}) == 20
            assert all(c[1] == "ok" and c[4] == _half_price(c[2], c[3]) for c in charges)
            # Money adds up: the balance lost exactly the 20 charges, no hold is left open.
            balance = gw.query("SELECT balance_micro FROM api_keys WHERE id = ?", key_id)[0][0]
            assert balance == 100 * MICRO - sum(c[4] for c in charges)
            assert gw.query("SELECT count(*) FROM holds WHERE key_id = ?", key_id)[0][0] == 0
            # Every ledger row of the key is one of the lines' charges (no expired leftover).
            assert gw.query("SELECT count(*) FROM usage_ledger WHERE key_id = ?", key_id)[0][0] == 20
        finally:
            server.stop()


@pytest.mark.timeout(1200)  # two server starts and a batch on a busy 2-core machine
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_graceful_stop_puts_running_lines_back_and_the_next_start_finishes(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with database_for(backend) as url:
        home = tmp_path_factory.mktemp(f"batch-stop-{backend}")
        config = _config(home)
        server = start_server(home, "--config", str(config), database_url=url)
        try:
            gw = Gw(server, url)
            key, key_id = gw.new_key("--balance", "100")
            client = gw.client(key)
            batch = _submit(client, home, [_line(f"s-{i}", model="qwen-turbo") for i in range(12)])
            wait_for(
                lambda: gw.query("SELECT completed FROM batches WHERE id = ?", batch.id)[0][0] >= 3,
                "three finished lines",
                timeout=BATCH_DEADLINE,
            )
        finally:
            server.stop()  # SIGINT: the server's own shutdown
        assert server.proc.returncode == 0, server.log()
        # Nothing is left running or held by the stopped server.
        sql = "SELECT count(*) FROM batch_lines WHERE batch_id = ? AND state = 'running'"
        assert gw.query(sql, batch.id)[0][0] == 0, server.log()
        assert gw.query("SELECT count(*) FROM holds WHERE key_id = ?", key_id)[0][0] == 0, server.log()

        server = start_server(home, "--config", str(config), database_url=url, log_name="server-2.log")
        try:
            gw = Gw(server, url)
            done = _wait_status(gw.client(key), batch.id, "completed", "failed")
            assert done.status == "completed" and done.request_counts is not None
            assert done.request_counts.completed == 12
            charges = _charges(gw, batch.id)
            assert len(charges) == 12 and all(c[1] == "ok" for c in charges)
            assert gw.query("SELECT count(*) FROM usage_ledger WHERE key_id = ?", key_id)[0][0] == 12
        finally:
            server.stop()


def test_a_batch_line_with_enable_search_is_searched_once_admitted(
    gw: Gw, searx: FakeSearxng, tmp_path: Path
) -> None:
    """A line runs the live request's whole path, web search included: planned before admission,
    searched once admitted (the results go into its prompt, so it counts more prompt tokens than the
    same line without search)."""
    key, _key_id = gw.new_key("--balance", "100")
    client = gw.client(key)
    marker = f"batch-search-{time.monotonic_ns()}"
    content = f"What is new about {marker}?"
    message = [{"role": "user", "content": content}]
    lines = [
        {**_line("searched"), "body": {"model": "qwen-plus", "messages": message, "enable_search": True}},
        {**_line("plain"), "body": {"model": "qwen-plus", "messages": message}},
    ]
    batch = _submit(client, tmp_path, lines)
    done = _wait_status(client, batch.id, "completed", "failed")
    assert done.status == "completed", done
    assert done.output_file_id is not None
    outputs = {o["custom_id"]: o for o in _jsonl(client, done.output_file_id)}
    assert len(searx.requests_for(marker)) == 1  # the searched line only, once
    searched = outputs["searched"]["response"]["body"]["usage"]["prompt_tokens"]
    plain = outputs["plain"]["response"]["body"]["usage"]["prompt_tokens"]
    assert searched > plain
