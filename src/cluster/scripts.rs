//! The Lua scripts of the shared quota store. Each runs atomically in Redis against its
//! `TIME`, so every replica's decisions share one clock and one order.

/// Checks every key; records the send in all of them (returns {1, now}) or in none (returns
/// {0, wait_us, i}: when to ask again, and the key that waits longest).
/// ARGV[1] = a unique member for this send, ARGV[2] = hold (µs); KEYS[i] has
/// ARGV[2i+1] = limit and ARGV[2i+2] = span (window + margin, µs).
///
/// A member's score is the send's latest possible arrival at Feishu: `now + hold` while in
/// flight (SETTLE lowers it to the answer instant). A send may go when fewer than `limit`
/// members of every key may have arrived within the last span. Scores later than any send can
/// have (`now + hold + span`: a bad write, a clock jump) are dropped, and every wait is capped
/// at one span: the key is asked again then, so no value in Redis can wedge a key.
pub(super) const DECIDE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local hold = tonumber(ARGV[2])
local wait = 0
local worst = 0
for i = 1, n do
  local limit = tonumber(ARGV[2 * i + 1])
  local span = tonumber(ARGV[2 * i + 2])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - span)
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '(' .. (now + hold + span), '+inf')
  local c = redis.call('ZCARD', KEYS[i])
  if c >= limit then
    local e = redis.call('ZRANGE', KEYS[i], c - limit, c - limit, 'WITHSCORES')
    local w = math.min(tonumber(e[2]) + span - now, span)
    if w > wait then wait = w; worst = i end
  end
end
if wait > 0 then return {0, wait, worst} end
for i = 1, n do
  local span = tonumber(ARGV[2 * i + 2])
  redis.call('ZADD', KEYS[i], now + hold, ARGV[1])
  redis.call('PEXPIRE', KEYS[i], math.floor((span + hold) / 1000) + 1000)
end
return {1, now}
"#;

/// Records past sends: ARGV[1] = span (µs), ARGV[2] = member prefix, ARGV[3..] = each send's
/// latest possible arrival minus now (µs, may be positive for a send in flight).
pub(super) const REPLAY_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local span = tonumber(ARGV[1])
local latest = now
for i = 3, #ARGV do
  local at = now + tonumber(ARGV[i])
  if at > latest then latest = at end
  redis.call('ZADD', KEYS[1], at, ARGV[2] .. ':' .. i)
end
redis.call('PEXPIRE', KEYS[1], math.floor((latest - now + span) / 1000) + 1000)
return #ARGV - 2
"#;

/// Answers came back: each send arrived by then. ARGV is a list of triples (number of keys,
/// member, µs since the answer); KEYS are the sends' keys one after the other. A member that
/// aged out (or was released) is not re-added; a score only moves earlier.
pub(super) const SETTLE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local k = 1
for a = 1, #ARGV, 3 do
  local n = tonumber(ARGV[a])
  local at = now - tonumber(ARGV[a + 2])
  for i = k, k + n - 1 do
    redis.call('ZADD', KEYS[i], 'XX', 'LT', at, ARGV[a + 1])
  end
  k = k + n
end
return 1
"#;

/// Forgets one send that never left: KEYS = its keys, ARGV[1] = member. Returns how many keys
/// held it (0 when the decision never reached Redis or refused).
pub(super) const RELEASE_LUA: &str = r#"
local n = 0
for i = 1, #KEYS do
  n = n + redis.call('ZREM', KEYS[i], ARGV[1])
end
return n
"#;

/// Treat a key as spent until `wait` from now: ARGV[1] = limit, ARGV[2] = span, ARGV[3] = wait
/// (µs). Adds `limit` phantom sends at (now + wait − span); newer real sends still count.
pub(super) const BLOCK_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local span = tonumber(ARGV[2])
local at = now + tonumber(ARGV[3]) - span
for i = 1, limit do
  redis.call('ZADD', KEYS[1], 'GT', at, 'block:' .. i)
  redis.call('ZADD', KEYS[1], 'NX', at, 'block:' .. i)
end
redis.call('PEXPIRE', KEYS[1], math.floor(span / 1000) + 1000)
return limit
"#;

/// Heartbeat: KEYS[1] replicas zset, ARGV[1] replica id; returns replicas seen in 5 s.
pub(super) const HEARTBEAT_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 5000)
redis.call('PEXPIRE', KEYS[1], 60000)
return redis.call('ZCARD', KEYS[1])
"#;

/// Reads keys without changing them (introspection): ARGV[2i-1] = limit, ARGV[2i] = span (µs)
/// of KEYS[i]. Returns {used, frees_in_us} per key, counted like DECIDE counts.
pub(super) const INSPECT_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i - 1])
  local span = tonumber(ARGV[2 * i])
  local live = redis.call('ZRANGEBYSCORE', KEYS[i], '(' .. (now - span), '+inf', 'WITHSCORES')
  local c = #live / 2
  local frees = 0
  if c >= limit then
    frees = math.max(0, math.min(tonumber(live[2 * (c - limit) + 2]) + span - now, span))
  end
  table.insert(out, c)
  table.insert(out, frees)
end
return out
"#;
