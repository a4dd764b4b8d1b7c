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

Every key has a TTL: a write gives its key at least the life of what it adds (a slot
until its expiry, a waiter until its deadline) plus 10 s, so an upstream nobody uses
any more, or a crash, leaves nothing behind for ever.

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
The Redis client is the process's one client for the URL, shared with the rate
limits (``proxy/gateway/redis_link.py``, which also holds the failure policy
below: retry window, rate-limited warning, counters, bounded replay queue). It
uses a 0.5 s socket and connect timeout and no retries, so an
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

Modules
-------
``queue.py`` the ``FairQueue`` façade (Redis mode or local mode per call);
``redis_mode.py`` the scripts' calls, waiting for grants, withdrawal, replay;
``listener.py`` the pub/sub listener; ``kept.py`` the fast path (kept slots);
``local.py`` local mode; ``slot.py`` ``Slot``, ``QueueTimeout``, retry-after
estimate, background tasks; ``lua.py`` the scripts.
"""
from proxy.gateway.fairness.queue import FairQueue, QueueTimeout, Slot

__all__ = ["FairQueue", "QueueTimeout", "Slot"]
