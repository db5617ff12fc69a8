"""Prometheus metrics for the server, on a registry of its own so that several apps (tests, a
benchmark next to a server) never share or double-register collectors."""

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

# Latency buckets from a millisecond (a decode step of a small model) to minutes (a long answer
# stuck behind a full queue).
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0
)  # fmt: skip


class ServerMetrics:
    """The server's collectors. Latencies come from `observe_finished`, called once per request
    with the scheduler's timestamps; inter-token gaps from `observe_token_gap` while streaming."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        num_running: Callable[[], int],
        num_waiting: Callable[[], int],
        draft_counts: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if draft_counts is not None:
            r.register(_DraftCollector(draft_counts))
        self.time_to_first_token = Histogram(
            "chatdistill_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "chatdistill_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "chatdistill_e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "chatdistill_request_queue_time_seconds",
            "Time a request waited before it joined the running batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        running = Gauge(
            "chatdistill_num_requests_running", "Requests in the running batch.", registry=r
        )
        running.set_function(num_running)
        waiting = Gauge(
            "chatdistill_num_requests_waiting", "Requests queued for a batch slot.", registry=r
        )
        waiting.set_function(num_waiting)
        self.prompt_tokens = Counter(
            "chatdistill_prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.generation_tokens = Counter(
            "chatdistill_generation_tokens", "Generated tokens of finished requests.", registry=r
        )
        self.requests = Counter(
            "chatdistill_requests",
            "Finished requests by finish reason (stop, length, cancelled, error, timeout).",
            ["finish_reason"],
            registry=r,
        )
        self.rejected = Counter(
            "chatdistill_requests_rejected",
            "Requests answered with an HTTP error, by status code.",
            ["status"],
            registry=r,
        )

    def observe_finished(
        self,
        *,
        queued_at: float,
        started_at: float | None,
        first_token_at: float | None,
        finished_at: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        finish_reason: str,
    ) -> None:
        """Record one finished request; timestamps are `time.monotonic()` values or None where the
        request never reached that point (e.g. cancelled while queued)."""
        if started_at is not None:
            self.queue_time.observe(max(0.0, started_at - queued_at))
        if first_token_at is not None:
            self.time_to_first_token.observe(max(0.0, first_token_at - queued_at))
        if finished_at is not None:
            self.e2e_latency.observe(max(0.0, finished_at - queued_at))
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.requests.labels(finish_reason=finish_reason).inc()

    def observe_token_gap(self, seconds: float, num_tokens: int) -> None:
        """A delta of `num_tokens` arrived `seconds` after the previous one: spread it evenly."""
        if num_tokens <= 0:
            return
        for _ in range(num_tokens):
            self.inter_token_latency.observe(max(0.0, seconds / num_tokens))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DraftCollector:
    """Speculative decoding's counters, read from the draft when scraped (the acceptance rate is
    accepted / drafted)."""

    def __init__(self, counts: Callable[[], tuple[int, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        drafted, accepted = self.counts()
        yield CounterMetricFamily(
            "chatdistill_spec_decode_draft_tokens", "Tokens proposed by the draft model.", drafted
        )
        yield CounterMetricFamily(
            "chatdistill_spec_decode_accepted_tokens",
            "Drafted tokens the teacher accepted.",
            accepted,
        )
