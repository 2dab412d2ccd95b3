"""The admin API and the web console through a real server (tiny Qwen checkpoint), on SQLite and on
PostgreSQL: admin keys apart from API keys, key management, prices, usage by day, and the console
driven in headless Chromium (Debian's, through Playwright) with a screenshot in tests/artifacts/.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.databases import BACKENDS, database_for, in_ci
from tests.support import MODELS, REPO, Server, cli, create_key, start_server

CONFIG = """
[[models]]
id = "qwen-plus"
path = "{path}"
max_output = 16
temperature = 0.0
input_price = 1.0
output_price = 2.0
"""
ARTIFACTS = REPO / "tests" / "artifacts"
ADMIN_KEY = re.compile(r"\bqgw-admin-[0-9a-f]{32}\b")
BALANCE = re.compile(r"^\d+\.\d{4}$")


class Site:
    """One server, its database and an admin key."""

    def __init__(self, server: Server, url: str | None, admin_key: str, backend: str) -> None:
        self.server = server
        self.url = url
        self.admin_key = admin_key
        self.backend = backend
        self.secrets = [admin_key]  # every key this module saw: none may reach the server's log

    def admin(self, method: str, path: str, key: str | None = "", **kwargs: Any) -> httpx.Response:
        token = self.admin_key if key == "" else key
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        r = httpx.request(
            method, f"{self.server.base_url}/admin/api{path}", headers=headers, timeout=60, **kwargs
        )
        if r.status_code == 201:
            self.secrets.append(r.json()["api_key"])
        return r

    def chat(self, key: str, content: str = "Count to ten.", max_tokens: int = 8) -> httpx.Response:
        body = {
            "model": "qwen-plus",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
        }
        return httpx.post(
            f"{self.server.compat_url}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=300,
        )


@pytest.fixture(scope="module", params=BACKENDS)
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    backend = str(request.param)
    home = tmp_path_factory.mktemp(f"admin-home-{backend}")
    (home / "config.toml").write_text(CONFIG.format(path=MODELS / "tiny-qwen2.5"))
    with database_for(backend) as url:
        out = cli("admin-key", "create", "--name", "ops", home=home, database_url=url)
        match = ADMIN_KEY.search(out.stdout)
        assert match, out.stdout + out.stderr
        server = start_server(home, "--config", str(home / "config.toml"), database_url=url)
        site = Site(server, url, match.group(0), backend)
        try:
            yield site
        finally:
            server.stop()
        # Secrets never in a log: neither the admin key nor any key the tests made (nor their tails).
        log = server.log()
        leaked = [k[:12] for k in site.secrets if k in log or k[14:] in log]
        assert not leaked, leaked


_names = iter(range(10**6))


def new_name() -> str:
    return f"admin-test-{next(_names)}"


def assert_dashscope_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return dict(error)


def test_only_an_admin_key_opens_the_admin_api(site: Site) -> None:
    assert_dashscope_error(site.admin("GET", "/keys", key=None), 401, "invalid_api_key")
    assert_dashscope_error(site.admin("GET", "/keys", key="qgw-admin-" + "0" * 32), 401, "invalid_api_key")
    # A working API key is refused with 403 (it is valid, just not for this), in DashScope's shape.
    user_key = create_key(site.server.home, new_name(), database_url=site.url)
    site.secrets.append(user_key)
    assert site.chat(user_key, max_tokens=1).status_code == 200
    error = assert_dashscope_error(site.admin("GET", "/keys", key=user_key), 403, "AccessDenied")
    assert user_key not in str(error)
    # And the admin key is no API key.
    assert_dashscope_error(site.chat(site.admin_key, max_tokens=1), 401, "invalid_api_key")
    assert site.admin("GET", "/keys").status_code == 200


def test_create_top_up_limit_and_revoke_a_key(site: Site) -> None:
    name = new_name()
    created = site.admin("POST", "/keys", json={"name": name, "balance": "1.5", "rpm": 100})
    assert created.status_code == 201, created.text
    assert created.headers["cache-control"] == "no-store"
    body = created.json()
    raw = body["api_key"]
    assert re.fullmatch(r"sk-[0-9a-f]{32}", raw)
    assert (body["balance"], body["balance_micro"], body["rpm_limit"], body["tpm_limit"]) == (
        "1.5000",
        1_500_000,
        100,
        None,
    )

    # The key works, is charged, and is listed without the key or its hash.
    answer = site.chat(raw)
    assert answer.status_code == 200, answer.text
    listed = site.admin("GET", "/keys").json()["data"]
    (mine,) = [k for k in listed if k["name"] == name]
    assert raw not in site.admin("GET", "/keys").text and "key_hash" not in mine
    usage = answer.json()["usage"]
    # 1 and 2 CNY per 1K tokens: 1000 and 2000 micro-CNY per token.
    cost = usage["prompt_tokens"] * 1000 + usage["completion_tokens"] * 2000
    assert mine["requests"] == 1 and mine["cost_micro"] == cost
    assert (
        mine["balance_micro"] == 1_500_000 - cost and answer.headers["x-account-balance"] == mine["balance"]
    )

    topped = site.admin("POST", f"/keys/{mine['id']}/topup", json={"amount": 2})
    assert topped.status_code == 200 and topped.json()["balance_micro"] == 3_500_000 - cost

    limited = site.admin("PATCH", f"/keys/{name}/limits", json={"tpm": 5000, "rpm": None})
    assert limited.status_code == 200 and (limited.json()["rpm_limit"], limited.json()["tpm_limit"]) == (
        None,
        5000,
    )
    # An absent limit stays as it is.
    kept = site.admin("PATCH", f"/keys/{name}/limits", json={"rpm": 7}).json()
    assert (kept["rpm_limit"], kept["tpm_limit"]) == (7, 5000)

    revoked = site.admin("POST", f"/keys/{mine['id']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert_dashscope_error(site.chat(raw, max_tokens=1), 401, "invalid_api_key")


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("POST", "/keys", {"name": "x", "balence": 1}, "balence"),
        ("POST", "/keys", {"name": "x", "balance": "1.0000001"}, "balance"),
        ("POST", "/keys", {"name": "x", "balance": -1}, "balance"),
        ("POST", "/keys", {"name": "x", "rpm": 0}, "rpm"),
        ("POST", "/keys", {"name": "", "balance": 1}, "name"),
        ("POST", "/keys", {"balance": 1}, "name"),
        ("POST", "/keys/{id}/topup", {"amount": 0}, "amount"),
        ("POST", "/keys/{id}/topup", {"amount": "ten"}, "amount"),
        ("PATCH", "/keys/{id}/limits", {"rpm": "5"}, "rpm"),
    ],
)
def test_bad_admin_input_is_a_400_naming_the_field(
    site: Site, method: str, path: str, body: dict[str, Any], param: str
) -> None:
    key_id = site.admin("POST", "/keys", json={"name": new_name()}).json()["id"]
    error = assert_dashscope_error(
        site.admin(method, path.format(id=key_id), json=body), 400, "invalid_parameter_error"
    )
    assert error["param"] == param


def test_unknowns_and_duplicates(site: Site) -> None:
    name = new_name()
    assert site.admin("POST", "/keys", json={"name": name}).status_code == 201
    error = assert_dashscope_error(
        site.admin("POST", "/keys", json={"name": name}), 400, "invalid_parameter_error"
    )
    assert error["param"] == "name" and "already exists" in error["message"]
    assert_dashscope_error(
        site.admin("POST", "/keys/key_000000000000/topup", json={"amount": 1}), 404, "NotFound"
    )
    assert_dashscope_error(site.admin("GET", "/usage?day=3"), 400, "invalid_parameter_error")
    assert_dashscope_error(site.admin("GET", "/usage?days=0"), 400, "invalid_parameter_error")
    assert_dashscope_error(site.admin("POST", "/keys", content=b"[1]"), 400, "invalid_request_error")


def test_prices_and_daily_usage_by_key_and_model(site: Site) -> None:
    prices = site.admin("GET", "/models").json()["data"]
    assert {"id": "qwen-plus", "input_price": "1.0000", "output_price": "2.0000"}.items() <= prices[0].items()
    name = new_name()
    raw = site.admin("POST", "/keys", json={"name": name, "balance": 10}).json()["api_key"]
    answers = [site.chat(raw) for _ in range(2)]
    assert all(a.status_code == 200 for a in answers)
    rows = [r for r in site.admin("GET", "/usage?days=7").json()["data"] if r["key_name"] == name]
    today = datetime.now(UTC).date().isoformat()
    assert [(r["day"], r["model"], r["requests"]) for r in rows] == [(today, "qwen-plus", 2)]
    tokens = sum(a.json()["usage"]["prompt_tokens"] + a.json()["usage"]["completion_tokens"] for a in answers)
    assert rows[0]["prompt_tokens"] + rows[0]["completion_tokens"] == tokens
    shown = site.admin("GET", f"/keys/{name}").json()
    assert rows[0]["cost_micro"] == shown["cost_micro"] == 10_000_000 - shown["balance_micro"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input_price": "0.0000001", "output_price": 1}, "input_price"),
        ({"input_price": 1, "output_price": -2}, "output_price"),
        ({"input_price": "cheap", "output_price": 1}, "input_price"),
        ({"input_price": 1}, "output_price"),
        ({"input_price": 1, "output_price": 1, "currency": "USD"}, "currency"),
    ],
)
def test_a_bad_price_is_a_400_naming_the_field_and_changes_nothing(
    site: Site, body: dict[str, Any], param: str
) -> None:
    before = site.admin("GET", "/models").json()["data"]
    error = assert_dashscope_error(
        site.admin("PUT", "/models/qwen-plus/price", json=body), 400, "invalid_parameter_error"
    )
    assert error["param"] == param
    assert site.admin("GET", "/models").json()["data"] == before


def test_a_price_of_an_unknown_model_is_a_404_and_only_admins_set_prices(site: Site) -> None:
    price = {"input_price": 1, "output_price": 1}
    assert_dashscope_error(
        site.admin("PUT", "/models/qwen-nothing/price", json=price), 404, "model_not_found"
    )
    assert_dashscope_error(site.admin("DELETE", "/models/qwen-nothing/price"), 404, "model_not_found")
    user_key = create_key(site.server.home, new_name(), database_url=site.url)
    site.secrets.append(user_key)
    assert_dashscope_error(
        site.admin("PUT", "/models/qwen-plus/price", key=user_key, json=price), 403, "AccessDenied"
    )
    assert_dashscope_error(
        site.admin("PUT", "/models/qwen-plus/price", key=None, json=price), 401, "invalid_api_key"
    )


def test_a_new_price_applies_to_the_next_request_without_a_restart_and_is_audited(site: Site) -> None:
    name = new_name()
    raw = site.admin("POST", "/keys", json={"name": name, "balance": 10}).json()["api_key"]
    try:
        changed = site.admin(
            "PUT", "/models/qwen-plus/price", json={"input_price": "0.25", "output_price": "4"}
        )
        assert changed.status_code == 200, changed.text
        shown = changed.json()
        assert (shown["input_price"], shown["output_price"], shown["source"]) == (
            "0.2500",
            "4.0000",
            "override",
        )
        assert (shown["default_input_price_micro"], shown["default_output_price_micro"]) == (
            1_000_000,
            2_000_000,
        )
        answer = site.chat(raw)
        assert answer.status_code == 200, answer.text
        usage = answer.json()["usage"]
        cost = -(-(usage["prompt_tokens"] * 250_000 + usage["completion_tokens"] * 4_000_000) // 1000)
        key = site.admin("GET", f"/keys/{name}").json()
        assert key["cost_micro"] == cost and key["balance_micro"] == 10_000_000 - cost
        assert answer.headers["x-account-balance"] == key["balance"]
    finally:
        reset = site.admin("DELETE", "/models/qwen-plus/price")
    assert reset.status_code == 200 and reset.json()["source"] == "default"
    assert reset.json()["input_price"] == "1.0000"
    # A reset without an override writes nothing.
    assert site.admin("DELETE", "/models/qwen-plus/price").status_code == 200
    history = site.admin("GET", "/prices/history?limit=2").json()["data"]
    assert [(c["model"], c["reset"]) for c in history] == [("qwen-plus", True), ("qwen-plus", False)]
    assert (history[1]["old_input_price"], history[1]["new_input_price"]) == ("1.0000", "0.2500")
    assert (history[0]["old_output_price"], history[0]["new_output_price"]) == ("4.0000", "2.0000")
    assert history[0]["admin_key_id"] == history[1]["admin_key_id"] and history[0]["changed_at"]
    assert_dashscope_error(site.admin("GET", "/prices/history?limit=0"), 400, "invalid_parameter_error")


def test_an_unmetered_keys_usage_is_not_charged(site: Site) -> None:
    name = new_name()
    raw = site.admin("POST", "/keys", json={"name": name}).json()["api_key"]
    assert site.chat(raw).status_code == 200
    key = site.admin("GET", f"/keys/{name}").json()
    assert (key["metered"], key["requests"], key["cost_micro"]) == (False, 1, 0)
    rows = [r for r in site.admin("GET", "/usage?days=1").json()["data"] if r["key_name"] == name]
    assert [(r["requests"], r["cost_micro"]) for r in rows] == [(1, 0)]


def test_the_console_files_are_served_with_a_strict_policy(site: Site) -> None:
    for path, kind in (
        ("/admin/", "text/html"),
        ("/admin", "text/html"),
        ("/admin/app.js", "text/javascript"),
    ):
        r = httpx.get(site.server.base_url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert "default-src 'none'" in r.headers["content-security-policy"]
    assert httpx.get(site.server.base_url + "/admin/../settings.py").status_code == 404
    assert httpx.get(site.server.base_url + "/admin/nothing.js").status_code == 404


# -- the console in Chromium -------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",  # root, as in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # No network but loopback here: without these Chromium keeps trying Google's hosts.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    reason = None
    if path is None:
        reason = "Debian's chromium is not installed (apt-get install chromium; .ci/services.sh does it)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright package is not installed (pip install -e '.[test]')"
    if reason is not None:
        if in_ci():
            pytest.fail(f"{reason}; CI must run the console test")
        pytest.skip(reason)
    assert path is not None
    return path


def test_the_console_shows_a_keys_balance_dropping_after_requests(site: Site) -> None:
    from playwright.sync_api import expect, sync_playwright

    executable = chromium_path()
    name = new_name()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"admin-console-{site.backend}.png"
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.set_default_timeout(60_000)
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(site.server.base_url + "/admin/")

            # A wrong key is refused and the console stays closed.
            page.fill("#admin-key", "qgw-admin-" + "1" * 32)
            page.click("#login")
            expect(page.locator("#error")).to_contain_text("Incorrect API key")
            expect(page.locator("#console")).to_be_hidden()
            problems.clear()  # the browser logs the 401 itself

            page.fill("#admin-key", site.admin_key)
            page.click("#login")
            expect(page.locator("#console")).to_be_visible()

            page.fill("#create-name", name)
            page.fill("#create-balance", "5")
            page.click("#create")
            expect(page.locator("#new-key")).to_be_visible()
            raw = page.locator("#new-key-value").inner_text().strip()
            assert re.fullmatch(r"sk-[0-9a-f]{32}", raw), raw
            site.secrets.append(raw)
            row = page.locator(f'#keys-body tr[data-key-name="{name}"]')
            expect(row.locator("td.balance")).to_have_text("5.0000")

            answers = [site.chat(raw) for _ in range(3)]
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            after = answers[-1].headers["x-account-balance"]
            assert BALANCE.match(after) and float(after) < 5

            page.click("#refresh")
            expect(row.locator("td.balance")).to_have_text(after)
            expect(row.locator("td.requests")).to_have_text("3")
            # The usage chart has this key's bar for today, by key and by model.
            today = datetime.now(UTC).date().isoformat()
            expect(
                page.locator(f'#usage-chart rect.bar[data-series="{name}"][data-day="{today}"]')
            ).to_have_count(1)
            page.select_option("#usage-group", "model")
            expect(
                page.locator(f'#usage-chart rect.bar[data-series="qwen-plus"][data-day="{today}"]')
            ).to_have_count(1)
            page.select_option("#usage-group", "key")

            # Top up through the form: the balance rises by exactly the amount.
            page.select_option("#topup-key", label=name)
            page.fill("#topup-amount", "1.25")
            page.click("#topup")
            topped = f"{float(after) + 1.25:.4f}"
            expect(row.locator("td.balance")).to_have_text(topped)
            expect(page.locator("#prices-body")).to_contain_text("qwen-plus")

            page.select_option("#limits-key", label=name)
            page.fill("#limits-rpm", "30")
            page.click("#limits")
            expect(row.locator("td.rpm")).to_have_text("30")
            expect(row.locator("td.tpm")).to_have_text("—")

            # A price edited in the console is in force at once (and is reset through the console).
            price_row = page.locator('#prices-body tr[data-model="qwen-plus"]')
            price_row.locator("input.input-price").fill("0.5")
            price_row.locator("input.output-price").fill("3")
            price_row.locator("button.set-price").click()
            expect(price_row.locator("td.source")).to_have_text("override")
            expect(page.locator("#price-history-body tr").first).to_contain_text("0.5000 / 3.0000")
            shown = site.admin("GET", "/models").json()["data"][0]
            assert (shown["input_price_micro"], shown["output_price_micro"]) == (500_000, 3_000_000)

            # An unmetered key's usage is shown as not charged.
            plain = new_name()
            plain_raw = site.admin("POST", "/keys", json={"name": plain}).json()["api_key"]
            assert site.chat(plain_raw).status_code == 200
            page.click("#refresh")
            plain_row = page.locator(f'#keys-body tr[data-key-name="{plain}"]')
            expect(plain_row.locator("td.cost")).to_have_text("not charged")
            expect(plain_row.locator("td.requests")).to_have_text("1")
            page.screenshot(path=str(shot), full_page=True)
            price_row.locator("button.reset-price").click()
            expect(price_row.locator("td.source")).to_have_text("default")
            expect(price_row.locator("input.input-price")).to_have_value("1.0000")

            # Revoke asks first (a dialog, accepted here); the key stops working at once.
            page.once("dialog", lambda dialog: dialog.accept())
            row.locator("button.revoke").click()
            expect(row.locator("td.status")).to_have_text("revoked")
            assert site.chat(raw, max_tokens=1).status_code == 401
        except Exception:
            # What the page showed when it went wrong, for the failure report.
            failed = ARTIFACTS / f"admin-console-{site.backend}-failure.png"
            page.screenshot(path=str(failed), full_page=True)
            print(f"failure screenshot: {failed}; error box: {page.locator('#error').inner_text()!r}")
            print(f"browser console errors: {problems}")
            raise
        finally:
            browser.close()
    print(f"console screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    assert not problems, problems  # no script error and no CSP violation
