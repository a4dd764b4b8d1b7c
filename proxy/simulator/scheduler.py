"""Running slots (``--max-num-seqs``) and an unbounded FIFO waiting queue, like vLLM's."""
from __future__ import annotations

import asyncio
from collections import deque


class Scheduler:
    """``running`` requests hold a slot; the rest wait in arrival order.

    A released slot is handed directly to the oldest waiter, so the order is strictly
    FIFO and ``running`` never exceeds ``max_num_seqs``. Cancelling a waiter (client
    gone) removes it from the queue; cancelling right after the hand-over gives the
    slot back.
    """

    def __init__(self, max_num_seqs: int, kv_cache_tokens: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.kv_cache_tokens = max(1, kv_cache_tokens)
        self.running = 0
        self.kv_tokens = 0
        self.max_running_seen = 0
        self.max_waiting_seen = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def kv_usage(self) -> float:
        return min(1.0, self.kv_tokens / self.kv_cache_tokens)

    def load_factor(self, factor: float) -> float:
        """ITL multiplier: 1 with one running request, ``factor`` with all slots running."""
        if factor == 1.0 or self.max_num_seqs <= 1:
            return 1.0
        busy = min(self.running, self.max_num_seqs)
        return 1.0 + (factor - 1.0) * (busy - 1) / (self.max_num_seqs - 1)

    async def acquire(self, kv_tokens: int = 0) -> None:
        """Take a running slot, waiting in FIFO order when all are busy."""
        if self.running < self.max_num_seqs and not self._waiters:
            self.running += 1
            if self.running > self.max_running_seen:
                self.max_running_seen = self.running
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            if len(self._waiters) > self.max_waiting_seen:
                self.max_waiting_seen = len(self._waiters)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release_slot()  # the slot was ours already: pass it on
                else:
                    try:
                        self._waiters.remove(fut)
                    except ValueError:
                        pass
                raise
        self.kv_tokens += kv_tokens

    def release(self, kv_tokens: int = 0) -> None:
        self.kv_tokens -= kv_tokens
        self._release_slot()

    def _release_slot(self) -> None:
        if self.running > self.max_num_seqs:  # shrunk at runtime: drain down to the new size first
            self.running -= 1
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # hand the slot over; running stays the same
                return
        self.running -= 1

    def resize(self, max_num_seqs: int) -> None:
        """Change the number of slots at runtime (growing wakes waiters)."""
        self.max_num_seqs = max(1, max_num_seqs)
        while self._waiters and self.running < self.max_num_seqs:
            fut = self._waiters.popleft()
            if not fut.done():
                self.running += 1
                fut.set_result(None)
        self.max_running_seen = max(self.max_running_seen, self.running)
