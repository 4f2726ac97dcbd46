//! The Lua scripts of the cluster job store. Each runs atomically in Redis on one slot.
//!
//! A job lives in its partition (`cluster::partitions`, the partition of its queue: its chat,
//! or `user:<id>`): every key of a partition's jobs is `ARGV[1]`, the partition's base
//! `{<prefix>:p:<n>}:jobs` (the hash tag the partition's user windows use too), followed by a
//! suffix; `KEYS[1]` is always `<base>:seq`, declared so that a cluster client routes the call
//! to that slot.
//!
//! Keys under a partition's base:
//! - `seq`: the partition's last job number (INCR; the job's id carries the partition too).
//! - `job:<n>`: hash `rec` (the record, JSON), `idem` (the idempotency key), `caller`.
//! - `idem:<key>`: the number of the job made for (caller, app, uuid). The key lives on the
//!   chat's partition: a retry of the same call names the same chat, so any replica finds it.
//! - `open`, `done`: sorted sets of the jobs not final (score: number) and final (score: when
//!   it ended, ms).
//! - `owner`: hash `id`, `epoch`: the member running the partition's jobs and the epoch of its
//!   claim (`cluster::partitions`), written when it takes them (FENCE). Every write is fenced
//!   on it: a replica whose partition moved writes nothing.
//! - `cancel`: list of job numbers whose cancel was asked of the owner.
//!
//! Elsewhere (not a partition's slot):
//! - `{<tag>}:jobs:caller:<caller>` on one of the 12 spread tags (`cluster::spread_tags`, by
//!   caller): sorted set of the caller's open jobs (member: idempotency key, score: when it
//!   stops counting, ms), its bound of open jobs checked at submit before the job is stored.
//!   An entry left by a replica that died between the two calls stops counting at the job's
//!   expiry.
//! - `{<prefix>:r:<member>}:jobs:inbox`: list of partitions with news for a member (a job
//!   stored or a cancel asked by another replica), read every poll.

/// `remove_done(b, s)`: removes finished job `s` with its idempotency key (expiry, and a
/// full partition making room), as a Lua prelude.
macro_rules! lua_remove_done {
    () => {
        "local function remove_done(b, s)\n  local job = b .. ':job:' .. s\n  local idem = redis.call('HGET', job, 'idem')\n  if idem then redis.call('DEL', b .. ':idem:' .. idem) end\n  redis.call('DEL', job)\n  redis.call('ZREM', b .. ':done', s)\nend\n"
    };
}

/// Redis `TIME` in ms, as a Lua prelude.
macro_rules! lua_now_ms {
    () => {
        "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    };
}

/// `owns(b)`: whether ARGV[2] (member) and ARGV[3] (epoch) are the partition's owner, as a Lua
/// prelude.
macro_rules! lua_owns {
    () => {
        "local function owns(b)\n  local o = redis.call('HMGET', b .. ':owner', 'id', 'epoch')\n  return o[1] == ARGV[2] and o[2] == ARGV[3]\nend\n"
    };
}

pub(super) use lua_now_ms;

/// ARGV: base, idempotency key, record, caller, jobs the partition may hold. Returns
/// {0, n, rec} for a known key, {-1, open} when every job the partition may hold is open,
/// {1, n, owner} when stored (a full partition first removes its oldest finished jobs; owner:
/// the member running the partition's jobs, '' before one took them).
pub(super) const SUBMIT_LUA: &str = concat!(
    lua_remove_done!(),
    r#"
local b = ARGV[1]
local idem = b .. ':idem:' .. ARGV[2]
local known = redis.call('GET', idem)
if known then
  local rec = redis.call('HGET', b .. ':job:' .. known, 'rec')
  if rec then return {0, tonumber(known), rec} end
end
local open = redis.call('ZCARD', b .. ':open')
local max = tonumber(ARGV[5])
if open >= max then return {-1, open} end
local over = open + redis.call('ZCARD', b .. ':done') - max + 1
if over > 0 then
  for _, s in ipairs(redis.call('ZRANGE', b .. ':done', 0, over - 1)) do
    remove_done(b, s)
  end
end
local seq = redis.call('INCR', KEYS[1])
redis.call('HSET', b .. ':job:' .. seq, 'rec', ARGV[3], 'idem', ARGV[2], 'caller', ARGV[4])
redis.call('SET', idem, seq)
redis.call('ZADD', b .. ':open', seq, seq)
return {1, seq, redis.call('HGET', b .. ':owner', 'id') or ''}
"#
);

/// ARGV: base, member, epoch. The member takes the partition's jobs with the epoch of its
/// claim: 1, or 0 when a later claim took them already.
pub(super) const FENCE_LUA: &str = r#"
local owner = ARGV[1] .. ':owner'
if tonumber(ARGV[3]) < tonumber(redis.call('HGET', owner, 'epoch') or '0') then return 0 end
redis.call('HSET', owner, 'id', ARGV[2], 'epoch', ARGV[3])
return 1
"#;

/// ARGV: base, member, epoch, n, record, final (1/0). Writes the record of open job `n` only
/// while the member owns the partition at that epoch. A final record leaves the open set.
/// Returns {1, caller, idem} when written (a final job's caller and idempotency key: it
/// leaves the caller's count), {0} when not the owner or the job is final already.
pub(super) const UPDATE_LUA: &str = concat!(
    lua_owns!(),
    r#"
local b = ARGV[1]
if not owns(b) or not redis.call('ZSCORE', b .. ':open', ARGV[4]) then return {0} end
local job = b .. ':job:' .. ARGV[4]
redis.call('HSET', job, 'rec', ARGV[5])
if ARGV[6] ~= '1' then return {1} end
"#,
    lua_now_ms!(),
    r#"
redis.call('ZREM', b .. ':open', ARGV[4])
redis.call('ZADD', b .. ':done', now, ARGV[4])
local v = redis.call('HMGET', job, 'caller', 'idem')
return {1, v[1] or '', v[2] or ''}
"#
);

/// ARGV: base, member, epoch, after, limit. The partition's open jobs numbered after `after`
/// (in order) and the cancels asked: {n, n1, rec1, …, nn, recn, cancel…}; {-1} when the member
/// does not own the partition at that epoch.
pub(super) const POLL_LUA: &str = concat!(
    lua_owns!(),
    r#"
local b = ARGV[1]
if not owns(b) then return {-1} end
local seqs = redis.call('ZRANGEBYSCORE', b .. ':open', '(' .. ARGV[4], '+inf', 'LIMIT', 0, tonumber(ARGV[5]))
local out = {#seqs}
for _, s in ipairs(seqs) do
  table.insert(out, s)
  table.insert(out, redis.call('HGET', b .. ':job:' .. s, 'rec') or '')
end
local cancels = redis.call('LPOP', b .. ':cancel', 1000)
if cancels then
  for _, s in ipairs(cancels) do table.insert(out, s) end
end
return out
"#
);

/// ARGV: base, n. Asks the partition's owner to cancel open job `n`: {1, owner} when asked
/// (owner '' before one took the partition: it reads the list when it does), {0} when the job
/// is final or unknown.
pub(super) const ASK_CANCEL_LUA: &str = r#"
local b = ARGV[1]
if not redis.call('ZSCORE', b .. ':open', ARGV[2]) then return {0} end
redis.call('RPUSH', b .. ':cancel', ARGV[2])
return {1, redis.call('HGET', b .. ':owner', 'id') or ''}
"#;

/// ARGV: base, n. {rec, owner} of job `n` ({} when unknown; owner '' once final or before a
/// member took the partition).
pub(super) const GET_LUA: &str = r#"
local b = ARGV[1]
local rec = redis.call('HGET', b .. ':job:' .. ARGV[2], 'rec')
if not rec then return {} end
local owner = ''
if redis.call('ZSCORE', b .. ':open', ARGV[2]) then
  owner = redis.call('HGET', b .. ':owner', 'id') or ''
end
return {rec, owner}
"#;

/// ARGV: base, keep (ms), limit. Removes final jobs of the partition that ended more than
/// `keep` ago, with their idempotency keys; returns {removed, stored}.
pub(super) const EXPIRE_LUA: &str = concat!(
    lua_remove_done!(),
    lua_now_ms!(),
    r#"
local b = ARGV[1]
local gone = redis.call('ZRANGEBYSCORE', b .. ':done', '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, tonumber(ARGV[3]))
for _, s in ipairs(gone) do
  remove_done(b, s)
end
return {#gone, redis.call('ZCARD', b .. ':open') + redis.call('ZCARD', b .. ':done')}
"#
);

/// KEYS: the caller's set, then sets of the same slot with a job to give back each. ARGV:
/// idempotency key, bound, until (ms), then the job given back per extra key. Gives those back
/// first, then counts the job in its caller's open jobs unless the caller has `bound`
/// already: {1}, or {-2, open}. A key counted already (a repeated submit) passes. Entries past
/// their time are dropped first.
pub(super) const RESERVE_LUA: &str = concat!(
    lua_now_ms!(),
    r#"
for i = 2, #KEYS do redis.call('ZREM', KEYS[i], ARGV[i + 2]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {1} end
local open = redis.call('ZCARD', KEYS[1])
if open >= tonumber(ARGV[2]) then return {-2, open} end
redis.call('ZADD', KEYS[1], tonumber(ARGV[3]), ARGV[1])
return {1}
"#
);

/// KEYS: callers' sets (one slot); ARGV: the job given back per key.
pub(super) const RELEASE_LUA: &str = r#"
for i = 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[i]) end
return #KEYS
"#;
