"""The Batch API: batches kept in SQL, run by a background worker inside the server.

A batch's life: ``create`` checks the request and the input file and stores the batch (``validating``);
the worker reads the file, checks every line (a bad ``url``/``method``/``custom_id`` fails the whole
batch, as DashScope does, with ``errors``), stores the lines and moves it ``in_progress``; it runs the
lines at ``[batches] concurrency`` through the same path as a live request (``build_call`` validation,
media, search, ``fileid://``, admission, the engine, the meter), then writes the output and error files
(``file-batch_output-…``) and marks it ``completed``. A line whose request is refused (bad parameters,
unknown model, an engine error) fails alone: its DashScope error object goes to the error file.

**Live traffic first.** A line starts only when its model's engine runs no live request, none ended
within ``[batches] idle_seconds``, and a running slot is free beyond one kept for live requests
(:func:`_hold_off`): batches fill the engine's idle time. The worker looks before the line starts at
all (nothing of it runs, not even its ``start_line_sync``, while live traffic is on its model: that
work took the event loop from the live requests) and again at the engine's door; in between it waits
on the admission's own events (an admission or a release there, the end of the idle window), never by
looking again and again. A live request admitted meanwhile *preempts* the lines in its model's engine
(:meth:`BatchService._preempt`, called from the admission itself): they are cancelled at once (the
engine drops them at its next step) and put back to ``pending`` exactly as a graceful stop puts them
back (crash point 2 without the crash: the hold is given back, no ledger row, nothing charged, not
failed); the line's task then keeps its place until the model has room again, and the line runs again,
from the start (measured with benchmarks/bench_batches.py: restarting it at once put its start, its
key lookup and validation on the event loop while the live request ran). Batch lines never wait in
the admission queue.

**Bounded.** Steady live traffic would hold a batch back until it expires. In the last tenth of its
completion window (:data:`URGENT_SHARE`) a batch stops giving way: its lines start whenever a slot
beyond the one kept for live requests is free, live traffic or not, and live requests no longer preempt
them (they share the engine with at most ``concurrency`` lines, as any request shares it with others).

**Money.** A line is admitted like a live request (rate limits, the balance hold at the full price), and
charged :attr:`~qwen_gateway.settings.BatchSettings.price_percent` of its live price (DashScope: 50 %)
when it succeeds; a failed line is charged nothing (DashScope bills only successful requests).

**Durability.** Each line's request id is derived from the batch id and the line number, the same on
every attempt, and is its usage-ledger ``request_id`` (unique). The crash points of a line:

1. ``start_line_sync`` (pending -> running, attempt + 1) commits; the process dies before admission:
   the line is ``running`` under a dead owner. The next server to claim the batch puts it back to
   ``pending``; it runs again. Nothing was charged or written.
2. Admission committed (a hold under the line's request id), the process dies while generating: the
   meter's sweep gives the hold back and writes an ``expired`` ledger row (cost 0) for the request id.
   The next attempt's ``start_line_sync`` deletes that row and any hold left (``forget_attempt_sync``)
   before it runs: the line then settles under the same id. Nothing was written to the output.
3. The answer is generated, the process dies before ``finish_line_sync`` commits: as 2 (the charge and
   the result line are in that one transaction, so neither exists).
4. ``finish_line_sync`` committed: the result line, the ledger row, the hold's release and the charge
   exist together; the line is ``done``/``failed`` and never runs again. A second charge is impossible
   anyway: a second ledger row with the same request id fails the transaction that would carry it.
5. All lines finished, the process dies while writing the files: the batch is ``finalizing`` (or still
   ``in_progress``/``cancelling``); files are named after the batch and rewritten whole, their rows and
   the final status go in one transaction, so the next owner finishes it the same way.

The output file is built from the stored result lines (one per line number), so a line appears in it
at most once whatever happened.

A server stopping gracefully puts the lines it was running back to ``pending`` (their holds given back),
for the next start; so does a preemption (the attempt is also taken out of the key's rate window: it
was the gateway's decision, not the client's request).

Cancelling: no new line starts, running ones finish (a preempted one is pending again: it fails with
the rest), the rest fail with ``batch_cancelled``; then ``cancelled``. Past its completion window a
batch's lines not yet run fail with ``batch_expired`` and the batch ends ``expired``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from qwen_gateway.engines.base import Usage
from qwen_gateway.errors import (
    ApiError,
    AuthenticationError,
    BatchLineNotRun,
    BatchNotFound,
    EngineFailure,
    InvalidParameter,
    InvalidRequest,
    QuotaExceeded,
    RateLimited,
)
from qwen_gateway.media import MediaFetcher
from qwen_gateway.service import fileids
from qwen_gateway.service.admission import Admission
from qwen_gateway.service.batch_input import (
    CHAT_ENDPOINT,
    NOT_SERVED,
    Problem,
    check_line,
    line_request_id,
    parse_window,
    plausible,
    problems_of,
)
from qwen_gateway.service.batch_input import (
    metadata as check_metadata,
)
from qwen_gateway.service.chat import ChatService
from qwen_gateway.service.events import ChatResult
from qwen_gateway.service.files import LINE_LIMIT, OUTPUT_PREFIX, FileService
from qwen_gateway.service.ledger import LedgerWriter
from qwen_gateway.service.media import resolve as resolve_media
from qwen_gateway.service.metrics import Metrics
from qwen_gateway.service.models import ModelRegistry, ServedModel
from qwen_gateway.service.money.meter import Account, Meter
from qwen_gateway.service.money.prices import Price
from qwen_gateway.service.search import WebSearch
from qwen_gateway.service.validation import ChatCall, build_call
from qwen_gateway.settings import BatchSettings
from qwen_gateway.store import batches as rows
from qwen_gateway.store.batches import BatchRow, LineRow, NewFile
from qwen_gateway.store.db import Store
from qwen_gateway.store.keys import get_key
from qwen_gateway.store.usage import NewUsage

log = logging.getLogger(__name__)

# The ledger's endpoint of a batch line (tells batch charges from live ones).
LEDGER_ENDPOINT = "batch.chat.completions"
# DashScope: at most 50,000 requests per input file.
MAX_LINES = 50_000
# Problems listed on a batch that fails validation (the rest are not).
MAX_PROBLEMS = 100
CREATE_PARAMS = frozenset({"input_file_id", "endpoint", "completion_window", "metadata"})
# The share of a batch's completion window, at its end, in which its lines no longer give way to live
# traffic (24h: the last 2.4 hours), so that steady live traffic can't make it expire.
URGENT_SHARE = 0.1


@dataclass(frozen=True, slots=True)
class BatchPage:
    batches: list[BatchRow]
    has_more: bool


class LineRenderer(Protocol):
    """The output/error file lines, in the wire shape (provided by the API layer)."""

    def success(self, *, request_id: str, custom_id: str | None, call: ChatCall, result: ChatResult) -> str:
        """The output-file line of a line that ran."""
        ...

    def failure(self, *, request_id: str, custom_id: str | None, error: ApiError) -> str:
        """The error-file line of a line that failed or never ran."""
        ...


class _Later(Exception):
    """A line refused by its key's rate limit (or whose batch is ending): back to pending, and its
    place in the concurrency kept for ``seconds``."""

    def __init__(self, seconds: int) -> None:
        super().__init__(seconds)
        self.seconds = seconds


@dataclass(slots=True)
class _Spent:
    """What the chat service's settlement of a line reported (written by the line's own transaction)."""

    status: str
    usage: Usage
    account: Account | None
    latency_ms: int


def output_file_id(batch_id: str, kind: str) -> str:
    """The batch's output (``kind`` "output") or error file id: derived, so a finalization that is
    repeated after a crash writes the same file."""
    return OUTPUT_PREFIX + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


def batch_cost(price: Price, usage: Usage, percent: int) -> int:
    """``percent`` of the live cost, rounded up once to the micro-CNY."""
    per_1k = usage.prompt_tokens * price.input_per_1k + usage.completion_tokens * price.output_per_1k
    return -(-per_1k * percent // 100_000)


def _hold_off(admission: Admission, idle_seconds: float, *, live_first: bool = True) -> float:
    """Seconds before batch work may start on ``admission``'s engine (0: now; ``math.inf``: not before
    something is admitted or released there). It may start when no live request runs or waits on it,
    none ended (or was admitted) within ``idle_seconds`` (both only while ``live_first``: see
    "Bounded" above), and a running slot is free beyond the one kept for the next live request (an
    engine of one slot: free)."""
    if live_first and admission.live_held > 0:
        return math.inf
    keep = 1 if admission.running > 1 else 0
    if admission.held + 1 > admission.running - keep:
        return math.inf
    if not live_first:
        return 0.0
    return max(0.0, idle_seconds - (time.monotonic() - admission.live_at))


class BatchService:
    """The Batch API's operations, each for one key, and the worker that runs the batches."""

    def __init__(
        self,
        *,
        store: Store,
        settings: BatchSettings,
        models: ModelRegistry,
        meter: Meter,
        writer: LedgerWriter,
        files: FileService,
        media: MediaFetcher,
        search: WebSearch,
        metrics: Metrics | None,
        max_files_per_request: int,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.settings = settings
        self.models = models
        self.meter = meter
        self.writer = writer
        self.files = files
        self.media = media
        self.search = search
        self.max_files_per_request = max_files_per_request
        self.metrics = metrics
        self.clock = clock
        self._spent: dict[str, _Spent] = {}
        # The live path's service with one difference: settlement is handed back to the worker, which
        # writes it together with the line's result (see the module docstring).
        self.chat = ChatService(self._record_spent, meter.admit, metrics)
        self._renderer: LineRenderer | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._running: dict[tuple[str, int], asyncio.Task[None]] = {}
        # Lines inside the chat service (admission, engine), by the admission of their model: what a
        # live request admitted there preempts. ``_preempted``: lines cancelled for that reason, with
        # the admission they wait on for room again.
        self._in_engine: dict[tuple[str, int], ServedModel] = {}
        self._preempted: dict[tuple[str, int], Admission] = {}
        self._listening: list[tuple[Admission, Callable[[], None]]] = []
        # Batches being cancelled or expired: their lines still waiting for the engine give up.
        self._stopping: set[str] = set()
        # Batches in the end of their window (URGENT_SHARE): their lines no longer give way.
        self._urgent: set[str] = set()

    # -- the API's operations ----------------------------------------------------------------------

    async def create(self, *, key_id: str, body: dict[str, Any]) -> BatchRow:
        for name in body:
            if name not in CREATE_PARAMS:
                raise InvalidParameter(f"Unknown parameter: {name[:64]}", param=name[:64])
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise InvalidParameter("input_file_id is required", param="input_file_id")
        endpoint = body.get("endpoint")
        if endpoint in NOT_SERVED:
            raise InvalidParameter(
                f"The endpoint '{endpoint}' is not served by this gateway; batches run {CHAT_ENDPOINT}",
                param="endpoint",
            )
        if endpoint != CHAT_ENDPOINT:
            shown = str(endpoint)[:64] if endpoint is not None else "None"
            raise InvalidParameter(
                f"The endpoint '{shown}' is not supported by the Batch API; use {CHAT_ENDPOINT}",
                param="endpoint",
            )
        window = parse_window(body.get("completion_window"))
        metadata = check_metadata(body.get("metadata"))
        file = await self.files.get(key_id=key_id, file_id=input_file_id)
        if file.purpose != "batch":
            raise InvalidParameter(
                f"File [id:{input_file_id}] was not uploaded with purpose 'batch'", param="input_file_id"
            )
        now = self.clock()
        row = BatchRow(
            id=f"batch_{uuid.uuid4()}",
            key_id=key_id,
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=str(body["completion_window"]),
            status="validating",
            metadata_json=None if metadata is None else orjson.dumps(metadata).decode(),
            ds_name=None if metadata is None else metadata.get("ds_name"),
            errors_json=None,
            output_file_id=None,
            error_file_id=None,
            total=0,
            completed=0,
            failed=0,
            owner=None,
            deadline=now + window,
            created_at=now.replace(microsecond=0),
        )
        await rows.insert_batch(self.store, row)
        self._wake.set()
        return row

    async def get(self, *, key_id: str, batch_id: str) -> BatchRow:
        row = (
            await rows.get_batch(self.store, key_id=key_id, batch_id=batch_id)
            if plausible(batch_id)
            else None
        )
        if row is None:
            raise BatchNotFound(batch_id)
        return row

    async def page(self, *, key_id: str, limit: int, after: str | None, **filters: Any) -> BatchPage:
        found, more = await rows.list_batches(self.store, key_id=key_id, limit=limit, after=after, **filters)
        return BatchPage(found, more)

    async def cancel(self, *, key_id: str, batch_id: str) -> BatchRow:
        row = (
            await rows.request_cancel(self.store, key_id=key_id, batch_id=batch_id, now=self.clock())
            if plausible(batch_id)
            else None
        )
        if row is None:
            raise BatchNotFound(batch_id)
        if row.status not in ("cancelling", "cancelled"):
            raise InvalidRequest(f"Cannot cancel a batch with status {row.status}.")
        self._wake.set()
        return row

    # -- the worker --------------------------------------------------------------------------------

    def start(self, renderer: LineRenderer) -> None:
        """Start the worker (after the meter registered this process: ownership is by instance id)."""
        self._renderer = renderer
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batch-worker")

    async def aclose(self) -> None:
        """Stop the worker; lines it was running go back to pending (their holds given back)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        running = list(self._running.values())
        for line_task in running:
            line_task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for admission, listener in self._listening:
            with contextlib.suppress(ValueError):
                admission.on_live.remove(listener)
        self._listening.clear()

    def _listen(self, admission: Admission) -> None:
        """Be told when live traffic is admitted on ``admission`` (once per admission)."""
        if any(known is admission for known, _ in self._listening):
            return
        listener = functools.partial(self._preempt, admission)
        admission.on_live.append(listener)
        self._listening.append((admission, listener))

    def _preempt(self, admission: Admission) -> None:
        """A live request was just admitted on ``admission``: cancel the batch lines in that engine
        (``_run_line`` puts them back to pending). Runs inside the live request's admission: no await,
        nothing that can raise."""
        for key, model in list(self._in_engine.items()):
            if model.admission is not admission or key[0] in self._urgent:
                continue
            task = self._running.get(key)
            del self._in_engine[key]
            if task is None or task.done():
                continue
            self._preempted[key] = admission
            task.cancel()
            if self.metrics is not None:
                self.metrics.batch_line_preempted(model.id)

    async def _room(self, admission: Admission, batch_id: str) -> bool:
        """Wait until batch work may start on ``admission``'s engine (:func:`_hold_off`), woken by its
        admissions and releases, the end of its idle window, the batch's urgency (noticed by the
        worker's pass over the batches) or the batch starting to end; False: the
        batch is ending (cancelled or expired). Returns without awaiting when there is room now, so a
        caller that takes its slot at once takes it with the room it was told of."""
        waiting = False
        try:
            while batch_id not in self._stopping:
                live_first = batch_id not in self._urgent
                wait = _hold_off(admission, self.settings.idle_seconds, live_first=live_first)
                if wait <= 0:
                    return True
                if not waiting:
                    waiting = True
                    admission.background_waiting += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(admission.changed(), None if math.isinf(wait) else wait)
            return False
        finally:
            if waiting:
                admission.background_waiting -= 1

    def _wake_waiting(self) -> None:
        """Lines waiting for room look again (a batch became urgent, or is ending)."""
        for served in self.models:
            served.admission.wake()

    def _admission_of(self, line: LineRow) -> Admission | None:
        """The admission of the model a line names (None: not valid JSON, or no model served under
        that name; its validation then fails it)."""
        try:
            body = orjson.loads(line.body)
        except orjson.JSONDecodeError:
            return None
        return self.models.admission_of(body.get("model")) if isinstance(body, dict) else None

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._tick()
            except Exception:  # the worker must survive a bad batch or a database hiccup
                log.exception("batch worker: a pass over the batches failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)

    async def _tick(self) -> None:
        for batch in await rows.claim(self.store, owner=self.meter.instance_id):
            if batch.status == "validating":
                await self._validate(batch)
            elif batch.status == "in_progress":
                now = self.clock()
                if now >= batch.deadline:
                    await self._end_early(batch, "expired")
                else:
                    window = batch.deadline - batch.created_at
                    if batch.id not in self._urgent and now >= batch.deadline - window * URGENT_SHARE:
                        log.info("batch %s: in the end of its window, no longer giving way", batch.id)
                        self._urgent.add(batch.id)
                        self._wake_waiting()
                    await self._fill(batch)
                    await self._maybe_finish(batch)
            elif batch.status == "cancelling":
                await self._end_early(batch, "cancelled")
            elif batch.status == "finalizing":
                await self._finalize(batch, "completed")

    # -- validation --------------------------------------------------------------------------------

    async def _validate(self, batch: BatchRow) -> None:
        try:
            lines, problems = await asyncio.to_thread(self._read_lines, batch)
        except FileNotFoundError:
            lines, problems = (
                [],
                [
                    Problem(
                        "file_not_found",
                        f"File [id:{batch.input_file_id}] cannot be found.",
                        "input_file_id",
                        None,
                    )
                ],
            )
        now = self.clock()
        if problems:
            errors = orjson.dumps([dataclasses.asdict(p) for p in problems[:MAX_PROBLEMS]]).decode()
            await rows.set_status(
                self.store, batch_id=batch.id, status="failed", errors_json=errors, failed_at=now
            )
            log.info("batch %s failed validation: %s", batch.id, problems[0].message)
            return
        if await rows.set_validated(self.store, batch_id=batch.id, lines=lines, now=now):
            log.info("batch %s: %d requests", batch.id, len(lines))
            self._wake.set()

    def _read_lines(self, batch: BatchRow) -> tuple[list[LineRow], list[Problem]]:
        lines: list[LineRow] = []
        problems: list[Problem] = []
        seen: set[str] = set()
        with self.files.path_of(batch.input_file_id).open("rb") as fh:
            number = 0
            while raw := fh.readline(LINE_LIMIT + 1):
                number += 1
                if not raw.strip():
                    continue
                problem, line = check_line(raw, number, batch, seen)
                if problem is not None:
                    problems.append(problem)
                elif line is not None:
                    lines.append(line)
                if len(lines) > MAX_LINES:
                    return [], [
                        Problem(
                            "too_many_requests", f"A batch holds at most {MAX_LINES} requests.", None, number
                        )
                    ]
        if not lines and not problems:
            problems.append(Problem("empty_file", "The input file holds no request.", "input_file_id", None))
        return lines, problems

    # -- running lines -----------------------------------------------------------------------------

    async def _fill(self, batch: BatchRow) -> None:
        room = self.settings.concurrency - len(self._running)
        if room <= 0:
            return
        for line in await rows.pending_lines(self.store, batch_id=batch.id, limit=room + len(self._running)):
            if len(self._running) >= self.settings.concurrency:
                break
            key = (batch.id, line.line)
            if key in self._running:
                continue
            task = asyncio.get_running_loop().create_task(
                self._run_line(batch, line), name=f"batch-line-{line.line}"
            )
            self._running[key] = task
            task.add_done_callback(functools.partial(self._line_done, key))

    def _line_done(self, key: tuple[str, int], _task: asyncio.Task[None]) -> None:
        self._running.pop(key, None)
        self._in_engine.pop(key, None)
        self._preempted.pop(key, None)
        self._wake.set()

    async def _run_line(self, batch: BatchRow, line: LineRow) -> None:
        admission = self._admission_of(line)
        if admission is not None and not await self._room(admission, batch.id):
            return  # the batch is ending: the line, still pending, fails with the rest
        start = asyncio.ensure_future(
            self.writer.run(
                lambda conn: rows.start_line_sync(
                    conn, batch_id=batch.id, line=line.line, request_id=line.request_id
                )
            )
        )
        try:
            # Shielded: a stop that comes now must still learn whether the line was started (a
            # handed-over transaction commits anyway), so that it can put it back.
            started = await asyncio.shield(start)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                if await start:
                    await self._release(batch, line)
            raise
        if not started:
            return
        try:
            state, result, usage = await self._execute(batch, line)
        except _Later as later:
            # The key's rate limit: not the line's fault. It goes back to pending and runs later (this
            # task keeps its place in the concurrency meanwhile, so the worker does not spin on it).
            await self._release(batch, line)
            await asyncio.sleep(later.seconds)
            return
        except asyncio.CancelledError:
            # Preempted by a live request, or the server is closing: the line goes back to pending, to
            # run again later (shielded: the release must happen even though this task is cancelled).
            preempted = self._preempted.pop((batch.id, line.line), None)
            try:
                await asyncio.shield(self._release(batch, line, uncount=preempted is not None))
            except Exception:
                log.exception("batch %s line %d: putting it back to pending failed", batch.id, line.line)
            if preempted is None:
                raise
            log.info("batch %s line %d: preempted by live traffic, back to pending", batch.id, line.line)
            # The cancellation was ours, not the server's: it ends here.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        else:
            await asyncio.shield(
                self.writer.run(
                    lambda conn: rows.finish_line_sync(
                        conn, batch_id=batch.id, line=line.line, state=state, result=result, usage=usage
                    )
                )
            )
            return
        # Preempted: the task keeps its place until the model has room again. Started again at once,
        # the line would only wait at the engine's door, its start and preparation run on the event
        # loop beside the live request (measured with benchmarks/bench_batches.py).
        await self._room(preempted, batch.id)

    async def _release(self, batch: BatchRow, line: LineRow, *, uncount: bool = False) -> None:
        """Back to pending, its hold given back; ``uncount``: its admission also leaves the key's rate
        window (a preempted attempt)."""
        spent = self._spent.pop(line.request_id, None)
        window: rows.WindowEntry | None = None
        account = None if spent is None else spent.account
        if uncount and account is not None and account.admitted and account.rate_second is not None:
            window = rows.WindowEntry(account.key.id, account.rate_second, account.rate_tokens)
        await self.writer.run(
            lambda conn: rows.release_line_sync(
                conn, batch_id=batch.id, line=line.line, request_id=line.request_id, window=window
            )
        )

    async def _execute(self, batch: BatchRow, line: LineRow) -> tuple[str, str, NewUsage | None]:
        """Run one line as a live request would run: (state, result line, its ledger row or None)."""
        renderer = self._renderer
        assert renderer is not None
        rid = line.request_id
        call: ChatCall | None = None
        try:
            key = await get_key(store=self.store, name_or_id=batch.key_id)
            if key is None or not key.active:
                raise AuthenticationError()
            body = orjson.loads(line.body)
            if body.get("stream") is True:
                raise InvalidParameter("stream is not supported in a batch request", param="stream")
            call = build_call(body, self.models, request_id=rid)
            call = dataclasses.replace(call, endpoint=LEDGER_ENDPOINT, background=True)
            call = await resolve_media(call, self.media)
            # As on a live request: planned (and reserved for in the hold) now, searched once admitted.
            call = self.search.plan(call)
            call = await fileids.inject(call, self.files, key_id=key.id, max_files=self.max_files_per_request)
            if not await self._room(call.model.admission, batch.id):
                raise _Later(0)  # cancelled or expired while waiting: back to pending, then failed
            # No await between the room check and the chat service taking its slots; from then on a
            # live request admitted on this engine preempts the line (see _preempt).
            where = (batch.id, line.line)
            self._listen(call.model.admission)
            self._in_engine[where] = call.model
            try:
                result = await self.chat.complete(
                    call, key_id=key.id, account=self.meter.account_for(key), prepare=self.search.apply
                )
            finally:
                self._in_engine.pop(where, None)
        except (RateLimited, QuotaExceeded) as exc:
            raise _Later(exc.retry_after or 1) from None
        except _Later:
            raise  # the batch is ending while the line waited for room: not a failure of the line
        except ApiError as exc:
            error = exc if call is None else fileids.map_error(call, exc)
            return (
                "failed",
                renderer.failure(request_id=rid, custom_id=line.custom_id, error=error),
                self._row(call),
            )
        except Exception:
            log.exception("batch %s line %d failed", batch.id, line.line)
            failure = renderer.failure(request_id=rid, custom_id=line.custom_id, error=EngineFailure())
            return "failed", failure, self._row(call)
        out = renderer.success(request_id=rid, custom_id=line.custom_id, call=call, result=result)
        return "done", out, self._row(call)

    async def _record_spent(
        self,
        call: ChatCall,
        *,
        key_id: str | None,
        status: str,
        usage: Usage,
        account: Account | None,
        latency_ms: int,
    ) -> None:
        """The chat service's settlement of a line: kept for the line's own transaction."""
        self._spent[call.request_id] = _Spent(status, usage, account, latency_ms)

    def _row(self, call: ChatCall | None) -> NewUsage | None:
        """The line's ledger row (None: it never reached the engine, nothing to record or release).

        Charged at the batch price when it succeeded, nothing when it failed (its hold still goes)."""
        if call is None:
            return None
        spent = self._spent.pop(call.request_id, None)
        if spent is None:
            return None
        account = spent.account
        admitted = account is not None and account.admitted
        cost: int | None = None
        if admitted and account is not None and account.held_micro is not None:
            price = account.price if account.price is not None else self.meter.price(call.model.id)
            cost = batch_cost(price, spent.usage, self.settings.price_percent) if spent.status == "ok" else 0
        usage = spent.usage
        return NewUsage(
            request_id=call.request_id,
            key_id=None if account is None else account.key.id,
            model=call.model.id,
            endpoint=call.endpoint,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            image_tokens=usage.image_tokens,
            video_tokens=usage.video_tokens,
            status=spent.status,
            cost_micro=cost,
            latency_ms=spent.latency_ms,
            usage_source="local" if usage.counted_locally else "engine",
            held_micro=account.held_micro if admitted and account is not None else None,
            rate_second=account.rate_second if admitted and account is not None else None,
            rate_tokens=account.rate_tokens if account is not None else 0,
        )

    # -- the end -----------------------------------------------------------------------------------

    def _busy(self, batch_id: str) -> bool:
        return any(key[0] == batch_id for key in self._running)

    async def _maybe_finish(self, batch: BatchRow) -> None:
        if self._busy(batch.id):
            return
        states = await rows.line_states(self.store, batch_id=batch.id)
        if states.get("pending", 0) or states.get("running", 0):
            return
        await rows.set_status(self.store, batch_id=batch.id, status="finalizing", finalizing_at=self.clock())
        await self._finalize(batch, "completed")

    async def _end_early(self, batch: BatchRow, status: str) -> None:
        """Cancelled or expired: lines not started fail; once the running ones are done, the files."""
        renderer = self._renderer
        assert renderer is not None
        self._stopping.add(batch.id)
        self._wake_waiting()  # its lines waiting for room give up
        if status == "cancelled":
            error = BatchLineNotRun("batch_cancelled", "The batch was cancelled before this request ran.")
        else:
            error = BatchLineNotRun(
                "batch_expired", "The batch's completion window ended before this request ran."
            )
        while True:
            pending = await rows.pending_lines(self.store, batch_id=batch.id, limit=1000)
            lines = {
                p.line: renderer.failure(request_id=p.request_id, custom_id=p.custom_id, error=error)
                for p in pending
                if (batch.id, p.line) not in self._running
            }
            if lines and await rows.fail_pending(self.store, batch_id=batch.id, results=lines):
                continue
            if self._busy(batch.id):
                return  # running lines finish first; their end wakes the worker
            # A line may have gone back to pending (and its task ended) while the query above ran:
            # the files are written only once the database says nothing is left to run.
            states = await rows.line_states(self.store, batch_id=batch.id)
            if states.get("pending", 0) and not self._busy(batch.id):
                continue
            if states.get("pending", 0) or states.get("running", 0):
                return
            break
        await self._finalize(batch, status)

    async def _finalize(self, batch: BatchRow, status: str) -> None:
        """Write the output and error files and the batch's final status (repeatable: see point 5)."""
        outputs: list[str] = []
        errors: list[str] = []
        for state, result in await rows.results(self.store, batch_id=batch.id):
            (outputs if state == "done" else errors).append(result)
        now = self.clock()
        made: list[NewFile | None] = []
        for kind, lines in (("output", outputs), ("error", errors)):
            if not lines:
                made.append(None)
                continue
            data = ("\n".join(lines) + "\n").encode()
            file_id = output_file_id(batch.id, kind)
            await self.files.write_output(file_id, data)
            made.append(
                NewFile(
                    file_id, batch.key_id, f"{batch.id}_{kind}.jsonl", len(data), now.replace(microsecond=0)
                )
            )
        await rows.finalize(
            self.store, batch_id=batch.id, status=status, output=made[0], error=made[1], now=now
        )
        self._urgent.discard(batch.id)
        log.info("batch %s %s: %d outputs, %d errors", batch.id, status, len(outputs), len(errors))


__all__ = [
    "BatchPage",
    "BatchService",
    "LineRenderer",
    "Problem",
    "batch_cost",
    "line_request_id",
    "problems_of",
]
