"""LangChain's ChatOpenAI against the server (seed 000 shows it with DashScope)."""

from __future__ import annotations

from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI

from tests.support import Server


def llm(server: Server, **kw: object) -> ChatOpenAI:
    return ChatOpenAI(model="qwen-plus", api_key=server.api_key, base_url=server.compat_url, **kw)  # type: ignore[arg-type]


def test_invoke_with_usage_metadata(server: Server) -> None:
    msg = llm(server, max_tokens=8, temperature=0.5, seed=1).invoke("你好,介绍一下你自己")
    assert isinstance(msg.content, str) and msg.content
    usage = msg.usage_metadata
    assert usage is not None
    assert usage["output_tokens"] == 8
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert msg.response_metadata["finish_reason"] == "length"


def test_stream_with_usage_metadata(server: Server) -> None:
    chunks = list(llm(server, max_tokens=10, temperature=0.5, seed=2, stream_usage=True).stream("hi"))
    assert len(chunks) > 2
    total: AIMessageChunk = chunks[0]
    for c in chunks[1:]:
        total = total + c  # type: ignore[assignment]
    assert total.usage_metadata is not None
    assert total.usage_metadata["output_tokens"] == 10
    assert isinstance(total.content, str) and total.content
