"""The gateway's one Redis link per process, and its one policy for when Redis fails.

Rate limits (``limits.py``) and the fair queue (``fairness/``) keep approximate, shared state in
Redis and carry on without it when it fails. Both go through this module:

- ``RedisLink.open(url)``: a handle on the process's one ``redis.asyncio`` client for ``url``
  (0.5 s socket and connect timeout, no retries, so an outage costs a request one short timeout
  at most). Every user opens its own handle and closes it once (``await link.close()``, safe to
  repeat); the client and its connections are closed when the last handle is. The fair queue's
  pub/sub listener takes its own connection from the same client's pool.
- ``Fallback``: "is Redis usable now" (not within ``retry_interval`` of a failure), "Redis
  failed" (count it, go without Redis for ``retry_interval``, log the caller's warning at most
  every ``warn_interval``) and the counters for metrics. Each user has its own (own windows,
  wording and counters); the code is this one.
- ``Replay``: the calls Redis missed during an outage (settlements, slot releases), at most
  ``limit`` of them, sent again once Redis answers, so an outage does not leave slots held in
  Redis until they expire.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

REDIS_TIMEOUT = 0.5  # seconds: socket and connect timeout
REDIS_ERRORS = (RedisError, OSError)  # what "Redis failed" means to the callers


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _Shared:
    """The client of one URL and how many open handles use it."""

    __slots__ = ("url", "client", "users", "loop")

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = _running_loop()  # the client's connections belong to this event loop (None: not known yet)
        self.client = Redis.from_url(url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT,
                                     retry_on_timeout=False, retry=Retry(NoBackoff(), 0))
        self.users = 0


class RedisLink:
    """One user's handle on the process's Redis client for a URL."""

    _shared: dict[str, _Shared] = {}  # url → client, for this process

    def __init__(self, shared: _Shared) -> None:
        self._entry: _Shared | None = shared
        self.client: Redis = shared.client

    @classmethod
    def open(cls, url: str) -> RedisLink:
        shared = cls._shared.get(url)
        if shared is not None and shared.loop is not None and shared.loop.is_closed():
            shared = None  # left open by a user of a finished event loop: unusable, start afresh
        if shared is None:
            shared = cls._shared[url] = _Shared(url)
        shared.users += 1
        return cls(shared)

    @property
    def closed(self) -> bool:
        return self._entry is None

    async def close(self) -> None:
        """This user is done with the client; the last one closes it. Safe to call again."""
        shared, self._entry = self._entry, None
        if shared is None:
            return
        shared.users -= 1
        if shared.users > 0:
            return
        if self._shared.get(shared.url) is shared:
            del self._shared[shared.url]
        try:
            await shared.client.aclose()
        except Exception:
            pass


class Fallback:
    """One user's Redis-failure policy: a retry window after each failure and a rate-limited warning.

    ``warning`` is a %-format string of the caller's wording, filled from a mapping with ``kind`` (the
    exception's class name) and ``error`` (the exception).
    """

    def __init__(self, log: logging.Logger, warning: str, *, retry_interval: float, warn_interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.warning = warning
        self.retry_interval = retry_interval
        self.warn_interval = warn_interval
        self.clock = clock
        self.down_until = 0.0  # clock() until which Redis is not tried again
        self.errors_total = 0  # Redis failures seen
        self.degraded_total = 0  # what the user served without Redis (the user counts it, see degraded())
        self._warned_at: float | None = None

    def usable(self, now: float | None = None) -> bool:
        """Redis may be tried now (no failure within the last retry_interval)."""
        return (self.clock() if now is None else now) >= self.down_until

    def failed(self, exc: BaseException) -> None:
        """Redis failed: count it, go without Redis for retry_interval, warn if not warned lately."""
        self.errors_total += 1
        now = self.clock()
        self.down_until = now + self.retry_interval
        if self._warned_at is None or now - self._warned_at >= self.warn_interval:
            self._warned_at = now
            self.log.warning(self.warning, {"kind": type(exc).__name__, "error": exc})

    def degraded(self) -> None:
        """Count one thing served without Redis because of it."""
        self.degraded_total += 1


class Replay:
    """Calls that Redis missed, to send again once it answers; at most ``limit`` are kept.

    An item is the argument tuple of the caller's send function. ``newest_first`` picks the order
    of ``drain``. Only one drain runs at a time; items added meanwhile are sent by it too.
    """

    def __init__(self, limit: int, *, newest_first: bool = False) -> None:
        self.limit = limit
        self.newest_first = newest_first
        self.items: deque[tuple] = deque()
        self.draining = False
        self.dropped_total = 0  # items not kept because the replay queue was full

    def __len__(self) -> int:
        return len(self.items)

    def add(self, *item) -> bool:
        if len(self.items) >= self.limit:
            self.dropped_total += 1
            return False
        self.items.append(item)
        return True

    async def drain(self, send: Callable[..., Awaitable]) -> None:
        """``await send(*item)`` for each item; if one raises, it stays queued and the error propagates."""
        if self.draining:
            return
        self.draining = True
        try:
            while self.items:
                item = self.items.pop() if self.newest_first else self.items.popleft()
                try:
                    await send(*item)
                except BaseException:
                    if self.newest_first:
                        self.items.append(item)
                    else:
                        self.items.appendleft(item)
                    raise
        finally:
            self.draining = False
