"""/metrics: who may scrape it, and the reservation sweep's counters (the sweep runs in the Celery worker)."""
import asyncio
from datetime import timedelta

import httpx
import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from proxy.gateway.keys import KeyInfo
from proxy.gateway.ledger.postgres import PostgresLedger
from proxy.gateway.observability import may_scrape
from tenants.models import QuotaReservation
from tenants.services.reservations import reservations_sweep


def _scope(host: str, authorization: bytes | None = None) -> dict:
    headers = [(b"authorization", authorization)] if authorization is not None else []
    return {"client": (host, 40000), "headers": headers}


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_without_a_token_loopback_may_scrape(settings, host):
    settings.QWENHUB_METRICS_TOKEN = ""
    assert may_scrape(_scope(host))


@pytest.mark.parametrize("host", ["10.0.0.7", "192.168.1.20", "172.17.0.1", "2001:db8::1", ""])
def test_without_a_token_nobody_else_may(settings, host):
    settings.QWENHUB_METRICS_TOKEN = ""
    assert not may_scrape(_scope(host))
    assert not may_scrape({"headers": []})  # no client address at all


@pytest.mark.parametrize("header", [b"x-forwarded-for", b"forwarded", b"x-real-ip"])
def test_without_a_token_a_request_forwarded_by_a_local_proxy_may_not(settings, header):
    """nginx on the same host forwards the world's requests from 127.0.0.1."""
    settings.QWENHUB_METRICS_TOKEN = ""
    assert not may_scrape({"client": ("127.0.0.1", 40000), "headers": [(header, b"203.0.113.9")]})


def test_with_a_token_everyone_needs_it_loopback_too(settings):
    settings.QWENHUB_METRICS_TOKEN = "scrape-secret"
    assert may_scrape(_scope("10.0.0.7", b"Bearer scrape-secret"))
    for host in ("10.0.0.7", "127.0.0.1"):
        assert not may_scrape(_scope(host))
        assert not may_scrape(_scope(host, b"Bearer scrape-secreT"))
        assert not may_scrape(_scope(host, b"scrape-secret"))


def _samples(world) -> dict[str, float]:
    text = httpx.get(world.gateway.url + "/metrics", timeout=5).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_what_the_sweep_gave_back(world):
    member, team = world.member, world.team
    key = KeyInfo(key_id=member.api_keys.get().pk, member_id=member.pk, team_id=team.pk, username="x",
                  team_timezone=team.timezone, team_token_cap=None, usable=True, expires_at=None,
                  request_quota=None, token_quota=None, requests_per_minute=None, tokens_per_minute=None,
                  max_concurrent_requests=None, weight=1, allowed_model_ids=frozenset())

    async def reserve_twice():  # two requests whose process died after reserving
        ledger = PostgresLedger()
        try:
            return [await ledger.reserve(key=key, tokens=tokens) for tokens in (120, 80)]
        finally:
            await ledger.close()

    before = _samples(world)
    assert before["qwenhub_reservations_swept_total"] == 0
    asyncio.run(reserve_twice())
    QuotaReservation.objects.update(created_at=timezone.now() - timedelta(hours=2))
    assert sum(row["requests"] for row in reservations_sweep()) == 2
    after = _samples(world)
    assert after["qwenhub_reservations_swept_total"] == 2
    assert after["qwenhub_reservation_tokens_swept_total"] == 200
