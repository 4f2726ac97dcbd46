//! The app's minute quota crossed in real time by three replicas sharing Redis: 1030 replies
//! to distinct chats, spread over the replicas, against the fake Feishu's strict sliding
//! windows (50/s and 1000/min per app) with late and cold-connection arrivals. The first 1000
//! go within seconds; the last 30 wait for the first minute's sends to leave the minute
//! window. `scripts/test` runs this only in its Redis Cluster pass (3 masters); on one node
//! the same crossing is proven in virtual time (`tests/pacing.rs`).

mod common;

use std::time::{Duration, Instant};

use common::{max_in_window, text};

/// The first minute's sends must have left the window before the 1001st: a minute.
const PHYSICAL_LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_replies_past_the_minute_quota_wait_for_the_window_on_three_replicas() {
    let (_redis, fake, replicas) = common::three_late_arriving_replicas("minute").await;
    let start = Instant::now();
    let calls: Vec<_> = (0..1030usize)
        .map(|i| {
            let mut client = replicas[i % 3].client.clone();
            let req = text(&format!("om_m{i}"), &format!("oc_m{i}"), "x");
            tokio::spawn(async move { client.reply(req).await.map(|_| ()) })
        })
        .collect();
    for c in calls {
        c.await.unwrap().expect("delivered");
    }
    let drain = start.elapsed();
    let stats = fake.stats();
    assert_eq!(stats.posted, 1030, "{stats:?}");
    assert_eq!(stats.rate_rejections(), 0, "{stats:?}");
    let times: Vec<f64> = fake.received().iter().map(|r| r.at_ms).collect();
    assert!(max_in_window(&times, 60_000.0) <= 1000);
    assert!(max_in_window(&times, 1000.0) <= 50);
    let ratio = drain.as_secs_f64() / PHYSICAL_LIMIT.as_secs_f64();
    eprintln!("1030 replies on 3 replicas: drained in {drain:?} ({ratio:.3} x the minute)");
    assert!(ratio <= 1.10, "drained in {ratio:.3} x the physical limit");
}
