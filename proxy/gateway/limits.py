"""Per-member rate limits: requests/min, tokens/min and concurrent requests.

Shared by every gateway process through Redis: one Lua script checks and takes
all three at admission (one round trip), another gives back the concurrency
slot and corrects the token bucket with the real usage when the request ends.

Requests/min and tokens/min are token buckets that refill continuously
(limit/60 per second), so `retry-after` is exact: the time until the bucket
holds what the request needs. Tokens are taken at admission as an estimate
(prompt bytes / 4 + max_tokens × n, as OpenAI counts max_tokens) and corrected
to the real count when the request settles. Concurrency slots live in a sorted
set with an expiry, so a crashed process cannot hold a slot forever.

Redis is allowed to fail: limits then fall back to the same buckets kept in
this process (a per-process bound) for 5 s, with a warning logged (at most every
30 s) and counted; settlements Redis missed are replayed when it answers again.
The client and that policy are the process's shared ones (``redis_link.py``).
Quotas are not affected: they live in the database.
"""
import logging
import math
import time
from dataclasses import dataclass

from proxy.gateway import errors
from proxy.gateway.errors import ApiError
from proxy.gateway.keys import KeyInfo
from proxy.gateway.redis_link import REDIS_ERRORS, Fallback, RedisLink, Replay

log = logging.getLogger("qwenhub.gateway")

RATE_LIMITED = (
    "Rate limit reached for {what}: {limit} per {per}. Please retry after {seconds:.1f} seconds."
)
TOO_MANY_CONCURRENT = (
    "You already have {limit} requests in progress, the most your plan allows at once. "
    "Wait for one to finish."
)
REQUEST_TOO_LARGE_FOR_TPM = (
    "This request needs about {tokens} tokens, more than your limit of {limit} tokens per minute. "
    "Lower max_tokens."
)
REDIS_DOWN_WARNING = "Redis unavailable (%(kind)s): rate limits are per process until it is back"
SLOT_TTL_MS = 15 * 60 * 1000  # a concurrency slot is forgotten after 15 minutes whatever happens
REDIS_RETRY_INTERVAL = 5.0  # seconds per process after a Redis failure before trying Redis again
WARN_EVERY = 30.0  # at most one "Redis unavailable" warning per this many seconds
MAX_PENDING = 10_000  # settlements kept for replay while Redis is unreachable

_ADMIT = """
local now = tonumber(ARGV[1])
local rpm, tpm, conc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens, rid, ttl = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local function level(key, limit)
  if limit <= 0 then return -1 end
  local v = redis.call('HMGET', key, 'l', 't')
  local l = tonumber(v[1]) or limit
  local t = tonumber(v[2]) or now
  return math.min(limit, l + (now - t) * limit / 60000)
end
local rl, tl = level(KEYS[1], rpm), level(KEYS[2], tpm)
local inflight = 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  inflight = redis.call('ZCARD', KEYS[3])
  if inflight >= conc then return {'concurrency', '0', tostring(rl), tostring(tl)} end
end
if rpm > 0 and rl < 1 then
  return {'requests', tostring(math.ceil((1 - rl) * 60000 / rpm)), tostring(rl), tostring(tl)}
end
if tpm > 0 and tl < tokens then
  if tokens > tpm then return {'too_large', '-1', tostring(rl), tostring(tl)} end
  return {'tokens', tostring(math.ceil((tokens - tl) * 60000 / tpm)), tostring(rl), tostring(tl)}
end
if rpm > 0 then
  rl = rl - 1
  redis.call('HSET', KEYS[1], 'l', rl, 't', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if tpm > 0 then
  tl = tl - tokens
  redis.call('HSET', KEYS[2], 'l', tl, 't', now)
  redis.call('PEXPIRE', KEYS[2], 120000)
end
if conc > 0 then
  redis.call('ZADD', KEYS[3], now + ttl, rid)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return {'ok', '0', tostring(rl), tostring(tl)}
"""

_SETTLE = """
local now, tpm, delta, rid = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if tpm > 0 and delta ~= 0 then
  local v = redis.call('HMGET', KEYS[1], 'l', 't')
  local l = tonumber(v[1]) or tpm
  local t = tonumber(v[2]) or now
  l = math.min(tpm, l + (now - t) * tpm / 60000) - delta
  redis.call('HSET', KEYS[1], 'l', l, 't', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
redis.call('ZREM', KEYS[2], rid)
return 1
"""


def _duration(seconds: float) -> str:
    """Format like OpenAI's x-ratelimit-reset-* headers: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest}s"


@dataclass(slots=True)
class Admission:
    """What admission took for one request, and the headers that describe it."""

    member_id: int
    request_id: str
    tokens: int
    tokens_per_minute: int
    holds_slot: bool
    local: bool
    headers: list[tuple[bytes, bytes]]


class _LocalBuckets:
    """The same buckets in one process, for when Redis is absent or failing."""

    def __init__(self) -> None:
        self.buckets: dict[tuple[int, str], tuple[float, float]] = {}
        self.inflight: dict[int, set[str]] = {}

    def _level(self, member_id: int, kind: str, limit: int, now: float) -> float:
        if limit <= 0:
            return -1.0
        level, at = self.buckets.get((member_id, kind), (float(limit), now))
        return min(limit, level + (now - at) * limit / 60000)

    def admit(self, member_id, rpm, tpm, conc, tokens, rid, now) -> list[str]:
        rl, tl = self._level(member_id, "r", rpm, now), self._level(member_id, "t", tpm, now)
        held = self.inflight.setdefault(member_id, set())
        if conc > 0 and len(held) >= conc:
            return ["concurrency", "0", str(rl), str(tl)]
        if rpm > 0 and rl < 1:
            return ["requests", str(math.ceil((1 - rl) * 60000 / rpm)), str(rl), str(tl)]
        if tpm > 0 and tl < tokens:
            if tokens > tpm:
                return ["too_large", "-1", str(rl), str(tl)]
            return ["tokens", str(math.ceil((tokens - tl) * 60000 / tpm)), str(rl), str(tl)]
        if rpm > 0:
            rl -= 1
            self.buckets[(member_id, "r")] = (rl, now)
        if tpm > 0:
            tl -= tokens
            self.buckets[(member_id, "t")] = (tl, now)
        if conc > 0:
            held.add(rid)
        return ["ok", "0", str(rl), str(tl)]

    def settle(self, member_id, tpm, delta, rid, now) -> None:
        if tpm > 0 and delta:
            self.buckets[(member_id, "t")] = (self._level(member_id, "t", tpm, now) - delta, now)
        self.inflight.get(member_id, set()).discard(rid)


class RateLimiter:
    """Rate limits in Redis, through the process's shared link; per process while Redis fails."""

    def __init__(self, redis_url: str | None) -> None:
        self.link = RedisLink.open(redis_url) if redis_url else None
        self.redis = self.link.client if self.link else None
        self._admit = self.redis.register_script(_ADMIT) if self.redis else None
        self._settle = self.redis.register_script(_SETTLE) if self.redis else None
        self.local = _LocalBuckets()
        self.fallback = Fallback(log, REDIS_DOWN_WARNING, retry_interval=REDIS_RETRY_INTERVAL, warn_interval=WARN_EVERY)
        # Settlements of Redis admissions that failed: replayed once Redis answers again,
        # so a blip does not hold concurrency slots for SLOT_TTL_MS.
        self._pending = Replay(MAX_PENDING)

    @property
    def degraded_total(self) -> int:
        """Times Redis failed and limits fell back to this process."""
        return self.fallback.errors_total

    def _use_redis(self) -> bool:
        return self._admit is not None and self.fallback.usable()

    async def admit(self, key: KeyInfo, request_id: str, tokens: int) -> Admission | None:
        """Take one request, `tokens` tokens and a concurrency slot, or raise a 429 ApiError."""
        rpm, tpm, conc = key.requests_per_minute or 0, key.tokens_per_minute or 0, key.max_concurrent_requests or 0
        if not (rpm or tpm or conc):
            return None
        now = time.time() * 1000
        args = [now, rpm, tpm, conc, tokens, request_id, SLOT_TTL_MS]
        local = True
        if self._use_redis():
            m = key.member_id
            try:
                if self._pending:
                    await self._pending.drain(self._send_settle)
                result = [v.decode() if isinstance(v, bytes) else str(v) for v in await self._admit(
                    keys=[f"qh:rl:{m}:r", f"qh:rl:{m}:t", f"qh:rl:{m}:c"], args=args)]
                local = False
            except REDIS_ERRORS as exc:
                self.fallback.failed(exc)
        if local:
            result = self.local.admit(key.member_id, rpm, tpm, conc, tokens, request_id, now)
        verdict, wait_ms, r_level, t_level = result[0], int(result[1]), float(result[2]), float(result[3])
        headers = self._headers(rpm, tpm, r_level, t_level)
        if verdict == "ok":
            return Admission(member_id=key.member_id, request_id=request_id, tokens=tokens, tokens_per_minute=tpm,
                             holds_slot=conc > 0, local=local, headers=headers)
        raise self._refusal(verdict, wait_ms, tokens, rpm, tpm, conc, headers)

    @staticmethod
    def _refusal(verdict: str, wait_ms: int, tokens: int, rpm: int, tpm: int, conc: int,
                 headers: list[tuple[bytes, bytes]]) -> ApiError:
        """The 429 for a refused admission."""
        if verdict == "too_large":
            return errors.over_rate_limit(REQUEST_TOO_LARGE_FOR_TPM.format(tokens=tokens, limit=tpm), headers=headers)
        if verdict == "concurrency":
            message = TOO_MANY_CONCURRENT.format(limit=conc)
            wait_ms = 1000  # the soonest a slot is likely free; the SDK backs off from here
        else:
            what, limit = ("requests", rpm) if verdict == "requests" else ("tokens", tpm)
            message = RATE_LIMITED.format(what=what, limit=limit, per="minute", seconds=wait_ms / 1000)
        return errors.rate_limited(message, kind="tokens" if verdict == "tokens" else "requests", wait_ms=wait_ms,
                                   headers=headers)

    @staticmethod
    def _headers(rpm: int, tpm: int, r_level: float, t_level: float) -> list[tuple[bytes, bytes]]:
        headers = []
        if rpm:
            headers += [
                (b"x-ratelimit-limit-requests", str(rpm).encode()),
                (b"x-ratelimit-remaining-requests", str(max(0, math.floor(r_level))).encode()),
                (b"x-ratelimit-reset-requests", _duration((rpm - r_level) * 60 / rpm).encode()),
            ]
        if tpm:
            headers += [
                (b"x-ratelimit-limit-tokens", str(tpm).encode()),
                (b"x-ratelimit-remaining-tokens", str(max(0, math.floor(t_level))).encode()),
                (b"x-ratelimit-reset-tokens", _duration((tpm - t_level) * 60 / tpm).encode()),
            ]
        return headers

    async def settle(self, admission: Admission | None, actual_tokens: int) -> None:
        """Give back the concurrency slot and correct the token bucket; never raises."""
        if admission is None:
            return
        delta = actual_tokens - admission.tokens
        now = time.time() * 1000
        if admission.local or self._settle is None:
            self.local.settle(admission.member_id, admission.tokens_per_minute, delta, admission.request_id, now)
            return
        m = admission.member_id
        keys, args = [f"qh:rl:{m}:t", f"qh:rl:{m}:c"], [now, admission.tokens_per_minute, delta, admission.request_id]
        try:
            await self._send_settle(keys, args)
        except REDIS_ERRORS as exc:
            self.fallback.failed(exc)
            self._pending.add(keys, args)

    async def _send_settle(self, keys: list[str], args: list) -> None:
        await self._settle(keys=keys, args=args)

    async def close(self) -> None:
        """Let go of the shared Redis link (closed with its last user); safe to call again."""
        if self.link is not None:
            await self.link.close()
