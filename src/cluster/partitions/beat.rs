//! The beat: one renewal of this replica's lease, with its claims and releases (and their
//! handovers), every quarter lease (see the module doc of `cluster::partitions`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::time::Instant;

use super::answer::parse;
use super::{
    Beat, HANDOVER_RECHECK, Owned, PARTITIONS, Partitions, State, VALIDITY_MARGIN, handover,
    new_id, preferred_all,
};
use crate::redis_conn::{ClusterError, Lane};

impl Partitions {
    /// Renews until the process ends (errors are logged; the lease lapses by itself when
    /// Redis stays out of reach). A beat that changed the members is followed by another at
    /// once, which claims and releases for them.
    pub async fn run(self: Arc<Self>) {
        let mut follow_up = false;
        loop {
            if !follow_up {
                let moving = {
                    let s = self.state.lock();
                    !s.leaving.is_empty() || s.waiting
                };
                let pause = match moving {
                    true => HANDOVER_RECHECK,
                    false => self.period(),
                };
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = self.nudge.notified() => {}
                }
            }
            follow_up = match self.beat().await {
                Ok(b) => !follow_up && (b.members_changed || b.lost),
                Err(e) => {
                    tracing::debug!(error = %e, "renewing partition ownership failed; retrying");
                    false
                }
            };
        }
    }

    /// One renewal: joins (or joins again after a lost lease), claims the partitions this
    /// replica should own and does not, releases those another member should own.
    pub async fn beat(&self) -> Result<Beat, ClusterError> {
        let (me, join, claims, releases) = {
            let mut s = self.state.lock();
            let me = s.me.clone();
            let mut claims = Vec::new();
            let mut releases: BTreeMap<u16, bool> = std::mem::take(&mut s.releasing);
            let now = Instant::now();
            for p in 0..PARTITIONS {
                let preferred = s.preferred[usize::from(p)].map(|i| s.live[i] == me);
                match (preferred, s.owned.contains_key(&p)) {
                    (Some(true), false) => {
                        if let Some((owned, _)) = s.leaving.remove(&p) {
                            // Ours again before it was released.
                            s.owned.insert(p, owned);
                        } else if s.joined {
                            claims.push(p);
                        }
                    }
                    (Some(false), true) => {
                        // No new send to it from now on; released once its sends are
                        // answered (the new owner's wait counts from the release).
                        let owned = s.owned.remove(&p).expect("contains_key");
                        s.leaving.insert(p, (owned, now));
                    }
                    _ => {}
                }
            }
            let hold = self.hold;
            let done: Vec<(u16, bool)> = s
                .leaving
                .iter()
                .map(|(p, (_, since))| (*p, self.in_flight(*p) == 0, now >= *since + hold))
                .filter(|(_, clean, late)| *clean || *late)
                .map(|(p, clean, _)| (p, clean))
                .collect();
            for (p, clean) in done {
                s.leaving.remove(&p);
                releases.insert(p, clean);
            }
            s.releasing = releases.clone();
            let releases: Vec<(u16, String)> = releases
                .into_iter()
                .map(|(p, clean)| (p, self.hand(&s, p, clean, now)))
                .collect();
            (me, !s.joined, claims, releases)
        };
        let started = Instant::now();
        let mut inv = self.beat.prepare_invoke();
        inv.key(&self.members_key)
            .key(&self.owners_key)
            .key(&self.addrs_key)
            .arg(&me)
            .arg(u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX))
            .arg(u8::from(join))
            .arg(&self.addr)
            .arg(claims.len());
        for p in &claims {
            inv.arg(*p);
        }
        for (p, hand) in &releases {
            inv.arg(*p).arg(hand);
        }
        let v: Vec<Value> = self.redis.call_on(Lane::Quota, "partitions", inv).await?;
        let answered = Instant::now();
        let mut s = self.state.lock();
        if s.me != me {
            // Another beat ran meanwhile and found the lease lost: this answer is stale.
            return Ok(Beat::default());
        }
        let Some(a) = parse(&v)? else {
            let dropped = s.owned.len();
            s.owned.clear();
            s.leaving.clear();
            s.releasing.clear();
            s.known.clear();
            s.imports.clear();
            s.valid_until = None;
            s.me = new_id();
            s.joined = false;
            drop(s);
            tracing::warn!(
                dropped,
                "this replica's partition lease had ended (stalled or cut off from Redis): its partitions went to other replicas; joining again"
            );
            self.joined.send_replace(false);
            self.metrics.partitions_lost();
            self.metrics.set_partitions_owned(0);
            return Ok(Beat {
                lost: true,
                ..Beat::default()
            });
        };
        s.joined = true;
        self.joined
            .send_if_modified(|j| !std::mem::replace(j, true));
        // The lease runs from Redis's clock during the call, so surely from `started`. This
        // replica stops deciding a fifth of a lease before it ends: a new owner counts the
        // partition's sends as stopped from then (PARTITIONS_LUA), which shortens a takeover
        // by that much; the clocks' rates differ by far less.
        s.valid_until = Some(started + self.lease - self.lease / VALIDITY_MARGIN);
        s.releasing.clear();
        for (p, _) in &releases {
            if !s.owned.contains_key(p) {
                s.known.forget(*p);
            }
        }
        let mut live: Vec<(String, String)> = a
            .members
            .into_iter()
            .filter(|(_, end, _)| *end > a.now_ms)
            .map(|(id, _, addr)| (id, addr))
            .collect();
        live.sort();
        let (live, addrs): (Vec<String>, Vec<String>) = live.into_iter().unzip();
        let members_changed = live != s.live;
        if members_changed {
            s.preferred = preferred_all(&live);
            s.live = live;
        }
        s.addrs = addrs;
        let mut claimed = Vec::with_capacity(a.granted.len());
        for g in a.granted {
            // When the last owner's sends stopped, on this clock (Redis answered just before
            // `answered`, so this is never earlier than the truth).
            let since = Duration::from_millis(g.free_in_ms.unsigned_abs());
            let free = match g.free_in_ms >= 0 {
                true => answered + since,
                false => answered.checked_sub(since).unwrap_or(answered),
            };
            claimed.push(g.p);
            if s.owned.contains_key(&g.p) {
                // A re-grant of one already ours keeps the earlier (and later-sendable) record.
                continue;
            }
            let span = self.target_span;
            let handed = g.hand.and_then(|(wire, mine)| {
                Some((handover::decode(&wire, free, span, answered)?, mine))
            });
            // Handed over: the sends that may still count are known, so it is sendable now.
            let sendable_at = match handed {
                Some((sends, mine)) => {
                    for send in sends {
                        // This replica's own sends are in its windows already.
                        if !mine {
                            s.imports.push(send.clone());
                        }
                        s.known.add(g.p, send, span, answered);
                    }
                    answered
                }
                None => free + span,
            };
            s.owned.insert(
                g.p,
                Owned {
                    epoch: g.epoch,
                    sendable_at,
                },
            );
        }
        let me = s.me.clone();
        s.waiting = (0..PARTITIONS).any(|p| {
            s.preferred[usize::from(p)].is_some_and(|i| s.live[i] == me)
                && !s.owned.contains_key(&p)
        });
        let owned = s.owned.len();
        drop(s);
        let new = claimed.len();
        if new > 0 || !releases.is_empty() {
            tracing::info!(
                claimed = new,
                released = releases.len(),
                owned,
                "partition ownership moved"
            );
        }
        self.metrics
            .partitions_moved(new as u64, releases.len() as u64);
        self.metrics.set_partitions_owned(owned);
        Ok(Beat {
            claimed,
            released: releases.into_iter().map(|(p, _)| p).collect(),
            lost: false,
            members_changed,
        })
    }

    /// Partition `p`'s handover as of `now` when it is released `clean`ly (nothing sent to
    /// it in flight), else '' (its next owner waits a target span).
    pub(super) fn hand(&self, s: &State, p: u16, clean: bool, now: Instant) -> String {
        match clean {
            true => s.known.encode(p, self.target_span, now),
            false => String::new(),
        }
    }
}
