"""The inference thread: the only thread that touches the model.

Requests arrive through a thread-safe inbox; the thread admits them FIFO up to ``max_batch_size``.
Each step decodes one token per active sequence and, in the same step, advances the prompts being
prefilled by at most ``prefill_chunk`` tokens in total (so a long prompt never stalls the others'
streams for more than one chunk's worth of work). Cancelled sequences are dropped at the next step.
Events go back through each sequence's ``emit`` callback; the engine's callback posts them to
:attr:`Scheduler.deliveries`, which this thread flushes after every step (one wake-up per consumer
event loop and step, not one per token).

Failure rules: an exception while serving one sequence fails that sequence only (EngineFailure, or
EngineOverloaded for out-of-memory); the thread keeps serving the rest. If the loop itself breaks,
every held request fails with EngineUnavailable and the engine reports FAILED.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import sys
import threading
from typing import Any

import torch

from qwen_gateway.engines.local.backends import Backend, PrefillWork, SchedulerKind, make_backend
from qwen_gateway.engines.local.delivery import Deliveries
from qwen_gateway.engines.local.sequence import Sequence
from qwen_gateway.errors import ApiError, EngineFailure, EngineOverloaded, EngineUnavailable

log = logging.getLogger(__name__)

# How much lower the inference thread's CPU priority is than the event loop's (Linux nice steps; the
# torch/OpenMP worker threads it starts inherit it). Measured with benchmarks/bench_overload.py on a
# busy 2-core host: the inference thread and its worker kept both cores runnable, so the event loop
# waited in the run queue for a CPU before it could refuse a surplus request (36-149 ms of its
# 40-refusal burst, against 0.2 ms of its own CPU per refusal); at nice 10 the loop preempts them
# (1-41 ms), and a raw-socket burst's 503 p50 went from 48-85 ms to 12-45 ms (httpx burst 50-71 ->
# 24-40 ms at load 1.8), admitted latency unchanged. Decoding only yields CPU to work that wants it:
# on idle cores the thread runs as fast as before.
INFERENCE_NICE = 10


def is_out_of_memory(exc: BaseException) -> bool:
    oom_types: tuple[type[BaseException], ...] = (MemoryError,)
    torch_oom = getattr(torch, "OutOfMemoryError", None)
    if isinstance(torch_oom, type):
        oom_types += (torch_oom,)
    if isinstance(exc, oom_types):
        return True
    # CPU allocations fail as a plain RuntimeError from c10's DefaultCPUAllocator.
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def lower_priority(steps: int) -> None:
    """Lower the calling thread's CPU priority by ``steps`` nice levels (Linux, where nice is per
    thread; elsewhere nothing: PRIO_PROCESS there names the whole process). Raising nice needs no
    privilege; a failure only leaves the thread at its priority."""
    if sys.platform != "linux" or steps <= 0:
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
    except OSError as exc:
        log.warning("could not lower the inference thread's priority: %s", exc)


class Scheduler:
    def __init__(
        self,
        model: Any,
        *,
        device: torch.device,
        kind: SchedulerKind,
        max_batch_size: int,
        name: str,
        prefill_chunk: int = 512,
        kv_capacity_tokens: int = 0,
        kv_budget_tokens: int | None = None,
    ) -> None:
        self.kind = kind
        self._prefill_chunk = prefill_chunk
        self._model, self._device = model, device
        self._kv = {"capacity_tokens": kv_capacity_tokens, "budget_tokens": kv_budget_tokens}
        self._backend: Backend = make_backend(kind, model, device, **self._kv)  # type: ignore[arg-type]
        self._max_batch = max_batch_size
        # None is a wake-up nudge (a cancellation or a stop request), never a request.
        self._inbox: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._prefilling: list[Sequence] = []  # admitted, prompts not (fully) in the cache yet
        self._lock = threading.Lock()
        self._held = 0  # sequences submitted and not yet released by the thread
        self._closed = False
        self._stopping = threading.Event()
        self.error: BaseException | None = None  # why the loop died, if it did
        # Events for consumers, held during a step and sent after it (see delivery.py).
        self.deliveries = Deliveries()
        self._thread = threading.Thread(target=self._run, name=f"qwen-gateway-infer-{name}", daemon=True)

    # -- any thread ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def held(self) -> int:
        """Requests queued or running in the thread."""
        with self._lock:
            return self._held

    @property
    def running(self) -> int:
        """Sequences in the batch (prefilling or decoding), not those still waiting for a place: what
        /health reports as active (the service counts the queue itself). Read without the thread's
        lists being locked: a snapshot for a gauge, which a sequence moving between the two lists can
        put one off for an instant, so it is bounded by what is held."""
        return min(len(self._active) + len(self._prefilling), self.held)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, seq: Sequence) -> None:
        with self._lock:
            if self._closed:
                raise EngineUnavailable()
            self._held += 1
            seq.on_release = self._count_release
            self._inbox.put(seq)

    def wake(self) -> None:
        self._inbox.put(None)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread (blocking); requests still held fail with EngineUnavailable."""
        self._stopping.set()
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the inference thread --------------------------------------------------------------------------

    def _run(self) -> None:
        lower_priority(INFERENCE_NICE)
        self.deliveries.bind()
        try:
            with torch.inference_mode():
                while not self._stopping.is_set():
                    idle = not self._waiting and not self._active and not self._prefilling
                    self._take_inbox(block=idle)
                    if self._stopping.is_set():
                        break
                    try:
                        self._drop_cancelled()
                        work = self._prefill_work()
                        if self._active or work:
                            self._backend.step(list(self._active), work, self._on_error)
                            self._settle_prefills()
                            self._reap()
                    except Exception as exc:
                        self._recover(exc)
                    # Before the next step, and before blocking on an empty inbox.
                    self.deliveries.flush()
        except BaseException as exc:  # a bug in the loop itself: fail loudly, never hang consumers
            log.exception("the inference thread stopped")
            self.error = exc
        finally:
            self._shutdown()

    def _recover(self, exc: BaseException) -> None:
        """A step failed outside any one request's forward pass (e.g. out of memory while the shared
        batch cache was rebuilt): fail the requests in the batch, start over with an empty backend, and
        keep serving the queue."""
        log.error(
            "an inference step failed; failing the %d running request(s)", len(self._active), exc_info=exc
        )
        casualties = [*self._active, *self._prefilling]
        self._active, self._prefilling = [], []
        self._backend = make_backend(self.kind, self._model, self._device, **self._kv)  # type: ignore[arg-type]
        for seq in casualties:
            self._on_error(seq, exc)
            self._release(seq)

    def _take_inbox(self, *, block: bool) -> None:
        item = self._inbox.get() if block else self._get_nowait()
        while True:
            if item is not None:
                self._waiting.append(item)
            item = self._get_nowait()
            if item is None and self._inbox.empty():
                return

    def _get_nowait(self) -> Sequence | None:
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _drop_cancelled(self) -> None:
        if any(s.cancelled for s in self._waiting):
            for seq in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(seq)
                self._release(seq)
        self._settle_prefills()
        self._reap()

    def _prefill_work(self) -> PrefillWork:
        """This step's prompt chunks: the prefills under way first, then newcomers while the batch
        has room, ``prefill_chunk`` prompt tokens in all."""
        while self._waiting and len(self._active) + len(self._prefilling) < self._max_batch:
            self._prefilling.append(self._waiting.popleft())
        budget = self._prefill_chunk
        work: PrefillWork = []
        for seq in self._prefilling:
            if budget <= 0:
                break
            n = min(len(seq.prompt_ids) - seq.prefilled, budget)
            work.append((seq, n))
            budget -= n
        return work

    def _settle_prefills(self) -> None:
        """Prefills that ended (failed, cancelled, or finished on their first token) leave; completed
        ones join the decoding set."""
        still: list[Sequence] = []
        for seq in self._prefilling:
            if seq.finished or seq.cancelled:
                self._backend.remove([seq])
                self._release(seq)
            elif seq.prefill_done:
                self._active.append(seq)
            else:
                still.append(seq)
        self._prefilling = still

    def _reap(self) -> None:
        done = [s for s in self._active if s.finished or s.cancelled]
        if not done:
            return
        self._backend.remove(done)
        gone = {id(s) for s in done}
        self._active = [s for s in self._active if id(s) not in gone]
        for seq in done:
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        seq.cache = None
        seq.release()

    def _count_release(self) -> None:
        with self._lock:
            self._held -= 1

    def _on_error(self, seq: Sequence, exc: BaseException) -> None:
        if isinstance(exc, ApiError):
            seq.fail(exc)
        elif is_out_of_memory(exc):
            log.warning("request %s ran out of memory: %s", seq.request_id, exc)
            seq.fail(EngineOverloaded())
        else:
            log.error("request %s failed in the inference thread", seq.request_id, exc_info=exc)
            seq.fail(EngineFailure("inference internal error."))

    def _shutdown(self) -> None:
        with self._lock:
            self._closed = True
        leftovers = [*self._active, *self._waiting, *self._prefilling]
        self._prefilling = []
        while True:
            item = self._get_nowait()
            if item is None and self._inbox.empty():
                break
            if item is not None:
                leftovers.append(item)
        self._active, self._waiting = [], collections.deque()
        for seq in leftovers:
            seq.fail(EngineUnavailable())
            self._release(seq)
        try:
            self._backend.remove(leftovers)
        except Exception:  # freeing memory at shutdown must not mask the original problem
            log.exception("freeing KV caches at shutdown failed")
        finally:
            self.deliveries.unbind()
