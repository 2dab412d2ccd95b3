"""The seeds' Node.js examples (official `openai` npm package) against the server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from filelock import FileLock

from tests.support import Server, assert_schema

NODE_DIR = Path(__file__).resolve().parents[1] / "node"


@pytest.fixture(scope="module")
def node_env(server: Server) -> dict[str, str]:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        reason = (
            f"{' and '.join(missing)} not found: the Node SDK tests need Node.js >= 20 and npm (see README)"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason}; CI must run them")  # never a silent skip where CI is meant to have it
        pytest.skip(reason)
    # Under a file lock: pytest-xdist workers may reach this at once, and one must not run the scripts
    # against a node_modules the other is still writing (seen in CI: "Cannot find module .../index.mjs").
    with FileLock(str(NODE_DIR / ".npm-install.lock")):
        if not (NODE_DIR / "node_modules" / "openai" / "package.json").exists():
            subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund"],
                cwd=NODE_DIR,
                check=True,
                capture_output=True,
                timeout=300,
            )
    return {**os.environ, "DASHSCOPE_API_KEY": server.api_key, "GATEWAY_BASE_URL": server.compat_url}


def run(script: str, env: dict[str, str]) -> list[str]:
    out = subprocess.run(["node", script], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line.strip()]


def test_node_non_stream(node_env: dict[str, str]) -> None:
    (line,) = run("seed_chat.mjs", node_env)
    body = json.loads(line)
    assert_schema(body, "CreateChatCompletionResponse")
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] == 22


def test_node_stream(node_env: dict[str, str]) -> None:
    chunks = [json.loads(line) for line in run("seed_stream.mjs", node_env)]
    for c in chunks:
        assert_schema(c, "CreateChatCompletionStreamResponse")
    assert chunks[0]["choices"][0]["delta"] == {"content": "", "role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
