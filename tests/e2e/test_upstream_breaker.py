"""The ``openai`` engine's circuit breaker as clients and load balancers see it (``/health`` follows it,
a 503 for an open breaker says when to come back), and upstream credentials kept out of the log and
of startup errors.

Upstream: :class:`tests.upstream_fakes.FaultyUpstream` (FAKE): its "die" mode fails mid-stream, its
"reset" mode before the first byte, on demand. Each test has its own entry, so breaker state never
crosses tests; health checks are an hour apart, so none resets a breaker while a test looks at it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Server, run_gateway, start_server, wait_for
from tests.upstream_fakes import FaultyUpstream

SECRET_PASSWORD = "SECRET-PW-5521"
SECRET_QUERY = "SECRET-Q-7730"


@pytest.fixture(scope="module")
def fake() -> Iterator[FaultyUpstream]:
    upstream = FaultyUpstream().start()
    yield upstream
    upstream.stop()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, fake: FaultyUpstream) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("front-breaker")
    config = home / "config.toml"
    secret = f"u:{SECRET_PASSWORD}@127.0.0.1"
    # The credentials' replica that never answers is reported at start ("did not answer"); the other
    # answers, then dies mid-stream ("failed mid-stream"): both log lines name a URL.
    replicas = (
        f'"http://{secret}:{closed_port()}/v1?key={SECRET_QUERY}", '
        f'"http://{secret}:{fake.port}/v1?key={SECRET_QUERY}"'
    )
    config.write_text(
        f"""
[[models]]
id = "fake-die-health"
engine = "openai"
base_url = "{fake.url}"
upstream_model = "die"
health_interval = 3600
breaker_cooldown = 600

[[models]]
id = "fake-open"
engine = "openai"
base_url = "{fake.url}"
upstream_model = "reset"
health_interval = 3600
breaker_failures = 1
breaker_cooldown = 120

[[models]]
id = "fake-secret"
engine = "openai"
replicas = [{replicas}]
upstream_model = "die"
health_interval = 3600
"""
    )
    srv = start_server(home, "--config", str(config))
    yield srv
    srv.stop()


def stream(server: Server, model: str) -> str:
    headers = {"Authorization": f"Bearer {server.api_key}"}
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream(
        "POST", f"{server.compat_url}/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        return response.read().decode()


def health_of(server: Server, model: str) -> dict[str, Any]:
    models = httpx.get(f"{server.base_url}/health", timeout=30).json()["models"]
    return next(m for m in models if m["id"] == model)


def test_health_follows_the_breaker_not_one_failed_request(front: Server) -> None:
    # breaker_failures = 3 (the default): two failures mid-stream leave the model served and ready.
    for _ in range(2):
        assert '"error"' in stream(front, "fake-die-health")  # in-band error after tok0..tok2
        assert health_of(front, "fake-die-health")["state"] == "ready"
    # The third opens the breaker (for 600 s): nothing is reachable, and /health says so.
    stream(front, "fake-die-health")
    status = health_of(front, "fake-die-health")
    assert status["state"] == "failed" and status["detail"] == "no upstream replica is reachable"
    assert httpx.get(f"{front.base_url}/health", timeout=30).status_code == 503


def test_an_open_breaker_answers_503_with_retry_after_until_its_cool_down_ends(front: Server) -> None:
    headers = {"Authorization": f"Bearer {front.api_key}"}
    body = {"model": "fake-open", "messages": [{"role": "user", "content": "hi"}]}
    # The first request's failure opens the breaker (breaker_failures = 1); the next is refused at
    # once. Both are told to come back when the 120 s cool-down ends.
    for _ in range(2):
        r = httpx.post(f"{front.compat_url}/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "ModelUnavailable", r.text
        assert 60 <= int(r.headers["retry-after"]) <= 120, r.headers
    assert health_of(front, "fake-open")["state"] == "failed"


def test_credentials_in_an_upstream_url_never_reach_the_log(front: Server, fake: FaultyUpstream) -> None:
    text = stream(front, "fake-secret")
    assert "tok0" in text and '"error"' in text  # the live replica answered, then died mid-stream
    wait_for(lambda: "failed mid-stream" in front.log(), "the mid-stream warning")
    log = front.log()
    assert "did not answer" in log  # the replica that never answered, at start
    assert SECRET_PASSWORD not in log and SECRET_QUERY not in log
    assert f"http://u:***@127.0.0.1:{fake.port}/v1?key=***" in log
    # The query reached the upstream, after the endpoint's path (not inside the query).
    assert any(r.path == f"/v1/chat/completions?key={SECRET_QUERY}" for r in fake.received)


def test_a_key_given_as_api_key_env_is_refused_without_being_echoed(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[[models]]\nid = "qwen-max"\nengine = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
        'api_key_env = "sk-SUPERSECRET-f00d"\n\n'
        f'[[models]]\nid = "qwen-plus"\nengine = "openai"\nbase_url = "ftp://u:{SECRET_PASSWORD}@h/v1"\n'
    )
    r = run_gateway("serve", "--home", str(tmp_path / "home"), "--port", "0", "--config", str(config))
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model 'qwen-max': invalid option api_key_env: must be the NAME"), last
    assert "SUPERSECRET" not in r.stderr + r.stdout and "Traceback" not in r.stderr
    # An entry-level rule reads as the entry's error, with a URL's credentials masked.
    config.write_text(
        f'[[models]]\nid = "qwen-plus"\nengine = "openai"\nbase_url = "ftp://u:{SECRET_PASSWORD}@h/v1"\n'
    )
    r = run_gateway("serve", "--home", str(tmp_path / "home"), "--port", "0", "--config", str(config))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last == (
        "error: model 'qwen-plus': upstream URL 'ftp://u:***@h/v1' must start with http:// or https://"
    ), last
    assert SECRET_PASSWORD not in r.stderr + r.stdout
    config.write_text('[[models]]\nid = "qwen-max"\nengine = "openai"\n')
    r = run_gateway("serve", "--home", str(tmp_path / "home"), "--port", "0", "--config", str(config))
    last = r.stderr.strip().splitlines()[-1]
    assert last == "error: model 'qwen-max': give exactly one of base_url or replicas", last
    # A key that is also a valid variable name, unset as a variable: the error does not echo it; a
    # conventional (upper-case) name is shown.
    for env, shown in (
        ("sk_SUPERSECRET_f00d", "named by api_key_env (not shown)"),
        ("QG_UNSET_KEY", "QG_UNSET_KEY"),
    ):
        config.write_text(
            f'[[models]]\nid = "qwen-max"\nengine = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
            f'api_key_env = "{env}"\n'
        )
        r = run_gateway("serve", "--home", str(tmp_path / "home"), "--port", "0", "--config", str(config))
        last = r.stderr.strip().splitlines()[-1]
        assert (
            r.returncode == 1 and last == f"error: model 'qwen-max': environment variable {shown} is not set"
        ), last
        assert "SUPERSECRET" not in r.stderr + r.stdout
