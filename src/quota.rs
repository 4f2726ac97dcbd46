//! Rolling-window keyed quotas counted by arrival bounds: "Feishu never sees more than N
//! requests of one key arrive in any window of length W", whatever the network latencies.
//! Pure state with the clock passed in (microseconds from an origin the caller picks); no
//! I/O, no tokio. The scheduler owns one [`QuotaTable`] and asks it before every send.
//!
//! The gateway cannot see when a request arrives at Feishu, only bounds: after it left and
//! before its answer came back. Each key keeps a ring of its last N sends in the order they
//! were decided; a slot holds the send's *latest possible arrival*: "pending" (in flight since
//! the decision) until its answer returns ([`QuotaTable::settle`]), then the answer instant. A
//! pending send holds its slot until the answer, or until `hold` (the request timeout) after
//! the decision. A new send may leave at `now` when the oldest of the last N has certainly
//! arrived at least W (+ margin) before `now`. Then for any N+1 sends of a key, the last one
//! arrives at least W after the first one arrived: never N+1 in a window, for any one-way
//! latencies. A burst of N still goes at once (unlike a GCRA, which also lets 2N−1 through
//! one sliding window).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

/// Instants are microseconds since an origin chosen by the owner of the table.
pub type Micros = u64;

pub fn micros(d: Duration) -> Micros {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One quota: at most `limit` sends in any window of length `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaSpec {
    pub limit: NonZeroU32,
    pub window: Duration,
}

impl QuotaSpec {
    pub fn new(limit: NonZeroU32, window: Duration) -> Self {
        Self { limit, window }
    }
}

/// Index of a quota in the table (chat, user, app/s, app/min, … as configured).
pub type QuotaId = usize;

/// One key of one quota, e.g. (chat quota, "oc_123"). Carries a 64-bit hash of itself,
/// computed once, so table lookups never hash strings and the table never stores them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct QuotaKey {
    pub quota: QuotaId,
    pub id: Arc<str>,
    hash: u64,
}

impl QuotaKey {
    pub fn new(quota: QuotaId, id: impl Into<Arc<str>>) -> Self {
        let id = id.into();
        let hash = key_hash(quota, &id);
        Self { quota, id, hash }
    }
}

/// Fixed-seed foldhash of (quota, id). Two ids with the same hash would share one ring: a
/// stricter quota for both, never a looser one (and at 1M keys the chance is ~3e-8).
fn key_hash(quota: QuotaId, id: &str) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0x5eed_f00d_cafe_d00d).hash_one((quota, id))
}

/// Hasher for keys that already are well-mixed 64-bit hashes.
#[derive(Default, Clone, Copy)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; fold anything else in for completeness.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl std::fmt::Debug for PreHashed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreHashed")
    }
}

type PreHashedMap<V> = HashMap<u64, V, BuildHasherDefault<PreHashed>>;

/// Rings up to this size live inline in the map entry (no extra allocation, one cache miss
/// less); the chat and user quotas (5) fit.
const INLINE: usize = 6;

/// A slot with this bit set is a send still in flight, decided at the instant in the other
/// bits; without it, the slot is the send's latest possible arrival (its answer instant).
const PENDING: Micros = 1 << 63;

/// The latest instant a send can have arrived, as far as known at `now`: the answer instant
/// once answered; while in flight, `now` (it may arrive any moment, so the key waits at least
/// a window from now), or `decided + hold` once the request has timed out.
fn latest_arrival(slot: Micros, hold: Micros, now: Micros) -> Micros {
    if slot & PENDING == 0 {
        slot
    } else {
        now.min((slot & !PENDING).saturating_add(hold))
    }
}

/// The earliest instant a send can have arrived (a pending one: its decision).
fn earliest_arrival(slot: Micros) -> Micros {
    slot & !PENDING
}

#[derive(Debug)]
enum Slots {
    Inline([Micros; INLINE]),
    Heap(Box<[Micros]>),
}

/// The last `limit` sends of one key in decision order (a ring), and the instant before which
/// the key must stay silent whatever the ring says (Feishu asked us to back off).
#[derive(Debug)]
struct Ring {
    slots: Slots,
    cap: u32,
    /// Index of the oldest entry once the ring is full; next write position.
    head: u32,
    len: u32,
    not_before: Micros,
}

impl Ring {
    fn new(limit: NonZeroU32) -> Self {
        let cap = limit.get();
        let slots = if cap as usize <= INLINE {
            Slots::Inline([0; INLINE])
        } else {
            Slots::Heap(vec![0; cap as usize].into_boxed_slice())
        };
        Self {
            slots,
            cap,
            head: 0,
            len: 0,
            not_before: 0,
        }
    }

    fn s(&self) -> &[Micros] {
        match &self.slots {
            Slots::Inline(a) => &a[..self.cap as usize],
            Slots::Heap(b) => b,
        }
    }

    fn s_mut(&mut self) -> &mut [Micros] {
        match &mut self.slots {
            Slots::Inline(a) => &mut a[..self.cap as usize],
            Slots::Heap(b) => b,
        }
    }

    /// The earliest instant at which one more send fits, as known at `now` (≤ `now`: it fits
    /// now). While the oldest send is in flight this is `now + span`: ask again then (its
    /// answer, whenever it comes, frees the key no earlier than a span after it).
    fn ready_at(&self, span: Micros, hold: Micros, now: Micros) -> Micros {
        let ring = if self.len < self.cap {
            0
        } else {
            latest_arrival(self.s()[self.head as usize], hold, now).saturating_add(span)
        };
        ring.max(self.not_before)
    }

    /// The earliest instant at which `n` more sends fit, as known at `now` (`ready_at` for
    /// one): the `n`-th oldest send beyond the free slots must have left the window.
    fn room_at(&self, n: u32, span: Micros, hold: Micros, now: Micros) -> Micros {
        let free = self.cap - self.len;
        let ring = if n <= free {
            0
        } else if n - free > self.len {
            Micros::MAX
        } else {
            let idx = (self.head + (n - free - 1)) % self.cap;
            latest_arrival(self.s()[idx as usize], hold, now).saturating_add(span)
        };
        ring.max(self.not_before)
    }

    /// Lower bound of the instant of the `nth` (1-based) future send on this key, if nothing but
    /// this key's quota delayed it: future send m waits for the send N positions before it.
    fn nth_ready_at(&self, nth: u64, span: Micros) -> Micros {
        let cap = u64::from(self.cap);
        let (rounds, pos) = ((nth - 1) / cap, (nth - 1) % cap);
        // The send `cap` places before future send `pos+1` is the pos-th oldest recorded one
        // (when the ring is not full the missing oldest entries are "long ago").
        let missing = cap - u64::from(self.len);
        let base = if pos < missing {
            0
        } else {
            let idx = (u64::from(self.head) + (pos - missing)) % cap;
            earliest_arrival(self.s()[idx as usize]).saturating_add(span)
        };
        base.saturating_add(rounds.saturating_mul(span))
            .max(self.not_before)
    }

    fn record(&mut self, slot: Micros) {
        let cap = self.cap;
        if self.len < cap {
            let idx = (self.head + self.len) % cap;
            self.s_mut()[idx as usize] = slot;
            self.len += 1;
        } else {
            let head = self.head as usize;
            self.s_mut()[head] = slot;
            self.head = (self.head + 1) % cap;
        }
    }

    /// The recorded slots, oldest first.
    fn entries(&self) -> impl Iterator<Item = Micros> + '_ {
        let s = self.s();
        (0..self.len).map(move |i| s[((self.head + i) % self.cap) as usize])
    }

    /// Position (in `s()`) of one slot equal to `slot`, newest first.
    fn find(&self, slot: Micros) -> Option<usize> {
        (0..self.len)
            .rev()
            .map(|back| ((self.head + back) % self.cap) as usize)
            .find(|&idx| self.s()[idx] == slot)
    }

    /// Replaces one slot equal to `from` by `to` (sends decided at the same instant are
    /// interchangeable). Returns false when it is gone (aged out of the ring).
    fn replace(&mut self, from: Micros, to: Micros) -> bool {
        match self.find(from) {
            Some(idx) => {
                self.s_mut()[idx] = to;
                true
            }
            None => false,
        }
    }

    /// Removes one slot equal to `slot`, keeping the others in order.
    fn remove(&mut self, slot: Micros) -> bool {
        if self.find(slot).is_none() {
            return false;
        }
        let mut kept: Vec<Micros> = self.entries().collect();
        let pos = kept.iter().rposition(|&s| s == slot).expect("found above");
        kept.remove(pos);
        let len = kept.len();
        self.s_mut()[..len].copy_from_slice(&kept);
        self.head = 0;
        self.len = len as u32;
        true
    }

    /// The instant after which this ring is equivalent to an unseen key (a send in flight
    /// counts until its timeout).
    fn idle_after(&self, span: Micros, hold: Micros) -> Micros {
        self.entries()
            .map(|slot| latest_arrival(slot, hold, Micros::MAX).saturating_add(span))
            .fold(self.not_before, Micros::max)
    }
}

/// The instant before which nothing may be sent under a floor (0 = no floor).
fn floor_plus(floor: Micros, span: Micros) -> Micros {
    if floor == 0 {
        0
    } else {
        floor.saturating_add(span)
    }
}

/// All keyed rolling windows of all quotas.
#[derive(Debug)]
pub struct QuotaTable {
    specs: Vec<QuotaSpec>,
    /// window + safety margin, per quota, in micros.
    spans: Vec<Micros>,
    /// How long a send without an answer holds its slot (the request timeout), µs.
    hold: Micros,
    keys: Vec<PreHashedMap<Ring>>,
    /// The ids behind the hashes, kept only when asked (`keep_ids`: for [`Self::live_entries`]).
    ids: Option<Vec<PreHashedMap<Arc<str>>>>,
    /// No key may send before `floor + span` (0 = no floor): set when this table takes over
    /// from another source of truth whose sends it cannot see (Redis down → local quotas).
    floor: Micros,
    /// Added to every window (see [`QuotaTable::new`]), µs.
    margin: Micros,
}

impl QuotaTable {
    /// `margin` is added to every window (Feishu's clock granularity; latency is covered by
    /// the arrival bounds). `hold` is how long a send whose answer never comes holds its slot:
    /// the request timeout, after which the HTTP client has given up on it.
    pub fn new(specs: Vec<QuotaSpec>, margin: Duration, hold: Duration) -> Self {
        let spans = specs
            .iter()
            .map(|s| micros(s.window) + micros(margin))
            .collect();
        let keys = specs.iter().map(|_| PreHashedMap::default()).collect();
        Self {
            specs,
            spans,
            hold: micros(hold),
            keys,
            ids: None,
            floor: 0,
            margin: micros(margin),
        }
    }

    /// Adds quotas after the existing ones (a live reload changed an app's quotas: the old
    /// ids stay for the sends still in flight on them). Returns the first new id.
    pub fn add_quotas(&mut self, specs: &[QuotaSpec]) -> QuotaId {
        let first = self.specs.len();
        for s in specs {
            self.specs.push(*s);
            self.spans.push(micros(s.window) + self.margin);
            self.keys.push(PreHashedMap::default());
            if let Some(ids) = &mut self.ids {
                ids.push(PreHashedMap::default());
            }
        }
        first
    }

    /// Key `to` starts with the sends `from` has counted (a quota replaced by a live reload):
    /// the newest that its limit holds, in flight ones still in flight, and the same back-off.
    pub fn copy_key(&mut self, from: &QuotaKey, to: &QuotaKey) {
        let Some(ring) = self.keys[from.quota].get(&from.hash) else {
            return;
        };
        let (entries, not_before): (Vec<Micros>, Micros) =
            (ring.entries().collect(), ring.not_before);
        let to = self.ring_mut(to);
        // Oldest first: a smaller ring ends up with the newest.
        for e in entries {
            to.record(e);
        }
        to.not_before = to.not_before.max(not_before);
    }

    /// Also remember each key's id (costs the id's memory), so [`Self::live_entries`] can
    /// name the keys.
    pub fn keep_ids(mut self) -> Self {
        self.ids = Some(self.specs.iter().map(|_| PreHashedMap::default()).collect());
        self
    }

    pub fn specs(&self) -> &[QuotaSpec] {
        &self.specs
    }

    /// One key as known at `now`: the sends that still count in its window (in flight ones
    /// included) and when it has room for one more (≤ `now`: it has room now).
    pub fn usage(&self, key: &QuotaKey, now: Micros) -> (u32, Micros) {
        let span = self.spans[key.quota];
        let floor = floor_plus(self.floor, span);
        match self.keys[key.quota].get(&key.hash) {
            None => (0, floor),
            Some(ring) => {
                let used = ring
                    .entries()
                    .filter(|&slot| latest_arrival(slot, self.hold, now).saturating_add(span) > now)
                    .count();
                (
                    u32::try_from(used).unwrap_or(u32::MAX),
                    ring.ready_at(span, self.hold, now).max(floor),
                )
            }
        }
    }

    /// The earliest instant, as known at `now`, at which `key` has room for `n` more sends
    /// (≤ `now`: it has; `Micros::MAX`: never, `n` is above its limit).
    pub fn room_at(&self, key: &QuotaKey, n: u32, now: Micros) -> Micros {
        let span = self.spans[key.quota];
        let floor = floor_plus(self.floor, span);
        let limit = self.specs[key.quota].limit.get();
        let ring = match self.keys[key.quota].get(&key.hash) {
            Some(r) => r.room_at(n, span, self.hold, now),
            None if n <= limit => 0,
            None => Micros::MAX,
        };
        ring.max(floor)
    }

    /// The earliest instant, as known at `now`, at which every key has room at the same time
    /// (≤ `now` = ready).
    pub fn ready_at(&self, keys: &[QuotaKey], now: Micros) -> Micros {
        keys.iter()
            .map(|k| {
                let span = self.spans[k.quota];
                let ring = self.keys[k.quota]
                    .get(&k.hash)
                    .map_or(0, |r| r.ready_at(span, self.hold, now));
                ring.max(floor_plus(self.floor, span))
            })
            .max()
            .unwrap_or(0)
    }

    /// From now on no key sends before `floor` + its span (see the field doc).
    pub fn set_floor(&mut self, floor: Micros) {
        self.floor = floor;
    }

    /// Span (window + margin) of a quota, µs.
    pub fn span(&self, quota: QuotaId) -> Micros {
        self.spans[quota]
    }

    /// Every key's sends that may still count, as each one's latest possible arrival minus
    /// `now` (µs; positive for a send still in flight: its timeout). Needs
    /// [`Self::keep_ids`]; empty otherwise.
    pub fn live_entries(&self, now: Micros) -> Vec<(QuotaKey, Vec<i64>)> {
        let Some(ids) = &self.ids else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (quota, (map, &span)) in self.keys.iter().zip(&self.spans).enumerate() {
            for (hash, ring) in map {
                let offsets: Vec<i64> = ring
                    .entries()
                    .map(|s| latest_arrival(s, self.hold, Micros::MAX))
                    .filter(|&l| l.saturating_add(span) > now)
                    .map(|l| l as i64 - now as i64)
                    .collect();
                if let (false, Some(id)) = (offsets.is_empty(), ids[quota].get(hash)) {
                    out.push((QuotaKey::new(quota, id.clone()), offsets));
                }
            }
        }
        out
    }

    fn ring_mut(&mut self, key: &QuotaKey) -> &mut Ring {
        let limit = self.specs[key.quota].limit;
        if let Some(ids) = &mut self.ids {
            ids[key.quota]
                .entry(key.hash)
                .or_insert_with(|| key.id.clone());
        }
        self.keys[key.quota]
            .entry(key.hash)
            .or_insert_with(|| Ring::new(limit))
    }

    /// Records one send decided at `now` in every key (in flight until [`Self::settle`]) if
    /// all have room at `now`; otherwise records nothing and returns when to ask again.
    pub fn try_acquire(&mut self, keys: &[QuotaKey], now: Micros) -> Result<(), Micros> {
        // The usual jobs (chat + app/s + app/min, or + user): one lookup per key instead of
        // two (a cold key's lookup is a cache miss at 1M keys).
        let single_pass = match keys {
            [a, b, c] => self.acquire_disjoint([a, b, c], now),
            [a, b, c, d] => self.acquire_disjoint([a, b, c, d], now),
            _ => None,
        };
        single_pass.unwrap_or_else(|| self.acquire_general(keys, now))
    }

    /// `try_acquire` for any keys: check every key, then record in every key.
    fn acquire_general(&mut self, keys: &[QuotaKey], now: Micros) -> Result<(), Micros> {
        let ready = self.ready_at(keys, now);
        if ready > now {
            return Err(ready);
        }
        for k in keys {
            self.ring_mut(k).record(now | PENDING);
        }
        Ok(())
    }

    /// `try_acquire` for keys of distinct quotas (None when two share a quota): every key's
    /// ring is looked up once, checked, then recorded. A key that refuses still gets an empty
    /// ring (forgotten by the next idle sweep).
    fn acquire_disjoint<const N: usize>(
        &mut self,
        keys: [&QuotaKey; N],
        now: Micros,
    ) -> Option<Result<(), Micros>> {
        let maps = self.keys.get_disjoint_mut(keys.map(|k| k.quota)).ok()?;
        let (specs, spans, floor, hold) = (&self.specs, &self.spans, self.floor, self.hold);
        let mut i = 0;
        let mut rings = maps.map(|m| {
            let k = keys[i];
            i += 1;
            m.entry(k.hash)
                .or_insert_with(|| Ring::new(specs[k.quota].limit))
        });
        let mut ready = 0;
        for (ring, k) in rings.iter().zip(keys) {
            let span = spans[k.quota];
            ready = ready.max(ring.ready_at(span, hold, now).max(floor_plus(floor, span)));
        }
        if ready > now {
            return Some(Err(ready));
        }
        for ring in &mut rings {
            ring.record(now | PENDING);
        }
        if let Some(ids) = &mut self.ids {
            for k in keys {
                ids[k.quota].entry(k.hash).or_insert_with(|| k.id.clone());
            }
        }
        Some(Ok(()))
    }

    /// A send known only from the past (a previous process's, after a restart) that arrived by
    /// `arrived_by`, counted in every key. Record past sends oldest first, before new ones.
    pub fn record_arrived(&mut self, keys: &[QuotaKey], arrived_by: Micros) {
        for k in keys {
            self.ring_mut(k).record(arrived_by);
        }
    }

    /// The send decided at `decided` on `keys` was answered at `answered`: it arrived by then.
    pub fn settle(&mut self, keys: &[QuotaKey], decided: Micros, answered: Micros) {
        for k in keys {
            if let Some(r) = self.keys[k.quota].get_mut(&k.hash) {
                r.replace(decided | PENDING, answered.max(decided));
            }
        }
    }

    /// Forgets the send decided at `decided` on `keys`: it does not count there (Feishu's
    /// check for these keys refused it, see the scheduler's rejection policy).
    pub fn unrecord(&mut self, keys: &[QuotaKey], decided: Micros) {
        for k in keys {
            if let Some(r) = self.keys[k.quota].get_mut(&k.hash) {
                r.remove(decided | PENDING);
            }
        }
    }

    /// A lower bound on when the `nth` future send on `key` can happen (for admission: a job
    /// behind `nth - 1` others in its chat cannot be sent before this). The fallback floor is
    /// left out: it lifts as soon as Redis is back, so it bounds nothing.
    pub fn nth_ready_at(&self, key: &QuotaKey, nth: u64) -> Micros {
        let span = self.spans[key.quota];
        match self.keys[key.quota].get(&key.hash) {
            Some(r) => r.nth_ready_at(nth.max(1), span),
            None => {
                let cap = u64::from(self.specs[key.quota].limit.get());
                ((nth.max(1) - 1) / cap).saturating_mul(span)
            }
        }
    }

    /// Feishu rejected a send on this key for rate: the key stays silent until `until`.
    pub fn block_until(&mut self, key: &QuotaKey, until: Micros) {
        let ring = self.ring_mut(key);
        ring.not_before = ring.not_before.max(until);
    }

    /// Forgets keys that no recorded send can count against any more (they are equivalent to
    /// an unseen key), returning memory to baseline once traffic stops. A key with a send in
    /// flight is kept: its answer still has to be counted.
    pub fn forget_idle(&mut self, now: Micros) -> usize {
        let hold = self.hold;
        let mut forgotten = 0;
        for (quota, (map, &span)) in self.keys.iter_mut().zip(&self.spans).enumerate() {
            let before = map.len();
            map.retain(|_, r| r.idle_after(span, hold) > now);
            forgotten += before - map.len();
            if map.capacity() > 64 && map.len() < map.capacity() / 4 {
                map.shrink_to_fit();
            }
            if let Some(ids) = &mut self.ids {
                let ids = &mut ids[quota];
                ids.retain(|h, _| map.contains_key(h));
                if ids.capacity() > 64 && ids.len() < ids.capacity() / 4 {
                    ids.shrink_to_fit();
                }
            }
        }
        forgotten
    }

    /// Keys currently tracked (all quotas).
    pub fn live_keys(&self) -> usize {
        self.keys.iter().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    const MS: Micros = 1000;
    const HOLD: Duration = Duration::from_secs(10);

    fn spec(n: u32, w_ms: u64) -> QuotaSpec {
        QuotaSpec::new(NonZeroU32::new(n).unwrap(), Duration::from_millis(w_ms))
    }

    fn table(specs: Vec<QuotaSpec>, margin_ms: u64) -> QuotaTable {
        QuotaTable::new(specs, Duration::from_millis(margin_ms), HOLD)
    }

    /// Acquire at `at`, answered `rtt` later.
    fn send(t: &mut QuotaTable, k: &[QuotaKey], at: Micros, rtt: Micros) {
        t.try_acquire(k, at).unwrap();
        t.settle(k, at, at + rtt);
    }

    #[test]
    fn burst_of_n_then_waits_a_window_after_the_oldest_answer() {
        let mut t = table(vec![spec(5, 1000)], 0);
        let k = [QuotaKey::new(0, "oc_1")];
        for i in 0..5 {
            send(&mut t, &k, i * MS, 40 * MS);
        }
        // The first send may have arrived as late as its answer (40 ms).
        assert_eq!(t.try_acquire(&k, 10 * MS), Err(1040 * MS));
        t.try_acquire(&k, 1040 * MS).unwrap();
        assert_eq!(t.try_acquire(&k, 1040 * MS), Err(1041 * MS));
    }

    #[test]
    fn a_send_in_flight_holds_its_slot_until_its_answer_or_its_timeout() {
        let mut t = table(vec![spec(1, 1000)], 0);
        let k = [QuotaKey::new(0, "c")];
        t.try_acquire(&k, 0).unwrap();
        // No answer yet: ask again a window from now (the answer may come any moment).
        assert_eq!(t.try_acquire(&k, 1500 * MS), Err(2500 * MS));
        assert_eq!(t.try_acquire(&k, 5000 * MS), Err(6000 * MS));
        t.settle(&k, 0, 5200 * MS);
        assert_eq!(t.try_acquire(&k, 5300 * MS), Err(6200 * MS));
        t.try_acquire(&k, 6200 * MS).unwrap();
        // Never answered: it counts as arrived at its timeout (decided + hold).
        let hold = micros(HOLD);
        assert_eq!(
            t.try_acquire(&k, 6200 * MS + hold + 500 * MS),
            Err(6200 * MS + hold + 1000 * MS)
        );
        t.try_acquire(&k, 6200 * MS + hold + 1000 * MS).unwrap();
    }

    #[test]
    fn all_keys_or_none_and_the_wait_is_the_latest_key() {
        let mut t = table(vec![spec(1, 1000), spec(2, 500)], 0);
        let chat = QuotaKey::new(0, "oc_1");
        let app = QuotaKey::new(1, "cli_1");
        send(&mut t, std::slice::from_ref(&app), 0, 0);
        send(&mut t, std::slice::from_ref(&app), 100 * MS, 0);
        // chat has room, app does not: nothing is recorded on the chat.
        assert_eq!(
            t.try_acquire(&[chat.clone(), app.clone()], 200 * MS),
            Err(500 * MS)
        );
        send(&mut t, std::slice::from_ref(&chat), 200 * MS, 0);
        assert_eq!(t.try_acquire(&[chat, app], 500 * MS), Err(1200 * MS));
    }

    #[test]
    fn margin_widens_every_window() {
        let mut t = table(vec![spec(1, 1000)], 5);
        let k = [QuotaKey::new(0, "a")];
        send(&mut t, &k, 0, 0);
        assert_eq!(t.try_acquire(&k, 1000 * MS), Err(1005 * MS));
    }

    #[test]
    fn room_for_n_sends_waits_for_the_nth_oldest_to_leave() {
        let mut t = table(vec![spec(5, 1000)], 0);
        let k = QuotaKey::new(0, "c");
        assert_eq!(t.room_at(&k, 5, 0), 0);
        assert_eq!(
            t.room_at(&k, 6, 0),
            Micros::MAX,
            "more than the limit never fits"
        );
        for i in 0..4 {
            send(&mut t, std::slice::from_ref(&k), i * 100 * MS, 10 * MS);
        }
        // One slot free; room for 2 once the send at 0 (answered at 10 ms) leaves, for 3 once
        // the one at 100 ms does.
        let now = 400 * MS;
        assert_eq!(t.room_at(&k, 1, now), 0);
        assert_eq!(t.room_at(&k, 2, now), 1010 * MS);
        assert_eq!(t.room_at(&k, 3, now), 1110 * MS);
        // One in flight: counted until a span after now (its answer may come any time).
        t.try_acquire(std::slice::from_ref(&k), now).unwrap();
        assert_eq!(t.room_at(&k, 1, now), 1010 * MS);
    }

    #[test]
    fn nth_ready_at_is_a_lower_bound_of_queued_sends() {
        let mut t = table(vec![spec(5, 1000)], 0);
        let k = QuotaKey::new(0, "c");
        assert_eq!(t.nth_ready_at(&k, 5), 0);
        assert_eq!(t.nth_ready_at(&k, 6), 1000 * MS);
        for i in 0..3 {
            send(&mut t, std::slice::from_ref(&k), i * 100 * MS, 10 * MS);
        }
        // 2 free slots now; the 3rd future send waits for the send at 0 (answered at 10 ms).
        assert_eq!(t.nth_ready_at(&k, 2), 0);
        assert_eq!(t.nth_ready_at(&k, 3), 1010 * MS);
        assert_eq!(t.nth_ready_at(&k, 5), 1210 * MS);
        assert_eq!(t.nth_ready_at(&k, 8), 2010 * MS);
        // A send in flight bounds from its decision (it cannot have arrived earlier).
        t.try_acquire(std::slice::from_ref(&k), 300 * MS).unwrap();
        assert_eq!(t.nth_ready_at(&k, 5), 1300 * MS);
    }

    #[test]
    fn unrecord_gives_a_refused_send_back_without_touching_the_others() {
        let mut t = table(vec![spec(3, 60_000)], 0);
        let k = [QuotaKey::new(0, "app")];
        send(&mut t, &k, 0, MS);
        t.try_acquire(&k, 10 * MS).unwrap();
        send(&mut t, &k, 20 * MS, MS);
        // The send decided at 10 ms was refused for rate: it does not count.
        t.unrecord(&k, 10 * MS);
        t.try_acquire(&k, 30 * MS).unwrap();
        assert_eq!(t.try_acquire(&k, 40 * MS), Err(60_001 * MS));
    }

    #[test]
    fn block_until_on_a_partly_used_ring_keeps_its_sends() {
        let mut t = table(vec![spec(1000, 60_000)], 0);
        let k = [QuotaKey::new(0, "app")];
        let base = 3600 * 1000 * MS;
        for i in 0..100 {
            send(&mut t, &k, base + i * MS, MS);
        }
        t.block_until(&k[0], base + 1100 * MS);
        // Silent until 1.1 s, then the 900 unused sends of this minute are available again.
        assert_eq!(t.try_acquire(&k, base + 1000 * MS), Err(base + 1100 * MS));
        for _ in 0..900 {
            send(&mut t, &k, base + 1100 * MS, MS);
        }
        assert_eq!(t.try_acquire(&k, base + 1100 * MS), Err(base + 60_001 * MS));
    }

    #[test]
    fn a_floor_holds_every_key_for_its_window_and_entries_can_be_read_back() {
        let mut t = table(vec![spec(5, 1000), spec(50, 100)], 0).keep_ids();
        t.set_floor(10_000 * MS);
        let chat = [QuotaKey::new(0, "c")];
        let fast = [QuotaKey::new(1, "a")];
        assert_eq!(t.try_acquire(&chat, 10_000 * MS), Err(11_000 * MS));
        assert_eq!(t.try_acquire(&fast, 10_000 * MS), Err(10_100 * MS));
        // Admission ignores the floor (it lifts when Redis is back).
        assert_eq!(t.nth_ready_at(&chat[0], 1), 0);
        send(&mut t, &fast, 10_100 * MS, 5 * MS);
        t.try_acquire(&fast, 10_150 * MS).unwrap();
        let live = t.live_entries(10_160 * MS);
        let hold = micros(HOLD) as i64;
        assert_eq!(
            live,
            vec![(
                QuotaKey::new(1, "a"),
                vec![-55 * MS as i64, hold - 10 * MS as i64]
            )]
        );
    }

    #[test]
    fn idle_keys_are_forgotten_and_memory_returns_but_not_while_in_flight() {
        let mut t = table(vec![spec(5, 1000), spec(50, 1000)], 0);
        for i in 0..10_000u64 {
            let keys = [QuotaKey::new(0, format!("oc_{i}")), QuotaKey::new(1, "app")];
            if t.try_acquire(&keys, i).is_ok() {
                t.settle(&keys, i, i + 1);
            }
        }
        let in_flight = [QuotaKey::new(0, "oc_slow")];
        t.try_acquire(&in_flight, 20 * MS).unwrap();
        assert!(t.live_keys() > 40);
        assert_eq!(t.forget_idle(500 * MS), 0);
        t.forget_idle(2000 * MS);
        assert_eq!(t.live_keys(), 1, "the key with a send in flight stays");
        t.settle(&in_flight, 20 * MS, 30 * MS);
        t.forget_idle(2000 * MS);
        assert_eq!(t.live_keys(), 0);
        assert!(t.keys.iter().all(|m| m.capacity() <= 64));
    }

    /// A job: its quota keys (a chat among a few, maybe a user, always the app), arrival at
    /// the gateway, and its network: delay before it leaves after the decision, one-way
    /// latencies to Feishu and back (all ms).
    #[derive(Debug, Clone)]
    struct Arrival {
        at_ms: u64,
        chat: u8,
        user: Option<u8>,
        leave_ms: u64,
        inbound_ms: u64,
        outbound_ms: u64,
    }

    fn arrivals() -> impl Strategy<Value = Vec<Arrival>> {
        prop::collection::vec(
            (
                0u64..5_000,
                0u8..6,
                prop::option::of(0u8..3),
                0u64..30,
                0u64..120,
                0u64..60,
            )
                .prop_map(|(at_ms, chat, user, leave_ms, inbound_ms, outbound_ms)| {
                    Arrival {
                        at_ms,
                        chat,
                        user,
                        leave_ms,
                        inbound_ms,
                        outbound_ms,
                    }
                }),
            1..300,
        )
    }

    fn keys_of(j: &Arrival) -> Vec<QuotaKey> {
        let mut keys = vec![
            QuotaKey::new(0, format!("c{}", j.chat)),
            QuotaKey::new(2, "app"),
        ];
        if let Some(u) = j.user {
            keys.push(QuotaKey::new(1, format!("u{u}")));
        }
        keys
    }

    proptest! {
        /// Whatever arrives when and however long each request takes to leave, to reach
        /// Feishu and to come back, a dispatcher that sends whenever `try_acquire` lets it and
        /// settles at each answer never lets Feishu see more than N arrivals of one key in any
        /// window W. A request whose latency exceeds the hold (timeout) is out of contract, so
        /// the hold here is longer than any latency drawn.
        #[test]
        fn never_more_than_n_arrivals_in_any_window(
            mut jobs in arrivals(),
            chat_n in 1u32..6, chat_w in 50u64..1500,
            user_n in 1u32..6, user_w in 50u64..1500,
            app_n in 1u32..60, app_w in 100u64..3000,
            margin_ms in 0u64..10,
        ) {
            let specs = vec![spec(chat_n, chat_w), spec(user_n, user_w), spec(app_n, app_w)];
            let mut t = QuotaTable::new(specs.clone(), Duration::from_millis(margin_ms), Duration::from_millis(300));
            jobs.sort_by_key(|j| j.at_ms);
            let mut pending: Vec<(Micros, Arrival)> = jobs.into_iter().map(|j| (j.at_ms * MS, j)).collect();
            // Answers to come: (answer instant, decided, keys).
            let mut answers: BinaryHeap<Reverse<(Micros, Micros, usize)>> = BinaryHeap::new();
            let mut sent_keys: Vec<Vec<QuotaKey>> = Vec::new();
            let mut seen: HashMap<QuotaKey, Vec<Micros>> = HashMap::new();
            let mut now = 0;
            loop {
                while let Some(Reverse((at, _, _))) = answers.peek() && *at <= now {
                    let Reverse((at, decided, i)) = answers.pop().unwrap();
                    t.settle(&sent_keys[i], decided, at);
                }
                let mut next = answers.peek().map_or(Micros::MAX, |Reverse((a, _, _))| *a);
                pending.retain(|(at, j)| {
                    if *at > now { next = next.min(*at); return true; }
                    let keys = keys_of(j);
                    match t.try_acquire(&keys, now) {
                        Ok(()) => {
                            let arrival = now + (j.leave_ms + j.inbound_ms) * MS;
                            for k in &keys { seen.entry(k.clone()).or_default().push(arrival); }
                            answers.push(Reverse((arrival + j.outbound_ms * MS, now, sent_keys.len())));
                            sent_keys.push(keys);
                            false
                        }
                        Err(ready) => { assert!(ready > now); next = next.min(ready); true }
                    }
                });
                if next == Micros::MAX { break; }
                now = next;
                t.forget_idle(now);
            }
            prop_assert!(pending.is_empty(), "jobs left unsent");
            for (k, mut times) in seen {
                times.sort();
                let s = specs[k.quota];
                let (n, w) = (s.limit.get() as usize, micros(s.window) + margin_ms * MS);
                for pair in times.windows(n + 1) {
                    prop_assert!(pair[n] - pair[0] >= w,
                        "key {:?}: {} arrivals within {}us", k, n + 1, pair[n] - pair[0]);
                }
            }
        }

        /// The one-lookup path for 3- and 4-key jobs decides exactly as the general path.
        #[test]
        fn the_single_pass_decides_like_the_general_path(jobs in arrivals(), floor_ms in 0u64..500) {
            let specs = vec![spec(3, 700), spec(2, 300), spec(10, 2000), spec(20, 5000)];
            let mut fast = table(specs.clone(), 5).keep_ids();
            let mut general = table(specs, 5).keep_ids();
            fast.set_floor(floor_ms * MS);
            general.set_floor(floor_ms * MS);
            let mut jobs = jobs;
            jobs.sort_by_key(|j| j.at_ms);
            for j in jobs {
                let mut keys = vec![
                    QuotaKey::new(0, format!("c{}", j.chat)),
                    QuotaKey::new(2, "app"),
                    QuotaKey::new(3, "app"),
                ];
                if let Some(u) = j.user { keys.push(QuotaKey::new(1, format!("u{u}"))); }
                let now = j.at_ms * MS;
                let (a, b) = (fast.try_acquire(&keys, now), general.acquire_general(&keys, now));
                prop_assert_eq!(a, b);
                if a.is_ok() && j.outbound_ms % 2 == 0 {
                    fast.settle(&keys, now, now + j.inbound_ms * MS);
                    general.settle(&keys, now, now + j.inbound_ms * MS);
                }
            }
            let end = 10_000 * MS;
            let mut a = fast.live_entries(end);
            let mut b = general.live_entries(end);
            a.sort_by(|x, y| (x.0.quota, &x.0.id).cmp(&(y.0.quota, &y.0.id)));
            b.sort_by(|x, y| (x.0.quota, &x.0.id).cmp(&(y.0.quota, &y.0.id)));
            prop_assert_eq!(a, b);
        }

        /// The instant returned on refusal is honest: nothing else happening, the job fits then
        /// (sends answered at once; a send in flight would only say "ask again").
        #[test]
        fn the_returned_instant_admits_the_job(jobs in arrivals()) {
            let mut t = table(vec![spec(3, 700), spec(2, 300), spec(10, 2000)], 5);
            for j in jobs {
                let keys = vec![QuotaKey::new(0, format!("c{}", j.chat)), QuotaKey::new(2, "app")];
                let now = j.at_ms * MS;
                match t.try_acquire(&keys, now) {
                    Ok(()) => t.settle(&keys, now, now),
                    Err(ready) => {
                        prop_assert!(ready > now);
                        prop_assert!(t.try_acquire(&keys, ready).is_ok());
                        t.settle(&keys, ready, ready);
                    }
                }
            }
        }
    }
}
