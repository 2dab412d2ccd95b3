"""qwen-gateway: a self-hosted server for Qwen models speaking DashScope's API."""

__version__ = "0.1.0"
