"""Output controls of a compatible-mode request -> engine-neutral settings, with DashScope's rules.

- ``response_format``: ``{"type": "text"}`` (none), ``{"type": "json_object"}`` (any JSON object; a
  message must mention "json"), ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
  (``strict`` accepted inside ``json_schema`` as OpenAI's SDK sends it, or beside it as older DashScope
  docs show). Output is always constrained to the schema, ``strict`` or not. Not allowed with thinking.
- a named ``tool_choice`` -> :class:`ToolCallConstraint`: the engine constrains the answer to one
  call of that function whose arguments follow its ``parameters`` schema.
- ``logprobs`` / ``top_logprobs`` (0-5) -> ``SamplingParams.logprobs``.

The engine compiles the constraint (and refuses a schema it cannot compile with a 400 naming the same
parameter); here only the request's shape and DashScope's cross-field rules are checked.
"""

from __future__ import annotations

from typing import Any

from qwen_gateway.engines.base import (
    CONSTRAINT_KINDS,
    ChatMessage,
    JsonConstraint,
    OutputConstraint,
    ToolCallConstraint,
)
from qwen_gateway.errors import InvalidParameter
from qwen_gateway.protocol.compat import ChatCompletionRequest
from qwen_gateway.service.models import ServedModel

JSON_WORD_MESSAGE = (
    "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'"
)
JSON_THINKING_MESSAGE = "Json mode response is not supported when enable_thinking is true"
UNKNOWN_FORMAT_MESSAGE = (
    "Unknown format of response_format, response_format should be a dict that includes "
    "'type' and the value of type should be in ['text', 'json_object', 'json_schema']."
)
TOP_LOGPROBS_MAX = 5


def output_constraint(
    req: ChatCompletionRequest,
    served: ServedModel,
    messages: tuple[ChatMessage, ...],
    *,
    thinking: bool,
) -> OutputConstraint | None:
    """What the answer must match, or None; a 400 naming the parameter when it can't be honoured."""
    constraint, param = _response_format(req.response_format, messages), "response_format"
    if constraint is not None and thinking:
        raise InvalidParameter(JSON_THINKING_MESSAGE, param="response_format")
    if isinstance(req.tool_choice, dict):
        if constraint is not None:
            raise InvalidParameter(
                "response_format and a named tool_choice cannot be combined.", param="tool_choice"
            )
        if thinking:
            # DashScope: thinking models cannot be forced to call a function.
            raise InvalidParameter(
                "tool_choice: a named function cannot be forced while thinking is enabled; "
                "set enable_thinking to false.",
                param="tool_choice",
            )
        name = req.tool_choice["function"]["name"]  # shape checked with the tools
        constraint, param = ToolCallConstraint(name), "tool_choice"
    if (
        constraint is not None
        and CONSTRAINT_KINDS[type(constraint)] not in served.engine.capabilities.constraints
    ):
        what = "json output" if param == "response_format" else "forcing a named tool call"
        raise InvalidParameter(f"{param}: {what} is not supported by this model.", param=param)
    return constraint


def _response_format(
    fmt: dict[str, Any] | None, messages: tuple[ChatMessage, ...]
) -> OutputConstraint | None:
    if fmt is None:
        return None
    # No "type" is DashScope's "Unknown format" too (not plain text): {} is refused like {"type": null}.
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        if not any("json" in m.text().lower() for m in messages):
            raise InvalidParameter(JSON_WORD_MESSAGE, param="messages")
        return JsonConstraint(None)
    if kind != "json_schema":
        raise InvalidParameter(UNKNOWN_FORMAT_MESSAGE, param="response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidParameter(
            "response_format.json_schema must be an object with 'name' and 'schema'.",
            param="response_format.json_schema",
        )
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidParameter(
            "response_format.json_schema.name must be a string.", param="response_format.json_schema.name"
        )
    for where, holder in (("response_format.json_schema.strict", spec), ("response_format.strict", fmt)):
        strict = holder.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidParameter(f"{where} must be a boolean.", param=where)
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise InvalidParameter(
            "response_format.json_schema.schema must be a JSON schema object.",
            param="response_format.json_schema.schema",
        )
    return JsonConstraint(schema)


def logprobs_setting(req: ChatCompletionRequest, served: ServedModel) -> int | None:
    """``SamplingParams.logprobs``: None (off) or how many rivals to report per token."""
    top = req.top_logprobs
    if top is not None and not 0 <= top <= TOP_LOGPROBS_MAX:
        raise InvalidParameter(
            f"Invalid 'top_logprobs': {top}. Expected an integer in range [0, {TOP_LOGPROBS_MAX}]",
            param="top_logprobs",
        )
    if not req.logprobs:
        if top:
            raise InvalidParameter("top_logprobs requires logprobs to be true.", param="top_logprobs")
        return None
    if not served.engine.capabilities.logprobs:
        raise InvalidParameter("logprobs is not supported by this model.", param="logprobs")
    return top or 0
