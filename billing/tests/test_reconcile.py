"""`manage.py reconcile`: clean after real traffic through the gateway and the simulator, dirty after faults."""
import asyncio
import signal
from datetime import timedelta
from io import StringIO

import openai
import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from billing.models import UsageRecord
from proxy.gateway.keys import KeyInfo
from proxy.gateway.ledger.postgres import PostgresLedger
from proxy.gateway.tests.conftest import (  # noqa: F401 - fixtures
    MODEL, SERVED, GatewayProcess, gateway, make_world, sim, wait_for, world)
from proxy.simulator.testing import start_simulator
from tenants.models import QuotaCounter, QuotaReservation
from tenants.tests.factories import TeamFactory
from tenants.services.reservations import reservations_sweep

MESSAGES = [{"role": "user", "content": "Count to three."}]


def _reconcile(*args) -> str:
    out = StringIO()
    call_command("reconcile", *args, stdout=out)
    return out.getvalue()


def _dirty(*args) -> str:
    out = StringIO()
    with pytest.raises(CommandError) as failed:
        call_command("reconcile", *args, stdout=out)
    assert failed.value.returncode == 1 and "mismatch" in str(failed.value)
    return out.getvalue()


def _traffic(world, n: int = 3) -> None:
    client = world.client()
    for i in range(n):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4 + i)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert wait_for(lambda: UsageRecord.objects.filter(member=world.member).count() == n + 1)


def _key(world) -> KeyInfo:
    member, team = world.member, world.team
    return KeyInfo(key_id=member.api_keys.get().pk, member_id=member.pk, team_id=team.pk,
                   username=member.user.username, team_timezone=team.timezone, team_token_cap=team.token_cap,
                   usable=True, expires_at=None, request_quota=member.request_quota, token_quota=member.token_quota,
                   requests_per_minute=None, tokens_per_minute=None, max_concurrent_requests=None, weight=1,
                   allowed_model_ids=frozenset())


def test_clean_after_normal_traffic_including_the_upstreams_generated_tokens(world, sim, tmp_path):
    baseline = tmp_path / "baseline.json"
    metrics = sim.root_url + "/metrics"
    assert "Baseline saved" in _reconcile(world.team.slug, "--metrics-url", metrics, "--save-baseline", baseline)
    _traffic(world)
    out = _reconcile(world.team.slug, "--metrics-url", metrics, "--baseline", baseline,
                     "--upstream", world.upstream.name)
    assert "the counters agree with the usage rows" in out and "MISMATCH" not in out


def test_dirty_after_a_tampered_counter(world):
    _traffic(world, 1)
    counter = QuotaCounter.objects.get(member=world.member)
    QuotaCounter.objects.filter(pk=counter.pk).update(tokens_used=counter.tokens_used + 5, requests_reserved=1)
    out = _dirty(world.team.slug)
    name = world.member.user.username
    assert f"MISMATCH {name} tokens_used: expected {counter.tokens_used}, found {counter.tokens_used + 5}" in out
    assert f"MISMATCH {name} requests_reserved: expected 0, found 1" in out


def test_dirty_when_the_upstream_generated_tokens_no_usage_row_has(world, sim, tmp_path):
    baseline = tmp_path / "baseline.json"
    metrics = sim.root_url + "/metrics"
    _reconcile(world.team.slug, "--metrics-url", metrics, "--save-baseline", baseline)
    _traffic(world, 1)
    UsageRecord.objects.filter(member=world.member).update(completion_tokens=0)  # the rows lost their tokens
    out = _dirty(world.team.slug, "--metrics-url", metrics, "--baseline", baseline)
    assert "vllm:generation_tokens_total" in out and "expected 0" in out


def test_a_killed_request_is_in_flight_then_stale_until_the_sweep(world):
    """The reservation committed, then the gateway process died: no settlement will ever come."""
    _traffic(world, 1)
    key = _key(world)

    async def reserve_and_die():
        ledger = PostgresLedger()
        try:
            return await ledger.reserve(key=key, tokens=300)
        finally:
            await ledger.close()

    reservation = asyncio.run(reserve_and_die())
    assert "agree" in _reconcile(world.team.slug)  # a request in flight, as far as anyone can tell
    QuotaReservation.objects.filter(pk=reservation.reservation_id).update(
        created_at=timezone.now() - timedelta(days=1))  # ... for longer than any request can run
    out = _dirty(world.team.slug)
    assert "reservations older than" in out and "found 1" in out
    [swept] = reservations_sweep()
    assert (swept["requests"], swept["tokens"]) == (1, 300)
    assert "agree" in _reconcile(world.team.slug)
    counter = QuotaCounter.objects.get(member=world.member)
    assert (counter.requests_reserved, counter.tokens_reserved, counter.reservations_swept) == (0, 0, 1)


def test_a_gateway_killed_mid_stream_leaves_a_reservation_the_sweep_gives_back(transactional_db, tmp_path):
    """SIGKILL a gateway process while it streams: no usage row, a reservation only the sweep can give back."""
    with start_simulator("--model", SERVED, "--itl-ms", "100") as slow:
        doomed = GatewayProcess(tmp_path)
        try:
            victim = make_world(doomed, slow.base_url)
            client = openai.OpenAI(base_url=doomed.url + "/v1", api_key=victim.key, max_retries=0, timeout=10)
            stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200, stream=True)
            next(iter(stream))  # streaming has begun: the reservation is committed
            doomed.proc.send_signal(signal.SIGKILL)
            doomed.proc.wait(timeout=10)
        finally:
            doomed.stop()
    assert not UsageRecord.objects.filter(member=victim.member).exists()
    counter = QuotaCounter.objects.get(member=victim.member)
    assert counter.requests_reserved == 1 and counter.tokens_reserved > 200
    assert "agree" in _reconcile(victim.team.slug)  # in flight, as far as anyone can tell yet
    QuotaReservation.objects.filter(counter=counter).update(created_at=timezone.now() - timedelta(hours=1))
    assert "reservations older than" in _dirty(victim.team.slug)
    assert reservations_sweep()[0]["tokens"] == counter.tokens_reserved
    assert "agree" in _reconcile(victim.team.slug)


@pytest.mark.django_db
def test_refuses_an_unknown_team_and_a_bad_month():
    with pytest.raises(CommandError, match="No team"):
        call_command("reconcile", "nobody")
    team = TeamFactory()
    with pytest.raises(CommandError, match="YYYY-MM"):
        call_command("reconcile", team.slug, "--month", "2026-13")
    with pytest.raises(CommandError, match="need --metrics-url"):
        call_command("reconcile", team.slug, "--baseline", "/nonexistent")
