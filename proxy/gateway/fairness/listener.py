"""The fair queue's pub/sub listener: grants published on this process's channel resolve waiters' Futures.

The listener only resolves Futures and never frees anything itself (the withdraw script is the one
authority over a raced grant, see the package docstring). It takes its own connection from the
shared client's pool; a failure on it is reported to ``on_error`` (Redis mode's failure handler).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from redis.asyncio import Redis

from proxy.gateway.fairness.slot import _RedisLost

SUBSCRIBE_TIMEOUT = 1.0  # seconds to wait for the subscription's confirmation


class _Listener:
    """This process's subscription to its channel, and the waiters' Futures by slot token."""

    def __init__(self, client: Redis, channel: bytes, on_error: Callable[[BaseException], None]) -> None:
        self.client = client
        self.channel = channel
        self.on_error = on_error
        self.futures: dict[bytes, asyncio.Future] = {}  # token → waiter's Future
        self.task: asyncio.Task | None = None
        self.subscribed: asyncio.Future | None = None

    def listening(self) -> bool:
        """Subscribed and confirmed: a grant published now reaches this process."""
        s = self.subscribed
        return (s is not None and s.done() and not s.cancelled() and s.exception() is None
                and self.task is not None and not self.task.done())

    def start(self) -> None:
        """Start listening in the background unless already started."""
        if self.task is None or self.task.done():
            loop = asyncio.get_running_loop()
            self.subscribed = loop.create_future()
            self.task = loop.create_task(self._listen(self.subscribed))

    async def wait_subscribed(self) -> None:
        await asyncio.wait_for(asyncio.shield(self.subscribed), SUBSCRIBE_TIMEOUT)

    def expect(self, token: bytes) -> asyncio.Future:
        """A Future the grant of `token` resolves (True; False if Redis was lost meanwhile)."""
        fut = self.futures[token] = asyncio.get_running_loop().create_future()
        return fut

    async def _listen(self, subscribed: asyncio.Future) -> None:
        pubsub = self.client.pubsub()
        try:
            await self._subscribe(pubsub)
            subscribed.set_result(True)
            futures = self.futures
            while True:
                msg = await pubsub.get_message(timeout=None)
                if msg is not None and msg["type"] == "message":
                    fut = futures.get(msg["data"])
                    if fut is not None and not fut.done():
                        fut.set_result(True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.on_error(exc)
        finally:
            if not subscribed.done():
                subscribed.set_exception(_RedisLost())
                subscribed.exception()
            try:
                await pubsub.aclose()
            except Exception:
                pass

    async def _subscribe(self, pubsub) -> None:
        await pubsub.subscribe(self.channel)
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
        while True:  # wait for the confirmation: only then can grants reach us
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no subscribe confirmation")
            msg = await pubsub.get_message(timeout=left)
            if msg is not None and msg["type"] == "subscribe":
                return

    def lose_waiters(self) -> None:
        """Wake every waiter with False: Redis is gone, they carry on in local mode."""
        for fut in self.futures.values():
            if not fut.done():
                fut.set_result(False)

    def drop(self) -> None:
        """After a Redis failure: stop listening (unless this is the listener itself failing)."""
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        self.task = None

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is None or task is asyncio.current_task():
            return
        # A cancellation that lands while the listener connects and subscribes can be lost inside
        # redis-py (seen with 8.1: close() then waited for ever); cancel until the task ends.
        while not task.done():
            task.cancel()
            await asyncio.wait((task,), timeout=0.1)
        await asyncio.gather(task, return_exceptions=True)
