"""Kept slots, the fair queue's fast path: slots this process keeps and reuses below saturation.

A kept slot is an ordinary token in Redis's ``held`` set that a release did not give back, because
the upstream looked far from full; the next acquire of this process reuses it without a Redis call
while the last view of Redis is fresh and shows nobody waiting. ``_Kept`` is one upstream's pool
and view; ``_KeptSlots`` reuses, keeps, and gives slots back (linger timer, refresh, outage). The
rules and what they cost fairness are in the package docstring.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque

from proxy.gateway.fairness.slot import _REDIS, Slot
from proxy.gateway.redis_link import REDIS_ERRORS

FAST_MIN_CAPACITY = 8  # upstreams with fewer slots always take the per-request path
FAST_FRACTION = 0.75  # slots are kept for reuse only while held ≤ this fraction of the capacity
FRESH = 0.010  # seconds: a view of Redis this old still allows reusing a kept slot
LINGER = 0.020  # seconds: a kept slot idle this long goes back to Redis
REUSE_WINDOW = 60.0  # seconds (at most hold_ttl / 4): a slot token is reused only this long after its grant


class _Kept:
    """Fast path state of one upstream in this process: idle kept slots and the last view of Redis."""

    __slots__ = ("pool", "n", "q", "at", "timer", "capacity")

    def __init__(self) -> None:
        self.pool: deque[tuple[bytes, float, float]] = deque()  # (token, reuse_until, idle since); right = newest
        self.n = 0  # slots held on the upstream (all processes), as last seen
        self.q = 0  # waiters, as last seen
        self.at = -1e9  # time.monotonic() of that view
        self.timer: asyncio.TimerHandle | None = None
        self.capacity = 0


def _fast_limit(capacity: int) -> int:
    return int(capacity * FAST_FRACTION) if capacity >= FAST_MIN_CAPACITY else -1


class _KeptSlots:
    """The kept slots of every upstream; `redis` is the Redis mode (scripts, keys, replay, tasks)."""

    def __init__(self, redis) -> None:
        self.redis = redis
        self.upstreams: dict[int, _Kept] = {}
        self.fast_total = 0  # acquires served from a kept slot, without Redis

    def saw(self, uid: int, n: int, q: int, at: float) -> None:
        """Refresh the view with what a script sent at `at` reported (a later view is kept)."""
        k = self.upstreams.get(uid)
        if k is not None and at >= k.at:
            k.n, k.q, k.at = n, q, at

    async def reuse(self, uid: int, capacity: int, member: int, limit: int, now: float) -> Slot | None:
        """Fast path: hand out a kept slot if the view of Redis is fresh and quiet (else None)."""
        k = self.upstreams.get(uid)
        if k is None:
            k = self.upstreams[uid] = _Kept()
        if not k.pool:
            return None
        if now - k.at > FRESH and not await self._refresh(uid, k, capacity, limit, now):
            return None
        # Reusing a slot this process already holds never adds to what the upstream runs,
        # so only waiters (who must get it instead) matter here, not how full it is.
        if k.q == 0:
            while k.pool:
                tok, until, _ = k.pool.pop()
                if now < until:
                    self.fast_total += 1
                    return Slot(uid, tok, _REDIS, capacity, member, 0.0, now, reuse_until=until)
                self.redis.tasks.spawn(self.give_back(uid, capacity, [tok]))  # too old to reuse
            return None
        tokens = [e[0] for e in k.pool]  # busy upstream or waiters: give the kept slots back
        k.pool.clear()
        self.redis.tasks.spawn(self.give_back(uid, capacity, tokens))
        return None

    async def _refresh(self, uid: int, k: _Kept, capacity: int, limit: int, now: float) -> bool:
        """Refresh the view (sync script); the idle kept tokens go back if anyone waits (→ False)."""
        entries = list(k.pool)
        k.pool.clear()  # (nobody may reuse them while the script decides)
        tokens = [e[0] for e in entries]
        keys, prefix = self.redis.keys_for(uid)
        try:
            res = await self.redis.scripts.sync(keys=keys, args=(prefix, capacity, limit, *tokens))
        except asyncio.CancelledError:
            self.redis.tasks.spawn(self.give_back(uid, capacity, tokens))
            raise
        except BaseException:
            for tok in tokens:
                self.redis.defer_token(uid, capacity, 0, tok)
            raise
        self.redis.saw(uid, res[1], res[2], now)
        if res[0] == 1:
            return False  # given back: take the per-request path
        k.pool.extendleft(reversed(entries))
        # The linger timer may have fired (and found the pool empty) while the script ran:
        # without it these slots would stay kept, idle, until this process next releases one.
        self._arm_linger(uid, k)
        return True

    def keep(self, slot: Slot, now: float) -> bool:
        """Keep a released slot for this process's next request, if the upstream is clearly not busy."""
        if slot.reuse_until <= now:
            return False
        k = self.upstreams.get(slot.upstream_id)
        if k is None or k.q != 0 or k.n > _fast_limit(slot.capacity) or now - k.at > LINGER:
            return False
        k.pool.append((slot.token, slot.reuse_until, now))
        k.capacity = slot.capacity
        self._arm_linger(slot.upstream_id, k)
        return True

    async def give_back(self, uid: int, capacity: int, tokens: list) -> None:
        """Release kept slots (idle too long, or no longer to be kept) in one script."""
        if not tokens:
            return
        keys, prefix = self.redis.keys_for(uid)
        at = time.monotonic()
        try:
            res = await self.redis.scripts.release(keys=keys, args=(prefix, capacity, *tokens))
        except REDIS_ERRORS as exc:
            self.redis.failed(exc)
            for tok in tokens:
                self.redis.defer_token(uid, capacity, 0, tok)
            return
        except asyncio.CancelledError:
            for tok in tokens:
                self.redis.defer_token(uid, capacity, 0, tok)
            raise
        self.redis.saw(uid, res[1], res[2], at)

    def _arm_linger(self, uid: int, k: _Kept) -> None:
        if k.timer is None and k.pool:
            k.timer = asyncio.get_running_loop().call_later(LINGER, self._linger, uid)

    def _linger(self, uid: int) -> None:
        """Timer: give back the kept slots that have been idle for LINGER (or are too old to reuse)."""
        k = self.upstreams.get(uid)
        if k is None:
            return
        k.timer = None
        now = time.monotonic()
        old = []
        while k.pool and (now - k.pool[0][2] >= LINGER or now >= k.pool[0][1]):
            old.append(k.pool.popleft()[0])
        if old:
            self.redis.tasks.spawn(self.give_back(uid, k.capacity, old))
        if k.pool:
            k.timer = asyncio.get_running_loop().call_later(max(0.001, k.pool[0][2] + LINGER - now),
                                                            self._linger, uid)

    def _take_all(self, uid: int, k: _Kept) -> list[bytes]:
        if k.timer is not None:
            k.timer.cancel()
            k.timer = None
        tokens = [e[0] for e in k.pool]
        k.pool.clear()
        return tokens

    def drop_all(self) -> None:
        """Redis failed: every kept slot is released once Redis is back (replay); the views are void."""
        for uid, k in self.upstreams.items():
            for tok in self._take_all(uid, k):
                self.redis.defer_token(uid, k.capacity, 0, tok)
            k.at = -1e9

    def close(self) -> None:
        """Give every kept slot back (in the background), or keep it for replay if Redis is down."""
        for uid, k in self.upstreams.items():
            tokens = self._take_all(uid, k)
            if not tokens:
                continue
            if self.redis.fallback.usable():
                self.redis.tasks.spawn(self.give_back(uid, k.capacity, tokens))
            else:
                for tok in tokens:
                    self.redis.defer_token(uid, k.capacity, 0, tok)
