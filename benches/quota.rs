//! Cost of one send's quota work (its decision, then settling its answer) with many live keys,
//! and memory per live key.
//!
//! `cargo bench --bench quota` — criterion timings for 1k / 100k / 1M live chat keys, plus
//! printed memory figures (bytes per live key, bytes left after every key went idle) from a
//! counting allocator.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use feishu_reply_gateway::quota::{Micros, QuotaKey, QuotaSpec, QuotaTable};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::allocated;

const MS: Micros = 1000;
/// Quota instants start here (as in the scheduler), so windows before "now" are representable.
const T0: Micros = 24 * 3600 * 1_000_000;

fn spec(n: u32, ms: u64) -> QuotaSpec {
    QuotaSpec::new(NonZeroU32::new(n).unwrap(), Duration::from_millis(ms))
}

/// chat 5/s, user 5/s, app 1000/s (so the app key does not refuse at 1 decision per ms), app 1000/min.
fn table() -> QuotaTable {
    QuotaTable::new(
        vec![
            spec(5, 1000),
            spec(5, 1000),
            spec(1000, 1000),
            spec(100_000, 60_000),
        ],
        Duration::from_millis(5),
        Duration::from_secs(20),
    )
}

/// Chat ids as the gateway sees them (Feishu's are `oc_` + 32 hex).
fn chat_id(i: usize) -> String {
    format!("oc_{i:032x}")
}

fn populated(n: usize) -> (QuotaTable, Vec<QuotaKey>) {
    let mut t = table();
    let keys: Vec<QuotaKey> = (0..n).map(|i| QuotaKey::new(0, chat_id(i))).collect();
    for (i, k) in keys.iter().enumerate() {
        let at = T0 + i as Micros / 1000;
        t.try_acquire(std::slice::from_ref(k), at).unwrap();
        t.settle(std::slice::from_ref(k), at, at + MS);
    }
    (t, keys)
}

fn memory_report() {
    for n in [1_000usize, 100_000, 1_000_000] {
        let base = allocated();
        let mut t = table();
        // Each key's id is built here and dropped after the decision (as when its job is
        // done), so whatever the table keeps of it is counted.
        for i in 0..n {
            let k = QuotaKey::new(0, chat_id(i));
            t.try_acquire(std::slice::from_ref(&k), T0).unwrap();
            t.settle(std::slice::from_ref(&k), T0, T0 + MS);
        }
        let live = allocated() - base;
        t.forget_idle(T0 + 2_000 * MS);
        let idle = allocated() - base;
        println!(
            "memory: {n:>9} live chat keys: {:.0} bytes/key in the table; after idle sweep: {idle} bytes ({} keys left)",
            live as f64 / n as f64,
            t.live_keys()
        );
        drop(t);
    }
}

fn decisions(c: &mut Criterion) {
    memory_report();
    for with_user in [false, true] {
        decisions_of_shape(c, with_user);
    }
}

/// chat + app/s + app/min (the usual job), or also a user key (p2p replies naming the user).
fn decisions_of_shape(c: &mut Criterion, with_user: bool) {
    let name = if with_user {
        "quota_decision_chat_user_app2"
    } else {
        "quota_decision_chat_app2"
    };
    let mut group = c.benchmark_group(name);
    for n in [1_000usize, 100_000, 1_000_000] {
        let (mut t, keys) = populated(n);
        let app_s = QuotaKey::new(2, "cli_app");
        let app_m = QuotaKey::new(3, "cli_app");
        // Jobs are built once, as the scheduler does at admission: a chat and a user spread
        // over the table (cold in cache at 1M keys), and the app's two keys.
        // Enough distinct jobs that, at 1M keys, the keys touched do not fit in the CPU caches.
        let jobs: Vec<Vec<QuotaKey>> = (0..n.min(262_144))
            .map(|j| {
                let i = (j * 7919) % n;
                let mut job = vec![keys[i].clone(), app_s.clone(), app_m.clone()];
                if with_user {
                    job.push(QuotaKey::new(1, keys[(i * 31) % n].id.clone()));
                }
                job
            })
            .collect();
        let mut j = 0usize;
        let mut now = T0 + 5_000 * MS;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                // One send per ms of quota time: its decision, then its answer (the arrival
                // bound) a moment later, as the scheduler does.
                j = (j + 1) % jobs.len();
                now += MS;
                let job = black_box(&jobs[j]);
                let decided = t.try_acquire(job, now);
                if decided.is_ok() {
                    t.settle(job, now, now + 1);
                }
                black_box(decided)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
