//! Rolling-window keyed quotas: "never more than N sends in any window of length W" per key.
//! Pure state with the clock passed in (microseconds from an origin the caller picks); no I/O,
//! no tokio. The scheduler owns one [`QuotaTable`] and asks it before every send.
//!
//! Each key keeps a ring of its last N send instants; the key has room when the oldest of them
//! is at least W (+ a safety margin) old. This allows a burst of N at once yet never N+1 in any
//! sliding window, unlike a GCRA/token bucket, which lets 2N−1 through one window.

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

type PreHashedMap<V> = HashMap<u64, V, BuildHasherDefault<PreHashed>>;

/// Rings up to this size live inline in the map entry (no extra allocation, one cache miss
/// less); the chat and user quotas (5) fit.
const INLINE: usize = 6;

#[derive(Debug)]
enum Slots {
    Inline([Micros; INLINE]),
    Heap(Box<[Micros]>),
}

/// The last `limit` send instants of one key, oldest first (a ring).
#[derive(Debug)]
struct Ring {
    slots: Slots,
    cap: u32,
    /// Index of the oldest entry once the ring is full; next write position.
    head: u32,
    len: u32,
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

    /// The earliest instant at which one more send fits (0 when it fits now).
    fn ready_at(&self, window: Micros) -> Micros {
        if self.len < self.cap {
            0
        } else {
            self.s()[self.head as usize].saturating_add(window)
        }
    }

    /// Lower bound of the instant of the `nth` (1-based) future send on this key, if nothing but
    /// this key's quota delayed it: future send m waits for the send N positions before it.
    fn nth_ready_at(&self, nth: u64, window: Micros) -> Micros {
        let cap = u64::from(self.cap);
        let (rounds, pos) = ((nth - 1) / cap, (nth - 1) % cap);
        // The send `cap` places before future send `pos+1` is the pos-th oldest recorded one
        // (when the ring is not full the missing oldest entries are "long ago").
        let missing = cap - u64::from(self.len);
        let base = if pos < missing {
            0
        } else {
            let idx = (u64::from(self.head) + (pos - missing)) % cap;
            self.s()[idx as usize].saturating_add(window)
        };
        base.saturating_add(rounds.saturating_mul(window))
    }

    fn record(&mut self, now: Micros) {
        let cap = self.cap;
        if self.len < cap {
            let idx = (self.head + self.len) % cap;
            self.s_mut()[idx as usize] = now;
            self.len += 1;
        } else {
            let head = self.head as usize;
            self.s_mut()[head] = now;
            self.head = (self.head + 1) % cap;
        }
    }

    fn newest(&self) -> Micros {
        if self.len == 0 {
            return 0;
        }
        let idx = (self.head + self.len - 1) % self.cap;
        self.s()[idx as usize]
    }

    /// The recorded instants, oldest first.
    fn entries(&self) -> impl Iterator<Item = Micros> + '_ {
        let s = self.s();
        (0..self.len).map(move |i| s[((self.head + i) % self.cap) as usize])
    }

    /// Moves the newest entry equal to `from` to `to` (a send recorded at its dispatch instant
    /// that actually left later). Returns false when the entry is gone.
    fn restamp(&mut self, from: Micros, to: Micros) -> bool {
        let (cap, head, len) = (self.cap, self.head, self.len);
        let s = self.s_mut();
        for back in (0..len).rev() {
            let idx = ((head + back) % cap) as usize;
            if s[idx] == from {
                s[idx] = to;
                return true;
            }
        }
        false
    }

    /// Behave as if the whole quota had been spent: no send until `until_minus_window` + window.
    /// Missing entries become the oldest ones, so the ring stays in time order.
    fn block_until(&mut self, until_minus_window: Micros) {
        let cap = self.cap as usize;
        let missing = cap - self.len as usize;
        let mut ordered = vec![until_minus_window; cap];
        for (i, t) in self.entries().enumerate() {
            ordered[missing + i] = t.max(until_minus_window);
        }
        self.s_mut().copy_from_slice(&ordered);
        self.head = 0;
        self.len = cap as u32;
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
    keys: Vec<PreHashedMap<Ring>>,
    /// The ids behind the hashes, kept only when asked (`keep_ids`: for [`Self::live_entries`]).
    ids: Option<Vec<PreHashedMap<Arc<str>>>>,
    /// No key may send before `floor + span` (0 = no floor): set when this table takes over
    /// from another source of truth whose sends it cannot see (Redis down → local quotas).
    floor: Micros,
}

impl std::fmt::Debug for PreHashed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreHashed")
    }
}

impl QuotaTable {
    /// `margin` is added to every window to absorb network jitter between our send instant and
    /// Feishu's receive instant.
    pub fn new(specs: Vec<QuotaSpec>, margin: Duration) -> Self {
        let spans = specs
            .iter()
            .map(|s| micros(s.window) + micros(margin))
            .collect();
        let keys = specs.iter().map(|_| PreHashedMap::default()).collect();
        Self {
            specs,
            spans,
            keys,
            ids: None,
            floor: 0,
        }
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

    /// The earliest instant at which every key has room at the same time (≤ `now` = ready).
    pub fn ready_at(&self, keys: &[QuotaKey]) -> Micros {
        keys.iter()
            .map(|k| {
                let span = self.spans[k.quota];
                let ring = self.keys[k.quota]
                    .get(&k.hash)
                    .map_or(0, |r| r.ready_at(span));
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

    /// Every key's sends still inside its window, as ages (µs before `now`). Needs
    /// [`Self::keep_ids`]; empty otherwise.
    pub fn live_entries(&self, now: Micros) -> Vec<(QuotaKey, Vec<Micros>)> {
        let Some(ids) = &self.ids else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (quota, (map, &span)) in self.keys.iter().zip(&self.spans).enumerate() {
            for (hash, ring) in map {
                let ages: Vec<Micros> = ring
                    .entries()
                    .filter(|&t| t <= now && t.saturating_add(span) > now)
                    .map(|t| now - t)
                    .collect();
                if let (false, Some(id)) = (ages.is_empty(), ids[quota].get(hash)) {
                    out.push((QuotaKey::new(quota, id.clone()), ages));
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

    /// Records one send in every key if all have room at `now`; otherwise records nothing and
    /// returns the earliest instant at which all would have room.
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
        let ready = self.ready_at(keys);
        if ready > now {
            return Err(ready);
        }
        for k in keys {
            self.ring_mut(k).record(now);
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
        let (specs, spans, floor) = (&self.specs, &self.spans, self.floor);
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
            ready = ready.max(ring.ready_at(span).max(floor_plus(floor, span)));
        }
        if ready > now {
            return Some(Err(ready));
        }
        for ring in &mut rings {
            ring.record(now);
        }
        if let Some(ids) = &mut self.ids {
            for k in keys {
                ids[k.quota].entry(k.hash).or_insert_with(|| k.id.clone());
            }
        }
        Some(Ok(()))
    }

    /// A lower bound on when the `nth` future send on `key` can happen (for admission: a job
    /// behind `nth - 1` others in its chat cannot be sent before this).
    pub fn nth_ready_at(&self, key: &QuotaKey, nth: u64) -> Micros {
        let span = self.spans[key.quota];
        let bound = match self.keys[key.quota].get(&key.hash) {
            Some(r) => r.nth_ready_at(nth.max(1), span),
            None => {
                let cap = u64::from(self.specs[key.quota].limit.get());
                ((nth.max(1) - 1) / cap).saturating_mul(span)
            }
        };
        bound.max(floor_plus(self.floor, span))
    }

    /// A send recorded at `from` (the dispatch decision) actually started at `to` (> `from`):
    /// count it from `to`, so the gap between deciding and sending never shortens a window.
    /// Sound because an entry only ever moves later (more conservative) and each ring still
    /// holds the last N sends of its key.
    pub fn restamp(&mut self, keys: &[QuotaKey], from: Micros, to: Micros) {
        if to <= from {
            return;
        }
        for k in keys {
            if let Some(r) = self.keys[k.quota].get_mut(&k.hash) {
                r.restamp(from, to);
            }
        }
    }

    /// Feishu rejected a send on this key for rate although we kept within the quota (another
    /// client shares it, or Feishu counts differently): behave as if the quota were spent, so
    /// the key stays silent until `until`.
    pub fn block_until(&mut self, key: &QuotaKey, until: Micros) {
        let span = self.spans[key.quota];
        self.ring_mut(key).block_until(until.saturating_sub(span));
    }

    /// Forgets keys whose every recorded send is out of its window (they are equivalent to an
    /// unseen key), returning memory to baseline once traffic stops.
    pub fn forget_idle(&mut self, now: Micros) -> usize {
        let mut forgotten = 0;
        for (quota, (map, &span)) in self.keys.iter_mut().zip(&self.spans).enumerate() {
            let before = map.len();
            map.retain(|_, r| r.newest().saturating_add(span) > now);
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

    const MS: Micros = 1000;

    fn spec(n: u32, w_ms: u64) -> QuotaSpec {
        QuotaSpec::new(NonZeroU32::new(n).unwrap(), Duration::from_millis(w_ms))
    }

    #[test]
    fn burst_of_n_then_waits_for_the_oldest_to_age_out() {
        let mut t = QuotaTable::new(vec![spec(5, 1000)], Duration::ZERO);
        let k = [QuotaKey::new(0, "oc_1")];
        for i in 0..5 {
            t.try_acquire(&k, i * MS).unwrap();
        }
        assert_eq!(t.try_acquire(&k, 10 * MS), Err(1000 * MS));
        t.try_acquire(&k, 1000 * MS).unwrap();
        assert_eq!(t.try_acquire(&k, 1000 * MS), Err(1001 * MS));
    }

    #[test]
    fn all_keys_or_none_and_the_wait_is_the_latest_key() {
        let mut t = QuotaTable::new(vec![spec(1, 1000), spec(2, 500)], Duration::ZERO);
        let chat = QuotaKey::new(0, "oc_1");
        let app = QuotaKey::new(1, "cli_1");
        t.try_acquire(std::slice::from_ref(&app), 0).unwrap();
        t.try_acquire(std::slice::from_ref(&app), 100 * MS).unwrap();
        // chat has room, app does not: nothing is recorded on the chat.
        assert_eq!(
            t.try_acquire(&[chat.clone(), app.clone()], 200 * MS),
            Err(500 * MS)
        );
        t.try_acquire(std::slice::from_ref(&chat), 200 * MS)
            .unwrap();
        assert_eq!(t.try_acquire(&[chat, app], 500 * MS), Err(1200 * MS));
    }

    #[test]
    fn margin_widens_every_window() {
        let mut t = QuotaTable::new(vec![spec(1, 1000)], Duration::from_millis(20));
        let k = [QuotaKey::new(0, "a")];
        t.try_acquire(&k, 0).unwrap();
        assert_eq!(t.try_acquire(&k, 1000 * MS), Err(1020 * MS));
    }

    #[test]
    fn nth_ready_at_is_a_lower_bound_of_queued_sends() {
        let mut t = QuotaTable::new(vec![spec(5, 1000)], Duration::ZERO);
        let k = QuotaKey::new(0, "c");
        assert_eq!(t.nth_ready_at(&k, 5), 0);
        assert_eq!(t.nth_ready_at(&k, 6), 1000 * MS);
        for i in 0..3 {
            t.try_acquire(std::slice::from_ref(&k), i * 100 * MS)
                .unwrap();
        }
        // 2 free slots now; the 3rd future send waits for the send at 0.
        assert_eq!(t.nth_ready_at(&k, 2), 0);
        assert_eq!(t.nth_ready_at(&k, 3), 1000 * MS);
        assert_eq!(t.nth_ready_at(&k, 5), 1200 * MS);
        assert_eq!(t.nth_ready_at(&k, 8), 2000 * MS);
    }

    #[test]
    fn restamp_moves_a_send_later_and_delays_the_window() {
        let mut t = QuotaTable::new(vec![spec(2, 1000)], Duration::ZERO);
        let k = [QuotaKey::new(0, "c")];
        t.try_acquire(&k, 0).unwrap();
        t.try_acquire(&k, 10 * MS).unwrap();
        t.restamp(&k, 0, 30 * MS);
        // Oldest by insertion now counts from 30 ms.
        assert_eq!(t.try_acquire(&k, 1000 * MS), Err(1030 * MS));
        t.try_acquire(&k, 1030 * MS).unwrap();
        // The send at 10 ms is out of the window by now: one more fits, then none until 2030.
        t.try_acquire(&k, 1030 * MS).unwrap();
        assert_eq!(t.try_acquire(&k, 1500 * MS), Err(2030 * MS));
    }

    #[test]
    fn block_until_on_a_partly_used_ring_keeps_time_order() {
        let mut t = QuotaTable::new(vec![spec(1000, 60_000)], Duration::ZERO);
        let k = [QuotaKey::new(0, "app")];
        let base = 3600 * 1000 * MS;
        for i in 0..100 {
            t.try_acquire(&k, base + i * MS).unwrap();
        }
        t.block_until(&k[0], base + 1100 * MS);
        // Silent until 1.1 s, then the 900 unused sends of this minute are available again.
        assert_eq!(t.try_acquire(&k, base + 1000 * MS), Err(base + 1100 * MS));
        for _ in 0..900 {
            t.try_acquire(&k, base + 1100 * MS).unwrap();
        }
        assert_eq!(t.try_acquire(&k, base + 1100 * MS), Err(base + 60_000 * MS));
    }

    #[test]
    fn a_floor_holds_every_key_for_its_window_and_entries_can_be_read_back() {
        let mut t = QuotaTable::new(vec![spec(5, 1000), spec(50, 100)], Duration::ZERO).keep_ids();
        t.set_floor(10_000 * MS);
        let chat = [QuotaKey::new(0, "c")];
        let fast = [QuotaKey::new(1, "a")];
        assert_eq!(t.try_acquire(&chat, 10_000 * MS), Err(11_000 * MS));
        assert_eq!(t.try_acquire(&fast, 10_000 * MS), Err(10_100 * MS));
        t.try_acquire(&fast, 10_100 * MS).unwrap();
        t.try_acquire(&fast, 10_150 * MS).unwrap();
        let live = t.live_entries(10_160 * MS);
        assert_eq!(live, vec![(QuotaKey::new(1, "a"), vec![60 * MS, 10 * MS])]);
    }

    #[test]
    fn block_until_silences_a_key_for_a_while() {
        let mut t = QuotaTable::new(vec![spec(5, 1000)], Duration::ZERO);
        let k = [QuotaKey::new(0, "c")];
        t.block_until(&k[0], 3000 * MS);
        assert_eq!(t.try_acquire(&k, 10 * MS), Err(3000 * MS));
        for _ in 0..5 {
            t.try_acquire(&k, 3000 * MS).unwrap();
        }
        assert!(t.try_acquire(&k, 3000 * MS).is_err());
    }

    #[test]
    fn idle_keys_are_forgotten_and_memory_returns() {
        let mut t = QuotaTable::new(vec![spec(5, 1000), spec(50, 1000)], Duration::ZERO);
        for i in 0..10_000u64 {
            let keys = [QuotaKey::new(0, format!("oc_{i}")), QuotaKey::new(1, "app")];
            let _ = t.try_acquire(&keys, i);
        }
        assert!(t.live_keys() > 40);
        assert_eq!(t.forget_idle(500 * MS), 0);
        t.forget_idle(2000 * MS);
        assert_eq!(t.live_keys(), 0);
        assert!(t.keys.iter().all(|m| m.capacity() <= 64));
    }

    /// A job: its quota keys (a chat among a few, maybe a user, always the app) and arrival.
    #[derive(Debug, Clone)]
    struct Arrival {
        at_ms: u64,
        chat: u8,
        user: Option<u8>,
    }

    fn arrivals() -> impl Strategy<Value = Vec<Arrival>> {
        prop::collection::vec(
            (0u64..5_000, 0u8..6, prop::option::of(0u8..3))
                .prop_map(|(at_ms, chat, user)| Arrival { at_ms, chat, user }),
            1..300,
        )
    }

    proptest! {
        /// Whatever arrives when, a dispatcher that sends a job whenever `try_acquire` lets it
        /// never puts more than N sends of one key inside any window W (+margin).
        #[test]
        fn never_more_than_n_in_any_window(
            mut jobs in arrivals(),
            chat_n in 1u32..6, chat_w in 50u64..1500,
            user_n in 1u32..6, user_w in 50u64..1500,
            app_n in 1u32..60, app_w in 100u64..3000,
            margin_ms in 0u64..30,
        ) {
            let specs = vec![spec(chat_n, chat_w), spec(user_n, user_w), spec(app_n, app_w)];
            let mut t = QuotaTable::new(specs.clone(), Duration::from_millis(margin_ms));
            jobs.sort_by_key(|j| j.at_ms);
            let mut pending: Vec<(Micros, Vec<QuotaKey>)> = jobs.iter().map(|j| {
                let mut keys = vec![QuotaKey::new(0, format!("c{}", j.chat)), QuotaKey::new(2, "app")];
                if let Some(u) = j.user { keys.push(QuotaKey::new(1, format!("u{u}"))); }
                (j.at_ms * MS, keys)
            }).collect();
            let mut sends: HashMap<QuotaKey, Vec<Micros>> = HashMap::new();
            let mut now = 0;
            while !pending.is_empty() {
                let mut next = Micros::MAX;
                pending.retain(|(at, keys)| {
                    if *at > now { next = next.min(*at); return true; }
                    match t.try_acquire(keys, now) {
                        Ok(()) => { for k in keys { sends.entry(k.clone()).or_default().push(now); } false }
                        Err(ready) => { assert!(ready > now); next = next.min(ready); true }
                    }
                });
                if next == Micros::MAX { break; }
                now = next;
                t.forget_idle(now);
            }
            prop_assert!(pending.is_empty(), "jobs left unsent");
            for (k, times) in sends {
                let s = specs[k.quota];
                let (n, w) = (s.limit.get() as usize, micros(s.window) + margin_ms * MS);
                for pair in times.windows(n + 1) {
                    prop_assert!(pair[n] - pair[0] >= w,
                        "key {:?}: {} sends within {}us", k, n + 1, pair[n] - pair[0]);
                }
            }
        }

        /// The one-lookup path for 3- and 4-key jobs decides exactly as the general path.
        #[test]
        fn the_single_pass_decides_like_the_general_path(jobs in arrivals(), floor_ms in 0u64..500) {
            let specs = vec![spec(3, 700), spec(2, 300), spec(10, 2000), spec(20, 5000)];
            let mut fast = QuotaTable::new(specs.clone(), Duration::from_millis(5)).keep_ids();
            let mut general = QuotaTable::new(specs, Duration::from_millis(5)).keep_ids();
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
                prop_assert_eq!(fast.try_acquire(&keys, now), general.acquire_general(&keys, now));
            }
            let end = 10_000 * MS;
            let mut a = fast.live_entries(end);
            let mut b = general.live_entries(end);
            a.sort_by(|x, y| (x.0.quota, &x.0.id).cmp(&(y.0.quota, &y.0.id)));
            b.sort_by(|x, y| (x.0.quota, &x.0.id).cmp(&(y.0.quota, &y.0.id)));
            prop_assert_eq!(a, b);
        }

        /// The instant returned on refusal is honest: nothing else happening, the job fits then.
        #[test]
        fn the_returned_instant_admits_the_job(jobs in arrivals()) {
            let mut t = QuotaTable::new(vec![spec(3, 700), spec(2, 300), spec(10, 2000)], Duration::from_millis(5));
            for j in jobs {
                let keys = vec![QuotaKey::new(0, format!("c{}", j.chat)), QuotaKey::new(2, "app")];
                let now = j.at_ms * MS;
                if let Err(ready) = t.try_acquire(&keys, now) {
                    prop_assert!(ready > now);
                    prop_assert!(t.try_acquire(&keys, ready).is_ok());
                }
            }
        }
    }
}
