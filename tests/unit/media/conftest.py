"""Fixtures of the media tests: a loopback media server and counting listeners (tests/media_support.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.media_support import CountingListener, MediaServer, running_media_server


@pytest.fixture
def media_server() -> Iterator[MediaServer]:
    with running_media_server() as server:
        yield server


@pytest.fixture
def listener_factory() -> Iterator[type[CountingListener]]:
    made: list[CountingListener] = []

    class Tracked(CountingListener):
        def __init__(self, host: str, port: int = 0) -> None:
            super().__init__(host, port)
            made.append(self)

    yield Tracked
    for listener in made:
        listener.close()
