"""Incremental detokenization and stop matching, on the real Qwen tokenizer (no model needed)."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest

from qwen_gateway.engines.local.detok import IncrementalDetokenizer, StopStrings, StopTokenSequences
from tests.unit.engines.local_helpers import QWEN25

# Single tokens for CJK words, several byte-level tokens for one rare character or emoji.
MULTIBYTE = "你好，世界！这是一个测试。🙂 龘 𝄞 naïve café — done"


@cache
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN25)


def stream(ids: list[int], prompt: list[int] | None = None) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer(), prompt or tokenizer()("user: hi\nassistant:")["input_ids"])
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


def test_multibyte_text_streams_whole_characters() -> None:
    tok = tokenizer()
    ids = tok(MULTIBYTE, add_special_tokens=False)["input_ids"]
    # The test means something only if some tokens are partial characters on their own.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas = stream(ids)
    assert "".join(deltas) == MULTIBYTE == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_incomplete_character_at_the_end_is_flushed() -> None:
    tok = tokenizer()
    ids = tok("ab龘", add_special_tokens=False)["input_ids"]
    cut = ids[:-1]  # the last byte of 龘 never comes
    deltas = stream(cut)
    assert "".join(deltas) == tok.decode(cut)
    assert not any("\ufffd" in d for d in deltas[:-1])


def test_special_tokens_that_are_not_eos_are_text() -> None:
    tok = tokenizer()
    ids = tok("<tool_call>\n{}\n</tool_call>", add_special_tokens=False)["input_ids"]
    assert "".join(stream(ids)) == "<tool_call>\n{}\n</tool_call>"


@pytest.mark.parametrize(
    ("pieces", "stops", "released", "stopped"),
    [
        (["Hello wor", "ld! STOP here"], ["STOP"], "Hello world! ", True),
        (["abc", "ST", "O", "P tail"], ["STOP"], "abc", True),
        (["abc", "ST", "x"], ["STOP"], "abcSTx", False),  # a false start is released
        (["one\n\ntwo"], ["\n\n", "two"], "one", True),  # the earliest stop wins
        (["aXb", "Yc"], ["XbY", "bYc"], "a", True),
        (["plain text"], [], "plain text", False),
    ],
)
def test_stop_strings(pieces: list[str], stops: list[str], released: str, stopped: bool) -> None:
    matcher = StopStrings(stops)
    out = ""
    for piece in pieces:
        out += matcher.push(piece)
        if matcher.stopped:
            break
    if not matcher.stopped:
        out += matcher.flush()
    assert out == released and matcher.stopped is stopped


def test_stop_string_prefix_is_held_back_while_streaming() -> None:
    matcher = StopStrings(["</answer>"])
    assert matcher.push("The result </an") == "The result "
    assert matcher.push("swer>") == "" and matcher.stopped


def test_stop_token_sequences() -> None:
    matcher = StopTokenSequences([(7, 8, 9), (5,)])
    assert matcher.push(1) == [1]
    assert matcher.push(7) == []  # could start (7, 8, 9)
    assert matcher.push(8) == []
    assert matcher.push(3) == [7, 8, 3]  # false start released in order
    assert matcher.push(7) == [] and matcher.push(8) == [] and matcher.push(9) == []
    assert matcher.stopped
    single = StopTokenSequences([(5,)])
    assert single.push(4) == [4] and single.push(5) == [] and single.stopped
    pending = StopTokenSequences([(1, 2)])
    assert pending.push(1) == [] and pending.flush() == [1]
