"""Counting a very long text's tokens in pieces, for engines that refuse a prompt past their context.

A prompt far over the context is refused after tokenizing about a context's worth of it rather than
all of it (a 32 MB prompt would otherwise hold a tokenizer for seconds). The text is cut into pieces
before whitespace, so they tokenize (almost) as the whole does; a few pieces go to the tokenizer per
call, whose Rust side encodes them in parallel. Shared by the local engine (prompt.py) and the openai
engine's counter (counting.py), each with its own tokenizer call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

# Texts longer than this are counted piece by piece first.
PIECE_CHARS = 64 * 1024
PIECES_PER_CALL = 4


def batches(text: str) -> Iterator[list[str]]:
    """``text`` in pieces of at most PIECE_CHARS, cut before a space where there is one in the
    piece's second half, PIECES_PER_CALL pieces at a time."""
    start = 0
    while start < len(text):
        pieces: list[str] = []
        while start < len(text) and len(pieces) < PIECES_PER_CALL:
            end = min(len(text), start + PIECE_CHARS)
            if end < len(text):
                cut = text.rfind(" ", start + PIECE_CHARS // 2, end)
                end = cut if cut > start else end
            pieces.append(text[start:end])
            start = end
        yield pieces


def clearly_over(text: str, limit: int, count: Callable[[list[str]], int]) -> bool:
    """Whether ``text`` holds clearly more than ``limit`` tokens, counted (``count`` of a batch of
    pieces) until that is certain: the margin covers the few tokens a cut inside a word can add."""
    threshold = limit + limit // 50 + 16
    total = 0
    for pieces in batches(text):
        total += count(pieces)
        if total >= threshold:
            return True
    return False
