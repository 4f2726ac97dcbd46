//! Handing a partition's target windows to its next owner. The owner keeps its targets'
//! windows in memory (`cluster::gate`), so a new owner knows nothing of the sends the last one
//! made. Without more, it waits a target span after the last owner's sends stopped
//! ([`super::Owned::sendable_at`]): every chat of a partition that moves pauses about a second.
//! A replica that releases a partition cleanly (nothing sent to it in flight) writes the
//! sends it knows of that may still count (its [`Known`] log: its own answered sends and those
//! it was handed) next to the release; the claim reads them and the new owner counts them
//! and sends at once.
//!
//! Wire form (a string in the owners hash, `<p>:hand`): JSON `[[quota, "target", µs], …]`,
//! each send's latest arrival relative to the release (negative: before it). A sender's
//! clock is read before the release call and the receiver's after the claim's answer, so
//! both shifts make a send count later than it did, never earlier.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::quota::QuotaId;

/// A send to one of a partition's targets that may still count: its window (quota and
/// target) and its latest possible arrival.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownSend {
    pub quota: QuotaId,
    pub target: Arc<str>,
    pub at: Instant,
}

/// The sends this replica knows of per partition, for as long as they may count (a target
/// span after their arrival).
#[derive(Debug, Default)]
pub(super) struct Known {
    by_partition: HashMap<u16, VecDeque<KnownSend>>,
}

impl Known {
    /// Adds `send` to partition `p`'s log (oldest first), dropping what no longer counts at
    /// `now`.
    pub fn add(&mut self, p: u16, send: KnownSend, span: Duration, now: Instant) {
        let log = self.by_partition.entry(p).or_default();
        while log.front().is_some_and(|s| s.at + span <= now) {
            log.pop_front();
        }
        // Arrivals are logged as answered, nearly in order; keep the log sorted anyway.
        let at = log
            .iter()
            .rposition(|s| s.at <= send.at)
            .map_or(0, |i| i + 1);
        log.insert(at, send);
    }

    /// Partition `p`'s sends that may still count at `now`, in wire form relative to `now`.
    pub fn encode(&self, p: u16, span: Duration, now: Instant) -> String {
        let sends: Vec<(QuotaId, &str, i64)> = self
            .by_partition
            .get(&p)
            .into_iter()
            .flatten()
            .filter(|s| s.at + span > now)
            .map(|s| (s.quota, &*s.target, signed_micros(s.at, now)))
            .collect();
        serde_json::to_string(&sends).unwrap_or_else(|_| "[]".to_owned())
    }

    /// Forgets partition `p` (released: its next owner keeps its log).
    pub fn forget(&mut self, p: u16) {
        self.by_partition.remove(&p);
    }

    /// Forgets every partition (this replica left, or lost its lease).
    pub fn clear(&mut self) {
        self.by_partition.clear();
    }
}

/// `at − since` in µs, signed.
fn signed_micros(at: Instant, since: Instant) -> i64 {
    match at.checked_duration_since(since) {
        Some(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        None => -i64::try_from((since - at).as_micros()).unwrap_or(i64::MAX),
    }
}

/// The sends of a handover written at `released` (this clock), those that may still count at
/// `now`, oldest first; `None` when `wire` is not a handover.
pub fn decode(
    wire: &str,
    released: Instant,
    span: Duration,
    now: Instant,
) -> Option<Vec<KnownSend>> {
    let sends: Vec<(QuotaId, String, i64)> = serde_json::from_str(wire).ok()?;
    let mut out: Vec<KnownSend> = sends
        .into_iter()
        .filter_map(|(quota, target, off)| {
            let d = Duration::from_micros(off.unsigned_abs());
            let at = match off >= 0 {
                true => released.checked_add(d)?,
                false => released.checked_sub(d)?,
            };
            (at + span > now).then(|| KnownSend {
                quota,
                target: target.into(),
                at,
            })
        })
        .collect();
    out.sort_by_key(|s| s.at);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(quota: QuotaId, target: &str, at: Instant) -> KnownSend {
        KnownSend {
            quota,
            target: target.into(),
            at,
        }
    }

    #[test]
    fn a_handover_carries_what_may_still_count_and_never_moves_a_send_earlier() {
        let span = Duration::from_millis(1000);
        let t0 = Instant::now();
        let mut known = Known::default();
        known.add(7, send(0, "oc_a", t0), span, t0);
        known.add(
            7,
            send(0, "oc_a", t0 + Duration::from_millis(300)),
            span,
            t0,
        );
        // Answered out of order: kept sorted.
        known.add(
            7,
            send(2, "om_b", t0 + Duration::from_millis(200)),
            span,
            t0,
        );
        known.add(8, send(0, "oc_c", t0), span, t0);
        let released = t0 + Duration::from_millis(1100);
        let wire = known.encode(7, span, released);
        // The one at t0 no longer counts at the release.
        let back = decode(&wire, released, span, released).unwrap();
        assert_eq!(
            back,
            vec![
                send(2, "om_b", t0 + Duration::from_millis(200)),
                send(0, "oc_a", t0 + Duration::from_millis(300)),
            ]
        );
        // Read 150 ms later on a clock that puts the release 50 ms later: later, never earlier.
        let later = released + Duration::from_millis(50);
        let back = decode(&wire, later, span, later + Duration::from_millis(100)).unwrap();
        assert_eq!(back.len(), 1, "{back:?}");
        assert_eq!(back[0].at, t0 + Duration::from_millis(350));
        assert_eq!(decode("not json", released, span, released), None);
        known.forget(7);
        assert_eq!(known.encode(7, span, released), "[]");
        assert_ne!(known.encode(8, span, t0), "[]");
        known.clear();
        assert_eq!(known.encode(8, span, t0), "[]");
    }

    #[test]
    fn the_log_drops_sends_that_no_longer_count() {
        let span = Duration::from_millis(100);
        let t0 = Instant::now();
        let mut known = Known::default();
        for i in 0..50 {
            let at = t0 + Duration::from_millis(10 * i);
            known.add(1, send(0, "oc_a", at), span, at);
        }
        assert!(known.by_partition[&1].len() <= 11);
    }
}
