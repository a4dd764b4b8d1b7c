"""The GPU health samples: vLLM's /metrics parsed with prometheus_client, rates from deltas, a down upstream recorded."""
from datetime import datetime, timedelta

import httpx
import pytest
from django.conf import settings
from django.utils import timezone

from proxy.health import (
    health_history, health_latest, metrics_url, parse_reading, rates, upstream_health_sample,
    upstream_health_scrape_all,
)
from proxy.models import UpstreamHealthSample
from proxy.simulator.testing import start_simulator
from proxy.tasks import upstream_health_scrape_task
from tenants.tests.factories import UpstreamFactory

UTC = timezone.get_fixed_timezone(0)
T0 = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)

V1_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen"} 3.0
vllm:num_requests_running{engine="1",model_name="qwen"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="qwen"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="qwen"} 0.25
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="qwen"} 1000.0
vllm:generation_tokens_created{engine="0",model_name="qwen"} 1.7e9
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="qwen"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="qwen"} 4.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="qwen"} 4.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="qwen"} 2.0
"""


# --- parsing and rates (no database) ----------------------------------------------------

def test_metrics_url_is_beside_v1():
    assert metrics_url("http://gpu:8000/v1") == "http://gpu:8000/metrics"
    assert metrics_url("http://gpu:8000/v1/") == "http://gpu:8000/metrics"
    assert metrics_url("https://host/vllm/v1") == "https://host/vllm/metrics"
    assert metrics_url("http://gpu:8000") == "http://gpu:8000/metrics"


def test_parse_sums_engines_and_averages_kv_cache():
    reading = parse_reading(V1_TEXT)
    assert (reading.running, reading.waiting, reading.kv_cache_usage) == (4.0, 2.0, 0.375)
    assert (reading.generation_tokens_total, reading.ttft_sum, reading.ttft_count) == (1000.0, 2.0, 4.0)


def test_parse_falls_back_to_the_legacy_kv_cache_name():
    text = ("# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{engine=\"0\"} 0.8\n"
            "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n")
    reading = parse_reading(text)
    assert reading.kv_cache_usage == 0.8 and reading.generation_tokens_total is None


def test_parse_refuses_what_is_not_prometheus_text():
    with pytest.raises(ValueError):
        parse_reading("vllm:num_requests_running{ this is not it\n")


def _sample(**fields):
    return UpstreamHealthSample(**{"ok": True, "taken_at": T0, **fields})


def test_rates_are_deltas_since_the_previous_sample():
    reading = parse_reading(V1_TEXT)
    previous = _sample(generation_tokens_total=400.0, ttft_sum=1.0, ttft_count=2.0)
    per_second, ttft = rates(reading, T0 + timedelta(seconds=60), previous)
    assert per_second == 10.0 and ttft == 0.5  # 600 tokens in 60 s; 1.0 s over 2 requests


@pytest.mark.parametrize("previous", [None, _sample(ok=False), _sample(generation_tokens_total=5000.0,
                                                                        ttft_sum=9.0, ttft_count=9.0)])
def test_rates_unknown_without_a_good_previous_sample_or_after_a_restart(previous):
    assert rates(parse_reading(V1_TEXT), T0 + timedelta(seconds=60), previous) == (None, None)


def test_no_new_first_token_means_no_ttft():
    previous = _sample(generation_tokens_total=1000.0, ttft_sum=2.0, ttft_count=4.0)
    assert rates(parse_reading(V1_TEXT), T0 + timedelta(seconds=30), previous) == (0.0, None)


# --- against the live simulator ---------------------------------------------------------

@pytest.fixture(scope="module")
def sim():
    with start_simulator("--model", "qwen-health", "--ttft-ms", "20", "--itl-ms", "2") as handle:
        yield handle


@pytest.mark.django_db
def test_scrape_the_live_simulator_and_rates_after_a_request(sim):
    upstream = UpstreamFactory(name="sim", base_url=sim.base_url)
    first = upstream_health_sample(upstream=upstream)
    assert first.ok and first.error == "" and first.running == 0 and first.waiting == 0
    assert 0 <= first.kv_cache_usage <= 1 and first.generation_tokens_per_second is None
    before = sim.metrics()["vllm:generation_tokens_total"]
    response = httpx.post(f"{sim.base_url}/chat/completions", timeout=10, json={
        "model": "qwen-health", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200
    generated = sim.metrics()["vllm:generation_tokens_total"] - before
    second = upstream_health_sample(upstream=upstream)
    assert second.ok and second.generation_tokens_total - first.generation_tokens_total == generated > 0
    assert second.generation_tokens_per_second > 0
    assert 0 < second.ttft_mean_seconds < 5 and second.ttft_count == first.ttft_count + 1


@pytest.mark.django_db
def test_a_down_upstream_is_a_sample_with_the_error():
    with start_simulator() as gone:
        url = gone.base_url
    upstream = UpstreamFactory(name="gone", base_url=url)  # stopped: connection refused
    sample = upstream_health_sample(upstream=upstream)
    assert not sample.ok and sample.error.startswith("unreachable: ConnectError")
    assert sample.running is None and sample.kv_cache_usage is None


@pytest.mark.django_db
@pytest.mark.parametrize("handler,error", [
    (lambda request: httpx.Response(500, text="boom"), "HTTP 500 from /metrics"),
    (lambda request: httpx.Response(200, text="<html>a login page</html>"), "unreadable metrics"),
    (lambda request: httpx.Response(200, text="# TYPE up gauge\nup 1\n"), "no vLLM metrics"),
    (lambda request: (_ for _ in ()).throw(httpx.ReadTimeout("slow")), "timed out"),
])
def test_a_broken_upstream_is_a_sample_with_the_error(handler, error):
    upstream = UpstreamFactory(name="broken")
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        sample = upstream_health_sample(upstream=upstream, client=client)
    assert not sample.ok and error in sample.error and len(sample.error) <= 300


@pytest.mark.django_db
def test_task_samples_enabled_upstreams_and_keeps_24_hours(sim):
    live = UpstreamFactory(name="sim", base_url=sim.base_url)
    off = UpstreamFactory(name="off", base_url=sim.base_url, enabled=False)
    old = UpstreamHealthSample.objects.create(upstream=live, taken_at=timezone.now() - timedelta(hours=25), ok=True)
    recent = UpstreamHealthSample.objects.create(upstream=live, taken_at=timezone.now() - timedelta(hours=23),
                                                 ok=True)
    assert upstream_health_scrape_task() == 1
    assert not UpstreamHealthSample.objects.filter(pk=old.pk).exists()
    assert UpstreamHealthSample.objects.filter(pk=recent.pk).exists()
    assert UpstreamHealthSample.objects.filter(upstream=live).count() == 2
    assert not UpstreamHealthSample.objects.filter(upstream=off).exists()


def test_the_task_runs_every_minute():
    entry = next(e for e in settings.CELERY_BEAT_SCHEDULE.values()
                 if e["task"] == "proxy.tasks.upstream_health_scrape_task")
    assert str(entry["schedule"]._orig_minute) == "*" and str(entry["schedule"]._orig_hour) == "*"


@pytest.mark.django_db
def test_latest_and_history_reads_are_bounded(django_assert_num_queries):
    now = timezone.now()
    for name in ("a", "b", "c"):
        upstream = UpstreamFactory(name=name)
        UpstreamHealthSample.objects.bulk_create([
            UpstreamHealthSample(upstream=upstream, taken_at=now - timedelta(minutes=m), ok=True, running=m)
            for m in range(90)])
    with django_assert_num_queries(2):
        latest = health_latest()
    assert [(u.name, s.running) for u, s in latest] == [("a", 0), ("b", 0), ("c", 0)]
    with django_assert_num_queries(1):
        history = health_history(now=now)
    assert len(history) == 3 * 61 and history[0].taken_at <= history[-1].taken_at


@pytest.mark.django_db
def test_team_page_with_a_down_upstream_is_no_500(client):
    from tenants.models import Member
    from tenants.services import member_add, team_create

    team = team_create(slug="lab", name="Lab")
    member_add(team=team, username="boss", password="pw-boss-123", role=Member.Role.ADMIN)
    upstream = UpstreamFactory(name="gone", base_url="http://127.0.0.1:9/v1")
    upstream_health_scrape_all()
    client.login(username="boss", password="pw-boss-123")
    response = client.get("/team/")
    assert response.status_code == 200
    assert "unreachable" in response.content.decode() and UpstreamHealthSample.objects.get(upstream=upstream).error
