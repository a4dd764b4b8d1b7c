"""The fair queue itself: ``FairQueue`` and what it hands out (``Slot``) or raises (``QueueTimeout``).

Also the tunable constants (timeouts, EWMA, fast path thresholds), the fast path's per-process
state of kept slots (``_Kept``, ``_fast_limit``) and ``_RedisLost``. The Lua scripts are in
``lua.py`` and the per-process fallback queue in ``local.py``; the design is explained in the
package docstring (``proxy/gateway/fairness/__init__.py``).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.gateway.fairness.local import _LocalQueue
from proxy.gateway.fairness.lua import _LUA_ACQUIRE, _LUA_RELEASE, _LUA_SYNC, _LUA_WITHDRAW

log = logging.getLogger("qwenhub.fairness")

REDIS_TIMEOUT = 0.5  # seconds: socket and connect timeout
REDIS_RETRY_INTERVAL = 5.0  # seconds in local mode before trying Redis again
WARN_INTERVAL = 30.0  # at most one "Redis unavailable" warning per this many seconds
SUBSCRIBE_TIMEOUT = 1.0
EWMA_ALPHA = 0.2
EWMA_PRIOR = 10.0  # seconds a slot is assumed held until a release has been seen
MAX_PENDING = 10_000  # failed releases kept for replay
MIN_POKE = 0.05
# Fast path (kept slots, see the package docstring)
FAST_MIN_CAPACITY = 8  # upstreams with fewer slots always take the per-request path
FAST_FRACTION = 0.75  # slots are kept for reuse only while held ≤ this fraction of the capacity
FRESH = 0.010  # seconds: a view of Redis this old still allows reusing a kept slot
LINGER = 0.020  # seconds: a kept slot idle this long goes back to Redis
REUSE_WINDOW = 60.0  # seconds (at most hold_ttl / 4): a slot token is reused only this long after its grant

_OFF, _REDIS, _LOCAL = 0, 1, 2


class QueueTimeout(Exception):
    """The request waited longer than the queue timeout."""

    def __init__(self, retry_after: float, waited: float = 0.0) -> None:
        super().__init__(f"queue timeout after {waited:.1f}s; retry after {retry_after:.1f}s")
        self.retry_after = retry_after  # seconds: estimate of when a slot would be free for this member
        self.waited = waited


@dataclass(eq=False, slots=True)
class Slot:
    """A held slot of an upstream; pass it back to ``FairQueue.release``."""

    upstream_id: int
    token: bytes
    mode: int
    capacity: int
    member_id: int
    waited: float = 0.0  # seconds spent queued
    granted_at: float = 0.0  # time.monotonic() of the grant
    released: bool = False
    reuse_until: float = 0.0  # time.monotonic() until which the token may be kept for reuse (0: never)


class _RedisLost(Exception):
    """Redis went away while a waiter was queued there."""


# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
class FairQueue:
    """Per-upstream slots with fair per-member queues; Redis-backed across processes."""

    def __init__(self, redis_url: str | None, *, queue_timeout: float = 60.0, hold_ttl: float = 900.0,
                 enabled: bool = True) -> None:
        self.queue_timeout = float(queue_timeout)
        self.hold_ttl = float(hold_ttl)
        self.enabled = enabled
        self.redis_retry_interval = REDIS_RETRY_INTERVAL
        self.degraded_total = 0  # acquires served locally because Redis failed or was down
        self.redis_errors_total = 0  # Redis failures seen
        self._timeout_ms = str(max(1, int(self.queue_timeout * 1000)))
        self._ttl_ms = str(max(1, int(self.hold_ttl * 1000)))
        self._reuse = min(REUSE_WINDOW, self.hold_ttl / 4)
        self._ttl_fast_ms = str(max(1, int((self.hold_ttl + self._reuse) * 1000)))
        self._redis: Redis | None = None
        if redis_url and enabled:
            self._redis = Redis.from_url(
                redis_url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT,
                retry_on_timeout=False, retry=Retry(NoBackoff(), 0),
            )
            self._s_acquire = self._redis.register_script(_LUA_ACQUIRE)
            self._s_release = self._redis.register_script(_LUA_RELEASE)
            self._s_withdraw = self._redis.register_script(_LUA_WITHDRAW)
            self._s_sync = self._redis.register_script(_LUA_SYNC)
        self._proc = secrets.token_hex(6)
        self._proc_b = self._proc.encode()
        self._channel = b"qh:fq:ch:" + self._proc_b
        self._seq = itertools.count(1)
        self._futures: dict[bytes, asyncio.Future] = {}  # token → waiter's Future (Redis mode)
        self._listener: asyncio.Task | None = None
        self._subscribed: asyncio.Future | None = None
        self._down_until = 0.0
        self._warned_at = -WARN_INTERVAL
        self._local: dict[int, _LocalQueue] = {}
        self._keys: dict[int, tuple[list, bytes]] = {}
        self._ewma: dict[int, float] = {}
        self._seen: dict[int, tuple[int, int]] = {}
        self._kept: dict[int, _Kept] = {}  # upstream id → fast path state
        self.fast_total = 0  # acquires served from a kept slot, without Redis
        self._pending: list[tuple[int, int, int, bytes]] = []  # Redis slots to release once Redis is back
        self._flushing = False
        self._tasks: set[asyncio.Task] = set()

    # --- public API -----------------------------------------------------------------------
    async def acquire(self, *, upstream_id: int, capacity: int, member_id: int, weight: int = 1) -> Slot:
        if not self.enabled:
            return Slot(upstream_id, b"", _OFF, capacity, member_id)
        capacity = capacity if capacity > 0 else 1
        weight = weight if weight > 0 else 1
        t0 = time.monotonic()
        if self._redis is not None:
            if t0 >= self._down_until:
                try:
                    return await self._acquire_redis(upstream_id, capacity, member_id, weight, t0)
                except (RedisError, OSError, _RedisLost) as exc:
                    if not isinstance(exc, _RedisLost):
                        self._redis_failed(exc)
            self.degraded_total += 1
        return await self._acquire_local(upstream_id, capacity, member_id, weight, t0)

    async def release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        if slot.mode == _OFF:
            return
        uid = slot.upstream_id
        now = time.monotonic()
        e = self._ewma.get(uid, EWMA_PRIOR)
        self._ewma[uid] = e + EWMA_ALPHA * (now - slot.granted_at - e)
        if slot.mode == _LOCAL:
            lq = self._local[uid]
            lq.in_flight -= 1
            if lq.queued:
                lq.dispatch(slot.capacity)
            return
        if now < self._down_until:
            self._defer(slot)
            return
        if slot.reuse_until > now:  # fast path: keep the slot for this process's next request?
            k = self._kept.get(uid)
            if k is not None and k.q == 0 and k.n <= _fast_limit(slot.capacity) and now - k.at <= LINGER:
                k.pool.append((slot.token, slot.reuse_until, now))
                k.capacity = slot.capacity
                self._arm_linger(uid, k)
                return
        keys, prefix = self._keys_for(uid)
        try:
            res = await self._s_release(keys=keys, args=(prefix, slot.capacity, slot.token))
        except asyncio.CancelledError:
            self._spawn(self._release_later(slot))  # the script may or may not have run: run it again
            raise
        except Exception as exc:  # never raises
            if isinstance(exc, (RedisError, OSError)):
                self._redis_failed(exc)
            else:
                log.exception("fair queue: release failed")
            self._defer(slot)
            return
        self._saw(uid, res[1], res[2], now)

    def stats(self, upstream_id: int) -> dict:
        if self._redis is None or time.monotonic() < self._down_until:
            lq = self._local.get(upstream_id)
            return {"in_flight": lq.in_flight, "queued": lq.queued} if lq else {"in_flight": 0, "queued": 0}
        in_flight, queued = self._seen.get(upstream_id, (0, 0))
        return {"in_flight": in_flight, "queued": queued}

    async def close(self) -> None:
        self._lose_waiters()
        for uid, k in self._kept.items():
            if k.timer is not None:
                k.timer.cancel()
                k.timer = None
            if k.pool:
                tokens = [e[0] for e in k.pool]
                k.pool.clear()
                if time.monotonic() >= self._down_until:
                    self._spawn(self._give_back(uid, k.capacity, tokens))
                else:
                    for tok in tokens:
                        self._defer_token(uid, k.capacity, 0, tok)
        await self._stop_listener()
        if self._pending and not self._flushing and time.monotonic() >= self._down_until:
            self._spawn(self._flush())  # give back what an earlier outage kept from Redis
        if self._tasks:  # let pending releases/withdrawals finish, briefly
            await asyncio.wait(list(self._tasks), timeout=1.0)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._redis is not None:
            try:
                await self._redis.aclose()
            except Exception:
                pass

    # --- Redis mode ---------------------------------------------------------------------
    def _keys_for(self, uid: int) -> tuple[list, bytes]:
        k = self._keys.get(uid)
        if k is None:
            p = f"qh:fq:{{{uid}}}:"
            k = self._keys[uid] = ([p + "held", p + "wait", p + "ring", p + "deficit", p + "weight"],
                                   (p + "q:").encode())
        return k

    def _listening(self) -> bool:
        s = self._subscribed
        return (s is not None and s.done() and not s.cancelled() and s.exception() is None
                and self._listener is not None and not self._listener.done())

    def _start_listener(self) -> None:
        if self._listener is None or self._listener.done():
            loop = asyncio.get_running_loop()
            self._subscribed = loop.create_future()
            self._listener = loop.create_task(self._listen(self._subscribed))

    async def _listen(self, subscribed: asyncio.Future) -> None:
        pubsub = self._redis.pubsub()
        futures = self._futures
        try:
            await pubsub.subscribe(self._channel)
            deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
            while True:  # wait for the confirmation: only then can grants reach us
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no subscribe confirmation")
                msg = await pubsub.get_message(timeout=left)
                if msg is not None and msg["type"] == "subscribe":
                    break
            subscribed.set_result(True)
            while True:
                msg = await pubsub.get_message(timeout=None)
                if msg is not None and msg["type"] == "message":
                    fut = futures.get(msg["data"])
                    if fut is not None and not fut.done():
                        fut.set_result(True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._redis_failed(exc)
        finally:
            if not subscribed.done():
                subscribed.set_exception(_RedisLost())
                subscribed.exception()
            try:
                await pubsub.aclose()
            except Exception:
                pass

    async def _stop_listener(self) -> None:
        task, self._listener = self._listener, None
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _saw(self, uid: int, n: int, q: int, at: float) -> None:
        """Note what a script reported (at = when it was sent)."""
        self._seen[uid] = (n, q)
        k = self._kept.get(uid)
        if k is not None and at >= k.at:
            k.n, k.q, k.at = n, q, at

    async def _reuse_kept(self, uid: int, k: _Kept, capacity: int, member: int, limit: int,
                          now: float) -> Slot | None:
        """Fast path: hand out a kept slot if the view of Redis is fresh and quiet (else None)."""
        if now - k.at > FRESH:  # refresh the view; the idle kept tokens go back if anyone waits
            entries = list(k.pool)
            k.pool.clear()  # (nobody may reuse them while the script decides)
            tokens = [e[0] for e in entries]
            keys, prefix = self._keys_for(uid)
            try:
                res = await self._s_sync(keys=keys, args=(prefix, capacity, limit, *tokens))
            except asyncio.CancelledError:
                self._spawn(self._give_back(uid, capacity, tokens))
                raise
            except BaseException:
                for tok in tokens:
                    self._defer_token(uid, capacity, 0, tok)
                raise
            self._saw(uid, res[1], res[2], now)
            if res[0] == 1:
                return None  # given back: take the per-request path
            k.pool.extendleft(reversed(entries))
            # The linger timer may have fired (and found the pool empty) while the script ran:
            # without it these slots would stay kept, idle, until this process next releases one.
            self._arm_linger(uid, k)
        # Reusing a slot this process already holds never adds to what the upstream runs,
        # so only waiters (who must get it instead) matter here, not how full it is.
        if k.q == 0:
            while k.pool:
                tok, until, _ = k.pool.pop()
                if now < until:
                    self.fast_total += 1
                    return Slot(uid, tok, _REDIS, capacity, member, 0.0, now, reuse_until=until)
                self._spawn(self._give_back(uid, capacity, [tok]))  # too old to reuse
            return None
        tokens = [e[0] for e in k.pool]  # busy upstream or waiters: give the kept slots back
        k.pool.clear()
        self._spawn(self._give_back(uid, capacity, tokens))
        return None

    async def _give_back(self, uid: int, capacity: int, tokens: list) -> None:
        """Release kept slots (idle too long, or no longer to be kept) in one script."""
        if not tokens:
            return
        keys, prefix = self._keys_for(uid)
        at = time.monotonic()
        try:
            res = await self._s_release(keys=keys, args=(prefix, capacity, *tokens))
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            for tok in tokens:
                self._defer_token(uid, capacity, 0, tok)
            return
        except asyncio.CancelledError:
            for tok in tokens:
                self._defer_token(uid, capacity, 0, tok)
            raise
        self._saw(uid, res[1], res[2], at)

    def _arm_linger(self, uid: int, k: _Kept) -> None:
        if k.timer is None and k.pool:
            k.timer = asyncio.get_running_loop().call_later(LINGER, self._linger, uid)

    def _linger(self, uid: int) -> None:
        """Timer: give back the kept slots that have been idle for LINGER (or are too old to reuse)."""
        k = self._kept.get(uid)
        if k is None:
            return
        k.timer = None
        now = time.monotonic()
        old = []
        while k.pool and (now - k.pool[0][2] >= LINGER or now >= k.pool[0][1]):
            old.append(k.pool.popleft()[0])
        if old:
            self._spawn(self._give_back(uid, k.capacity, old))
        if k.pool:
            k.timer = asyncio.get_running_loop().call_later(max(0.001, k.pool[0][2] + LINGER - now),
                                                            self._linger, uid)

    async def _acquire_redis(self, uid: int, capacity: int, member: int, weight: int, t0: float) -> Slot:
        limit = _fast_limit(capacity)
        if limit >= 0:
            k = self._kept.get(uid)
            if k is None:
                k = self._kept[uid] = _Kept()
            if k.pool:
                slot = await self._reuse_kept(uid, k, capacity, member, limit, t0)
                if slot is not None:
                    return slot
            ttl_ms = self._ttl_fast_ms
            sent = time.monotonic()
            reuse_until = sent + self._reuse
        else:
            ttl_ms = self._ttl_ms
            sent = t0
            reuse_until = 0.0
        keys, prefix = self._keys_for(uid)
        token = b"%s:%d" % (self._proc_b, next(self._seq))
        qkey = prefix + str(member).encode()
        if self._listener is None or self._listener.done():
            self._start_listener()  # in the background: the fast path does not wait for it
        listening = self._listening()
        fut = None
        if listening:
            fut = asyncio.get_running_loop().create_future()
            self._futures[token] = fut  # before the script may enqueue us
        try:
            res = await self._s_acquire(keys=keys + [qkey], args=(
                prefix, capacity, member, weight, token, self._channel, self._timeout_ms, ttl_ms,
                1 if listening else 0))
            if res[0] == -1:  # full, and not yet subscribed: subscribe, then queue
                await asyncio.wait_for(asyncio.shield(self._subscribed), SUBSCRIBE_TIMEOUT)
                fut = asyncio.get_running_loop().create_future()
                self._futures[token] = fut
                res = await self._s_acquire(keys=keys + [qkey], args=(
                    prefix, capacity, member, weight, token, self._channel, self._timeout_ms, ttl_ms, 1))
        except asyncio.CancelledError:
            self._futures.pop(token, None)
            self._spawn(self._withdraw_later(uid, capacity, member, token))
            raise
        except BaseException:
            self._futures.pop(token, None)
            self._defer_token(uid, capacity, member, token)  # it may have been granted or queued
            raise
        if self._pending and not self._flushing:
            self._spawn(self._flush())
        self._saw(uid, res[1], res[2], sent)
        if res[0] == 1:
            if fut is not None:
                self._futures.pop(token, None)
            return Slot(uid, token, _REDIS, capacity, member, 0.0, time.monotonic(), reuse_until=reuse_until)
        # Queued: wait for the grant; poke when the earliest held slot is due to expire.
        try:
            deadline = t0 + self.queue_timeout
            poke_at = t0 + res[3] / 1000 + MIN_POKE if res[3] >= 0 else None
            while not fut.done():
                now = time.monotonic()
                if now >= deadline:
                    break
                wake = deadline if poke_at is None else min(deadline, max(poke_at, now + MIN_POKE))
                await asyncio.wait((fut,), timeout=wake - now)
                if not fut.done() and poke_at is not None and time.monotonic() >= poke_at:
                    r = await self._s_release(keys=keys, args=(prefix, capacity, b""))
                    poke_at = time.monotonic() + r[3] / 1000 + MIN_POKE if r[3] >= 0 else None
        except asyncio.CancelledError:
            self._futures.pop(token, None)
            self._spawn(self._withdraw_later(uid, capacity, member, token))
            raise
        except (RedisError, OSError) as exc:  # a poke failed
            self._redis_failed(exc)
            fut.cancel()
        self._futures.pop(token, None)
        waited = time.monotonic() - t0
        lost = fut.cancelled() or (fut.done() and not fut.result())
        if lost:
            # Redis was lost while we waited: give back whatever Redis holds for us, wait locally.
            self._defer_token(uid, capacity, member, token)
            raise _RedisLost()
        if fut.done():
            return Slot(uid, token, _REDIS, capacity, member, waited, time.monotonic(), reuse_until=reuse_until)
        # Timed out: withdraw; a grant that raced in is still ours.
        try:
            r = await self._s_withdraw(keys=keys + [qkey], args=(prefix, capacity, member, token, 0))
        except asyncio.CancelledError:
            self._spawn(self._withdraw_later(uid, capacity, member, token))
            raise
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            self._defer_token(uid, capacity, member, token)
            raise QueueTimeout(self._retry_after(uid, capacity, 1.0), waited) from None
        self._seen[uid] = (r[1], r[2])
        if r[0] == 1:
            return Slot(uid, token, _REDIS, capacity, member, waited, time.monotonic(), reuse_until=reuse_until)
        mine_w = r[5]
        total = r[4] + (0 if mine_w else weight)
        ahead = (r[3] + 1) * total / (mine_w or weight)
        raise QueueTimeout(self._retry_after(uid, capacity, ahead), waited)

    def _retry_after(self, uid: int, capacity: int, ahead: float) -> float:
        est = self._ewma.get(uid, EWMA_PRIOR) * ahead / capacity
        return max(0.1, round(est, 1))

    async def _withdraw_later(self, uid: int, capacity: int, member: int, token: bytes) -> None:
        """After a cancelled acquire: remove the entry, or release the slot if a grant raced in."""
        try:
            await self._withdraw_or_release(uid, capacity, member, token)
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            self._defer_token(uid, capacity, member, token)
        except asyncio.CancelledError:
            self._defer_token(uid, capacity, member, token)
            raise

    async def _withdraw_or_release(self, uid: int, capacity: int, member: int, token: bytes) -> None:
        """Take token out of Redis, whether it is still queued or was granted (the withdraw script's release mode)."""
        keys, prefix = self._keys_for(uid)
        qkey = prefix + str(member).encode()
        await self._s_withdraw(keys=keys + [qkey], args=(prefix, capacity, member, token, 1))

    async def _release_later(self, slot: Slot) -> None:
        keys, prefix = self._keys_for(slot.upstream_id)
        try:
            await self._s_release(keys=keys, args=(prefix, slot.capacity, slot.token))
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            self._defer(slot)
        except asyncio.CancelledError:
            self._defer(slot)
            raise

    def _defer(self, slot: Slot) -> None:
        self._defer_token(slot.upstream_id, slot.capacity, slot.member_id, slot.token)

    def _defer_token(self, uid: int, capacity: int, member: int, token: bytes) -> None:
        if len(self._pending) < MAX_PENDING:
            self._pending.append((uid, capacity, member, token))

    async def _flush(self) -> None:
        """Replay releases/withdrawals that failed while Redis was unreachable."""
        self._flushing = True
        try:
            while self._pending:
                try:
                    await self._withdraw_or_release(*self._pending[-1])
                except (RedisError, OSError) as exc:
                    self._redis_failed(exc)
                    return
                self._pending.pop()
        finally:
            self._flushing = False

    def _redis_failed(self, exc: BaseException) -> None:
        self.redis_errors_total += 1
        now = time.monotonic()
        self._down_until = now + self.redis_retry_interval
        if now - self._warned_at >= WARN_INTERVAL:
            self._warned_at = now
            log.warning("fair queue: Redis unavailable (%s: %s); sharing upstream capacity per process "
                        "for now (each process up to the full capacity)", type(exc).__name__, exc)
        self._lose_waiters()
        for uid, k in self._kept.items():  # kept slots: released once Redis is back
            if k.timer is not None:
                k.timer.cancel()
                k.timer = None
            for e in k.pool:
                self._defer_token(uid, k.capacity, 0, e[0])
            k.pool.clear()
            k.at = -1e9
        if self._listener is not None and self._listener is not asyncio.current_task():
            self._listener.cancel()
        self._listener = None
        self._spawn(self._redis.connection_pool.disconnect(inuse_connections=False))  # no stale connections

    def _lose_waiters(self) -> None:
        for fut in self._futures.values():
            if not fut.done():
                fut.set_result(False)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- local mode ---------------------------------------------------------------------
    async def _acquire_local(self, uid: int, capacity: int, member: int, weight: int, t0: float) -> Slot:
        lq = self._local.get(uid)
        if lq is None:
            lq = self._local[uid] = _LocalQueue()
        if lq.in_flight < capacity and not lq.queued:
            lq.in_flight += 1
            return Slot(uid, b"", _LOCAL, capacity, member, 0.0, time.monotonic())
        fut = asyncio.get_running_loop().create_future()
        lq.enqueue(member, weight, fut)
        if lq.in_flight < capacity:  # capacity grew, or slots were freed while nobody dispatched
            lq.dispatch(capacity)
        remaining = t0 + self.queue_timeout - time.monotonic()
        try:
            if remaining > 0 and not fut.done():
                await asyncio.wait((fut,), timeout=remaining)
        except asyncio.CancelledError:
            if fut.done():  # granted just as we were cancelled: hand the slot on
                lq.in_flight -= 1
                lq.dispatch(capacity)
            else:
                lq.withdraw(member, fut)
            raise
        waited = time.monotonic() - t0
        if fut.done():
            return Slot(uid, b"", _LOCAL, capacity, member, waited, time.monotonic())
        lq.withdraw(member, fut)
        ahead = lq.ahead(member, weight)
        raise QueueTimeout(self._retry_after(uid, capacity, ahead), waited)
