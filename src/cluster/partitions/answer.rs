//! The partitions beat's answer, as Redis returns it (PARTITIONS_LUA).

use redis::Value;

use crate::redis_conn::{ClusterError, bytes, int};

fn string(v: &Value) -> Option<String> {
    String::from_utf8(bytes(v)?.to_vec()).ok()
}

fn bad(what: &str) -> ClusterError {
    ClusterError::Protocol(format!("partitions beat answered {what}"))
}

/// A beat's answer: Redis's clock (ms), members with their lease ends and addresses, claims
/// granted.
pub(super) struct Answer {
    pub now_ms: i64,
    pub members: Vec<(String, i64, String)>,
    pub granted: Vec<Grant>,
}

/// A claim granted.
pub(super) struct Grant {
    pub p: u16,
    pub epoch: u64,
    /// When the last owner's sends stopped, relative to Redis's clock (ms).
    pub free_in_ms: i64,
    /// The handover its last owner left, and whether that was this replica.
    pub hand: Option<(String, bool)>,
}

pub(super) fn parse(v: &[Value]) -> Result<Option<Answer>, ClusterError> {
    let status = v.first().and_then(int).ok_or_else(|| bad("no status"))?;
    if status == -1 {
        return Ok(None);
    }
    let now_ms = v.get(1).and_then(int).ok_or_else(|| bad("no time"))?;
    let n = v.get(2).and_then(int).ok_or_else(|| bad("no members"))?;
    let n = usize::try_from(n).map_err(|_| bad("a negative count"))?;
    let mut members = Vec::with_capacity(n);
    for i in 0..n {
        let id = v.get(3 + 3 * i).and_then(string);
        let end = v.get(4 + 3 * i).and_then(int);
        let addr = v.get(5 + 3 * i).and_then(string);
        match (id, end, addr) {
            (Some(id), Some(end), Some(addr)) => members.push((id, end, addr)),
            _ => return Err(bad("a bad member")),
        }
    }
    let at = 3 + 3 * n;
    let m = v.get(at).and_then(int).ok_or_else(|| bad("no claims"))?;
    let m = usize::try_from(m).map_err(|_| bad("a negative count"))?;
    let mut granted = Vec::with_capacity(m);
    for i in 0..m {
        let f = |k: usize| v.get(at + 1 + 4 * i + k).and_then(int);
        let hand = v.get(at + 4 + 4 * i).and_then(string);
        match (f(0), f(1), f(2), hand) {
            (Some(p), Some(e), Some(w), Some(hand)) => granted.push(Grant {
                p: u16::try_from(p).map_err(|_| bad("a bad partition"))?,
                epoch: u64::try_from(e).map_err(|_| bad("a bad epoch"))?,
                free_in_ms: w,
                hand: match hand.strip_prefix('=') {
                    Some(mine) => Some((mine.to_owned(), true)),
                    None => (!hand.is_empty()).then_some((hand, false)),
                },
            }),
            _ => return Err(bad("a bad claim")),
        }
    }
    Ok(Some(Answer {
        now_ms,
        members,
        granted,
    }))
}
