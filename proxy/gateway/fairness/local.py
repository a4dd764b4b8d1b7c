"""Local mode, the per-process fallback of the fair queue: slots and member queues in this process.

``_LocalQueue`` (one upstream) runs the same deficit round robin as the Lua scripts, with asyncio
Futures instead of Redis lists; ``_LocalMode`` keeps one per upstream and acquires and releases
slots on them. ``FairQueue`` uses it in embedded mode (no Redis) and while Redis is unreachable,
when each process bounds itself to the full capacity (see the package docstring).
"""
from __future__ import annotations

import asyncio
import time
from collections import deque

from proxy.gateway.fairness.slot import _LOCAL, QueueTimeout, Slot, _HoldTimes


class _LocalQueue:
    """One upstream's slots and queues inside this process (the same DRR, with Futures)."""

    __slots__ = ("in_flight", "queued", "ring", "queues", "deficit", "weights")

    def __init__(self) -> None:
        self.in_flight = 0
        self.queued = 0  # live waiters
        self.ring: deque[int] = deque()  # members with a queue; head = whose turn
        self.queues: dict[int, deque[asyncio.Future]] = {}
        self.deficit: dict[int, int] = {}
        self.weights: dict[int, int] = {}

    def enqueue(self, member: int, weight: int, fut: asyncio.Future) -> None:
        q = self.queues.get(member)
        if q is None:
            q = self.queues[member] = deque()
            self.ring.append(member)
        self.weights[member] = weight
        q.append(fut)
        self.queued += 1

    def _leave_head(self, member: int) -> None:
        self.ring.popleft()
        del self.queues[member]
        self.deficit.pop(member, None)
        self.weights.pop(member, None)

    def _next(self) -> asyncio.Future | None:
        while self.ring:
            m = self.ring[0]
            q = self.queues[m]
            while q and q[0].done():  # withdrawn (cancelled) waiters
                q.popleft()
            if not q:
                self._leave_head(m)
                continue
            fut = q.popleft()
            dc = self.deficit.get(m, 0)
            if dc <= 0:
                dc = self.weights.get(m, 1)
            dc -= 1
            while q and q[0].done():
                q.popleft()
            if not q:
                self._leave_head(m)
            elif dc <= 0:
                self.deficit.pop(m, None)
                self.ring.rotate(-1)
            else:
                self.deficit[m] = dc
            return fut
        return None

    def dispatch(self, capacity: int) -> None:
        while self.in_flight < capacity and self.queued:
            fut = self._next()
            if fut is None:
                self.queued = 0  # (cannot happen: every live waiter is in a queue)
                return
            fut.set_result(True)
            self.in_flight += 1
            self.queued -= 1

    def withdraw(self, member: int, fut: asyncio.Future) -> None:
        """Forget a waiter that was not granted (its Future is left cancelled in the queue)."""
        fut.cancel()
        self.queued -= 1
        q = self.queues.get(member)
        if q is not None and all(f.done() for f in q):  # no live waiter left: leave the ring
            self.ring.remove(member)
            del self.queues[member]
            self.deficit.pop(member, None)
            self.weights.pop(member, None)

    def ahead(self, member: int, weight: int) -> float:
        """Grants that go by before this member's next request would be served."""
        q = self.queues.get(member)
        mine = sum(1 for f in q if not f.done()) if q else 0
        total = sum(self.weights.get(m, 1) for m in self.ring)
        if q is None:
            total += weight
        else:
            weight = self.weights.get(member, weight)
        return (mine + 1) * total / weight


class _LocalMode:
    """Slots of every upstream kept in this process (embedded mode, or while Redis is down)."""

    def __init__(self, queue_timeout: float, holds: _HoldTimes) -> None:
        self.queue_timeout = queue_timeout
        self.holds = holds
        self.queues: dict[int, _LocalQueue] = {}

    def stats(self, uid: int) -> dict:
        lq = self.queues.get(uid)
        return {"in_flight": lq.in_flight, "queued": lq.queued} if lq else {"in_flight": 0, "queued": 0}

    async def acquire(self, uid: int, capacity: int, member: int, weight: int, t0: float) -> Slot:
        lq = self.queues.get(uid)
        if lq is None:
            lq = self.queues[uid] = _LocalQueue()
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
        raise QueueTimeout(self.holds.retry_after(uid, capacity, ahead), waited)

    def release(self, slot: Slot) -> None:
        lq = self.queues[slot.upstream_id]
        lq.in_flight -= 1
        if lq.queued:
            lq.dispatch(slot.capacity)
