"""Upstream engines: models served by OpenAI-compatible servers (``openai``: vLLM, SGLang, Ollama,
llama.cpp's server) and by DashScope's compatible mode (``dashscope``), with replicas, health checks and
a circuit breaker. Torch-free."""

from qwen_gateway.engines.openai.engine import DashScopeEngine, OpenAIEngine

__all__ = ["DashScopeEngine", "OpenAIEngine"]
