"""The built-in catalog of DashScope model ids and what each one accepts.

A configured model's id (``[[models]] id = "qwen-plus"``) picks its behaviour here: context and output
limits, thinking, stream-only rules, search, tools, prices. :func:`resolve_spec` then applies the
config's overrides and the engine's real limits. The catalog never decides *which* models are served;
only configured ids are.

Sources: ``shared/reference/dashscope-api.md`` §6 and the model lists in seeds 000/001/003. Limits and
prices the sources don't state are the figures from Model Studio's model pages as we last knew them:
approximate, and overridable per model in the config file.

Prices are CNY per 1K tokens. Where seed 003 (a reseller's list) gives a price it is used for both input
and output, because that list quotes one blended rate per model.

Ids are case-sensitive, as on DashScope (``Qwen-Plus`` is not ``qwen-plus``). Snapshot and region ids
(``qwen-plus-latest``, ``qwen-plus-2025-04-28``, ``qwen-max-0428``, ``qwen3-vl-flash-2025-10-15-us``)
resolve to their base entry's spec under their own id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Literal

from qwen_gateway.engines.base import Capabilities
from qwen_gateway.settings import ModelConfig

TEXT = frozenset({"text"})
IMAGE = frozenset({"text", "image"})
VISION = frozenset({"text", "image", "video"})
OMNI = frozenset({"text", "image", "video", "audio"})

# DashScope's /models owned_by is unconfirmed (reference §8); "system" is what OpenAI-style servers use.
CATALOG_OWNER = "system"
LOCAL_OWNER = "qwen-gateway"
# Context assumed for an id that is neither in the catalog nor backed by a started engine.
FALLBACK_CONTEXT = 32_768


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """What a model id accepts. Token limits are per request; prices are CNY per 1K tokens."""

    id: str
    family: str  # "qwen3", "qwen2.5", "qwen-vl", "qvq", "qwq", "qwen-mt", "qwen-long", ..., "other"
    modalities: frozenset[str] = TEXT  # input kinds: "text", "image", "video", "audio"
    context_length: int  # prompt + completion
    max_input: int
    max_output: int
    supports_thinking: bool = False
    thinking_default: bool = False  # enable_thinking when the request doesn't say
    # Non-streaming calls are refused whatever the thinking mode (QwQ, QVQ, Omni).
    stream_only: bool = False
    supports_search: bool = False
    supports_tools: bool = True
    supports_n: bool = False
    input_price: float = 0.0
    output_price: float = 0.0
    owned_by: str = CATALOG_OWNER
    # The model always thinks; enable_thinking can't turn it off (QwQ, QVQ, *-thinking-2507).
    thinking_fixed: bool = False
    # Non-streaming calls are refused while thinking is on (Qwen3 open-source hybrids: "enable_thinking
    # must be set to false for non-streaming calls"; qwen-plus/turbo/flash in thinking mode).
    thinking_stream_only: bool = False
    # Qwen-OCR: takes ocr_options and sizes images with OCR's own default pixel bounds.
    ocr: bool = False

    def thinking_enabled(self, requested: bool | None) -> bool:
        """Whether a call thinks, given the request's ``enable_thinking`` (None: not sent)."""
        if not self.supports_thinking:
            return False
        if self.thinking_fixed or requested is None:
            return self.thinking_default
        return requested

    def requires_stream(self, *, thinking: bool) -> bool:
        """Whether a call in this thinking mode must use ``stream=true``."""
        return self.stream_only or (thinking and self.thinking_stream_only)


Thinking = Literal["none", "off", "on", "always"]  # off/on: hybrid with that default
Streaming = Literal["any", "thinking", "always"]  # when stream=true is required


def _m(
    model_id: str,
    family: str,
    context: int,
    max_input: int,
    max_output: int,
    input_price: float,
    output_price: float | None = None,
    *,
    modalities: frozenset[str] = TEXT,
    thinking: Thinking = "none",
    stream: Streaming = "any",
    search: bool = False,
    tools: bool = True,
    n: bool = False,
) -> ModelSpec:
    return ModelSpec(
        id=model_id,
        family=family,
        modalities=modalities,
        context_length=context,
        max_input=max_input,
        max_output=max_output,
        supports_thinking=thinking != "none",
        thinking_default=thinking in ("on", "always"),
        thinking_fixed=thinking == "always",
        stream_only=stream == "always",
        thinking_stream_only=stream == "thinking",
        supports_search=search,
        supports_tools=tools,
        supports_n=n,
        input_price=input_price,
        output_price=input_price if output_price is None else output_price,
    )


_K128 = (131_072, 129_024, 8_192)
_K32 = (32_768, 30_720, 8_192)
_M1 = (1_000_000, 1_000_000, 8_192)
_VL_OSS = (131_072, 126_976, 32_768)
_Q3_VL = (262_144, 260_096, 32_768)
_Q3_OSS = (131_072, 129_024, 16_384)
_Q3_2507_INSTRUCT = (262_144, 258_048, 32_768)
_Q3_2507_THINKING = (131_072, 126_976, 32_768)
_QWQ = (131_072, 98_304, 8_192)
_QVQ = (131_072, 106_496, 8_192)
_Q2 = (131_072, 128_000, 6_144)
_MATH = (4_096, 3_072, 3_072)
_MT = (16_384, 8_192, 8_192)
_CODER3 = (262_144, 204_800, 65_536)
_Q35 = (1_000_000, 991_808, 65_536)

# fmt: off
_ENTRIES: tuple[ModelSpec, ...] = (
    # Commercial text models. qwen-plus/turbo/flash are Qwen3 hybrids (thinking off unless asked, and
    # thinking needs streaming); qwen-max is Qwen2.5 without thinking. "n" is documented for qwen-plus
    # and the Qwen3 open-source models (non-thinking) only.
    _m("qwen-max", "qwen2.5", 32_768, 30_720, 8_192, 0.0125, search=True),
    _m("qwen-plus", "qwen3", 131_072, 129_024, 16_384, 0.0025, thinking="off", stream="thinking", search=True,
       n=True),
    _m("qwen-turbo", "qwen3", 1_000_000, 1_000_000, 16_384, 0.0008, thinking="off", stream="thinking",
       search=True),
    _m("qwen-flash", "qwen3", 1_000_000, 997_952, 32_768, 0.00015, 0.0015, thinking="off", stream="thinking",
       search=True),
    _m("qwen3-max", "qwen3", 262_144, 258_048, 65_536, 0.006, 0.024, thinking="off", search=True),
    _m("qwen3-max-preview", "qwen3", 262_144, 258_048, 65_536, 0.006, 0.024, thinking="off", search=True),
    _m("qwen3.5-plus", "qwen3.5", *_Q35, 0.0008, 0.0048, modalities=VISION, thinking="on", search=True),
    _m("qwen3.5-flash", "qwen3.5", *_Q35, 0.0002, 0.002, modalities=VISION, thinking="on", search=True),
    _m("qwen3.6-plus", "qwen3.6", *_Q35, 0.0008, 0.0048, modalities=VISION, thinking="on", search=True),
    _m("qwen-long", "qwen-long", 10_000_000, 10_000_000, 8_192, 0.0029, tools=False),
    # Qwen3 open source: hybrid, thinking ON by default, non-streaming only with enable_thinking=false.
    _m("qwen3-235b-a22b", "qwen3", *_Q3_OSS, 0.002, 0.008, thinking="on", stream="thinking", n=True),
    _m("qwen3-32b", "qwen3", *_Q3_OSS, 0.002, 0.008, thinking="on", stream="thinking", n=True),
    _m("qwen3-30b-a3b", "qwen3", *_Q3_OSS, 0.00075, 0.003, thinking="on", stream="thinking", n=True),
    _m("qwen3-14b", "qwen3", *_Q3_OSS, 0.001, 0.004, thinking="on", stream="thinking", n=True),
    _m("qwen3-8b", "qwen3", *_Q3_OSS, 0.0005, 0.002, thinking="on", stream="thinking", n=True),
    _m("qwen3-4b", "qwen3", *_K32, 0.0003, 0.0012, thinking="on", stream="thinking", n=True),
    _m("qwen3-1.7b", "qwen3", *_K32, 0.0003, 0.0012, thinking="on", stream="thinking", n=True),
    _m("qwen3-0.6b", "qwen3", *_K32, 0.0003, 0.0012, thinking="on", stream="thinking", n=True),
    # Qwen3 2507 and Next: fixed modes. Thinking variants always think, so they are effectively stream-only.
    _m("qwen3-235b-a22b-instruct-2507", "qwen3", *_Q3_2507_INSTRUCT, 0.002, 0.008, n=True),
    _m("qwen3-235b-a22b-thinking-2507", "qwen3", *_Q3_2507_THINKING, 0.002, 0.02, thinking="always",
       stream="thinking"),
    _m("qwen3-30b-a3b-instruct-2507", "qwen3", *_Q3_2507_INSTRUCT, 0.00075, 0.003, n=True),
    _m("qwen3-30b-a3b-thinking-2507", "qwen3", *_Q3_2507_THINKING, 0.00075, 0.0075, thinking="always",
       stream="thinking"),
    _m("qwen3-next-80b-a3b-instruct", "qwen3", *_Q3_2507_INSTRUCT, 0.001, 0.004),
    _m("qwen3-next-80b-a3b-thinking", "qwen3", *_Q3_2507_THINKING, 0.001, 0.01, thinking="always",
       stream="thinking"),
    # QwQ / QVQ: always think, stream only. The -preview models print their reasoning inline.
    _m("qwq-plus", "qwq", *_QWQ, 0.0016, 0.004, thinking="always", stream="always"),
    _m("qwq-32b", "qwq", *_QWQ, 0.002, 0.006, thinking="always", stream="always"),
    _m("qwq-32b-preview", "qwq", 32_768, 30_720, 16_384, 0.008),
    _m("qvq-max", "qvq", *_QVQ, 0.008, 0.032, modalities=VISION, thinking="always", stream="always",
       tools=False),
    _m("qvq-plus", "qvq", *_QVQ, 0.002, 0.005, modalities=VISION, thinking="always", stream="always",
       tools=False),
    _m("qvq-72b-preview", "qvq", 32_768, 16_384, 16_384, 0.046, modalities=IMAGE, stream="always",
       tools=False),
    # Vision. Qwen2.5-VL-based qwen-vl-max/plus and the open Qwen2/2.5-VL take no tools (older docs).
    _m("qwen-vl-max", "qwen-vl", *_K128, 0.0115, modalities=VISION, tools=False),
    _m("qwen-vl-plus", "qwen-vl", *_K128, 0.006, modalities=VISION, tools=False),
    replace(_m("qwen-vl-ocr", "qwen-vl", 34_816, 30_720, 4_096, 0.0065, modalities=IMAGE, tools=False),
            ocr=True),
    _m("qwen3-vl-plus", "qwen-vl", *_Q3_VL, 0.001, 0.01, modalities=VISION, thinking="off"),
    _m("qwen3-vl-flash", "qwen-vl", *_Q3_VL, 0.00015, 0.0015, modalities=VISION, thinking="off"),
    _m("qwen3-vl-235b-a22b-instruct", "qwen-vl", *_VL_OSS, 0.002, 0.008, modalities=VISION),
    _m("qwen3-vl-235b-a22b-thinking", "qwen-vl", *_VL_OSS, 0.002, 0.02, modalities=VISION, thinking="always",
       stream="thinking"),
    _m("qwen3-vl-32b-instruct", "qwen-vl", *_VL_OSS, 0.002, 0.008, modalities=VISION),
    _m("qwen3-vl-32b-thinking", "qwen-vl", *_VL_OSS, 0.002, 0.02, modalities=VISION, thinking="always",
       stream="thinking"),
    _m("qwen3-vl-30b-a3b-instruct", "qwen-vl", *_VL_OSS, 0.00075, 0.003, modalities=VISION),
    _m("qwen3-vl-30b-a3b-thinking", "qwen-vl", *_VL_OSS, 0.00075, 0.0075, modalities=VISION,
       thinking="always", stream="thinking"),
    _m("qwen3-vl-8b-instruct", "qwen-vl", *_VL_OSS, 0.0005, 0.002, modalities=VISION),
    _m("qwen3-vl-8b-thinking", "qwen-vl", *_VL_OSS, 0.0005, 0.005, modalities=VISION, thinking="always",
       stream="thinking"),
    _m("qwen2.5-vl-72b-instruct", "qwen-vl", *_K128, 0.0615, modalities=VISION, tools=False),
    _m("qwen2.5-vl-32b-instruct", "qwen-vl", *_K128, 0.008, 0.024, modalities=VISION, tools=False),
    _m("qwen2.5-vl-7b-instruct", "qwen-vl", *_K128, 0.0065, modalities=VISION, tools=False),
    _m("qwen2.5-vl-3b-instruct", "qwen-vl", *_K128, 0.0045, modalities=VISION, tools=False),
    _m("qwen2-vl-72b-instruct", "qwen-vl", 32_768, 30_720, 2_048, 0.0615, modalities=VISION, tools=False),
    _m("qwen2-vl-7b-instruct", "qwen-vl", 32_768, 30_720, 2_048, 0.002, 0.005, modalities=VISION,
       tools=False),
    _m("qwen2-vl-2b-instruct", "qwen-vl", 32_768, 30_720, 2_048, 0.0008, 0.002, modalities=VISION,
       tools=False),
    # Open-source Qwen2.5 / Qwen2 / Qwen1.5 text models.
    _m("qwen2.5-72b-instruct", "qwen2.5", *_K128, 0.0155),
    _m("qwen2.5-32b-instruct", "qwen2.5", *_K128, 0.008),
    _m("qwen2.5-14b-instruct", "qwen2.5", *_K128, 0.004),
    _m("qwen2.5-7b-instruct", "qwen2.5", *_K128, 0.0015),
    _m("qwen2.5-3b-instruct", "qwen2.5", *_K32, 0.001),
    _m("qwen2.5-1.5b-instruct", "qwen2.5", *_K32, 0.0003, 0.0006),
    _m("qwen2.5-0.5b-instruct", "qwen2.5", *_K32, 0.0003, 0.0006),
    _m("qwen2.5-14b-instruct-1m", "qwen2.5", *_M1, 0.004),
    _m("qwen2.5-7b-instruct-1m", "qwen2.5", *_M1, 0.0015),
    _m("qwen2-72b-instruct", "qwen2", *_Q2, 0.0155),
    _m("qwen2-57b-a14b-instruct", "qwen2", 65_536, 63_488, 6_144, 0.009),
    _m("qwen2-7b-instruct", "qwen2", *_Q2, 0.0025),
    _m("qwen2-1.5b-instruct", "qwen2", 32_768, 30_720, 6_144, 0.001),
    _m("qwen2-0.5b-instruct", "qwen2", 32_768, 30_720, 6_144, 0.001),
    _m("qwen1.5-110b-chat", "qwen1.5", *_K32, 0.018, tools=False),
    _m("qwen1.5-72b-chat", "qwen1.5", *_K32, 0.013, tools=False),
    _m("qwen1.5-32b-chat", "qwen1.5", *_K32, 0.009, tools=False),
    _m("qwen1.5-14b-chat", "qwen1.5", *_K32, 0.0055, tools=False),
    _m("qwen1.5-7b-chat", "qwen1.5", *_K32, 0.0025, tools=False),
    # Code.
    _m("qwen-coder-plus", "qwen-coder", *_K128, 0.009),
    _m("qwen-coder-turbo", "qwen-coder", *_K128, 0.008),
    _m("qwen2.5-coder-32b-instruct", "qwen-coder", *_K128, 0.008),
    _m("qwen2.5-coder-14b-instruct", "qwen-coder", *_K128, 0.008),
    _m("qwen2.5-coder-7b-instruct", "qwen-coder", *_K128, 0.0025),
    _m("qwen3-coder-plus", "qwen-coder", 1_000_000, 997_952, 65_536, 0.004, 0.016),
    _m("qwen3-coder-flash", "qwen-coder", 1_000_000, 997_952, 65_536, 0.001, 0.004),
    _m("qwen3-coder-next", "qwen-coder", 262_144, 258_048, 65_536, 0.001, 0.004),
    _m("qwen3-coder-480b-a35b-instruct", "qwen-coder", *_CODER3, 0.006, 0.024),
    _m("qwen3-coder-30b-a3b-instruct", "qwen-coder", *_CODER3, 0.0015, 0.006),
    # Math: tool calling is not recommended for these.
    _m("qwen-math-plus", "qwen-math", *_MATH, 0.0155, tools=False),
    _m("qwen-math-turbo", "qwen-math", *_MATH, 0.008, tools=False),
    _m("qwen2.5-math-72b-instruct", "qwen-math", *_MATH, 0.0155, tools=False),
    _m("qwen2.5-math-7b-instruct", "qwen-math", *_MATH, 0.0025, tools=False),
    _m("qwen2.5-math-1.5b-instruct", "qwen-math", *_MATH, 0.001, tools=False),
    _m("qwen2-math-72b-instruct", "qwen-math", *_MATH, 0.0155, tools=False),
    _m("qwen2-math-7b-instruct", "qwen-math", *_MATH, 0.0025, tools=False),
    # Translation (translation_options).
    _m("qwen-mt-plus", "qwen-mt", *_MT, 0.0575, tools=False),
    _m("qwen-mt-turbo", "qwen-mt", *_MT, 0.004, tools=False),
    _m("qwen-mt-flash", "qwen-mt", *_MT, 0.0007, 0.00195, tools=False),
    _m("qwen-mt-lite", "qwen-mt", *_MT, 0.0006, 0.0016, tools=False),
    # Omni: image/audio/video in, stream only.
    _m("qwen-omni-turbo", "qwen-omni", 32_768, 30_720, 2_048, 0.0004, 0.0016, modalities=OMNI,
       stream="always", tools=False),
    _m("qwen3-omni-flash", "qwen-omni", 65_536, 49_152, 16_384, 0.0018, 0.0069, modalities=OMNI,
       thinking="off", stream="always"),
    _m("qwen2.5-omni-7b", "qwen-omni", 32_768, 30_720, 2_048, 0.0006, 0.0024, modalities=OMNI,
       stream="always", tools=False),
    _m("farui-plus", "other", 12_000, 12_000, 2_000, 0.027, tools=False),
)
# fmt: on

_CATALOG: MappingProxyType[str, ModelSpec] = MappingProxyType({s.id: s for s in _ENTRIES})

# Suffixes stripped (repeatedly, after an exact lookup fails) to reach a base entry: the US-region
# suffix, "-latest", dated snapshots, and the older month-day snapshots ("-0428", "-1101"). The MMDD
# pattern accepts only real months and days, so "...-2507" (a model generation, not a snapshot) is never
# stripped; those ids are catalog entries of their own anyway.
_SNAPSHOT_SUFFIXES: tuple[re.Pattern[str], ...] = (
    re.compile(r"-us$"),
    re.compile(r"-latest$"),
    re.compile(r"-\d{4}-\d{2}-\d{2}$"),
    re.compile(r"-(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])$"),
)


def builtin_spec(model_id: str) -> ModelSpec | None:
    """The catalog's spec for ``model_id`` (exact, case-sensitive; snapshots resolve to their base)."""
    base = model_id
    while True:
        spec = _CATALOG.get(base)
        if spec is not None:
            return spec if base == model_id else replace(spec, id=model_id)
        stripped = _strip_suffix(base)
        if stripped is None:
            return None
        base = stripped


def catalog_ids() -> tuple[str, ...]:
    """Every base id in the catalog (snapshots not listed)."""
    return tuple(_CATALOG)


def _strip_suffix(model_id: str) -> str | None:
    for pattern in _SNAPSHOT_SUFFIXES:
        stripped = pattern.sub("", model_id, count=1)
        if stripped != model_id and stripped:
            return stripped
    return None


def resolve_spec(config: ModelConfig, capabilities: Capabilities | None) -> ModelSpec:
    """The effective spec of a served model.

    The catalog entry for ``config.id`` (or, for an id the catalog doesn't know, one derived from the
    engine's capabilities: its context, tools and thinking support, text and image/video as the engine
    declares, no search, free, owned by "qwen-gateway"), then every non-None catalog override in the
    config, then the engine's real limits: a model can't take more context or produce more output than
    the engine behind it, whatever the catalog or config say.
    """
    spec = builtin_spec(config.id) or _derived_spec(config.id, capabilities)
    spec = _apply_overrides(spec, config)
    if capabilities is not None:
        spec = _clamp(spec, capabilities.max_context, capabilities.max_output)
    return spec


def _derived_spec(model_id: str, capabilities: Capabilities | None) -> ModelSpec:
    if capabilities is None:
        return ModelSpec(
            id=model_id,
            family="other",
            context_length=FALLBACK_CONTEXT,
            max_input=FALLBACK_CONTEXT,
            max_output=FALLBACK_CONTEXT,
            supports_n=True,
            owned_by=LOCAL_OWNER,
        )
    modalities = set(TEXT)
    if capabilities.vision:
        modalities.add("image")
    if capabilities.video:
        modalities.add("video")
    context = capabilities.max_context
    return ModelSpec(
        id=model_id,
        family="other",
        modalities=frozenset(modalities),
        context_length=context,
        max_input=context,
        max_output=min(context, capabilities.max_output or context),
        # Thinking is offered if the engine can, but stays off unless the request (or config) asks.
        supports_thinking=capabilities.reasoning,
        supports_tools=capabilities.tools,
        supports_n=True,
        owned_by=LOCAL_OWNER,
    )


def _apply_overrides(spec: ModelSpec, config: ModelConfig) -> ModelSpec:
    if config.context_length is not None:
        spec = _with_context(spec, config.context_length)
    if config.max_output is not None:
        spec = replace(spec, max_output=min(config.max_output, spec.context_length))
    if config.family is not None:
        spec = replace(spec, family=config.family)
    if config.input_price is not None:
        spec = replace(spec, input_price=config.input_price)
    if config.output_price is not None:
        spec = replace(spec, output_price=config.output_price)
    if config.stream_only is True:
        spec = replace(spec, stream_only=True)
    elif config.stream_only is False:
        # "Accepts non-streaming calls", in any thinking mode.
        spec = replace(spec, stream_only=False, thinking_stream_only=False)
    spec = _apply_thinking(spec, config.supports_thinking, config.thinking_default)
    return spec


def _apply_thinking(spec: ModelSpec, supports: bool | None, default: bool | None) -> ModelSpec:
    if supports is False:
        return replace(spec, supports_thinking=False, thinking_default=False, thinking_fixed=False)
    if supports is True:
        spec = replace(spec, supports_thinking=True)
    if default is not None:
        # Asking for thinking by default implies the model can think (unless explicitly denied above).
        spec = replace(spec, thinking_default=default, supports_thinking=spec.supports_thinking or default)
        if not default:
            spec = replace(spec, thinking_fixed=False)
    return spec


def _with_context(spec: ModelSpec, context: int) -> ModelSpec:
    # A larger context than the catalog's lifts the input limit with it; a smaller one caps both limits.
    max_input = context if context > spec.context_length else min(spec.max_input, context)
    return replace(
        spec, context_length=context, max_input=max_input, max_output=min(spec.max_output, context)
    )


def _clamp(spec: ModelSpec, max_context: int, max_output: int | None) -> ModelSpec:
    if max_context < spec.context_length:
        spec = _with_context(spec, max_context)
    if max_output is not None and max_output < spec.max_output:
        spec = replace(spec, max_output=max_output)
    return spec
