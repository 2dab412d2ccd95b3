"""The suite's servers and CLI commands are forked from the template process (tests/forkserver.py)
whenever that is the same as a fresh interpreter. Forking was lost once without any test noticing:
torch stored its default inductor cache directory in the environment during collection, every spawn
then saw a changed environment, and the whole suite ran each server as a fresh interpreter (the full
run took 12-13 min instead of under 8 on this machine)."""

from __future__ import annotations

import os

import pytest

from tests.support import _env, _forkserver_allowed, _torch_set_it, unforkable_changes


def test_spawns_are_forked_after_collection() -> None:
    if os.environ.get("QWEN_GATEWAY_TEST_FRESH_PROCESSES") == "1":
        pytest.skip("QWEN_GATEWAY_TEST_FRESH_PROCESSES=1 turns forking off for this run")
    env = _env(None)
    assert _forkserver_allowed(env), f"changed since the worker started: {unforkable_changes(env)}"


def test_torch_default_cache_dir_is_not_a_difference_but_another_value_is() -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = os.path.abspath(default_cache_dir())
    assert _torch_set_it("TORCHINDUCTOR_CACHE_DIR", default)
    assert not _torch_set_it("TORCHINDUCTOR_CACHE_DIR", default + "-elsewhere")
    assert not _torch_set_it("TORCHINDUCTOR_CACHE_DIR", None)
    assert not _torch_set_it("OMP_NUM_THREADS", default)
    # A variable a test sets itself still sends its spawns to a fresh interpreter.
    assert not _forkserver_allowed({**_env(None), "HF_ENDPOINT": "http://127.0.0.1:1"})
