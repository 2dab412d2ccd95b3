"""The seed examples (seeds/002 text chat, seeds/000 bad key) run unchanged against our server.

Only ``base_url`` and ``api_key`` differ from the seeds; every response and stream chunk is checked
against the OpenAI spec's schemas and against the seeds' shapes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from transformers import AutoTokenizer

from tests.support import MODELS, Server, assert_schema

SEED_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "你是谁?"},
]
# Keys of the seeds' raw (curl) responses, less ``system_fingerprint`` (see protocol/compat.py).
COMPLETION_KEYS = {"choices", "object", "usage", "created", "model", "id"}
CHUNK_KEYS = {"choices", "object", "usage", "created", "model", "id"}


def rendered_prompt_tokens(messages: list[dict[str, str]], model_dir: str = "tiny-qwen2.5") -> int:
    tok = AutoTokenizer.from_pretrained(MODELS / model_dir)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def client(server: Server) -> OpenAI:
    return OpenAI(api_key=server.api_key, base_url=server.compat_url)


def test_non_stream_seed(server: Server) -> None:
    completion = client(server).chat.completions.create(model="qwen-plus", messages=SEED_MESSAGES)  # type: ignore[arg-type]
    dumped = json.loads(completion.model_dump_json())
    assert dumped["id"].startswith("chatcmpl-")
    assert dumped["object"] == "chat.completion"
    assert dumped["model"] == "qwen-plus"
    choice = dumped["choices"][0]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = dumped["usage"]
    # The same prompt DashScope's qwen-plus counted as 22 tokens in the seed: same tokenizer, same count.
    assert usage["prompt_tokens"] == rendered_prompt_tokens(SEED_MESSAGES) == 22
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 48


def test_non_stream_raw_shape_and_schema(server: Server) -> None:
    r = httpx.post(
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json={"model": "qwen-plus", "messages": SEED_MESSAGES},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == COMPLETION_KEYS
    assert set(body["choices"][0]) == {"message", "finish_reason", "index", "logprobs"}
    assert set(body["choices"][0]["message"]) == {"role", "content", "refusal"}
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert body["id"] == f"chatcmpl-{r.headers['x-request-id']}"
    assert_schema(body, "CreateChatCompletionResponse")
    # One ledger row per request, with exactly the usage that was answered, under the caller's key.
    (row,) = server.ledger(r.headers["x-request-id"])
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == (
        "ok",
        body["usage"]["prompt_tokens"],
        body["usage"]["completion_tokens"],
    )
    assert row["endpoint"] == "chat.completions" and row["key_id"].startswith("key_")


def _check_stream_chunks(chunks: list[dict], include_usage: bool) -> None:
    for c in chunks:
        assert set(c) == CHUNK_KEYS
        assert c["object"] == "chat.completion.chunk"
        assert_schema(c, "CreateChatCompletionStreamResponse")
    assert len({c["id"] for c in chunks}) == 1
    first = chunks[0]
    assert first["choices"][0]["delta"] == {"content": "", "role": "assistant"}
    assert first["choices"][0]["finish_reason"] is None
    body = chunks[:-1] if include_usage else chunks
    finish = body[-1]
    assert finish["choices"][0]["finish_reason"] in ("stop", "length")
    assert finish["choices"][0]["delta"] == {"content": ""}
    for c in body[1:-1]:
        assert c["choices"][0]["finish_reason"] is None
        assert set(c["choices"][0]["delta"]) == {"content"} and c["choices"][0]["delta"]["content"]
        assert c["usage"] is None
    if include_usage:
        last = chunks[-1]
        assert last["choices"] == []
        u = last["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        assert u["prompt_tokens"] == rendered_prompt_tokens(SEED_MESSAGES)
    else:
        assert all(c["usage"] is None for c in chunks)


def _raw_stream(server: Server, body: dict) -> tuple[list[dict], list[str]]:
    lines: list[str] = []
    with httpx.stream(
        "POST",
        f"{server.compat_url}/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json=body,
        timeout=60,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]], lines


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_raw(server: Server, include_usage: bool) -> None:
    body: dict = {"model": "qwen-plus", "messages": SEED_MESSAGES, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    chunks, _ = _raw_stream(server, body)
    _check_stream_chunks(chunks, include_usage)
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"])
    assert text


def test_stream_seed_with_sdk(server: Server) -> None:
    completion = client(server).chat.completions.create(
        model="qwen-plus",
        messages=SEED_MESSAGES,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [json.loads(chunk.model_dump_json()) for chunk in completion]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    # What the seed's loop prints: one JSON object per chunk, same keys as the seed's output.
    assert {"id", "choices", "created", "model", "object", "usage"} <= set(chunks[1])


def test_async_client_seed(server: Server) -> None:
    async def main() -> dict:
        aclient = AsyncOpenAI(api_key=server.api_key, base_url=server.compat_url)
        response = await aclient.chat.completions.create(
            messages=[{"role": "user", "content": "你是谁"}], model="qwen-plus"
        )
        await aclient.close()
        return json.loads(response.model_dump_json())

    body = asyncio.run(main())
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] == rendered_prompt_tokens([{"role": "user", "content": "你是谁"}])


def test_curl_seed(server: Server) -> None:
    payload = json.dumps({"model": "qwen-plus", "messages": SEED_MESSAGES})
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-X",
            "POST",
            f"{server.compat_url}/chat/completions",
            "-H",
            f"Authorization: Bearer {server.api_key}",
            "-H",
            "Content-Type: application/json",
            "-d",
            payload,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    body = json.loads(out)
    assert set(body) == COMPLETION_KEYS
    assert_schema(body, "CreateChatCompletionResponse")
    stream_payload = json.dumps({"model": "qwen-plus", "messages": SEED_MESSAGES, "stream": True})
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-N",
            "--location",
            f"{server.compat_url}/chat/completions",
            "--header",
            f"Authorization: Bearer {server.api_key}",
            "--header",
            "Content-Type: application/json",
            "--data",
            stream_payload,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    data = [line[len("data: ") :] for line in out.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    _check_stream_chunks([json.loads(d) for d in data[:-1]], include_usage=False)


SEED_BAD_KEY_BODY = {
    "error": {
        "message": "Incorrect API key provided. ",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "Bearer sk-not-a-real-key"}, {}, {"Authorization": "Basic abc"}],
)
def test_bad_api_key_seed(server: Server, headers: dict[str, str]) -> None:
    for path, method in (("/chat/completions", "POST"), ("/models", "GET")):
        for base in (server.compat_url, f"{server.base_url}/v1"):
            r = httpx.request(
                method,
                base + path,
                headers=headers,
                json={"model": "qwen-plus", "messages": SEED_MESSAGES},
                timeout=30,
            )
            assert r.status_code == 401
            assert r.json() == SEED_BAD_KEY_BODY
    # Keys, good or bad, never reach the server's log.
    log = server.log()
    assert "sk-not-a-real-key" not in log and server.api_key not in log


def test_bad_api_key_with_sdk(server: Server) -> None:
    bad = OpenAI(api_key="sk-wrong", base_url=server.compat_url)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="qwen-plus", messages=SEED_MESSAGES)  # type: ignore[arg-type]
    assert info.value.status_code == 401
    assert info.value.body == SEED_BAD_KEY_BODY["error"]
