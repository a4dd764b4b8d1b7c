"""The Lua scripts of the fair queue: every change of its shared state in Redis is one of them.

``_LUA_COMMON`` (key names, the server clock, expiry purge and the deficit round robin dispatch) is
the prelude of each script; ``_LUA_ACQUIRE``, ``_LUA_RELEASE``, ``_LUA_WITHDRAW`` and ``_LUA_SYNC``
are registered by the Redis mode (``redis_mode.py``) and run with EVALSHA. The keys and the
protocol are described in the package docstring (``proxy/gateway/fairness/__init__.py``).
"""

# Lua. KEYS[1..5] = held, wait, ring, deficit, weight; ARGV[1] = queue key prefix, ARGV[2] = capacity.
_LUA_COMMON = """
local H, E, R, D, W = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local P = ARGV[1]
local cap = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- No key lives for ever: each write gives its key a TTL at least as long as the entry it adds can
-- live (a slot until its expiry score, a waiter until its deadline), plus KEEP; only ever lengthened.
local KEEP = 10000
local function expire_after(k, ms)
  if redis.call('PTTL', k) < ms then redis.call('PEXPIRE', k, ms) end
end

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
        expire_after(D, math.max(redis.call('PTTL', R), KEEP))
      end
      redis.call('ZADD', H, now + ttl, tok)
      expire_after(H, ttl + KEEP)
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
  expire_after(H, tonumber(ARGV[8]) + KEEP)
  return {1, n + 1, redis.call('HLEN', E), 0}
end
if ARGV[9] == '0' then return {-1, n, redis.call('HLEN', E), 0} end
local m = ARGV[3]
redis.call('HSET', E, ARGV[5], ARGV[6] .. '|' .. string.format('%d', now + tonumber(ARGV[7])) .. '|' .. ARGV[8])
redis.call('RPUSH', KEYS[6], ARGV[5])
redis.call('HSET', W, m, ARGV[4])
if not redis.call('LPOS', R, m) then redis.call('RPUSH', R, m) end
local keep = tonumber(ARGV[7]) + KEEP
expire_after(E, keep)
expire_after(KEYS[6], keep)
expire_after(W, keep)
expire_after(R, keep)
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
