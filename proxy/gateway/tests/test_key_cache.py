"""The gateway's key cache: one database lookup for many concurrent misses; last_used_at off the request."""
import asyncio
from datetime import timedelta
from unittest import mock

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from proxy.gateway import keys
from tenants.models import ApiKey
from tenants.services import api_key_issue, member_add, team_create


def test_concurrent_misses_share_one_lookup(transactional_db):
    team = team_create(slug="cache", name="Cache")
    member = member_add(team=team, username="many")
    _, raw = api_key_issue(member=member)
    keys.forget_all()

    async def run():
        return await asyncio.gather(*(keys.authenticate(raw) for _ in range(50)))

    with mock.patch.object(keys, "_load", wraps=keys._load) as load:
        infos = asyncio.run(run())
    assert load.call_count == 1
    assert {info.member_id for info in infos} == {member.pk}
    assert not keys._loading


def test_invalid_keys_never_reach_the_database(transactional_db):
    keys.forget_all()
    with mock.patch.object(keys, "_load", wraps=keys._load) as load:
        assert asyncio.run(keys.authenticate("qh_" + "A" * 49)) is None  # bad checksum
        assert asyncio.run(keys.authenticate("short")) is None
    assert load.call_count == 0


# --- last_used_at: noted on authentication, written in batches ---------------------------------

def _keys(n: int):
    team = team_create(slug="used", name="Used")
    member = member_add(team=team, username="user-of-keys")
    return [api_key_issue(member=member, label=f"k{i}") for i in range(n)]


@pytest.fixture
def pending():
    keys.forget_all()
    keys._last_used_pending.clear()
    yield keys._last_used_pending
    keys._last_used_pending.clear()


def test_authentication_writes_nothing_and_a_flush_writes_last_used_at(transactional_db, pending, settings):
    settings.QWENHUB_LAST_USED_FLUSH_SECONDS = 3600  # the background flush stays out of the way
    [(key, raw)] = _keys(1)

    async def run():
        for _ in range(3):  # a miss, then cached hits
            assert await keys.authenticate(raw) is not None
        return await keys.flush_last_used()

    with mock.patch.object(keys, "_write_last_used", wraps=keys._write_last_used) as write:
        async def authenticate_only():
            await keys.authenticate(raw)
            await keys.authenticate(raw)
        asyncio.run(authenticate_only())
        key.refresh_from_db()
        assert key.last_used_at is None and write.call_count == 0  # nothing on the request
        assert asyncio.run(run()) == 1
    assert write.call_count == 1
    key.refresh_from_db()
    assert key.last_used_at is not None and not pending


def test_a_key_used_on_cached_hits_gets_its_latest_use_written(transactional_db, pending, settings):
    settings.QWENHUB_LAST_USED_FLUSH_SECONDS = 3600
    settings.QWENHUB_KEY_CACHE_SECONDS = 3600
    [(key, raw)] = _keys(1)
    first, later = timezone.now() - timedelta(minutes=10), timezone.now() - timedelta(minutes=1)

    async def run():
        with mock.patch.object(keys.timezone, "now", return_value=first):
            await keys.authenticate(raw)  # the miss
        with mock.patch.object(keys, "_load", side_effect=AssertionError("cached")), \
                mock.patch.object(keys.timezone, "now", return_value=later):
            await keys.authenticate(raw)  # a hit
        await keys.flush_last_used()

    asyncio.run(run())
    key.refresh_from_db()
    assert key.last_used_at == later


def test_a_burst_of_100_authentications_is_one_statement(transactional_db, pending, settings):
    settings.QWENHUB_LAST_USED_FLUSH_SECONDS = 3600
    issued = _keys(5)

    async def burst():
        infos = await asyncio.gather(*(keys.authenticate(issued[i % 5][1]) for i in range(100)))
        assert all(infos)

    asyncio.run(burst())
    assert set(pending) == {key.pk for key, _ in issued}
    batch = dict(pending)
    with CaptureQueriesContext(connection) as queries:
        assert keys._write_last_used(batch) == 5  # what flush_last_used runs, in a database thread
    assert len(queries) == 1 and queries[0]["sql"].startswith("UPDATE")
    with mock.patch.object(keys, "_write_last_used", wraps=keys._write_last_used) as write:
        asyncio.run(burst())
        asyncio.run(keys.flush_last_used())
    assert write.call_count == 1


def test_a_flush_never_moves_last_used_at_backwards(transactional_db, pending):
    (newer, _), (older, _), (never, _) = _keys(3)
    now = timezone.now()
    ApiKey.objects.filter(pk=newer.pk).update(last_used_at=now)
    ApiKey.objects.filter(pk=older.pk).update(last_used_at=now - timedelta(hours=1))
    stale = now - timedelta(minutes=5)  # e.g. noted by another gateway process, flushed late
    assert keys._write_last_used({newer.pk: stale, older.pk: stale, never.pk: stale}) == 2
    assert dict(ApiKey.objects.values_list("pk", "last_used_at")) == {newer.pk: now, older.pk: stale,
                                                                       never.pk: stale}


def test_the_background_flush_writes_and_stop_flushes_what_is_left(transactional_db, pending, settings):
    settings.QWENHUB_LAST_USED_FLUSH_SECONDS = 0.05
    (first, raw1), (second, raw2) = _keys(2)

    async def run():
        await keys.authenticate(raw1)  # starts the flusher
        flusher = keys._flusher
        assert flusher is not None and not flusher.done()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not pending:
                break
        settings.QWENHUB_LAST_USED_FLUSH_SECONDS = 3600
        await asyncio.sleep(0.1)  # the flusher now sleeps for an hour
        await keys.authenticate(raw2)
        await keys.stop_last_used_flusher()
        return flusher

    flusher = asyncio.run(run())
    assert flusher.done() and keys._flusher is None and not pending
    assert all(ApiKey.objects.filter(pk__in=[first.pk, second.pk]).values_list("last_used_at", flat=True))


def test_a_failed_flush_keeps_the_times_for_the_next_one(transactional_db, pending):
    [(key, raw)] = _keys(1)
    pending[key.pk] = timezone.now()
    with mock.patch.object(keys, "_write_last_used", side_effect=RuntimeError("database down")):
        with pytest.raises(RuntimeError):
            asyncio.run(keys.flush_last_used())
    assert key.pk in pending
    assert asyncio.run(keys.flush_last_used()) == 1
