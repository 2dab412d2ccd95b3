"""Compatible-mode request -> one frozen internal :class:`ChatCall` (parse once, validate once).

Every check answers with DashScope's own message (reference §2, §5.2) and names the offending
``param``. Model-dependent limits (max output, stream-only models, thinking) come from the model's
effective catalog spec.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from qwen_gateway.engines.base import (
    ChatMessage,
    ContentPart,
    GenerationRequest,
    MediaOptions,
    SamplingParams,
    TextPart,
    Thinking,
    ToolCall,
    ToolSpec,
)
from qwen_gateway.errors import InvalidParameter, InvalidRequest
from qwen_gateway.protocol.compat import ChatCompletionRequest, ContentPartIn, MessageIn, ToolIn
from qwen_gateway.service.constraints import logprobs_setting, output_constraint
from qwen_gateway.service.events import SearchInfo
from qwen_gateway.service.media import EMPTY_SLOT, ImageRef, MediaRef, MediaSlot, VideoFileRef, VideoFramesRef
from qwen_gateway.service.models import ModelRegistry, ServedModel
from qwen_gateway.service.ocr import task_prompt
from qwen_gateway.service.parsers import tool_parsing
from qwen_gateway.service.search import PREPEND_MESSAGE, SearchOptions
from qwen_gateway.service.search import parse_options as parse_search_options
from qwen_gateway.service.translation import translation_messages

SEED_MAX = 9223372036854775807
STOP_TYPE_MESSAGE = (
    'The "stop" parameter must be of type "str", "list[str]", "list[int]", or "list[list[int]]"'
)
ROLE_MESSAGE = "Role must be user or assistant and Content length must be greater than 0"
STREAM_ONLY_MESSAGE = (
    "This model only support stream mode, please enable the stream parameter to access the model. "
)
# What DashScope answers a non-stream call to QVQ (reference §3.4).
QVQ_STREAM_ONLY_MESSAGE = "current user api does not support http call"
TOOL_ORDER_MESSAGE = 'messages with role "tool" must be a response to a preceeding message with "tool_calls"'

# The OpenAI SDK's newer "developer" role means what "system" means to a Qwen chat template.
ROLE_ALIASES = {"developer": "system"}
ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True, slots=True)
class ChatCall:
    """A validated chat request: what to run and how to answer."""

    request_id: str
    completion_id: str
    created: int
    model: ServedModel
    generation: GenerationRequest
    n: int
    stream: bool
    include_usage: bool
    # Asked for web search; its options; the search that ran (service/search.py ``WebSearch.apply``).
    enable_search: bool = False
    search_options: SearchOptions = dataclasses.field(default_factory=SearchOptions)
    search_info: SearchInfo | None = None
    # Tokens the admission hold adds for the search still to run after it (``WebSearch.plan``): at
    # most what its results can add to the prompt.
    search_reserve: int = 0
    # Image/video parts still to fetch (service/media.py ``resolve`` puts them into ``generation``).
    media: tuple[MediaSlot, ...] = ()
    # More than one tool call per answer (DashScope's default: one).
    parallel_tool_calls: bool = False
    # Report the cumulative usage as it grows (:class:`~qwen_gateway.service.events.UsageProgress`):
    # the native protocol carries it on every stream event.
    usage_progress: bool = False
    # Uploaded files whose text a fileid:// system message put in (service/fileids.py).
    files: tuple[str, ...] = ()
    # What the usage ledger records the request under (the protocol and endpoint that answered it).
    endpoint: str = "chat.completions"
    # Batch work (service/batches.py): admitted without counting as live traffic, which it yields to.
    background: bool = False

    @property
    def thinking(self) -> bool:
        return self.generation.thinking is not None and self.generation.thinking.enabled


def parse_body(raw: bytes) -> dict[str, Any]:
    """JSON body -> dict, or DashScope's 400 for anything that is not a JSON object.

    A number JSON can't carry (``NaN``, ``Infinity``, ``1e999``, a 5000-digit integer) is a 400 that
    names the parameter holding it, not the generic "requires json format"."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        _refuse_bad_number(exc)
        raise InvalidRequest("The input parameter requires json format.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The input parameter requires json format.")
    return body


# A token orjson stops at that is a number JSON can't represent: NaN / Infinity (not JSON at all) or a
# numeral whose value is infinite as a double (orjson reads integers past 64 bits as doubles).
_NUMBER_TOKEN = re.compile(r"-?(?:NaN|Infinity|[0-9][0-9.eE+-]*)")
# Stands in for the bad number in a second parse that finds where it sits (NUL: never in a real value).
_MARK = "\\u0000qwen-gateway:bad-number\\u0000"
_MARK_VALUE = "\x00qwen-gateway:bad-number\x00"


def _refuse_bad_number(exc: orjson.JSONDecodeError) -> None:
    """Raise a 400 naming the parameter if ``exc`` stopped at a non-finite or over-long number."""
    doc, pos = exc.doc, exc.pos
    if not isinstance(doc, str):
        return
    start = pos - 1 if pos > 0 and doc[pos - 1] == "-" else pos
    match = _NUMBER_TOKEN.match(doc, start)
    if match is None:
        return
    token = match.group()
    if token.lstrip("-") not in ("NaN", "Infinity"):
        try:
            if abs(float(token)) != float("inf"):
                return
        except ValueError:
            return
    overlong_int = token.lstrip("-").isdigit()
    where: str | None = None
    try:
        marked = orjson.loads(doc[:start] + '"' + _MARK + '"' + doc[match.end() :])
    except orjson.JSONDecodeError:
        marked = None  # something else is broken too; the number is still the first problem
    if marked is not None:
        path = _path_to_mark(marked)
        where = _loc(path) if path else None
    name = f'"{where}"' if where else "A number"
    if overlong_int:
        message = f"{name} is out of range: the integer has too many digits."
    else:
        message = f"{name} must be a finite number (NaN, Infinity and numbers past 1.8e308 are not)."
    raise InvalidParameter(message, param=where)


def _path_to_mark(node: Any) -> tuple[int | str, ...] | None:
    stack: list[tuple[Any, tuple[int | str, ...]]] = [(node, ())]
    while stack:
        value, path = stack.pop()
        if value == _MARK_VALUE:
            return path
        if isinstance(value, dict):
            stack.extend((v, (*path, k)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, (*path, i)) for i, v in enumerate(value))
    return None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _is_union_tag(part: int | str) -> bool:
    """Pydantic names the union branch it tried in ``loc`` ("str", "list[ContentPartIn]",
    "MessageIn"); wire field names are snake_case, so anything else is a branch tag."""
    if isinstance(part, int):
        return False
    return part in _TYPE_TAGS or "[" in part or "-" in part or part[:1].isupper()


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc)


def parse_wire(body: dict[str, Any]) -> ChatCompletionRequest:
    """dict -> wire model; type errors become 400s naming the field, never 500s."""
    if "model" not in body or body.get("model") in (None, ""):
        raise InvalidParameter('Required parameter "model" missing from request.', param="model")
    if "messages" not in body:
        raise InvalidParameter('Required parameter "messages" missing from request.', param="messages")
    return validate_wire(body)


def validate_wire(body: dict[str, Any], where: Callable[[str], str] = str) -> ChatCompletionRequest:
    """The strict schema check of a compatible-mode body; a type error is a 400 naming the field by
    ``where(path)`` (the native protocol maps its request onto this schema and names its own paths)."""
    try:
        # Strict: DashScope refuses `"temperature": "0.5"` or `"max_tokens": true`; so do we.
        return ChatCompletionRequest.model_validate(body, strict=True)
    except ValidationError as exc:
        errors = exc.errors()
        if errors[0]["loc"][:1] == ("stop",):
            raise InvalidParameter(STOP_TYPE_MESSAGE, param=where("stop")) from None
        # A union reports one error per branch; the deepest path names the field most precisely.
        paths = [tuple(p for p in e["loc"] if not _is_union_tag(p)) for e in errors]
        best = max(range(len(errors)), key=lambda i: len(paths[i]))
        param = where(_loc(paths[best]))
        raise InvalidParameter(f"{errors[best]['msg']}: {param}", param=param) from None


# param -> (accepts the value?, DashScope's message when it doesn't)
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda v: 0.0 <= v < 2.0, "Temperature should be in [0.0, 2.0)"),
    "top_p": (lambda v: 0.0 < v <= 1.0, "Range of top_p should be (0.0, 1.0]"),
    "top_k": (lambda v: v >= 0, "Parameter top_k be greater than or equal to 0"),
    "presence_penalty": (lambda v: -2.0 <= v <= 2.0, "Presence_penalty should be in [-2.0, 2.0]"),
    "frequency_penalty": (lambda v: -2.0 <= v <= 2.0, "Frequency_penalty should be in [-2.0, 2.0]"),
    "repetition_penalty": (lambda v: v > 0.0, "Repetition_penalty should be greater than 0.0"),
}


def _check_ranges(req: ChatCompletionRequest) -> None:
    for param, (accepts, message) in RANGES.items():
        value = getattr(req, param)
        if value is not None and not accepts(value):
            raise InvalidParameter(message, param=param)


UNEXPECTED_ITEM = (
    "The provided messages input is invalid. The error info is [Unexpected item type in content.]"
)


def _content(
    message: MessageIn, index: int, role: str
) -> tuple[str | tuple[ContentPart, ...], list[MediaSlot]]:
    """The message's engine content (media parts hold an empty slot) and its media to fetch."""
    content = message.content
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    parts: list[ContentPart] = []
    slots: list[MediaSlot] = []
    for j, part in enumerate(content):
        where = f"messages.{index}.content.{j}"
        ref = _media_ref(part, where) if role == "user" else None
        if ref is not None:
            slots.append(MediaSlot(index, j, ref, where))
            parts.append(EMPTY_SLOT)
        elif part.type == "text" and part.text is not None:
            if part.fps is not None:
                raise InvalidParameter("fps applies to video parts only.", param=f"{where}.fps")
            parts.append(TextPart(part.text))
        else:
            raise InvalidParameter(UNEXPECTED_ITEM, param=f"messages.{index}.content")
    return tuple(parts), slots


def _media_ref(part: ContentPartIn, where: str) -> MediaRef | None:
    """The media a part names (None for anything that is not an image or video part)."""
    if part.type == "image_url" and part.image_url is not None:
        image = part.image_url
        if image.detail not in (None, "auto"):
            raise InvalidParameter(
                "image_url.detail is not supported: size images with min_pixels / max_pixels.",
                param=f"{where}.image_url.detail",
            )
        for name, value in (("min_pixels", image.min_pixels), ("max_pixels", image.max_pixels)):
            if value is not None and value <= 0:
                raise InvalidParameter(
                    f"{name} must be a positive integer.", param=f"{where}.image_url.{name}"
                )
        if (
            image.min_pixels is not None
            and image.max_pixels is not None
            and image.min_pixels > image.max_pixels
        ):
            raise InvalidParameter(
                "min_pixels must not be greater than max_pixels.", param=f"{where}.image_url.min_pixels"
            )
        if part.fps is not None:
            raise InvalidParameter("fps applies to video parts only.", param=f"{where}.fps")
        return ImageRef(image.url, image.min_pixels, image.max_pixels)
    if part.type == "video" and part.video is not None:
        return VideoFramesRef(tuple(part.video), part.fps)
    if part.type == "video_url" and part.video_url is not None:
        return VideoFileRef(part.video_url.url, part.fps)
    return None


def _messages(wire: list[MessageIn]) -> tuple[tuple[ChatMessage, ...], tuple[MediaSlot, ...]]:
    if not wire:
        raise InvalidParameter("[] is too short", param="messages")
    out: list[ChatMessage] = []
    media: list[MediaSlot] = []
    for i, m in enumerate(wire):
        role = ROLE_ALIASES.get(m.role, m.role)
        if role not in ROLES:
            raise InvalidParameter(ROLE_MESSAGE, param=f"messages.{i}.role")
        content, slots = _content(m, i, role)
        media.extend(slots)
        tool_calls = tuple(
            ToolCall(id=tc.id, name=tc.function.name, arguments=tc.function.arguments)
            for tc in (m.tool_calls or ())
        )
        text = (
            content
            if isinstance(content, str)
            else "".join(p.text for p in content if isinstance(p, TextPart))
        )
        # An assistant turn may be empty when it only calls tools; a user turn never (an image alone
        # is not empty).
        if text == "" and not slots and role == "user":
            raise InvalidParameter(ROLE_MESSAGE, param=f"messages.{i}.content")
        partial = bool(m.partial) and role == "assistant" and i == len(wire) - 1
        if role == "tool" and not (out and (out[-1].tool_calls or out[-1].role == "tool")):
            raise InvalidParameter(TOOL_ORDER_MESSAGE, param=f"messages.{i}.role")
        out.append(
            ChatMessage(
                role=role,  # type: ignore[arg-type]
                content=content,
                name=m.name,
                tool_calls=tool_calls,
                tool_call_id=m.tool_call_id,
                # Past turns' reasoning is not fed back to the model (DashScope's default; its
                # preserve_thinking is refused until implemented).
                reasoning_content=None,
                partial=partial,
            )
        )
    return tuple(out), tuple(media)


def _check_modalities(media: tuple[MediaSlot, ...], served: ServedModel) -> None:
    """A model that can't take an image or a video refuses it as DashScope's text models do."""
    capabilities = served.engine.capabilities
    accepts = {
        "image": "image" in served.spec.modalities and capabilities.vision,
        "video": "video" in served.spec.modalities and capabilities.video,
    }
    for slot in media:
        kind = "image" if isinstance(slot.ref, ImageRef) else "video"
        if not accepts[kind]:
            raise InvalidParameter(UNEXPECTED_ITEM, param=slot.param)


def _with_ocr_prompt(messages: tuple[ChatMessage, ...], prompt: str) -> tuple[ChatMessage, ...]:
    """The OCR task's prompt as the last text of the last user message."""
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if message.role != "user":
            continue
        content = message.content
        parts: tuple[ContentPart, ...]
        if isinstance(content, str):
            parts = (TextPart(content), TextPart(prompt)) if content else (TextPart(prompt),)
        else:
            parts = (*content, TextPart(prompt))
        return (*messages[:i], dataclasses.replace(message, content=parts), *messages[i + 1 :])
    raise InvalidParameter("ocr_options needs a user message with the image to read.", param="messages")


def _stop(
    stop: str | list[str] | list[int] | list[list[int]] | None,
) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    if stop is None:
        return (), ()
    if isinstance(stop, str):
        return ((stop,) if stop else ()), ()
    if all(isinstance(s, str) for s in stop):
        return tuple(s for s in stop if isinstance(s, str) and s), ()
    ids = [i for s in stop for i in (s if isinstance(s, list) else [s]) if isinstance(i, int)]
    if any(not 0 <= i < 2**31 for i in ids):
        raise InvalidParameter("Token ids in stop must be in [0, 2147483647].", param="stop")
    if all(isinstance(s, int) for s in stop):
        return (), (tuple(s for s in stop if isinstance(s, int)),) if stop else ()
    if all(isinstance(s, list) for s in stop):
        seqs = tuple(tuple(seq) for seq in stop if isinstance(seq, list) and seq)
        return (), seqs
    raise InvalidParameter(STOP_TYPE_MESSAGE, param="stop")


def _tools(tools: list[ToolIn] | None) -> tuple[ToolSpec, ...]:
    out = []
    for i, t in enumerate(tools or ()):
        if t.type != "function":
            raise InvalidParameter(f"Unsupported tool type: {t.type}", param=f"tools.{i}.type")
        if t.function.name == "search":
            raise InvalidParameter("Tool names are not allowed to be [search]", param=f"tools.{i}")
        if _depth(t.function.parameters) > MAX_SCHEMA_DEPTH:
            raise InvalidParameter("The tool's parameters are nested too deeply.", param=f"tools.{i}")
        out.append(ToolSpec(t.function.name, t.function.description, t.function.parameters or {}))
    return tuple(out)


MAX_SCHEMA_DEPTH = 64


def _depth(value: Any, limit: int = MAX_SCHEMA_DEPTH) -> int:
    """Nesting depth of a JSON value, counted no further than ``limit + 1`` (iteratively: a hostile
    document must not exhaust the stack here either)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            if level > limit:
                return level
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _check_tool_choice(choice: str | dict[str, Any] | None, tools: tuple[ToolSpec, ...]) -> None:
    if not isinstance(choice, dict):
        return
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidParameter(
            'tool_choice must be "none", "auto" or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if name not in {t.name for t in tools}:
        raise InvalidParameter(
            f"tool_choice names a function that is not in tools: {name}", param="tool_choice"
        )


# Parameters this server knows (DashScope's, and OpenAI's that change an answer) but cannot honour yet:
# set to anything but their "off" value, they are refused with a 400 naming them instead of being
# accepted and ignored. Unknown fields in general are kept (clients send metadata, cache_control and
# extensions of later features); these are the ones whose silent loss would change what a client gets.
_NOT_YET: dict[str, Callable[[Any], bool]] = {
    "logit_bias": bool,
    "enable_code_interpreter": bool,
    "preserve_thinking": bool,
    "reasoning_effort": lambda v: v is not None,
    "tool_stream": bool,
    "audio": lambda v: v is not None,
    "modalities": lambda v: v not in (None, ["text"]),
    # OpenAI's legacy function calling, predicted outputs, its own search, stored completions, paid
    # tiers and output verbosity.
    "functions": lambda v: v is not None,
    "function_call": lambda v: v is not None,
    "prediction": lambda v: v is not None,
    "web_search_options": lambda v: v is not None,
    "store": bool,
    "service_tier": lambda v: v not in (None, "auto", "default"),
    "verbosity": lambda v: v is not None,
    # vLLM's and transformers' sampling extensions that vLLM-style clients send.
    **dict.fromkeys(
        (
            "min_p",
            "min_tokens",
            "best_of",
            "typical_p",
            "length_penalty",
            "num_beams",
            "use_beam_search",
            "guided_json",
            "guided_regex",
            "guided_choice",
            "guided_grammar",
            "suffix",
        ),
        lambda v: v is not None,
    ),
    "ignore_eos": bool,
    "echo": bool,
}
# What to use instead, where this server has it.
_INSTEAD = {
    "functions": "tools",
    "function_call": "tool_choice",
    "web_search_options": "enable_search and search_options",
    "reasoning_effort": "enable_thinking and thinking_budget",
}
# vLLM's and SGLang's spelling of the thinking switches (what a client written for them sends, and what
# this server's own openai engine sends an upstream in their dialect): the chat template's variables.
_TEMPLATE_SWITCHES = ("enable_thinking", "thinking_budget")


def _template_kwargs(req: ChatCompletionRequest) -> ChatCompletionRequest:
    """``chat_template_kwargs`` ``enable_thinking`` / ``thinking_budget`` as the top-level fields of
    the same names; any other template variable is refused (the chat template is the server's own),
    and so is a switch given both ways with different values."""
    kwargs = (req.model_extra or {}).get("chat_template_kwargs")
    if kwargs is None:
        return req
    if not isinstance(kwargs, dict):
        raise InvalidParameter("chat_template_kwargs must be an object.", param="chat_template_kwargs")
    update: dict[str, Any] = {}
    for name, value in kwargs.items():
        param = f"chat_template_kwargs.{name}"
        if name not in _TEMPLATE_SWITCHES:
            raise InvalidParameter(
                f"{param} is not supported by this server: only enable_thinking and thinking_budget.",
                param=param,
            )
        wanted = bool if name == "enable_thinking" else int
        if value is None:
            continue
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            raise InvalidParameter(
                f"{param} must be {'a boolean' if wanted is bool else 'an integer'}.", param=param
            )
        given = getattr(req, name)
        if given is not None and given != value:
            raise InvalidParameter(f"{name} and {param} disagree.", param=param)
        update[name] = value
    return req.model_copy(update=update) if update else req


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    known = set(_NOT_YET) & set(ChatCompletionRequest.model_fields)
    values = {**(req.model_extra or {}), **req.model_dump(include=known)}
    for param, is_set in _NOT_YET.items():
        if is_set(values.get(param)):
            instead = f" Use {_INSTEAD[param]} instead." if param in _INSTEAD else ""
            raise InvalidParameter(f"{param} is not supported by this server yet.{instead}", param=param)


def _max_tokens(req: ChatCompletionRequest, limit: int) -> int:
    given = [
        (p, v)
        for p, v in (("max_tokens", req.max_tokens), ("max_completion_tokens", req.max_completion_tokens))
        if v is not None
    ]
    for param, value in given:
        if not 1 <= value <= limit:
            raise InvalidParameter(f"Range of max_tokens should be [1, {limit}]", param=param)
    return min((v for _, v in given), default=limit)


def _thinking(req: ChatCompletionRequest, served: ServedModel) -> Thinking | None:
    """Whether the model thinks on this call and for how long (None: the model has no thinking
    switch)."""
    spec = served.spec
    if not spec.supports_thinking:
        if req.enable_thinking:
            raise InvalidParameter("The model does not support enable_thinking", param="enable_thinking")
        return None
    if spec.thinking_fixed and req.enable_thinking is False:
        raise InvalidParameter(
            "The value of the enable_thinking parameter is restricted to True.", param="enable_thinking"
        )
    limit = spec.max_reasoning
    if req.thinking_budget is not None and not 0 < req.thinking_budget <= limit:
        raise InvalidParameter(
            f"The thinking_budget parameter must be a positive integer and not greater than {limit}",
            param="thinking_budget",
        )
    enabled = spec.thinking_enabled(req.enable_thinking)
    # DashScope: the budget applies only while thinking is on (off, it has nothing to bound).
    budget = req.thinking_budget if enabled else None
    if budget is not None and not served.engine.capabilities.thinking_budget:
        raise InvalidParameter(
            "thinking_budget is not supported by this model's engine yet.", param="thinking_budget"
        )
    # Unset, the budget is the model's maximum reasoning length: max_tokens caps only the answer, so
    # this is what bounds the reasoning.
    return Thinking(enabled=enabled, budget=budget if budget is not None else limit if enabled else None)


def build_call(body: dict[str, Any], models: ModelRegistry, *, request_id: str) -> ChatCall:
    """The whole compatible-mode validation: wire dict -> :class:`ChatCall`."""
    call = build_call_from(parse_wire(body), models, request_id=request_id)
    if call.search_options.prepend:
        raise InvalidParameter(PREPEND_MESSAGE, param="search_options.prepend_search_result")
    return call


def build_call_from(req: ChatCompletionRequest, models: ModelRegistry, *, request_id: str) -> ChatCall:
    """A parsed request -> :class:`ChatCall`: the one validation both protocols go through (the native
    protocol maps its request onto this schema first, ``service/requests/native.py``)."""
    served = models.get(req.model)
    spec = served.spec
    messages, media = _messages(req.messages)
    _check_modalities(media, served)
    if req.ocr_options is not None:
        if not spec.ocr:
            raise InvalidParameter(
                "ocr_options is only supported by the Qwen-OCR models (qwen-vl-ocr).", param="ocr_options"
            )
        messages = _with_ocr_prompt(messages, task_prompt(req.ocr_options))
    options = (req.model_extra or {}).get("translation_options")
    if options is not None:
        messages = translation_messages(messages, options, spec)

    _check_ranges(req)
    n = 1 if req.n is None else req.n
    if not 1 <= n <= 4:
        raise InvalidParameter("Range of n should be [1, 4]", param="n")
    if req.seed is not None and not 0 <= req.seed <= SEED_MAX:
        raise InvalidParameter(f"Range of seed should be [0, {SEED_MAX}]", param="seed")
    if isinstance(req.tool_choice, str) and req.tool_choice not in ("none", "auto"):
        raise InvalidParameter(
            'tool_choice is one of the strings that should be ["none", "auto"]', param="tool_choice"
        )
    tools = _tools(req.tools)
    _check_tool_choice(req.tool_choice, tools)
    if n > 1 and tools:
        raise InvalidParameter("The n parameter must be 1 when tools are provided.", param="n")
    if tools and req.tool_choice != "none" and not tool_parsing(served.engine.capabilities):
        # Offered, the model could call them, but its calls could not be read: refuse, not ignore.
        raise InvalidParameter("This model does not support tools.", param="tools")
    _refuse_unsupported(req)
    req = _template_kwargs(req)
    search_options = parse_search_options(req.search_options)
    if req.enable_search and not spec.supports_search:
        raise InvalidParameter("This model does not support enable_search.", param="enable_search")

    stream = bool(req.stream)
    thinking = _thinking(req, served)
    # The schema sits two levels inside response_format ({"json_schema": {"schema": ...}}): bounded as
    # a tool's parameters are (a deeper one exhausted the stack where the grammar is built: a 500).
    if _depth(req.response_format, MAX_SCHEMA_DEPTH + 2) > MAX_SCHEMA_DEPTH + 2:
        raise InvalidParameter("The response_format's schema is nested too deeply.", param="response_format")
    constraint = output_constraint(req, served, messages, thinking=bool(thinking and thinking.enabled))
    if not stream and spec.stream_only:
        raise InvalidParameter(QVQ_STREAM_ONLY_MESSAGE if spec.family == "qvq" else STREAM_ONLY_MESSAGE)
    if not stream and spec.requires_stream(thinking=bool(thinking and thinking.enabled)):
        raise InvalidParameter(
            "parameter.enable_thinking must be set to false for non-streaming calls",
            param="enable_thinking",
        )
    stop, stop_ids = _stop(req.stop)
    # DashScope: top_k of 0 or above 100 disables top-k filtering (0 tells the engine "off"; None would
    # mean "the checkpoint's default").
    top_k = None if req.top_k is None else (req.top_k if 0 < req.top_k <= 100 else 0)
    defaults = served.config
    sampling = SamplingParams(
        max_tokens=_max_tokens(req, spec.max_output or spec.context_length),
        temperature=req.temperature if req.temperature is not None else defaults.temperature,
        top_p=req.top_p if req.top_p is not None else defaults.top_p,
        top_k=top_k if req.top_k is not None else defaults.top_k,
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=(
            req.repetition_penalty if req.repetition_penalty is not None else defaults.repetition_penalty
        ),
        stop=stop,
        stop_token_ids=stop_ids,
        logprobs=logprobs_setting(req, served),
    )
    if stop_ids and not served.engine.capabilities.stop_token_ids:
        raise InvalidParameter("This model does not accept stop as token ids.", param="stop")
    generation = GenerationRequest(
        request_id=request_id,
        model=served.id,
        messages=messages,
        sampling=sampling,
        tools=tools if req.tool_choice != "none" else (),
        thinking=thinking,
        constraint=constraint,
        media=MediaOptions(high_resolution=bool(req.vl_high_resolution_images), ocr=spec.ocr),
        stream=stream,
    )
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return ChatCall(
        request_id=request_id,
        completion_id=f"chatcmpl-{request_id}",
        created=int(time.time()),
        model=served,
        generation=generation,
        n=n,
        stream=stream,
        include_usage=include_usage,
        enable_search=bool(req.enable_search),
        search_options=search_options,
        media=media,
        parallel_tool_calls=bool(req.parallel_tool_calls),
    )
