"""Native DashScope request -> the same :class:`ChatCall` compatible mode builds, plus the two choices
only the native protocol has (``result_format``, ``incremental_output``).

The native request is parsed (types, with native paths in the errors), its ``input`` and ``parameters``
are mapped one to one onto the compatible-mode schema, and that goes through the one validation
(``build_call_from``): same ranges, same messages, same engine request. A refusal found there names the
parameter by its native path (``parameters.temperature``, ``input.messages.0.content``).

Defaults per model family follow reference §1.5: ``result_format`` is ``text`` except for QwQ, Qwen3
open-source and Qwen-Long (and whatever thinks, calls tools or takes images: those need ``message``);
``incremental_output`` is false except for Qwen3 open-source, QwQ and QVQ, which can't turn it off, and
thinking, which needs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import ValidationError

from qwen_gateway.errors import ApiError, InvalidParameter, MissingField
from qwen_gateway.protocol.native import NativeContentIn, NativeMessageIn, NativeRequest
from qwen_gateway.service.catalog import TEXT, ModelSpec
from qwen_gateway.service.models import ModelRegistry
from qwen_gateway.service.search import PREPEND_MESSAGE
from qwen_gateway.service.validation import (
    ROLE_MESSAGE,
    STOP_TYPE_MESSAGE,
    UNEXPECTED_ITEM,
    ChatCall,
    _is_union_tag,
    _loc,
    build_call_from,
    validate_wire,
)

ResultFormat = Literal["text", "message"]

# Qwen3 open-source ids (qwen3-8b, qwen3-235b-a22b-instruct-2507, qwen3-next-80b-a3b-thinking), not
# the commercial qwen3-max or qwen3-coder-plus.
_QWEN3_OPEN = re.compile(r"^qwen3-(?:\d|next-)")
# Parameters that are native-only: read here, not passed to the shared validation.
_NATIVE_ONLY = frozenset({"result_format", "incremental_output", "stream"})
INCREMENTAL_THINKING_MESSAGE = 'The incremental_output parameter must be "true" when enable_thinking is true'


@dataclass(frozen=True, slots=True)
class NativeCall:
    """A validated native request: the shared call plus how the native protocol answers it."""

    chat: ChatCall
    result_format: ResultFormat
    incremental: bool
    # The multimodal endpoint answers content as a list of ``{"text"}`` objects.
    multimodal: bool


def _open_qwen3(spec: ModelSpec) -> bool:
    return spec.family == "qwen3" and _QWEN3_OPEN.match(spec.id) is not None


def native_param(param: str | None) -> str | None:
    """A compatible-mode parameter path -> where the same value sits in a native request."""
    if param is None or param == "model":
        return param
    if param.startswith("messages"):
        return "input." + param
    return "parameters." + param


def require_model_and_input(body: dict[str, Any]) -> None:
    """DashScope's own codes for a native body without ``model`` or ``input`` (reference §1.5)."""
    if body.get("model") in (None, ""):
        raise MissingField(
            'Required parameter "model" missing from request.',
            param="model",
            native_code="BadRequest.EmptyModel",
        )
    if not isinstance(body.get("input"), dict):
        raise MissingField(
            "Required input parameter missing from request.",
            param="input",
            native_code="BadRequest.EmptyInput",
        )


def parse_native(body: dict[str, Any]) -> NativeRequest:
    """dict -> native wire model; a missing part or a wrong type is a 400 naming its native path."""
    require_model_and_input(body)
    try:
        return NativeRequest.model_validate(body, strict=True)
    except ValidationError as exc:
        errors = exc.errors()
        if errors[0]["loc"][:2] == ("parameters", "stop"):
            raise InvalidParameter(STOP_TYPE_MESSAGE, param="parameters.stop") from None
        paths = [tuple(p for p in e["loc"] if not _is_union_tag(p)) for e in errors]
        best = max(range(len(errors)), key=lambda i: len(paths[i]))
        where = _loc(paths[best])
        raise InvalidParameter(f"{errors[best]['msg']}: {where}", param=where) from None


def _part(part: NativeContentIn, where: str) -> dict[str, Any]:
    """One single-key content object -> the compatible-mode part that means the same."""
    kinds = [k for k in ("text", "image", "video", "audio") if getattr(part, k) is not None]
    if len(kinds) != 1:
        raise InvalidParameter(UNEXPECTED_ITEM, param=where)
    kind = kinds[0]
    extra = dict(part.model_extra or {})
    if kind == "audio":
        raise InvalidParameter("Audio input is not supported by this server.", param=f"{where}.audio")
    if kind != "image" and (part.min_pixels is not None or part.max_pixels is not None):
        raise InvalidParameter("min_pixels and max_pixels apply to image parts only.", param=where)
    if kind == "text" and part.fps is not None:
        raise InvalidParameter("fps applies to video parts only.", param=f"{where}.fps")
    out: dict[str, Any]
    if kind == "text":
        out = {"type": "text", "text": part.text}
    elif kind == "image":
        image: dict[str, Any] = {"url": part.image}
        for name in ("min_pixels", "max_pixels"):
            if getattr(part, name) is not None:
                image[name] = getattr(part, name)
        out = {"type": "image_url", "image_url": image}
    elif isinstance(part.video, list):
        out = {"type": "video", "video": part.video}
    else:
        out = {"type": "video_url", "video_url": {"url": part.video}}
    if part.fps is not None:
        out["fps"] = part.fps
    return {**extra, **out}


def _message(message: NativeMessageIn, index: int) -> dict[str, Any]:
    out = message.model_dump(exclude_none=True, exclude={"content"})
    content = message.content
    if isinstance(content, list):
        out["content"] = [_part(p, f"input.messages.{index}.content.{j}") for j, p in enumerate(content)]
    elif content is not None:
        out["content"] = content
    return out


def _messages(req: NativeRequest) -> list[dict[str, Any]]:
    given, prompt = req.input.messages, req.input.prompt
    if given is None:
        if prompt is None:
            raise MissingField(
                "Required input parameter missing from request.",
                param="input",
                native_code="BadRequest.EmptyInput",
            )
        if not prompt:
            raise InvalidParameter(ROLE_MESSAGE, param="input.prompt")
        return [*_history(req), {"role": "user", "content": prompt}]
    if not given:
        # DashScope's answer to an empty list, with or without a prompt (captures: parameter-error).
        raise InvalidParameter(ROLE_MESSAGE, param="input.messages")
    if prompt:
        raise InvalidParameter(
            "input.prompt and input.messages can't both be given: put the prompt in the messages.",
            param="input.prompt",
        )
    if (req.input.model_extra or {}).get("history") is not None:
        raise InvalidParameter(
            "input.history goes with input.prompt; with input.messages, put the turns in the messages.",
            param="input.history",
        )
    return [_message(m, i) for i, m in enumerate(given)]


def _history(req: NativeRequest) -> list[dict[str, Any]]:
    """The ``dashscope`` SDK's ``history=`` (``input.history``: earlier turns as ``{"user", "bot"}``
    pairs, the legacy form beside ``prompt``) as the messages before the prompt."""
    history = (req.input.model_extra or {}).get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise InvalidParameter("input.history must be a list of {user, bot} turns.", param="input.history")
    out: list[dict[str, Any]] = []
    for i, turn in enumerate(history):
        if (
            not isinstance(turn, dict)
            or set(turn) - {"user", "bot"}
            or not all(isinstance(turn.get(k), str) for k in ("user", "bot"))
        ):
            raise InvalidParameter(
                'each turn of input.history is {"user": text, "bot": text}.', param=f"input.history.{i}"
            )
        out += [{"role": "user", "content": turn["user"]}, {"role": "assistant", "content": turn["bot"]}]
    return out


def _result_format(given: str | None, call: ChatCall, *, multimodal: bool) -> ResultFormat:
    spec = call.model.spec
    # Logprobs are answered per choice (``choices[].logprobs``): the text format has nowhere to put them.
    logprobs = call.generation.sampling.logprobs is not None
    needs_message = (
        multimodal or call.thinking or bool(call.generation.tools) or logprobs or spec.modalities != TEXT
    )
    why = (
        "the multimodal endpoint"
        if multimodal
        else "thinking"
        if call.thinking
        else "tools"
        if call.generation.tools
        else "logprobs"
        if logprobs
        else "this model"
    )
    if given is None:
        default_message = spec.family in ("qwq", "qwen-long") or _open_qwen3(spec)
        return "message" if needs_message or default_message or call.n > 1 else "text"
    if given not in ("text", "message"):
        raise InvalidParameter('result_format must be "text" or "message".', param="parameters.result_format")
    if given == "text" and needs_message:
        raise InvalidParameter(
            f'result_format "text" is not available with {why}: use "message".',
            param="parameters.result_format",
        )
    if given == "text" and call.n > 1:
        raise InvalidParameter('n > 1 needs result_format "message".', param="parameters.result_format")
    return "message" if given == "message" else "text"


def _incremental(given: bool | None, call: ChatCall) -> bool:
    spec = call.model.spec
    fixed = spec.family in ("qwq", "qvq") or _open_qwen3(spec)
    if given is False and call.stream:
        if call.thinking:
            raise InvalidParameter(INCREMENTAL_THINKING_MESSAGE, param="parameters.incremental_output")
        if fixed:
            raise InvalidParameter(
                'The incremental_output parameter of this model must be "true".',
                param="parameters.incremental_output",
            )
    if given is None:
        return fixed or call.thinking
    return given


def build_native_call(
    body: dict[str, Any],
    models: ModelRegistry,
    *,
    request_id: str,
    multimodal: bool,
    stream: bool,
) -> NativeCall:
    """The whole native validation; ``stream``: the request asked for SSE (``X-DashScope-SSE``)."""
    req = parse_native(body)
    params = req.parameters
    shared = {k: v for k, v in params.model_dump(exclude_none=True).items() if k not in _NATIVE_ONLY}
    compat: dict[str, Any] = {
        **shared,
        "model": req.model,
        "messages": _messages(req),
        "stream": stream or bool(params.stream),
    }
    # The native schema types the nested objects (tools, response_format, stream_options...) only as
    # objects: their insides are checked here, by the compatible-mode schema, and a wrong type there
    # is a 400 naming its native path, never a 500.
    wire = validate_wire(compat, where=lambda path: native_param(path) or path)
    try:
        call = build_call_from(wire, models, request_id=request_id)
    except ApiError as exc:
        exc.param = native_param(exc.param)
        raise
    if call.search_options.prepend and not call.stream:
        raise InvalidParameter(PREPEND_MESSAGE, param="parameters.search_options.prepend_search_result")
    call = _with_progress(call, multimodal=multimodal)
    return NativeCall(
        chat=call,
        result_format=_result_format(params.result_format, call, multimodal=multimodal),
        incremental=_incremental(params.incremental_output, call),
        multimodal=multimodal,
    )


def _with_progress(call: ChatCall, *, multimodal: bool) -> ChatCall:
    # Native stream events carry the usage so far; the ledger names the native endpoint (not the
    # compatible mode's chat.completions).
    endpoint = "native.multimodal-generation" if multimodal else "native.text-generation"
    return replace(call, usage_progress=True, endpoint=endpoint)
