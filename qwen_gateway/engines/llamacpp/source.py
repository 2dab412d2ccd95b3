"""Where a ``llamacpp`` model's GGUF file is: a file, a directory holding it, or a Hugging Face repo."""

from __future__ import annotations

import re
import time
from pathlib import Path

from rich.console import Console

from qwen_gateway.engines.llamacpp.options import LlamaCppModelConfig
from qwen_gateway.errors import StartupError
from qwen_gateway.settings import Settings

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_gguf(config: LlamaCppModelConfig, settings: Settings, console: Console) -> Path:
    """The local path of ``config``'s GGUF file (downloaded from the hub when it is a repo id and
    downloads are allowed). Raises StartupError("model 'id': ...")."""
    raw = config.path
    if not raw:
        raise _fail(config, "no path configured (expected a .gguf file, a directory or a repo id)")
    path = Path(raw).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise _fail(config, f"{raw} is not a .gguf file (the llamacpp engine serves GGUF checkpoints)")
        return path
    if path.is_dir():
        if config.gguf_file:
            if not (path / config.gguf_file).is_file():
                raise _fail(config, f"{config.gguf_file} not found in {raw}")
            return path / config.gguf_file
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if ggufs:
            names = ", ".join(p.name for p in ggufs)
            raise _fail(config, f"{raw} holds several .gguf files; choose one with gguf_file ({names})")
        raise _fail(config, f"{raw} holds no .gguf file")
    if _REPO_ID.match(raw) and config.gguf_file:
        return _download(config, raw, config.gguf_file, settings, console)
    if _REPO_ID.match(raw):
        raise _fail(config, f"{raw}: a Hugging Face repo id needs gguf_file (which GGUF of the repo)")
    raise _fail(config, f"path {raw} does not exist")


def _download(
    config: LlamaCppModelConfig, repo: str, filename: str, settings: Settings, console: Console
) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    started = time.monotonic()
    try:
        if not settings.allow_downloads:
            local = hf_hub_download(repo, filename, revision=config.revision, local_files_only=True)
        else:
            console.print(f"Downloading {repo}/{filename} from the Hugging Face hub…", highlight=False)
            local = hf_hub_download(repo, filename, revision=config.revision)
    except RepositoryNotFoundError:
        raise _fail(config, f"no repo {repo} on the Hugging Face hub (or it is private)") from None
    except EntryNotFoundError:
        raise _fail(config, f"{repo} has no file {filename}") from None
    except (LocalEntryNotFoundError, OSError):
        raise _fail(config, f"could not reach the Hugging Face hub to download {repo}/{filename}") from None
    if settings.allow_downloads:
        console.print(f"  downloaded {repo}/{filename}: {time.monotonic() - started:.1f} s", highlight=False)
    return Path(local)


def _fail(config: LlamaCppModelConfig, message: str) -> StartupError:
    return StartupError(f"model {config.id!r}: {message}")
