//! The Lua scripts of the shared quota store. Each runs atomically in Redis against its
//! `TIME`, so every replica's decisions share one clock and one order.

/// Applies the answers carried along (as SETTLE_LUA does), then checks every key of the
/// decision; records the send in all of them (returns {1, now}) or in none (returns {0,
/// wait_us, i}: when to ask again, and the key that waits longest).
/// ARGV[1] = a unique member for this send, ARGV[2] = hold (µs), ARGV[3] = n, the decision's
/// keys (KEYS[1..n]); KEYS[i] has ARGV[2i+2] = limit and ARGV[2i+3] = span (window + margin,
/// µs). Then the carried answers: triples (number of keys, member, µs since the answer) in
/// ARGV, their keys after the decision's in KEYS.
///
/// A member's score is the send's latest possible arrival at Feishu: `now + hold` while in
/// flight (an answer lowers it to the answer instant). A send may go when fewer than `limit`
/// members of every key may have arrived within the last span. Scores later than any send can
/// have (`now + hold + span`: a bad write, a clock jump) are dropped, and every wait is capped
/// at one span: the key is asked again then, so no value in Redis can wedge a key.
pub(super) const DECIDE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[3])
local hold = tonumber(ARGV[2])
local k = n + 1
for a = 4 + 2 * n, #ARGV, 3 do
  local m = tonumber(ARGV[a])
  local at = now - tonumber(ARGV[a + 2])
  for i = k, k + m - 1 do
    redis.call('ZADD', KEYS[i], 'XX', 'LT', at, ARGV[a + 1])
  end
  k = k + m
end
local wait = 0
local worst = 0
for i = 1, n do
  local limit = tonumber(ARGV[2 * i + 2])
  local span = tonumber(ARGV[2 * i + 3])
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
  local span = tonumber(ARGV[2 * i + 3])
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

/// `release(owners, me, p, hand, now)`: partition `p`, when still `me`'s, is released now with
/// its handover (`hand`; '' for none: its next owner waits a target span), as a Lua prelude
/// of PARTITIONS_LUA and LEAVE_LUA.
macro_rules! lua_release {
    () => {
        "local function release(owners, me, p, hand, now)\n  if redis.call('HGET', owners, p .. ':id') ~= me then return end\n  redis.call('HSET', owners, p .. ':id', '', p .. ':free', now)\n  if hand ~= '' then\n    redis.call('HSET', owners, p .. ':hand', hand, p .. ':from', me)\n  else\n    redis.call('HDEL', owners, p .. ':hand', p .. ':from')\n  end\nend\n"
    };
}

/// Partition ownership, one call per beat (`cluster::partitions`). KEYS[1] = members (sorted
/// set: replica → lease end, ms), KEYS[2] = owners (hash: `<p>:id`, `<p>:epoch`, `<p>:free`),
/// KEYS[3] = addresses (hash: replica → where its peers reach it).
/// ARGV[1] = this replica, ARGV[2] = lease (ms), ARGV[3] = 1 to join (else it must hold a
/// lease that has not ended), ARGV[4] = this replica's address (may be empty), ARGV[5] = how
/// many claims follow; then the partitions to claim, then the partitions to release, each
/// followed by its handover (`cluster::partitions::handover`; '' when its sends in flight
/// were not all answered: the next owner then waits a target span).
///
/// A replica whose lease ended is dead for good: it gets {-1} and must join again under a new
/// id. A partition may be claimed when it has no owner (released) or its owner is dead; the
/// claim bumps its epoch and records when its last owner's sends stopped (`free`: the
/// release, or the end of the dead owner's validity, a fifth of a lease before its lease end)
/// and takes the handover its releaser left (`<p>:hand`, `<p>:from`). Returns {1, now, n,
/// id1, end1, addr1, …, m, p1, epoch1, free1 − now, hand1, …}: every member known (lease end,
/// ended ones too; address or '') and the claims granted (a claim of a partition already this
/// replica's is granted again, with its epoch); `hand` is '' when none was left, and starts
/// with '=' when this replica left it.
pub(super) const PARTITIONS_LUA: &str = concat!(
    lua_release!(),
    r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local members, owners, me = KEYS[1], KEYS[2], ARGV[1]
local mine = redis.call('ZSCORE', members, me)
if ARGV[3] ~= '1' and (not mine or tonumber(mine) <= now) then return {-1} end
redis.call('ZADD', members, now + tonumber(ARGV[2]), me)
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], me, ARGV[4]) end
-- Members gone for 10 minutes are forgotten; their partitions are free since long ago.
for _, old in ipairs(redis.call('ZRANGEBYSCORE', members, '-inf', now - 600000)) do
  redis.call('HDEL', KEYS[3], old)
end
redis.call('ZREMRANGEBYSCORE', members, '-inf', now - 600000)
local nclaims = tonumber(ARGV[5])
local granted = {}
for i = 6, 5 + nclaims do
  local p = ARGV[i]
  local rec = redis.call('HMGET', owners, p .. ':id', p .. ':epoch', p .. ':free')
  local id, epoch, free = rec[1] or '', tonumber(rec[2] or '0'), tonumber(rec[3] or '0')
  local ok = id == '' or id == me
  if not ok then
    local until_ = redis.call('ZSCORE', members, id)
    if not until_ then
      ok = true
    elseif tonumber(until_) <= now then
      ok = true
      -- A dead owner stopped deciding a fifth of a lease before its lease ended (its
      -- validity, see cluster::partitions).
      free = math.max(free, tonumber(until_) - math.floor(tonumber(ARGV[2]) / 5))
    end
  end
  if ok then
    local hand = ''
    if id ~= me then
      epoch = epoch + 1
      if id == '' then
        local h = redis.call('HMGET', owners, p .. ':hand', p .. ':from')
        if h[1] then
          hand = h[1]
          if h[2] == me then hand = '=' .. hand end
        end
      end
      redis.call('HSET', owners, p .. ':id', me, p .. ':epoch', epoch, p .. ':free', free)
      redis.call('HDEL', owners, p .. ':hand', p .. ':from')
    end
    table.insert(granted, tonumber(p))
    table.insert(granted, epoch)
    table.insert(granted, free - now)
    table.insert(granted, hand)
  end
end
for i = 6 + nclaims, #ARGV, 2 do
  release(owners, me, ARGV[i], ARGV[i + 1], now)
end
local out = {1, now}
local all = redis.call('ZRANGE', members, 0, -1, 'WITHSCORES')
table.insert(out, #all / 2)
for j = 1, #all, 2 do
  table.insert(out, all[j])
  table.insert(out, all[j + 1])
  table.insert(out, redis.call('HGET', KEYS[3], all[j]) or '')
end
table.insert(out, #granted / 4)
for _, v in ipairs(granted) do table.insert(out, v) end
return out
"#
);

/// A replica stopping: KEYS[1] = members, KEYS[2] = owners, ARGV[1] = this replica, ARGV[2..]
/// = the partitions it held, each followed by its handover (as in PARTITIONS_LUA). Those
/// still its own are released now (their sends stopped now:
/// it waited for them), and its lease ends now (when it had one), so the others take them at
/// their next beat.
pub(super) const LEAVE_LUA: &str = concat!(
    lua_release!(),
    r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV, 2 do
  release(KEYS[2], ARGV[1], ARGV[i], ARGV[i + 1], now)
end
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) > now then redis.call('ZADD', KEYS[1], now, ARGV[1]) end
return 1
"#
);

/// The cluster's peer secret: KEYS[1] holds it; ARGV[1] becomes it when there is none yet.
/// Returns the one in force.
pub(super) const PEER_SECRET_LUA: &str = r#"
local s = redis.call('GET', KEYS[1])
if s then return s end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"#;
