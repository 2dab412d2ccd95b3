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

from qwen_gateway.engines import rules

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


class ThinkingBudget(rules.ThinkingBudget):
    """The thinking-budget rule (engines/rules.py) as a token mask: a forced id is the only one allowed."""

    def allowed(self, generated: SequenceABC[int]) -> torch.Tensor | None:
        forced = self.forced(len(generated))
        return None if forced is None else torch.tensor([forced], dtype=torch.long)


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
