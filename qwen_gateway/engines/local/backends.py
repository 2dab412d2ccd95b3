"""The two ways the inference thread runs one decode step over the active sequences.

``interleaved``: each sequence keeps its own KV cache and gets its own one-token forward pass.
``batched``: every active sequence is a row of one shared KV cache, left-padded to a common width,
and one forward pass decodes a token for all of them. On CPU a decode step is bound by reading the
weights, so a batch of four costs little more than a single row (see benchmarks/bench_engine_direct.py).

Both prefill a new sequence alone (its prompt length differs from everyone else's), in chunks of at
most ``budget`` prompt tokens, and only then add it to the decode set: a newcomer waits for at most one
step, never for others to finish, and a long prompt delays the others' next token by one chunk at a
time instead of by its whole prefill.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from qwen_gateway.engines.local.sequence import Sequence

SchedulerKind = Literal["batched", "interleaved"]
# Called when a sequence's step raised: the scheduler turns the exception into that request's error.
OnError = Callable[[Sequence, BaseException], None]


class Backend(Protocol):
    def prefill(self, seq: Sequence, budget: int) -> None:
        """Run up to ``budget`` more prompt tokens. When the prompt is done, choose the first token and
        (unless that ended the sequence) join the decode set."""

    def remove(self, seqs: list[Sequence]) -> None:
        """Forget finished, failed or cancelled sequences and free their cache."""

    def step(self, seqs: list[Sequence], on_error: OnError) -> None:
        """Decode one token for every sequence in ``seqs`` (the scheduler's active set)."""


def supports_batching(model: Any) -> bool:
    """Batched decoding pads plain key/value tensors; caches with sliding windows or recurrent state
    (hybrid architectures) keep per-layer state that left padding would corrupt."""
    try:
        probe = DynamicCache(config=model.config)
    except Exception:  # a config this transformers can't build a cache from: stay on the safe path
        return False
    return all(type(layer) is DynamicLayer for layer in probe.layers)


class _Base:
    def __init__(self, model: Any, device: torch.device) -> None:
        self.model = model
        self.device = device

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def _prefill_chunk(self, seq: Sequence, budget: int) -> DynamicCache | None:
        """Advance ``seq``'s prompt by up to ``budget`` tokens in ``seq.cache``; return the cache once
        the whole prompt is in it (the first token then chosen), else None."""
        if seq.cache is None:
            seq.cache = self._new_cache()
        start = seq.prefilled
        end = min(len(seq.prompt_ids), start + max(1, budget))
        ids = torch.tensor([seq.prompt_ids[start:end]], dtype=torch.long, device=self.device)
        # logits_to_keep=1: only the last position's logits are needed, and over a 150k vocabulary the
        # full [prompt, vocab] matrix would cost more than the transformer layers on short prompts.
        out = self.model(input_ids=ids, past_key_values=seq.cache, use_cache=True, logits_to_keep=1)
        seq.prefilled = end
        if not seq.prefill_done:
            return None
        cache, seq.cache = seq.cache, None
        seq.accept(seq.choose(out.logits[0, -1]))
        return cache  # type: ignore[no-any-return]

    def _step_alone(self, seq: Sequence) -> None:
        ids = torch.tensor([[seq.last_token]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=seq.cache, use_cache=True)
        seq.accept(seq.choose(out.logits[0, -1]))


class InterleavedBackend(_Base):
    def prefill(self, seq: Sequence, budget: int) -> None:
        cache = self._prefill_chunk(seq, budget)
        if cache is not None and not seq.finished:
            seq.cache = cache

    def remove(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.cache = None

    def step(self, seqs: list[Sequence], on_error: OnError) -> None:
        for seq in seqs:
            if seq.cancelled or seq.finished:
                continue  # cancelled mid-round: skip its forward, the scheduler drops it next
            try:
                self._step_alone(seq)
            except Exception as exc:
                on_error(seq, exc)


class BatchedBackend(_Base):
    """Rows of one DynamicCache. Row ``i`` holds ``pads[i]`` padding columns on the left, then its
    tokens; every row ends at column ``width``. The cache object persists across steps and is only
    rebuilt when a row joins or leaves."""

    def __init__(self, model: Any, device: torch.device) -> None:
        super().__init__(model, device)
        self.rows: list[Sequence] = []
        self.pads: list[int] = []
        self.width = 0
        self.cache: DynamicCache | None = None

    # -- membership ------------------------------------------------------------------------------------

    def prefill(self, seq: Sequence, budget: int) -> None:
        cache = self._prefill_chunk(seq, budget)
        if cache is not None and not seq.finished:
            self._join(seq, cache)

    def _join(self, seq: Sequence, own: DynamicCache) -> None:
        new = _layers(own)
        length = new[0][0].shape[-2]
        if self.cache is None:
            self.rows, self.pads, self.width = [seq], [0], length
            self.cache = own
            return
        width = max(self.width, length)
        grow, pad_new = width - self.width, width - length
        merged = []
        for (k, v), (nk, nv) in zip(_layers(self.cache), new, strict=True):
            merged.append(
                (
                    torch.cat([_left_pad(k, grow), _left_pad(nk, pad_new)]),
                    torch.cat([_left_pad(v, grow), _left_pad(nv, pad_new)]),
                )
            )
        self.cache = _cache_from(merged)
        self.rows.append(seq)
        self.pads = [p + grow for p in self.pads] + [pad_new]
        self.width = width

    def remove(self, seqs: list[Sequence]) -> None:
        gone = {id(s) for s in seqs}
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep or self.cache is None:
            self._clear()
            return
        # Columns that are padding in every remaining row go too, so padding never accumulates.
        trim = min(self.pads[i] for i in keep)
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache = _cache_from(
            [
                (k.index_select(0, index)[:, :, trim:], v.index_select(0, index)[:, :, trim:])
                for k, v in _layers(self.cache)
            ]
        )
        self.rows = [self.rows[i] for i in keep]
        self.pads = [self.pads[i] - trim for i in keep]
        self.width -= trim

    def _clear(self) -> None:
        self.rows, self.pads, self.width, self.cache = [], [], 0, None

    # -- decoding --------------------------------------------------------------------------------------

    def step(self, seqs: list[Sequence], on_error: OnError) -> None:
        if self.cache is None or not self.rows:
            return
        rows = list(self.rows)
        ids = torch.tensor([[s.last_token] for s in rows], dtype=torch.long, device=self.device)
        pads = torch.tensor(self.pads, dtype=torch.long, device=self.device)
        # Each row's new token sits at its own position (its true length), whatever its padding.
        positions = (self.width - pads).unsqueeze(1)
        columns = torch.arange(self.width + 1, device=self.device)
        mask = (columns.unsqueeze(0) >= pads.unsqueeze(1)).long()
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            )
        except Exception:
            # One bad row must not sink the others: find it by stepping each row alone.
            self._isolate(on_error)
            return
        self.width += 1
        logits = out.logits[:, -1, :]
        for i, seq in enumerate(rows):
            try:
                seq.accept(seq.choose(logits[i]))
            except Exception as exc:
                on_error(seq, exc)

    def _isolate(self, on_error: OnError) -> None:
        """Split the batch into per-row caches, step every row alone, and rebuild the batch from the
        rows that survived."""
        assert self.cache is not None
        # The failed pass may have appended this step's column to some layers: cut back to ``width``.
        layers = [(k[:, :, : self.width], v[:, :, : self.width]) for k, v in _layers(self.cache)]
        rows, pads = self.rows, self.pads
        self._clear()
        for i, seq in enumerate(rows):
            if seq.cancelled:
                continue  # the scheduler drops it after this step; don't spend a forward on it
            seq.cache = _cache_from(
                [(k[i : i + 1, :, pads[i] :], v[i : i + 1, :, pads[i] :]) for k, v in layers]
            )
            try:
                self._step_alone(seq)
            except Exception as exc:
                on_error(seq, exc)
        for seq in rows:
            own, seq.cache = seq.cache, None
            if not seq.finished and own is not None:
                self._join(seq, own)


def make_backend(kind: SchedulerKind, model: Any, device: torch.device) -> Backend:
    if kind == "batched":
        return BatchedBackend(model, device)
    return InterleavedBackend(model, device)


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers: list[Any] = list(cache.layers)
    return [(layer.keys, layer.values) for layer in layers]


def _cache_from(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    return DynamicCache(ddp_cache_data=layers)


def _left_pad(t: torch.Tensor, columns: int) -> torch.Tensor:
    if columns == 0:
        return t
    return torch.nn.functional.pad(t, (0, 0, columns, 0))
