"""Find a checkpoint (directory, .gguf file or hub repo id) and load it, failing with one line.

Blocking: the engine calls :func:`load` through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from rich.console import Console

from qwen_gateway.engines.local import cpu_matmul, kernels
from qwen_gateway.engines.local.options import LocalModelConfig
from qwen_gateway.engines.local.progress import Steps
from qwen_gateway.engines.local.sampling import GenerationDefaults
from qwen_gateway.engines.local.tokenizer_copy import copy_tokenizer
from qwen_gateway.engines.local.vision import VisionSpec
from qwen_gateway.errors import StartupError
from qwen_gateway.settings import Settings

if TYPE_CHECKING:
    from qwen_gateway.engines.registry import SharedLoads

log = logging.getLogger(__name__)

# "org/name" as the hub spells repo ids; anything path-like (/, ./, ~) is never taken for one.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A model that claims no limit still needs one to size requests against.
_FALLBACK_CONTEXT = 4096


@dataclass(frozen=True, slots=True)
class Source:
    kind: Literal["dir", "gguf", "hub"]
    location: str  # directory (dir, gguf) or repo id (hub)
    gguf_file: str | None = None

    def describe(self) -> str:
        if self.kind == "gguf":
            return str(Path(self.location) / (self.gguf_file or ""))
        if self.kind == "hub":
            return f"hub:{self.location}"
        return self.location


@dataclass(frozen=True, slots=True, eq=False)
class Tokenizers:
    """A checkpoint's two tokenizers, each with the lock every call into it holds: ``decode`` for
    decoding answers (on the event loop) and the engine's other per-token work, ``render`` (a copy) for
    prompt rendering on worker threads, so that tokenizing a long prompt never holds up decoding.

    Shared by the engines of every [[models]] entry on the checkpoint (see ``SharedLoads``), locks
    included: a fast tokenizer's Rust object refuses a mutable borrow ("Already borrowed") while another
    thread is inside it, and with one lock per tokenizer object no two threads ever are, whichever
    engine they serve."""

    decode: Any
    render: Any
    decode_lock: threading.Lock
    render_lock: threading.Lock

    @classmethod
    def load(cls, source: Source) -> Tokenizers:
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": source.gguf_file} if source.kind == "gguf" else {}
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        return cls(tokenizer, copy_tokenizer(tokenizer), threading.Lock(), threading.Lock())


@dataclass(slots=True)
class LoadedModel:
    model: Any
    tokenizer: Any  # tokenizers.decode
    device: torch.device
    dtype: torch.dtype
    max_context: int
    eos_ids: frozenset[int]
    defaults: GenerationDefaults
    chat_template: str
    source: Source
    tokenizers: Tokenizers
    # What a VL checkpoint takes (images; video when vision.video is set); None for text-only models.
    vision: VisionSpec | None = None


class _Fail(Exception):
    """A load step's failure, already phrased for the one-line StartupError."""


def resolve_source(config: LocalModelConfig) -> Source:
    """Where the weights are, without loading anything."""
    raw = config.path
    if not raw:
        raise _Fail("no path configured (expected a checkpoint directory, a .gguf file or a repo id)")
    path = Path(raw).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise _Fail(f"{raw} is a file but not a .gguf file; pass a checkpoint directory or a .gguf")
        return Source("gguf", str(path.parent), path.name)
    if path.is_dir():
        if config.gguf_file:
            if not (path / config.gguf_file).is_file():
                raise _Fail(f"{config.gguf_file} not found in {raw}")
            return Source("gguf", str(path), config.gguf_file)
        if (path / "config.json").is_file():
            return Source("dir", str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Source("gguf", str(path), ggufs[0])
        if ggufs:
            raise _Fail(f"{raw} holds several .gguf files; choose one with gguf_file ({', '.join(ggufs)})")
        raise _Fail(f"{raw} has no config.json: not a Hugging Face checkpoint directory")
    if _REPO_ID.match(raw) and not raw.startswith((".", "~")):
        return Source("hub", raw, config.gguf_file)
    raise _Fail(f"path {raw} does not exist")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise _Fail(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _Fail(f"device {name!r} requested but CUDA is not available")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # On CPU bf16 matmuls run about half as fast as fp32; on GPUs bf16 is the native format.
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load(
    config: LocalModelConfig,
    settings: Settings,
    console: Console | None = None,
    shared: SharedLoads | None = None,
) -> LoadedModel:
    """Load ``config``'s checkpoint. Raises StartupError("model 'id': ...") on every failure. With
    ``shared``, the checkpoint's tokenizers are the ones an earlier entry on it loaded, if one did."""
    console = console or Console(stderr=True, soft_wrap=True)
    started = time.monotonic()
    try:
        source = resolve_source(config)
        device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, device)
        if source.kind == "hub":
            source = _download(source, config, settings, console)
        with Steps(console, f"Loading model {config.id} from {source.describe()}…") as steps:
            loaded = _load(source, device, dtype, steps, config.id, shared, packed=config.packed_linear)
        # The sampler's compiled loops: compiled on a first run, else loaded from numba's disk cache,
        # here rather than on the first request.
        kernels.warm()
    except StartupError:
        raise
    except _Fail as exc:
        raise StartupError(f"model {config.id!r}: {exc}") from None
    except Exception as exc:
        log.debug("loading model %s failed", config.id, exc_info=True)
        raise StartupError(f"model {config.id!r}: {_explain(exc)}") from None
    console.print(
        f"[green]✓[/] model [cyan]{config.id}[/] ready in {time.monotonic() - started:.1f} s "
        f"({type(loaded.model).__name__}, {str(dtype).removeprefix('torch.')}, {device}, "
        f"context {loaded.max_context})"
    )
    return loaded


def _download(source: Source, config: LocalModelConfig, settings: Settings, console: Console) -> Source:
    repo = source.location
    if not settings.allow_downloads:
        raise _Fail(f"{repo} looks like a Hugging Face repo id but downloads are disabled; pass a local dir")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = (
        ["*.json", "*.jinja", source.gguf_file]
        if source.gguf_file
        else ["*.json", "*.jinja", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
    )
    console.print(f"Downloading {repo} from the Hugging Face hub (cached under HF_HOME)…", highlight=False)
    started = time.monotonic()
    try:
        # On a terminal the hub's own bars show each file's bytes, rate and ETA; elsewhere they would
        # fill the log with carriage-return frames, so one line reports the finished download instead.
        with _hub_progress_bars(console.is_terminal):
            local = snapshot_download(repo, revision=config.revision, allow_patterns=patterns)
    except GatedRepoError:
        raise _Fail(f"{repo} is a gated repo on the Hugging Face hub; download it and pass the dir") from None
    except RepositoryNotFoundError:
        raise _Fail(f"no repo {repo} on the Hugging Face hub (or it is private)") from None
    except RevisionNotFoundError:
        raise _Fail(f"revision {config.revision!r} not found in {repo}") from None
    except (LocalEntryNotFoundError, OSError) as exc:
        # Offline, DNS failure, proxy refusal: all surface here once the local cache has no copy.
        log.debug("hub download of %s failed: %s", repo, exc)
        raise _Fail(
            f"could not reach the Hugging Face hub to download {repo}; pass a local checkpoint "
            "directory instead (--model ID=/path/to/checkpoint)"
        ) from None
    console.print(f"  downloaded {repo}: {time.monotonic() - started:.1f} s", highlight=False)
    if source.gguf_file:
        return Source("gguf", local, source.gguf_file)
    return Source("dir", local)


@contextlib.contextmanager
def _hub_progress_bars(enabled: bool) -> Iterator[None]:
    """Turn the hub's download bars off for the block unless ``enabled`` (and the user has not)."""
    import huggingface_hub.utils

    hub: Any = huggingface_hub.utils  # the switches are public API but not re-exported for type checkers
    if enabled or hub.are_progress_bars_disabled():
        yield
        return
    hub.disable_progress_bars()  # a function in older hubs, a class in newer: calling it disables either way
    try:
        yield
    finally:
        hub.enable_progress_bars()


def _load(
    source: Source,
    device: torch.device,
    dtype: torch.dtype,
    steps: Steps,
    model_id: str,
    shared: SharedLoads | None,
    *,
    packed: bool = True,
) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    kwargs: dict[str, Any] = {}
    vision: VisionSpec | None = None
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
    else:
        _check_config(Path(source.location))
        # Cheap, and names an unknown model type before the tokenizer fails for a vaguer reason.
        hf_config = AutoConfig.from_pretrained(source.location)
        # Qwen-VL checkpoints (a vision tower in the config) load with their image-text-to-text class.
        vision = VisionSpec.from_checkpoint(Path(source.location), hf_config)
    auto_class: Any = AutoModelForImageTextToText if vision is not None else AutoModelForCausalLM
    with _progress_bars_as_steps(steps):
        with steps.step("tokenizer") as step:
            if shared is None:
                tokenizers = Tokenizers.load(source)
            else:
                # The same files give the same tokenizer: keyed by where they are (a resolved source).
                tokenizers, owner = shared.get_or_load(
                    ("local-tokenizers", source), model_id, lambda: Tokenizers.load(source)
                )
                if owner != model_id:
                    step.name = f"tokenizer (shared with {owner})"
        tokenizer = tokenizers.decode
        try:
            with steps.step("model (all steps)"):
                model: Any = auto_class.from_pretrained(
                    source.location,
                    dtype=dtype,
                    device_map=str(device) if device.type != "cpu" else None,
                    **kwargs,
                )
        except ValueError as exc:
            # Raised before any weight is read when the config's class has no causal-LM head.
            if "Unrecognized configuration class" not in str(exc):
                raise
            raise _Fail(
                f"architecture {_architecture(source)} is not supported by the local engine "
                "(causal language models and Qwen-VL image-text-to-text models)"
            ) from None
    model.eval()
    # The output layer's and large layers' products through oneDNN on packed weights (cpu_matmul.py),
    # unless the entry turns it off (``packed_linear = false``).
    if packed:
        cpu_matmul.pack_model(model, device, dtype)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one renders chats
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise _Fail("the checkpoint has no chat template (a base model, not an instruct/chat model?)")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        max_context=_max_context(model, tokenizer),
        eos_ids=_eos_ids(model, tokenizer),
        defaults=GenerationDefaults.from_generation_config(getattr(model, "generation_config", None)),
        chat_template=template,
        source=source,
        tokenizers=tokenizers,
        vision=vision,
    )


def _architecture(source: Source) -> str:
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((Path(source.location) / "config.json").read_text(encoding="utf-8"))
        names = config.get("architectures") or [config.get("model_type")]
        return ", ".join(str(n) for n in names)
    return "of this checkpoint"


def _check_config(directory: Path) -> None:
    try:
        json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise _Fail(f"{directory / 'config.json'} is not valid JSON ({exc})") from None


def _max_context(model: Any, tokenizer: Any) -> int:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    # GGUF checkpoints carry their context length into max_position_embeddings on conversion.
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10_000_000:  # transformers' "unset" is ~1e30
        return value
    return _FALLBACK_CONTEXT


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for value in (
        tokenizer.eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


# transformers' own tqdm loops while loading, as ``module: label``. Each is looked up by name and used only
# where it exists, so a transformers release that moves one loses that row, never the load.
_TQDM_LOOPS = {
    "transformers.modeling_gguf_pytorch_utils": "de-quantizing GGUF tensors",
    "transformers.core_model_loading": "loading weights",
}


class _StepBar:
    """Stands in for tqdm inside transformers' loaders: the iteration becomes a row of our display."""

    def __init__(self, steps: Steps, label: str, iterable: Any = None, total: Any = None) -> None:
        self._steps, self._label, self._iterable = steps, label, iterable
        self._total = total if isinstance(total, int) else None

    def __iter__(self) -> Iterator[Any]:
        if self._iterable is None:
            return iter(())
        return self._steps.track(self._iterable, self._label, self._total)

    def __len__(self) -> int:
        return len(self._iterable) if self._iterable is not None else 0

    def __enter__(self) -> _StepBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        # update(), close(), set_postfix(), ... outside a loop: nothing to show.
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _progress_bars_as_steps(steps: Steps) -> Iterator[None]:
    """transformers' tqdm bars become rows of ``steps`` (they would garble a live display and fill logs
    with carriage returns); any other bar transformers draws is switched off for the load."""
    import importlib

    from transformers.utils import logging as transformers_logging

    hf_logging: Any = transformers_logging
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    patched: list[tuple[Any, Any]] = []
    for name, label in _TQDM_LOOPS.items():
        try:
            module: Any = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "tqdm"):
            patched.append((module, module.tqdm))

            def bar(iterable: Any = None, *args: Any, _label: str = label, **kwargs: Any) -> _StepBar:
                return _StepBar(steps, _label, iterable, kwargs.get("total"))

            module.tqdm = bar
    try:
        yield
    finally:
        for module, original in patched:
            module.tqdm = original
        if enabled:
            hf_logging.enable_progress_bar()


def _explain(exc: BaseException) -> str:
    """One line for a load failure, whatever raised it."""
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "out of memory while loading the weights (try a smaller model or dtype)"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 300:
        text = text[:297] + "..."
    return f"could not load the checkpoint: {text}"
