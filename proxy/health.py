"""The GPU's health as vLLM reports it: scrape each upstream's Prometheus /metrics, keep a sample.

`upstream_health_sample` reads one upstream's /metrics with httpx (vLLM serves it without
auth, at the server's root, beside /v1), parses it with prometheus_client's own parser, and
stores an UpstreamHealthSample: running and waiting requests, KV-cache usage, and, against
the upstream's previous sample, generation tokens per second and the mean time to first
token of the requests first answered in between. An upstream that cannot be read is a
sample too (ok False, the error), never an exception. The names follow vLLM V1, with the
older `vllm:gpu_cache_usage_perc` as a fallback (VLLM_API.md §3).

The reads the team page needs are here too (`health_latest`, `health_history`): bounded
queries whatever the number of samples.
"""
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import httpx
from django.db.models import OuterRef, Subquery
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from proxy.models import Upstream, UpstreamHealthSample

SCRAPE_TIMEOUT_SECONDS = 5.0
KEEP = timedelta(hours=24)
ERROR_LENGTH = UpstreamHealthSample._meta.get_field("error").max_length

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # the V1 name first
GENERATION_TOKENS = "vllm:generation_tokens"  # a counter family: its sample is ..._total
TTFT = "vllm:time_to_first_token_seconds"  # a histogram: ..._sum and ..._count


@dataclass(frozen=True)
class Reading:
    """What one /metrics text says, summed over engines and model names (None: not exposed)."""

    running: float | None
    waiting: float | None
    kv_cache_usage: float | None
    generation_tokens_total: float | None
    ttft_sum: float | None
    ttft_count: float | None


def metrics_url(base_url: str) -> str:
    """http://gpu:8000/v1 → http://gpu:8000/metrics (vLLM serves /metrics beside /v1, not under it)."""
    parts = urlsplit(base_url)
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urlunsplit((parts.scheme, parts.netloc, f"{path}/metrics", "", ""))


def parse_reading(text: str) -> Reading:
    """Sum each metric's samples over its labels (several engines or model names add up; KV cache averages)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
            counts[sample.name] = counts.get(sample.name, 0) + 1
    kv_name = next((name for name in KV_CACHE if name in sums), None)
    return Reading(
        running=sums.get(RUNNING), waiting=sums.get(WAITING),
        kv_cache_usage=sums[kv_name] / counts[kv_name] if kv_name else None,
        generation_tokens_total=sums.get(f"{GENERATION_TOKENS}_total"),
        ttft_sum=sums.get(f"{TTFT}_sum"), ttft_count=sums.get(f"{TTFT}_count"),
    )


def _delta(new: float | None, old: float | None) -> float | None:
    """new − old for a counter, None when either is missing or the counter went back (a restart)."""
    if new is None or old is None or new < old:
        return None
    return new - old


def rates(reading: Reading, taken_at: datetime, previous: UpstreamHealthSample | None) -> tuple[float | None, float | None]:
    """(generation tokens/s, mean TTFT in s) since the previous good sample; None when it cannot be told."""
    if previous is None or not previous.ok:
        return None, None
    seconds = (taken_at - previous.taken_at).total_seconds()
    tokens = _delta(reading.generation_tokens_total, previous.generation_tokens_total)
    per_second = tokens / seconds if tokens is not None and seconds > 0 else None
    ttft_sum = _delta(reading.ttft_sum, previous.ttft_sum)
    ttft_count = _delta(reading.ttft_count, previous.ttft_count)
    ttft = ttft_sum / ttft_count if ttft_sum is not None and ttft_count else None
    return per_second, ttft


def _error_text(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        text = f"timed out after {SCRAPE_TIMEOUT_SECONDS:g} s"
    elif isinstance(exc, httpx.HTTPStatusError):
        text = f"HTTP {exc.response.status_code} from /metrics"
    elif isinstance(exc, httpx.HTTPError):
        text = f"unreachable: {exc.__class__.__name__}: {exc}"
    else:
        text = f"unreadable metrics: {exc.__class__.__name__}: {exc}"
    return text[:ERROR_LENGTH]


def upstream_health_sample(*, upstream: Upstream, client: httpx.Client | None = None,
                           now: datetime | None = None) -> UpstreamHealthSample:
    """Scrape one upstream's /metrics and store what it says (or why it could not be read)."""
    previous = UpstreamHealthSample.objects.filter(upstream=upstream).order_by("-taken_at", "-pk").first()
    try:
        if client is None:
            with httpx.Client(timeout=SCRAPE_TIMEOUT_SECONDS) as own:
                response = own.get(metrics_url(upstream.base_url))
        else:
            response = client.get(metrics_url(upstream.base_url))
        response.raise_for_status()
        reading = parse_reading(response.text)
        if reading.running is None and reading.waiting is None and reading.kv_cache_usage is None:
            raise ValueError("no vLLM metrics in the response")
    except Exception as exc:  # anything the upstream sends back is a sample, never a failed task
        return UpstreamHealthSample.objects.create(upstream=upstream, taken_at=now or timezone.now(), ok=False,
                                                   error=_error_text(exc))
    taken_at = now or timezone.now()
    per_second, ttft = rates(reading, taken_at, previous)
    return UpstreamHealthSample.objects.create(
        upstream=upstream, taken_at=taken_at, ok=True,
        running=None if reading.running is None else int(reading.running),
        waiting=None if reading.waiting is None else int(reading.waiting),
        kv_cache_usage=reading.kv_cache_usage, generation_tokens_total=reading.generation_tokens_total,
        ttft_sum=reading.ttft_sum, ttft_count=reading.ttft_count,
        generation_tokens_per_second=per_second, ttft_mean_seconds=ttft)


def upstream_health_scrape_all(*, now: datetime | None = None) -> int:
    """Sample every enabled upstream, then delete samples older than 24 h. Returns how many were sampled."""
    upstreams = list(Upstream.objects.filter(enabled=True).order_by("name"))
    with httpx.Client(timeout=SCRAPE_TIMEOUT_SECONDS) as client:
        for upstream in upstreams:
            upstream_health_sample(upstream=upstream, client=client, now=now)
    UpstreamHealthSample.objects.filter(taken_at__lt=(now or timezone.now()) - KEEP).delete()
    return len(upstreams)


# --- reads for the pages ------------------------------------------------------------------

def health_latest() -> list[tuple[Upstream, UpstreamHealthSample | None]]:
    """Each enabled upstream with its newest sample (two queries)."""
    newest = UpstreamHealthSample.objects.filter(upstream=OuterRef("pk")).order_by("-taken_at", "-pk").values("pk")[:1]
    upstreams = list(Upstream.objects.filter(enabled=True).annotate(latest_id=Subquery(newest)).order_by("name"))
    ids = [u.latest_id for u in upstreams if u.latest_id]
    samples = {s.pk: s for s in UpstreamHealthSample.objects.filter(pk__in=ids)} if ids else {}
    return [(u, samples.get(u.latest_id)) for u in upstreams]


def health_history(*, since: timedelta = timedelta(hours=1), now: datetime | None = None,
                   limit: int = 500) -> list[UpstreamHealthSample]:
    """The enabled upstreams' samples of the last hour, oldest first (one query, at most `limit` rows)."""
    start = (now or timezone.now()) - since
    rows = (UpstreamHealthSample.objects.filter(upstream__enabled=True, taken_at__gte=start)
            .select_related("upstream").order_by("-taken_at", "-pk")[:limit])
    return list(reversed(list(rows)))
