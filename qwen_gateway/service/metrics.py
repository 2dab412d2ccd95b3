"""Prometheus metrics of one gateway: requests, tokens, latency and time to first token per model,
queue depth and active generations per model, upstream errors per model and replica.

One :class:`CollectorRegistry` per gateway (no process-wide default registry), so two apps in one
process keep separate counts. Labels are model ids, statuses and replica numbers, never key names or
ids: a key is a customer, and a label per customer is both a leak and an unbounded series count.
Gauges that describe now (queue, active) are read from the models at scrape time, not kept in sync.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qwen_gateway.engines.base import Usage

if TYPE_CHECKING:
    from qwen_gateway.service.ledger import LedgerWriter
    from qwen_gateway.service.models import ModelRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(slots=True)
class Timing:
    """Where one request's time went: ``engine`` seconds awaiting the engine (for an upstream, the
    upstream's own time), the rest is the gateway's overhead."""

    started: float = field(default_factory=time.perf_counter)
    engine: float = 0.0
    waiting_since: float | None = None  # awaiting the engine right now, since then
    first_output: float | None = None

    def overhead_ms(self) -> float:
        now = time.perf_counter()
        waiting = now - self.waiting_since if self.waiting_since is not None else 0.0
        return max(0.0, (now - self.started - self.engine - waiting) * 1000)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "qwen_gateway_requests",
            "Chat requests by model and outcome",
            ("model", "status"),
            registry=self.registry,
        )
        self._tokens = Counter(
            "qwen_gateway_tokens",
            "Tokens billed, by model and kind",
            ("model", "kind"),
            registry=self.registry,
        )
        self._latency = Histogram(
            "qwen_gateway_request_duration_seconds",
            "Time from request to its end",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._ttft = Histogram(
            "qwen_gateway_time_to_first_token_seconds",
            "Time from request to its first output",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._overhead = Histogram(
            "qwen_gateway_overhead_seconds",
            "Time a request spent in the gateway itself (not awaiting the engine)",
            ("model",),
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=self.registry,
        )

        self._preempted = Counter(
            "qwen_gateway_batch_lines_preempted",
            "Batch lines cancelled in the engine by a live request (put back to pending, run again)",
            ("model",),
            registry=self.registry,
        )

    def watch_models(self, models: ModelRegistry) -> None:
        self.registry.register(_ModelCollector(models))

    def watch_ledger(self, writer: LedgerWriter) -> None:
        """The ledger writer's transactions and rows (read at scrape time): transactions per request
        is what the group commit saves, a figure that does not move with the machine's load."""
        self.registry.register(_LedgerCollector(writer))

    def first_output(self, model: str, timing: Timing) -> None:
        timing.first_output = time.perf_counter()
        self._ttft.labels(model).observe(timing.first_output - timing.started)

    def finished(self, model: str, status: str, usage: Usage, timing: Timing) -> None:
        self._requests.labels(model, status).inc()
        if usage.prompt_tokens:
            self._tokens.labels(model, "prompt").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self._tokens.labels(model, "completion").inc(usage.completion_tokens)
        self._latency.labels(model).observe(time.perf_counter() - timing.started)
        self._overhead.labels(model).observe(timing.overhead_ms() / 1000)

    def batch_line_preempted(self, model: str) -> None:
        self._preempted.labels(model).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ModelCollector(Collector):
    def __init__(self, models: ModelRegistry) -> None:
        self._models = models

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        queued = GaugeMetricFamily(
            "qwen_gateway_queue_depth", "Requests waiting for a slot", labels=["model"]
        )
        active = GaugeMetricFamily(
            "qwen_gateway_active_generations", "Generations running now", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "qwen_gateway_batch_lines_waiting",
            "Batch lines held back for live traffic on their model (or for its idle window)",
            labels=["model"],
        )
        errors = CounterMetricFamily(
            "qwen_gateway_upstream_errors",
            "Upstream failures by model, replica (its position in the config) and kind",
            labels=["model", "replica", "kind"],
        )
        for served in self._models:
            queued.add_metric([served.id], served.admission.queued)
            active.add_metric([served.id], served.admission.held - served.admission.queued)
            waiting.add_metric([served.id], served.admission.background_waiting)
            report = getattr(served.engine, "upstream_errors", None)
            if report is not None:
                for (replica, kind), count in sorted(report().items()):
                    errors.add_metric([served.id, str(replica), kind], count)
        yield queued
        yield active
        yield waiting
        yield errors


class _LedgerCollector(Collector):
    def __init__(self, writer: LedgerWriter) -> None:
        self._writer = writer

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        writer = self._writer
        yield CounterMetricFamily(
            "qwen_gateway_ledger_transactions",
            "Transactions the ledger writer committed (each holds every row, hold and settlement that queued"
            " up together)",
            value=writer.batches,
        )
        yield CounterMetricFamily(
            "qwen_gateway_ledger_rows", "Usage ledger rows written", value=writer.written
        )
        yield CounterMetricFamily(
            "qwen_gateway_ledger_rows_lost", "Usage ledger rows that could not be written", value=writer.lost
        )
