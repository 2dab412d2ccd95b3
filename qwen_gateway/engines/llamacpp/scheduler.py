"""The llama.cpp engine's inference thread: continuous batching over one llama.cpp context.

Every step builds one ``llama_batch``: the last chosen token of each decoding sequence (one row each,
with its own seq id and position), then prompt chunks of newly admitted sequences in what is left of
the step's token budget; one ``llama_decode`` runs them all, and each row with logits gets its next
token from its own sampler chain. A request joins at the next step and leaves at the end of the step
it finished or was cancelled in: its KV cells are removed (``llama_memory_seq_rm``) and its seq id
goes back to the pool, so a cancelled request frees its slot within one step.

Admission is by KV cells: a sequence starts only when its prompt plus every token it may generate fit
beside what the running ones may still take, so a decode never runs out of cells mid-answer.

Prefix reuse (``prefix_cache``, on by default): a sequence that leaves keeps its KV cells under its
seq id, with the tokens they hold. A new request takes the free seq id whose tokens share the longest
prefix with its prompt, drops the cells past that prefix and prefills only the rest: a repeated system
prompt, or a conversation's earlier turns, are not computed again (llama-server does the same per
slot). Kept cells count against the cache like a running sequence's; they are dropped, oldest first,
when a new request needs the room. Prefill is not cheap on CPU: a 42-token prompt costs about half of
what 42 generated tokens cost on SmolLM2 (docs/llamacpp.md).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

import llama_cpp.llama_cpp as C
import numpy as np

from qwen_gateway.engines.llamacpp.model import ContextShape, GgufModel
from qwen_gateway.engines.llamacpp.sequence import Sequence, sampler_chain
from qwen_gateway.errors import EngineFailure

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self, model: GgufModel, shape: ContextShape, *, name: str, prefix_cache: bool = True
    ) -> None:
        self._model = model
        self._shape = shape
        self._name = name
        self._ctx: Any = None
        self._memory: Any = None
        self._batch: Any = None
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._free_ids = list(range(shape.max_sequences))
        self._prefix_cache = prefix_cache
        # Free seq ids whose KV cells are kept: the tokens those cells hold, oldest kept first.
        self._kept: dict[int, list[int]] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # why the thread stopped, when it broke
        self.steps = 0  # llama_decode calls so far
        # Test and benchmark evidence of batching: the most sequences one decode call carried.
        self.widest_step = 0
        # Prompt tokens not prefilled because a kept prefix already held them (test evidence).
        self.reused_tokens = 0

    # -- the event loop's side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._ctx = self._model.new_context(self._shape)
        self._memory = C.llama_get_memory(self._ctx)
        self._batch = C.llama_batch_init(self._shape.batch_tokens, 0, 1)
        self._thread = threading.Thread(target=self._run, name=f"llamacpp-{self._name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def held(self) -> int:
        """Sequences queued or running."""
        return len(self._waiting) + len(self._running)

    @property
    def running(self) -> int:
        """Sequences decoding or prefilling (not those waiting for a place): what /health reports."""
        return len(self._running)

    def submit(self, seq: Sequence) -> None:
        with self._wake:
            self._waiting.append(seq)
            self._wake.notify()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._thread is None or not self._thread.is_alive():
            self._free()

    def _free(self) -> None:
        if self._batch is not None:
            C.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            C.llama_free(self._ctx)
            self._ctx = None

    # -- the inference thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._has_work():
                        self._wake.wait()
                    if self._stopping:
                        break
                    # Leaving before admitting: a request that arrives right after another one's
                    # answer (its Finished already delivered) finds that one's seq id and kept
                    # prefix free instead of taking another id.
                    self._leave()
                    self._admit()
                self._step()
        except BaseException as exc:  # the thread must never die silently: health reports it
            log.exception("llama.cpp inference thread of %s stopped", self._name)
            self.error = exc
        finally:
            with self._wake:
                doomed = [*self._running, *self._waiting]
                self._running.clear()
                self._waiting.clear()
            failure = (
                EngineFailure("inference internal error.")
                if self.error
                else EngineFailure("The model is shutting down.")
            )
            for seq in doomed:
                self._release(seq)
                seq.fail(failure)

    def _has_work(self) -> bool:
        return (
            bool(self._running)
            or any(not s.cancelled for s in self._waiting)
            or bool(self._waiting and self._free_ids)
        )

    def _admit(self) -> None:
        """Start waiting sequences, oldest first, while a seq id and their KV reservation are free."""
        reserved = sum(s.reservation for s in self._running)
        while self._waiting:
            seq = self._waiting[0]
            if seq.cancelled:
                self._waiting.popleft()
                seq.retired.set()
                continue
            if not self._free_ids:
                return
            seq_id, prefix = self._best_prefix(seq.prompt_ids)
            kept = sum(len(t) for i, t in self._kept.items() if i != seq_id)
            room = self._shape.kv_tokens - reserved - seq.reservation
            if self._running and room < 0:
                return
            for other in [i for i in self._kept if i != seq_id]:  # oldest first
                if kept <= room:
                    break
                kept -= len(self._kept[other])
                self._forget(other)
            self._waiting.popleft()
            self._free_ids.remove(seq_id)
            self._take(seq, seq_id, prefix)
            seq.chain = None if seq.sampling.greedy else sampler_chain(seq.sampling)
            reserved += seq.reservation
            self._running.append(seq)

    def _best_prefix(self, prompt: list[int]) -> tuple[int, int]:
        """The free seq id to start ``prompt`` on and how many of its tokens that id's kept cells
        already hold: the longest kept prefix (at least one token is left to decode, for the logits),
        else an id that keeps nothing, else the oldest kept one."""
        best, best_len = -1, 0
        for seq_id in self._free_ids:
            tokens = self._kept.get(seq_id)
            if tokens is None:
                continue
            n = _common_prefix(tokens, prompt, len(prompt) - 1)
            if n > best_len:
                best, best_len = seq_id, n
        if best >= 0:
            return best, best_len
        empty = [i for i in self._free_ids if i not in self._kept]
        return (empty[-1] if empty else next(iter(self._kept))), 0

    def _take(self, seq: Sequence, seq_id: int, prefix: int) -> None:
        if seq_id in self._kept:
            del self._kept[seq_id]
            # Partial removal can fail (recurrent state can't be cut): then the whole prompt is fed.
            if prefix == 0 or not C.llama_memory_seq_rm(self._memory, seq_id, prefix, -1):
                C.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
                prefix = 0
        seq.seq_id = seq_id
        seq.fed = prefix
        self.reused_tokens += prefix

    def _forget(self, seq_id: int) -> None:
        del self._kept[seq_id]
        C.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def _release(self, seq: Sequence, *, keep: bool = False) -> None:
        if seq.seq_id >= 0:
            if keep and self._prefix_cache and seq.fed > 0:
                # The cells hold the prompt and the generated tokens fed so far (the last one chosen
                # was never fed).
                self._kept[seq.seq_id] = [*seq.prompt_ids, *seq.generated][: seq.fed]
            else:
                C.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
            self._free_ids.append(seq.seq_id)
            seq.seq_id = -1
        if seq.chain is not None:
            C.llama_sampler_free(seq.chain)
            seq.chain = None
        seq.retired.set()

    def _leave(self) -> None:
        """Cancelled and finished sequences leave: their seq ids and KV cells are free again."""
        for seq in [s for s in self._running if s.cancelled or s.finished]:
            self._running.remove(seq)
            self._release(seq, keep=True)

    def _step(self) -> None:
        if not self._running:
            return
        batch = self._batch
        n = 0
        rows: list[tuple[Sequence, int]] = []  # sequences whose logits this step yields, at batch index
        fed: list[tuple[Sequence, int]] = []
        budget = self._shape.batch_tokens
        # Decoding rows first (one token each), so a long prompt never stalls running answers.
        for seq in self._running:
            if seq.pending is not None and n < budget:
                _put(batch, n, seq.pending, seq.fed, seq.seq_id, True)
                rows.append((seq, n))
                fed.append((seq, 1))
                n += 1
        for seq in self._running:
            todo = len(seq.prompt_ids) - seq.fed
            if seq.pending is not None or todo <= 0 or n >= budget:
                continue
            take = min(todo, budget - n)
            for k in range(take):
                last = k == take - 1 and take == todo
                _put(batch, n, seq.prompt_ids[seq.fed + k], seq.fed + k, seq.seq_id, last)
                if last:
                    rows.append((seq, n))
                n += 1
            fed.append((seq, take))
        batch.n_tokens = n
        rc = C.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.steps += 1
        self.widest_step = max(self.widest_step, len(fed))
        for seq, count in fed:
            seq.fed += count
        for seq, index in rows:
            seq.pending = None
            if seq.cancelled:
                continue
            seq.accept(self._choose(seq, index))

    def _choose(self, seq: Sequence, index: int) -> int:
        if seq.thinking is not None:
            forced = seq.thinking.forced(len(seq.generated))
            if forced is not None:
                return forced
        if seq.chain is not None and not seq.penalties.active:
            return int(C.llama_sampler_sample(seq.chain, self._ctx, index))
        row = np.ctypeslib.as_array(C.llama_get_logits_ith(self._ctx, index), shape=(self._model.n_vocab,))
        if seq.penalties.active:
            seq.penalties.apply(row)  # in place: the sampler chain reads the same buffer
        if seq.chain is None:
            # Greedy: numpy's argmax (the first maximum, as llama.cpp's greedy sampler takes) costs
            # 13 us on SmolLM2's 49k ids and 23 us on Qwen's 152k, the greedy sampler 100 and 313 us
            # (it copies the row into a candidate array first): a quarter of a tiny Qwen's step.
            return int(row.argmax())
        return int(C.llama_sampler_sample(seq.chain, self._ctx, index))


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y or n >= limit:
            break
        n += 1
    return n


def _put(batch: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq_id
    batch.logits[i] = logits
