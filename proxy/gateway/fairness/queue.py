"""``FairQueue``, the fair queue's façade: it picks Redis mode or local mode for each call.

The parts: ``redis_mode.py`` (scripts, pub/sub listener, waiting, replay of missed releases),
``kept.py`` (the fast path: kept slots, linger timer, reuse and give-back), ``local.py`` (the
per-process fallback), ``slot.py`` (``Slot``, ``QueueTimeout``, retry-after estimate, background
tasks), ``lua.py`` (the scripts). The Redis client and the Redis-failure policy are the process's
shared ones (``proxy/gateway/redis_link.py``). The design is explained in the package docstring
(``proxy/gateway/fairness/__init__.py``).
"""
from __future__ import annotations

import logging
import time

from proxy.gateway.fairness.local import _LocalMode
from proxy.gateway.fairness.redis_mode import _RedisMode
from proxy.gateway.fairness.slot import _LOCAL, _OFF, QueueTimeout, Slot, _HoldTimes, _RedisLost, _Tasks
from proxy.gateway.redis_link import REDIS_ERRORS, Fallback, RedisLink

__all__ = ["FairQueue", "QueueTimeout", "Slot"]

log = logging.getLogger("qwenhub.fairness")

REDIS_RETRY_INTERVAL = 5.0  # seconds in local mode before trying Redis again
WARN_INTERVAL = 30.0  # at most one "Redis unavailable" warning per this many seconds
REDIS_DOWN_WARNING = ("fair queue: Redis unavailable (%(kind)s: %(error)s); sharing upstream capacity per process "
                      "for now (each process up to the full capacity)")


class FairQueue:
    """Per-upstream slots with fair per-member queues; Redis-backed across processes."""

    def __init__(self, redis_url: str | None, *, queue_timeout: float = 60.0, hold_ttl: float = 900.0,
                 enabled: bool = True) -> None:
        self._queue_timeout = float(queue_timeout)
        self.hold_ttl = float(hold_ttl)
        self.enabled = enabled
        self.fallback = Fallback(log, REDIS_DOWN_WARNING, retry_interval=REDIS_RETRY_INTERVAL,
                                 warn_interval=WARN_INTERVAL)
        self._holds = _HoldTimes()
        self._tasks = _Tasks()
        self._local = _LocalMode(self._queue_timeout, self._holds)
        self.link = RedisLink.open(redis_url) if redis_url and enabled else None
        self._redis = _RedisMode(self.link, self.fallback, self._holds, self._tasks, queue_timeout=self._queue_timeout,
                                 hold_ttl=self.hold_ttl) if self.link else None

    # --- counters and settings, for metrics and tests ---------------------------------------
    @property
    def degraded_total(self) -> int:
        """Acquires served locally because Redis failed or was down."""
        return self.fallback.degraded_total

    @property
    def redis_errors_total(self) -> int:
        """Redis failures seen."""
        return self.fallback.errors_total

    @property
    def fast_total(self) -> int:
        """Acquires served from a kept slot, without Redis."""
        return self._redis.kept.fast_total if self._redis else 0

    @property
    def queue_timeout(self) -> float:
        """Seconds a request may wait for a slot."""
        return self._queue_timeout

    @queue_timeout.setter
    def queue_timeout(self, seconds: float) -> None:
        self._queue_timeout = self._local.queue_timeout = float(seconds)
        if self._redis is not None:
            self._redis.queue_timeout = self._queue_timeout

    @property
    def redis_retry_interval(self) -> float:
        """Seconds in local mode after a Redis failure before trying Redis again."""
        return self.fallback.retry_interval

    @redis_retry_interval.setter
    def redis_retry_interval(self, seconds: float) -> None:
        self.fallback.retry_interval = seconds

    # --- public API -----------------------------------------------------------------------
    async def acquire(self, *, upstream_id: int, capacity: int, member_id: int, weight: int = 1) -> Slot:
        if not self.enabled:
            return Slot(upstream_id, b"", _OFF, capacity, member_id)
        capacity = capacity if capacity > 0 else 1
        weight = weight if weight > 0 else 1
        t0 = time.monotonic()
        if self._redis is not None:
            if self.fallback.usable(t0):
                try:
                    return await self._redis.acquire(upstream_id, capacity, member_id, weight, t0)
                except (*REDIS_ERRORS, _RedisLost) as exc:
                    if not isinstance(exc, _RedisLost):
                        self._redis.failed(exc)
            self.fallback.degraded()
        return await self._local.acquire(upstream_id, capacity, member_id, weight, t0)

    async def release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        if slot.mode == _OFF:
            return
        now = time.monotonic()
        self._holds.note(slot.upstream_id, now - slot.granted_at)
        if slot.mode == _LOCAL:
            self._local.release(slot)
            return
        await self._redis.release(slot, now)

    def stats(self, upstream_id: int) -> dict:
        if self._redis is None or not self.fallback.usable():
            return self._local.stats(upstream_id)
        in_flight, queued = self._redis.seen.get(upstream_id, (0, 0))
        return {"in_flight": in_flight, "queued": queued}

    async def close(self) -> None:
        """Give back what Redis holds for this process and let go of the shared link; safe to call again."""
        if self._redis is not None and not self.link.closed:
            await self._redis.close()
        await self._tasks.finish(timeout=1.0)
        if self.link is not None:
            await self.link.close()
