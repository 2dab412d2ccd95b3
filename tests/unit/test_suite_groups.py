"""The suite's own scheduling (tests/conftest.py): tests sharing a module fixture form one xdist group,
and xdist reads that group back from each test's id (else each test is scheduled alone and the fixture
starts once on every worker that runs any of them)."""

from __future__ import annotations

import os

import pytest
from xdist.scheduler.loadgroup import LoadGroupScheduling


def _groups(item: pytest.Item) -> list[str]:
    return [
        str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
        for mark in item.iter_markers("xdist_group")
    ]


def test_every_group_name_survives_xdist_parsing(request: pytest.FixtureRequest) -> None:
    # Only its id parsing is used (its constructor wants the workers' specs, which a worker has not).
    scheduler = LoadGroupScheduling.__new__(LoadGroupScheduling)
    items = request.session.items
    grouped = [item for item in items if _groups(item)]
    assert grouped, "no test carries an xdist group"
    for item in grouped:
        name = "_".join(sorted(set(_groups(item))))
        nodeid = item.nodeid.split("@")[0]  # a worker has already appended the group
        assert scheduler._split_scope(f"{nodeid}@{name}") == name, (item.nodeid, name)
        if os.environ.get("PYTEST_XDIST_WORKER") and request.config.getvalue("loadgroup"):
            # What the controller schedules by: the id this worker reported, suffix and all.
            assert scheduler._split_scope(item.nodeid) == name, (item.nodeid, name)


def test_a_module_fixture_groups_its_module(request: pytest.FixtureRequest, module_marker: str) -> None:
    """This module's own tests that share ``module_marker`` are one group."""
    mine = [
        item
        for item in request.session.items
        if item.path == request.node.path and "module_marker" in item.fixturenames
    ]
    assert len({tuple(_groups(item)) for item in mine}) == 1
    assert _groups(mine[0])


def test_a_module_fixture_groups_its_module_too(module_marker: str) -> None:
    assert module_marker == "shared"


@pytest.fixture(scope="module")
def module_marker() -> str:
    return "shared"
