"""Token ids -> streamed text: an incremental detokenizer and the stop matchers that hold text back.

Byte-level BPE (Qwen, SmolLM2) splits one CJK character or emoji across several tokens, so decoding
one token at a time yields U+FFFD halves. The detokenizer keeps two offsets into the token list, as
vLLM's does: text is released only once the newest tokens decode to complete characters, and each
step decodes a short window instead of the whole answer again.

Pure Python: nothing here imports torch, so these pieces are testable on their own.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from qwen_gateway.engines.base import TokenLogprob, TopLogprob

# Prompt tokens kept as left context: SentencePiece-style tokenizers drop a leading space when a
# window starts on a word-initial token, so every window starts a few tokens earlier.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """The slice of a Hugging Face tokenizer that decoding needs."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Feeds generated ids one at a time; returns only text that can no longer change.

    Invariant: the concatenation of everything returned by :meth:`push` and :meth:`flush` equals the
    text of all pushed ids decoded together (after the prompt context).
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        # [prefix, read) is the window already released as text; [read, end) is not released yet.
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._prefix, self._read)

    def _decode(self, start: int, end: int | None = None) -> str:
        # Special tokens that are not EOS (<think>, <tool_call>) are part of the answer text; the
        # service layer parses them.
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._prefix)
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
            return ""  # an incomplete character: wait for its remaining bytes
        delta = text[len(self._prefix_text) :]
        self._prefix = self._read
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._prefix, self._read)
        return delta

    def flush(self) -> str:
        """Everything not yet released, incomplete characters included (the answer has ended)."""
        text = self._decode(self._prefix)
        delta = text[len(self._prefix_text) :] if len(text) > len(self._prefix_text) else ""
        self._prefix = self._read
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._prefix, self._read)
        return delta


class StopStrings:
    """Cuts the text stream at the first stop string; holds back any tail that could begin one.

    Only the held-back tail can be part of a future match: everything released earlier was checked to
    start no stop string, so a search never needs to look further back than the held text.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text that is safe to release now; sets :attr:`stopped` when a stop string was found."""
        if not self._stops:
            return text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return buf[:cut]
        hold = self._partial_suffix(buf)
        self._held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest tail of ``buf`` that is a proper prefix of a stop string."""
        longest = max(len(s) for s in self._stops) - 1
        for size in range(min(longest, len(buf)), 0, -1):
            tail = buf[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0


class StopTokenSequences:
    """The token-id twin of :class:`StopStrings`: ids are held back while they could begin a stop
    sequence, so a stop sequence's own text is never released."""

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        self._seqs = tuple(tuple(s) for s in sequences if s)
        self._longest = max((len(s) for s in self._seqs), default=0)
        self._held: list[int] = []
        self.stopped = False

    def push(self, token_id: int) -> list[int]:
        """Ids safe to release to the detokenizer; sets :attr:`stopped` when a sequence completed."""
        if not self._seqs:
            return [token_id]
        held = [*self._held, token_id]
        for seq in self._seqs:
            if len(seq) <= len(held) and tuple(held[-len(seq) :]) == seq:
                self._held = []
                self.stopped = True
                return held[: len(held) - len(seq)]
        hold = 0
        for size in range(min(self._longest - 1, len(held)), 0, -1):
            tail = tuple(held[-size:])
            if any(seq[:size] == tail for seq in self._seqs):
                hold = size
                break
        self._held = held[len(held) - hold :]
        return held[: len(held) - hold]

    def flush(self) -> list[int]:
        held, self._held = self._held, []
        return held


class TextStream:
    """The consumer's side of a sequence: released ids in, answer text out, cut at a stop string.

    ``specials`` (id -> text) are the tokenizer's special tokens: after each :meth:`push` /
    :meth:`flush`, :attr:`last_specials` says where in the returned text each one generated lies, as
    (offset, id). A special token decodes to its whole text at once, so its place is exact; stop strings
    only ever cut the text, so offsets in the detokenized text are offsets in the released text."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_ids: Sequence[int],
        stop: Sequence[str],
        specials: Mapping[int, str] | None = None,
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopStrings(stop)
        self._specials = specials or {}
        self._decoded = 0  # characters the detokenizer produced so far
        self._released = 0  # characters released (a prefix of those)
        self._marks: list[tuple[int, int]] = []  # (absolute offset, id) not released yet
        self.last_specials: tuple[tuple[int, int], ...] = ()

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def push(self, ids: Sequence[int]) -> str:
        """Text now safe to release; check :attr:`stopped` afterwards."""
        text = ""
        for token_id in ids:
            piece = self._detok.push(token_id)
            special = self._specials.get(token_id)
            if special and piece.endswith(special):
                self._marks.append((self._decoded + len(text) + len(piece) - len(special), token_id))
            text += piece
        self._decoded += len(text)
        return self._release(self._stops.push(text) if text else "")

    def flush(self) -> str:
        """Everything still held back, at the end of the answer (held text could still hide a stop
        string, which then cuts it)."""
        tail = self._detok.flush()
        self._decoded += len(tail)
        text = self._stops.push(tail)
        if not self._stops.stopped:
            text += self._stops.flush()
        return self._release(text)

    def _release(self, text: str) -> str:
        start, end = self._released, self._released + len(text)
        self.last_specials = tuple((at - start, tid) for at, tid in self._marks if start <= at < end)
        self._marks = [(at, tid) for at, tid in self._marks if at >= end]
        self._released = end
        return text


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-in character -> the byte it stands for."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_DECODER = _byte_decoder()


class TokenText:
    """Token id -> (its text, its own bytes) for logprobs, cached per id.

    Byte-level BPE (Qwen) spells a token's bytes with stand-in characters: those map back to the exact
    bytes, so a CJK character split over two tokens shows as two partial byte runs that join up, as
    OpenAI's ``bytes`` field intends. Other vocabularies fall back to decoding the single token."""

    def __init__(self, tokenizer: Any, lock: threading.Lock) -> None:
        self._tokenizer = tokenizer
        self._lock = lock
        self._cache: dict[int, tuple[str, tuple[int, ...]]] = {}

    def get(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        with self._lock:
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            if not isinstance(piece, str) or any(c not in _BYTE_DECODER for c in piece):
                raw = str(self._tokenizer.decode([token_id], skip_special_tokens=False)).encode()
            else:
                raw = bytes(_BYTE_DECODER[c] for c in piece)
        entry = (raw.decode("utf-8", errors="replace"), tuple(raw))
        if len(self._cache) < _TOKEN_TEXT_CACHE:
            self._cache[token_id] = entry
        return entry

    def logprobs(
        self, ids: Sequence[int], raw: Sequence[tuple[float, Sequence[tuple[int, float]]]]
    ) -> list[TokenLogprob]:
        out = []
        for token_id, (logprob, top) in zip(ids, raw, strict=False):
            text, data = self.get(token_id)
            rivals = []
            for rival, value in top:
                rival_text, rival_data = self.get(rival)
                rivals.append(TopLogprob(rival_text, value, rival_data))
            out.append(TokenLogprob(text, logprob, data, tuple(rivals)))
        return out


# Bounded by the vocabulary anyway; the bound keeps a pathological tokenizer from growing it further.
_TOKEN_TEXT_CACHE = 1 << 18


def marked(text: TextStream, piece: str, specials: list[tuple[int, int]], offset: int) -> str:
    """``piece`` (just returned by ``text``), its special tokens added to ``specials`` at ``offset``."""
    specials.extend((offset + at, tid) for at, tid in text.last_specials)
    return piece
