"""The folders' one-way layering, checked on the source: api -> service -> engines; protocol and store
are leaves that engines never touch; torch is imported only by the local engine."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "qwen_gateway"

# layer -> packages it must never import
FORBIDDEN = {
    "engines": (
        "qwen_gateway.api",
        "qwen_gateway.service",
        "qwen_gateway.protocol",
        "qwen_gateway.store",
        "qwen_gateway.cli",
    ),
    "protocol": (
        "qwen_gateway.api",
        "qwen_gateway.service",
        "qwen_gateway.engines",
        "qwen_gateway.store",
        "qwen_gateway.cli",
    ),
    "store": (
        "qwen_gateway.api",
        "qwen_gateway.service",
        "qwen_gateway.engines",
        "qwen_gateway.protocol",
        "qwen_gateway.cli",
    ),
    # Media fetching/decoding serves the service and the engines' part types, never the reverse.
    "media": (
        "qwen_gateway.api",
        "qwen_gateway.service",
        "qwen_gateway.protocol",
        "qwen_gateway.store",
        "qwen_gateway.cli",
    ),
    # Web-search providers know queries and hits, never requests, prompts or wire shapes.
    "search": (
        "qwen_gateway.api",
        "qwen_gateway.service",
        "qwen_gateway.engines",
        "qwen_gateway.protocol",
        "qwen_gateway.store",
        "qwen_gateway.cli",
    ),
    # Document parsing (run in a child process) knows nothing of the server around it.
    "documents": (
        "qwen_gateway.api",
        "qwen_gateway.service",
        "qwen_gateway.protocol",
        "qwen_gateway.store",
        "qwen_gateway.engines",
        "qwen_gateway.cli",
    ),
    "service": ("qwen_gateway.api", "qwen_gateway.cli"),
    "api": ("qwen_gateway.cli",),
}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_layers_import_one_way() -> None:
    violations = []
    for layer, forbidden in FORBIDDEN.items():
        for path in (PKG / layer).rglob("*.py"):
            for name in imports_of(path):
                if name.startswith(forbidden):
                    violations.append(f"{path.relative_to(PKG)} imports {name}")
    assert not violations, violations


def test_torch_only_in_local_engine() -> None:
    offenders = [
        str(p.relative_to(PKG))
        for p in PKG.rglob("*.py")
        if "local" not in p.relative_to(PKG).parts
        and any(n.split(".")[0] in {"torch", "transformers"} for n in imports_of(p))
    ]
    assert not offenders


def test_server_stack_imports_without_torch() -> None:
    code = (
        "import sys, qwen_gateway.cli, qwen_gateway.api.app, qwen_gateway.service.runtime;"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
