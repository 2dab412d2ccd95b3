"""Balances, holds, settlement and rate limits through real servers: two ``qwen-gateway serve``
processes sharing one database (as two workers behind a load balancer), the tiny Qwen checkpoint, real
HTTP clients. Every test makes its own keys and looks only at its own keys' rows.

The database is read directly (SQLAlchemy, sync) for what a client can't see: holds, ledger rows,
balances. Every test runs on SQLite (the home's file) and on PostgreSQL (a database of the module's
own, see tests/databases.py), whose URL is passed to the servers and the CLI.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from qwen_gateway.engines.base import ChatMessage, GenerationRequest, SamplingParams
from qwen_gateway.service.money.estimate import prompt_tokens_bound
from tests.databases import BACKENDS, database_for
from tests.support import MODELS, Server, cli, create_key, start_server, start_servers, wait_for

# The database URL of each home (None: its SQLite file).
_URLS: dict[Path, str | None] = {}


def url_of(home: Path) -> str | None:
    return _URLS.get(home)


# qwen-plus: output-only price and greedy decoding, so every request of one prompt costs exactly the
# same (the random-weight checkpoint runs to max_tokens) and that cost equals its hold.
# qwen-turbo: both prices, long streams. qwen-max: a 64-token context (the engine refuses longer
# prompts before its first token).
CONFIG = """
[[models]]
id = "qwen-plus"
path = "{path}"
max_output = 64
max_queue = 64
temperature = 0.0
input_price = 0.0
output_price = 2.0

[[models]]
id = "qwen-turbo"
path = "{path}"
max_output = 4096
input_price = 1.0
output_price = 2.0

[[models]]
id = "qwen-max"
path = "{path}"
context_length = 64
max_output = 16
input_price = 1.0
output_price = 2.0
"""
PROMPT = [{"role": "user", "content": "Count to ten."}]
MICRO = 1_000_000
# µCNY per token: the prices above are per 1K tokens.
TURBO_IN, TURBO_OUT = 1_000, 2_000
PLUS_OUT = 2_000
BALANCE_HEADER = re.compile(r"^\d+\.\d{4}$")


class Db:
    """Read-only SQL on the servers' database."""

    def __init__(self, home: Path, url: str | None) -> None:
        sync_url = url.replace("+aiosqlite", "") if url else f"sqlite:///{home / 'gateway.db'}"
        # SQLAlchemy's default PostgreSQL driver is psycopg2; the gateway ships psycopg (3).
        sync_url = sync_url.replace("postgresql://", "postgresql+psycopg://", 1)
        self.engine = sa.create_engine(sync_url)

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params).mappings())

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def key_id(self, name: str) -> str:
        return str(self.scalar("SELECT id FROM api_keys WHERE name = :n", n=name))

    def balance(self, key_id: str) -> int:
        return int(self.scalar("SELECT balance_micro FROM api_keys WHERE id = :k", k=key_id))

    def holds(self, key_id: str) -> int:
        return int(self.scalar("SELECT count(*) FROM holds WHERE key_id = :k", k=key_id))

    def ledger(self, key_id: str) -> list[Any]:
        return self.rows("SELECT * FROM usage_ledger WHERE key_id = :k ORDER BY id", k=key_id)


@pytest.fixture(scope="module", params=BACKENDS)
def home(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp(f"money-home-{request.param}")
    (home / "config.toml").write_text(CONFIG.format(path=MODELS / "tiny-qwen2.5"))
    with database_for(str(request.param)) as url:
        _URLS[home] = url
        yield home


@pytest.fixture(scope="module")
def pair(home: Path) -> Iterator[list[Server]]:
    servers = start_servers(home, 2, "--config", str(home / "config.toml"), database_url=url_of(home))
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def db(home: Path) -> Db:
    return Db(home, url_of(home))


_names = iter(range(10**6))


def new_key(home: Path, *options: str) -> tuple[str, str]:
    """(name, raw key) of a fresh key made with the CLI."""
    name = f"money-{next(_names)}"
    return name, create_key(home, name, *options, database_url=url_of(home))


def client(server: Server, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.compat_url, headers={"Authorization": f"Bearer {key}"}, timeout=httpx.Timeout(300)
    )


def bound(messages: list[dict[str, str]]) -> int:
    """The prompt-token bound the server holds for (service/money/estimate.py)."""
    request = GenerationRequest(
        request_id="x",
        model="m",
        messages=tuple(ChatMessage(role=m["role"], content=m["content"]) for m in messages),  # type: ignore[arg-type]
        sampling=SamplingParams(max_tokens=1),
    )
    return prompt_tokens_bound(request)


def test_fifty_concurrent_requests_on_two_servers_spend_at_most_the_balance(
    home: Path, pair: list[Server], db: Db
) -> None:
    max_tokens = 8
    hold = max_tokens * PLUS_OUT  # qwen-plus charges output only
    body = {"model": "qwen-plus", "messages": PROMPT, "max_tokens": max_tokens}

    # A probe on a key of its own: greedy decoding runs to max_tokens, so a request costs its hold.
    _, probe_key = new_key(home, "--balance", "1")
    r = httpx.post(
        f"{pair[0].compat_url}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {probe_key}"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.headers["x-account-balance"] == f"{(MICRO - hold) / MICRO:.4f}"

    # Worth three and a half requests: three fit, and what three leave can't pay a fourth hold.
    start = 3 * hold + hold // 2
    name, key = new_key(home, "--balance", f"{start / MICRO:.6f}")
    key_id = db.key_id(name)
    assert db.balance(key_id) == start

    async def one(server: Server) -> httpx.Response:
        async with client(server, key) as c:
            return await c.post("/chat/completions", json=body)

    async def burst() -> list[httpx.Response]:
        return await asyncio.gather(*(one(pair[i % 2]) for i in range(50)))

    answers = asyncio.run(burst())
    ok = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    assert 1 <= len(ok) <= 3
    # Both processes admitted or refused: the limit held across them, not per process.
    for answer in refused:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "Arrearage"
        assert answer.json()["error"]["message"].startswith(
            "Access denied, please make sure your account is in good standing."
        )
    for answer in answers:
        shown = answer.headers["x-account-balance"]
        assert BALANCE_HEADER.match(shown), shown
        assert float(shown) >= 0
    end = db.balance(key_id)
    rows = db.ledger(key_id)
    assert end >= 0
    assert db.holds(key_id) == 0
    assert len(rows) == len(ok)  # refused requests leave no row
    assert sum(row["cost_micro"] for row in rows) == start - end
    assert all(row["status"] == "ok" and row["cost_micro"] == hold for row in rows)


async def _stream_then_hang_up(
    server: Server, key: str, chunks_wanted: int, max_tokens: int
) -> tuple[str, int]:
    body = {"model": "qwen-turbo", "messages": PROMPT, "max_tokens": max_tokens, "stream": True}
    body.update(temperature=1.0, seed=7)
    delivered = 0
    async with client(server, key) as c, c.stream("POST", "/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert BALANCE_HEADER.match(r.headers["x-account-balance"])
        request_id = r.headers["x-request-id"]
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    delivered += 1
                    if delivered == chunks_wanted:
                        break  # leaving the block closes the connection mid-stream
    return request_id, delivered


def test_a_cancelled_stream_is_charged_for_the_prompt_and_the_tokens_generated(
    home: Path, pair: list[Server], db: Db
) -> None:
    name, key = new_key(home, "--balance", "100")
    key_id = db.key_id(name)
    start = db.balance(key_id)
    max_tokens = 3000
    request_id, delivered = asyncio.run(_stream_then_hang_up(pair[1], key, 5, max_tokens))
    wait_for(lambda: len(db.ledger(key_id)) == 1, "the cancelled stream's ledger row")
    (row,) = db.ledger(key_id)
    assert row["request_id"] == request_id
    assert row["status"] == "cancelled"
    assert row["prompt_tokens"] > 0
    # Each delivered chunk carried at least one token; generation stopped soon after the hang-up.
    assert delivered <= row["completion_tokens"] < max_tokens // 2
    # Exactly what the engine generated (its own count, logged when it dropped the sequence), tokens
    # it made after the last one the server read included.
    found = re.search(rf"request {request_id} stopped early: (\d+) prompt and (\d+) generated", pair[1].log())
    assert found is not None
    assert (row["prompt_tokens"], row["completion_tokens"]) == (int(found[1]), int(found[2]))
    expected = row["prompt_tokens"] * TURBO_IN + row["completion_tokens"] * TURBO_OUT
    assert row["cost_micro"] == expected
    assert start - db.balance(key_id) == row["cost_micro"]
    assert db.holds(key_id) == 0


def test_a_failure_before_the_first_token_is_charged_nothing(home: Path, pair: list[Server], db: Db) -> None:
    name, key = new_key(home, "--balance", "100")
    key_id = db.key_id(name)
    start = db.balance(key_id)
    # qwen-max has a 64-token context: the engine refuses this prompt after the hold, before a token.
    long_prompt = [{"role": "user", "content": "word " * 400}]
    for stream in (False, True):
        r = httpx.post(
            f"{pair[0].compat_url}/chat/completions",
            json={"model": "qwen-max", "messages": long_prompt, "stream": stream},
            headers={"Authorization": f"Bearer {key}"},
            timeout=300,
        )
        assert r.status_code == 400, r.text
        assert r.headers["x-account-balance"] == "100.0000"
    rows = db.ledger(key_id)
    assert [row["status"] for row in rows] == ["error", "error"]
    assert all(row["cost_micro"] == 0 and row["completion_tokens"] == 0 for row in rows)
    assert db.balance(key_id) == start
    assert db.holds(key_id) == 0


def test_rpm_refuses_the_request_past_the_limit_across_both_servers(
    home: Path, pair: list[Server], db: Db
) -> None:
    name, key = new_key(home, "--rpm", "3")
    body = {"model": "qwen-plus", "messages": PROMPT, "max_tokens": 1}

    async def run() -> list[httpx.Response]:
        out = []
        for i in range(5):
            async with client(pair[i % 2], key) as c:
                out.append(await c.post("/chat/completions", json=body))
        return out

    answers = asyncio.run(run())
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    error = answers[3].json()["error"]
    assert error["code"] == error["type"] == "limit_requests"
    assert error["message"].startswith("You have exceeded your current request limit.")
    assert 1 <= int(answers[3].headers["retry-after"]) <= 60
    # An unmetered key gets no balance header.
    assert "x-account-balance" not in answers[0].headers
    assert len(db.ledger(db.key_id(name))) == 3


def test_tpm_counts_finished_requests_at_their_tokens_and_refuses_past_the_limit(
    home: Path, pair: list[Server], db: Db
) -> None:
    max_tokens = 4
    body = {"model": "qwen-plus", "messages": PROMPT, "max_tokens": max_tokens}
    # A finished request counts its real tokens; a new one is checked at its estimate.
    probe = httpx.post(
        f"{pair[0].compat_url}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {pair[0].api_key}"},
        timeout=300,
    ).json()["usage"]
    real = probe["total_tokens"]
    estimate = bound(PROMPT) + max_tokens
    assert estimate > real
    name, key = new_key(home, "--tpm", str(real + estimate))

    async def run() -> list[httpx.Response]:
        out = []
        for i in range(3):
            async with client(pair[i % 2], key) as c:
                out.append(await c.post("/chat/completions", json=body))
        return out

    answers = asyncio.run(run())
    assert [a.status_code for a in answers] == [200, 200, 429]
    error = answers[2].json()["error"]
    assert error["code"] == error["type"] == "insufficient_quota"
    assert error["message"].startswith("You exceeded your current quota")
    assert int(answers[2].headers["retry-after"]) >= 1

    # Raised later with `keys limits`, the next request passes (running servers re-read limits).
    cli("keys", "limits", name, "--tpm", "none", home=home, database_url=url_of(home))
    r = httpx.post(
        f"{pair[1].compat_url}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=300,
    )
    assert r.status_code == 200, r.text


def test_topup_and_show(home: Path, pair: list[Server], db: Db) -> None:
    name, key = new_key(home, "--balance", "0")
    body = {"model": "qwen-plus", "messages": PROMPT, "max_tokens": 2}
    r = httpx.post(
        f"{pair[0].compat_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert r.status_code == 400 and r.headers["x-account-balance"] == "0.0000"
    out = cli("keys", "topup", name, "12.5", home=home, database_url=url_of(home)).stdout
    assert "12.5000" in out
    r = httpx.post(
        f"{pair[1].compat_url}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    # 2 tokens out at 2 CNY per 1K: 0.004 CNY.
    assert r.headers["x-account-balance"] == "12.4960"
    shown = json.loads(cli("keys", "show", name, "--json", home=home, database_url=url_of(home)).stdout)
    assert shown["balance_micro"] == 12_500_000 - 4_000
    assert shown["spent_micro"] == 4_000 and shown["requests"] == 1 and shown["open_holds"] == 0


def test_keys_never_appear_in_the_database_logs_or_error_bodies(home: Path, pair: list[Server]) -> None:
    name, key = new_key(home, "--balance", "1", "--rpm", "1")
    body = {"model": "qwen-plus", "messages": PROMPT, "max_tokens": 1}
    answers = [
        httpx.post(f"{s.compat_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        for s in pair
    ]
    assert [a.status_code for a in answers] == [200, 429]
    wrong = httpx.post(
        f"{pair[0].compat_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}x"}
    )
    assert wrong.status_code == 401
    for answer in [*answers, wrong]:
        assert key not in answer.text and key[3:] not in answer.text
    shown = cli("keys", "show", name, home=home, database_url=url_of(home)).stdout
    listed = cli("keys", "list", home=home, database_url=url_of(home)).stdout
    secret = key[len("sk-") + 5 :]  # everything past the displayed prefix
    for text in (shown, listed, *(s.log() for s in pair)):
        assert secret not in text
    for path in home.glob("gateway.db*"):
        assert secret.encode() not in path.read_bytes()


@pytest.mark.slow
def test_sigkill_mid_stream_leaves_no_hold_after_restart(tmp_path: Path, backend: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(CONFIG.format(path=MODELS / "tiny-qwen2.5"))
    with database_for(backend) as url:
        _URLS[home] = url
        _sigkill_mid_stream(home)


def _sigkill_mid_stream(home: Path) -> None:
    db = Db(home, url_of(home))
    server = start_server(home, "--config", str(home / "config.toml"), database_url=url_of(home))
    name, key = new_key(home, "--balance", "100")
    key_id = db.key_id(name)
    start = db.balance(key_id)
    try:
        # A finished request first: its row and charge must survive the kill.
        r = httpx.post(
            f"{server.compat_url}/chat/completions",
            json={"model": "qwen-turbo", "messages": PROMPT, "max_tokens": 4},
            headers={"Authorization": f"Bearer {key}"},
            timeout=300,
        )
        assert r.status_code == 200

        async def stream_and_kill() -> str:
            body = {"model": "qwen-turbo", "messages": PROMPT, "max_tokens": 3000, "stream": True}
            async with client(server, key) as c, c.stream("POST", "/chat/completions", json=body) as resp:
                request_id = resp.headers["x-request-id"]
                async for line in resp.aiter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        break
                assert db.holds(key_id) == 1
                server.proc.send_signal(signal.SIGKILL)
                server.proc.wait(timeout=60)
            return request_id

        try:
            killed = asyncio.run(stream_and_kill())
        except httpx.HTTPError:
            pytest.fail("the stream broke before the kill")
    finally:
        server.stop()
    assert db.holds(key_id) == 1  # the dead process could not settle it
    restarted = start_server(home, "--config", str(home / "config.toml"), database_url=url_of(home))
    try:
        assert db.holds(key_id) == 0  # released at startup, before the server answered /health
        rows = db.ledger(key_id)
        assert [row["status"] for row in rows] == ["ok", "expired"]
        assert rows[1]["request_id"] == killed and rows[1]["cost_micro"] == 0
        assert start - db.balance(key_id) == sum(row["cost_micro"] for row in rows) > 0
        assert "released the hold of request" in restarted.log()
    finally:
        restarted.stop()


@pytest.mark.slow
def test_sigterm_settles_every_running_request(tmp_path: Path, backend: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    config = home / "config.toml"
    config.write_text("[server]\nshutdown_grace_seconds = 1\n" + CONFIG.format(path=MODELS / "tiny-qwen2.5"))
    with database_for(backend) as url:
        _URLS[home] = url
        _sigterm_settles(home, config)


def _sigterm_settles(home: Path, config: Path) -> None:
    db = Db(home, url_of(home))
    server = start_server(home, "--config", str(config), database_url=url_of(home))
    name, key = new_key(home, "--balance", "100")
    key_id = db.key_id(name)
    start = db.balance(key_id)
    n_streams = 3
    started = asyncio.Event()
    count = 0

    async def long_stream(seed: int) -> int:
        nonlocal count
        body = {"model": "qwen-turbo", "messages": PROMPT, "max_tokens": 4000, "stream": True, "seed": seed}
        chunks = 0
        try:
            async with client(server, key) as c, c.stream("POST", "/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        chunks += 1
                        if chunks == 1:
                            count += 1
                            if count == n_streams:
                                started.set()
        except httpx.HTTPError:
            pass
        return chunks

    async def whole_answer() -> httpx.Response:
        body = {"model": "qwen-turbo", "messages": PROMPT, "max_tokens": 4000, "seed": 9}
        async with client(server, key) as c:
            return await c.post("/chat/completions", json=body)

    async def scenario() -> tuple[list[int], httpx.Response]:
        tasks = [asyncio.create_task(long_stream(seed)) for seed in range(n_streams)]
        await asyncio.wait_for(started.wait(), timeout=300)
        # A non-stream call beside the streams, admitted (its hold taken) before the signal.
        whole = asyncio.create_task(whole_answer())
        deadline = time.monotonic() + 300
        while db.holds(key_id) < n_streams + 1:
            assert time.monotonic() < deadline and not whole.done()
            await asyncio.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        return await asyncio.gather(*tasks), await whole

    try:
        delivered, whole = asyncio.run(scenario())
        assert server.proc.wait(timeout=120) == 0, server.log()
    finally:
        server.stop()
    rows = db.ledger(key_id)
    assert len(rows) == n_streams + 1 and db.holds(key_id) == 0
    # The non-stream call was stopped by the shutdown: its client got a 503 and nothing else, so it is
    # charged nothing (streams pay for what reached their clients).
    assert whole.status_code == 503, whole.text
    (cut,) = [row for row in rows if row["request_id"] == whole.headers["x-request-id"]]
    streams = [row for row in rows if row is not cut]
    assert (cut["status"], cut["cost_micro"]) == ("error", 0)
    assert all(row["completion_tokens"] >= 1 for row in streams) and min(delivered) >= 1
    assert start - db.balance(key_id) == sum(row["cost_micro"] for row in streams) > 0
    assert db.scalar("SELECT count(*) FROM gateway_instances") == 0


async def _hold_while_streaming(server: Server, key: str, body: dict[str, Any], db: Db, key_id: str) -> int:
    """The amount held for the stream's request once its first content chunk is out; then reads on."""
    held = -1
    async with client(server, key) as c, c.stream("POST", "/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if held < 0 and line.startswith("data: {"):
                held = int(
                    db.scalar("SELECT coalesce(sum(amount_micro), 0) FROM holds WHERE key_id = :k", k=key_id)
                )
    return held


def test_n_choices_hold_every_choices_worst_case_and_pay_what_they_generated(
    home: Path, pair: list[Server], db: Db
) -> None:
    # n choices each generate up to max_tokens: the hold covers n x max_tokens (the prompt once, shared
    # by the choices, as usage reports it); the charge is the prompt once plus every choice's tokens.
    name, key = new_key(home, "--balance", "100")
    key_id = db.key_id(name)
    start = db.balance(key_id)
    max_tokens = 12
    body = {"model": "qwen-turbo", "messages": PROMPT, "max_tokens": max_tokens, "n": 3, "stream": True}
    body.update(temperature=1.0, seed=5, stream_options={"include_usage": True})
    held = asyncio.run(_hold_while_streaming(pair[0], key, body, db, key_id))
    assert held == bound(PROMPT) * TURBO_IN + 3 * max_tokens * TURBO_OUT
    wait_for(lambda: len(db.ledger(key_id)) == 1, "the n=3 request's ledger row")
    (row,) = db.ledger(key_id)
    assert row["status"] == "ok" and row["completion_tokens"] <= 3 * max_tokens
    assert row["cost_micro"] == row["prompt_tokens"] * TURBO_IN + row["completion_tokens"] * TURBO_OUT
    assert start - db.balance(key_id) == row["cost_micro"] and db.holds(key_id) == 0


def test_unmetered_keys_are_charged_nothing(home: Path, pair: list[Server], db: Db) -> None:
    # A key without a balance is not metered: its ledger rows record the tokens but no cost (NULL), so
    # nothing reports them as charged.
    name, key = new_key(home)
    key_id = db.key_id(name)
    body = {"model": "qwen-turbo", "messages": PROMPT, "max_tokens": 4}
    r = httpx.post(
        f"{pair[0].compat_url}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=300,
    )
    assert r.status_code == 200 and "x-account-balance" not in r.headers
    wait_for(lambda: len(db.ledger(key_id)) == 1, "the unmetered request's ledger row")
    (row,) = db.ledger(key_id)
    assert row["completion_tokens"] > 0 and row["cost_micro"] is None


def test_a_price_set_on_one_server_charges_new_requests_on_the_other(
    home: Path, pair: list[Server], db: Db
) -> None:
    out = cli(
        "admin-key", "create", "--name", f"money-admin-{next(_names)}", home=home, database_url=url_of(home)
    )
    match = re.search(r"\bqgw-admin-[0-9a-f]{32}\b", out.stdout)
    assert match, out.stdout + out.stderr
    admin = {"Authorization": f"Bearer {match.group(0)}"}
    # qwen-max (its default: 1.0 in, 2.0 out) only serves the before-the-first-token test otherwise,
    # which is charged nothing at any price; the price is reset at the end either way.
    price_url = f"{pair[0].base_url}/admin/api/models/qwen-max/price"
    set_to = httpx.put(price_url, json={"input_price": "0.5", "output_price": 3}, headers=admin, timeout=60)
    try:
        assert set_to.status_code == 200, set_to.text
        assert (set_to.json()["input_price_micro"], set_to.json()["output_price_micro"]) == (
            500_000,
            3_000_000,
        )

        def seen_by_second() -> bool:
            models = httpx.get(f"{pair[1].base_url}/admin/api/models", headers=admin, timeout=60).json()[
                "data"
            ]
            return any(m["id"] == "qwen-max" and m["source"] == "override" for m in models)

        # Each process reads the overrides every 2 s (PRICE_REFRESH_SECONDS); the bound is for a hung one.
        wait_for(seen_by_second, "the second server to apply the new price")
        name, key = new_key(home, "--balance", "100")
        key_id = db.key_id(name)
        start = db.balance(key_id)
        body = {"model": "qwen-max", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        r = httpx.post(
            f"{pair[1].compat_url}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=300,
        )
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        expected = -(-(usage["prompt_tokens"] * 500_000 + usage["completion_tokens"] * 3_000_000) // 1000)
        (row,) = db.ledger(key_id)
        assert row["cost_micro"] == expected == start - db.balance(key_id)
        # Audited: who set what, from what.
        history = httpx.get(f"{pair[1].base_url}/admin/api/prices/history", headers=admin, timeout=60).json()[
            "data"
        ]
        change = next(c for c in history if c["model"] == "qwen-max" and not c["reset"])
        assert (change["old_input_price_micro"], change["old_output_price_micro"]) == (1_000_000, 2_000_000)
        assert (change["new_input_price_micro"], change["new_output_price_micro"]) == (500_000, 3_000_000)
        assert change["admin_key_id"].startswith("adm_")
    finally:
        reset = httpx.delete(price_url, headers=admin, timeout=60)
    assert reset.status_code == 200 and reset.json()["source"] == "default"
    assert reset.json()["input_price_micro"] == 1_000_000
