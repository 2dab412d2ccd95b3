"""The admission hold's prompt bound is never below the real count: checked with a real Qwen tokenizer
and its chat template (the tiny checkpoint's), on ASCII, CJK and emoji text, tools and tool calls."""

from __future__ import annotations

import json

import pytest

from qwen_gateway.engines.base import ChatMessage, GenerationRequest, SamplingParams, ToolCall, ToolSpec
from qwen_gateway.service.money.estimate import prompt_tokens_bound
from tests.support import MODELS

transformers = pytest.importorskip("transformers")

TOOL = ToolSpec(
    "get_weather", "Weather of a city", {"type": "object", "properties": {"city": {"type": "string"}}}
)
CONVERSATIONS = [
    (ChatMessage("user", "hi"),),
    (ChatMessage("system", "Be brief."), ChatMessage("user", "通义千问是什么?请用中文详细回答。" * 20)),
    (ChatMessage("user", "emoji 😀🎉 " * 50 + "zero\u200bwidth"),),
    (
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
        ChatMessage("tool", "sunny, 21°C", tool_call_id="call_1"),
    ),
]


@pytest.mark.parametrize("model", ["tiny-qwen2.5", "tiny-qwen3"])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_the_bound_covers_the_rendered_prompt(model: str, index: int) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODELS / model)
    messages = CONVERSATIONS[index]
    tools = (TOOL,) if index == 3 else ()
    request = GenerationRequest("r", "m", messages, SamplingParams(max_tokens=1), tools=tools)
    wire = []
    for m in messages:
        item: dict[str, object] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            item["tool_calls"] = [
                {
                    "type": "function",
                    "id": c.id,
                    "function": {"name": c.name, "arguments": json.loads(c.arguments)},
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id:
            item["tool_call_id"] = m.tool_call_id
        wire.append(item)
    tool_schemas = [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": dict(t.parameters)},
        }
        for t in tools
    ] or None
    ids = tokenizer.apply_chat_template(wire, tools=tool_schemas, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    assert len(ids) <= prompt_tokens_bound(request)
