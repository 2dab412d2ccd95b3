"""The first five minutes: `qwen-gateway serve` on its embedded default answers the README's question
every time, and start-up output written to a log is a few plain lines."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.support import Server

README = Path(__file__).resolve().parents[2] / "README.md"
QUESTION = "What is the capital of France?"
# What a terminal display would write: escape sequences (colour, cursor moves) and carriage returns.
CONTROL = re.compile(r"\x1b|\r")


LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def startup_lines(log: str) -> list[str]:
    """The server's own start-up lines: everything before uvicorn's first log line."""
    head = log.split(" INFO uvicorn", 1)[0]
    return [line for line in head.splitlines() if line.strip()]


def test_readme_asks_the_question_this_test_asks() -> None:
    # The done-when criterion is about the README's own example: keep the two in step.
    assert QUESTION in README.read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.xdist_group("embedded")  # one embedded server for both of its tests
@pytest.mark.timeout(1800)  # ten real answers on a busy 2-core machine outlast the suite's 300 s default
def test_embedded_default_answers_the_readme_question_ten_times(embedded_server: Server) -> None:
    """SLOW (1-3 min on a quiet 2-core CPU): the real server on the embedded default, asked the README's
    question 10 times at the embedded defaults (the request sets no sampling field, as the README's)."""
    server = embedded_server
    lines = startup_lines(server.log())
    assert not [line for line in lines if CONTROL.search(line)], lines
    client = OpenAI(api_key=server.api_key, base_url=server.compat_url, max_retries=0, timeout=600)
    answers = []
    for _ in range(10):
        completion = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": QUESTION}]
        )
        choice = completion.choices[0]
        answers.append((choice.finish_reason, completion.usage, choice.message.content or ""))
    # No answer runs on to the cap: each ends its turn itself.
    assert [a[0] for a in answers] == ["stop"] * 10, answers
    with_paris = sum("Paris" in a[2] for a in answers)
    assert with_paris >= 6, answers


def test_startup_output_off_a_terminal_is_a_few_plain_lines(one_line_server: Server) -> None:
    """The server's output goes to a file here (as under systemd, docker or CI): one plain line per
    loading step, no spinner or bar frames."""
    server = one_line_server
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    lines = startup_lines(server.log())
    assert not [line for line in lines if CONTROL.search(line)], lines
    # Log records (the schema upgrade's, when the server migrates the new home before the test's
    # `keys create` does) are not loading steps.
    loading = [line for line in lines if not line.startswith("qwen-gateway ") and not LOG_RECORD.match(line)]
    assert loading[0].startswith("Loading model qwen2.5-7b-instruct from ")
    steps = [line.strip() for line in loading[1:] if line.startswith("  ")]
    assert steps[0].startswith("tokenizer: ") and steps[0].endswith(" s")
    # transformers' weight loop reports its count as one line, not as a redrawn bar.
    assert any(re.fullmatch(r"loading weights \(\d+/\d+\): [\d.]+ s", s) for s in steps), steps
    assert any(line.startswith("✓ model qwen2.5-7b-instruct ready in ") for line in loading), loading
    assert len(lines) <= 12, lines
