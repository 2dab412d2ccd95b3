from __future__ import annotations

import httpx
from openai import OpenAI

from tests.support import Server, assert_schema


def test_models_list(server: Server) -> None:
    for base in (server.compat_url, f"{server.base_url}/v1"):
        r = httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {server.api_key}"})
        assert r.status_code == 200
        body = r.json()
        assert_schema(body, "ListModelsResponse")
        assert [m["id"] for m in body["data"]] == ["qwen-plus", "qwen-max", "qwen-turbo", "qwen3-8b"]
    ids = [m.id for m in OpenAI(api_key=server.api_key, base_url=server.compat_url).models.list()]
    assert ids == ["qwen-plus", "qwen-max", "qwen-turbo", "qwen3-8b"]


def test_health(server: Server) -> None:
    r = httpx.get(f"{server.base_url}/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert {m["id"]: (m["state"], m["active_generations"]) for m in body["models"]} == {
        "qwen-plus": ("ready", 0),
        "qwen-max": ("ready", 0),
        "qwen-turbo": ("ready", 0),
        "qwen3-8b": ("ready", 0),
    }


def test_v1_alias_serves_chat(server: Server) -> None:
    r = OpenAI(api_key=server.api_key, base_url=f"{server.base_url}/v1").chat.completions.create(
        model="qwen-plus", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert r.usage is not None and r.usage.completion_tokens == 3
