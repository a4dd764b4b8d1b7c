"""What every part of the fair queue shares: the ``Slot`` it hands out, the ``QueueTimeout`` it raises,
the retry-after estimate (``_HoldTimes``) and the background tasks it leaves running (``_Tasks``).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

EWMA_ALPHA = 0.2
EWMA_PRIOR = 10.0  # seconds a slot is assumed held until a release has been seen

_OFF, _REDIS, _LOCAL = 0, 1, 2  # Slot.mode: fair sharing off, slot held in Redis, slot held in this process


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


class _HoldTimes:
    """How long this process saw slots held, per upstream (EWMA), and the retry-after it implies."""

    __slots__ = ("ewma",)

    def __init__(self) -> None:
        self.ewma: dict[int, float] = {}

    def note(self, uid: int, held_for: float) -> None:
        e = self.ewma.get(uid, EWMA_PRIOR)
        self.ewma[uid] = e + EWMA_ALPHA * (held_for - e)

    def retry_after(self, uid: int, capacity: int, ahead: float) -> float:
        """Seconds until `ahead` more grants have gone by on `capacity` slots (at least 0.1)."""
        est = self.ewma.get(uid, EWMA_PRIOR) * ahead / capacity
        return max(0.1, round(est, 1))


class _Tasks:
    """Background tasks (releases, withdrawals, replays) that close() waits for or cancels."""

    __slots__ = ("tasks",)

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def finish(self, timeout: float) -> None:
        """Let the running tasks finish for up to `timeout` seconds, then cancel the rest."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
