"""Prometheus series, scraped at GET /metrics."""
from prometheus_client import Counter, Histogram

REQUESTS = Counter("feedloop_http_requests_total", "HTTP requests", ["route", "status"])
LATENCY = Histogram("feedloop_http_request_seconds", "HTTP request latency", ["route"])
GENERATED_TOKENS = Counter("feedloop_generated_tokens_total", "completion tokens generated")
BATCH_ROWS = Histogram("feedloop_batch_rows", "sequences per generation batch",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
EXCHANGES = Counter("feedloop_exchanges_total", "chat exchanges recorded", ["version", "finish"])
SPOOLED = Counter("feedloop_exchanges_spooled_total", "exchanges kept on disk while the database was away")
