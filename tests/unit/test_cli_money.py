"""The money commands: keys create --balance/--rpm/--tpm, topup, limits, show, usage."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from qwen_gateway.cli import cli
from qwen_gateway.settings import Settings
from qwen_gateway.store.db import Store
from qwen_gateway.store.rollup import roll_up
from qwen_gateway.store.usage import record_usage


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("QWEN_GATEWAY_"):
            monkeypatch.delenv(name)


def invoke(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, [*args, "--home", str(home)], catch_exceptions=False)


def show(home: Path, key: str) -> dict[str, object]:
    result = invoke(home, "keys", "show", key, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_create_topup_limits_show(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = invoke(home, "keys", "create", "--name", "shop", "--balance", "100", "--rpm", "60")
    assert result.exit_code == 0, result.output
    assert "balance 100.0000 CNY, 60 requests/min, no TPM limit" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("sk-")  # the key stays the last line
    shown = show(home, "shop")
    assert (shown["balance_micro"], shown["rpm_limit"], shown["tpm_limit"]) == (100_000_000, 60, None)

    assert "balance 112.5000 CNY (+12.5000)" in invoke(home, "keys", "topup", "shop", "12.5").stdout
    assert show(home, "shop")["balance_micro"] == 112_500_000
    result = invoke(home, "keys", "limits", "shop", "--rpm", "none", "--tpm", "5000")
    assert "no RPM limit, 5000 tokens/min" in result.stdout
    assert (show(home, "shop")["rpm_limit"], show(home, "shop")["tpm_limit"]) == (None, 5000)

    # An unmetered key becomes metered by a top-up.
    invoke(home, "keys", "create", "--name", "free")
    assert show(home, "free")["metered"] is False
    invoke(home, "keys", "topup", "free", "1")
    assert show(home, "free")["balance_micro"] == 1_000_000
    listed = invoke(home, "keys", "list").stdout
    assert "112.5000" in listed and "1.0000" in listed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("keys", "topup", "nobody", "1"), "no API key with name or id 'nobody'"),
        (("keys", "topup", "shop", "0"), "must be positive"),
        (("keys", "topup", "shop", "0.0000001"), "more than 6 decimals"),
        (("keys", "create", "--name", "x", "--balance", "abc"), "is not a number"),
        (("keys", "create", "--name", "y", "--rpm", "0"), "--rpm must be at least 1"),
        (("keys", "limits", "shop", "--tpm", "-3"), "--tpm expects a whole number"),
        (("usage", "--by", "week"), "--by takes day, key and model"),
    ],
)
def test_bad_money_arguments_are_one_line_errors(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    home = tmp_path / "home"
    invoke(home, "keys", "create", "--name", "shop", "--balance", "1")
    result = invoke(home, *args)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr


def test_usage_reports_ledger_and_rolled_up_rows_alike(tmp_path: Path) -> None:
    home = tmp_path / "home"
    invoke(home, "keys", "create", "--name", "shop", "--balance", "1")
    key_id = show(home, "shop")["id"]
    now = datetime.now(UTC)

    async def fill(rollup: bool) -> None:
        async with await Store.open(Settings.load(overrides={"home": home}).resolved_database_url) as store:
            if not rollup:
                for i, model in enumerate(("qwen-plus", "qwen-plus", "qwen-max")):
                    await record_usage(
                        store=store,
                        request_id=f"r{i}",
                        key_id=str(key_id),
                        model=model,
                        endpoint="chat.completions",
                        prompt_tokens=10,
                        completion_tokens=5,
                        status="ok",
                        cost_micro=1234 + i,
                        created_at=now - timedelta(days=200),
                    )
                return
            async with store.begin() as conn:
                await conn.run_sync(lambda c: roll_up(c, before=now - timedelta(days=90)))

    asyncio.run(fill(False))
    before = json.loads(invoke(home, "usage", "--json").stdout)
    asyncio.run(fill(True))
    after = json.loads(invoke(home, "usage", "--json").stdout)
    assert before == after
    day = (now - timedelta(days=200)).date().isoformat()
    assert [(r["day"], r["key_name"], r["model"], r["requests"], r["cost_micro"]) for r in after] == [
        (day, "shop", "qwen-max", 1, 1236),
        (day, "shop", "qwen-plus", 2, 1234 + 1235),
    ]
    assert after[1]["cost"] == "0.002469"
    table = invoke(home, "usage", "--by", "model").stdout
    assert "qwen-plus" in table and "0.0024" in table
