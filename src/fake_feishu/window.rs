//! Quota counters of the fakes: how Feishu might count "N per W" (sliding, fixed or bucket),
//! on tokio's clock so the same counters serve the HTTP fake in real time and the simulated
//! Feishu in virtual time. Also the fakes' deterministic random numbers.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::{FakeQuota, WindowMode};

/// One key's count under one quota.
pub(crate) enum Counter {
    Sliding(VecDeque<Instant>),
    Fixed { index: u64, count: u32 },
    Bucket { tokens: f64, at: Instant },
}

impl Counter {
    pub(crate) fn new(mode: WindowMode, q: FakeQuota, now: Instant) -> Self {
        match mode {
            WindowMode::Sliding => Counter::Sliding(VecDeque::new()),
            WindowMode::Fixed => Counter::Fixed { index: 0, count: 0 },
            WindowMode::Bucket => Counter::Bucket {
                tokens: f64::from(q.limit),
                at: now,
            },
        }
    }
}

/// `None` when the counter has room at `now`; otherwise roughly how long until it has.
pub(crate) fn counter_retry_after(
    c: Option<&Counter>,
    q: FakeQuota,
    mode: WindowMode,
    now: Instant,
    origin: Instant,
) -> Option<Duration> {
    let c = c?;
    match (mode, c) {
        (_, Counter::Sliding(times)) => {
            let live = times
                .iter()
                .filter(|t| now.duration_since(**t) < q.window)
                .count();
            (live >= q.limit as usize).then(|| {
                let oldest_live = times
                    .iter()
                    .find(|t| now.duration_since(**t) < q.window)
                    .copied()
                    .unwrap_or(now);
                q.window - now.duration_since(oldest_live)
            })
        }
        (_, Counter::Fixed { index, count }) => {
            let cur = window_index(now, origin, q.window);
            (cur == *index && *count >= q.limit).then_some(q.window)
        }
        (_, Counter::Bucket { tokens, at }) => {
            let refill =
                now.duration_since(*at).as_secs_f64() / q.window.as_secs_f64() * f64::from(q.limit);
            let t = (tokens + refill).min(f64::from(q.limit));
            (t < 1.0).then(|| q.window.mul_f64((1.0 - t) / f64::from(q.limit)))
        }
    }
}

pub(crate) fn counter_record(c: &mut Counter, q: FakeQuota, now: Instant, origin: Instant) {
    match c {
        Counter::Sliding(times) => {
            while times
                .front()
                .is_some_and(|t| now.duration_since(*t) >= q.window)
            {
                times.pop_front();
            }
            times.push_back(now);
        }
        Counter::Fixed { index, count } => {
            let cur = window_index(now, origin, q.window);
            if cur != *index {
                *index = cur;
                *count = 0;
            }
            *count += 1;
        }
        Counter::Bucket { tokens, at } => {
            let refill =
                now.duration_since(*at).as_secs_f64() / q.window.as_secs_f64() * f64::from(q.limit);
            *tokens = (*tokens + refill).min(f64::from(q.limit)) - 1.0;
            *at = now;
        }
    }
}

fn window_index(now: Instant, origin: Instant, window: Duration) -> u64 {
    (now.duration_since(origin).as_nanos() / window.as_nanos().max(1)) as u64
}

pub(crate) fn next_f64(state: &mut u64) -> f64 {
    // xorshift64*: deterministic, good enough for fault injection.
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
}
