//! Cluster mode against a real redis-server: three replicas share every quota; Redis outages
//! follow the declared failure policy and recover.

mod common;

use std::time::{Duration, Instant};

use common::{
    RedisCluster, RedisServer, TestGateway, cluster_config, max_in_window, metric, shared_redis,
    spawn_fake, spawn_gateway_on, text, wait_for_metric,
};
use feishu_reply_gateway::fake_feishu::{FakeFeishu, FakeOptions, Fault};
use tonic::Code;
use tonic_types::StatusExt;

/// One gateway in cluster mode on a private redis-server (which a test may stop or kill) and
/// its own fake, warmed by one reply (Redis connected, token fetched). Redis calls time out
/// after 50 ms; `extra` adds `[cluster]` settings or more sections.
struct OneReplica {
    redis: RedisServer,
    fake: FakeFeishu,
    gw: TestGateway,
    prefix: String,
}

async fn one_replica(name: &str, extra: &str) -> OneReplica {
    one_replica_with(name, 50, extra).await
}

/// [`one_replica`] with another Redis timeout.
async fn one_replica_with(name: &str, redis_timeout_ms: u64, extra: &str) -> OneReplica {
    let redis = RedisServer::start();
    let fake = spawn_fake(FakeOptions::default()).await;
    let prefix = unique_prefix(name);
    let extra = format!("redis_timeout_ms = {redis_timeout_ms}\n{extra}");
    let gw = spawn_gateway_on(
        fake.clone(),
        cluster_config(&fake, &redis.url(), &prefix, &extra),
    )
    .await;
    gw.reply(text(&format!("om_{name}_warm"), "oc_warm", "x"))
        .await
        .unwrap();
    OneReplica {
        redis,
        fake,
        gw,
        prefix,
    }
}

/// The members (one per recorded send) of the test app's quota of `kind` in Redis (e.g.
/// `app:1000ms`).
async fn app_sends(redis_url: &str, prefix: &str, kind: &str) -> Vec<String> {
    let mut zrange = redis::cmd("ZRANGE");
    zrange
        .arg(format!("{{{prefix}}}:{kind}:{}", common::APP_ID))
        .arg(0)
        .arg(-1);
    // On a Redis Cluster the node owning the key's slot answers; the others say MOVED.
    for seed in redis_url.split(',') {
        let client = redis::Client::open(seed).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        match zrange.query_async(&mut conn).await {
            Ok(members) => return members,
            Err(e) if e.to_string().to_lowercase().contains("moved") => continue,
            Err(e) => panic!("ZRANGE on {seed}: {e}"),
        }
    }
    panic!("no node of {redis_url} owns the key")
}

/// Waits (bounded) until the replica reports its Redis failure policy in effect (`true`) or
/// not (`false`).
async fn fallback_is(gw: &TestGateway, on: bool) -> bool {
    let want = if on { 1.0 } else { 0.0 };
    wait_for_metric(
        gw,
        "feishu_reply_redis_fallback",
        want,
        Duration::from_secs(10),
    )
    .await
}

fn unique_prefix(name: &str) -> String {
    format!("test-{name}-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_every_quota_through_redis() {
    let (_redis, fake, replicas) = common::three_late_arriving_replicas("three").await;
    // 285 calls to distinct chats plus 15 to one hot chat, spread over the three replicas:
    // six windows of the app's 50/s. Every third call is a send instead of a reply: the hot
    // chat's sends share its 5/s with its replies, and the sends have app windows of their own.
    let mut calls = Vec::new();
    for i in 0..300usize {
        let mut client = replicas[i % 3].client.clone();
        let hot = i % 20 == 0;
        let chat = if hot {
            "oc_hot".to_owned()
        } else {
            format!("oc_d{i}")
        };
        let call = if i % 3 == 2 {
            let send = common::send_text("chat_id", &chat, &format!("s{i}"));
            tokio::spawn(async move { client.send(send).await.map(|_| ()) })
        } else {
            let req = if hot {
                text(&format!("om_hot{i}_in_hot"), &chat, "x")
            } else {
                text(&format!("om_d{i}"), &chat, "x")
            };
            tokio::spawn(async move { client.reply(req).await.map(|_| ()) })
        };
        calls.push((hot, call));
    }
    let hot_total = calls.iter().filter(|(hot, _)| *hot).count();
    for (_, c) in calls {
        c.await.unwrap().expect("delivered");
    }
    let stats = fake.stats();
    let (mut decides, mut settles, mut failed) = (0.0, 0.0, 0.0);
    for gw in &replicas {
        let m = gw.http_get("/metrics").await.1;
        let count = |op: &str, outcome: &str| {
            let series =
                format!("feishu_reply_redis_calls_total{{op=\"{op}\",outcome=\"{outcome}\"}}");
            metric(&m, &series).unwrap_or(0.0)
        };
        decides += count("decide", "ok");
        settles += count("settle", "ok");
        failed += count("decide", "error");
    }
    eprintln!(
        "3 replicas: {} replies; Redis calls per send: {:.2} decide + {:.2} settle (batched); failed decisions: {failed}",
        stats.posted,
        decides / stats.posted as f64,
        settles / stats.posted as f64
    );
    assert_eq!(stats.posted, 300);
    assert_eq!(stats.requests_by_operation["send"], 100, "{stats:?}");
    assert_eq!(stats.rate_rejections(), 0, "{stats:?}");
    let received = fake.received();
    // Each API within its own 50/s.
    for op in ["reply", "send"] {
        let times: Vec<f64> = received
            .iter()
            .filter(|r| r.operation == op)
            .map(|r| r.at_ms)
            .collect();
        assert!(max_in_window(&times, 1000.0) <= 50, "{op}");
    }
    let hot: Vec<f64> = received
        .iter()
        .filter(|r| r.chat_id == "oc_hot")
        .map(|r| r.at_ms)
        .collect();
    assert_eq!(hot.len(), hot_total);
    assert!(max_in_window(&hot, 1000.0) <= 5);
    // The three share the 256 target partitions, each one some.
    partitions_shared(&replicas.iter().collect::<Vec<_>>()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back_to_the_local_share_and_recovers() {
    // Short app windows (1 s and 3 s instead of 1 s and 1 min), so the outage floor lasts
    // 3 s, not a minute, and the local sends are still inside the 3 s window when Redis is
    // back (so their replay can be seen).
    let OneReplica {
        mut redis,
        fake,
        gw,
        prefix,
    } = one_replica(
        "outage",
        "[quotas]\napp = [{ limit = 50, window_ms = 1000 }, { limit = 1000, window_ms = 3000 }]",
    )
    .await;
    let m = gw.http_get("/metrics").await.1;
    assert_eq!(metric(&m, "feishu_reply_redis_up"), Some(1.0), "{m}");

    redis.kill();
    // Replies keep flowing (local share after one window), none hangs.
    for i in 0..4 {
        let r = gw
            .reply_with_timeout(
                text(&format!("om_b{i}"), &format!("oc_b{i}"), "x"),
                Duration::from_secs(5),
            )
            .await;
        assert!(r.is_ok(), "{r:?}");
    }
    let m = gw.http_get("/metrics").await.1;
    assert_eq!(metric(&m, "feishu_reply_redis_fallback"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "feishu_reply_redis_up"), Some(0.0), "{m}");
    let (code, body) = gw.http_get("/readyz").await;
    assert_eq!(code, 200);
    assert!(body.contains("degraded"), "{body}");

    redis.restart();
    assert!(fallback_is(&gw, false).await, "recovered");
    // The restarted Redis is empty; before switching back the replica wrote its local sends
    // into it, so other replicas see them in the shared windows.
    let app_3s = app_sends(&redis.url(), &prefix, "app:3000ms").await;
    let replayed = app_3s.iter().filter(|m| m.contains(":replay")).count();
    assert_eq!(replayed, 4, "the 4 local sends were replayed: {app_3s:?}");
    let decided = "feishu_reply_redis_calls_total{op=\"decide\",outcome=\"ok\"}";
    let before = metric(&gw.http_get("/metrics").await.1, decided);
    gw.reply(text("om_c1", "oc_c", "x")).await.unwrap();
    let after = metric(&gw.http_get("/metrics").await.1, decided);
    assert!(after > before, "decisions go through Redis again");
    assert_eq!(gw.http_get("/readyz").await.0, 200);
    assert_eq!(fake.stats().rate_rejections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_holds_replies_until_redis_returns() {
    let OneReplica {
        mut redis,
        fake,
        gw,
        ..
    } = one_replica("closed", "on_redis_failure = \"fail_closed\"").await;

    redis.kill();
    let s = gw
        .reply_with_timeout(text("om_held", "oc_h", "x"), Duration::from_millis(700))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::DeadlineExceeded, "{}", s.message());
    assert!(fallback_is(&gw, true).await);
    assert_eq!(gw.http_get("/readyz").await.0, 503);

    // A reply submitted during the outage is delivered once Redis is back.
    let pending = {
        let mut c = gw.client.clone();
        tokio::spawn(async move {
            let mut req = tonic::Request::new(text("om_later", "oc_l", "x"));
            req.set_timeout(Duration::from_secs(20));
            c.reply(req).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart();
    pending.await.unwrap().expect("delivered after recovery");
    assert!(
        fake.received().iter().all(|r| r.message_id != "om_held"),
        "held reply never sent"
    );
    assert_eq!(gw.http_get("/readyz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_lost_to_a_redis_stall_gives_its_slot_back() {
    let OneReplica {
        redis,
        fake,
        gw,
        prefix,
    } = one_replica("stall", "on_redis_failure = \"fail_closed\"").await;

    // Redis stalls: the next decision is written to its socket, the gateway gives up on the
    // answer after 50 ms, the reply is held (fail_closed) and fails at its deadline, never sent.
    redis.pause(true);
    let s = gw
        .reply_with_timeout(text("om_s2", "oc_stalled", "x"), Duration::from_millis(500))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::DeadlineExceeded, "{}", s.message());
    // Redis wakes up and runs the decision it was sent: it records a send that never left.
    // The gateway goes back to Redis (a failed decision alone, without a failed heartbeat,
    // must not leave it off Redis for good).
    redis.pause(false);
    assert!(fallback_is(&gw, false).await);

    let t = Instant::now();
    loop {
        let sends = app_sends(&redis.url(), &prefix, "app:60000ms").await;
        // Only the warm-up reply is left in the app's 1000/min window: the lost decision was released.
        if sends.len() == 1 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "the lost decision still holds a slot of the minute window: {sends:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(fake.received().iter().all(|r| r.message_id != "om_s2"));
    let m = gw.http_get("/metrics").await.1;
    let released = metric(
        &m,
        "feishu_reply_redis_calls_total{op=\"release\",outcome=\"ok\"}",
    );
    assert!(released >= Some(1.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_parked_by_the_local_fallback_go_out_as_soon_as_redis_is_back() {
    let OneReplica {
        redis, fake, gw, ..
    } = one_replica("park", "").await;

    // A stall fails this reply's decision: the replica falls back to its local share, which
    // first lets every key's window pass since the switch — a minute for the app's 1000/min.
    redis.pause(true);
    let parked = {
        let mut c = gw.client.clone();
        tokio::spawn(async move {
            let mut req = tonic::Request::new(text("om_p2", "oc_parked", "x"));
            req.set_timeout(Duration::from_secs(10));
            c.reply(req).await
        })
    };
    assert!(fallback_is(&gw, true).await);
    redis.pause(false);
    // Back on Redis, the parked reply asks Redis at once: delivered well within its 10 s
    // deadline, not a minute later.
    let r = parked.await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert!(fake.received().iter().any(|r| r.message_id == "om_p2"));
    assert_eq!(fake.stats().rate_rejections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_speaks_tls_to_redis_and_checks_its_certificate() {
    let redis = RedisServer::start_tls();
    let fake = spawn_fake(FakeOptions::default()).await;
    // A generous Redis timeout: a TLS handshake on a loaded machine (two connections at start,
    // quotas and jobs) can take longer than the default 100 ms, and this test is about
    // certificates, not timeouts.
    let ca = format!(
        "redis_ca_file = \"{}\"\nredis_timeout_ms = 1000",
        redis.ca_file().display()
    );
    let trusted = spawn_gateway_on(
        fake.clone(),
        cluster_config(&fake, &redis.url(), &unique_prefix("tls"), &ca),
    )
    .await;
    trusted.reply(text("om_t1", "oc_t1", "x")).await.unwrap();
    let m = trusted.http_get("/metrics").await.1;
    let decided = "feishu_reply_redis_calls_total{op=\"decide\",outcome=\"ok\"}";
    assert_eq!(metric(&m, decided), Some(1.0), "{m}");
    assert_eq!(metric(&m, "feishu_reply_redis_fallback"), Some(0.0), "{m}");

    // Without the private CA the server's certificate is refused: Redis is unusable from the
    // start, so fail_closed fails the reply at once (issue 18: holding it could only end at
    // its deadline), never sends it, and the replica is not ready.
    let untrusted = spawn_gateway_on(
        fake.clone(),
        cluster_config(
            &fake,
            &redis.url(),
            &unique_prefix("tls"),
            "on_redis_failure = \"fail_closed\"",
        ),
    )
    .await;
    let s = untrusted
        .reply_with_timeout(text("om_t2", "oc_t2", "x"), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
    assert!(fallback_is(&untrusted, true).await);
    assert!(fake.received().iter().all(|r| r.message_id != "om_t2"));
    assert_eq!(untrusted.http_get("/readyz").await.0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_mode_follows_the_slot_map() {
    let cluster = RedisCluster::start(3);
    let prefix = unique_prefix("rc");
    // Seed the gateway with a node that does NOT own the prefix's slot: a plain connection
    // to it is answered MOVED.
    let mut seed = None;
    for p in &cluster.ports {
        let client = redis::Client::open(format!("redis://127.0.0.1:{p}")).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let r: redis::RedisResult<i64> = redis::cmd("EXISTS")
            .arg(format!("{{{prefix}}}:probe"))
            .query_async(&mut c)
            .await;
        if r.is_err_and(|e| e.to_string().to_lowercase().contains("moved")) {
            seed = Some(format!("redis://127.0.0.1:{p}"));
            break;
        }
    }
    let seed = seed.expect("with 3 primaries, 2 do not own the slot");
    let fake = spawn_fake(FakeOptions::default()).await;
    let gw = spawn_gateway_on(
        fake.clone(),
        cluster_config(&fake, &seed, &prefix, "redis_mode = \"cluster\""),
    )
    .await;
    for i in 0..3 {
        gw.reply(text(&format!("om_rc{i}"), &format!("oc_rc{i}"), "x"))
            .await
            .unwrap();
    }
    let m = gw.http_get("/metrics").await.1;
    let decided = "feishu_reply_redis_calls_total{op=\"decide\",outcome=\"ok\"}";
    assert_eq!(metric(&m, decided), Some(3.0), "{m}");
    assert_eq!(metric(&m, "feishu_reply_redis_fallback"), Some(0.0), "{m}");
    assert_eq!(
        metric(&m, "feishu_reply_cluster_replicas"),
        Some(1.0),
        "{m}"
    );

    // The same seed spoken to as a standalone Redis: every call is answered MOVED, so Redis
    // is unusable from the start — which is why redis_mode must say "cluster": fail_closed
    // fails the reply at once (issue 18), and the replica is not ready.
    let standalone = spawn_gateway_on(
        fake.clone(),
        cluster_config(&fake, &seed, &prefix, "on_redis_failure = \"fail_closed\""),
    )
    .await;
    let s = standalone
        .reply_with_timeout(text("om_rc_s", "oc_rc_s", "x"), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
    assert!(fallback_is(&standalone, true).await);
    assert_eq!(standalone.http_get("/readyz").await.0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_rejection_seen_by_one_replica_makes_every_replica_back_off() {
    let (url, _redis) = shared_redis();
    let fake = spawn_fake(FakeOptions::default()).await;
    let prefix = unique_prefix("block");
    let a = spawn_gateway_on(fake.clone(), cluster_config(&fake, &url, &prefix, "")).await;
    let b = spawn_gateway_on(fake.clone(), cluster_config(&fake, &url, &prefix, "")).await;
    // Feishu refuses replica A's reply for the app's rate, asking for 2 s.
    fake.push_fault(Fault {
        message_id: Some("om_r1".into()),
        http: 429,
        code: 99991400,
        reset_s: Some(2),
        times: 1,
        ..Default::default()
    });
    let first = {
        let mut c = a.client.clone();
        tokio::spawn(async move { c.reply(text("om_r1", "oc_r1", "x")).await })
    };
    // Wait (bounded) until A has written the block into Redis.
    let t = Instant::now();
    loop {
        if app_sends(&url, &prefix, "app:1000ms")
            .await
            .iter()
            .any(|m| m == "block:1")
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "replica A never blocked the app key"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Replica B, which saw no rejection, does not send for that app before the 2 s are over.
    b.reply(text("om_r2", "oc_r2", "x")).await.unwrap();
    let r = first.await.unwrap().unwrap().into_inner();
    assert_eq!(r.attempts, 2);
    let received = fake.received();
    let at = |id: &str| {
        received
            .iter()
            .find(|r| r.message_id == id)
            .map(|r| r.at_ms)
            .unwrap()
    };
    let (refused, b_sent) = (at("om_r1"), at("om_r2"));
    assert!(
        b_sent >= refused + 2000.0 - 5.0,
        "replica B sent {:.0} ms after the rejection, inside Feishu's 2 s reset",
        b_sent - refused
    );
    assert_eq!(fake.stats().rate_rejections(), 0, "only the injected one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_fallback_each_replica_keeps_to_its_share_of_the_app_quota() {
    let mut redis = RedisServer::start();
    let fake = spawn_fake(FakeOptions::default()).await;
    let prefix = unique_prefix("share");
    // Only the per-second app quota (50/s), so the outage floor is one second.
    let extra = "redis_timeout_ms = 50\n[quotas]\napp = [{ limit = 50, window_ms = 1000 }]";
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let config = cluster_config(&fake, &redis.url(), &prefix, extra);
        replicas.push(spawn_gateway_on(fake.clone(), config).await);
    }
    for gw in &replicas {
        assert!(
            wait_for_metric(
                gw,
                "feishu_reply_cluster_replicas",
                3.0,
                Duration::from_secs(5)
            )
            .await,
            "every replica counts three"
        );
    }
    redis.kill();
    // 40 replies through one replica: on its own share (50 / 3 = 16 per second), not 50.
    let gw = &replicas[0];
    let calls: Vec<_> = (0..40)
        .map(|i| {
            gw.reply_with_timeout(
                text(&format!("om_sh{i}"), &format!("oc_sh{i}"), "x"),
                Duration::from_secs(10),
            )
        })
        .collect();
    for r in futures_util::future::join_all(calls).await {
        assert!(r.is_ok(), "{r:?}");
    }
    assert!(fallback_is(gw, true).await);
    let times: Vec<f64> = fake
        .received()
        .iter()
        .filter(|r| r.message_id.starts_with("om_sh"))
        .map(|r| r.at_ms)
        .collect();
    assert_eq!(times.len(), 40);
    let most = max_in_window(&times, 1000.0);
    assert!(
        most <= 16,
        "{most} sends in one second from one replica in fallback"
    );
}

/// A connection to `url` for a test's own Redis commands.
async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_pause_during_steady_traffic_fails_no_call() {
    // Redis stops answering for 400 ms (8 x the 50 ms Redis timeout): the replica switches to
    // its failure policy and back. A call with a 5 s deadline must not fail for it: not
    // refused at admission for a fallback floor that lifts on recovery, not parked for it.
    let OneReplica {
        redis, fake, gw, ..
    } = one_replica("pause", "").await;
    let mut conn = redis_conn(&redis.url()).await;
    let mut calls = Vec::new();
    for i in 0..60 {
        if i == 15 {
            let _: () = redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(400)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        let mut c = gw.client.clone();
        calls.push(tokio::spawn(async move {
            let mut req = tonic::Request::new(text(&format!("om_s{i}"), &format!("oc_s{i}"), "x"));
            req.set_timeout(Duration::from_secs(5));
            c.reply(req).await
        }));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for (i, c) in calls.into_iter().enumerate() {
        let r = c.await.unwrap();
        assert!(r.is_ok(), "call {i}: {r:?}");
    }
    assert!(fallback_is(&gw, false).await, "back on Redis");
    let m = gw.http_get("/metrics").await.1;
    let switches = metric(&m, "feishu_reply_redis_fallback_switches_total");
    assert!(
        switches >= Some(1.0),
        "the blip is visible after the fact: {m}"
    );
    assert_eq!(gw.http_get("/readyz").await.0, 200);
    assert_eq!(fake.stats().rate_rejections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_key_holds_only_its_own_jobs_and_clears_when_fixed() {
    // A Redis timeout no loaded machine reaches: any switch to the failure policy here would
    // be the poisoned key's doing.
    let OneReplica {
        redis,
        fake,
        gw,
        prefix,
    } = one_replica_with("poison", 2000, "").await;
    let mut conn = redis_conn(&redis.url()).await;
    let far_future = 4_000_000_000_000_000i64; // year 2096, in µs
    // The app's per-second key full of sends "from the future", a chat key too: no send can
    // have such a latest arrival, so they must not wedge the app or the chat.
    let app_key = format!("{{{prefix}}}:app:1000ms:{}", common::APP_ID);
    for i in 0..50 {
        let _: () = redis::cmd("ZADD")
            .arg(&app_key)
            .arg(far_future + i)
            .arg(format!("bogus{i}"))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("ZADD")
        .arg(format!("{{{prefix}}}:chat:oc_future"))
        .arg(far_future)
        .arg("bogus")
        .query_async(&mut conn)
        .await
        .unwrap();
    // A chat key of the wrong type: Redis answers WRONGTYPE for every decision that uses it.
    let wrong = format!("{{{prefix}}}:chat:oc_wrong");
    let _: () = redis::cmd("SET")
        .arg(&wrong)
        .arg("not a sorted set")
        .query_async(&mut conn)
        .await
        .unwrap();
    let stuck = {
        let mut c = gw.client.clone();
        tokio::spawn(async move {
            let mut req = tonic::Request::new(text("om_w1", "oc_wrong", "x"));
            req.set_timeout(Duration::from_secs(20));
            c.reply(req).await
        })
    };
    // Everything else goes through at once, on Redis.
    for i in 0..5 {
        gw.reply_with_timeout(
            text(&format!("om_f{i}"), "oc_future", "x"),
            Duration::from_secs(3),
        )
        .await
        .expect("the far-future entries are ignored");
        gw.reply_with_timeout(
            text(&format!("om_o{i}"), &format!("oc_o{i}"), "x"),
            Duration::from_secs(3),
        )
        .await
        .expect("other chats are not affected");
    }
    let m = gw.http_get("/metrics").await.1;
    let switches = metric(&m, "feishu_reply_redis_fallback_switches_total");
    assert_eq!(switches, Some(0.0), "never off Redis: {m}");
    let refused = "feishu_reply_redis_calls_total{op=\"decide\",outcome=\"error\"}";
    assert!(metric(&m, refused) >= Some(1.0), "{m}");
    assert!(
        fake.received().iter().all(|r| r.message_id != "om_w1"),
        "no decision, no send"
    );
    // The operator fixes the key: the held reply goes out.
    let _: () = redis::cmd("DEL")
        .arg(&wrong)
        .query_async(&mut conn)
        .await
        .unwrap();
    let r = stuck.await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(fake.stats().rate_rejections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_redis_refused_to_settle_is_settled_once_redis_takes_it() {
    // A reply is in flight (held by the fake) when Redis starts refusing scripts (an ACL here;
    // a stopped Redis would still run the queued call when it wakes); its answer comes back
    // while Redis refuses the settle. Once Redis takes scripts again, the send's latest arrival
    // must become its answer instant, not stay at its provisional decision + send timeout
    // (20 s), or it would hold one of the app's 50 slots per second for 20 s.
    let OneReplica {
        redis,
        fake,
        gw,
        prefix,
    } = one_replica("settle", "").await;
    fake.push_fault(Fault {
        message_id: Some("om_held".into()),
        http: 200,
        hold: true,
        times: 1,
        ..Default::default()
    });
    let held = {
        let mut c = gw.client.clone();
        tokio::spawn(async move { c.reply(text("om_held", "oc_held", "x")).await })
    };
    let t = Instant::now();
    while !fake.received().iter().any(|r| r.message_id == "om_held") {
        assert!(t.elapsed() < Duration::from_secs(10), "om_held never sent");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut conn = redis_conn(&redis.url()).await;
    let acl = |rule: &'static str| {
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg(rule)
            .clone()
    };
    let key = format!("{{{prefix}}}:app:1000ms:{}", common::APP_ID);
    let (members, provisional) = members_and_max(&mut conn, &key).await;
    assert_eq!(members, 2, "the warm-up and om_held are recorded");
    let _: () = acl("-@scripting").query_async(&mut conn).await.unwrap();
    fake.release_held();
    held.await.unwrap().expect("delivered");
    // The settle has been tried (and refused) meanwhile.
    let failed = "feishu_reply_redis_calls_total{op=\"settle\",outcome=\"error\"}";
    let t = Instant::now();
    while metric(&gw.http_get("/metrics").await.1, failed).unwrap_or(0.0) < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(10), "no settle was tried");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _: () = acl("+@all").query_async(&mut conn).await.unwrap();
    // The answer came within moments of the decision, so once settled the score sits about a
    // send timeout (here 4 s: twice the tests' request timeout) below the provisional one;
    // unsettled it stays there, however long we wait.
    let t = Instant::now();
    loop {
        // Both sends (warm-up, om_held) still there: the key expires a window after the
        // provisional instant, and an empty key proves nothing.
        let (members, latest) = members_and_max(&mut conn, &key).await;
        if members == 2 && latest < provisional - 2_000_000 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the answer was never settled: latest arrival {latest}, provisional {provisional}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many sends a quota key holds and the highest score (latest possible arrival, µs).
async fn members_and_max(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> (usize, i64) {
    let all: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(conn)
        .await
        .unwrap();
    let max = all.iter().map(|(_, s)| *s as i64).max().unwrap_or(0);
    (all.len(), max)
}

/// A redis-server that wants `password`.
fn redis_with_password(password: &str) -> RedisServer {
    let redis = RedisServer::start();
    let set = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "CONFIG",
            "SET",
            "requirepass",
            password,
        ])
        .output()
        .expect("redis-cli on PATH (it comes with redis-server)");
    assert!(set.status.success(), "{set:?}");
    redis
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_the_password_makes_the_replica_not_ready_and_replies_do_not_wait() {
    // Issue 18: with a wrong or missing Redis password /readyz said 200, SubmitReply failed
    // JOB_STORE, and a Reply waited to its deadline with 0 attempts.
    let redis = redis_with_password("right-pw");
    for (url, policy) in [
        (
            format!("redis://:wrong-pw@127.0.0.1:{}", redis.port),
            "local",
        ),
        (format!("redis://127.0.0.1:{}", redis.port), "local"),
        (
            format!("redis://:wrong-pw@127.0.0.1:{}", redis.port),
            "fail_closed",
        ),
    ] {
        let fake = spawn_fake(FakeOptions::default()).await;
        let gw = spawn_gateway_on(
            fake.clone(),
            cluster_config(
                &fake,
                &url,
                &unique_prefix("auth"),
                &format!("redis_timeout_ms = 250\non_redis_failure = \"{policy}\"\n"),
            ),
        )
        .await;
        let t = Instant::now();
        let r = gw
            .reply_with_timeout(text("om_auth", "oc_auth", "x"), Duration::from_secs(8))
            .await;
        let took = t.elapsed();
        // A clear UNAVAILABLE at once, never a wait to the deadline: under either policy (local
        // sends could add to other replicas' in Feishu's windows, and a refused password does
        // not go away by waiting).
        let s = r.unwrap_err();
        assert_eq!(s.code(), Code::Unavailable, "{url} {policy}: {s:?}");
        assert_eq!(
            s.get_details_error_info().map(|i| i.reason).as_deref(),
            Some("QUOTA_STORE_UNAVAILABLE")
        );
        assert!(fake.received().is_empty(), "never sent");
        assert!(
            took < Duration::from_secs(4),
            "{url} {policy}: waited {took:?}"
        );
        let (code, body) = gw.http_get("/readyz").await;
        assert_eq!(code, 503, "{url} {policy}: {body}");
        assert!(body.contains("redis"), "{body}");
        common::eventually("gRPC health NOT_SERVING", async || {
            gw.health().await == "NOT_SERVING"
        })
        .await;
        if url.contains("wrong-pw") && policy == "local" {
            // Redis takes that password now: ready again, once it answers.
            let set = std::process::Command::new("redis-cli")
                .args([
                    "-p",
                    &redis.port.to_string(),
                    "-a",
                    "right-pw",
                    "--no-auth-warning",
                ])
                .args(["CONFIG", "SET", "requirepass", "wrong-pw"])
                .output()
                .unwrap();
            assert!(set.status.success(), "{set:?}");
            common::eventually("ready again", async || {
                gw.http_get("/readyz").await.0 == 200 && gw.health().await == "SERVING"
            })
            .await;
            let set = std::process::Command::new("redis-cli")
                .args([
                    "-p",
                    &redis.port.to_string(),
                    "-a",
                    "wrong-pw",
                    "--no-auth-warning",
                ])
                .args(["CONFIG", "SET", "requirepass", "right-pw"])
                .output()
                .unwrap();
            assert!(set.status.success(), "{set:?}");
        }
    }
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_two_replicas_share_the_apps_card_windows_through_redis() {
    use feishu_reply_gateway::fake_feishu::FakeQuota;
    use feishu_reply_gateway::proto::stream_reply_event::Event;
    use feishu_reply_gateway::proto::stream_reply_request::Part;
    use feishu_reply_gateway::proto::{StreamFinish, StreamReplyRequest, StreamStart};
    // The app's card_content windows at 10/s on both sides, so six streams (three per
    // replica) fed 20 appends a second bind them: the replicas share them through Redis
    // (typing leaves 1/s of headroom for the final texts, which go first).
    let (url, _redis) = shared_redis();
    let fake = spawn_fake(FakeOptions {
        app_quotas: vec![FakeQuota {
            limit: 10,
            window: Duration::from_secs(1),
        }],
        ..FakeOptions::default()
    })
    .await;
    let prefix = unique_prefix("streams");
    let mut replicas = Vec::new();
    for _ in 0..2 {
        // With peers: each card's calls go to the replica owning its partition, the reply to
        // the chat's, whichever replica runs the stream.
        let extra = format!(
            "peer_listen = \"127.0.0.1:{}\"\n[quotas]\napp = [{{ limit = 10, window_ms = 1000 }}]",
            common::free_port()
        );
        let config = cluster_config(&fake, &url, &prefix, &extra);
        replicas.push(spawn_gateway_on(fake.clone(), config).await);
    }
    partitions_shared(&replicas.iter().collect::<Vec<_>>()).await;
    let part = |p| StreamReplyRequest { part: Some(p) };
    let mut streams = Vec::new();
    for i in 0..6 {
        let mut client = replicas[i % 2].client.clone();
        let mut parts = vec![part(Part::Start(StreamStart {
            message_id: format!("om_st{i}"),
            chat_id: format!("oc_st{i}"),
            ..Default::default()
        }))];
        let mut want = String::new();
        for w in 0..60 {
            want.push_str(&format!("w{w} "));
            parts.push(part(Part::Append(format!("w{w} "))));
        }
        parts.push(part(Part::Finish(StreamFinish::default())));
        // 20 appends a second, as a model types.
        let paced = futures_util::StreamExt::then(futures_util::stream::iter(parts), |p| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            p
        });
        streams.push(tokio::spawn(async move {
            let mut events = client.stream_reply(paced).await.unwrap().into_inner();
            let mut last = None;
            while let Some(e) = events.message().await.expect("no error") {
                last = e.event;
            }
            let Some(Event::Finished(f)) = last else {
                panic!("finished last: {last:?}")
            };
            (f, want)
        }));
    }
    let mut updates = Vec::new();
    for s in streams {
        let (finished, want) = s.await.unwrap();
        let card = fake.card(&finished.card_ids[0]).expect("the card");
        assert_eq!(card.texts["answer"], want, "the exact final text");
        assert!(!card.streaming);
        updates.push(f64::from(finished.updates_sent));
    }
    assert_eq!(fake.stats().rate_rejections(), 0, "{:?}", fake.stats());
    let typed: Vec<f64> = fake
        .received()
        .iter()
        .filter(|r| r.operation == "card_content")
        .map(|r| r.at_ms)
        .collect();
    assert!(
        typed.len() as f64 >= updates.iter().sum::<f64>(),
        "{typed:?}"
    );
    assert!(max_in_window(&typed, 1000.0) <= 10);
    let mut forwarded = 0.0;
    for gw in &replicas {
        let m = gw.http_get("/metrics").await.1;
        forwarded += metric(
            &m,
            "feishu_reply_peer_jobs_total{direction=\"out\",outcome=\"ok\"}",
        )
        .unwrap_or(0.0);
    }
    assert!(forwarded > 0.0, "the streams' calls went to their owners");
    // Fair shares are proven in virtual time (tests/streaming.rs); here a few seconds of
    // real time give each stream too few updates to compare.
    eprintln!("updates per stream: {updates:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_decision_writes_back_the_answers_waiting() {
    use feishu_reply_gateway::cluster::{Decision, RedisQuota};
    let (url, _redis) = shared_redis();
    let redis = common::redis_client(&url, &unique_prefix("carry"), Duration::from_secs(10));
    // No settler runs: only a decision can write the answer back.
    let store = std::sync::Arc::new(RedisQuota::new(
        redis,
        std::sync::Arc::new(feishu_reply_gateway::metrics::Metrics::new()),
    ));
    let span = Duration::from_millis(1005);
    let key = store.shared_key("chat", "oc_carry", 1, span.as_micros() as u64);
    let hold = Duration::from_secs(10);
    let Decision::Granted { member } = store
        .try_acquire(std::slice::from_ref(&key), hold)
        .await
        .unwrap()
    else {
        panic!("an empty key grants");
    };
    // Answered 300 ms ago.
    let answered = tokio::time::Instant::now() - Duration::from_millis(300);
    store.settle_later(vec![key.clone()], member, answered);
    // The key is full either way; the wait tells whether the answer was applied first: a span
    // from the answer, not a whole span from now (the send still counted as in flight).
    match store.try_acquire(&[key], hold).await.unwrap() {
        Decision::Wait { wait, .. } => assert!(
            wait <= span - Duration::from_millis(250),
            "waits {wait:?}: the answer was not carried"
        ),
        d => panic!("the key is full: {d:?}"),
    }
}

/// Waits until `replicas` share the 256 partitions, each some.
async fn partitions_shared(replicas: &[&TestGateway]) {
    common::eventually("the replicas share every partition", async || {
        let mut owned = Vec::new();
        for gw in replicas {
            let m = gw.http_get("/metrics").await.1;
            owned.push(metric(&m, "feishu_reply_partitions_owned").unwrap_or(0.0));
        }
        owned.iter().sum::<f64>() == 256.0 && owned.iter().all(|n| *n > 0.0)
    })
    .await;
}

/// The sum of every series of `name` in a scrape.
fn sum_series(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chats_calls_through_any_replica_are_sent_in_order_by_its_partitions_owner() {
    let (url, _redis) = shared_redis();
    let fake = spawn_fake(FakeOptions::default()).await;
    let prefix = unique_prefix("peers");
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let port = common::free_port();
        let config = cluster_config(
            &fake,
            &url,
            &prefix,
            // Owner windows off: the layout with every quota key on one slot stays covered
            // with peers (forwarding keeps a chat's order either way).
            &format!(
                "job_lease_ms = 2000\nowner_windows = false\npeer_listen = \"127.0.0.1:{port}\"\n"
            ),
        );
        replicas.push(spawn_gateway_on(fake.clone(), config).await);
    }
    // Every replica sees the three and the partitions are shared out.
    partitions_shared(&replicas.iter().collect::<Vec<_>>()).await;
    // Two chats, 12 replies each, one after the other, through the three replicas in turn.
    let mut sent = Vec::new();
    for i in 0..24usize {
        let chat = if i % 2 == 0 { "oc_peer_a" } else { "oc_peer_b" };
        let id = format!("om_peer{i}");
        let mut client = replicas[i % 3].client.clone();
        client
            .reply(text(&id, chat, &format!("n{i}")))
            .await
            .expect("delivered");
        sent.push(id);
    }
    // Feishu got them in the order they were made.
    assert_eq!(common::received_ids(&fake), sent);
    // Each chat's were sent by one replica (its owner), the others forwarded theirs there.
    let mut upstream = Vec::new();
    let (mut out, mut inbound) = (0.0, 0.0);
    for gw in &replicas {
        let m = gw.http_get("/metrics").await.1;
        upstream.push(sum_series(
            &m,
            "feishu_reply_upstream_latency_seconds_count",
        ));
        out += metric(
            &m,
            "feishu_reply_peer_jobs_total{direction=\"out\",outcome=\"ok\"}",
        )
        .unwrap_or(0.0);
        inbound += metric(
            &m,
            "feishu_reply_peer_jobs_total{direction=\"in\",outcome=\"ok\"}",
        )
        .unwrap_or(0.0);
        assert_eq!(
            metric(
                &m,
                "feishu_reply_peer_jobs_total{direction=\"out\",outcome=\"unreachable\"}"
            ),
            Some(0.0)
        );
    }
    assert_eq!(upstream.iter().sum::<f64>(), 24.0, "{upstream:?}");
    assert!(
        upstream.iter().all(|n| [0.0, 12.0, 24.0].contains(n)),
        "each chat's replies all went out from one replica: {upstream:?}"
    );
    assert_eq!(out, inbound);
    assert!(
        out >= 8.0,
        "at least the calls made to non-owners were forwarded: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_owner_cannot_be_reached_waits_for_it_and_goes_out_once_it_leaves() {
    use feishu_reply_gateway::proto::peer::QueueRequest;
    use feishu_reply_gateway::proto::peer::peer_service_client::PeerServiceClient;
    let (url, _redis) = shared_redis();
    let fake = spawn_fake(FakeOptions::default()).await;
    let prefix = unique_prefix("unreachable");
    let a_port = common::free_port();
    let a = spawn_gateway_on(
        fake.clone(),
        cluster_config(
            &fake,
            &url,
            &prefix,
            &format!("job_lease_ms = 2000\npeer_listen = \"127.0.0.1:{a_port}\"\n"),
        ),
    )
    .await;
    // B tells the others a port nobody listens on.
    let mut b = spawn_gateway_on(
        fake.clone(),
        cluster_config(
            &fake,
            &url,
            &prefix,
            &format!(
                "job_lease_ms = 2000\npeer_listen = \"127.0.0.1:{}\"\npeer_advertise = \"127.0.0.1:{}\"\n",
                common::free_port(),
                common::free_port()
            ),
        ),
    )
    .await;
    partitions_shared(&[&a, &b]).await;
    // Through A, to 40 chats: about half are B's. B keeps their windows and cannot be
    // reached, so A does not send them: they wait at A.
    let sends: Vec<_> = (0..40)
        .map(|i| {
            let mut client = a.client.clone();
            tokio::spawn(async move {
                client
                    .reply(text(&format!("om_u{i}"), &format!("oc_u{i}"), "x"))
                    .await
            })
        })
        .collect();
    let unreachable = |m: &str| {
        metric(
            m,
            "feishu_reply_peer_jobs_total{direction=\"out\",outcome=\"unreachable\"}",
        )
        .unwrap_or(0.0)
    };
    common::eventually("A sends its own chats and fails to reach B", async || {
        unreachable(&a.http_get("/metrics").await.1) >= 1.0 && fake.stats().posted >= 1
    })
    .await;
    // However long they wait, B's chats are not sent by A while B holds them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let posted = fake.stats().posted;
    assert!(posted < 40, "A sent chats B keeps ({posted})");
    // B leaves: A takes its partitions, and the replies waiting go out, each once.
    let stopped = b.begin_shutdown();
    for s in sends {
        s.await.unwrap().expect("delivered");
    }
    let stats = fake.stats();
    assert_eq!(stats.posted, 40);
    assert_eq!(stats.rejected_chat_user + stats.rejected_app, 0);
    stopped.await.unwrap();

    // A peer call without the cluster's secret is refused, and counted.
    let mut peer = PeerServiceClient::connect(format!("http://127.0.0.1:{a_port}"))
        .await
        .unwrap();
    let refused = peer
        .queue(QueueRequest {
            job: b"{}".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let m = a.http_get("/metrics").await.1;
    assert_eq!(
        metric(
            &m,
            "feishu_reply_peer_jobs_total{direction=\"in\",outcome=\"refused\"}"
        ),
        Some(1.0)
    );
}
