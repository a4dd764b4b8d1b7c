"""vLLM's Prometheus metrics (names, types, labels, bucket bounds), in a private registry.

Gauges are read from the scheduler at scrape time, so the hot path only touches
counters and histograms through pre-bound label children.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .scheduler import Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vllm/v1/metrics/loggers.py
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
FINISHED_REASONS = ("stop", "length", "abort", "error")


def observe_many(child: Histogram, value: float, count: int) -> None:
    """Record ``count`` observations of ``value`` at the cost of one."""
    if count <= 0:
        return
    try:
        bounds, buckets, total = child._upper_bounds, child._buckets, child._sum  # noqa: SLF001
    except AttributeError:  # prometheus_client internals changed: fall back to a loop
        for _ in range(count):
            child.observe(value)
        return
    total.inc(value * count)
    for i, bound in enumerate(bounds):
        if value <= bound:
            buckets[i].inc(count)
            return


class _GaugeCollector(Collector):
    def __init__(self, labels: list[str], values: list[str], read: Callable[[], dict[str, float]],
                 docs: dict[str, str]) -> None:
        self._labels, self._values, self._read, self._docs = labels, values, read, docs

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, value in self._read().items():
            g = GaugeMetricFamily(name, self._docs[name], labels=self._labels)
            g.add_metric(self._values, value)
            yield g


class SimMetrics:
    """The engine metrics of one simulated vLLM engine (``engine="0"``)."""

    def __init__(self, model_name: str, scheduler: "Scheduler", *, legacy: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name", "engine"]
        values = [model_name, "0"]
        r = self.registry

        def gauges() -> dict[str, float]:
            kv = scheduler.kv_usage()
            out = {
                "vllm:num_requests_running": scheduler.running,
                "vllm:num_requests_waiting": scheduler.waiting,
                "vllm:kv_cache_usage_perc": kv,
            }
            if legacy:
                out["vllm:gpu_cache_usage_perc"] = kv
            return out

        docs = {
            "vllm:num_requests_running": "Number of requests in model execution batches.",
            "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
            "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
            "vllm:gpu_cache_usage_perc": "GPU KV-cache usage. 1 means 100 percent usage.",
        }
        r.register(_GaugeCollector(labels, values, gauges, docs))

        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                     labels, registry=r).labels(*values)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         labels, registry=r).labels(*values)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          labels + ["finished_reason"], registry=r)
        self.success = {reason: success.labels(*values, reason) for reason in FINISHED_REASONS}
        self.preemptions = Counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                                   labels, registry=r).labels(*values)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              labels, buckets=TTFT_BUCKETS, registry=r).labels(*values)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             labels, buckets=ITL_BUCKETS, registry=r).labels(*values)
        self.tpot_legacy = None
        if legacy:
            self.tpot_legacy = Histogram(
                "vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.",
                labels, buckets=ITL_BUCKETS, registry=r).labels(*values)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             labels, buckets=REQUEST_LATENCY_BUCKETS, registry=r).labels(*values)
        self.queue_time = Histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.",
                                    labels, buckets=REQUEST_LATENCY_BUCKETS, registry=r).labels(*values)

    def observe_itl(self, value: float, count: int) -> None:
        observe_many(self.itl, value, count)
        if self.tpot_legacy is not None:
            observe_many(self.tpot_legacy, value, count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
