"""The output layer's oneDNN product (engines/local/cpu_matmul.py): same logits, same tied weight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qwen_gateway.engines.local import cpu_matmul
from tests.unit.engines.local_helpers import QWEN25, collect, request, run

pytestmark = pytest.mark.skipif(not cpu_matmul.onednn_available(), reason="torch built without oneDNN")


def _tiny() -> Any:
    model = AutoModelForCausalLM.from_pretrained(str(QWEN25), dtype=torch.float32)
    model.eval()
    return model


def test_the_packed_head_gives_torchs_logits_and_keeps_the_tied_embedding() -> None:
    model = _tiny()
    head = model.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear)
    embeddings = model.get_input_embeddings().weight
    x = torch.randn(3, 5, head.in_features)
    with torch.inference_mode():
        expected = head(x)
    assert cpu_matmul.pack_model(model, torch.device("cpu"), torch.float32) == 1  # tiny layers stay
    packed = model.get_output_embeddings()
    assert isinstance(packed, cpu_matmul.PackedLinear) and packed.out_features == head.out_features
    # Tied: the embedding lookup still reads the same Parameter, and the head still names it.
    assert packed.weight is embeddings and model.get_input_embeddings().weight is embeddings
    with torch.inference_mode():
        got = packed(x)
        sliced = packed(x[:, -1:, :])  # the decode step's view: a non-contiguous slice
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced, expected[:, -1:, :], rtol=1e-5, atol=1e-5)
    # Packing twice is a no-op.
    assert cpu_matmul.pack_model(model, torch.device("cpu"), torch.float32) == 0
    assert model.get_output_embeddings() is packed


def test_a_rows_logits_do_not_depend_on_the_rows_beside_it() -> None:
    model = _tiny()
    cpu_matmul.pack_model(model, torch.device("cpu"), torch.float32)
    head = model.get_output_embeddings()
    x = torch.randn(16, head.in_features)
    with torch.inference_mode():
        alone = [head(x[i : i + 1]) for i in range(16)]
        for rows in (2, 4, 8, 16):
            together = head(x[:rows])
            assert all(torch.equal(together[i : i + 1], alone[i]) for i in range(rows)), rows


def test_an_untied_head_keeps_only_the_packed_copy() -> None:
    linear = torch.nn.Linear(8, 40, bias=True)
    packed = cpu_matmul.PackedLinear(linear, keep_weight=False)
    assert packed.weight is None and packed.bias is linear.bias
    x = torch.randn(2, 8)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


def test_other_dtypes_and_devices_keep_torchs_head(tmp_path: Path) -> None:
    model = _tiny()
    assert cpu_matmul.pack_model(model, torch.device("cpu"), torch.bfloat16) == 0
    assert cpu_matmul.pack_model(model, torch.device("meta"), torch.float32) == 0
    assert type(model.get_output_embeddings()) is torch.nn.Linear


def test_the_loader_packs_the_head_of_an_fp32_cpu_model(engine_factory: object) -> None:
    engine = engine_factory()  # type: ignore[operator]
    assert isinstance(engine._loaded.model.get_output_embeddings(), cpu_matmul.PackedLinear)


def test_a_models_large_decoder_layers_are_packed_without_holding_their_weights_twice() -> None:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).eval()
    ids = torch.randint(0, 1000, (2, 7))
    before = sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    # Per layer: q/o (256x256), gate/up/down (256x512) reach the threshold; k/v (256x128) do not.
    assert cpu_matmul.pack_model(model, torch.device("cpu"), torch.float32) == 1 + 2 * 5
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, cpu_matmul.PackedLinear) and attention.q_proj.weight is None
    assert type(attention.k_proj) is torch.nn.Linear
    head = model.get_output_embeddings()
    assert isinstance(head, cpu_matmul.PackedLinear) and head.weight is None  # untied: packed copy only
    packed_elements = 1000 * 256 + 2 * (2 * 256 * 256 + 3 * 256 * 512)
    assert sum(p.numel() for p in model.parameters()) == before - packed_elements
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_packed_linear_false_keeps_torchs_layers(engine_factory: Any) -> None:
    """The ``[[models]]`` option ``packed_linear``: on by default, off leaves every nn.Linear in place."""
    default = engine_factory(QWEN25, id="packed-default")
    plain = engine_factory(QWEN25, id="packed-off", packed_linear=False)
    assert isinstance(default._loaded.model.get_output_embeddings(), cpu_matmul.PackedLinear)
    model = plain._loaded.model
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert not any(isinstance(m, cpu_matmul.PackedLinear) for m in model.modules())
    # And it still answers.
    _, finished = run(collect(plain.generate(request(max_tokens=4, seed=3))))
    assert finished.usage.completion_tokens >= 1
