"""Prometheus metrics of the gateway, served at /metrics.

Scraping: `GET /metrics` with `Authorization: Bearer $QWENHUB_METRICS_TOKEN`; with
no token configured only loopback clients may scrape (not a request forwarded by a proxy
on the same host). The sweep of stale reservations runs in the Celery worker: its counters
are read from the quota counters at scrape time. Under several uvicorn
workers set PROMETHEUS_MULTIPROC_DIR to an empty directory shared by the workers
so that every scrape sums all of them (prometheus_client's multiprocess mode).
"""
import hmac
import os

from django.conf import settings
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_OVERHEAD_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

REGISTRY = CollectorRegistry(auto_describe=True)
registry_args = {} if MULTIPROCESS else {"registry": REGISTRY}

REQUESTS = Counter("qwenhub_requests", "Requests through the gateway", ["model", "member", "status"], **registry_args)
TOKENS = Counter("qwenhub_tokens", "Tokens metered", ["model", "member", "kind"], **registry_args)
AUTH_FAILURES = Counter("qwenhub_auth_failures", "Requests refused for an invalid key", **registry_args)
LATENCY = Histogram("qwenhub_request_duration_seconds", "Whole request duration", ["model"],
                    buckets=_LATENCY_BUCKETS, **registry_args)
TTFT = Histogram("qwenhub_time_to_first_token_seconds", "Time to the first byte of the answer", ["model"],
                 buckets=_LATENCY_BUCKETS, **registry_args)
DB_STATEMENTS = Counter("qwenhub_db_statements", "Database statements run for requests (quota reservations, "
                        "settlements; one combined settlement counts once)", ["kind"], **registry_args)
RESERVE_STATEMENTS, SETTLE_STATEMENTS = DB_STATEMENTS.labels("reserve"), DB_STATEMENTS.labels("settle")
OVERHEAD = Histogram("qwenhub_gateway_overhead_seconds", "Time spent in the gateway, not waiting on upstreams",
                     buckets=_OVERHEAD_BUCKETS, **registry_args)


class GatewayCollector:
    """Per-upstream state read at scrape time: health, in-flight and queued requests, degraded Redis."""

    def __init__(self, gateway) -> None:
        self.gateway = gateway

    def collect(self):
        up = GaugeMetricFamily("qwenhub_upstream_up", "1 if the upstream passed its last health check", labels=["upstream"])
        in_flight = GaugeMetricFamily("qwenhub_upstream_in_flight", "Requests being served by the upstream",
                                      labels=["upstream"])
        queued = GaugeMetricFamily("qwenhub_upstream_queued", "Requests waiting for the upstream (fair queue)",
                                   labels=["upstream"])
        for upstream in self.gateway.router.upstreams.values():
            up.add_metric([upstream.name], 1.0 if upstream.healthy else 0.0)
            in_flight.add_metric([upstream.name], upstream.in_flight)
            queued.add_metric([upstream.name], self.gateway.queued(upstream.id))
        degraded = GaugeMetricFamily("qwenhub_redis_degraded_total",
                                     "Times Redis failed and limits fell back to this process")
        degraded.add_metric([], self.gateway.degraded_total())
        waiting = GaugeMetricFamily("qwenhub_usage_waiting_for_database",
                                    "Usage rows of answered requests kept until the database is back (this process)")
        waiting.add_metric([], self.gateway.usage_waiting())
        yield from (up, in_flight, queued, degraded, waiting)


def observe(*, model: str, member: str, status: str, prompt: int, completion: int, duration_s: float,
            ttft_s: float | None, overhead_s: float) -> None:
    REQUESTS.labels(model, member, status).inc()
    if prompt:
        TOKENS.labels(model, member, "prompt").inc(prompt)
    if completion:
        TOKENS.labels(model, member, "completion").inc(completion)
    LATENCY.labels(model).observe(duration_s)
    if ttft_s is not None:
        TTFT.labels(model).observe(ttft_s)
    OVERHEAD.observe(overhead_s)


# A request a reverse proxy forwarded comes from the proxy's address, often loopback: it is
# not a local scraper's, so without a token it is refused.
_FORWARDED = (b"forwarded", b"x-forwarded-for", b"x-real-ip")


def may_scrape(scope) -> bool:
    """With a token, whoever presents it (loopback too); without one, local clients only."""
    token = settings.QWENHUB_METRICS_TOKEN
    headers = dict(scope["headers"])
    if token:
        auth = headers.get(b"authorization", b"")
        return hmac.compare_digest(auth, b"Bearer " + token.encode())
    if any(name in headers for name in _FORWARDED):
        return False
    client = scope.get("client") or ("", 0)
    return client[0] in ("127.0.0.1", "::1", "localhost")


class SweptCollector:
    """What the reservation sweep gave back, ever (it runs in the Celery worker; the counters hold the sums)."""

    def __init__(self, swept: tuple[int, int]) -> None:
        self.swept = swept

    def collect(self):
        requests, tokens = self.swept
        yield CounterMetricFamily("qwenhub_reservations_swept", "Reservations given back by the sweep: their "
                                  "request never settled (its gateway process died)", value=requests)
        yield CounterMetricFamily("qwenhub_reservation_tokens_swept", "Tokens of the reservations given back by "
                                  "the sweep", value=tokens)


def render(gateway_collector: GatewayCollector, swept: tuple[int, int] | None = None) -> bytes:
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    output = generate_latest(registry)
    local = CollectorRegistry()
    local.register(gateway_collector)
    if swept is not None:  # None: the database is unavailable (the rest is still served)
        local.register(SweptCollector(swept))
    return output + generate_latest(local)
