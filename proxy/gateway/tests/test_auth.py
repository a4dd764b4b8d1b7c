"""Keys that stop working stop within the documented cache time on every worker; guessing keys is throttled."""
import time
from datetime import timedelta

import httpx
import pytest
from django.utils import timezone

from proxy.gateway.tests.conftest import MODEL, GatewayProcess, make_world
from tenants.models import ApiKey
from tenants.services import api_key_issue, api_key_revoke, member_update

pytestmark = pytest.mark.django_db(transaction=True)
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
CACHE_SECONDS = 1.0  # QWENHUB_KEY_CACHE_SECONDS of the test gateways


def _status(url: str, key: str) -> int:
    return httpx.post(url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"},
                      timeout=10).status_code


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, django_db_setup, django_db_blocker):
    process = GatewayProcess(tmp_path_factory.mktemp("two-workers"), workers=2)
    yield process
    process.stop()


def _warm(url: str, key: str, n: int = 20) -> None:
    """Enough requests that both workers have the key in their caches."""
    assert [_status(url, key) for _ in range(n)] == [200] * n


@pytest.mark.parametrize("how", ["revoked", "member suspended", "user deactivated"])
def test_a_key_stops_on_every_worker_within_the_cache_time(two_workers, sim, how):
    world = make_world(two_workers, sim.base_url)
    _warm(two_workers.url, world.key)
    if how == "revoked":
        api_key_revoke(key=ApiKey.objects.get(member=world.member), reason="test")
    elif how == "member suspended":
        member_update(member=world.member, data={"is_active": False}, reason="test")
    else:
        world.member.user.is_active = False
        world.member.user.save(update_fields=["is_active"])
    time.sleep(CACHE_SECONDS + 0.3)
    assert [_status(two_workers.url, world.key) for _ in range(20)] == [401] * 20


def test_an_expiry_set_in_advance_stops_the_key_at_once(two_workers, sim):
    world = make_world(two_workers, sim.base_url)
    key, raw = api_key_issue(member=world.member, label="short")
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() + timedelta(seconds=2))
    _warm(two_workers.url, raw, 6)
    time.sleep(max(0.0, (ApiKey.objects.get(pk=key.pk).expires_at - timezone.now()).total_seconds()) + 0.05)
    assert [_status(two_workers.url, raw) for _ in range(10)] == [401] * 10


@pytest.fixture
def strict_gateway(tmp_path):
    process = GatewayProcess(tmp_path, QWENHUB_BAD_KEYS_PER_MINUTE="5")
    yield process
    process.stop()


def test_guessing_keys_is_throttled_but_known_keys_keep_working(strict_gateway, sim):
    world = make_world(strict_gateway, sim.base_url)
    url = strict_gateway.url
    assert _status(url, world.key) == 200  # this process now knows the key
    _, never_used = api_key_issue(member=world.member, label="new")
    guesses = [world.key[:-4] + f"{i:04d}" for i in range(7)]
    # 5 bad keys a minute: the gateway's start-up probe (no key) was the first
    assert [_status(url, g) for g in guesses[:4]] == [401] * 4
    refused = httpx.post(url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {guesses[5]}"})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "too_many_failed_authentications"
    assert _status(url, world.key) == 200  # a key seen valid before still passes
    assert _status(url, never_used) == 429  # a key the process has not seen waits for the window
