"""Suite-wide setup for parallel runs (pytest-xdist, on by default through pyproject's addopts).

- Tests that share a module-scoped fixture (a server, an engine, a database) are one xdist group, so
  one worker runs them all and the fixture starts once; every other test is scheduled on its own.
- Heavy modules (end-to-end, or holding a slow test) are scheduled first, so the long ones do not
  start last and leave a worker idle at the end.
- Each worker process and every server it starts runs PyTorch on one thread: the workers already use
  the machine's cores, and more threads than cores make every process slower (OpenMP spins).
"""

from __future__ import annotations

import os
import re

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Before anything imports torch (test modules are collected after this conftest loads); the
    # servers tests start inherit the environment.
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")

# Fixture scopes whose tests must stay on one worker (a session fixture is simply made once per worker).
_SHARED_SCOPES = {"module", "class", "package"}

# Session fixtures that start a server only a few tests use: those tests are one group, so the server
# starts on one worker instead of on each (the fixture name -> the group's name).
_SESSION_GROUPS = {"embedded_server": "embedded", "one_line_server": "one-line-server"}

# End-to-end modules marked slow as a whole (`-m "not slow"` leaves them out): their cost is their own
# servers' start-up (7-9 s of CPU each, mostly importing torch and transformers, plus every model they
# load), not their tests, so marking single tests would not spare it. What stays in the quick run: the
# unit tests and the e2e modules on the shared `server`, `one_line_server` and test_edge's server.
_SLOW_MODULES = {
    "test_admin.py": "a server per database, Chromium",
    "test_admission.py": "its own server, 4000-token streams filling the queue",
    "test_batches.py": "a server per database, batches of 20 lines, SIGKILL and restarts",
    "test_batches_preemption.py": "a server per database, live requests preempting batch lines, two servers",
    "test_embedded_qwen.py": "a hub stand-in and a llama.cpp server per test",
    "test_files.py": "a server per database, document extraction",
    "test_files_disk_full.py": "its own server on a tmpfs mount",
    "test_llamacpp.py": "a llama.cpp server and a transformers server",
    "test_media_safety.py": "its own server with a VL checkpoint",
    "test_money.py": "two servers per database, restarts",
    "test_native.py": "its own server with four models (a VL checkpoint among them)",
    "test_native_review.py": "its own server and a search fake",
    "test_node_sdk.py": "npm install of the openai package",
    "test_search.py": "its own server and a search fake",
    "test_shutdown.py": "a server per test, stopped by signals",
    "test_structured_output.py": "its own server with three models, 600-token answers",
    "test_tools_thinking.py": "its own server with five models",
    "test_upstream.py": "a local upstream server and the gateways in front of it",
    "test_upstream_breaker.py": "its own gateway in front of an upstream that fails on demand",
    "test_upstream_limits.py": "its own gateway in front of a slow upstream",
    "test_upstream_replicas.py": "three servers",
    "test_vision.py": "its own server with eight models on four checkpoints",
}


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core, at most 4 (each worker starts its own servers: memory)."""
    return max(1, min(os.cpu_count() or 1, 4))


def _group(item: pytest.Item) -> str | None:
    """The xdist group of a test that uses a module-scoped fixture: its module, and the parameters of
    those fixtures (a module parametrized over SQLite and PostgreSQL is two groups, each set up once)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    shared = {
        name for name, defs in info.name2fixturedefs.items() if defs and defs[-1].scope in _SHARED_SCOPES
    }
    if not shared:
        sessions = sorted(_SESSION_GROUPS[name] for name in info.names_closure if name in _SESSION_GROUPS)
        return sessions[0] if sessions else None
    callspec = getattr(item, "callspec", None)
    params = sorted(f"{k}={v}" for k, v in (callspec.params.items() if callspec else ()) if k in shared)
    # No "]" or "@" in the name: xdist takes the text after a test id's last "@" as its group only when
    # no "]" follows it (a "[...]" suffix made every test its own group, so a module's fixture started
    # once per worker that ran any of its tests).
    return re.sub(r"[\[\]@]", "_", f"{item.nodeid.partition('::')[0]}::{','.join(params)}")


def _heavy(module_items: list[pytest.Item]) -> bool:
    return "e2e" in module_items[0].path.parts or any(
        item.get_closest_marker("slow") for item in module_items
    )


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns xdist_group marks into node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = _group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
        # slow_download (the embedded model's real weights) is slow too: 20 s of CPU for one answer.
        if item.get_closest_marker("slow_download") or (
            "e2e" in item.path.parts and item.path.name in _SLOW_MODULES
        ):
            item.add_marker(pytest.mark.slow)


class _HeavyFirst:
    """Orders modules heavy-first, after pytest's own reordering (a conftest module can hold only one
    implementation per hook, so this one is a plugin object)."""

    @pytest.hookimpl(trylast=True)  # after xdist's hook, which names the groups (see _suffix_group)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        by_module: dict[str, list[pytest.Item]] = {}
        for item in items:
            by_module.setdefault(str(item.path), []).append(item)
        # Stable: modules keep their order among equals, and each module's tests stay contiguous in
        # the order pytest chose (so its module fixtures are set up once per parameter).
        ordered = sorted(by_module.values(), key=lambda module_items: not _heavy(module_items))
        items[:] = [item for module_items in ordered for item in module_items]
        if os.environ.get("PYTEST_XDIST_WORKER") and config.getvalue("loadgroup"):
            for item in items:
                _suffix_group(item)


def _suffix_group(item: pytest.Item) -> None:
    """Give a grouped test's id xdist's "@group" suffix, which xdist's own hook sets on ``_nodeid``, an
    attribute pytest 9.2 no longer reads (its ids are ``NodeId`` objects): without this every test was
    scheduled alone, and a module's server started on each worker that ran one of its tests."""
    names = {
        str(m.args[0] if m.args else m.kwargs.get("name", "default"))
        for m in item.iter_markers("xdist_group")
    }
    if not names:
        return
    suffix = "@" + "_".join(sorted(names))
    if item.nodeid.endswith(suffix):
        return  # an xdist that sets the suffix itself
    nodeid = item.nodeid + suffix
    if hasattr(item, "_id"):
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(nodeid)  # parse keeps the whole string as the id
    else:
        item._nodeid = nodeid


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_HeavyFirst(), "qwen-gateway-heavy-first")
