//! Scheduler logic on tokio's paused clock with a scripted in-process upstream.

use std::collections::{HashMap, VecDeque};

use super::*;
use crate::config::Config;
use crate::feishu::{BoxFuture, SendRequest, UpstreamError};
use parking_lot::Mutex;

#[derive(Default)]
struct Script {
    /// Answers for a message_id, in order; afterwards success.
    answers: HashMap<String, VecDeque<UpstreamError>>,
    sent: Vec<(Duration, String, String, String)>,
    /// The upstream call for this message_id panics (a bug in the client, say).
    panic_on: Option<String>,
}

struct ScriptedUpstream {
    origin: Instant,
    latency: Duration,
    script: Mutex<Script>,
}

impl ScriptedUpstream {
    fn new(latency: Duration) -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            latency,
            script: Mutex::default(),
        })
    }
    fn fail(&self, message_id: &str, errors: Vec<UpstreamError>) {
        self.script
            .lock()
            .answers
            .insert(message_id.into(), errors.into());
    }
    /// (virtual time since start, message_id, chat_id, uuid) of every attempt.
    fn sent(&self) -> Vec<(Duration, String, String, String)> {
        self.script.lock().sent.clone()
    }
}

impl Upstream for ScriptedUpstream {
    fn call<'a>(
        &'a self,
        _app: AppIndex,
        req: &'a Call,
    ) -> BoxFuture<'a, Result<SentMessage, UpstreamError>> {
        Box::pin(async move {
            let answer = {
                let mut s = self.script.lock();
                let chat = req.content().to_owned();
                s.sent.push((
                    self.origin.elapsed(),
                    req.message_id().to_owned(),
                    chat,
                    req.uuid().to_owned(),
                ));
                s.answers
                    .get_mut(req.message_id())
                    .and_then(VecDeque::pop_front)
            };
            tokio::time::sleep(self.latency).await;
            let panics = self.script.lock().panic_on.as_deref() == Some(req.message_id());
            assert!(!panics, "scripted panic in the upstream call");
            match answer {
                Some(e) => Err(e),
                None => Ok(SentMessage {
                    message_id: format!("om_r_{}", req.message_id()),
                    ..Default::default()
                }),
            }
        })
    }
    fn message_chat<'a>(
        &'a self,
        _app: AppIndex,
        id: &'a str,
    ) -> BoxFuture<'a, Result<String, UpstreamError>> {
        Box::pin(async move { Ok(format!("oc_{id}")) })
    }
}

fn feishu_err(http: u16, code: i64) -> UpstreamError {
    UpstreamError::Feishu {
        http,
        code,
        msg: "scripted".into(),
        log_id: "L".into(),
        retry_after: None,
    }
}

fn scheduler(upstream: Arc<ScriptedUpstream>, tweak: impl FnOnce(&mut Config)) -> Scheduler {
    let mut c = Config::defaults();
    tweak(&mut c);
    Scheduler::start(
        SchedulerConfig::from_config(&c),
        upstream,
        Arc::new(Metrics::new()),
    )
}

/// A job whose `content` carries its chat id (so the scripted upstream can report it).
fn job(message_id: &str, chat: &str, deadline: Option<Duration>) -> JobSpec {
    JobSpec {
        caller: 0,
        credential: "".into(),
        intake: None,
        on_send: None,
        app: 0,
        app_name: "default".into(),
        app_id: "cli_test".into(),
        chat_id: chat.into(),
        user_id: None,
        target: super::Target::Chat,
        lane: super::Lane::Normal,
        request: Call::Reply(SendRequest {
            message_id: message_id.into(),
            content: chat.into(),
            msg_type: "text",
            reply_in_thread: false,
            uuid: format!("uuid-{message_id}"),
        }),
        caller_uuid: None,
        deadline: deadline.map(|d| Instant::now() + d),
        span: tracing::Span::none(),
    }
}

fn assert_never_more_than(sends: &[Duration], n: usize, window: Duration) {
    let mut s = sends.to_vec();
    s.sort();
    for w in s.windows(n + 1) {
        assert!(
            w[n] - w[0] >= window,
            "{} sends within {:?}",
            n + 1,
            w[n] - w[0]
        );
    }
}

#[tokio::test(start_paused = true)]
async fn order_within_a_chat_survives_retries_and_uuid_is_stable() {
    let up = ScriptedUpstream::new(Duration::from_millis(30));
    up.fail(
        "om_2",
        vec![
            feishu_err(400, 230049),
            feishu_err(503, 1),
            UpstreamError::Network {
                kind: "timeout",
                detail: "x".into(),
            },
        ],
    );
    let s = scheduler(up.clone(), |_| {});
    let rxs: Vec<_> = (1..=6)
        .map(|i| s.submit(job(&format!("om_{i}"), "oc_a", None)))
        .collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        let d = rx.await.unwrap().unwrap();
        assert_eq!(d.attempts, if i == 1 { 4 } else { 1 });
    }
    let order: Vec<String> = up.sent().into_iter().map(|s| s.1).collect();
    assert_eq!(
        order,
        [
            "om_1", "om_2", "om_2", "om_2", "om_2", "om_3", "om_4", "om_5", "om_6"
        ]
    );
    let uuids: Vec<String> = up
        .sent()
        .into_iter()
        .filter(|s| s.1 == "om_2")
        .map(|s| s.3)
        .collect();
    assert!(uuids.iter().all(|u| u == "uuid-om_2"));
}

#[tokio::test(start_paused = true)]
async fn a_saturated_chat_never_delays_other_chats() {
    let up = ScriptedUpstream::new(Duration::from_millis(10));
    let s = scheduler(up.clone(), |_| {});
    let hot: Vec<_> = (0..40)
        .map(|i| s.submit(job(&format!("om_h{i}"), "oc_hot", None)))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let cold: Vec<_> = (0..5)
        .map(|i| s.submit(job(&format!("om_c{i}"), &format!("oc_c{i}"), None)))
        .collect();
    for rx in cold {
        rx.await.unwrap().unwrap();
    }
    // The cold chats went out at once (one upstream latency), not after the hot backlog.
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    for rx in hot {
        rx.await.unwrap().unwrap();
    }
    let hot_sends: Vec<Duration> = up
        .sent()
        .into_iter()
        .filter(|s| s.2 == "oc_hot")
        .map(|s| s.0)
        .collect();
    assert_eq!(hot_sends.len(), 40);
    assert_never_more_than(&hot_sends, 5, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn burst_of_1000_distinct_chats_drains_at_the_app_limit() {
    let up = ScriptedUpstream::new(Duration::from_millis(40));
    let s = scheduler(up.clone(), |_| {});
    let start = Instant::now();
    let rxs: Vec<_> = (0..1000)
        .map(|i| s.submit(job(&format!("om_{i}"), &format!("oc_{i}"), None)))
        .collect();
    for rx in rxs {
        rx.await.unwrap().unwrap();
    }
    let drain = start.elapsed();
    let sends: Vec<Duration> = up.sent().into_iter().map(|s| s.0).collect();
    assert_eq!(sends.len(), 1000);
    assert_never_more_than(&sends, 50, Duration::from_secs(1));
    // 20 bursts of 50, one second (+20 ms margin) apart: the last goes at ~19.4 s.
    assert!(drain < Duration::from_secs(20), "drained in {drain:?}");
    assert!(drain > Duration::from_secs(19), "drained in {drain:?}");
}

#[tokio::test(start_paused = true)]
async fn a_job_whose_deadline_passes_in_the_queue_is_never_sent() {
    let up = ScriptedUpstream::new(Duration::from_millis(10));
    // om_g0 meets Feishu's app frequency limit and must wait 3 s: the chat waits with it.
    up.fail(
        "om_g0",
        vec![UpstreamError::Feishu {
            http: 429,
            code: 99991400,
            msg: "freq".into(),
            log_id: "L".into(),
            retry_after: Some(Duration::from_secs(3)),
        }],
    );
    let s = scheduler(up.clone(), |_| {});
    let first: Vec<_> = (0..5)
        .map(|i| s.submit(job(&format!("om_f{i}"), "oc_a", None)))
        .collect();
    let _queued: Vec<_> = (0..5)
        .map(|i| s.submit(job(&format!("om_g{i}"), "oc_a", None)))
        .collect();
    for rx in first {
        rx.await.unwrap().unwrap();
    }
    // Chat quota spent until t≈1.02 s and 5 more queued: a 6th cannot go before ~2.04 s.
    let tight = s
        .reply(job("om_tight", "oc_a", Some(Duration::from_millis(1500))))
        .await;
    assert!(
        matches!(tight, Err(GatewayError::DeadlineUnreachable { .. })),
        "{tight:?}"
    );
    // 2.5 s is feasible on quota alone, so it is admitted; then om_g0's 429 delays the chat.
    let late = s.submit(job("om_late", "oc_a", Some(Duration::from_millis(2500))));
    let r = late.await.unwrap();
    assert!(
        matches!(r, Err(GatewayError::DeadlineBeforeSend { attempts: 0, .. })),
        "{r:?}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        up.sent()
            .iter()
            .all(|s| s.1 != "om_late" && s.1 != "om_tight")
    );
}

#[tokio::test(start_paused = true)]
async fn retries_stop_at_max_attempts_with_the_last_error() {
    let up = ScriptedUpstream::new(Duration::from_millis(5));
    up.fail("om_x", (0..10).map(|_| feishu_err(400, 230020)).collect());
    let s = scheduler(up.clone(), |c| c.retry.max_attempts = 3);
    let r = s.reply(job("om_x", "oc_x", None)).await;
    match r {
        Err(GatewayError::Upstream {
            attempts: 3, error, ..
        }) => assert_eq!(error.code(), Some(230020)),
        other => panic!("{other:?}"),
    }
    // 230020 cooled the chat down: attempts are at least a window apart.
    let t: Vec<Duration> = up.sent().into_iter().map(|s| s.0).collect();
    assert!(
        t[1] - t[0] >= Duration::from_secs(1) && t[2] - t[1] >= Duration::from_secs(1),
        "{t:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn final_errors_are_not_retried_and_the_chat_moves_on() {
    let up = ScriptedUpstream::new(Duration::from_millis(5));
    up.fail("om_1", vec![feishu_err(400, 230002)]);
    let s = scheduler(up.clone(), |_| {});
    let a = s.submit(job("om_1", "oc_a", None));
    let b = s.submit(job("om_2", "oc_a", None));
    assert!(matches!(
        a.await.unwrap(),
        Err(GatewayError::Upstream { attempts: 1, .. })
    ));
    assert_eq!(b.await.unwrap().unwrap().attempts, 1);
}

#[tokio::test(start_paused = true)]
async fn queue_bounds_refuse_with_retry_info() {
    let up = ScriptedUpstream::new(Duration::from_millis(5));
    let s = scheduler(up.clone(), |c| {
        c.queue.max_per_chat = 10;
        c.queue.max_total = 12;
    });
    // All submitted before the dispatcher runs (paused, single-threaded runtime).
    let mut rxs: Vec<_> = (0..11)
        .map(|i| s.submit(job(&format!("om_{i}"), "oc_a", None)))
        .collect();
    let over_chat = rxs.pop().unwrap();
    rxs.extend((0..3).map(|i| s.submit(job(&format!("om_b{i}"), &format!("oc_b{i}"), None))));
    let over_total = rxs.pop().unwrap().await.unwrap();
    let over_chat = over_chat.await.unwrap();
    assert!(
        matches!(
            over_chat,
            Err(GatewayError::QueueFull { scope: "chat", .. })
        ),
        "{over_chat:?}"
    );
    assert!(
        matches!(
            over_total,
            Err(GatewayError::QueueFull {
                scope: "gateway",
                ..
            })
        ),
        "{over_total:?}"
    );
    for rx in rxs {
        rx.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_sends_during_grace_then_fails_the_rest_unavailable() {
    let up = ScriptedUpstream::new(Duration::from_millis(10));
    let s = scheduler(up.clone(), |_| {});
    // 30 replies to one chat need ~5 s; the grace is 2 s.
    let rxs: Vec<_> = (0..30)
        .map(|i| s.submit(job(&format!("om_{i}"), "oc_a", None)))
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.shutdown(Duration::from_secs(2)).await;
    let refused = s.reply(job("om_new", "oc_b", None)).await;
    assert!(matches!(refused, Err(GatewayError::ShuttingDown { .. })));
    let mut ok = 0;
    for rx in rxs {
        match rx.await.unwrap() {
            Ok(_) => ok += 1,
            Err(GatewayError::ShuttingDown { attempts: 0, .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    // Sent in the grace period: bursts at 0, 1.02, ~2.04 (cut) → 10 or 15.
    assert!((10..=15).contains(&ok), "{ok} delivered");
    assert_eq!(up.sent().len(), ok);
}

#[tokio::test(start_paused = true)]
async fn cancelled_callers_are_not_sent() {
    let up = ScriptedUpstream::new(Duration::from_millis(10));
    let s = scheduler(up.clone(), |_| {});
    let keep: Vec<_> = (0..5)
        .map(|i| s.submit(job(&format!("om_{i}"), "oc_a", None)))
        .collect();
    drop(s.submit(job("om_gone", "oc_a", None)));
    let last = s.submit(job("om_last", "oc_a", None));
    for rx in keep {
        rx.await.unwrap().unwrap();
    }
    last.await.unwrap().unwrap();
    assert!(up.sent().iter().all(|s| s.1 != "om_gone"));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_send_fails_its_job_internal_and_frees_its_chat() {
    let up = ScriptedUpstream::new(Duration::from_millis(10));
    up.script.lock().panic_on = Some("om_boom".into());
    let s = scheduler(up.clone(), |_| {});
    let boom = s.submit(job("om_boom", "oc_a", None));
    let next = s.submit(job("om_next", "oc_a", None));
    let wait = Duration::from_secs(60);
    let boom = tokio::time::timeout(wait, boom)
        .await
        .expect("answered")
        .expect("not dropped");
    match boom {
        // INTERNAL in the API (its row in `grpc::status`).
        Err(GatewayError::Internal { .. }) => {}
        other => panic!("{other:?}"),
    }
    // The chat is not left busy: the next reply goes out.
    let next = tokio::time::timeout(wait, next)
        .await
        .expect("chat freed")
        .unwrap();
    assert_eq!(next.unwrap().attempts, 1);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_call_leaves_its_queue_at_once() {
    let up = ScriptedUpstream::new(Duration::from_millis(10));
    let s = scheduler(up.clone(), |c| c.queue.max_per_chat = 3);
    // The chat's quota is spent for a second by 5 sends; 3 more wait, then their callers go.
    let mut first = Vec::new();
    for i in 0..5 {
        // One at a time, each answered (10 ms) before the next: none waits in the queue.
        first.push(s.submit(job(&format!("om_f{i}"), "oc_a", None)));
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    // Three calls wait in the chat's queue; then their callers go away (as a gRPC handler is
    // dropped when its call is cancelled).
    let waiting: Vec<_> = (0..3)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.reply(job(&format!("om_w{i}"), "oc_a", None)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    for w in waiting {
        w.abort();
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Still within the quota window: the chat's queue has room again for 3 more.
    let more: Vec<_> = (0..3)
        .map(|i| s.submit(job(&format!("om_m{i}"), "oc_a", None)))
        .collect();
    for rx in first.into_iter().chain(more) {
        rx.await.unwrap().expect("delivered");
    }
    assert!(up.sent().iter().all(|x| !x.1.starts_with("om_w")));
}

#[tokio::test(start_paused = true)]
async fn the_queue_is_bounded_by_bytes_too() {
    // Counting jobs alone let 3000 queued 150 KB texts take 1.2 GB. Here the byte bound fits
    // three small jobs (content + per-job overhead): the fourth is refused at once.
    let up = ScriptedUpstream::new(Duration::from_millis(10));
    let s = scheduler(up.clone(), |c| {
        c.queue.max_total_bytes = 3 * (queue::JOB_OVERHEAD_BYTES + 20);
    });
    let rxs: Vec<_> = (0..4)
        .map(|i| s.submit(job(&format!("om_{i}"), &format!("oc_{i}"), None)))
        .collect();
    let mut results = Vec::new();
    for rx in rxs {
        results.push(rx.await.unwrap());
    }
    assert!(results[..3].iter().all(Result::is_ok), "{results:?}");
    assert!(
        matches!(
            results[3],
            Err(GatewayError::QueueFull { scope: "bytes", .. })
        ),
        "{:?}",
        results[3]
    );
    // Once they left the queue, there is room again.
    s.reply(job("om_later", "oc_9", None)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_dead_dispatcher_is_visible_and_calls_fail_fast() {
    let up = ScriptedUpstream::new(Duration::from_millis(10));
    let s = scheduler(up.clone(), |_| {});
    assert!(s.is_alive());
    let _ = s.tx.send(Command::Crash);
    tokio::time::timeout(Duration::from_secs(1), s.died())
        .await
        .expect("the death is noticed");
    assert!(!s.is_alive());
    // Calls fail at once (UNAVAILABLE) instead of waiting for a dispatcher that is gone.
    let r = tokio::time::timeout(Duration::from_secs(1), s.reply(job("om_x", "oc_x", None)))
        .await
        .expect("fails fast");
    assert!(matches!(r, Err(GatewayError::ShuttingDown { .. })), "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn sends_of_a_previous_process_count_in_the_windows() {
    // After a restart the job store says 5 replies reached oc_s 300 ms ago: the chat's 5/s
    // window is full until 700 ms from now, so the next reply waits for it.
    let up = ScriptedUpstream::new(Duration::from_millis(1));
    let s = scheduler(up.clone(), |_| {});
    let origin = Instant::now();
    let past = |at: Instant| super::PastSend {
        app_id: "cli_test".into(),
        api: crate::feishu::Api::Reply,
        chat_id: "oc_s".into(),
        user_id: None,
        target: super::Target::Chat,
        arrived_by: at,
    };
    let arrived = origin
        .checked_sub(Duration::from_millis(300))
        .unwrap_or(origin);
    s.seed((0..5).map(|_| past(arrived)).collect());
    let d = s.submit(job("om_s1", "oc_s", None)).await.unwrap().unwrap();
    assert_eq!(d.attempts, 1);
    let sent_at = up.sent()[0].0;
    assert!(
        sent_at >= Duration::from_millis(700),
        "sent {sent_at:?} after the restart, inside the previous process's window"
    );
    // Another chat is not held.
    let t = Instant::now();
    s.submit(job("om_o1", "oc_other", None))
        .await
        .unwrap()
        .unwrap();
    assert!(t.elapsed() < Duration::from_millis(50));
}
