//! Jobs stored by versions before the partitioned layout, all on the one slot
//! `{<prefix>:jobs}` (keys `seq`, `job:<seq>` with `rec`, `idem`, `caller`, `chat`, and the
//! `open` and `done` sets). Their ids stay valid: a legacy job is read where it is, and followed
//! to its partition once it moved. [`RedisJobStore::adopt_legacy`] moves the open ones, in the
//! order they were stored, into their partitions (each with its idempotency key, so two
//! replicas moving at once make one job), where their partition's owner runs them.

use redis::{Script, Value};

use super::record::JobRecord;
use super::redis::{RedisJobStore, Submitted, as_string, as_u64, bad, record};
use super::redis_scripts::lua_now_ms;
use super::seam::Limits;
use super::store::StoreError;
use crate::redis_conn::{bytes as text, int};

/// ARGV: base, seq. {rec, moved, open} of a legacy job ({} when unknown; moved: its number in
/// its partition, '' while it has not moved; open: 1 while not final).
const GET_LUA: &str = r#"
local b = ARGV[1]
local v = redis.call('HMGET', b .. ':job:' .. ARGV[2], 'rec', 'moved')
if not v[1] then return {} end
local open = redis.call('ZSCORE', b .. ':open', ARGV[2]) and 1 or 0
return {v[1], v[2] or '', open}
"#;

/// ARGV: base, limit. The first open legacy jobs: {seq1, rec1, idem1, caller1, …}.
const OPEN_LUA: &str = r#"
local b = ARGV[1]
local out = {}
for _, s in ipairs(redis.call('ZRANGE', b .. ':open', 0, tonumber(ARGV[2]) - 1)) do
  local v = redis.call('HMGET', b .. ':job:' .. s, 'rec', 'idem', 'caller')
  table.insert(out, s)
  table.insert(out, v[1] or '')
  table.insert(out, v[2] or '')
  table.insert(out, v[3] or '')
end
return out
"#;

/// ARGV: base, seq, its number in its partition. The legacy job moved: it leaves the open set
/// and points to where it went.
const MOVED_LUA: &str = concat!(
    lua_now_ms!(),
    r#"
local b = ARGV[1]
if redis.call('ZREM', b .. ':open', ARGV[2]) == 1 then
  redis.call('ZADD', b .. ':done', now, ARGV[2])
end
redis.call('HSET', b .. ':job:' .. ARGV[2], 'moved', ARGV[3])
return 1
"#
);

/// Jobs moved per call.
const BATCH: usize = 100;

/// A legacy job as read: its record, where it moved (if it did), whether it is open.
pub(super) struct Legacy {
    pub rec: JobRecord,
    pub moved: Option<u64>,
    pub open: bool,
}

impl RedisJobStore {
    pub(super) fn legacy_base(&self) -> String {
        format!("{{{}:jobs}}", self.redis.config().key_prefix)
    }

    /// Legacy job `seq`.
    pub(super) async fn legacy_get(&self, seq: u64) -> Result<Option<Legacy>, StoreError> {
        let script = Script::new(GET_LUA);
        let mut inv = self.invoke_on(&script, &self.legacy_base());
        inv.arg(seq);
        let v: Vec<Value> = self.run("job_get", inv).await?;
        match v.as_slice() {
            [] => Ok(None),
            [rec, moved, open] => {
                let moved = text(moved).ok_or(bad("get"))?;
                Ok(Some(Legacy {
                    rec: record(seq, text(rec).ok_or(bad("get"))?)?,
                    moved: std::str::from_utf8(moved).ok().and_then(|m| m.parse().ok()),
                    open: int(open) == Some(1),
                }))
            }
            _ => Err(bad("get")),
        }
    }

    /// Moves the open legacy jobs into their partitions, oldest first; how many moved.
    pub async fn adopt_legacy(&self) -> Result<u64, StoreError> {
        let base = self.legacy_base();
        let (open, moved) = (Script::new(OPEN_LUA), Script::new(MOVED_LUA));
        let mut total = 0;
        loop {
            let mut inv = self.invoke_on(&open, &base);
            inv.arg(BATCH);
            let v: Vec<Value> = self.run("job_adopt", inv).await?;
            if v.is_empty() {
                return Ok(total);
            }
            for job in v.chunks(4) {
                let [seq, rec, idem, caller] = job else {
                    return Err(bad("adopt"));
                };
                let seq = as_u64(seq).ok_or(bad("adopt"))?;
                let mut rec = record(seq, text(rec).ok_or(bad("adopt"))?)?;
                let idem = as_string(idem).ok_or(bad("adopt"))?;
                let caller = as_string(caller).ok_or(bad("adopt"))?;
                if !caller.is_empty() {
                    rec.caller = caller;
                }
                // Unbounded: it was accepted already.
                let limits = Limits {
                    max_jobs: u64::MAX,
                    per_caller: u64::MAX,
                };
                let to = match self.submit_within(&rec, &idem, limits).await? {
                    Submitted::New { seq, .. } => seq,
                    Submitted::Duplicate(known) => known.seq,
                    Submitted::Full(_) | Submitted::CallerFull(_) => return Err(bad("adopt")),
                };
                let mut inv = self.invoke_on(&moved, &base);
                inv.arg(seq).arg(to);
                let _: i64 = self.run("job_adopt", inv).await?;
                total += 1;
            }
        }
    }
}
