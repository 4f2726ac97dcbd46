//! Partition ownership (`cluster::partitions`) on a real Redis (and on the 3-master Redis
//! Cluster in `scripts/test`'s second pass): every partition has one owner, a dead owner's
//! partitions move within its lease, a leaving one's at once, a stalled one learns it lost
//! them, and no partition ever has two owners on the way.

mod common;

use std::sync::Arc;
use std::time::Duration;

use feishu_reply_gateway::cluster::partitions::{PARTITIONS, Partitions, Route};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const LEASE: Duration = Duration::from_millis(1000);
/// A chat's window plus margin.
const SPAN: Duration = Duration::from_millis(1050);
/// How long a send may stay in flight.
const HOLD: Duration = Duration::from_secs(3);

struct Replica {
    parts: Arc<Partitions>,
    /// Where it says its peers reach it.
    addr: String,
    task: Option<JoinHandle<()>>,
}

impl Replica {
    fn start(url: &str, prefix: &str) -> Self {
        let redis = common::redis_client(url, prefix, LEASE);
        let metrics = Arc::new(feishu_reply_gateway::metrics::Metrics::new());
        let addr = format!("peer-{}.test:7070", uuid::Uuid::new_v4().simple());
        let parts =
            Arc::new(Partitions::new(redis, LEASE, SPAN, HOLD, metrics).with_addr(addr.clone()));
        let task = Some(tokio::spawn(parts.clone().run()));
        Self { parts, addr, task }
    }

    /// Stops renewing, as a killed (or stalled) process would.
    fn freeze(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    fn resume(&mut self) {
        self.task = Some(tokio::spawn(self.parts.clone().run()));
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.freeze();
    }
}

/// Each replica's partitions now; panics when one partition has two owners.
fn owned(rs: &[&Replica]) -> Vec<Vec<u16>> {
    let now = Instant::now();
    let sets: Vec<Vec<u16>> = rs.iter().map(|r| r.parts.owned(now)).collect();
    let mut seen = vec![0u8; usize::from(PARTITIONS)];
    for set in &sets {
        for p in set {
            seen[usize::from(*p)] += 1;
            assert!(seen[usize::from(*p)] <= 1, "partition {p} has two owners");
        }
    }
    sets
}

fn all_owned(sets: &[Vec<u16>]) -> bool {
    sets.iter().map(Vec::len).sum::<usize>() == usize::from(PARTITIONS)
}

/// Polls (every 10 ms, checking for two owners each time) until `done`, at most `within`.
async fn until(rs: &[&Replica], within: Duration, done: impl Fn(&[Vec<u16>]) -> bool) -> Duration {
    let t = Instant::now();
    loop {
        let sets = owned(rs);
        if done(&sets) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "not settled within {within:?}: {:?}",
            sets.iter().map(Vec::len).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn prefix(test: &str) -> String {
    format!("parts-{test}-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_every_partition_once_and_a_newcomer_takes_only_its_share() {
    let (url, _redis) = common::shared_redis();
    let prefix = prefix("share");
    let a = Replica::start(&url, &prefix);
    let b = Replica::start(&url, &prefix);
    until(&[&a, &b], Duration::from_secs(5), |s| {
        all_owned(s) && s.iter().all(|x| x.len() > 80)
    })
    .await;
    let before: Vec<Vec<u16>> = owned(&[&a, &b]);

    let c = Replica::start(&url, &prefix);
    // Settled: every replica sees the three, and each partition is its preferred owner's (a
    // newcomer claims every 50 ms, so it may hold its share from one replica before the
    // other has seen it).
    let rs = [&a, &b, &c];
    let took = until(&rs, Duration::from_secs(5), |s| {
        all_owned(s)
            && rs.iter().all(|r| r.parts.members().len() == 3)
            && rs.iter().zip(s).all(|(r, set)| {
                let me = r.parts.me();
                (0..PARTITIONS)
                    .filter(|&p| a.parts.preferred(p).as_deref() == Some(me.as_str()))
                    .all(|p| set.contains(&p))
            })
    })
    .await;
    let after = owned(&[&a, &b, &c]);
    for (i, set) in after.iter().take(2).enumerate() {
        assert!(
            set.iter().all(|p| before[i].contains(p)),
            "only the newcomer gains partitions"
        );
    }
    let sizes: Vec<usize> = after.iter().map(Vec::len).collect();
    assert!(sizes.iter().all(|n| (50..=120).contains(n)), "{sizes:?}");
    // Every replica prefers the same owner for every partition, and knows where it is.
    let ids = [a.parts.me(), b.parts.me(), c.parts.me()];
    for p in 0..PARTITIONS {
        let want = a.parts.preferred(p);
        assert_eq!(b.parts.preferred(p), want);
        assert_eq!(c.parts.preferred(p), want);
        let (id, addr) = c.parts.preferred_at(p).unwrap();
        let owner = [&a, &b, &c][ids.iter().position(|i| *i == id).unwrap()];
        assert!(owner.parts.owns(p, Instant::now()).is_some());
        assert_eq!(addr, owner.addr);
    }
    // Joining takes a beat to be seen, a beat to release, a beat to claim.
    assert!(took < LEASE * 2, "the newcomer waited {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_partitions_move_within_its_lease() {
    let (url, _redis) = common::shared_redis();
    let prefix = prefix("dead");
    let a = Replica::start(&url, &prefix);
    let b = Replica::start(&url, &prefix);
    let mut c = Replica::start(&url, &prefix);
    until(&[&a, &b, &c], Duration::from_secs(5), |s| {
        all_owned(s) && s.iter().all(|x| !x.is_empty())
    })
    .await;
    let cs = c.parts.owned(Instant::now());
    c.freeze();
    let died = Instant::now();
    let took = until(&[&a, &b], LEASE * 3, all_owned).await;
    assert!(took <= LEASE + Duration::from_millis(500), "took {took:?}");
    for p in cs {
        let o = a
            .parts
            .owns(p, Instant::now())
            .or_else(|| b.parts.owns(p, Instant::now()))
            .expect("taken over");
        assert!(o.epoch >= 2, "a takeover bumps the epoch");
        // Whatever the dead owner sent before it died has left the windows first ...
        assert!(
            o.sendable_at >= died + SPAN,
            "partition {p} sendable too early"
        );
        // ... and its targets resume within the lease plus a window.
        assert!(
            o.sendable_at <= died + LEASE + SPAN + Duration::from_millis(500),
            "partition {p} resumes {:?} after the death",
            o.sendable_at - died
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_replica_hands_its_partitions_over_at_once() {
    let (url, _redis) = common::shared_redis();
    let prefix = prefix("leave");
    let a = Replica::start(&url, &prefix);
    let mut b = Replica::start(&url, &prefix);
    until(&[&a, &b], Duration::from_secs(5), |s| {
        all_owned(s) && s.iter().all(|x| !x.is_empty())
    })
    .await;
    let bs = b.parts.owned(Instant::now());
    b.freeze();
    // Nothing is sent to its partitions from here on; the last send was answered now.
    let stopped = Instant::now();
    b.parts.sent(bs[0], 0, "oc_last".into(), stopped);
    b.parts.leave().await.unwrap();
    let left = Instant::now();
    assert!(b.parts.owned(left).is_empty());
    let took = until(&[&a, &b], LEASE * 3, |s| {
        s[0].len() == usize::from(PARTITIONS)
    })
    .await;
    // The next beat (a quarter lease) sees it gone, the one right after claims: well within
    // the lease a death would take.
    assert!(took < LEASE, "took {took:?}");
    // It handed its partitions over cleanly (nothing in flight) with the sends that may
    // still count: the new owner counts them, never earlier than they were, and sends now.
    let now = Instant::now();
    let mut handed = Vec::new();
    a.parts.route_taking(bs[0], now, &mut handed);
    assert_eq!(handed.len(), 1, "{handed:?}");
    assert_eq!((handed[0].quota, &*handed[0].target), (0, "oc_last"));
    assert!(handed[0].at >= stopped && handed[0].at <= now);
    for p in bs {
        let o = a.parts.owns(p, now).unwrap();
        assert!(o.sendable_at <= now, "partition {p} waits for its handover");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_replica_stops_counting_its_partitions_and_learns_it_lost_them() {
    let (url, _redis) = common::shared_redis();
    let prefix = prefix("stall");
    let a = Replica::start(&url, &prefix);
    let mut b = Replica::start(&url, &prefix);
    until(&[&a, &b], Duration::from_secs(5), |s| {
        all_owned(s) && s.iter().all(|x| !x.is_empty())
    })
    .await;
    let id = b.parts.me();
    b.freeze();
    let stalled = Instant::now();
    // It stops counting them before its lease ends in Redis, so before anyone may claim them.
    assert!(b.parts.owned(stalled + LEASE - LEASE / 10).is_empty());
    until(&[&a, &b], LEASE * 3, |s| {
        s[0].len() == usize::from(PARTITIONS)
    })
    .await;
    assert!(stalled.elapsed() >= LEASE - Duration::from_millis(100));

    // Woken up: its first renewal is refused, it drops everything and joins as a new member.
    let beat = b.parts.beat().await.unwrap();
    assert!(beat.lost);
    assert_ne!(b.parts.me(), id);
    b.resume();
    until(&[&a, &b], Duration::from_secs(5), |s| {
        all_owned(s) && s[1].len() > 80
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_is_handed_over_only_once_its_sends_in_flight_are_answered() {
    let (url, _redis) = common::shared_redis();
    let prefix = prefix("handover");
    let a = Replica::start(&url, &prefix);
    until(&[&a], Duration::from_secs(5), |s| {
        s[0].len() == usize::from(PARTITIONS)
    })
    .await;
    // Two sends in flight, on partitions a newcomer will take (found once it is seen).
    let b = Replica::start(&url, &prefix);
    let moving: Vec<u16> = loop {
        let m: Vec<u16> = (0..PARTITIONS)
            .filter(|&p| a.parts.preferred(p).as_deref() == Some(b.parts.me().as_str()))
            .collect();
        if !m.is_empty() {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (busy, idle) = (moving[0], moving.get(1).copied());
    // Still a's until it sees the newcomer: begin the send before its next beat.
    let sending = a.parts.begin_send(busy, Instant::now());
    if sending.is_none() {
        // a saw b first and stopped deciding for it: nothing in flight to test here.
        return;
    }
    // The idle ones move; the busy one does not: a decides nothing for it any more, and it
    // stays a's in Redis, so b cannot claim it.
    if let Some(idle) = idle {
        until(&[&a, &b], LEASE * 3, |_| {
            b.parts.owns(idle, Instant::now()).is_some()
        })
        .await;
    }
    tokio::time::sleep(LEASE / 2).await;
    assert!(a.parts.begin_send(busy, Instant::now()).is_none());
    assert_eq!(a.parts.route(busy, Instant::now()), Route::Elsewhere);
    assert!(
        b.parts.owns(busy, Instant::now()).is_none(),
        "claimed with a send in flight"
    );
    // Answered (the gate logs the answer before the send stops counting in flight):
    // released at a's next beat (it rechecks often while handing over) with the send, which
    // b counts from its answer on, and sends at once.
    let answered = Instant::now();
    a.parts.sent(busy, 0, "oc_busy".into(), answered);
    drop(sending);
    until(&[&a, &b], LEASE * 3, |_| {
        b.parts.owns(busy, Instant::now()).is_some()
    })
    .await;
    let now = Instant::now();
    assert!(b.parts.owns(busy, now).unwrap().sendable_at <= now);
    let mut handed = Vec::new();
    b.parts.route_taking(busy, now, &mut handed);
    let known: Vec<_> = handed.iter().filter(|s| &*s.target == "oc_busy").collect();
    assert_eq!(known.len(), 1, "{handed:?}");
    assert!(known[0].at >= answered, "counted from before its answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_replica_waits_for_its_sends_in_flight() {
    let (url, _redis) = common::shared_redis();
    let prefix = prefix("leave-busy");
    let a = Replica::start(&url, &prefix);
    let mut b = Replica::start(&url, &prefix);
    until(&[&a, &b], Duration::from_secs(5), |s| {
        all_owned(s) && s.iter().all(|x| !x.is_empty())
    })
    .await;
    let p = b.parts.owned(Instant::now())[0];
    let sending = b.parts.begin_send(p, Instant::now()).expect("b owns it");
    b.freeze();
    let parts = b.parts.clone();
    let leaving = tokio::spawn(async move { parts.leave().await });
    // It stops deciding at once, and routes its partitions to a ...
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(b.parts.begin_send(p, Instant::now()).is_none());
    assert_eq!(b.parts.route(p, Instant::now()), Route::Elsewhere);
    // ... but keeps its lease while the send is in flight.
    tokio::time::sleep(LEASE / 2).await;
    assert!(!leaving.is_finished());
    assert!(a.parts.owns(p, Instant::now()).is_none());
    let answered = Instant::now();
    b.parts.sent(p, 0, "oc_busy".into(), answered);
    drop(sending);
    leaving.await.unwrap().unwrap();
    until(&[&a, &b], LEASE * 3, |_| {
        a.parts.owns(p, Instant::now()).is_some()
    })
    .await;
    // Handed over with the answered send: a counts it and sends at once.
    let now = Instant::now();
    assert!(a.parts.owns(p, now).unwrap().sendable_at <= now);
    let mut handed = Vec::new();
    a.parts.route_taking(p, now, &mut handed);
    assert!(
        handed
            .iter()
            .any(|s| &*s.target == "oc_busy" && s.at >= answered),
        "{handed:?}"
    );
}
