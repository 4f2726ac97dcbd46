//! Answers waiting to be written back to Redis, by slot: one SETTLE call carries a batch of
//! one slot's answers, and a decision on a slot carries that slot's answers first (see
//! DECIDE_LUA). With every key on one slot (no partitions) there is one queue; with app keys
//! on their app's slot, an app's answers ride on that app's next decision.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::SharedKey;
use crate::quota::micros;

/// Answers waiting, at most (Redis slower than Feishu's quotas allow sends: something is
/// wrong; past it the oldest are dropped and count until their timeout).
const MAX_SETTLES: usize = 10_000;
/// Answers written back per call.
pub(super) const SETTLE_BATCH: usize = 256;

/// One answer to write back: the send's keys on one slot, its member, when its answer came.
pub(super) struct Settle {
    pub keys: Vec<SharedKey>,
    pub member: String,
    pub answered: Instant,
}

/// How long a quiet slot's answers wait for a decision on the slot to carry them before a
/// SETTLE of their own. Other replicas see those sends as in flight that much longer: that
/// changes no decision unless a window's room depends on a send this young, i.e. its window
/// filled within this time, and then the refused replica waits at most this much longer.
pub(super) const LINGER_QUIET: Duration = Duration::from_millis(100);
/// How long a busy slot's answers wait (a decision on it was refused lately: its windows are
/// full, and the others' next room depends on these answers).
pub(super) const LINGER_BUSY: Duration = Duration::from_millis(5);

/// The answers waiting, by slot (oldest first in each).
#[derive(Default)]
pub(super) struct Settles {
    by_slot: BTreeMap<Arc<str>, VecDeque<Settle>>,
    total: usize,
    /// Slots busy until then (a decision on them was refused).
    busy: BTreeMap<Arc<str>, Instant>,
}

impl Settles {
    /// Queues the answer of the send recorded as `member` on `keys` (split by slot).
    pub fn push(&mut self, keys: Vec<SharedKey>, member: &str, answered: Instant) {
        for (slot, keys) in by_slot(keys) {
            if self.total >= MAX_SETTLES {
                self.drop_oldest();
            }
            self.by_slot.entry(slot).or_default().push_back(Settle {
                keys,
                member: member.to_owned(),
                answered,
            });
            self.total += 1;
        }
    }

    /// Drops the oldest answer of the longest queue (that send counts until its timeout:
    /// stricter, never looser).
    fn drop_oldest(&mut self) {
        if let Some(q) = self.by_slot.values_mut().max_by_key(|q| q.len())
            && q.pop_front().is_some()
        {
            self.total -= 1;
        }
    }

    /// Up to a batch of `slot`'s answers, oldest first.
    pub fn take(&mut self, slot: &str) -> Vec<Settle> {
        let Some(q) = self.by_slot.get_mut(slot) else {
            return Vec::new();
        };
        let n = q.len().min(SETTLE_BATCH);
        let batch: Vec<Settle> = q.drain(..n).collect();
        if q.is_empty() {
            self.by_slot.remove(slot);
        }
        self.total -= batch.len();
        batch
    }

    /// `slot`'s windows were full at a decision: its answers go back promptly until `until`.
    pub fn mark_busy(&mut self, slot: &Arc<str>, until: Instant) {
        let u = self.busy.entry(slot.clone()).or_insert(until);
        *u = (*u).max(until);
    }

    fn linger(&self, slot: &str, now: Instant) -> Duration {
        match self.busy.get(slot) {
            Some(&until) if until > now => LINGER_BUSY,
            _ => LINGER_QUIET,
        }
    }

    /// When the next slot's answers are due (see [`Self::due`]).
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        self.by_slot
            .iter()
            .filter_map(|(slot, q)| Some(q.front()?.answered + self.linger(slot, now)))
            .min()
    }

    /// The slots whose oldest answer has waited its slot's linger at `now`.
    pub fn due(&mut self, now: Instant) -> Vec<Arc<str>> {
        self.busy.retain(|_, until| *until > now);
        self.by_slot
            .iter()
            .filter(|(slot, q)| {
                q.front()
                    .is_some_and(|s| s.answered + self.linger(slot, now) <= now)
            })
            .map(|(slot, _)| slot.clone())
            .collect()
    }

    /// Answers a failed call did not surely write: back at the front of `slot`'s queue, in
    /// their order.
    pub fn put_back(&mut self, slot: &Arc<str>, batch: Vec<Settle>) {
        if batch.is_empty() {
            return;
        }
        self.total += batch.len();
        let q = self.by_slot.entry(slot.clone()).or_default();
        for settle in batch.into_iter().rev() {
            q.push_front(settle);
        }
        while self.total > MAX_SETTLES {
            self.drop_oldest();
        }
    }
}

/// `keys` grouped by slot, in the order each slot first appears (each group keeps its keys'
/// order).
pub(super) fn by_slot(keys: Vec<SharedKey>) -> Vec<(Arc<str>, Vec<SharedKey>)> {
    let mut groups: Vec<(Arc<str>, Vec<SharedKey>)> = Vec::new();
    for k in keys {
        match groups.iter_mut().find(|(s, _)| *s == k.slot) {
            Some((_, g)) => g.push(k),
            None => groups.push((k.slot.clone(), vec![k])),
        }
    }
    groups
}

/// Appends answers to a SETTLE or DECIDE call: their keys, and per answer (number of keys,
/// member, µs since the answer).
pub(super) fn add_settles(inv: &mut redis::ScriptInvocation<'_>, batch: &[Settle]) {
    let now = Instant::now();
    for s in batch {
        for k in &s.keys {
            inv.key(&k.name);
        }
        inv.arg(s.keys.len())
            .arg(&s.member)
            .arg(micros(now.saturating_duration_since(s.answered)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(slot: &str, name: &str) -> SharedKey {
        SharedKey {
            name: name.to_owned(),
            slot: slot.into(),
            limit: 5,
            span_us: 1_000_000,
        }
    }

    #[test]
    fn answers_wait_by_slot_and_a_slot_gives_only_its_own() {
        let mut s = Settles::default();
        let now = Instant::now();
        s.push(
            vec![key("u", "u1"), key("a", "a1"), key("a", "a2")],
            "m1",
            now,
        );
        s.push(vec![key("a", "a1"), key("a", "a2")], "m2", now);
        // Quiet slots wait for a decision to carry them; a busy one goes back promptly.
        assert!(s.due(now).is_empty());
        assert_eq!(s.next_due(now), Some(now + LINGER_QUIET));
        let a: Arc<str> = "a".into();
        s.mark_busy(&a, now + Duration::from_secs(1));
        assert_eq!(s.next_due(now), Some(now + LINGER_BUSY));
        assert_eq!(s.due(now + LINGER_BUSY), vec![a.clone()]);
        assert_eq!(s.due(now + LINGER_QUIET).len(), 2);
        assert_eq!(
            s.due(now + Duration::from_secs(2)).len(),
            2,
            "busy no more: quiet"
        );
        let a = s.take("a");
        assert_eq!(a.len(), 2, "both answers' app keys");
        assert!(a.iter().all(|x| x.keys.iter().all(|k| &*k.slot == "a")));
        assert_eq!((a[0].member.as_str(), a[1].member.as_str()), ("m1", "m2"));
        assert_eq!(a[0].keys.len(), 2);
        let slot: Arc<str> = "a".into();
        s.put_back(&slot, a);
        assert_eq!(s.take("a")[0].member, "m1", "put back in front, in order");
        assert_eq!(s.take("u").len(), 1);
        assert_eq!(s.total, 0);
        assert!(s.take("nothing").is_empty());
    }

    #[test]
    fn past_the_bound_the_oldest_answer_goes() {
        let mut s = Settles::default();
        let now = Instant::now();
        for i in 0..MAX_SETTLES + 3 {
            s.push(vec![key("a", "a1")], &format!("m{i}"), now);
        }
        assert_eq!(s.total, MAX_SETTLES);
        assert_eq!(s.take("a")[0].member, "m3");
    }

    #[test]
    fn keys_group_by_slot_in_order_of_appearance() {
        let g = by_slot(vec![key("u", "u1"), key("a", "a1"), key("u", "u2")]);
        let names: Vec<(String, Vec<String>)> = g
            .into_iter()
            .map(|(s, k)| (s.to_string(), k.into_iter().map(|k| k.name).collect()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("u".to_owned(), vec!["u1".to_owned(), "u2".to_owned()]),
                ("a".to_owned(), vec!["a1".to_owned()])
            ]
        );
    }
}
