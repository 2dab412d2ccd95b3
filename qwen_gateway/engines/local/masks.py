"""Per-request token masks, applied to the whole batch as one ``[rows, vocab]`` bitmask.

A :class:`TokenMask` looks at a request's generated ids and says which ids may come next (or that
any may). The backend asks every row's masks before sampling, builds one boolean bitmask for the rows
that are restricted and hands it to the batched sampler. This is the seam output constraints (JSON
schema, regex, a named tool) plug into; today it forces the end of a reasoning block when a thinking
budget runs out.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from qwen_gateway.engines.local.sequence import Sequence


class TokenMask(Protocol):
    def allowed(self, generated: SequenceABC[int]) -> torch.Tensor | None:
        """The ids allowed next (a 1-D integer tensor) or a ``[vocab]`` bool row; None: no limit."""


class ForcedTokens:
    """Allows exactly ``ids[k]`` as the k-th token from the moment it is created, then anything."""

    def __init__(self, ids: SequenceABC[int], start: int = 0) -> None:
        self.ids = list(ids)
        self.start = start

    def allowed(self, generated: SequenceABC[int]) -> torch.Tensor | None:
        k = len(generated) - self.start
        if 0 <= k < len(self.ids):
            return torch.tensor([self.ids[k]], dtype=torch.long)
        return None


class ThinkingBudget:
    """A reasoning block and its budget: once ``budget`` tokens were generated without the closing
    ``end_ids`` (``</think>``: one special token in Qwen3's vocabulary, several plain ones in a
    vocabulary without it), the next tokens are forced to ``close_ids`` (``"\\n</think>\\n\\n"``) and
    the model then answers freely.

    It also tells where the block ended (:attr:`answer_start`) and how many tokens it spent
    (:meth:`reasoning_tokens`): the sequence caps the answer alone with ``max_tokens``. The sequence
    calls :meth:`observe` after every accepted token; the bitmask asks :meth:`allowed` before each.
    """

    def __init__(self, budget: int, end_ids: SequenceABC[int], close_ids: SequenceABC[int]) -> None:
        self.budget = budget
        self.end_ids = tuple(end_ids)
        self.close_ids = list(close_ids)
        self.answer_start: int | None = None  # index of the first answer token, once closed
        self._reasoning: int | None = None
        self._forcing: ForcedTokens | None = None
        self._forced_at: int | None = None

    def observe(self, generated: SequenceABC[int]) -> None:
        if self.answer_start is not None:
            return
        n = len(self.end_ids)
        if n and len(generated) >= n and tuple(generated[-n:]) == self.end_ids:
            self.answer_start = len(generated)
            # A forced close counts from where the forcing began: its newline is not reasoning.
            self._reasoning = self._forced_at if self._forced_at is not None else len(generated) - n

    def reasoning_tokens(self, generated: int) -> int:
        """Tokens spent reasoning once ``generated`` tokens exist."""
        return self._reasoning if self._reasoning is not None else generated

    def allowed(self, generated: SequenceABC[int]) -> torch.Tensor | None:
        if self._forcing is not None:
            ids = self._forcing.allowed(generated)
            if ids is not None:
                return ids
        if self.answer_start is not None or self._forcing is not None:
            return None
        if len(generated) < self.budget:
            return None
        self._forced_at = len(generated)
        self._forcing = ForcedTokens(self.close_ids, start=len(generated))
        return self._forcing.allowed(generated)


def batch_bitmask(seqs: SequenceABC[Sequence], vocab: int) -> torch.Tensor | None:
    """One ``[rows, vocab]`` bool mask for the step, or None when no row is restricted."""
    mask: torch.Tensor | None = None
    for i, seq in enumerate(seqs):
        for source in seq.masks:
            allowed = source.allowed(seq.generated)
            if allowed is None:
                continue
            if mask is None:
                mask = torch.ones(len(seqs), vocab, dtype=torch.bool)
            if allowed.dtype == torch.bool:
                row = allowed[:vocab]
            else:
                row = torch.zeros(vocab, dtype=torch.bool)
                row[allowed[allowed < vocab]] = True
            mask[i] &= row
    return mask
