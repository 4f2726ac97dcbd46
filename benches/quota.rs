//! Cost of one quota decision with many live keys, and memory per live key.
//!
//! `cargo bench --bench quota` — criterion timings for 1k / 100k / 1M live chat keys, plus
//! printed memory figures (bytes per live key, bytes left after every key went idle) from a
//! counting allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use feishu_reply_gateway::quota::{Micros, QuotaKey, QuotaSpec, QuotaTable};

struct Counting;
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates to the system allocator; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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
        Duration::from_millis(20),
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
        t.try_acquire(std::slice::from_ref(k), T0 + i as Micros / 1000)
            .unwrap();
    }
    (t, keys)
}

fn memory_report() {
    for n in [1_000usize, 100_000, 1_000_000] {
        let ids: Vec<QuotaKey> = (0..n).map(|i| QuotaKey::new(0, chat_id(i))).collect();
        let base = ALLOCATED.load(Ordering::Relaxed);
        let mut t = table();
        for k in &ids {
            t.try_acquire(std::slice::from_ref(k), T0).unwrap();
        }
        let live = ALLOCATED.load(Ordering::Relaxed) - base;
        t.forget_idle(T0 + 2_000 * MS);
        let idle = ALLOCATED.load(Ordering::Relaxed) - base;
        // The ids themselves are shared with the caller (Arc<str>): the table's own cost is
        // its map entries and rings.
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
    let mut group = c.benchmark_group("quota_decision_4_keys");
    for n in [1_000usize, 100_000, 1_000_000] {
        let (mut t, keys) = populated(n);
        let app_s = QuotaKey::new(2, "cli_app");
        let app_m = QuotaKey::new(3, "cli_app");
        let mut i = 0usize;
        let mut now = T0 + 5_000 * MS;
        let mut job = vec![keys[0].clone(), QuotaKey::new(1, "ou_user"), app_s, app_m];
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                // A different chat each time (spread over the table), one decision per ms.
                i = (i + 7919) % n;
                now += MS;
                job[0] = keys[i].clone();
                job[1] = QuotaKey::new(1, keys[(i * 31) % n].id.clone());
                black_box(t.try_acquire(black_box(&job), now))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
