"""The gateway's PostgreSQL pool: cheap when healthy, a clear 503 when not, nothing lost across a restart."""
import asyncio

import asyncpg
import psycopg
import pytest
from django.db import connection
from django.test import override_settings

from billing.models import UsageRecord
from proxy.gateway.db import DatabaseUnavailable
from proxy.gateway.ledger.combiner import Combiner
from proxy.gateway.ledger.pool import AsyncPostgres, numbered
from proxy.gateway.tests.conftest import MODEL, make_world, wait_for
from tenants.models import QuotaCounter

MESSAGES = [{"role": "user", "content": "Say hi."}]

APP = "qwenhub-gateway"


def _kill_gateway_connections(pid: int | None = None, wait_ms: int = 0) -> int:
    """Terminate hot-path pool connections to the test database (all, or one backend), as a restart would.

    With `wait_ms` each termination waits until the backend has exited (its goodbye is sent).
    """
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True) as admin:
        return admin.execute(
            "SELECT count(pg_terminate_backend(pid, %s)) FROM pg_stat_activity WHERE application_name = %s "
            "AND datname = %s AND (%s::int IS NULL OR pid = %s::int)",
            [wait_ms, APP, connection.settings_dict["NAME"], pid, pid]).fetchone()[0]


def test_numbered_placeholders():
    assert numbered("UPDATE t SET a = %s WHERE b = %s AND c = %s") == "UPDATE t SET a = $1 WHERE b = $2 AND c = $3"
    assert numbered("SELECT 1") == "SELECT 1"


async def _select(conn, value):
    return await conn.fetchval("SELECT $1::int + 1", value)


@pytest.mark.django_db(transaction=True)
def test_pool_reuses_connections_and_replaces_a_dead_one():
    async def run():
        pg = AsyncPostgres()
        try:
            assert await pg.run(_select, 1) == 2
            first = pg.free[-1]
            assert await pg.run(_select, 2) == 3
            assert pg.free == [first]  # one connection, reused
            assert await asyncio.to_thread(_kill_gateway_connections, first.get_server_pid()) == 1
            # The dead connection is noticed (closed: dropped before use) or fails its statement (503);
            # either way the one after that runs on a new connection.
            try:
                await pg.run(_select, 3)
            except DatabaseUnavailable:
                pass
            assert await pg.run(_select, 4) == 5
            assert pg.free and first not in pg.free
        finally:
            await pg.close()

    asyncio.run(run())


@pytest.mark.django_db(transaction=True)
def test_a_connection_ended_while_idle_is_not_used():
    """The server's goodbye is waiting on the socket, unread (is_closed() is still False): a new connection runs it."""
    async def run():
        pg = AsyncPostgres()
        try:
            assert await pg.run(_select, 1) == 2
            first = pg.free[-1]
            # Called on the loop's thread, the loop cannot read the goodbye before the next run.
            assert _kill_gateway_connections(first.get_server_pid(), wait_ms=5000) == 1
            assert not first.is_closed()
            assert await pg.run(_select, 2) == 3
            assert first.is_closed() and first not in pg.free and len(pg.free) == 1
        finally:
            await pg.close()

    asyncio.run(run())


_REFUSED = "cannot switch to state 12; another operation (2) is in progress"  # asyncpg, after an idle goodbye


@pytest.mark.django_db(transaction=True)
def test_a_statement_refused_by_a_pooled_connection_runs_once_more_on_a_new_one():
    """asyncpg refuses to send on a connection that read the server's goodbye while idle: nothing reached the server."""
    async def run():
        pg = AsyncPostgres()
        calls = []

        async def refused_once(conn, value):
            calls.append(conn)
            if len(calls) == 1:
                raise asyncpg.exceptions.InternalClientError(_REFUSED)
            return await _select(conn, value)

        async def refused_always(conn, value):
            calls.append(conn)
            raise asyncpg.exceptions.InternalClientError(_REFUSED)

        try:
            await pg.run(_select, 1)
            pooled = pg.free[-1]
            assert await pg.run(refused_once, 2) == 3
            assert calls[0] is pooled and calls[1] is not pooled and pg.free == [calls[1]]
            assert pooled.is_closed()  # dropped
            calls.clear()
            with pytest.raises(DatabaseUnavailable):
                await pg.run(refused_always, 3)  # once more only, and a new connection's refusal is a 503
            assert len(calls) == 2 and calls[1] is not calls[0] and not pg.free
            assert pg._slots._value == pg.size
        finally:
            await pg.close()

    asyncio.run(run())


@pytest.mark.django_db(transaction=True)
@override_settings(QWENHUB_DB_POOL_SIZE=1, QWENHUB_DB_POOL_TIMEOUT=0.2)
def test_pool_exhausted_is_a_503_after_the_timeout():
    async def run():
        pg = AsyncPostgres()
        held = asyncio.Event()

        async def hold(conn):
            held.set()
            await asyncio.sleep(1)
            return "held"

        try:
            holder = asyncio.ensure_future(pg.run(hold))
            await held.wait()
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(DatabaseUnavailable):
                await pg.run(_select, 1)
            assert 0.15 < loop.time() - started < 0.8
            assert await holder == "held"
            assert await pg.run(_select, 1) == 2  # the slot came back
        finally:
            await pg.close()

    asyncio.run(run())


@pytest.mark.django_db(transaction=True)
def test_postgresql_unreachable_is_a_503():
    async def run():
        pg = AsyncPostgres()
        pg.connect_kwargs["port"] = 1  # nothing listens there
        with pytest.raises(DatabaseUnavailable):
            await pg.run(_select, 1)
        assert pg._slots._value == pg.size  # the failed connect gave its slot back

    asyncio.run(run())


def test_requests_survive_a_database_restart(transactional_db, gateway, sim):
    """After PostgreSQL drops the gateway's connections, requests succeed and every one is settled once."""
    world = make_world(gateway, sim.base_url, token_quota=100_000)
    client = world.client()
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3).usage
    assert _kill_gateway_connections() >= 1
    for _ in range(3):
        assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3).usage
    rows = UsageRecord.objects.filter(member=world.member, status=UsageRecord.Status.OK)
    assert wait_for(lambda: rows.count() == 4)
    counter = QuotaCounter.objects.get(member=world.member)
    assert (counter.requests_used, counter.requests_reserved, counter.tokens_reserved) == (4, 0, 0)
    assert counter.tokens_used == sum(r.total_tokens for r in rows)


def test_combiner_runs_a_lone_call_at_once_and_batches_what_waits():
    calls = []

    async def single(key, item):
        calls.append(("one", key, [item]))
        await asyncio.sleep(0.02)
        return item * 10

    async def many(key, items):
        calls.append(("many", key, list(items)))
        await asyncio.sleep(0.01)
        return [i * 10 for i in items]

    async def run():
        c = Combiner(single, many)
        first = await c.submit("k", 1)  # alone: at once
        results = await asyncio.gather(*(c.submit("k", i) for i in range(2, 7)), c.submit("other", 9))
        assert not c.waiting
        return first, results

    first, results = asyncio.run(run())
    assert first == 10 and results == [20, 30, 40, 50, 60, 90]
    assert calls == [("one", "k", [1]), ("one", "k", [2]), ("one", "other", [9]), ("many", "k", [3, 4, 5, 6])]


def test_combiner_fails_a_batch_together_and_hands_orphans_over():
    orphans = []

    async def single(key, item):
        await asyncio.sleep(0.02)
        return item

    async def many(key, items):
        if 99 in items:
            raise DatabaseUnavailable()
        await asyncio.sleep(0.01)
        return list(items)

    async def orphan(key, item, result):
        orphans.append((item, result))
        raise RuntimeError("the orphan handler failing does not hurt the others")

    async def run():
        c = Combiner(single, many, orphan)
        failed = await asyncio.gather(c.submit("k", 1), c.submit("k", 99), c.submit("k", 3), return_exceptions=True)
        tasks = [asyncio.ensure_future(c.submit("k", i)) for i in (4, 5, 6)]
        await asyncio.sleep(0.005)
        tasks[1].cancel()  # waits behind 4, will be combined with 6
        done = await asyncio.gather(*tasks, return_exceptions=True)
        while c.waiting:
            await asyncio.sleep(0.005)
        return failed, done

    failed, done = asyncio.run(run())
    assert failed[0] == 1 and all(isinstance(r, DatabaseUnavailable) for r in failed[1:])
    assert done[0] == 4 and isinstance(done[1], asyncio.CancelledError) and done[2] == 6
    assert orphans == [(5, 5)]
