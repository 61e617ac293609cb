"""Prometheus series, scraped at GET /metrics."""
from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("feedloop_http_requests_total", "HTTP requests", ["route", "status"])
LATENCY = Histogram("feedloop_http_request_seconds", "HTTP request latency", ["route"])
EXCHANGES = Counter("feedloop_exchanges_total", "chat exchanges recorded", ["version", "finish"])
SPOOLED = Counter("feedloop_exchanges_spooled_total", "exchanges kept on disk while the database was away")

# The embedded engine's scheduler (service/local_engine.py), per served version.
GENERATED_TOKENS = Counter("feedloop_generated_tokens_total", "completion tokens generated")
TOKENS_PER_SECOND = Gauge("feedloop_generated_tokens_per_second",
                          "completion tokens generated per second, over the last second or so", ["version"])
BATCH_ROWS = Histogram("feedloop_batch_rows", "rows (choices) in the batch at each decoding step",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
BATCH_OCCUPANCY = Gauge("feedloop_batch_occupancy", "rows in the running batch / the most it holds", ["version"])
QUEUE_DEPTH = Gauge("feedloop_queue_depth", "requests waiting for a place in the batch", ["version"])
TIME_TO_FIRST_TOKEN = Histogram("feedloop_time_to_first_token_seconds",
                                "from a request's submission to its first generated token",
                                buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
ENGINES_LOST = Counter("feedloop_engines_lost_total", "engines whose process died (serving replaces each)",
                       ["version"])
REJECTED = Counter("feedloop_engine_rejected_total", "requests turned away with 503 engine_overloaded",
                   ["reason"])


class EngineMetrics:
    """The engine series of one served version, as the scheduler reports them. An engine in a
    process of its own (service/engine_process.py) makes these calls on a relay; the API process,
    which serves /metrics, makes them again here."""

    def __init__(self, version: str):
        self.version = version

    def queued(self, depth: int) -> None:
        QUEUE_DEPTH.labels(version=self.version).set(depth)

    def rejected(self, reason: str) -> None:
        REJECTED.labels(reason=reason).inc()

    def first_token(self, seconds: float) -> None:
        TIME_TO_FIRST_TOKEN.observe(seconds)

    def step(self, rows: int) -> None:
        BATCH_ROWS.observe(rows)

    def generated(self, tokens: int) -> None:
        GENERATED_TOKENS.inc(tokens)

    def batch(self, occupancy: float, tokens_per_second: float | None) -> None:
        BATCH_OCCUPANCY.labels(version=self.version).set(occupancy)
        if tokens_per_second is not None:
            TOKENS_PER_SECOND.labels(version=self.version).set(tokens_per_second)

    def lost(self) -> None:
        ENGINES_LOST.labels(version=self.version).inc()

    def remove(self) -> None:
        for gauge in (QUEUE_DEPTH, BATCH_OCCUPANCY, TOKENS_PER_SECOND):
            try:
                gauge.remove(self.version)
            except KeyError:
                pass
