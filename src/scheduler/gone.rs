//! Messages Feishu said are gone (230011 recalled, 231003 deleted): remembered for
//! [`GONE_FOR`], so later calls on them fail at once (`MESSAGE_GONE`) instead of each asking
//! Feishu again, as Feishu's own plugin does. Bounded (two generations, no sweeps).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// How long a gone message is remembered.
pub const GONE_FOR: Duration = Duration::from_secs(30 * 60);

/// Feishu's codes for a message that is no longer there: recalled, deleted.
pub const GONE_CODES: [i64; 2] = [230011, 231003];

/// Message ids Feishu said are gone, and when it said so.
pub struct GoneMessages {
    half: usize,
    gens: Mutex<Generations>,
    /// Entries held (a lookup on an empty set takes no lock: the usual case).
    len: AtomicUsize,
}

#[derive(Default)]
struct Generations {
    hot: HashMap<Arc<str>, Instant>,
    cold: HashMap<Arc<str>, Instant>,
}

impl GoneMessages {
    /// At most `capacity` messages are remembered (the oldest half goes first).
    pub fn new(capacity: usize) -> Self {
        Self {
            half: (capacity / 2).max(1),
            gens: Mutex::new(Generations::default()),
            len: AtomicUsize::new(0),
        }
    }

    /// Feishu said `message_id` is gone (now).
    pub fn remember(&self, message_id: &str) {
        let mut g = self.gens.lock();
        if g.hot.len() >= self.half && !g.hot.contains_key(message_id) {
            g.cold = std::mem::take(&mut g.hot);
        }
        g.hot.insert(message_id.into(), Instant::now());
        self.len
            .store(g.hot.len() + g.cold.len(), Ordering::Relaxed);
    }

    /// Whether Feishu said `message_id` is gone less than [`GONE_FOR`] ago.
    pub fn is_gone(&self, message_id: &str) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let g = self.gens.lock();
        g.hot
            .get(message_id)
            .or_else(|| g.cold.get(message_id))
            .is_some_and(|at| at.elapsed() < GONE_FOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_gone_message_is_remembered_for_thirty_minutes_within_the_bound() {
        let g = GoneMessages::new(4);
        assert!(!g.is_gone("om_1"));
        g.remember("om_1");
        assert!(g.is_gone("om_1"));
        assert!(!g.is_gone("om_2"));
        tokio::time::advance(GONE_FOR - Duration::from_secs(1)).await;
        assert!(g.is_gone("om_1"));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!g.is_gone("om_1"), "forgotten after 30 minutes");
        // Bounded: the oldest generation goes.
        for i in 2..8 {
            g.remember(&format!("om_{i}"));
        }
        assert!(!g.is_gone("om_2") && !g.is_gone("om_3"));
        assert!(g.is_gone("om_6") && g.is_gone("om_7"));
    }
}
