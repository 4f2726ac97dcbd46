//! Async jobs in cluster mode (issue 10): jobs live in the shared Redis; a replica killed with
//! SIGKILL loses none of them (another takes them over when its lease ends, reusing their
//! uuids); a rolling restart under submit load loses and doubles nothing; the same uuid on two
//! replicas is one job; any replica answers GetReply, WatchReply and CancelReply for any job.
//! Real `serve` processes (or in-process gateways), a real redis-server, the fake Feishu over
//! HTTP.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{
    ServeProcess, assert_in_order, connect, eventually, free_port, get_job, posts, shared_redis,
    spawn_fake, spawn_gateway_on, text,
};
use feishu_reply_gateway::fake_feishu::{FakeFeishu, FakeOptions};
use feishu_reply_gateway::proto::reply_gateway_client::ReplyGatewayClient;
use feishu_reply_gateway::proto::{GetReplyRequest, JobState, ReplyRequest};
use tonic::transport::Channel;

/// Lease of the replicas in these tests.
const LEASE: Duration = Duration::from_secs(2);

fn unique(name: &str) -> String {
    format!("{name}-{}-{:x}", std::process::id(), rand::random::<u32>())
}

/// A config file for replicas sharing `redis_url` under `prefix`.
fn cluster_file(fake: &FakeFeishu, redis_url: &str, prefix: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(unique("gw-cjobs"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "[feishu]\nbase_url = \"{}\"\n[apps.default]\napp_id = \"cli_c\"\napp_secret = \"s\"\n\
             [server]\nshutdown_grace_ms = 100\n[auth]\nallow_anonymous = true\n\
             {}redis_timeout_ms = 250\njob_lease_ms = {}\n",
            fake.base_url(),
            common::cluster_section(redis_url, prefix),
            LEASE.as_millis()
        ),
    )
    .unwrap();
    (file, dir)
}

/// An in-process replica's config on `url` under `prefix`, with `extra` in `[cluster]`.
fn in_process(
    fake: &FakeFeishu,
    url: &str,
    prefix: &str,
    extra: &str,
) -> feishu_reply_gateway::config::Config {
    common::config_for(
        fake,
        &format!(
            "{}redis_timeout_ms = 250\n{extra}",
            common::cluster_section(url, prefix)
        ),
    )
}

/// A replica that forwards each job to the owner of its chat's partition (its peer listener on
/// a free loopback port).
fn serve_with_peers(file: &std::path::Path, port: u16) -> ServeProcess {
    let listen = format!("127.0.0.1:{}", free_port());
    ServeProcess::start_with(file, port, &[("GATEWAY_PEER_LISTEN", listen.as_str())])
}

/// Partitions a test gives a job store by hand.
struct Given {
    me: String,
    owned: std::sync::Mutex<Vec<(u16, u64)>>,
}

impl feishu_reply_gateway::jobs::Ownership for Given {
    fn me(&self) -> String {
        self.me.clone()
    }

    fn owned(&self) -> Vec<(u16, u64)> {
        self.owned.lock().unwrap().clone()
    }
}

/// A job store on `url` under `prefix`, as member `me` of its own.
fn job_store(url: &str, prefix: &str, me: &str) -> feishu_reply_gateway::jobs::RedisJobStore {
    let redis = common::redis_client(url, prefix, Duration::from_secs(60));
    let jobs = redis.config().jobs;
    let given = Given {
        me: me.into(),
        owned: Default::default(),
    };
    feishu_reply_gateway::jobs::RedisJobStore::new(redis, jobs, std::sync::Arc::new(given))
}

/// A queued job of `caller` replying `message_id` in `chat` with uuid `uuid` (10 min ttl), as
/// a replica stores it.
fn job_record(
    caller: &str,
    chat: &str,
    message_id: &str,
    uuid: &str,
) -> feishu_reply_gateway::jobs::JobRecord {
    use feishu_reply_gateway::jobs::{JobRecord, State, StoredReply, now_ms};
    let now = now_ms();
    JobRecord {
        seq: 0,
        caller: caller.into(),
        credential: String::new(),
        reply: StoredReply {
            app: "default".into(),
            message_id: message_id.into(),
            msg_type: "text".into(),
            content: r#"{"text":"job"}"#.into(),
            reply_in_thread: false,
            uuid: uuid.into(),
            feishu_uuid: None,
            chat_id: chat.into(),
            user_id: None,
            send_to: None,
            traceparent: None,
        },
        state: State::Queued,
        attempts: 0,
        created_ms: now,
        updated_ms: now,
        expires_ms: now + 600_000,
        result: None,
        error: None,
        key: format!("{:032x}", rand::random::<u128>()),
    }
}

/// Waits until every job is DELIVERED (read through `c`), failing on a final other state.
async fn all_delivered(c: &mut ReplyGatewayClient<Channel>, ids: &[String], within: Duration) {
    let t = Instant::now();
    for id in ids {
        loop {
            let job = get_job(c, id).await;
            if job.state() == JobState::Delivered {
                break;
            }
            assert!(
                !matches!(job.state(), JobState::Failed | JobState::Cancelled),
                "{job:?}"
            );
            assert!(t.elapsed() < within, "{id} not delivered: {job:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn a_killed_replica_s_jobs_are_delivered_once_by_the_others() {
    let (url, _redis) = shared_redis();
    let fake = spawn_fake(FakeOptions::default()).await;
    let (file, dir) = cluster_file(&fake, &url, &unique("kill"));
    let ports = [free_port(), free_port(), free_port()];
    let a = ServeProcess::start(&file, ports[0]);
    let _b = ServeProcess::start(&file, ports[1]);
    let _c = ServeProcess::start(&file, ports[2]);
    let mut to_a = connect(ports[0]).await;
    let mut to_b = connect(ports[1]).await;
    let mut to_c = connect(ports[2]).await;
    // 45 jobs to 3 chats through A: 3 s of backlog at 5/s per chat.
    let n = common::backlog_jobs();
    let ids = common::submit_backlog(&mut to_a, "ck", n).await;
    // Watch the last job from C: it sees it through to DELIVERED although A dies.
    let mut watch = common::watch_job(&mut to_c, &ids[n - 1]).await;
    eventually("some jobs posted", async || fake.received().len() >= 6).await;
    drop(a); // SIGKILL
    let killed = Instant::now();
    let posted_before = posts(&fake).0.len();
    assert!(posted_before < n, "killed after the backlog drained");
    // Whatever A had in flight has landed 100 ms after the kill; the next post is another
    // replica's: the backlog resumes within the lease and a second.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let landed = fake.received().len();
    eventually("the backlog resumes", async || {
        fake.received().len() > landed
    })
    .await;
    let resumed = killed.elapsed();
    assert!(
        resumed <= LEASE + Duration::from_secs(1),
        "resumed {resumed:?} after the kill"
    );
    // The rest: after the lease, at 5/s per chat, and a few seconds.
    let backlog = Duration::from_millis(200 * (n as u64 / 3));
    all_delivered(&mut to_b, &ids, LEASE + backlog + Duration::from_secs(10)).await;
    let took = killed.elapsed();
    let (by_uuid, per_chat) = posts(&fake);
    assert_eq!(by_uuid.len(), n, "every job posted");
    assert!(by_uuid.values().all(|&k| k == 1), "{by_uuid:?}");
    assert_in_order(&per_chat, 3);
    let seen = common::watched_states(&mut watch).await;
    assert_eq!(seen.last(), Some(&JobState::Delivered), "{seen:?}");
    eprintln!(
        "posted before the kill: {posted_before}; resumed {resumed:?} and the rest delivered {took:?} after it (lease {LEASE:?}); rate rejections: {}",
        fake.stats().rate_rejections()
    );
    assert_eq!(fake.stats().rate_rejections(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_rolling_restart_under_submit_load_loses_and_doubles_nothing() {
    let (url, _redis) = shared_redis();
    let fake = spawn_fake(FakeOptions::default()).await;
    let (file, dir) = cluster_file(&fake, &url, &unique("roll"));
    let ports = [free_port(), free_port(), free_port()];
    let mut replicas: Vec<ServeProcess> =
        ports.iter().map(|&p| serve_with_peers(&file, p)).collect();
    for &p in &ports {
        connect(p).await;
    }
    // A steady submitter: 4 chats, ~50 jobs/s (they drain at 20/s: each replica stops with a
    // backlog), round-robin over the 3 replicas (so each chat's jobs go through all of them); a
    // submit that fails (its replica is stopping) goes to the next one with the same uuid.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let submitter = tokio::spawn(async move {
        let mut clients: Vec<Option<ReplyGatewayClient<Channel>>> = vec![None, None, None];
        let mut ids = Vec::new();
        let mut next = 0usize;
        for i in 0usize.. {
            if *stop_rx.borrow_and_update() {
                break;
            }
            let mut req: ReplyRequest = text(
                &format!("om_r{i:05}_in_r{}", i % 4),
                &format!("oc_r{}", i % 4),
                &format!("r {i}"),
            );
            req.uuid = format!("roll-{i}");
            let t = Instant::now();
            let job_id = loop {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "no replica took job {i}"
                );
                next = (next + 1) % 3;
                let client = match &mut clients[next] {
                    Some(c) => c,
                    slot => match Channel::from_shared(format!("http://127.0.0.1:{}", ports[next]))
                        .unwrap()
                        .connect_timeout(Duration::from_millis(200))
                        .connect()
                        .await
                    {
                        Ok(ch) => slot.insert(ReplyGatewayClient::new(ch)),
                        Err(_) => continue,
                    },
                };
                match client.submit_reply(req.clone()).await {
                    Ok(r) => break r.into_inner().job_id,
                    Err(_) => {
                        clients[next] = None;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            };
            ids.push(job_id);
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        ids
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (i, &port) in ports.iter().enumerate() {
        replicas[i].terminate().await;
        replicas[i] = serve_with_peers(&file, port);
        connect(port).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop_tx.send(true).unwrap();
    let ids = submitter.await.unwrap();
    let mut c = connect(ports[0]).await;
    all_delivered(&mut c, &ids, Duration::from_secs(60)).await;
    let (by_uuid, per_chat) = posts(&fake);
    assert_eq!(by_uuid.len(), ids.len(), "every job posted");
    assert!(by_uuid.values().all(|&k| k == 1), "{by_uuid:?}");
    assert_in_order(&per_chat, 4);
    eprintln!(
        "{} jobs submitted across a rolling restart; rate rejections: {}",
        ids.len(),
        fake.stats().rate_rejections()
    );
    drop(replicas);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn any_replica_dedupes_watches_and_cancels_any_job() {
    let (url, _redis) = shared_redis();
    let fake = spawn_fake(FakeOptions::default()).await;
    let prefix = unique("any");
    let config = || in_process(&fake, &url, &prefix, "");
    let a = spawn_gateway_on(fake.clone(), config()).await;
    let b = spawn_gateway_on(fake.clone(), config()).await;
    let (mut to_a, mut to_b) = (a.client.clone(), b.client.clone());

    // The same uuid through A then B: one job, one post; B watches it to the end.
    let mut req = text("om_same", "oc_same", "once");
    req.uuid = "same-uuid-1".into();
    let first = to_a.submit_reply(req.clone()).await.unwrap().into_inner();
    let again = to_b.submit_reply(req).await.unwrap().into_inner();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(again.job_id, first.job_id);
    let seen = common::watched_states(&mut common::watch_job(&mut to_b, &first.job_id).await).await;
    assert_eq!(seen.last(), Some(&JobState::Delivered), "{seen:?}");

    // Ten jobs for one chat through A (2 s at 5/s); B cancels the last while it is queued and
    // cannot cancel the first, which is sent.
    let mut ids = Vec::new();
    for i in 0..10 {
        let r = to_a
            .submit_reply(text(
                &format!("om_h{i:02}_in_hot"),
                "oc_hot",
                &format!("h {i}"),
            ))
            .await
            .unwrap()
            .into_inner();
        ids.push(r.job_id);
    }
    let cancelled = to_b
        .cancel_reply(GetReplyRequest {
            job_id: ids[9].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    eventually("the first job sent", async || {
        get_job(&mut to_b, &ids[0]).await.state() == JobState::Delivered
    })
    .await;
    let refused = to_b
        .cancel_reply(GetReplyRequest {
            job_id: ids[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    all_delivered(&mut to_b, &ids[..9], Duration::from_secs(20)).await;
    assert_eq!(
        get_job(&mut to_a, &ids[9]).await.state(),
        JobState::Cancelled
    );

    // One chat's jobs submitted through A and B in turn (2 s of backlog): one replica runs
    // them all, so they are posted in the order the store took them.
    let mut turns = Vec::new();
    for i in 0..10 {
        let to = if i % 2 == 0 { &mut to_a } else { &mut to_b };
        let r = to
            .submit_reply(text(
                &format!("om_t{i:02}_in_turns"),
                "oc_turns",
                &format!("t {i}"),
            ))
            .await
            .unwrap()
            .into_inner();
        turns.push(r.job_id);
    }
    all_delivered(&mut to_a, &turns, Duration::from_secs(20)).await;

    let (by_uuid, per_chat) = posts(&fake);
    assert_eq!(
        common::posts_to(&fake, "om_same"),
        1,
        "same-uuid-1 posted once"
    );
    assert_eq!(by_uuid.len(), 1 + 9 + 10, "the cancelled job is never sent");
    assert_in_order(&per_chat, 3);
}

#[tokio::test]
async fn a_paused_replica_comes_back_without_double_posts_or_stale_writes() {
    // A replica frozen past its lease (a long GC-like stall, a stopped container) while the
    // others take its jobs over: when it wakes, the sends it had scheduled reach Feishu with
    // the same uuids (deduped), its state writes are refused, and it drops those jobs.
    let (url, _redis) = shared_redis();
    let fake = spawn_fake(FakeOptions::default()).await;
    let (file, dir) = cluster_file(&fake, &url, &unique("pause"));
    let ports = [free_port(), free_port()];
    let a = serve_with_peers(&file, ports[0]);
    let _b = serve_with_peers(&file, ports[1]);
    let mut to_a = connect(ports[0]).await;
    let mut to_b = connect(ports[1]).await;
    let ids = common::submit_backlog(&mut to_a, "p", 30).await;
    eventually("some jobs posted", async || fake.received().len() >= 6).await;
    a.signal("STOP");
    all_delivered(&mut to_b, &ids, LEASE + Duration::from_secs(15)).await;
    let woke_ms = feishu_reply_gateway::jobs::now_ms();
    a.signal("CONT");
    // A serves again (a new chat's job through A is delivered)…
    let late = to_a
        .submit_reply(text("om_late_in_late", "oc_late", "late"))
        .await
        .unwrap()
        .into_inner();
    all_delivered(
        &mut to_a,
        std::slice::from_ref(&late.job_id),
        Duration::from_secs(15),
    )
    .await;
    // …and wrote nothing over what B recorded.
    for id in &ids {
        let job = get_job(&mut to_a, id).await;
        assert_eq!(job.state(), JobState::Delivered, "{job:?}");
        assert!(job.updated_ms <= woke_ms, "written after A woke: {job:?}");
    }
    eprintln!(
        "requests deduped by uuid (A's sends after it woke, or B's repeats of sends A made): {}",
        fake.received().iter().filter(|r| r.deduped).count()
    );
    let (by_uuid, per_chat) = posts(&fake);
    assert_eq!(by_uuid.len(), ids.len() + 1, "every job posted");
    assert!(by_uuid.values().all(|&k| k == 1), "{by_uuid:?}");
    assert_in_order(&per_chat, 4);
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_redis_store_keeps_jobs_by_partition_fences_bounds_and_expires_them() {
    use feishu_reply_gateway::cluster::partitions::partition_of;
    use feishu_reply_gateway::jobs::redis::Submitted;
    use feishu_reply_gateway::jobs::{JobRecord, Limits, State, split_seq};
    let (url, _redis) = shared_redis();
    let prefix = unique("fence");
    let (a, b) = (job_store(&url, &prefix, "a"), job_store(&url, &prefix, "b"));
    let rec = |chat: &str, caller: &str| job_record(caller, chat, "om_f", "fence-1");
    let job = rec("oc_f", "anonymous");
    let p = partition_of("oc_f");
    // Stored in its chat's partition before any member took it: nobody is told.
    let Submitted::New { seq, owner } = b.submit(&job, "k-fence-1", 1 << 20).await.unwrap() else {
        panic!("a new job")
    };
    assert_eq!((split_seq(seq), owner.as_str()), (Some((p, 1)), ""));
    // A takes the partition and finds it; a job stored through B now is announced to A.
    assert!(a.fence(p, 1).await.unwrap());
    let Submitted::New { owner, .. } = b.submit(&job, "k-fence-2", 1 << 20).await.unwrap() else {
        panic!("a new job")
    };
    assert_eq!(owner, "a", "the partition's runner");
    assert!(
        a.news().await.unwrap().is_empty(),
        "told with B's next flush"
    );
    b.flush().await;
    assert!(
        a.news().await.unwrap().contains(&p),
        "told through its inbox"
    );
    assert!(a.news().await.unwrap().is_empty(), "told once");
    let found = a.poll(p, 0, 10).await.unwrap().unwrap().jobs;
    assert_eq!(
        found.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [seq, seq + 1]
    );
    // B claims the partition (a later epoch): A's fence, writes and reads are refused.
    assert!(b.fence(p, 2).await.unwrap());
    assert!(!a.fence(p, 1).await.unwrap(), "an earlier claim is stale");
    let mut sending = JobRecord { seq, ..job.clone() };
    sending.state = State::Sending;
    assert!(!a.update(&sending).await.unwrap(), "fenced");
    let taken = b.poll(p, 0, 10).await.unwrap().unwrap().jobs;
    assert_eq!(taken.len(), 2, "the partition's jobs move with it");
    let mut delivered = sending.clone();
    delivered.state = State::Delivered;
    assert!(b.update(&delivered).await.unwrap());
    assert!(!b.update(&delivered).await.unwrap(), "final once");
    let (got, runner) = a.get(seq).await.unwrap().unwrap();
    assert_eq!((got.state, runner), (State::Delivered, None));
    assert_eq!(
        a.get(seq + 1).await.unwrap().unwrap().1.as_deref(),
        Some("b")
    );
    // A cancel asked through A goes to the partition's runner, B.
    assert!(a.ask_cancel(seq + 1).await.unwrap());
    assert!(b.news().await.unwrap().contains(&p));
    assert_eq!(
        b.poll(p, seq + 1, 10).await.unwrap().unwrap().cancels,
        [seq + 1]
    );
    assert!(
        !a.ask_cancel(seq).await.unwrap(),
        "a final job has no runner"
    );
    // The idempotency key finds the job from any replica (it lives on the chat's partition).
    let Submitted::Duplicate(known) = a.submit(&job, "k-fence-1", 1 << 20).await.unwrap() else {
        panic!("a duplicate")
    };
    assert_eq!((known.seq, known.state), (seq, State::Delivered));
    // Expiry removes the final jobs of the partitions a replica runs, with their keys.
    let (gone, stored) = b.expire(Duration::ZERO, 100).await.unwrap();
    assert_eq!((gone, stored), (1, 1));
    assert!(b.get(seq).await.unwrap().is_none());
    let Submitted::New { seq: again, .. } = b.submit(&job, "k-fence-1", 1 << 20).await.unwrap()
    else {
        panic!("its key expired with it: a new job")
    };
    assert_eq!(again, seq + 2);

    // Each partition holds its share of `max_jobs`: here 2 (512 over 256 partitions). Full of
    // open jobs it refuses; a finished one makes room.
    let room = rec("oc_room", "anonymous");
    let q = partition_of("oc_room");
    assert!(b.fence(q, 1).await.unwrap());
    let share = 2 * 256;
    let Submitted::New { seq: r1, .. } = b.submit(&room, "k-room-1", share).await.unwrap() else {
        panic!("a new job")
    };
    assert!(matches!(
        b.submit(&room, "k-room-2", share).await.unwrap(),
        Submitted::New { .. }
    ));
    assert!(matches!(
        b.submit(&room, "k-room-3", share).await.unwrap(),
        Submitted::Full(2)
    ));
    let mut done = b.get(r1).await.unwrap().unwrap().0;
    done.state = State::Delivered;
    assert!(b.update(&done).await.unwrap());
    assert!(matches!(
        b.submit(&room, "k-room-3", share).await.unwrap(),
        Submitted::New { .. }
    ));
    assert!(
        b.get(r1).await.unwrap().is_none(),
        "the finished job made room"
    );

    // Shares (issue 18): a caller at its bound of open jobs is refused, another is not; a
    // repeat of a job it has passes; a job ending gives its place back.
    let shares = Limits {
        max_jobs: 1 << 20,
        per_caller: 2,
    };
    let mine = rec("oc_f", "mine");
    let Submitted::New { seq: s1, .. } = b.submit_within(&mine, "k-share-1", shares).await.unwrap()
    else {
        panic!("a new job")
    };
    assert!(matches!(
        a.submit_within(&rec("oc_other", "mine"), "k-share-2", shares)
            .await
            .unwrap(),
        Submitted::New { .. }
    ));
    assert!(matches!(
        a.submit_within(&mine, "k-share-3", shares).await.unwrap(),
        Submitted::CallerFull(2)
    ));
    assert!(matches!(
        a.submit_within(&mine, "k-share-1", shares).await.unwrap(),
        Submitted::Duplicate(_)
    ));
    assert!(matches!(
        a.submit_within(&rec("oc_f", "other"), "k-share-4", shares)
            .await
            .unwrap(),
        Submitted::New { .. }
    ));
    let mut done = b.get(s1).await.unwrap().unwrap().0;
    done.state = State::Failed;
    assert!(b.update(&done).await.unwrap());
    assert!(
        matches!(
            a.submit_within(&mine, "k-share-3", shares).await.unwrap(),
            Submitted::CallerFull(2)
        ),
        "given back with B's next call on the caller's slot"
    );
    b.flush().await;
    assert!(matches!(
        a.submit_within(&mine, "k-share-3", shares).await.unwrap(),
        Submitted::New { .. }
    ));

    // A job of the single-slot layout (earlier versions) keeps its id: it moves into its
    // partition once, where the partition's runner finds it.
    let legacy = format!("{{{prefix}:jobs}}");
    let mut old = rec("oc_legacy", "anonymous");
    old.seq = 7;
    let _: i64 = query(
        &url,
        redis::cmd("HSET")
            .arg(format!("{legacy}:job:7"))
            .arg("rec")
            .arg(old.encode())
            .arg("idem")
            .arg("k-legacy")
            .arg("caller")
            .arg("anonymous")
            .arg("chat")
            .arg("oc_legacy"),
    )
    .await;
    let _: i64 = query(
        &url,
        redis::cmd("ZADD")
            .arg(format!("{legacy}:open"))
            .arg(7)
            .arg(7),
    )
    .await;
    assert_eq!(
        a.get(7).await.unwrap().unwrap().0.reply.chat_id,
        "oc_legacy"
    );
    assert_eq!(a.adopt_legacy().await.unwrap(), 1);
    assert_eq!(b.adopt_legacy().await.unwrap(), 0, "moved once");
    let (moved, _) = b.get(7).await.unwrap().unwrap();
    let l = partition_of("oc_legacy");
    assert_eq!(split_seq(moved.seq), Some((l, 1)));
    assert!(a.fence(l, 1).await.unwrap());
    let found = a.poll(l, 0, 10).await.unwrap().unwrap().jobs;
    assert_eq!(found.iter().map(|r| r.seq).collect::<Vec<_>>(), [moved.seq]);
}

#[tokio::test]
async fn a_submit_no_redis_replica_confirmed_is_unavailable_and_safe_to_repeat() {
    // `jobs_wait_replicas = 1` on a Redis with no replica: WAIT sees none, so the submit is
    // not confirmed (UNAVAILABLE, JOB_STORE); the same submit again finds the same job.
    let (url, _redis) = common::standalone_redis();
    let fake = spawn_fake(FakeOptions::default()).await;
    let prefix = unique("wait");
    let config = in_process(&fake, &url, &prefix, "jobs_wait_replicas = 1\n");
    let gw = spawn_gateway_on(fake.clone(), config).await;
    let mut c = gw.client.clone();
    let mut req = text("om_w_in_w", "oc_w", "w");
    req.uuid = "wait-1".into();
    for _ in 0..2 {
        let e = c.submit_reply(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        let reason = tonic_types::StatusExt::get_details_error_info(&e).map(|i| i.reason);
        assert_eq!(reason.as_deref(), Some("JOB_STORE"), "{e:?}");
        assert!(e.message().contains("replicas confirmed"), "{e:?}");
    }
    // The write did reach the primary: the job runs, once.
    eventually("the unconfirmed job is posted", async || {
        common::posts_to(&fake, "om_w_in_w") == 1
    })
    .await;
}

#[tokio::test]
async fn a_job_of_a_caller_this_replica_has_not_learned_of_yet_waits_for_the_reload_naming_it() {
    // Replicas learn a new configuration apart (a ConfigMap reaches pods a minute apart): a
    // job a caller new on one replica stored must not fail CALLER_REMOVED on another that
    // takes it before it has reloaded.
    use feishu_reply_gateway::config::{credential_fingerprint, token_hash};
    use feishu_reply_gateway::jobs::redis::Submitted;
    use feishu_reply_gateway::jobs::{State, job_id};
    let (url, _redis) = shared_redis();
    let fake = spawn_fake(FakeOptions::default()).await;
    let prefix = unique("newcaller");
    let (u, w) = ("u-token-0123456789", "w-token-0123456789");
    let caller = |name: &str, token: &str| {
        format!(
            "[callers.{name}]\ntoken_sha256 = \"{}\"\napps = [\"*\"]\n",
            common::token_sha256(token)
        )
    };
    let (file, _dir) = cluster_file(&fake, &url, &prefix);
    let base = std::fs::read_to_string(&file)
        .unwrap()
        .replace("[auth]\nallow_anonymous = true\n", "");
    std::fs::write(&file, format!("{base}{}", caller("u", u))).unwrap();
    let (port, mport) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{mport}");
    let b = ServeProcess::start_with(&file, port, &[("GATEWAY_METRICS_ADDR", addr.as_str())]);
    let c = connect(port).await;
    let get = |id: &str, token: &str| {
        let mut req = tonic::Request::new(GetReplyRequest { job_id: id.into() });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let mut c = c.clone();
        async move { c.get_reply(req).await }
    };
    // B answers calls: it runs (its configuration loaded) before w's job is stored.
    let e = get("j1", u).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

    // Caller w, configured on another replica only, stored a job there (B runs every
    // partition).
    let other = job_store(&url, &prefix, "other");
    let mut rec = job_record("w", "oc_w", "om_w", "w-1");
    rec.credential = credential_fingerprint(b'T', &token_hash(w.as_bytes())).to_string();
    let key = rec.idempotency_key();
    let Submitted::New { seq, .. } = other.submit(&rec, &key, 100).await.unwrap() else {
        panic!("a new job")
    };
    other.flush().await;

    // B runs it and keeps it waiting: B's configuration does not name w yet.
    let awaiting = "feishu_reply_jobs_awaiting_caller";
    eventually("B holds w's job for a reload", async || {
        common::metric(&common::metrics_text(mport).await, awaiting) == Some(1.0)
    })
    .await;
    assert_eq!(
        other.get(seq).await.unwrap().unwrap().0.state,
        State::Queued
    );
    assert!(fake.received().is_empty());

    // B learns of w: the job runs, and w reads it delivered.
    std::fs::write(&file, format!("{base}{}{}", caller("u", u), caller("w", w))).unwrap();
    b.signal("HUP");
    let id = job_id(seq, &rec.key);
    eventually("w's job delivered", async || {
        get(&id, w)
            .await
            .is_ok_and(|j| j.into_inner().state() == JobState::Delivered)
    })
    .await;
    assert_eq!(common::posts_to(&fake, "om_w"), 1);
    let left = common::metric(&common::metrics_text(mport).await, awaiting);
    assert_eq!(left, Some(0.0));
}

#[tokio::test]
async fn a_job_whose_runner_was_never_told_is_found_by_its_sweep() {
    // A replica stores a job of a partition another replica runs and dies before telling it
    // (its notice is never written): the runner reads all its partitions again every 10 s and
    // runs the job then. Nothing accepted is lost to a lost notice.
    use feishu_reply_gateway::jobs::job_id;
    use feishu_reply_gateway::jobs::redis::Submitted;
    let (url, _redis) = shared_redis();
    let fake = spawn_fake(FakeOptions::default()).await;
    let prefix = unique("sweep");
    let config = in_process(&fake, &url, &prefix, "");
    let a = spawn_gateway_on(fake.clone(), config).await;
    let mut to_a = a.client.clone();
    // A runs the chat's partition: a first job through A is delivered.
    let first = to_a
        .submit_reply(text("om_s0_in_s", "oc_sweep", "s0"))
        .await
        .unwrap()
        .into_inner();
    all_delivered(&mut to_a, &[first.job_id], Duration::from_secs(10)).await;
    let other = job_store(&url, &prefix, "other");
    let rec = job_record("anonymous", "oc_sweep", "om_s1_in_s", "sweep-1");
    let Submitted::New { seq, owner } = other
        .submit(&rec, &rec.idempotency_key(), 1 << 20)
        .await
        .unwrap()
    else {
        panic!("a new job")
    };
    assert!(!owner.is_empty(), "A runs the partition");
    // `other` never flushes: A is not told.
    let id = job_id(seq, &rec.key);
    all_delivered(&mut to_a, &[id], Duration::from_secs(15)).await;
    assert_eq!(common::posts_to(&fake, "om_s1_in_s"), 1);
}

/// `msg` with caller `token`'s credential.
fn as_caller<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[tokio::test]
async fn two_callers_replies_and_sends_to_one_chat_through_three_replicas_keep_each_callers_order()
{
    let (url, _redis) = shared_redis();
    let fake = spawn_fake(FakeOptions::default()).await;
    let (file, dir) = cluster_file(&fake, &url, &unique("two"));
    let (alpha, beta) = ("alpha-4d1c9e7a2b5f8e03", "beta-8a3f6c1d9e2b7a54");
    let mut text_of = std::fs::read_to_string(&file)
        .unwrap()
        .replace("[auth]\nallow_anonymous = true\n", "");
    for (name, token) in [("alpha", alpha), ("beta", beta)] {
        text_of.push_str(&format!(
            "[callers.{name}]\ntoken_sha256 = \"{}\"\napps = [\"default\"]\nrate = 100\n",
            common::token_sha256(token)
        ));
    }
    std::fs::write(&file, text_of).unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let _replicas: Vec<_> = ports.iter().map(|&p| serve_with_peers(&file, p)).collect();
    let mut to_a = connect(ports[0]).await;
    let mut to_b = connect(ports[1]).await;
    // Alpha through replica A, beta through replica B, interleaved: each alternates replies
    // and sends to one chat. 40 calls at its 5/s: 8 s.
    let n = 20;
    for i in 0..n {
        for (tag, token, c) in [("a", alpha, &mut to_a), ("b", beta, &mut to_b)] {
            let words = format!("{tag}{i:02}");
            let r = if i % 2 == 0 {
                let reply = text(&format!("om_{words}_in_two"), "oc_two", &words);
                c.submit_reply(as_caller(reply, token)).await
            } else {
                let send = common::send_text("chat_id", "oc_two", &words);
                c.submit_send(as_caller(send, token)).await
            };
            r.expect("submitted");
        }
    }
    eventually("every call posted", async || {
        fake.received().iter().filter(|r| r.code == 0).count() >= 2 * n
    })
    .await;
    let got = fake.received();
    assert_eq!(fake.stats().rate_rejections(), 0, "{:?}", fake.stats());
    let times: Vec<f64> = got.iter().map(|r| r.at_ms).collect();
    assert!(common::max_in_window(&times, 1000.0) <= 5, "{times:?}");
    for tag in ["a", "b"] {
        let words: Vec<String> = got
            .iter()
            .map(|r| {
                let v: serde_json::Value = serde_json::from_str(&r.content).unwrap();
                v["text"].as_str().unwrap().to_owned()
            })
            .filter(|w| w.starts_with(tag))
            .collect();
        let want: Vec<String> = (0..n).map(|i| format!("{tag}{i:02}")).collect();
        assert_eq!(words, want, "caller {tag}'s order");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Redis `HGETALL key` on `url` (a Redis Cluster when it lists several seeds).
async fn hgetall(url: &str, key: &str) -> std::collections::HashMap<String, String> {
    query(url, redis::cmd("HGETALL").arg(key)).await
}

/// `cmd`'s answer from the Redis (or Redis Cluster) at `url`.
async fn query<T: redis::FromRedisValue>(url: &str, cmd: &redis::Cmd) -> T {
    if common::is_redis_cluster(url) {
        let nodes: Vec<&str> = url.split(',').collect();
        let client = redis::cluster::ClusterClient::new(nodes).unwrap();
        let mut c = client.get_async_connection().await.unwrap();
        cmd.query_async(&mut c).await.unwrap()
    } else {
        let client = redis::Client::open(url).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        cmd.query_async(&mut c).await.unwrap()
    }
}

#[tokio::test]
async fn a_partition_owner_killed_mid_backlog_has_its_chats_resume_in_order_on_another_replica() {
    owner_fails_mid_backlog(false).await;
}

#[tokio::test]
async fn a_partition_owner_frozen_mid_backlog_has_its_chats_resume_in_order_on_another_replica() {
    owner_fails_mid_backlog(true).await;
}

/// Three replicas with peers; a chat's jobs come in through one replica and are stored in the
/// chat's partition, whose owner runs them and is killed (or frozen with SIGSTOP) mid-backlog.
/// The partition moves with its jobs: the chat resumes on another replica within the lease
/// plus a second, every job posted once, in order, no rejection.
async fn owner_fails_mid_backlog(freeze: bool) {
    use feishu_reply_gateway::cluster::partitions::partition_of;
    let (url, _redis) = shared_redis();
    let fake = spawn_fake(FakeOptions::default()).await;
    let prefix = unique("owner");
    let (file, dir) = cluster_file(&fake, &url, &prefix);
    let grpc = [free_port(), free_port(), free_port()];
    let peer = [free_port(), free_port(), free_port()];
    let metrics = [free_port(), free_port(), free_port()];
    let mut procs: Vec<Option<ServeProcess>> = (0..3)
        .map(|i| {
            let listen = format!("127.0.0.1:{}", peer[i]);
            let m = format!("127.0.0.1:{}", metrics[i]);
            Some(ServeProcess::start_with(
                &file,
                grpc[i],
                &[
                    ("GATEWAY_PEER_LISTEN", &listen),
                    // The owner keeps its chats' windows (the default with peers): its
                    // death loses them.
                    ("GATEWAY_METRICS_ADDR", &m),
                ],
            ))
        })
        .collect();
    for port in grpc {
        connect(port).await;
    }
    // The three share the partitions.
    eventually("the replicas share every partition", async || {
        let mut owned = Vec::new();
        for port in metrics {
            owned.push(
                common::metric(
                    &common::metrics_text(port).await,
                    "feishu_reply_partitions_owned",
                )
                .unwrap_or(0.0),
            );
        }
        owned.iter().sum::<f64>() == 256.0 && owned.iter().all(|n| *n > 0.0)
    })
    .await;
    // Who owns the first chat's partition (from the owner records), and who it is.
    let parts = format!("{{{prefix}:parts}}");
    let owners = hgetall(&url, &format!("{parts}:owners")).await;
    let addrs = hgetall(&url, &format!("{parts}:addrs")).await;
    let tag = "po";
    let p = partition_of(&format!("oc_{tag}0"));
    let owner_id = &owners[&format!("{p}:id")];
    let owner_addr = &addrs[owner_id];
    let victim = peer
        .iter()
        .position(|port| *owner_addr == format!("127.0.0.1:{port}"))
        .expect("the owner is one of the three");
    // The backlog comes in through another replica, which forwards the chat's jobs to it.
    let sender = (victim + 1) % 3;
    let mut to_sender = connect(grpc[sender]).await;
    let n = common::backlog_jobs();
    let ids = common::submit_backlog(&mut to_sender, tag, n).await;
    eventually("some of the owner's chat posted", async || {
        fake.received()
            .iter()
            .filter(|r| r.chat_id == format!("oc_{tag}0"))
            .count()
            >= 3
    })
    .await;
    if freeze {
        procs[victim].as_ref().unwrap().signal("STOP");
    } else {
        procs[victim] = None; // SIGKILL
    }
    let killed = Instant::now();
    // Whatever it had in flight has landed 100 ms after the kill; the chat's next post is the
    // sender's own.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let in_chat = || {
        fake.received()
            .iter()
            .filter(|r| r.chat_id == format!("oc_{tag}0"))
            .count()
    };
    let landed = in_chat();
    assert!(landed < n / 3, "killed after the chat's backlog drained");
    eventually("the chat's backlog resumes", async || in_chat() > landed).await;
    let resumed = killed.elapsed();
    all_delivered(&mut to_sender, &ids, LEASE + Duration::from_secs(20)).await;
    if freeze {
        // Woken: what it still held was taken out of its line or goes out deduped.
        procs[victim].as_ref().unwrap().signal("CONT");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (by_uuid, per_chat) = posts(&fake);
    assert_eq!(by_uuid.len(), n, "every job posted");
    assert!(by_uuid.values().all(|&k| k == 1), "{by_uuid:?}");
    assert_in_order(&per_chat, 3);
    assert_eq!(fake.stats().rate_rejections(), 0);
    // The jobs live in the chat's partition: a survivor took them with it.
    let mut taken = 0.0;
    for (i, port) in metrics.iter().enumerate() {
        if i != victim {
            let m = common::metrics_text(*port).await;
            taken += common::metric(&m, "feishu_reply_job_takeovers_total").unwrap_or(0.0);
        }
    }
    assert!(taken >= 1.0, "a survivor took the dead owner's jobs over");
    eprintln!(
        "owner {}: the chat resumed {resumed:?} after (lease {LEASE:?})",
        if freeze { "frozen" } else { "killed" }
    );
    assert!(
        resumed <= LEASE + Duration::from_secs(1),
        "resumed {resumed:?} after the kill"
    );
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}
