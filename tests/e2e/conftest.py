from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import MODELS, Server, embedded_home, start_server

# The tiny checkpoints have random weights: they rarely emit EOS, so the test config caps output
# (a [[models]] override of the catalog's max_output) to keep un-capped seed requests short.
CONFIG = """
[[models]]
id = "qwen-plus"
engine = "local"
path = "{qwen25}"
max_output = 48

# A small context window (a config override of the checkpoint's 32768) for context-length tests.
[[models]]
id = "qwen-max"
engine = "local"
path = "{qwen25}"
context_length = 64
max_output = 48
temperature = 0.0    # a per-model sampling default (requests that don't set temperature are greedy)

# A long-output id for concurrency and disconnect tests.
[[models]]
id = "qwen-turbo"
engine = "local"
path = "{qwen25}"
max_output = 4096

[[models]]
id = "qwen3-8b"
engine = "local"
path = "{qwen3}"
max_output = 48
max_reasoning = 64   # thinking_budget's cap and default (random weights never close the block)
"""


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("gateway-home")
    config = home / "config.toml"
    config.write_text(CONFIG.format(qwen25=MODELS / "tiny-qwen2.5", qwen3=MODELS / "tiny-qwen3"))
    srv = start_server(home, "--config", str(config))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`qwen-gateway serve` with nothing configured (the embedded default, real weights), started once
    per worker for every test that only asks it questions and reads its start-up log."""
    srv = start_server(embedded_home(tmp_path_factory), timeout=900)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def one_line_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server started with the one-line ``--model ID=PATH`` form (no config file) and its log."""
    home = tmp_path_factory.mktemp("one-line-home")
    srv = start_server(home, "--model", f"qwen2.5-7b-instruct={MODELS / 'tiny-qwen2.5'}")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tiny_tokenizer_path() -> Path:
    return MODELS / "tiny-qwen2.5"


# `backend` parametrizes a test over SQLite and PostgreSQL (tests/databases.py).
from tests.databases import backend, postgres_url  # noqa: E402, F401
