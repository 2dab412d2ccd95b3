"""Loading checkpoints: what is accepted, and the one-line StartupError for everything else."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from qwen_gateway.errors import StartupError
from qwen_gateway.settings import ModelConfig, Settings
from tests.unit.engines.local_helpers import MODELS, QWEN25, make_engine, run


def start_error(path: str | Path, tmp_path: Path, **config: Any) -> str:
    engine = make_engine(Path(path), tmp_path, id="qwen-plus", **config)
    with pytest.raises(StartupError) as info:
        run(engine.start())
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("model 'qwen-plus': ")
    assert run(engine.health()).state.value == "failed"
    return message


def test_missing_path(tmp_path: Path) -> None:
    assert "does not exist" in start_error(tmp_path / "nope", tmp_path)


def test_broken_config_json(tmp_path: Path) -> None:
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "config.json").write_text("{broken")
    assert "config.json is not valid JSON" in start_error(bad, tmp_path)


def test_directory_without_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "no config.json" in start_error(tmp_path / "empty", tmp_path)


def test_unknown_model_type_and_missing_weights(tmp_path: Path) -> None:
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "warp-drive"}')
    assert "could not load the checkpoint" in start_error(odd, tmp_path)
    weightless = tmp_path / "weightless"
    shutil.copytree(QWEN25, weightless)
    (weightless / "model.safetensors").unlink()
    assert "could not load the checkpoint" in start_error(weightless, tmp_path)


def test_architecture_without_a_generation_head_is_unsupported(tmp_path: Path) -> None:
    encoder = tmp_path / "t5"
    shutil.copytree(QWEN25, encoder)
    (encoder / "config.json").write_text('{"model_type": "t5", "architectures": ["T5EncoderModel"]}')
    message = start_error(encoder, tmp_path)
    assert "T5EncoderModel is not supported" in message


@pytest.mark.slow  # 4-8 s: loads both VL checkpoints (out of the quick run, in CI)
def test_vision_checkpoints_load_and_declare_what_they_take(tmp_path: Path) -> None:
    for name in ("tiny-qwen2-vl", "tiny-qwen3-vl"):
        engine = make_engine(MODELS / name, tmp_path / name, id=name)
        run(engine.start())
        try:
            caps = engine.capabilities
            assert caps.vision and caps.video
            assert type(engine._loaded.model).__name__.endswith("ForConditionalGeneration")
        finally:
            run(engine.aclose())
    text = make_engine(QWEN25, tmp_path / "text", id="text")
    run(text.start())
    try:
        assert not text.capabilities.vision and not text.capabilities.video
    finally:
        run(text.aclose())


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    assert "not a .gguf file" in start_error(QWEN25 / "config.json", tmp_path)


def test_gguf_choices(tmp_path: Path) -> None:
    from qwen_gateway.engines.local.loader import resolve_source

    many = tmp_path / "many"
    many.mkdir()
    (many / "a.gguf").write_bytes(b"x")
    (many / "b.gguf").write_bytes(b"x")
    assert "several .gguf files" in start_error(many, tmp_path)
    src = resolve_source(ModelConfig(id="m", path=str(many), gguf_file="b.gguf"))
    assert (src.kind, src.location, src.gguf_file) == ("gguf", str(many), "b.gguf")
    src = resolve_source(ModelConfig(id="m", path=str(many / "a.gguf")))
    assert (src.kind, src.gguf_file) == ("gguf", "a.gguf")
    assert "not found" in start_error(many, tmp_path, gguf_file="c.gguf")
    # A corrupt GGUF fails with one line too.
    assert "could not load the checkpoint" in start_error(many / "a.gguf", tmp_path)


def test_hub_repo_id_downloads_disabled(tmp_path: Path) -> None:
    from qwen_gateway.engines.local import LocalEngine

    engine = LocalEngine(
        ModelConfig(id="qwen-plus", path="Qwen/Qwen2.5-0.5B-Instruct"),
        settings=Settings(home=tmp_path, allow_downloads=False),
    )
    with pytest.raises(StartupError, match="downloads are disabled"):
        run(engine.start())


def test_hub_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls: list[tuple[Any, ...]] = []

    def offline(repo_id: str, **kw: Any) -> str:
        calls.append((repo_id, kw.get("revision")))
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    message = start_error("Qwen/Qwen2.5-0.5B-Instruct", tmp_path, revision="main")
    assert "could not reach the Hugging Face hub" in message and "local checkpoint directory" in message
    assert calls == [("Qwen/Qwen2.5-0.5B-Instruct", "main")]


def test_hub_download_then_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(QWEN25))
    engine = make_engine(Path("someorg/tiny-qwen"), tmp_path)
    run(engine.start())
    try:
        assert engine.capabilities.max_context == 32768
    finally:
        run(engine.aclose())


def test_dtype_and_device_choices() -> None:
    import torch

    from qwen_gateway.engines.local.loader import _Fail, pick_device, pick_dtype

    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) is torch.float32
    assert pick_dtype("bfloat16", cpu) is torch.bfloat16
    assert pick_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert pick_device("auto") == cpu
        with pytest.raises(_Fail, match="CUDA is not available"):
            pick_device("cuda:0")
    with pytest.raises(_Fail, match="unknown device"):
        pick_device("toaster")
