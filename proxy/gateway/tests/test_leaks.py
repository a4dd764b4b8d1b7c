"""A canary key and a canary prompt sent through every /v1 path appear nowhere they should not.

Nowhere: the gateway's log (at DEBUG), the database (a pg_dump of the whole test database),
Redis (every key and value of the gateway's db), mail sent, the Django admin's pages. The key's
hash and its short display prefix are stored by design; the raw key and the prompt never are.
"""
import subprocess

import httpx
import pytest
import redis
from django.conf import settings
from django.core import mail
from django.db import connection

from proxy.gateway.tests.conftest import MODEL, make_world, wait_for
from tenants.models import ApiKey

pytestmark = pytest.mark.django_db(transaction=True)
PROMPT = "CANARY-PROMPT-7f3a9c-please-never-store-me"


def _post(world, key, body, **kwargs):
    with httpx.Client(base_url=world.gateway.url, timeout=10) as client:
        return client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, **kwargs)


def _every_path(world, sim):
    """Success, streamed success, each refusal, a disconnect, the quota, the upstream failing and unreachable."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    seen = [_post(world, world.key, chat).status_code,
            _post(world, world.key, {**chat, "stream": True}).status_code,
            _post(world, world.key, {**chat, "max_tokens": 10**9}).status_code,            # over the context
            _post(world, world.key, {**chat, "temperature": PROMPT}).status_code,          # passed on as it is
            _post(world, world.key, {**chat, "model": PROMPT}).status_code,                # unknown model
            _post(world, world.key[:-1] + "x", chat).status_code,                          # wrong key
            _post(world, PROMPT, chat).status_code]                                        # a prompt as the key
    with httpx.Client(base_url=world.gateway.url, timeout=10) as client:             # client gone mid-stream
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True, "max_tokens": 200},
                           headers={"Authorization": f"Bearer {world.key}"}) as streaming:
            next(streaming.iter_raw())
    seen.append(_post(world, world.member_over_quota_key, chat).status_code)             # quota exhausted
    seen.append(_post(world, world.member_over_quota_key, chat).status_code)
    sim.control(fault="500")                                                          # upstream failing
    seen.append(_post(world, world.key, chat).status_code)
    sim.control(fault="refuse")                                                      # upstream unreachable
    seen.append(_post(world, world.key, chat).status_code)
    sim.control(fault=None)
    return seen


@pytest.fixture
def canary_world(gateway, sim):
    from tenants.services import api_key_issue, member_add

    from tenants.models import Member

    world = make_world(gateway, sim.base_url, request_quota=1000)
    # rate limits on, so the gateway keeps state in Redis that the search below reads
    Member.objects.filter(pk=world.member.pk).update(requests_per_minute=1000, tokens_per_minute=10**8)
    over = member_add(team=world.team, username=f"{world.member.user.username}-over", request_quota=1)
    world.member_over_quota_key = api_key_issue(member=over, label="canary")[1]
    return world


def _database_dump() -> str:
    db = settings.DATABASES["default"]
    return subprocess.run(["pg_dump", "--data-only", "-h", db["HOST"] or "127.0.0.1", "-p", str(db["PORT"] or 5432),
                           "-U", db["USER"], db["NAME"]], check=True, capture_output=True, text=True).stdout


def _redis_dump() -> str:
    client = redis.Redis.from_url(settings.REDIS_URL)
    parts = []
    for key in client.scan_iter(count=1000):
        parts.append(repr(key))
        kind = client.type(key)
        if kind == b"string":
            parts.append(repr(client.get(key)))
        elif kind == b"hash":
            parts.append(repr(client.hgetall(key)))
        elif kind == b"zset":
            parts.append(repr(client.zrange(key, 0, -1, withscores=True)))
        elif kind == b"list":
            parts.append(repr(client.lrange(key, 0, -1)))
        elif kind == b"set":
            parts.append(repr(client.smembers(key)))
        elif kind == b"stream":
            parts.append(repr(client.xrange(key)))
    return "\n".join(parts)


def test_canaries_leave_no_trace(canary_world, sim, admin_client):
    world = canary_world
    statuses = _every_path(world, sim)
    assert statuses == [200, 200, 400, 200, 404, 401, 401, 200, 429, 502, 503], statuses
    # the rows were written (so the checks below look at a database that holds this traffic)
    assert wait_for(lambda: world.member.usage_records.count() >= 5)
    raw_key = world.key
    stored = ApiKey.objects.get(member=world.member)
    assert stored.key_hash and raw_key not in stored.key_hash

    log = world.gateway.log_text()
    assert "chat/completions" in log or "request" in log  # the log does record the traffic
    dump, cache = _database_dump(), _redis_dump()
    assert f"\t{stored.prefix}\t" in dump, (settings.DATABASES["default"]["NAME"], len(dump))  # it holds the traffic
    assert cache  # the rate limits' state
    pages = "".join(admin_client.get(url).content.decode() for url in (
        "/admin/billing/usagerecord/", f"/admin/billing/usagerecord/{world.member.usage_records.first().pk}/change/",
        "/admin/tenants/apikey/", f"/admin/tenants/apikey/{stored.pk}/change/", "/admin/tenants/auditevent/",
        "/admin/tenants/quotacounter/"))
    assert stored.prefix in pages  # the admin shows keys by their prefix
    for where, text in (("gateway log", log), ("database", dump), ("redis", cache), ("admin pages", pages),
                        ("mail", "".join(m.body for m in mail.outbox))):
        assert PROMPT not in text, f"the canary prompt is in the {where}"
        assert raw_key not in text and raw_key[len(stored.prefix):] not in text, f"the canary key is in the {where}"
    connection.close()
