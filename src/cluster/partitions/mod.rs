//! Partition ownership (issue 21, step 1 of "Scaling out over a Redis Cluster" in
//! ARCHITECTURE.md): every target key (a chat, a user, a message, a card) falls in one of
//! [`PARTITIONS`] partitions, and each partition has at most one owner among the live
//! replicas at any time. The owner is the one replica that decides and sends for the
//! partition's targets, and keeps their windows (with peers: `cluster::gate`).
//!
//! - **Members.** Each replica holds a lease in `{<prefix>:parts}:members` (a sorted set:
//!   replica → lease end, Redis `TIME`), renewed every quarter lease by one script call. A
//!   replica whose lease ended is dead for good: its next renewal is refused, it drops every
//!   partition and joins again under a new id. A stopping replica ends its lease at once
//!   ([`Partitions::leave`]).
//! - **Who should own what.** Rendezvous hashing over the live members: partition `p` goes to
//!   the member with the highest `hash(member, p)`, so a member joining or leaving moves only
//!   its own share.
//! - **Claims and releases** are in the same call as the renewal, against the owner records in
//!   `{<prefix>:parts}:owners` (one slot with the members, so a claim checks the old owner's
//!   lease atomically). A partition may be claimed when it has no owner (released) or its
//!   owner's lease ended; each claim bumps the partition's epoch (the fencing token the job
//!   keys will carry) and says when the last owner's sends stopped: its release, or its lease
//!   end. The new owner sends to the partition's targets only a target span after that
//!   ([`Owned::sendable_at`]): whatever the old owner sent has left Feishu's windows by then;
//!   at once when the last owner released it cleanly and left its sends that may still count
//!   (`handover`), which the new owner counts first.
//! - **Validity.** A replica counts its partitions as its own only until its lease, as this
//!   process measured it from before the renewal call, ends (less a fifth of it): a replica
//!   cut off from Redis, or stalled, stops deciding for them before any other replica may
//!   claim them, and the claim counts the dead owner's sends as stopped from then.
//! - **Hand-over.** Each send to a partition counts in flight ([`Sending`], from its decision
//!   to its answer). A partition another member should own is no longer decided here at once
//!   ([`Route::Elsewhere`]) and released once nothing sent to it is in flight (at most the
//!   send timeout later); a leaving replica waits the same way, then releases them all.
//! - **Speed of a move.** A replica that joins or leaves tells the others (`grpc::peer`'s
//!   Rebalance, [`Partitions::rebalance`]), which beat at once; a replica waiting for a
//!   partition it should own, or handing one over, beats every 50 ms until it is done.
//!
//! Cost: one Redis call per replica per quarter lease (two when the members changed: the
//! second claims and releases at once; a few more while partitions move). `beat` is the
//! renewal, `answer` reads its answer, `handover` the sends a released partition carries. All
//! on one slot: the data of a partition (its jobs, step 4) goes on the partition's own slot,
//! carrying the epoch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use redis::Script;
use tokio::time::Instant;

use super::scripts::{LEAVE_LUA, PARTITIONS_LUA, PEER_SECRET_LUA};
use crate::metrics::Metrics;
use crate::redis_conn::{ClusterError, Lane, SharedRedis};

/// Partitions of the target keys (fixed: every replica and version must agree).
pub const PARTITIONS: u16 = 256;

/// The partition of a target key (a chat id, `user:<key>`, `message:<id>`, a card id): the
/// first two bytes of its SHA-256 modulo [`PARTITIONS`], the same on every replica.
pub fn partition_of(target: &str) -> u16 {
    let d = ring::digest::digest(&ring::digest::SHA256, target.as_bytes());
    u16::from_be_bytes([d.as_ref()[0], d.as_ref()[1]]) % PARTITIONS
}

/// Rendezvous weight of `member` for partition `p`.
fn weight(member: &str, p: u16) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(member.as_bytes());
    ctx.update(&[0]);
    ctx.update(&p.to_be_bytes());
    let d = ctx.finish();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(b)
}

/// Which of `live` should own partition `p` (rendezvous hashing; `None` when none is live).
pub fn preferred_owner(p: u16, live: &[String]) -> Option<&str> {
    live.iter()
        .max_by_key(|m| (weight(m, p), m.as_str()))
        .map(String::as_str)
}

/// A partition this replica owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owned {
    /// The claim's epoch: greater than every earlier owner's.
    pub epoch: u64,
    /// Sends to the partition's targets wait until then (the last owner's sends have left
    /// every target window).
    pub sendable_at: Instant,
}

/// Where a partition's jobs are decided, as this replica sees it ([`Partitions::route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Here: this replica owns it.
    Here(Owned),
    /// Here soon: this replica should own it and claims it at its next beat (or before the
    /// first beat, nobody is known yet).
    Claiming,
    /// Another replica should own it: its jobs go there.
    Elsewhere,
}

/// A send to one of this replica's partitions, from its decision until its answer (or until
/// it is given up): a partition being handed over is released only when it has none.
pub struct Sending {
    counts: Arc<[AtomicU32]>,
    p: u16,
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.counts[usize::from(self.p)].fetch_sub(1, Ordering::AcqRel);
    }
}

impl Sending {
    /// The partition sent to.
    pub fn partition(&self) -> u16 {
        self.p
    }
}

impl std::fmt::Debug for Sending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sending({})", self.p)
    }
}

/// A replica stops deciding for its partitions a `1/VALIDITY_MARGIN` of a lease before its
/// lease can end in Redis (the same fraction as in PARTITIONS_LUA).
const VALIDITY_MARGIN: u32 = 5;

/// How soon a beat follows while a partition handed over still has sends in flight, or one
/// this replica should own is still another's.
const HANDOVER_RECHECK: Duration = Duration::from_millis(50);

/// What one beat changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Beat {
    /// Partitions claimed (or confirmed after an answer that was lost).
    pub claimed: Vec<u16>,
    /// Partitions given up for a member that should own them.
    pub released: Vec<u16>,
    /// The lease had ended: every partition was dropped (and the replica joins again).
    pub lost: bool,
    /// Whether the live members changed since the previous beat.
    pub members_changed: bool,
}

struct State {
    /// This replica's member id (a new one after a lost lease).
    me: String,
    /// Whether `me` holds a lease in Redis (else the next beat joins).
    joined: bool,
    /// Until when this replica's lease surely holds (local clock).
    valid_until: Option<Instant>,
    owned: BTreeMap<u16, Owned>,
    /// Partitions another member should own, not released yet: sends to them were still in
    /// flight (since when it was decided to hand them over).
    leaving: BTreeMap<u16, (Owned, Instant)>,
    /// Released locally, not yet confirmed by Redis (sent again each beat until it answers),
    /// and whether cleanly (nothing sent to it was in flight: its handover is written).
    releasing: BTreeMap<u16, bool>,
    /// The sends to this replica's partitions' targets that may still count.
    known: Known,
    /// Sends handed over with partitions claimed, not yet counted by the gate.
    imports: Vec<KnownSend>,
    /// Whether a partition this replica should own is still another's (being handed over:
    /// the next beat follows soon).
    waiting: bool,
    /// Live members (sorted), as the last beat saw them.
    live: Vec<String>,
    /// Where each live member's peers reach it (empty: not said).
    addrs: Vec<String>,
    /// Each partition's preferred owner among `live` (index into `live`).
    preferred: Vec<Option<usize>>,
}

/// Partition ownership for one replica (see the module doc).
pub struct Partitions {
    redis: Arc<SharedRedis>,
    members_key: String,
    owners_key: String,
    addrs_key: String,
    secret_key: String,
    lease: Duration,
    /// The longest target window plus margin: how long a new owner waits after the last
    /// owner's sends stopped.
    target_span: Duration,
    /// How long a send may stay in flight (the send timeout): a partition handed over is
    /// released once its sends are answered, at most this long after.
    hold: Duration,
    /// Sends in flight per partition ([`Sending`]).
    sending: Arc<[AtomicU32]>,
    beat: Script,
    leave: Script,
    /// Where this replica's peers reach it (empty: not said).
    addr: String,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
    /// Asks [`Self::run`] to beat now ([`Self::rebalance`]).
    nudge: tokio::sync::Notify,
    /// Whether this replica holds a lease (its first beat, or one after a lost lease, joined).
    joined: tokio::sync::watch::Sender<bool>,
}

fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

mod answer;
mod beat;
mod handover;

use handover::Known;
pub use handover::KnownSend;

impl Partitions {
    /// Ownership on `redis` (keys under its `key_prefix`): a replica not renewing for `lease`
    /// loses its partitions; a new owner waits `target_span` after the last owner stopped; a
    /// send stays in flight at most `hold`.
    pub fn new(
        redis: Arc<SharedRedis>,
        lease: Duration,
        target_span: Duration,
        hold: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let base = format!("{{{}:parts}}", redis.config().key_prefix);
        Self {
            members_key: format!("{base}:members"),
            owners_key: format!("{base}:owners"),
            addrs_key: format!("{base}:addrs"),
            secret_key: format!("{base}:peer-secret"),
            lease,
            target_span,
            hold,
            sending: (0..PARTITIONS).map(|_| AtomicU32::new(0)).collect(),
            beat: Script::new(PARTITIONS_LUA),
            leave: Script::new(LEAVE_LUA),
            state: Mutex::new(State {
                me: new_id(),
                joined: false,
                valid_until: None,
                owned: BTreeMap::new(),
                leaving: BTreeMap::new(),
                releasing: BTreeMap::new(),
                known: Known::default(),
                imports: Vec::new(),
                waiting: false,
                live: Vec::new(),
                addrs: Vec::new(),
                preferred: vec![None; usize::from(PARTITIONS)],
            }),
            addr: String::new(),
            redis,
            metrics,
            nudge: tokio::sync::Notify::new(),
            joined: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Another replica joined or is leaving (it said so): the next beat runs now.
    pub fn rebalance(&self) {
        self.nudge.notify_one();
    }

    /// Whether this replica holds a lease: true once it joined (again, after a lost lease).
    pub fn joined(&self) -> tokio::sync::watch::Receiver<bool> {
        self.joined.subscribe()
    }

    /// Where the other live members' peers reach them, as the last beat saw them (those that
    /// said).
    pub fn peer_addrs(&self) -> Vec<String> {
        let s = self.state.lock();
        s.live
            .iter()
            .zip(&s.addrs)
            .filter(|(m, a)| **m != s.me && !a.is_empty())
            .map(|(_, a)| a.clone())
            .collect()
    }

    /// Tells the other replicas they reach this one at `addr` (its peer endpoint).
    pub fn with_addr(mut self, addr: String) -> Self {
        self.addr = addr;
        self
    }

    /// The member that should own `p` and where it is reached (its address may be empty),
    /// as this replica last saw the members; `None` before the first beat.
    pub fn preferred_at(&self, p: u16) -> Option<(String, String)> {
        let s = self.state.lock();
        let i = s.preferred.get(usize::from(p)).copied().flatten()?;
        Some((s.live[i].clone(), s.addrs[i].clone()))
    }

    /// Where this replica's peers reach it (empty: not said).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// This replica's member id.
    pub fn me(&self) -> String {
        self.state.lock().me.clone()
    }

    /// How often [`Self::run`] renews.
    pub fn period(&self) -> Duration {
        self.lease / 4
    }

    /// Partition `p`, when this replica owns it and its lease holds at `now`.
    pub fn owns(&self, p: u16, now: Instant) -> Option<Owned> {
        let s = self.state.lock();
        match s.valid_until {
            Some(v) if now < v => s.owned.get(&p).copied(),
            _ => None,
        }
    }

    /// Where `p`'s jobs are decided at `now`.
    pub fn route(&self, p: u16, now: Instant) -> Route {
        Self::route_in(&self.state.lock(), p, now)
    }

    /// [`Self::route`], adding to `handed` the sends handed over with the partitions claimed
    /// since the last call (every partition's, taken together with the route: the gate
    /// never decides for a partition before it counts its handover).
    pub fn route_taking(&self, p: u16, now: Instant, handed: &mut Vec<KnownSend>) -> Route {
        let mut s = self.state.lock();
        handed.append(&mut s.imports);
        Self::route_in(&s, p, now)
    }

    fn route_in(s: &State, p: u16, now: Instant) -> Route {
        if let Some(v) = s.valid_until
            && now < v
            && let Some(o) = s.owned.get(&p)
        {
            return Route::Here(*o);
        }
        match s.preferred.get(usize::from(p)).copied().flatten() {
            Some(i) if s.live[i] != s.me => Route::Elsewhere,
            _ => Route::Claiming,
        }
    }

    /// A send to `p` begins, when this replica owns it at `now` (checked together, so a
    /// partition is never released with a send it did not count).
    pub fn begin_send(&self, p: u16, now: Instant) -> Option<Sending> {
        let s = self.state.lock();
        match s.valid_until {
            Some(v) if now < v && s.owned.contains_key(&p) => {
                self.sending[usize::from(p)].fetch_add(1, Ordering::AcqRel);
                Some(Sending {
                    counts: self.sending.clone(),
                    p,
                })
            }
            _ => None,
        }
    }

    /// A send to `p`'s target `target` (its window `quota`) was answered at `at`: it is
    /// handed over with `p`.
    pub fn sent(&self, p: u16, quota: crate::quota::QuotaId, target: Arc<str>, at: Instant) {
        let mut s = self.state.lock();
        if s.owned.contains_key(&p) || s.leaving.contains_key(&p) {
            let span = self.target_span;
            s.known
                .add(p, KnownSend { quota, target, at }, span, Instant::now());
        }
    }

    fn in_flight(&self, p: u16) -> u32 {
        self.sending[usize::from(p)].load(Ordering::Acquire)
    }

    /// The partitions this replica owns at `now` (none once its lease may have ended).
    pub fn owned(&self, now: Instant) -> Vec<u16> {
        let s = self.state.lock();
        match s.valid_until {
            Some(v) if now < v => s.owned.keys().copied().collect(),
            _ => Vec::new(),
        }
    }

    /// [`Self::owned`] with the epochs of their claims.
    pub fn owned_epochs(&self, now: Instant) -> Vec<(u16, u64)> {
        let s = self.state.lock();
        match s.valid_until {
            Some(v) if now < v => s.owned.iter().map(|(p, o)| (*p, o.epoch)).collect(),
            _ => Vec::new(),
        }
    }

    /// The member that should own `p` as this replica last saw the members (a call for `p`
    /// goes there); `None` before the first beat.
    pub fn preferred(&self, p: u16) -> Option<String> {
        let s = self.state.lock();
        s.preferred
            .get(usize::from(p))
            .copied()
            .flatten()
            .map(|i| s.live[i].clone())
    }

    /// The live members as the last beat saw them.
    pub fn members(&self) -> Vec<String> {
        self.state.lock().live.clone()
    }

    /// The secret replicas show each other when they forward jobs: the first replica to ask
    /// stores a random one in Redis, every other reads it (whoever can write this Redis can
    /// already forge every quota, so it guards nothing Redis does not).
    pub async fn peer_secret(&self) -> Result<String, ClusterError> {
        let candidate = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let script = Script::new(PEER_SECRET_LUA);
        let mut inv = script.prepare_invoke();
        inv.key(&self.secret_key).arg(candidate);
        self.redis.call_on(Lane::Quota, "peer_secret", inv).await
    }

    /// This replica is stopping: it stops deciding for its partitions now, waits until their
    /// sends in flight are answered (at most a send timeout), then ends its lease, so the
    /// others claim them at their next beat. From now on it routes every partition's jobs
    /// to the other members.
    pub async fn leave(&self) -> Result<(), ClusterError> {
        let (me, held) = {
            let mut s = self.state.lock();
            let held: BTreeSet<u16> = s.owned.keys().chain(s.leaving.keys()).copied().collect();
            // Not decided here any more; the answers still to come are logged for the
            // handover until they are released.
            let now = Instant::now();
            let owned = std::mem::take(&mut s.owned);
            s.leaving
                .extend(owned.into_iter().map(|(p, o)| (p, (o, now))));
            s.valid_until = None;
            let me = s.me.clone();
            if let Some(i) = s.live.iter().position(|m| *m == me) {
                s.live.remove(i);
                s.addrs.remove(i);
            }
            let live = s.live.clone();
            s.preferred = preferred_all(&live);
            (me, held)
        };
        self.metrics.set_partitions_owned(0);
        let until = Instant::now() + self.hold;
        while self.sending.iter().any(|c| c.load(Ordering::Acquire) > 0) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let hands: Vec<(u16, String)> = {
            let mut s = self.state.lock();
            let now = Instant::now();
            let hands = held
                .into_iter()
                .map(|p| (p, self.hand(&s, p, self.in_flight(p) == 0, now)))
                .collect();
            s.known.clear();
            s.imports.clear();
            s.leaving.clear();
            hands
        };
        let mut inv = self.leave.prepare_invoke();
        inv.key(&self.members_key).key(&self.owners_key).arg(&me);
        for (p, hand) in hands {
            inv.arg(p).arg(hand);
        }
        let _: i64 = self
            .redis
            .call_on(Lane::Quota, "partitions_leave", inv)
            .await?;
        Ok(())
    }
}

/// Each partition's preferred owner among `live` (index into it).
fn preferred_all(live: &[String]) -> Vec<Option<usize>> {
    (0..PARTITIONS)
        .map(|p| preferred_owner(p, live).and_then(|m| live.iter().position(|l| l == m)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_has_one_partition_everywhere() {
        // SHA-256 is fixed: these hold on every replica and every version.
        assert_eq!(partition_of("oc_a"), partition_of("oc_a"));
        let d = ring::digest::digest(&ring::digest::SHA256, b"oc_a");
        let want = u16::from_be_bytes([d.as_ref()[0], d.as_ref()[1]]) % PARTITIONS;
        assert_eq!(partition_of("oc_a"), want);
        let spread: BTreeSet<u16> = (0..5000)
            .map(|i| partition_of(&format!("oc_{i}")))
            .collect();
        assert_eq!(
            spread.len(),
            usize::from(PARTITIONS),
            "5000 chats reach every partition"
        );
    }

    #[test]
    fn rendezvous_shares_fairly_and_moves_only_the_newcomers_share() {
        let three: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut count = BTreeMap::new();
        for p in 0..PARTITIONS {
            *count
                .entry(preferred_owner(p, &three).unwrap().to_owned())
                .or_insert(0) += 1;
        }
        for (m, n) in &count {
            assert!((55..=115).contains(n), "{m} would own {n} of 256");
        }
        let four: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        for p in 0..PARTITIONS {
            let before = preferred_owner(p, &three).unwrap();
            let after = preferred_owner(p, &four).unwrap();
            assert!(
                after == before || after == "d",
                "partition {p} moved {before} → {after}"
            );
        }
        assert_eq!(preferred_owner(0, &[]), None);
    }
}
