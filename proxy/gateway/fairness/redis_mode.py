"""Redis mode of the fair queue: slots and queues shared by every process through the Lua scripts.

``_RedisMode`` runs the scripts (``lua.py``) on the process's shared Redis link, waits for grants
through the pub/sub listener (``listener.py``), withdraws timed-out or cancelled waiters, keeps
the releases Redis missed for replay, and owns the kept slots (``kept.py``). On any Redis error it
reports to the fair queue's ``Fallback`` and undoes what cannot survive the outage (waiters,
kept slots, listener); the façade (``queue.py``) then serves from local mode. The protocol is
described in the package docstring.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass

from proxy.gateway.fairness.kept import REUSE_WINDOW, _fast_limit, _KeptSlots
from proxy.gateway.fairness.listener import _Listener
from proxy.gateway.fairness.lua import _LUA_ACQUIRE, _LUA_RELEASE, _LUA_SYNC, _LUA_WITHDRAW
from proxy.gateway.fairness.slot import _REDIS, QueueTimeout, Slot, _HoldTimes, _RedisLost, _Tasks
from proxy.gateway.redis_link import REDIS_ERRORS, Fallback, RedisLink, Replay

log = logging.getLogger("qwenhub.fairness")

MAX_PENDING = 10_000  # failed releases kept for replay
MIN_POKE = 0.05


class _Scripts:
    """The four scripts, registered on the shared client (EVALSHA)."""

    __slots__ = ("acquire", "release", "withdraw", "sync")

    def __init__(self, client) -> None:
        self.acquire = client.register_script(_LUA_ACQUIRE)
        self.release = client.register_script(_LUA_RELEASE)
        self.withdraw = client.register_script(_LUA_WITHDRAW)
        self.sync = client.register_script(_LUA_SYNC)


@dataclass(slots=True)
class _Ask:
    """One acquire on its way through Redis: who asks, and the token it may be granted."""

    uid: int
    capacity: int
    member: int
    weight: int
    t0: float
    token: bytes
    keys: list
    prefix: bytes
    ttl_ms: str
    reuse_until: float

    @property
    def qkey(self) -> bytes:
        return self.prefix + str(self.member).encode()

    def slot(self, waited: float) -> Slot:
        return Slot(self.uid, self.token, _REDIS, self.capacity, self.member, waited, time.monotonic(),
                    reuse_until=self.reuse_until)


class _RedisMode:
    """Per-upstream slots and fair queues in Redis, for this process."""

    def __init__(self, link: RedisLink, fallback: Fallback, holds: _HoldTimes, tasks: _Tasks, *,
                 queue_timeout: float, hold_ttl: float) -> None:
        self.link = link
        self.fallback = fallback
        self.holds = holds
        self.tasks = tasks
        self.queue_timeout = queue_timeout
        self.scripts = _Scripts(link.client)
        self._timeout_ms = str(max(1, int(queue_timeout * 1000)))
        self._ttl_ms = str(max(1, int(hold_ttl * 1000)))
        self.reuse = min(REUSE_WINDOW, hold_ttl / 4)
        self._ttl_fast_ms = str(max(1, int((hold_ttl + self.reuse) * 1000)))
        self._proc_b = secrets.token_hex(6).encode()
        self._seq = itertools.count(1)
        self.listener = _Listener(link.client, b"qh:fq:ch:" + self._proc_b, self.failed)
        self.kept = _KeptSlots(self)
        self.pending = Replay(MAX_PENDING, newest_first=True)  # Redis slots to release once Redis is back
        self.seen: dict[int, tuple[int, int]] = {}  # upstream → (in flight, queued) as last reported
        self._keys: dict[int, tuple[list, bytes]] = {}

    def keys_for(self, uid: int) -> tuple[list, bytes]:
        k = self._keys.get(uid)
        if k is None:
            p = f"qh:fq:{{{uid}}}:"
            k = self._keys[uid] = ([p + "held", p + "wait", p + "ring", p + "deficit", p + "weight"],
                                   (p + "q:").encode())
        return k

    def saw(self, uid: int, n: int, q: int, at: float) -> None:
        """Note what a script reported (at = when it was sent)."""
        self.seen[uid] = (n, q)
        self.kept.saw(uid, n, q, at)

    # --- acquire --------------------------------------------------------------------------
    async def acquire(self, uid: int, capacity: int, member: int, weight: int, t0: float) -> Slot:
        limit = _fast_limit(capacity)
        if limit >= 0:
            slot = await self.kept.reuse(uid, capacity, member, limit, t0)
            if slot is not None:
                return slot
            ttl_ms, sent = self._ttl_fast_ms, time.monotonic()
            reuse_until = sent + self.reuse
        else:
            ttl_ms, sent, reuse_until = self._ttl_ms, t0, 0.0
        keys, prefix = self.keys_for(uid)
        a = _Ask(uid, capacity, member, weight, t0, b"%s:%d" % (self._proc_b, next(self._seq)), keys, prefix,
                 ttl_ms, reuse_until)
        res, fut = await self._enqueue(a)
        self.flush_soon()
        self.saw(uid, res[1], res[2], sent)
        if res[0] == 1:
            if fut is not None:
                self.listener.futures.pop(a.token, None)
            return a.slot(0.0)
        await self._wait(a, fut, res[3])
        return await self._after_wait(a, fut)

    async def _enqueue(self, a: _Ask) -> tuple[list, asyncio.Future | None]:
        """The acquire script: granted at once, or queued with a Future registered for the grant."""
        listener = self.listener
        listener.start()  # in the background: the fast path does not wait for it
        listening = listener.listening()
        fut = listener.expect(a.token) if listening else None  # before the script may enqueue us
        try:
            res = await self._acquire_script(a, listening)
            if res[0] == -1:  # full, and not yet subscribed: subscribe, then queue
                await listener.wait_subscribed()
                fut = listener.expect(a.token)
                res = await self._acquire_script(a, True)
        except asyncio.CancelledError:
            listener.futures.pop(a.token, None)
            self.tasks.spawn(self._withdraw_later(a.uid, a.capacity, a.member, a.token))
            raise
        except BaseException:
            listener.futures.pop(a.token, None)
            self.defer_token(a.uid, a.capacity, a.member, a.token)  # it may have been granted or queued
            raise
        return res, fut

    async def _acquire_script(self, a: _Ask, may_enqueue: bool) -> list:
        return await self.scripts.acquire(keys=a.keys + [a.qkey], args=(
            a.prefix, a.capacity, a.member, a.weight, a.token, self.listener.channel, self._timeout_ms, a.ttl_ms,
            1 if may_enqueue else 0))

    async def _wait(self, a: _Ask, fut: asyncio.Future, earliest_ms: int) -> None:
        """Queued: wait for the grant or the deadline; poke when the earliest held slot is due to expire."""
        try:
            deadline = a.t0 + self.queue_timeout
            poke_at = a.t0 + earliest_ms / 1000 + MIN_POKE if earliest_ms >= 0 else None
            while not fut.done():
                now = time.monotonic()
                if now >= deadline:
                    break
                wake = deadline if poke_at is None else min(deadline, max(poke_at, now + MIN_POKE))
                await asyncio.wait((fut,), timeout=wake - now)
                if not fut.done() and poke_at is not None and time.monotonic() >= poke_at:
                    r = await self.scripts.release(keys=a.keys, args=(a.prefix, a.capacity, b""))
                    poke_at = time.monotonic() + r[3] / 1000 + MIN_POKE if r[3] >= 0 else None
        except asyncio.CancelledError:
            self.listener.futures.pop(a.token, None)
            self.tasks.spawn(self._withdraw_later(a.uid, a.capacity, a.member, a.token))
            raise
        except REDIS_ERRORS as exc:  # a poke failed
            self.failed(exc)
            fut.cancel()

    async def _after_wait(self, a: _Ask, fut: asyncio.Future) -> Slot:
        """Granted, lost with Redis (→ _RedisLost: wait locally), or timed out (withdraw)."""
        self.listener.futures.pop(a.token, None)
        waited = time.monotonic() - a.t0
        if fut.cancelled() or (fut.done() and not fut.result()):
            # Redis was lost while we waited: give back whatever Redis holds for us, wait locally.
            self.defer_token(a.uid, a.capacity, a.member, a.token)
            raise _RedisLost()
        if fut.done():
            return a.slot(waited)
        # Timed out: withdraw; a grant that raced in is still ours.
        try:
            r = await self.scripts.withdraw(keys=a.keys + [a.qkey], args=(a.prefix, a.capacity, a.member, a.token, 0))
        except asyncio.CancelledError:
            self.tasks.spawn(self._withdraw_later(a.uid, a.capacity, a.member, a.token))
            raise
        except REDIS_ERRORS as exc:
            self.failed(exc)
            self.defer_token(a.uid, a.capacity, a.member, a.token)
            raise QueueTimeout(self.holds.retry_after(a.uid, a.capacity, 1.0), waited) from None
        self.seen[a.uid] = (r[1], r[2])
        if r[0] == 1:
            return a.slot(waited)
        mine_w = r[5]
        total = r[4] + (0 if mine_w else a.weight)
        ahead = (r[3] + 1) * total / (mine_w or a.weight)
        raise QueueTimeout(self.holds.retry_after(a.uid, a.capacity, ahead), waited)

    # --- release, withdraw, replay ----------------------------------------------------------
    async def release(self, slot: Slot, now: float) -> None:
        """Give a slot back (or keep it, fast path); never raises."""
        if not self.fallback.usable(now):
            self.defer(slot)
            return
        if self.kept.keep(slot, now):
            return
        keys, prefix = self.keys_for(slot.upstream_id)
        try:
            res = await self.scripts.release(keys=keys, args=(prefix, slot.capacity, slot.token))
        except asyncio.CancelledError:
            self.tasks.spawn(self._release_later(slot))  # the script may or may not have run: run it again
            raise
        except Exception as exc:  # never raises
            if isinstance(exc, REDIS_ERRORS):
                self.failed(exc)
            else:
                log.exception("fair queue: release failed")
            self.defer(slot)
            return
        self.saw(slot.upstream_id, res[1], res[2], now)

    async def _withdraw_later(self, uid: int, capacity: int, member: int, token: bytes) -> None:
        """After a cancelled acquire: remove the entry, or release the slot if a grant raced in."""
        try:
            await self._withdraw_or_release(uid, capacity, member, token)
        except REDIS_ERRORS as exc:
            self.failed(exc)
            self.defer_token(uid, capacity, member, token)
        except asyncio.CancelledError:
            self.defer_token(uid, capacity, member, token)
            raise

    async def _withdraw_or_release(self, uid: int, capacity: int, member: int, token: bytes) -> None:
        """Take token out of Redis, whether it is still queued or was granted (the withdraw script's release mode)."""
        keys, prefix = self.keys_for(uid)
        qkey = prefix + str(member).encode()
        await self.scripts.withdraw(keys=keys + [qkey], args=(prefix, capacity, member, token, 1))

    async def _release_later(self, slot: Slot) -> None:
        keys, prefix = self.keys_for(slot.upstream_id)
        try:
            await self.scripts.release(keys=keys, args=(prefix, slot.capacity, slot.token))
        except REDIS_ERRORS as exc:
            self.failed(exc)
            self.defer(slot)
        except asyncio.CancelledError:
            self.defer(slot)
            raise

    def defer(self, slot: Slot) -> None:
        self.defer_token(slot.upstream_id, slot.capacity, slot.member_id, slot.token)

    def defer_token(self, uid: int, capacity: int, member: int, token: bytes) -> None:
        """Release (or withdraw) this token once Redis is back (dropped beyond MAX_PENDING)."""
        self.pending.add(uid, capacity, member, token)

    def flush_soon(self) -> None:
        """Replay, in the background, the releases/withdrawals that failed while Redis was unreachable."""
        if self.pending and not self.pending.draining:
            self.tasks.spawn(self._flush())

    async def _flush(self) -> None:
        try:
            await self.pending.drain(self._withdraw_or_release)
        except REDIS_ERRORS as exc:
            self.failed(exc)

    # --- failure and close ----------------------------------------------------------------
    def failed(self, exc: BaseException) -> None:
        """Redis failed: local mode for a while; waiters, kept slots and the listener do not survive it."""
        self.fallback.failed(exc)
        self.listener.lose_waiters()
        self.kept.drop_all()  # kept slots: released once Redis is back
        self.listener.drop()
        # No stale connections (idle ones only: other users of the shared client keep theirs).
        self.tasks.spawn(self.link.client.connection_pool.disconnect(inuse_connections=False))

    async def close(self) -> None:
        """Wake waiters, give back kept slots, stop listening, replay what an outage kept, finish tasks."""
        self.listener.lose_waiters()
        self.kept.close()
        await self.listener.stop()
        if self.fallback.usable():
            self.flush_soon()  # give back what an earlier outage kept from Redis
        await self.tasks.finish(timeout=1.0)  # let pending releases/withdrawals finish, briefly
