"""Rate limits against the real Redis: slots always come back, also across a Redis blip."""
import asyncio
import os

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.gateway.keys import KeyInfo
from proxy.gateway.limits import RateLimiter

REDIS_URL = os.environ.get("TEST_REDIS_LIMITS_URL", "redis://127.0.0.1:6379/10")


@pytest.fixture(autouse=True)
def _flush():
    redis.Redis.from_url(REDIS_URL).flushdb()
    yield


def _key(member_id: int = 1, **limits) -> KeyInfo:
    return KeyInfo(key_id=1, member_id=member_id, team_id=1, username="u", team_timezone="UTC", team_token_cap=None,
                   usable=True, expires_at=None, request_quota=None, token_quota=None,
                   requests_per_minute=limits.get("rpm"), tokens_per_minute=limits.get("tpm"),
                   max_concurrent_requests=limits.get("conc"), weight=1, allowed_model_ids=frozenset())


def test_concurrency_slot_survives_a_redis_blip_at_settlement():
    async def run():
        limiter = RateLimiter(REDIS_URL)
        key = _key(conc=1)
        first = await limiter.admit(key, "r1", 10)
        assert not first.local
        real_settle = limiter._settle

        async def broken(**kwargs):
            raise RedisConnectionError("blip")

        limiter._settle = broken
        await limiter.settle(first, 10)  # Redis "down": kept for replay
        assert limiter._pending and limiter.degraded_total == 1
        limiter._settle = real_settle
        limiter.fallback.down_until = 0.0  # the blip is over
        second = await limiter.admit(key, "r2", 10)  # replays the first settlement before it
        assert second is not None and not second.local and not limiter._pending
        await limiter.settle(second, 10)
        third = await limiter.admit(key, "r3", 10)
        await limiter.settle(third, 10)
        await limiter.close()

    # before the fix, r1's slot stayed in Redis for 15 minutes and the later admit would be refused
    asyncio.run(run())
    assert redis.Redis.from_url(REDIS_URL).zcard("qh:rl:1:c") == 0


def test_local_fallback_when_redis_is_down():
    async def run():
        limiter = RateLimiter("redis://127.0.0.1:1/0")
        key = _key(conc=1, rpm=100)
        first = await limiter.admit(key, "a", 5)
        assert first.local and limiter.degraded_total == 1
        with pytest.raises(Exception) as exc:
            await limiter.admit(key, "b", 5)
        assert getattr(exc.value, "status", None) == 429
        await limiter.settle(first, 5)
        assert (await limiter.admit(key, "c", 5)).local
        await limiter.close()

    asyncio.run(run())
