"""The deployment files (issue 13): ``deploy/compose.yaml`` and ``deploy/k8s/`` run the image that
``deploy/Dockerfile`` builds, with ``deploy/config.toml`` mounted, several gateway processes sharing one
PostgreSQL. This machine has no Docker engine, no cluster and no GPU, so the containers themselves can't
run here; what can is checked for real: the files agree with each other (every variable the config
names is set by both, the config is mounted where the image's command reads it), and two gateway
processes started with the image's own command line, the compose file's environment and that config
share one PostgreSQL database: a key made through one works on the other, and ``/health`` (the
readiness probe) keeps them out of rotation while the vLLM upstream can't be reached.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support import Server, _launch, create_key, wait_for

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def _k8s_gateway() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "gateway.yaml").read_text()))
    (deployment,) = [d for d in docs if d and d.get("kind") == "Deployment"]
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return {"deployment": deployment, "container": container}


def _image_command() -> list[str]:
    """The Dockerfile's CMD (exec form)."""
    match = re.search(r"^CMD (\[.*\])$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "deploy/Dockerfile has no exec-form CMD"
    command: list[str] = json.loads(match.group(1))
    return command


def _config_variables() -> set[str]:
    config = tomllib.loads((DEPLOY / "config.toml").read_text())
    names = {m["api_key_env"] for m in config["models"] if "api_key_env" in m}
    # The dashscope engine reads DashScope's own variable unless the entry names another.
    names |= {"DASHSCOPE_API_KEY" for m in config["models"] if m.get("engine") == "dashscope"}
    return names | {"QWEN_GATEWAY_DATABASE_URL"}


def test_the_deployment_files_agree_with_each_other() -> None:
    command = _image_command()
    assert command[:2] == ["qwen-gateway", "serve"]
    config_path = Path(command[command.index("--config") + 1])
    needed = _config_variables()

    services = _compose()["services"]
    gateways = [s for name, s in services.items() if name.startswith("gateway")]
    assert len(gateways) >= 2, "the compose file runs several gateway processes"
    for service in gateways:
        assert needed <= set(service["environment"]), needed - set(service["environment"])
        assert service["environment"]["QWEN_GATEWAY_DATABASE_URL"].startswith("postgresql://")
        mounts = {m.split(":")[1] for m in service["volumes"]}
        assert str(config_path) in mounts
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert "postgres" in services and "vllm" in services

    k8s = _k8s_gateway()
    container = k8s["container"]
    assert k8s["deployment"]["spec"]["replicas"] >= 2
    assert needed <= {e["name"] for e in container["env"]}
    assert {m["mountPath"] for m in container["volumeMounts"]} == {str(config_path.parent)}
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    port = int(command[command.index("--port") + 1])
    assert container["ports"][0]["containerPort"] == port


@pytest.mark.slow
def test_two_gateways_from_the_deploy_config_share_one_postgresql(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The compose file's environment (the keys are placeholders: no upstream is reachable here).
    monkeypatch.setenv("VLLM_API_KEY", "placeholder-vllm-key")
    monkeypatch.setenv("DASHSCOPE_API_KEY", "placeholder-dashscope-key")
    command = _image_command()
    # The image's own arguments, on loopback and a free port instead of 0.0.0.0:8000.
    args = list(command[2:])
    for flag in ("--host", "--port"):
        i = args.index(flag)
        del args[i : i + 2]
    args[args.index("--config") + 1] = str(DEPLOY / "config.toml")
    servers: list[Server] = []
    try:
        for name in ("gateway-1", "gateway-2"):
            home = tmp_path / name  # each container has its own /data
            home.mkdir()
            servers.append(_launch(home, ("--host", "127.0.0.1", *args), postgres_url, "server.log"))

        def health(server: Server) -> httpx.Response | None:
            try:
                return httpx.get(f"{server.base_url}/health", timeout=30)
            except httpx.HTTPError:
                assert server.proc.poll() is None, server.log()
                return None

        for server in servers:
            wait_for(lambda s=server: health(s) is not None, "the gateway to answer", timeout=300)
            reply = health(server)
            assert reply is not None
            # Not ready while vLLM can't be reached: the readiness probe keeps the pod out of rotation.
            assert reply.status_code == 503, reply.text
            models = {m["id"]: m for m in reply.json()["models"]}
            assert set(models) == {"qwen-max", "qwen-plus"}
            assert models["qwen-max"]["state"] == "failed"
            assert "no upstream replica is reachable" in models["qwen-max"]["detail"]

        # One database behind both: a key made through the first works on the second.
        key = create_key(servers[0].home, "deploy", database_url=postgres_url)
        listed = httpx.get(
            f"{servers[1].compat_url}/models", headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        assert listed.status_code == 200, listed.text
        assert {"qwen-max", "qwen-plus"} <= {m["id"] for m in listed.json()["data"]}
        for server in servers:
            assert "Traceback" not in server.log()
            assert key not in server.log()
    finally:
        for server in servers:
            server.stop()
