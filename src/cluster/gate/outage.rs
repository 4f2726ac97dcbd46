//! The Redis gate's relation to Redis: the heartbeat, going over to the failure policy when
//! Redis cannot be reached (this replica's share of every quota, or holding), and back once
//! the local sends are written to Redis again.

use std::num::NonZeroU32;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{HEARTBEAT_EVERY, HOLD_RECHECK, Mode, RedisGate};
use crate::cluster::{RedisFailurePolicy, RedisQuota, SharedKey};
use crate::quota::{QuotaSpec, QuotaTable};
use crate::scheduler::gate::{GateEvent, QuotaSource};

impl RedisGate {
    pub(super) fn publish(&self) {
        let state = match (&self.mode, self.store.config().on_failure) {
            (Mode::Up, _) => QuotaSource::Shared,
            (_, RedisFailurePolicy::FailClosed) => QuotaSource::Holding,
            _ => QuotaSource::Fallback,
        };
        self.state.send_replace(state);
        let up = matches!(self.mode, Mode::Up | Mode::Replaying);
        self.metrics
            .set_redis_state(up, !matches!(self.mode, Mode::Up));
    }

    pub(super) fn down(&mut self, error: &str) {
        if !matches!(self.mode, Mode::Up) {
            return;
        }
        self.mode = Mode::Down;
        let replicas = self.store.replicas();
        let policy = self.store.config().on_failure;
        // This replica's share of every quota; nothing local before the Redis-era sends have
        // left their windows (the floor), so the two sources never add up within a window.
        let scaled: Vec<QuotaSpec> = self
            .full_specs
            .iter()
            .map(|s| share_of(s, replicas))
            .collect();
        if policy == RedisFailurePolicy::Local {
            // keep_ids: its sends are replayed into Redis by key name on recovery.
            self.table = QuotaTable::new(scaled, self.margin, self.hold).keep_ids();
            self.table.set_floor(self.clock.micros(Instant::now()));
        }
        tracing::warn!(%error, ?policy, replicas, "Redis unavailable: quota decisions fall back to the failure policy");
        self.metrics.redis_fallback_switch();
        self.publish();
    }

    fn back_up(&mut self) {
        self.mode = Mode::Up;
        // The fallback's table (scaled, floored) is done with: admission's lower bounds come
        // from a clean one again, so no call is refused for a floor that no longer applies.
        self.table = QuotaTable::new(self.full_specs.clone(), self.margin, self.hold);
        if self.parts.is_some() {
            // Partitioned: this table keeps the targets' windows from now on, and every
            // replica sent to them on its own share meanwhile (their sends were not written
            // anywhere): nothing goes to a target before those have left its window.
            self.table.set_floor(self.clock.micros(Instant::now()));
        }
        self.publish();
    }

    /// The heartbeat reached Redis (`true`) or not. Returns true when the gate is back on
    /// Redis (every waiting chat should ask again).
    pub(super) fn heartbeat(&mut self, up: bool) -> bool {
        match (&self.mode, up) {
            (Mode::Up, false) => {
                self.down("heartbeat failed");
                false
            }
            (Mode::Down, true) => {
                if self.store.config().on_failure == RedisFailurePolicy::FailClosed {
                    tracing::info!("Redis is back: shared quotas again");
                    self.back_up();
                    return true;
                }
                self.mode = Mode::Replaying;
                let now_m = self.clock.micros(Instant::now());
                // Partitioned, the targets' windows are not in Redis: back on it, they wait
                // a window instead (`back_up`).
                let entries: Vec<(SharedKey, Vec<i64>)> = self
                    .table
                    .live_entries(now_m)
                    .into_iter()
                    .filter(|(k, _)| self.in_redis(k))
                    .map(|(k, offsets)| (self.shared_key(&k), offsets))
                    .collect();
                let (store, events) = (self.store.clone(), self.events.clone());
                tokio::spawn(async move {
                    let mut result = Ok(());
                    for (key, offsets) in &entries {
                        if let Err(e) = store.replay(key, offsets).await {
                            result = Err(e.to_string());
                            break;
                        }
                    }
                    let _ = events.send(GateEvent::Replayed(result));
                });
                self.publish();
                false
            }
            _ => false,
        }
    }

    /// The local sends were written back to Redis (or that failed). Returns true when the gate
    /// is back on Redis.
    pub(super) fn replay_done(&mut self, result: Result<(), String>) -> bool {
        if !matches!(self.mode, Mode::Replaying) {
            return false;
        }
        match result {
            Ok(()) => {
                tracing::info!(
                    "Redis is back and knows this replica's local sends: shared quotas again"
                );
                self.back_up();
                true
            }
            Err(e) => {
                self.mode = Mode::Down;
                tracing::warn!(error = %e, "writing local sends back to Redis failed; staying on local quotas");
                self.publish();
                false
            }
        }
    }
}

/// Heartbeat: tells the dispatcher whether Redis answers. Every second while the gate uses
/// Redis; every `HOLD_RECHECK` while it does not — whichever noticed the trouble (a failed
/// decision or a failed heartbeat), so a failed decision alone cannot leave it off Redis.
pub(super) async fn monitor(
    store: Arc<RedisQuota>,
    events: mpsc::WeakUnboundedSender<GateEvent>,
    state: watch::Receiver<QuotaSource>,
) {
    loop {
        let ok = store.beat().await.is_ok();
        let shared = *state.borrow() == QuotaSource::Shared;
        let Some(events) = events.upgrade() else {
            return;
        };
        if !ok || !shared {
            let _ = events.send(GateEvent::Health(ok));
        }
        drop(events);
        let pause = if ok && shared {
            HEARTBEAT_EVERY
        } else {
            HOLD_RECHECK
        };
        tokio::time::sleep(pause).await;
    }
}

/// One replica's share of `s` while Redis is down (at least 1).
pub(super) fn share_of(s: &QuotaSpec, replicas: usize) -> QuotaSpec {
    let share = (s.limit.get() as usize / replicas.max(1)).max(1) as u32;
    QuotaSpec::new(NonZeroU32::new(share).expect("max(1)"), s.window)
}
