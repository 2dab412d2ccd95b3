"""The upstream engine's translation, both ways, on recorded stream shapes of vLLM and Ollama
(tests/unit/engines/data/upstream/README.md says where each shape comes from)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_gateway.engines.base import (
    ChatMessage,
    Finished,
    GenerationRequest,
    ImagePart,
    JsonConstraint,
    MediaOptions,
    ReasoningTextDelta,
    SamplingParams,
    TextDelta,
    TextPart,
    Thinking,
    ToolCallChunk,
    ToolCallConstraint,
    ToolSpec,
    Usage,
)
from qwen_gateway.engines.openai.wire import (
    ChunkReader,
    Dialect,
    UnsupportedField,
    UpstreamProtocolError,
    max_tokens_asked,
    request_body,
)

DATA = Path(__file__).parent / "data" / "upstream"


def read(name: str) -> tuple[list[object], ChunkReader]:
    reader = ChunkReader()
    events: list[object] = []
    for line in (DATA / name).read_text().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.extend(reader.feed(json.loads(line[6:])))
    return events, reader


def calls(events: list[object]) -> list[ToolCallChunk]:
    return [e for e in events if isinstance(e, ToolCallChunk)]


def test_vllm_reasoning_content_becomes_reasoning_events() -> None:
    events, reader = read("vllm_reasoning.sse")
    assert events == [
        ReasoningTextDelta("The user"),
        ReasoningTextDelta(" greets me."),
        TextDelta("Hello"),
        TextDelta("!"),
    ]
    assert reader.finish_reason == "stop"
    assert reader.usage == Usage(prompt_tokens=12, completion_tokens=8)


def test_vllm_017_reasoning_and_streamed_tool_calls() -> None:
    events, reader = read("vllm017_reasoning_tools.sse")
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningTextDelta))
    assert reasoning == "Need the weather for two cities."
    got = calls(events)
    # index on every delta; id and name only on each call's first delta.
    assert [(c.call_index, c.id, c.name) for c in got] == [
        (0, "chatcmpl-tool-5e1", "get_weather"),
        (0, None, None),
        (0, None, None),
        (1, "chatcmpl-tool-7a2", "get_weather"),
        (1, None, None),
    ]
    args = {i: "".join(c.arguments for c in got if c.call_index == i) for i in (0, 1)}
    assert {i: json.loads(a) for i, a in args.items()} == {0: {"city": "Paris"}, 1: {"city": "Lyon"}}
    assert reader.finish_reason == "tool_calls"
    assert reader.usage == Usage(prompt_tokens=80, completion_tokens=50, reasoning_tokens=9)


def test_ollama_reasoning_and_whole_tool_call() -> None:
    events, reader = read("ollama_reasoning_tools.sse")
    assert events[:2] == [ReasoningTextDelta("Let me"), ReasoningTextDelta(" check.")]
    assert calls(events) == [ToolCallChunk(0, "call_k2x9", "get_weather", '{"city":"Paris"}')]
    assert not [e for e in events if isinstance(e, TextDelta)]  # empty content pieces are not events
    assert reader.finish_reason == "tool_calls"
    assert reader.usage == Usage(prompt_tokens=143, completion_tokens=31)


def test_old_ollama_calls_without_index_get_one_each() -> None:
    events, reader = read("ollama_old_tools.sse")
    assert calls(events) == [
        ToolCallChunk(0, "call_a1", "get_weather", '{"city":"Paris"}'),
        ToolCallChunk(1, "call_b2", "get_time", '{"tz":"CET"}'),
    ]
    assert reader.finish_reason == "tool_calls"  # it said "stop" after calling tools
    assert reader.usage is None  # nothing reported: the engine counts locally
    assert "".join(reader.delivered) == 'get_weather{"city":"Paris"}get_time{"tz":"CET"}'


def test_repeated_ids_and_names_are_sent_once() -> None:
    events, _ = read("repeating_ids_tools.sse")
    assert calls(events) == [
        ToolCallChunk(0, "call_z", "get_weather", '{"ci'),
        ToolCallChunk(0, None, None, 'ty":"Oslo"}'),
    ]


@pytest.mark.parametrize(
    "chunk",
    [[1, 2], {"choices": "x"}, {"choices": [{"delta": 3}]}, {"error": {"message": "boom"}}],
)
def test_chunks_that_are_not_chat_chunks_are_protocol_errors(chunk: object) -> None:
    with pytest.raises(UpstreamProtocolError):
        ChunkReader().feed(chunk)


def _request(**kw: object) -> GenerationRequest:
    base: dict[str, object] = {
        "request_id": "req-1",
        "model": "m",
        "messages": (ChatMessage("user", "hi"),),
        "sampling": SamplingParams(max_tokens=10),
    }
    return GenerationRequest(**{**base, **kw})  # type: ignore[arg-type]


def test_body_forces_streamed_usage_and_carries_only_known_fields() -> None:
    body = request_body(
        _request(sampling=SamplingParams(max_tokens=10, temperature=0.5, top_k=5, stop=("x",))),
        "upstream-name",
        Dialect(),
    )
    assert body == {
        "model": "upstream-name",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 10,
        "temperature": 0.5,
        "top_k": 5,
        "stop": ["x"],
    }


def test_thinking_goes_to_chat_template_kwargs_or_dashscope_fields() -> None:
    request = _request(thinking=Thinking(enabled=True, budget=64))
    vllm = request_body(request, "m", Dialect())
    assert vllm["chat_template_kwargs"] == {"enable_thinking": True}
    assert vllm["max_tokens"] == 10 + 64  # OpenAI's max_tokens covers reasoning too
    budgeted = request_body(request, "m", Dialect(thinking_budget=True))
    assert budgeted["chat_template_kwargs"] == {"enable_thinking": True, "thinking_budget": 64}
    dashscope = request_body(request, "m", Dialect(dashscope=True, thinking_budget=True))
    assert (dashscope["enable_thinking"], dashscope["thinking_budget"]) == (True, 64)
    assert "chat_template_kwargs" not in dashscope and dashscope["max_tokens"] == 10
    off = request_body(_request(thinking=Thinking(enabled=False)), "m", Dialect())
    assert off["chat_template_kwargs"] == {"enable_thinking": False}


def test_media_is_inlined_as_data_urls_and_tools_and_constraints_map() -> None:
    image = ImagePart(b"\x89PNG-bytes", "image/png")
    request = _request(
        messages=(ChatMessage("user", (TextPart("what is it?"), image)),),
        tools=(ToolSpec("f", None, {"type": "object"}),),
        constraint=ToolCallConstraint("f"),
    )
    body = request_body(request, "m", Dialect())
    parts = body["messages"][0]["content"]
    assert parts[1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORy1ieXRlcw=="}}
    assert body["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    json_body = request_body(_request(constraint=JsonConstraint(schema)), "m", Dialect())
    assert json_body["response_format"]["json_schema"]["schema"] == schema


def test_partial_mode_per_dialect() -> None:
    request = _request(messages=(ChatMessage("user", "hi"), ChatMessage("assistant", "Hel", partial=True)))
    vllm = request_body(request, "m", Dialect())
    assert vllm["continue_final_message"] is True and vllm["add_generation_prompt"] is False
    dashscope = request_body(request, "m", Dialect(dashscope=True))
    assert dashscope["messages"][-1]["partial"] is True and "continue_final_message" not in dashscope


def test_finished_is_not_yielded_by_the_reader() -> None:
    # Finished is the engine's, built from reader.finish_reason and usage once the stream ends.
    events, _ = read("vllm_reasoning.sse")
    assert not [e for e in events if isinstance(e, Finished)]


def test_image_sizing_goes_to_dashscope_and_is_refused_elsewhere() -> None:
    image = ImagePart(b"png", "image/png", max_pixels=1000)
    request = _request(messages=(ChatMessage("user", (image,)),), media=MediaOptions(high_resolution=True))
    body = request_body(request, "m", Dialect(dashscope=True))
    assert body["messages"][0]["content"][0]["image_url"]["max_pixels"] == 1000
    assert body["vl_high_resolution_images"] is True
    with pytest.raises(UnsupportedField) as refused:
        request_body(request, "m", Dialect())
    assert refused.value.param == "image_url.max_pixels"
    with pytest.raises(UnsupportedField) as refused:
        request_body(_request(media=MediaOptions(high_resolution=True)), "m", Dialect())
    assert refused.value.param == "vl_high_resolution_images"


# -- whole (non-streamed) answers: the same events as the stream of the same name --------------------


def answer(name: str) -> tuple[list[object], ChunkReader]:
    reader = ChunkReader()
    return list(reader.answer(json.loads((DATA / name).read_text()))), reader


def merged(events: list[object]) -> list[tuple[str, object]]:
    """Events with consecutive text pieces of one kind joined and a call's argument pieces joined: what a
    client that reads the whole answer sees of them."""
    out: list[tuple[str, object]] = []
    for e in events:
        if isinstance(e, ReasoningTextDelta | TextDelta):
            kind = type(e).__name__
            if out and out[-1][0] == kind:
                out[-1] = (kind, str(out[-1][1]) + e.text)
            else:
                out.append((kind, e.text))
        elif isinstance(e, ToolCallChunk):
            if e.id is not None:
                out.append(("call", [e.call_index, e.id, e.name, e.arguments]))
            else:
                head = out[-1][1]
                assert isinstance(head, list) and head[0] == e.call_index
                head[3] += e.arguments
    return out


@pytest.mark.parametrize("name", ["vllm_reasoning", "vllm017_reasoning_tools", "ollama_reasoning_tools"])
def test_a_whole_answer_gives_the_events_of_its_stream(name: str) -> None:
    whole, whole_reader = answer(f"{name}.json")
    streamed, stream_reader = read(f"{name}.sse")
    assert merged(whole) == merged(streamed)
    assert whole_reader.finish_reason == stream_reader.finish_reason
    assert whole_reader.usage == stream_reader.usage and whole_reader.usage is not None
    assert "".join(whole_reader.delivered) == "".join(stream_reader.delivered)


def test_whole_answer_tool_calls_are_numbered_and_old_ollama_stop_becomes_tool_calls() -> None:
    events, reader = answer("ollama_old_tools.json")
    assert calls(events) == [
        ToolCallChunk(0, "call_a1", "get_weather", '{"city":"Paris"}'),
        ToolCallChunk(1, "call_b2", "get_time", '{"tz":"CET"}'),
    ]
    assert reader.finish_reason == "tool_calls" and reader.usage is None
    # vLLM >= 0.17: two whole calls without index, reasoning as message.reasoning, content null.
    events, reader = answer("vllm017_reasoning_tools.json")
    assert [(c.call_index, c.id, c.name) for c in calls(events)] == [
        (0, "chatcmpl-tool-5e1", "get_weather"),
        (1, "chatcmpl-tool-7a2", "get_weather"),
    ]
    assert not [e for e in events if isinstance(e, TextDelta)]


@pytest.mark.parametrize(
    "body",
    [
        [1],
        {"choices": []},
        {"choices": [{"delta": {"content": "x"}}]},  # a stream chunk, not an answer
        {"choices": [{"message": "x"}]},
        {"error": {"message": "boom"}},
    ],
)
def test_answers_that_are_not_chat_completions_are_protocol_errors(body: object) -> None:
    with pytest.raises(UpstreamProtocolError):
        ChunkReader().answer(body)


def test_a_caller_that_wants_the_whole_answer_gets_a_non_streamed_upstream_call() -> None:
    body = request_body(_request(stream=False), "upstream-name", Dialect())
    assert body["stream"] is False
    # Usage comes with every whole answer; stream_options is refused without stream (vLLM, OpenAI).
    assert "stream_options" not in body


def test_max_tokens_is_cut_to_the_room_the_prompt_leaves() -> None:
    thinking = _request(thinking=Thinking(enabled=True, budget=64))
    assert max_tokens_asked(thinking, Dialect()) == 10 + 64
    assert max_tokens_asked(thinking, Dialect(dashscope=True)) == 10  # DashScope's caps the answer only
    assert request_body(thinking, "m", Dialect(), room=30)["max_tokens"] == 30
    assert request_body(thinking, "m", Dialect(), room=500)["max_tokens"] == 74
    assert request_body(_request(), "m", Dialect(), room=4)["max_tokens"] == 4
    assert request_body(_request(), "m", Dialect(), room=None)["max_tokens"] == 10
