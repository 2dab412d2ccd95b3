"""Output parsers on real Qwen output: the text is tokenized with the real Qwen tokenizer and fed back
through the engine's own detokenizer (``TextStream``), token by token (as a slow stream) and all at
once (as a non-stream answer), with the special-token marks the engine attaches and without them
(an engine that only has text)."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import pytest

from qwen_gateway.engines.local.detok import TextStream
from qwen_gateway.service.events import ChoiceEvent, ContentDelta, ReasoningDelta, ToolCallDelta
from qwen_gateway.service.parsers import ParserChoice, parser_for
from qwen_gateway.service.parsers.base import OutputParser, PlainText
from qwen_gateway.service.parsers.hermes import HermesToolParser
from qwen_gateway.service.parsers.qwen3 import Qwen3ReasoningParser
from tests.support import MODELS


@cache
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODELS / "tiny-qwen3"))


@cache
def special_tokens() -> dict[str, int]:
    return {str(k): int(v) for k, v in tokenizer().get_added_vocab().items()}


def ids_of(text: str) -> list[int]:
    return [int(i) for i in tokenizer()(text, add_special_tokens=False)["input_ids"]]


class _Decoder:
    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return str(tokenizer().decode(token_ids, skip_special_tokens=skip_special_tokens))


def pieces(ids: list[int], step: int) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
    """(text, specials) as the engine yields them, ``step`` ids per delta."""
    specials = {i: t for t, i in special_tokens().items()}
    stream = TextStream(_Decoder(), ids_of("<|im_start|>assistant\n"), (), specials)
    out = []
    for at in range(0, len(ids), step):
        text = stream.push(ids[at : at + step])
        out.append((text, stream.last_specials))
    out.append((stream.flush(), stream.last_specials))
    return [p for p in out if p[0]]


def run(parser: OutputParser, ids: list[int], *, step: int = 1, marks: bool = True) -> list[ChoiceEvent]:
    events: list[ChoiceEvent] = []
    for text, specials in pieces(ids, step):
        events += parser.feed(text, specials if marks else None)
        if parser.done:
            break
    return events + parser.finish()


def hermes(parallel: bool = True) -> HermesToolParser:
    return HermesToolParser(0, special_tokens(), parallel=parallel)


def summary(events: list[ChoiceEvent]) -> dict[str, Any]:
    """What a non-stream answer holds: content, reasoning, calls (id, name, arguments)."""
    calls: dict[int, dict[str, str]] = {}
    for e in events:
        if isinstance(e, ToolCallDelta):
            call = calls.setdefault(e.call_index, {"id": "", "name": "", "arguments": ""})
            if e.id is not None:
                assert not call["id"], "a call's id comes once, in its first delta"
                call["id"], call["name"] = e.id, e.name or ""
            else:
                assert e.name is None
            call["arguments"] += e.arguments
    return {
        "content": "".join(e.text for e in events if isinstance(e, ContentDelta)),
        "reasoning": "".join(e.text for e in events if isinstance(e, ReasoningDelta)),
        "calls": [calls[i] for i in sorted(calls)],
    }


def calls_without_ids(s: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["name"], c["arguments"]) for c in s["calls"]]


WEATHER = '{"name": "get_current_weather", "arguments": {"location": "杭州市"}}'
TIME = '{"name": "get_current_time", "arguments": {}}'


def call(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


# Outputs as Qwen2.5 / Qwen3 write them.
CASES = {
    "single": (call(WEATHER), "", [("get_current_weather", '{"location": "杭州市"}')]),
    "parallel": (
        call(WEATHER) + "\n" + call('{"name": "get_current_weather", "arguments": {"location": "上海市"}}'),
        "",
        [
            ("get_current_weather", '{"location": "杭州市"}'),
            ("get_current_weather", '{"location": "上海市"}'),
        ],
    ),
    "text before": (
        "I'll look that up for you.\n" + call(WEATHER),
        "I'll look that up for you.\n",
        [("get_current_weather", '{"location": "杭州市"}')],
    ),
    "empty arguments": (call(TIME), "", [("get_current_time", "{}")]),
    "no arguments key": (call('{"name": "get_current_time"}'), "", [("get_current_time", "{}")]),
    "nested and unicode": (
        call('{"name": "book", "arguments": {"who": {"name": "Zoë 😀", "tags": ["a", "}"]}, "n": 2}}'),
        "",
        [("book", '{"who": {"name": "Zoë 😀", "tags": ["a", "}"]}, "n": 2}')],
    ),
    "escaped quotes": (
        call('{"name": "say", "arguments": {"text": "he said \\"hi\\" \\\\ {"}}'),
        "",
        [("say", '{"text": "he said \\"hi\\" \\\\ {"}')],
    ),
    "arguments as a JSON string": (
        call('{"name": "get_current_weather", "arguments": "{\\"location\\": \\"Paris\\"}"}'),
        "",
        [("get_current_weather", '{"location": "Paris"}')],
    ),
    # vLLM's hermes parser lost the final brace when the arguments ended with a non-string value and
    # the closing tokens arrived together (multi-token steps: see the step sizes below).
    "non-string last values": (
        call('{"name": "get", "arguments": {"id": 42, "ok": true, "tags": null, "deep": {"x": [1, {}]}}}'),
        "",
        [("get", '{"id": 42, "ok": true, "tags": null, "deep": {"x": [1, {}]}}')],
    ),
    "code block": (
        "Use this format:\n```\n" + call(WEATHER) + "\n```\nThat's all.",
        "Use this format:\n```\n" + call(WEATHER) + "\n```\nThat's all.",
        [],
    ),
    "malformed": (
        call("{get_current_weather(location=杭州)}"),
        call("{get_current_weather(location=杭州)}"),
        [],
    ),
    "never closed": ('<tool_call>\n{"na', '<tool_call>\n{"na', []),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("marks", [True, False], ids=["token-marks", "text-only"])
def test_hermes_on_real_qwen_output(case: str, marks: bool) -> None:
    text, content, expected = CASES[case]
    ids = ids_of(text)
    streamed = summary(run(hermes(), ids, step=1, marks=marks))
    whole = summary(run(hermes(), ids, step=len(ids), marks=marks))
    assert streamed["content"] == whole["content"] == content
    assert calls_without_ids(streamed) == calls_without_ids(whole) == expected
    for step in (2, 3, 5):  # several tokens per delta (a slow consumer gets what piled up)
        batched = summary(run(hermes(), ids, step=step, marks=marks))
        assert (batched["content"], calls_without_ids(batched)) == (content, expected)
    for c in streamed["calls"]:
        assert c["id"].startswith("call_") and len(c["id"]) == 5 + 22
        json.loads(c["arguments"])  # the arguments always parse


def test_arguments_arrive_in_many_deltas_and_join_exactly() -> None:
    events = run(hermes(), ids_of(call(WEATHER)))
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert len(deltas) > 4
    first, rest = deltas[0], deltas[1:]
    assert first.id is not None and first.name == "get_current_weather" and first.call_index == 0
    assert all(d.id is None and d.name is None and d.call_index == 0 for d in rest)
    assert "".join(d.arguments for d in deltas) == '{"location": "杭州市"}'
    assert deltas[-1].arguments.endswith("}")  # the closing brace is never lost


def test_parallel_false_keeps_the_first_call_and_is_done() -> None:
    text = CASES["parallel"][0]
    parser = hermes(parallel=False)
    events = run(parser, ids_of(text))
    assert parser.done
    assert calls_without_ids(summary(events)) == [("get_current_weather", '{"location": "杭州市"}')]


def test_a_tag_written_as_plain_tokens_is_text_when_marks_are_known() -> None:
    # The same characters as <tool_call>, spelled with ordinary tokens (not the special 151657).
    plain = [i for part in ("<", "tool", "_call", ">") for i in ids_of(part)]
    assert special_tokens()["<tool_call>"] not in plain
    ids = plain + ids_of("\n" + WEATHER + "\n</tool_call>")
    got = summary(run(hermes(), ids))
    assert got["calls"] == []
    assert got["content"] == "<tool_call>\n" + WEATHER + "\n</tool_call>"


def test_text_that_starts_like_a_tag_is_not_held_back_longer_than_needed() -> None:
    # With token marks nothing is held: a real tag arrives whole as its own special token.
    parser = hermes()
    assert parser.feed("Compare <tool", ()) == [ContentDelta(0, "Compare <tool")]
    # Text only: just the tail that could still become "<tool_call>" waits, and goes once it can't.
    parser = hermes()
    assert parser.feed("Compare <tool", None) == [ContentDelta(0, "Compare ")]
    assert parser.feed("s and <", None) == [ContentDelta(0, "<tools and ")]
    assert parser.feed("b>", None) == [ContentDelta(0, "<b>")]
    assert parser.finish() == []


def test_reasoning_then_answer() -> None:
    text = "<think>\nThe user asks for 1+1.\nThat is 2.\n</think>\n\n1+1 equals **2**."
    for marks in (True, False):
        for step in (1, 1000):
            parser = Qwen3ReasoningParser(0, PlainText(0), special_tokens())
            got = summary(run(parser, ids_of(text), step=step, marks=marks))
            assert got["reasoning"] == "The user asks for 1+1.\nThat is 2."
            assert got["content"] == "1+1 equals **2**."


def test_reasoning_opened_by_the_prompt_and_budget_close() -> None:
    # QwQ/QVQ style (the prompt opened the block) with the engine's forced "\n</think>\n\n".
    parser = Qwen3ReasoningParser(0, PlainText(0), special_tokens())
    got = summary(run(parser, ids_of("Let me see\n</think>\n\nIt is blue.")))
    assert got == {"reasoning": "Let me see", "content": "It is blue.", "calls": []}


def test_reasoning_never_closed_is_all_reasoning() -> None:
    parser = Qwen3ReasoningParser(0, PlainText(0), special_tokens())
    got = summary(run(parser, ids_of("<think>\nhmm, what if\n\n")))
    assert got == {"reasoning": "hmm, what if", "content": "", "calls": []}


def test_qwen3_thinks_then_calls_a_tool() -> None:
    text = "<think>\nI need the weather tool.\n</think>\n\n" + call(WEATHER)
    choice = ParserChoice(thinking=True, tools=True, parallel_tool_calls=True)
    from qwen_gateway.engines.base import Capabilities

    caps = Capabilities(max_context=4096, special_tokens=special_tokens(), tool_format="hermes")
    for step in (1, 3, 1000):
        got = summary(run(parser_for(0, caps, choice), ids_of(text), step=step))
        assert got["reasoning"] == "I need the weather tool."
        assert got["content"] == ""
        assert calls_without_ids(got) == [("get_current_weather", '{"location": "杭州市"}')]


def test_tag_split_across_text_pieces_without_marks() -> None:
    # An upstream that only has text may cut a tag anywhere.
    text = "ok " + call(TIME)
    parser = hermes()
    events: list[ChoiceEvent] = []
    for ch in text:
        events += parser.feed(ch, None)
    got = summary(events + parser.finish())
    assert got["content"] == "ok "
    assert calls_without_ids(got) == [("get_current_time", "{}")]


# -- Qwen3-Coder's XML calls -----------------------------------------------------------------------


def coder_call(name: str, params: dict[str, str]) -> str:
    inner = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{inner}</function>\n</tool_call>"


CODER_SCHEMAS = {
    "get_current_weather": {
        "type": "object",
        "properties": {
            "location": {"type": "string"},
            "days": {"type": "integer"},
            "zip": {"type": "string"},
        },
    },
    "get_current_time": {},
}


@pytest.mark.parametrize("step", [1, 3, 1000])
@pytest.mark.parametrize("marks", [True, False], ids=["token-marks", "text-only"])
def test_qwen3_coder_calls(step: int, marks: bool) -> None:
    from qwen_gateway.service.parsers.qwen3_coder import Qwen3CoderToolParser

    text = (
        "Checking.\n"
        + coder_call("get_current_weather", {"location": "杭州市", "days": "3", "zip": "0571"})
        + "\n"
        + coder_call("get_current_time", {})
    )
    parser = Qwen3CoderToolParser(0, special_tokens(), parallel=True, parameters=CODER_SCHEMAS)
    got = summary(run(parser, ids_of(text), step=step, marks=marks))
    assert got["content"] == "Checking.\n"
    # A string parameter stays text ("0571" is not the number 571); others are read as JSON.
    assert calls_without_ids(got) == [
        ("get_current_weather", '{"location": "杭州市", "days": 3, "zip": "0571"}'),
        ("get_current_time", "{}"),
    ]
    assert json.loads(got["calls"][0]["arguments"]) == {"location": "杭州市", "days": 3, "zip": "0571"}


def test_qwen3_coder_text_that_is_no_call_is_content() -> None:
    from qwen_gateway.service.parsers.qwen3_coder import Qwen3CoderToolParser

    text = "<tool_call>\nnot a function\n</tool_call> done"
    got = summary(run(Qwen3CoderToolParser(0, special_tokens()), ids_of(text)))
    assert got == {"content": text, "reasoning": "", "calls": []}


@pytest.mark.parametrize(
    ("checkpoint", "expected"),
    [
        ("tiny-qwen2.5", "hermes"),
        ("tiny-qwen3", "hermes"),
        ("tiny-qwen3-vl", "hermes"),
        ("tiny-qwen2-vl", None),
    ],
)
def test_the_engine_reads_the_tool_markup_from_the_template(checkpoint: str, expected: str | None) -> None:
    from transformers import AutoTokenizer

    from qwen_gateway.engines.local.chat_template import tool_format as _tool_format

    template = AutoTokenizer.from_pretrained(str(MODELS / checkpoint)).chat_template
    assert _tool_format(template if isinstance(template, str) else json.dumps(template)) == expected
