"""fp32 matrix products on the CPU through oneDNN with weights packed once, instead of MKL's sgemm.

Why: profiled at batch 8 on tiny-qwen2.5 (hidden 32, vocabulary 151,936), ``aten::mm`` was 77 % of
the inference thread's step, nearly all of it the output layer: torch's CPU ``linear`` calls MKL,
whose sgemm on this machine's AMD EPYC (Zen 5, AVX-512) costs about the same per row at 8 rows as at
one (measured, one thread, [rows, 32] x [32, 151936]: 0.46 ms at 1 row, 2.2-2.9 ms at 8, 3.8-4.3 ms
at 16). That per-row cost was what kept 8 streams below 4x one stream. oneDNN's matmul on a weight
reordered once into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight`` +
``_linear_pointwise``, the pair torch's own CPU compiler path uses) does the same product in 0.9-1.2
ms at 8 rows and 1.5-2.2 ms at 16; on SmolLM2's output layer ([rows, 576] x [576, 49152]) 3.2 ms
against 7.4 at one row and 4.5 against 14.9 at 8. Its rows also come out the same bits whatever the
number of rows beside them (checked at 1-16 rows for these shapes; MKL's do not), which helps a
seeded request give the same tokens alone and in a batch.

Which layers: the output layer, whose cost grows with the rows (a vocabulary-wide product per
row), and the decoder's linear layers of at least ``MIN_PACKED_WEIGHT`` elements. On small layers
oneDNN's fixed cost per call is higher than MKL's (tiny-qwen2.5's 16 layer products of a few thousand
elements: +0.5 ms per step when packed too, measured in the engine), while on SmolLM2 (30 layers of
110k-885k elements, 540 MB of weights read from memory every step) packing them all took the step from
45 to 29 ms at one row and from 78 to 40 ms at 8 (inference-thread CPU time, same process, alternated).
A layer's plain weight is dropped once packed, so memory stays the same, except when the output layer
shares its weight with the embeddings (the embedding lookup needs the plain rows): that one is kept.
Vision towers are left alone (their code reads their layers' weights).

In the engine (tiny-qwen2.5, inference-thread CPU per decode step, MKL and oneDNN heads alternated in
one process on a shared 2-core host, load 2.5-5): 8 rows 4.9-6.5 -> 3.5-3.8 ms, 16 rows 7.4 -> 4.5
ms; one row 2.11-2.26 -> 2.10-2.41 ms (oneDNN's one-row product is ~0.1 ms slower than MKL's gemv on
a weight that fits in the cache; on SmolLM2's, which does not, it is faster).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


def onednn_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    built: Callable[[], bool] = torch.backends.mkldnn.is_available
    return (
        built()
        and ops is not None
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class PackedLinear(torch.nn.Module):
    """A bias-free or biased fp32 ``nn.Linear`` whose product runs on a oneDNN-packed weight.

    ``weight`` stays reachable (and the plain tensor is kept) only when something else holds it too
    (tied embeddings); otherwise only the packed copy is kept."""

    def __init__(self, linear: torch.nn.Linear, *, keep_weight: bool) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with torch.no_grad():
            weight = linear.weight.detach()
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = linear.bias
        # Tied: the embedding module owns the same Parameter; keep it visible for code that reads it.
        self.weight = linear.weight if keep_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(flat, self._packed, self.bias, "none", [], "")
        return out.view(*shape[:-1], self.out_features)


def _tied(model: Any, head: torch.nn.Linear) -> bool:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight is not None and weight.data_ptr() == head.weight.data_ptr()


# Decoder layers with fewer weights than this keep torch's product (see the module docstring).
MIN_PACKED_WEIGHT = 1 << 16


def pack_model(model: Any, device: torch.device, dtype: torch.dtype) -> int:
    """Swap ``model``'s output layer and its decoder's large linear layers for :class:`PackedLinear`
    when that runs here (CPU, fp32, oneDNN built in). Idempotent; returns the layers packed."""
    if device.type != "cpu" or dtype != torch.float32 or not onednn_available():
        return 0
    count = 0
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is torch.nn.Linear:
        packed = _pack(head, keep_weight=_tied(model, head))
        if packed is not None:
            model.set_output_embeddings(packed)
            count += 1
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if isinstance(decoder, torch.nn.Module):
        for parent in list(decoder.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear and child.weight.numel() >= MIN_PACKED_WEIGHT:
                    layer = _pack(child, keep_weight=False)
                    if layer is not None:
                        setattr(parent, name, layer)
                        count += 1
    return count


def _pack(linear: torch.nn.Linear, *, keep_weight: bool) -> PackedLinear | None:
    if linear.weight.dtype != torch.float32 or linear.weight.device.type != "cpu":
        return None
    try:
        packed = PackedLinear(linear, keep_weight=keep_weight)
        probe = torch.zeros(1, linear.in_features)
        with torch.inference_mode():
            expected = torch.nn.functional.linear(probe, linear.weight, linear.bias)
            if packed(probe).shape != expected.shape:
                return None
    except Exception as exc:  # an unusual oneDNN build: keep torch's own product
        log.info("oneDNN product not used for a %s layer: %s", tuple(linear.weight.shape), exc)
        return None
    return packed
