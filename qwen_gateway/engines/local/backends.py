"""The two ways the inference thread runs one step over the active sequences.

``batched`` (the default): every row lives in one block-based KV pool (:mod:`kvcache`), and a step is
one forward pass over every decoding row's next token plus the prompt chunks being prefilled, packed
as one flat sequence; rows join and leave without touching the others' caches, and a long prompt's
chunk rides along with the others' decode tokens instead of stalling them.

``interleaved``: each sequence keeps its own transformers ``DynamicCache`` and gets its own forward
pass. It stays for architectures whose caches are not plain key/value tensors (sliding windows,
recurrent state), which the shared pool cannot hold.

Both choose the step's tokens with one :class:`BatchSampler` call over ``[rows, vocab]`` logits and
the batch bitmask of the rows' token masks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from qwen_gateway.engines.local import kvcache
from qwen_gateway.engines.local.constraints import grammar_bitmask
from qwen_gateway.engines.local.masks import batch_bitmask
from qwen_gateway.engines.local.sampling import BatchSampler
from qwen_gateway.engines.local.sequence import RawLogprob, Sequence
from qwen_gateway.errors import EngineOverloaded

log = logging.getLogger(__name__)

SchedulerKind = Literal["batched", "interleaved"]
# Called when a sequence's step raised: the scheduler turns the exception into that request's error.
OnError = Callable[[Sequence, BaseException], None]
# (sequence, prompt tokens to prefill this step)
PrefillWork = list[tuple[Sequence, int]]


class Backend(Protocol):
    def step(self, decoding: list[Sequence], prefill: PrefillWork, on_error: OnError) -> None:
        """Decode one token for every sequence in ``decoding`` and advance each prefill by its
        count; a prefill that completes chooses its first token."""

    def remove(self, seqs: list[Sequence]) -> None:
        """Forget finished, failed or cancelled sequences and free their cache."""


def supports_batching(model: Any) -> bool:
    """The shared pool holds plain key/value tensors; caches with sliding windows or recurrent state
    (hybrid architectures) keep per-layer state it cannot."""
    try:
        probe = DynamicCache(config=_text_config(model.config))
    except Exception:  # a config this transformers can't build a cache from: stay on the safe path
        return False
    return all(type(layer) is DynamicLayer for layer in probe.layers)


def uses_mrope(model: Any) -> bool:
    """Qwen2-VL / 2.5-VL / 3-VL rotate with 3-D (temporal, height, width) positions."""
    config = _text_config(model.config)
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        if isinstance(params, dict) and "mrope_section" in params:
            return True
    return False


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


class _VisionConflict(Exception):
    """A step's pad tokens don't match its vision features (a decoding row sampled a pad id): the
    step is redone row by row."""


class _Base:
    def __init__(self, model: Any, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.mrope = uses_mrope(model)
        self.sampler = BatchSampler()

    def _part_positions(self, seq: Sequence, start: int, n: int) -> torch.Tensor:
        """Positions of ``n`` tokens of ``seq`` from cache position ``start``: ``[3, n]`` for M-RoPE
        models (a VL prompt's own 3-D positions while its prompt is prefilled; text tokens have equal
        temporal/height/width positions, offset by the row's rope delta), else ``[n]``."""
        vision = seq.vision
        if vision is not None and start < len(seq.prompt_ids):
            rows: torch.Tensor = vision.positions[:, start : start + n]
            return rows
        flat = torch.arange(start + seq.rope_delta, start + n + seq.rope_delta, dtype=torch.long)
        return flat.unsqueeze(0).expand(3, -1) if self.mrope else flat

    def _vision_inputs(self, parts: list[tuple[Sequence, int]], ids: list[int]) -> dict[str, Any]:
        """``mm_encoder_outputs`` for this step: each prefill chunk's share of its row's vision
        features, in the step's token order (the model scatters them into its pad tokens in order)."""
        shares: dict[str, list[tuple[Any, int, int]]] = {}
        for seq, n in parts:
            row = seq.vision
            if row is None or seq.prefill_done:
                continue
            start = seq.prefilled
            for kind, token_id in (("image", row.image_token_id), ("video", row.video_token_id)):
                if token_id is None:
                    continue
                chunk = seq.prompt_ids[start : start + n]
                count = chunk.count(token_id)
                if count:
                    before = seq.prompt_ids[:start].count(token_id)
                    shares.setdefault(kind, []).append((self._features(row, kind), before, count))
        if not shares:
            return {}
        outputs: dict[str, Any] = {}
        for kind, pieces in shares.items():
            token_id = pieces[0][0]["token_id"]
            if ids.count(token_id) != sum(count for _, _, count in pieces):
                raise _VisionConflict()
            pooled = torch.cat([f["pooled"][b : b + c] for f, b, c in pieces])
            fields: dict[str, Any] = {"pooler_output": (pooled,)}
            if pieces[0][0]["deepstack"] is not None:
                layers = len(pieces[0][0]["deepstack"])
                fields["deepstack_features"] = [
                    (torch.cat([f["deepstack"][i][b : b + c] for f, b, c in pieces]),) for i in range(layers)
                ]
            outputs[kind] = pieces[0][0]["cls"](**fields)
        return {"mm_encoder_outputs": outputs}

    def _features(self, row: Any, kind: str) -> dict[str, Any]:
        """The vision tower's output for a row's images or videos, computed once (at its first chunk
        holding pads) and kept until the row's prompt is in the cache."""
        cached = row.features.get(kind)
        if cached is not None:
            return dict(cached)
        inner = self.model.model
        dtype = inner.visual.dtype
        if kind == "image":
            out = inner.get_image_features(
                row.pixel_values.to(self.device, dtype), row.image_grid_thw.to(self.device), return_dict=True
            )
            token_id = row.image_token_id
        else:
            out = inner.get_video_features(
                row.pixel_values_videos.to(self.device, dtype),
                row.video_grid_thw.to(self.device),
                return_dict=True,
            )
            token_id = row.video_token_id
        deep = getattr(out, "deepstack_features", None)
        features = {
            "cls": type(out),
            "token_id": token_id,
            "pooled": torch.cat(list(out.pooler_output)),
            "deepstack": None if deep is None else [torch.cat(list(layer)) for layer in deep],
        }
        row.features[kind] = features
        return dict(features)

    def choose(self, seqs: list[Sequence], logits: torch.Tensor, on_error: OnError) -> None:
        """Pick and accept one token per row of ``logits`` ([rows, vocab])."""
        try:
            # Raw-model logprobs are read before the sampler writes penalties and masks into logits.
            wanted = [i for i, s in enumerate(seqs) if s.logprobs is not None]
            logprobs = torch.log_softmax(logits[wanted].float(), dim=-1) if wanted else None
            # The step's logits are ours alone: penalties and the bitmask go straight into them.
            tokens = self.sampler.sample(
                [s.sampler for s in seqs],
                logits,
                batch_bitmask(seqs, logits.shape[-1]),
                owned=True,
                packed=grammar_bitmask(seqs, logits.shape[-1]),
            )
            picked = _picked_logprobs(seqs, wanted, logprobs, tokens) if logprobs is not None else {}
        except Exception:
            if len(seqs) == 1:
                on_error(seqs[0], _current_exception())
                return
            for i, seq in enumerate(seqs):  # find the row at fault
                self.choose([seq], logits[i : i + 1], on_error)
            return
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            try:
                seq.accept(token, picked.get(i))
            except Exception as exc:
                on_error(seq, exc)


def _picked_logprobs(
    seqs: list[Sequence], wanted: list[int], logprobs: torch.Tensor, tokens: list[int]
) -> dict[int, RawLogprob]:
    """Row -> (its sampled token's logprob, its top alternatives), in one gather and one top-k."""
    index = torch.tensor([tokens[i] for i in wanted], dtype=torch.long).unsqueeze(1)
    chosen = logprobs.gather(1, index).squeeze(1).tolist()
    k = max(seqs[i].logprobs or 0 for i in wanted)
    top_vals: list[list[float]] = [[] for _ in wanted]
    top_ids: list[list[int]] = [[] for _ in wanted]
    if k > 0:
        values, ids = torch.topk(logprobs, k, dim=-1)
        top_vals, top_ids = values.tolist(), ids.tolist()
    out: dict[int, RawLogprob] = {}
    for j, i in enumerate(wanted):
        n = seqs[i].logprobs or 0
        out[i] = (float(chosen[j]), tuple(zip(top_ids[j][:n], top_vals[j][:n], strict=True)))
    return out


def _current_exception() -> BaseException:
    import sys

    exc = sys.exc_info()[1]
    assert exc is not None
    return exc


class InterleavedBackend(_Base):
    def remove(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.cache = None

    def step(self, decoding: list[Sequence], prefill: PrefillWork, on_error: OnError) -> None:
        for seq, n in prefill:
            try:
                self._prefill(seq, n, on_error)
            except Exception as exc:
                on_error(seq, exc)
        for seq in decoding:
            if seq.cancelled or seq.finished:
                continue  # cancelled mid-round: skip its forward, the scheduler drops it next
            try:
                ids = torch.tensor([[seq.last_token]], dtype=torch.long, device=self.device)
                pos = self._part_positions(seq, seq.length - 1, 1).to(self.device)
                out = self.model(
                    input_ids=ids, position_ids=pos.unsqueeze(-2), cache=seq.cache, use_cache=True
                )
            except Exception as exc:
                on_error(seq, exc)
                continue
            self.choose([seq], out.logits[:, -1], on_error)

    def _prefill(self, seq: Sequence, n: int, on_error: OnError) -> None:
        if seq.cache is None:
            seq.cache = DynamicCache(config=_text_config(self.model.config))
        start, end = seq.prefilled, seq.prefilled + n
        chunk = seq.prompt_ids[start:end]
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        pos = self._part_positions(seq, start, n).to(self.device)
        # logits_to_keep=1: only the last position's logits are needed, and over a 150k vocabulary the
        # full [prompt, vocab] matrix would cost more than the transformer layers on short prompts.
        out = self.model(
            input_ids=ids,
            position_ids=pos.unsqueeze(-2),
            cache=seq.cache,
            use_cache=True,
            logits_to_keep=1,
            **self._vision_inputs([(seq, n)], chunk),
        )
        seq.prefilled = end
        if seq.prefill_done:
            if seq.vision is not None:
                release_pixels(seq)
            self.choose([seq], out.logits[:, -1], on_error)


class BatchedBackend(_Base):
    """Every row in one :class:`kvcache.BlockPool`; one forward pass per step."""

    def __init__(
        self, model: Any, device: torch.device, capacity_tokens: int, budget_tokens: int | None
    ) -> None:
        super().__init__(model, device)
        self.pool = kvcache.BlockPool(capacity_tokens, budget_tokens)
        self.rows: list[Sequence] = []  # sequences holding blocks
        model.set_attn_implementation(kvcache.ATTENTION)

    def remove(self, seqs: list[Sequence]) -> None:
        gone = {id(s) for s in seqs}
        for seq in seqs:
            if seq.kv is not None:
                self.pool.release(seq.kv)
                seq.kv = None
        self.rows = [r for r in self.rows if id(r) not in gone]

    def kv_bytes(self) -> int:
        """Bytes of the pool that hold (or held, at the peak) tokens: its resident size."""
        return self.pool.peak_in_use * self.pool.bytes_per_block()

    def tokens_held(self) -> int:
        return sum(s.kv.length for s in self.rows if s.kv is not None)

    def step(self, decoding: list[Sequence], prefill: PrefillWork, on_error: OnError) -> None:
        parts: list[tuple[Sequence, int]] = []
        for seq, n in [*((s, 1) for s in decoding if not (s.cancelled or s.finished)), *prefill]:
            if seq.kv is None:
                seq.kv = kvcache.RowKV()
                self.rows.append(seq)
            try:
                self.pool.grow(seq.kv, n)
            except kvcache.PoolExhausted:
                log.warning("request %s: no KV-cache block free within the memory budget", seq.request_id)
                on_error(seq, EngineOverloaded())
                continue
            parts.append((seq, n))
        if not parts:
            return
        try:
            logits, needing = self._forward(parts)
        except Exception:
            if len(parts) == 1:
                on_error(parts[0][0], _current_exception())
                return
            # One bad row must not sink the others: step each alone (rewriting the same slots).
            for part in parts:
                try:
                    logits, needing = self._forward([part])
                except Exception as exc:
                    on_error(part[0], exc)
                    continue
                self._commit([part])
                if needing:
                    self.choose(needing, logits, on_error)
            return
        self._commit(parts)
        if needing:
            self.choose(needing, logits, on_error)

    def _forward(self, parts: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """One forward pass; the logits of the rows that need a token now, and those rows."""
        ids: list[int] = []
        keep: list[int] = []
        needing: list[Sequence] = []
        # A VL prompt being prefilled brings its own 3-D positions; every other row's positions are
        # consecutive integers, collected as one list and made one tensor (not a tensor per row).
        with_media = any(s.vision is not None and s.kv.length < len(s.prompt_ids) for s, _ in parts)
        positions: list[torch.Tensor] = []
        flat: list[int] = []
        for seq, n in parts:
            kv = seq.kv
            if seq.prefill_done:
                ids.append(seq.last_token)
            else:
                ids.extend(seq.prompt_ids[seq.prefilled : seq.prefilled + n])
            if with_media:
                positions.append(self._part_positions(seq, kv.length, n))
            else:
                start = kv.length + seq.rope_delta
                flat.extend(range(start, start + n))
            if seq.prefill_done or seq.prefilled + n >= len(seq.prompt_ids):
                keep.append(len(ids) - 1)
                needing.append(seq)
        cache = kvcache.PagedCache(self.pool, kvcache.plan_step([(s.kv, n) for s, n in parts]))
        decode_only = len(ids) == len(parts)
        shape = (len(ids), 1) if decode_only else (1, len(ids))
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device).view(shape)
        # [tokens] or [3, tokens] -> [batch, tokens] or [3, batch, tokens]
        if with_media:
            pos = torch.cat(positions, dim=-1).to(self.device)
        else:
            pos = torch.tensor(flat, dtype=torch.long)
            pos = (pos.unsqueeze(0).expand(3, -1) if self.mrope else pos).to(self.device)
        pos = pos.view(*pos.shape[:-1], *shape)
        kwargs: dict[str, Any] = {kvcache.PLAN_KWARG: cache, **self._vision_inputs(parts, ids)}
        out = self.model(
            input_ids=input_ids,
            position_ids=pos,
            cache=cache,
            use_cache=True,
            logits_to_keep=1 if decode_only else torch.tensor(keep, dtype=torch.long, device=self.device),
            **kwargs,
        )
        logits = out.logits[:, -1] if decode_only else out.logits[0]
        return logits, needing

    def _commit(self, parts: list[tuple[Sequence, int]]) -> None:
        for seq, n in parts:
            seq.kv.length += n
            if not seq.prefill_done:
                seq.prefilled += n
                if seq.prefill_done and seq.vision is not None:
                    release_pixels(seq)


def release_pixels(seq: Sequence) -> None:
    """A VL row whose prompt is in the cache needs only its rope delta: drop pixels and features."""
    row = seq.vision
    row.features.clear()
    row.pixel_values = row.pixel_values_videos = None


def make_backend(
    kind: SchedulerKind,
    model: Any,
    device: torch.device,
    *,
    capacity_tokens: int = 0,
    budget_tokens: int | None = None,
) -> Backend:
    if kind == "batched":
        return BatchedBackend(model, device, capacity_tokens, budget_tokens)
    return InterleavedBackend(model, device)
