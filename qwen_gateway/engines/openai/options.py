"""The ``openai`` and ``dashscope`` engines' options in a ``[[models]]`` entry.

An upstream is named by URL (``base_url`` for one server, ``replicas`` for several serving the same
model); its key is never in the config file, only the name of the environment variable that holds it
(``api_key_env``), read once at start into a :class:`~pydantic.SecretStr`.
"""

from __future__ import annotations

import re
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from qwen_gateway.engines.openai.urls import redact_url
from qwen_gateway.settings import EngineConfig

Modality = Literal["text", "image", "video"]

# What a POSIX shell (and a container's env list) takes as a variable name.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# DashScope's compatible-mode hosts by region (reference §1.1). Keys are per region.
DASHSCOPE_REGIONS: dict[str, str] = {
    "cn-beijing": "https://dashscope.aliyuncs.com/compatible-mode/v1",
    "singapore": "https://dashscope-intl.aliyuncs.com/compatible-mode/v1",
    "us-virginia": "https://dashscope-us.aliyuncs.com/compatible-mode/v1",
    "cn-hongkong": "https://cn-hongkong.dashscope.aliyuncs.com/compatible-mode/v1",
}


class OpenAIModelConfig(EngineConfig):
    # One upstream (".../v1") or several replicas of the same model; exactly one of the two.
    base_url: str | None = None
    replicas: tuple[str, ...] = ()
    # The model name the upstream knows (vLLM's --served-model-name); default: this entry's id.
    upstream_model: str | None = None
    # Environment variable holding the upstream's key (sent as "Authorization: Bearer ..."); None: none.
    api_key_env: str | None = None
    # Seconds: to open a connection; from sending the request to its first streamed event (prefill
    # included); between two events of a stream once it has started.
    connect_timeout: float = Field(default=5.0, gt=0)
    first_byte_timeout: float = Field(default=60.0, gt=0)
    idle_timeout: float = Field(default=30.0, gt=0)
    # Seconds for a non-streamed call (a client that did not stream): from sending the request to its
    # whole answer read (the upstream answers only once it has generated everything, so first_byte /
    # idle timeouts can't apply). A replica that takes longer is given up and the next one tried.
    answer_timeout: float = Field(default=600.0, gt=0)
    # Requests in flight to the upstream at once, per entry across its replicas (the rest wait in
    # order, up to max_queue: gate.py), and the pool's keep-alive connections (shared by all replicas).
    max_concurrency: int = Field(default=64, ge=1, le=4096)
    max_connections: int = Field(default=256, ge=1)
    # What an id outside the built-in catalog accepts (for catalog ids the catalog says it).
    modalities: tuple[Modality, ...] = ("text",)
    # The upstream separates reasoning (vLLM --reasoning-parser, Ollama): thinking may be switched.
    reasoning: bool = False
    # The upstream's chat template enforces chat_template_kwargs.thinking_budget; without it a request's
    # thinking_budget is refused rather than ignored.
    thinking_budget: bool = False
    # A local checkpoint directory with the model's tokenizer (tokenizer.json + tokenizer_config.json):
    # used to count tokens when the upstream reports no usage or a stream is cut short. Without it such
    # counts are estimated (4 bytes a token) and the server log says so once.
    tokenizer: str | None = None
    # Active health checks (GET <replica>/models) and the circuit breaker: a replica with this many
    # failures in a row is skipped for cool_down seconds, then tried with one request.
    health_interval: float = Field(default=5.0, gt=0)
    breaker_failures: int = Field(default=3, ge=1)
    breaker_cooldown: float = Field(default=10.0, gt=0)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        # A key pasted here by mistake must not be echoed back (the error is printed and logged).
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError(
                "must be the NAME of an environment variable (letters, digits and _, not starting with "
                "a digit), not the key itself; the value given is not one (not shown: it may be a key)"
            )
        return value

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if (self.base_url is None) == (not self.replicas):
            raise ValueError("give exactly one of base_url or replicas")
        for url in self.urls:
            shown = redact_url(url)  # a URL may carry credentials: never echoed as given
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"upstream URL {shown!r} must start with http:// or https://")
            try:
                host = urlsplit(url).hostname
            except ValueError:
                host = None
            if not host:
                raise ValueError(f"upstream URL {shown!r} has no valid host")
        return self

    @property
    def urls(self) -> tuple[str, ...]:
        """The replicas' base URLs, without a trailing slash."""
        urls = (self.base_url,) if self.base_url is not None else self.replicas
        return tuple(u.rstrip("/") for u in urls if u)


class DashScopeModelConfig(OpenAIModelConfig):
    """DashScope itself: a region's compatible-mode host (or ``base_url`` for another one, e.g. a
    workspace domain) and the key from ``DASHSCOPE_API_KEY`` unless ``api_key_env`` says otherwise."""

    region: Literal["cn-beijing", "singapore", "us-virginia", "cn-hongkong"] = "cn-beijing"
    api_key_env: str | None = "DASHSCOPE_API_KEY"
    # DashScope separates reasoning and enforces thinking_budget itself.
    reasoning: bool = True
    thinking_budget: bool = True

    @model_validator(mode="before")
    @classmethod
    def _region_url(cls, data: object) -> object:
        if isinstance(data, dict) and not data.get("base_url") and not data.get("replicas"):
            url = DASHSCOPE_REGIONS.get(str(data.get("region", "cn-beijing")))
            if url is not None:  # an unknown region is left to the Literal check, which names it
                data = {**data, "base_url": url}
        return data
