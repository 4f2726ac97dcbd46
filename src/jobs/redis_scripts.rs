//! The Lua scripts of the cluster job store. Each runs atomically in Redis. Every key is
//! `ARGV[1]` (the store's base, `{<prefix>:jobs}`, one hash tag: one slot on Redis Cluster)
//! followed by a suffix; `KEYS[1]` is always `<base>:seq`, declared so that a cluster client
//! routes the call to that slot.
//!
//! Keys under the base:
//! - `seq`: the last job number (INCR).
//! - `job:<seq>`: hash `rec` (the record, JSON), `chat`, `idem` (the idempotency key),
//!   `caller` (whose open-job count it is in; absent for jobs stored before the counts).
//! - `callers`: hash caller → its open jobs (bounded per caller at submit).
//! - `idem:<key>`: the seq of the job made for (caller, app, uuid).
//! - `open`, `done`: sorted sets of the jobs not final (score seq) and final (score: when it
//!   ended, ms).
//! - `owned:<replica>`: sorted set of the open jobs a replica runs (score seq). A job's owner
//!   is the replica whose set holds it; writes are fenced on that.
//! - `chat:<chat>`: hash `owner`, `open`: the replica running that chat's open jobs and how
//!   many there are; `chats:<replica>`: the chats a replica runs. A new job of a chat goes to
//!   that replica, so one replica runs a chat's jobs in order, and a takeover moves them
//!   together.
//! - `replicas`: sorted set replica → lease end (ms, Redis `TIME`); `lost:<replica>`: set
//!   when its jobs were taken over, until it renews (and learns it).
//! - `cancel:<replica>`: list of seqs to cancel, asked from other replicas.

/// `remove_done(b, s)`: removes finished job `s` with its idempotency key (expiry, and a
/// full store making room), as a Lua prelude.
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

/// ARGV: base, idempotency key, record, chat, this replica, max jobs, lease (ms), caller,
/// open jobs per caller. Returns {0, seq, rec} for a known key, {-2, open} when the caller is
/// at its bound, {-1, open} when every job the store may hold is open, {1, seq, owner} when
/// stored (a full store first removes its oldest finished jobs).
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
local mine = tonumber(redis.call('HGET', b .. ':callers', ARGV[8]) or '0')
if mine >= tonumber(ARGV[9]) then return {-2, mine} end
local open = redis.call('ZCARD', b .. ':open')
local max = tonumber(ARGV[6])
if open >= max then return {-1, open} end
local over = open + redis.call('ZCARD', b .. ':done') - max + 1
if over > 0 then
  for _, s in ipairs(redis.call('ZRANGE', b .. ':done', 0, over - 1)) do
    remove_done(b, s)
  end
end
local seq = redis.call('INCR', KEYS[1])
local chat = b .. ':chat:' .. ARGV[4]
local owner = redis.call('HGET', chat, 'owner')
if not owner then
  owner = ARGV[5]
  redis.call('HSET', chat, 'owner', owner)
  redis.call('SADD', b .. ':chats:' .. owner, ARGV[4])
end
-- Every owner of a job is in the lease set, so its jobs are taken over once it is gone. A
-- replica not in it (before its first lease, or after its jobs were taken) gets one lease
-- from now: it takes it over in time if it is alive, and loses the job if not.
if not redis.call('ZSCORE', b .. ':replicas', owner) then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', b .. ':replicas', now + tonumber(ARGV[7]), owner)
end
redis.call('HINCRBY', chat, 'open', 1)
redis.call('HSET', b .. ':job:' .. seq, 'rec', ARGV[3], 'chat', ARGV[4], 'idem', ARGV[2], 'caller', ARGV[8])
redis.call('HINCRBY', b .. ':callers', ARGV[8], 1)
redis.call('SET', idem, seq)
redis.call('ZADD', b .. ':open', seq, seq)
redis.call('ZADD', b .. ':owned:' .. owner, seq, seq)
return {1, seq, owner}
"#
);

/// ARGV: base, seq, this replica, record, final (1/0). Writes the record only while this
/// replica owns the job (a replica whose jobs were taken over writes nothing). A final record
/// leaves the open sets. Returns 1 when written, 0 when not the owner.
pub(super) const UPDATE_LUA: &str = concat!(
    r#"
local b = ARGV[1]
local owned = b .. ':owned:' .. ARGV[3]
if not redis.call('ZSCORE', owned, ARGV[2]) then return 0 end
local job = b .. ':job:' .. ARGV[2]
redis.call('HSET', job, 'rec', ARGV[4])
if ARGV[5] == '1' then
"#,
    lua_now_ms!(),
    r#"
  redis.call('ZREM', b .. ':open', ARGV[2])
  redis.call('ZREM', owned, ARGV[2])
  redis.call('ZADD', b .. ':done', now, ARGV[2])
  local caller = redis.call('HGET', job, 'caller')
  if caller and redis.call('HINCRBY', b .. ':callers', caller, -1) <= 0 then
    redis.call('HDEL', b .. ':callers', caller)
  end
  local c = redis.call('HGET', job, 'chat') or ''
  local chat = b .. ':chat:' .. c
  if redis.call('HINCRBY', chat, 'open', -1) <= 0 then
    redis.call('DEL', chat)
    redis.call('SREM', b .. ':chats:' .. ARGV[3], c)
  end
end
return 1
"#
);

/// ARGV: base, this replica, after seq, limit. The jobs this replica owns numbered after
/// `after` (in order) and the cancels asked of it: {n, seq1, rec1, …, seqn, recn, cancel…}.
pub(super) const POLL_LUA: &str = r#"
local b = ARGV[1]
local seqs = redis.call('ZRANGEBYSCORE', b .. ':owned:' .. ARGV[2], '(' .. ARGV[3], '+inf', 'LIMIT', 0, tonumber(ARGV[4]))
local out = {#seqs}
for _, s in ipairs(seqs) do
  table.insert(out, s)
  table.insert(out, redis.call('HGET', b .. ':job:' .. s, 'rec') or '')
end
local cancels = redis.call('LPOP', b .. ':cancel:' .. ARGV[2], 1000)
if cancels then
  for _, s in ipairs(cancels) do table.insert(out, s) end
end
return out
"#;

/// ARGV: base, this replica, lease (ms), new (1: register). Extends this replica's lease.
/// Returns 0 when the replica was declared dead and its jobs taken (it must drop them), else 1.
pub(super) const LEASE_LUA: &str = concat!(
    lua_now_ms!(),
    r#"
local reps = ARGV[1] .. ':replicas'
local lost = redis.call('DEL', ARGV[1] .. ':lost:' .. ARGV[2]) == 1
if ARGV[4] ~= '1' and (lost or not redis.call('ZSCORE', reps, ARGV[2])) then return 0 end
redis.call('ZADD', reps, now + tonumber(ARGV[3]), ARGV[2])
return 1
"#
);

/// ARGV: base, this replica. Takes over the jobs and chats of every replica whose lease has
/// ended (a set union and one write per chat, not per job); returns how many jobs it took.
/// The taker then reads its jobs from the start (POLL) and runs the new ones in order.
pub(super) const CLAIM_LUA: &str = concat!(
    lua_now_ms!(),
    r#"
local b = ARGV[1]
local me = ARGV[2]
local reps = b .. ':replicas'
local mine = b .. ':owned:' .. me
local taken = 0
for _, d in ipairs(redis.call('ZRANGEBYSCORE', reps, '-inf', now)) do
  if d ~= me then
    local owned = b .. ':owned:' .. d
    taken = taken + redis.call('ZCARD', owned)
    redis.call('ZUNIONSTORE', mine, 2, mine, owned)
    for _, c in ipairs(redis.call('SMEMBERS', b .. ':chats:' .. d)) do
      redis.call('HSET', b .. ':chat:' .. c, 'owner', me)
      redis.call('SADD', b .. ':chats:' .. me, c)
    end
    redis.call('DEL', owned, b .. ':chats:' .. d, b .. ':cancel:' .. d)
    redis.call('ZREM', reps, d)
    -- Told at its next renewal, even if it is in the lease set again by then.
    redis.call('SET', b .. ':lost:' .. d, 1, 'PX', 86400000)
  end
end
return taken
"#
);

/// ARGV: base, this replica. A replica stopping: its lease ends now, so the others take its
/// jobs at their next claim.
pub(super) const HANDOFF_LUA: &str = r#"
if redis.call('ZSCORE', ARGV[1] .. ':replicas', ARGV[2]) then
  redis.call('ZADD', ARGV[1] .. ':replicas', 0, ARGV[2])
end
return 1
"#;

/// ARGV: base, seq. Asks the job's owner to cancel it: 1 when asked, 0 when it has no owner
/// (final).
pub(super) const ASK_CANCEL_LUA: &str = r#"
local b = ARGV[1]
if not redis.call('ZSCORE', b .. ':open', ARGV[2]) then return 0 end
local chat = redis.call('HGET', b .. ':job:' .. ARGV[2], 'chat')
local owner = chat and redis.call('HGET', b .. ':chat:' .. chat, 'owner')
if not owner then return 0 end
redis.call('RPUSH', ARGV[1] .. ':cancel:' .. owner, ARGV[2])
return 1
"#;

/// ARGV: base, seq. {rec, owner} of a job ({} when unknown; owner '' once final).
pub(super) const GET_LUA: &str = r#"
local b = ARGV[1]
local v = redis.call('HMGET', b .. ':job:' .. ARGV[2], 'rec', 'chat')
if not v[1] then return {} end
local owner = ''
if v[2] and redis.call('ZSCORE', b .. ':open', ARGV[2]) then
  owner = redis.call('HGET', b .. ':chat:' .. v[2], 'owner') or ''
end
return {v[1], owner}
"#;

/// ARGV: base, keep (ms), limit. Removes final jobs that ended more than `keep` ago, with their
/// idempotency keys; returns {removed, stored}.
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
