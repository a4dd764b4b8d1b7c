"""The shared Redis link: one client per URL for rate limits and the fair queue, one failure policy.

Uses the rate limits' test database (flushed before each test); no SQL database.
"""
import asyncio
import logging
import os

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.gateway.fairness import FairQueue
from proxy.gateway.keys import KeyInfo
from proxy.gateway.limits import RateLimiter
from proxy.gateway.redis_link import Fallback, RedisLink, Replay

URL = os.environ.get("TEST_REDIS_LIMITS_URL", "redis://127.0.0.1:6379/10")
log = logging.getLogger("qwenhub.test")


@pytest.fixture(autouse=True)
def _flush():
    redis.Redis.from_url(URL).flushdb()
    yield
    assert RedisLink._shared == {}, "a link was left open"


def _key(member_id: int = 1, **limits) -> KeyInfo:
    return KeyInfo(key_id=1, member_id=member_id, team_id=1, username="u", team_timezone="UTC", team_token_cap=None,
                   usable=True, expires_at=None, request_quota=None, token_quota=None,
                   requests_per_minute=limits.get("rpm"), tokens_per_minute=limits.get("tpm"),
                   max_concurrent_requests=limits.get("conc"), weight=1, allowed_model_ids=frozenset())


def connected(client) -> int:
    """Open connections of a client's pool (idle or in use)."""
    pool = client.connection_pool
    return sum(c.is_connected for c in [*pool._available_connections, *pool._in_use_connections])


# --- one client per URL ---------------------------------------------------------------------
def test_rate_limits_and_fair_queue_share_one_client():
    async def main():
        limiter = RateLimiter(URL)
        queue = FairQueue(URL)
        client = limiter.link.client
        assert queue.link.client is client and limiter.redis is client
        assert queue._redis.listener.client is client  # pub/sub: its own connection from the same pool
        other = RateLimiter("redis://127.0.0.1:1/0")  # another URL, another client
        assert other.link.client is not client
        await other.close()

        admission = await limiter.admit(_key(conc=1), "r1", 10)
        assert not admission.local
        holder = await queue.acquire(upstream_id=1, capacity=1, member_id=1)
        waiter = asyncio.create_task(queue.acquire(upstream_id=1, capacity=1, member_id=2))  # via pub/sub
        while not redis.Redis.from_url(URL).hlen("qh:fq:{1}:wait"):
            await asyncio.sleep(0.005)
        await queue.release(holder)
        await queue.release(await asyncio.wait_for(waiter, 2.0))
        await limiter.settle(admission, 10)

        await limiter.close()  # the fair queue still uses the client
        await limiter.close()  # (again: harmless, the link counts each user once)
        assert RedisLink._shared and queue.fallback.errors_total == 0
        slot = await queue.acquire(upstream_id=1, capacity=1, member_id=1)
        await queue.release(slot)
        assert connected(client) >= 1
        await queue.close()  # the last user: the client is closed
        await queue.close()
        assert connected(client) == 0 and RedisLink._shared == {}
        assert not queue._tasks.tasks and queue._redis.listener.task is None

    asyncio.run(main())
    r = redis.Redis.from_url(URL)
    assert r.zcard("qh:rl:1:c") == 0 and r.zcard("qh:fq:{1}:held") == 0


def test_closing_in_the_other_order_keeps_the_limiter_working():
    async def main():
        limiter, queue = RateLimiter(URL), FairQueue(URL)
        await queue.release(await queue.acquire(upstream_id=1, capacity=16, member_id=1))  # kept slot
        await queue.close()  # gives the kept slot back, the limiter still holds the link
        assert redis.Redis.from_url(URL).zcard("qh:fq:{1}:held") == 0
        admission = await limiter.admit(_key(rpm=10), "r1", 1)
        assert not admission.local
        await limiter.settle(admission, 1)
        client = limiter.link.client
        await limiter.close()
        assert connected(client) == 0

    asyncio.run(main())


def test_without_redis_no_link_is_opened():
    async def main():
        for user in (RateLimiter(None), FairQueue(None), FairQueue(URL, enabled=False)):
            assert user.link is None
            await user.close()
        assert RedisLink._shared == {}

    asyncio.run(main())


# --- the failure policy ----------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_fallback_window_and_warning_rate(caplog):
    clock = Clock()
    fallback = Fallback(log, "Redis unavailable (%(kind)s: %(error)s), %(kind)s", retry_interval=5.0,
                        warn_interval=30.0, clock=clock)
    assert fallback.usable()
    with caplog.at_level(logging.WARNING, logger="qwenhub.test"):
        fallback.failed(RedisConnectionError("refused"))
        assert not fallback.usable() and fallback.down_until == 1005.0
        clock.now = 1004.9
        assert not fallback.usable()
        clock.now = 1005.0
        assert fallback.usable()  # the window is over: try Redis again
        for t in (1006.0, 1020.0, 1029.9):  # failures within 30 s of the warning: counted, not logged
            clock.now = t
            fallback.failed(TimeoutError())
            assert not fallback.usable() and fallback.down_until == t + 5.0
        clock.now = 1030.0
        fallback.failed(OSError("reset"))
        clock.now = 1031.0
        fallback.failed(OSError("reset"))
    messages = [rec.getMessage() for rec in caplog.records]
    assert messages == ["Redis unavailable (ConnectionError: refused), ConnectionError",
                        "Redis unavailable (OSError: reset), OSError"]
    assert fallback.errors_total == 6 and fallback.degraded_total == 0
    fallback.degraded()
    assert fallback.degraded_total == 1


def test_each_user_keeps_its_own_windows_and_counters():
    limiter, queue = RateLimiter(None), FairQueue(None)
    assert (limiter.fallback.retry_interval, limiter.fallback.warn_interval) == (5.0, 30.0)
    assert (queue.fallback.retry_interval, queue.fallback.warn_interval) == (5.0, 30.0)
    assert limiter.fallback is not queue.fallback
    queue.redis_retry_interval = 0.3
    assert queue.fallback.retry_interval == 0.3 and limiter.fallback.retry_interval == 5.0


def test_rate_limiter_warns_once_per_interval_while_redis_is_down(caplog):
    async def main():
        limiter = RateLimiter("redis://127.0.0.1:1/0")
        for i in range(3):
            limiter.fallback.down_until = 0.0  # retry Redis at once (the window itself is tested above)
            assert (await limiter.admit(_key(rpm=100), f"r{i}", 1)).local
        assert limiter.degraded_total == 3
        await limiter.close()

    with caplog.at_level(logging.WARNING, logger="qwenhub.gateway"):
        asyncio.run(main())
    assert [rec.getMessage() for rec in caplog.records] == [
        "Redis unavailable (ConnectionError): rate limits are per process until it is back"]


# --- the replay queue ------------------------------------------------------------------------
def test_replay_queue_is_bounded_and_keeps_what_fails():
    async def main():
        replay = Replay(3)
        assert [replay.add(i, "x") for i in range(5)] == [True, True, True, False, False]
        assert len(replay) == 3 and replay.dropped_total == 2
        sent = []

        async def send(i, _):
            if i == 1 and not sent.count("boom"):
                sent.append("boom")
                raise RedisConnectionError("again")
            sent.append(i)

        try:
            await replay.drain(send)
        except RedisConnectionError:
            pass
        else:
            raise AssertionError("the failure did not propagate")
        assert sent == [0, "boom"] and list(replay.items) == [(1, "x"), (2, "x")] and not replay.draining
        await replay.drain(send)  # Redis answers again: the rest, oldest first
        assert sent == [0, "boom", 1, 2] and not replay

        newest = Replay(10, newest_first=True)
        for i in range(3):
            newest.add(i)
        order = []

        async def record(i):
            order.append(i)
            if i == 2:
                await newest.drain(record)  # a drain already runs: this one returns at once
                newest.add(9)  # added meanwhile: sent by the running drain

        await newest.drain(record)
        assert order == [2, 9, 1, 0] and not newest

    asyncio.run(main())


def test_limiter_replay_keeps_at_most_max_pending(monkeypatch):
    import proxy.gateway.limits as limits

    monkeypatch.setattr(limits, "MAX_PENDING", 2)

    async def main():
        limiter = RateLimiter(URL)
        admissions = [await limiter.admit(_key(member_id=m, conc=1), f"r{m}", 1) for m in range(3)]

        async def broken(**kwargs):
            raise RedisConnectionError("blip")

        real, limiter._settle = limiter._settle, broken
        for a in admissions:
            await limiter.settle(a, 1)
        assert len(limiter._pending) == 2 and limiter._pending.dropped_total == 1
        limiter._settle = real
        limiter.fallback.down_until = 0.0
        await limiter.settle(await limiter.admit(_key(member_id=5, conc=1), "r5", 1), 1)
        assert not limiter._pending
        await limiter.close()

    asyncio.run(main())
    r = redis.Redis.from_url(URL)
    assert [r.zcard(f"qh:rl:{m}:c") for m in range(3)] == [0, 0, 1]  # the third settlement was dropped
