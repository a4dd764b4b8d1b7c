"""Fair sharing of a saturated upstream: per-member queues served in turn.

Each upstream (one vLLM server) has a capacity, its ``--max-num-seqs``
(``Upstream.max_concurrency``). A request takes a *slot* before it is forwarded
and gives it back when it is done (``acquire`` / ``release``). While fewer than
``capacity`` slots are held, ``acquire`` returns at once. Above that, requests
wait in one FIFO queue per member, and a freed slot goes straight to the next
waiter (the GPU never idles while someone waits) chosen by **deficit round
robin**: the members with waiting requests form a ring; the member at the head
receives up to ``weight`` grants (integer ≥ 1, default 1 → plain round robin),
then moves to the tail. A member whose queue empties leaves the ring (and loses
its left-over deficit); its next request joins at the tail. So a member sending
one request at a time waits for at most one turn of the ring, however much
another member floods, and while two members are backlogged they receive grants
in the ratio of their weights.

Shared state in Redis (all processes share one capacity and one set of queues)
------------------------------------------------------------------------------
Keys, with the upstream id as hash tag so one upstream's keys share a slot::

    qh:fq:{U}:held     ZSET  slot token → expiry (server ms: grant time + hold TTL)
    qh:fq:{U}:wait     HASH  waiting token → "channel|deadline_ms|hold_ttl_ms"
    qh:fq:{U}:q:<M>    LIST  member M's waiting tokens, FIFO
    qh:fq:{U}:ring     LIST  members with waiting requests, head = whose turn it is
    qh:fq:{U}:deficit  HASH  member → grants left in its current turn
    qh:fq:{U}:weight   HASH  member → weight (of members in the ring)

Every state change is one Lua script (EVALSHA), and scripts read the clock with
``TIME`` on the server, so gateway hosts need no synchronised clocks. (The
per-member queue keys of other members are built inside the scripts: fine on a
single Redis and on a cluster since they share the hash tag, though not declared.)

- ``acquire``: purge expired slots; if a slot is free and nobody waits, take it —
  **one round trip**, no pub/sub. Otherwise enqueue the token with the waiter's
  process channel and deadline, and wait for the grant. The waiter registers an
  asyncio Future *before* the enqueueing script runs and the process is
  subscribed to its channel (``qh:fq:ch:<process id>``) before any enqueue.
- ``release``: one script: remove the slot, purge expired slots, and while
  there is a free slot pop the next live waiter (DRR), add its token to the
  held set and ``PUBLISH`` the token on the waiter's channel. If PUBLISH reaches
  no subscriber (the waiting process is gone) the grant is taken back at once
  and the next waiter is served. **One round trip.**
- A waiter that times out or is cancelled runs the *withdraw* script: remove
  its entry if it is still queued; if a grant raced in, a timed-out waiter keeps
  the slot (it was granted in time, after all) and a cancelled one releases it.
  The pub/sub listener only resolves Futures and never frees anything itself, so
  the withdraw script is the one authority over a raced grant.

Fast path: kept slots (no Redis on the hot path below saturation)
-----------------------------------------------------------------
Two EVALSHA round trips per request cost the gateway ~10 % of its CPU although
most of the time the upstream is far from full. So a process *keeps* the slots
its requests give back and reuses them for its next requests without asking
Redis, as long as the upstream is clearly not saturated:

- A kept slot is an ordinary token in ``held`` (granted by the acquire script
  as always), so every process and every script counts it: Redis never sees
  fewer slots than are in use, and the scripts still never grant beyond
  ``capacity``. **The overshoot bound is therefore 0**: with Redis up, at most
  ``capacity`` requests (fast path or not, all processes together) hold a slot
  at any time, during the transition to saturation as at any other time. (The
  cost of the fast path is the opposite: a kept slot that sits idle is
  unavailable to others for a short while, see below.)
- ``release`` keeps the token (no Redis call) only if the upstream is below the
  threshold as last seen by this process: nobody waiting and at most
  ``FAST_FRACTION`` (75 %) of ``capacity`` slots held, seen ≤ 20 ms ago
  (``LINGER``). Otherwise it releases through the script as before (which
  dispatches to waiters).
- ``acquire`` takes a kept token (no Redis call) if that view is ≤ 10 ms old
  (``FRESH``) and shows nobody waiting — however full the upstream is: reusing
  a slot this process already holds adds nothing to what the upstream runs. If
  the view is older, one script (*sync*) reads the state and, if anyone waits,
  gives all idle kept tokens back (dispatching them to the waiters, DRR) and the
  request takes the per-request path; otherwise the token is reused. Each script
  result (acquire, release, sync, withdraw) refreshes the view. So under steady
  load a process talks to Redis about once per 10 ms, not twice per request;
  new slots are taken one acquire script each when its concurrency grows.
- A kept token idle for ``LINGER`` (20 ms) is given back by a timer (one
  script for all of them), so slots kept by a process whose traffic stopped
  return to the pool within 20 ms.
- Tokens are granted with a TTL of ``hold_ttl + reuse window`` (window =
  min(60 s, hold_ttl / 4)) and reused only within the window after their grant,
  so a request on a reused token still has at least ``hold_ttl`` before Redis
  would expire it. (A crashed process's slots thus expire after up to
  hold_ttl + 60 s.)
- Only for upstreams with ``capacity ≥ FAST_MIN_CAPACITY`` (8): with fewer
  slots, each one matters and every request takes the per-request path.

What this costs fairness, bounded: a waiter that enqueues while another process
holds kept tokens can be passed over by that process's own new requests reusing
them for at most ``FRESH`` (10 ms, until its view is refreshed), and a kept
token that becomes idle reaches the waiter at most ``LINGER`` (20 ms) late. At
saturation (someone waiting, or > 75 % held) no slot is kept and everything goes
through the per-request scripts: per-member queues and DRR exactly as before.
``fast_total`` counts acquires served from a kept slot. ``stats()`` counts
kept idle slots as in flight.

Crash safety: slots are scored by expiry (``hold_ttl``, default 15 min), so a
process that dies holding slots loses them after at most ``hold_ttl``; expired
slots are purged lazily by every script, and a waiter that sees nobody release
anything pokes (runs the release script with no slot) when the earliest slot is
due to expire. Queued entries carry their waiter's deadline (now + queue
timeout): entries of a timed-out or dead waiter are skipped when reached.
Releases that fail because Redis is unreachable are kept (at most 10 000) and
replayed when Redis answers again, so an outage does not leak slots for 15 min;
so are this process's kept idle tokens when Redis fails (the fast path is off
while the process is in local mode).

Retry-after (``QueueTimeout.retry_after``): an EWMA (α = 0.2, prior 10 s) of how
long this process saw slots held on the upstream, times the number of grants
that must go by before this member's next request would be served, divided by
the capacity (``capacity`` slots turn over every EWMA seconds)::

    retry_after = ewma_hold × (queued_of_member + 1) × Σweights_in_ring / weight / capacity

(≥ 0.1 s). With DRR, a backlogged member gets ``weight / Σweights`` of the
grants; with nobody else waiting this is "until one more slot frees".

Failure behaviour
-----------------
The Redis client uses a 0.5 s socket and connect timeout and no retries, so an
outage costs one request at most one short timeout. Any Redis error (refused,
timeout, reset, script error) switches the process to the **per-process**
implementation of the same algorithm (asyncio Futures, same DRR) for 5 s
(``redis_retry_interval``), after which the next ``acquire`` tries Redis again
and goes back to it if it answers. Waiters queued in Redis when it fails are
moved to the local queues with the rest of their timeout. A warning is logged at
most every 30 s; ``degraded_total`` counts the acquires served locally because
of Redis trouble and ``redis_errors_total`` counts the Redis failures (both
plain integers for metrics).

How capacity is split while Redis is down: not at all — **each process bounds
itself to the full capacity**, so N gateway processes may together send up to
N × capacity requests to the upstream. vLLM's own FIFO waiting queue absorbs
the excess: nothing fails, but fairness holds only within each process. Slots
held locally are not known to Redis, so just after Redis returns the upstream
may briefly see more than its capacity (until those requests finish).

With ``redis_url`` empty or None (embedded mode) only the local implementation
is used, without warnings. With ``enabled=False`` ``acquire`` returns a dummy
slot at once (fair sharing off; the benchmark compares both).
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

log = logging.getLogger("qwenhub.fairness")

REDIS_TIMEOUT = 0.5  # seconds: socket and connect timeout
REDIS_RETRY_INTERVAL = 5.0  # seconds in local mode before trying Redis again
WARN_INTERVAL = 30.0  # at most one "Redis unavailable" warning per this many seconds
SUBSCRIBE_TIMEOUT = 1.0
EWMA_ALPHA = 0.2
EWMA_PRIOR = 10.0  # seconds a slot is assumed held until a release has been seen
MAX_PENDING = 10_000  # failed releases kept for replay
MIN_POKE = 0.05
# Fast path (kept slots, see the module docstring)
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
# Lua. KEYS[1..5] = held, wait, ring, deficit, weight; ARGV[1] = queue key prefix, ARGV[2] = capacity.
_LUA_COMMON = """
local H, E, R, D, W = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local P = ARGV[1]
local cap = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function leave(m)
  redis.call('LREM', R, 1, m)
  redis.call('HDEL', D, m)
  redis.call('HDEL', W, m)
end

local function pop_live(q)
  while true do
    local tok = redis.call('LPOP', q)
    if not tok then return nil end
    local info = redis.call('HGET', E, tok)
    if info then
      redis.call('HDEL', E, tok)
      local ch, dl, ttl = string.match(info, '^(.+)|(%d+)|(%d+)$')
      if ch and tonumber(dl) > now then return tok, ch, tonumber(ttl) end
    end
  end
end

local function dispatch(n)
  local budget = 1000
  while n < cap and budget > 0 do
    budget = budget - 1
    local m = redis.call('LINDEX', R, 0)
    if not m then break end
    local q = P .. m
    local tok, ch, ttl = pop_live(q)
    if not tok then
      redis.call('LPOP', R)
      redis.call('HDEL', D, m)
      redis.call('HDEL', W, m)
    else
      local dc = tonumber(redis.call('HGET', D, m) or 0)
      if dc <= 0 then dc = tonumber(redis.call('HGET', W, m) or 1) end
      dc = dc - 1
      if redis.call('LLEN', q) == 0 then
        redis.call('LPOP', R)
        redis.call('HDEL', D, m)
        redis.call('HDEL', W, m)
      elseif dc <= 0 then
        redis.call('HDEL', D, m)
        redis.call('LMOVE', R, R, 'LEFT', 'RIGHT')
      else
        redis.call('HSET', D, m, dc)
      end
      redis.call('ZADD', H, now + ttl, tok)
      if redis.call('PUBLISH', ch, tok) > 0 then
        n = n + 1
      else
        redis.call('ZREM', H, tok)
      end
    end
  end
  return n
end

-- Drop expired slots, hand free ones to waiters; return slots held and waiters left.
local function settle_slots()
  redis.call('ZREMRANGEBYSCORE', H, '-inf', now)
  local n = redis.call('ZCARD', H)
  local qn = redis.call('HLEN', E)
  if qn > 0 and n < cap then
    n = dispatch(n)
    qn = redis.call('HLEN', E)
  end
  return n, qn
end

local function earliest()
  local e = redis.call('ZRANGE', H, 0, 0, 'WITHSCORES')
  if e[2] then return tonumber(e[2]) - now end
  return -1
end
"""

# KEYS[6] = this member's queue; ARGV: 3 member, 4 weight, 5 token, 6 channel, 7 timeout_ms, 8 ttl_ms, 9 may_enqueue
# → {1 granted | 0 queued | -1 full (not queued), in_flight, queued, ms until the earliest slot expires}
_LUA_ACQUIRE = _LUA_COMMON + """
redis.call('ZREMRANGEBYSCORE', H, '-inf', now)
local n = redis.call('ZCARD', H)
if n < cap and redis.call('HLEN', E) > 0 then n = dispatch(n) end
if n < cap then
  redis.call('ZADD', H, now + tonumber(ARGV[8]), ARGV[5])
  return {1, n + 1, redis.call('HLEN', E), 0}
end
if ARGV[9] == '0' then return {-1, n, redis.call('HLEN', E), 0} end
local m = ARGV[3]
redis.call('HSET', E, ARGV[5], ARGV[6] .. '|' .. string.format('%d', now + tonumber(ARGV[7])) .. '|' .. ARGV[8])
redis.call('RPUSH', KEYS[6], ARGV[5])
redis.call('HSET', W, m, ARGV[4])
if not redis.call('LPOS', R, m) then redis.call('RPUSH', R, m) end
return {0, n, redis.call('HLEN', E), earliest()}
"""

# ARGV[3..] = tokens ('' to only purge and dispatch) → {removed, in_flight, queued, ms until earliest expiry | -1}
_LUA_RELEASE = _LUA_COMMON + """
local r = 0
for i = 3, #ARGV do r = r + redis.call('ZREM', H, ARGV[i]) end
local n, qn = settle_slots()
if qn > 0 then return {r, n, qn, earliest()} end
return {r, n, 0, -1}
"""

# KEYS[6] = the member's queue; ARGV: 3 member, 4 token, 5 release a raced grant ('1') or keep it ('0')
# → {0 withdrawn | 1 granted (kept) | 2 granted and released | 3 neither, in_flight, queued,
#    member's queued, Σ weights in ring, member's weight in ring (0 = not in ring)}
_LUA_WITHDRAW = _LUA_COMMON + """
local m, tok, q = ARGV[3], ARGV[4], KEYS[6]
local status = 3
if redis.call('HDEL', E, tok) == 1 then
  status = 0
  redis.call('LREM', q, 1, tok)
  if redis.call('LLEN', q) == 0 then leave(m) end
elseif redis.call('ZSCORE', H, tok) then
  status = 1
  if ARGV[5] == '1' then
    status = 2
    redis.call('ZREM', H, tok)
    redis.call('ZREMRANGEBYSCORE', H, '-inf', now)
    dispatch(redis.call('ZCARD', H))
  end
end
local total, mine = 0, 0
local ws = redis.call('HGETALL', W)
for i = 1, #ws, 2 do
  local w = tonumber(ws[i + 1]) or 1
  total = total + w
  if ws[i] == m then mine = w end
end
return {status, redis.call('ZCARD', H), redis.call('HLEN', E), redis.call('LLEN', q), total, mine}
"""


# Fast path: is reusing kept slots still fine? ARGV: 3 limit (held ≤ limit), 4.. this process's idle
# kept tokens. If anyone waits or more than `limit` slots are held, the kept tokens are given back
# (and dispatched to waiters). → {1 given back | 0 keep them, in_flight, queued}
_LUA_SYNC = _LUA_COMMON + """
local n, qn = settle_slots()
if qn > 0 then
  for i = 4, #ARGV do redis.call('ZREM', H, ARGV[i]) end
  n = redis.call('ZCARD', H)
  if qn > 0 and n < cap then
    n = dispatch(n)
    qn = redis.call('HLEN', E)
  end
  return {1, n, qn}
end
return {0, n, qn}
"""


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
                if k.timer is None:
                    k.timer = asyncio.get_running_loop().call_later(LINGER, self._linger, uid)
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
        keys, prefix = self._keys_for(uid)
        qkey = prefix + str(member).encode()
        try:
            await self._s_withdraw(keys=keys + [qkey], args=(prefix, capacity, member, token, 1))
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            self._defer_token(uid, capacity, member, token)
        except asyncio.CancelledError:
            self._defer_token(uid, capacity, member, token)
            raise

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
                uid, capacity, member, token = self._pending[-1]
                keys, prefix = self._keys_for(uid)
                qkey = prefix + str(member).encode()
                try:
                    await self._s_withdraw(keys=keys + [qkey], args=(prefix, capacity, member, token, 1))
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
