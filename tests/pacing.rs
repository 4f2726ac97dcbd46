//! Pacing proofs in virtual time: the real scheduler against the simulated Feishu
//! (`fake_feishu::sim`), both on tokio's paused clock. The network is as slow and uneven as
//! each test says (cold connections, random inbound delays), Feishu counts each quota in a
//! strict sliding window at arrival, and nothing depends on how loaded this machine is.

mod common;

use std::sync::Arc;
use std::time::Duration;

use feishu_reply_gateway::config::Config;
use feishu_reply_gateway::fake_feishu::sim::{SimFeishu, SimOptions};
use feishu_reply_gateway::feishu::{
    Call, CardStreaming, CardText, MessageUpdate, NewMessage, SendRequest, UpstreamError,
};
use feishu_reply_gateway::metrics::Metrics;
use feishu_reply_gateway::scheduler::{
    JobSpec, Lane, Scheduler, SchedulerConfig, Target, card_queue, message_queue,
};
use tokio::time::Instant;

/// 1000 replies to distinct chats: 50/s until the 1000/min quota is spent, bursts at 0..19 s.
const PHYSICAL_LIMIT_1000: Duration = Duration::from_secs(19);
/// 1030: the last 30 wait for the first minute's sends to leave the minute window.
const PHYSICAL_LIMIT_1030: Duration = Duration::from_secs(60);

fn job(i: usize) -> JobSpec {
    reply_in(format!("om_{i}"), format!("oc_{i}"), format!("uuid-{i}"))
}

/// A reply to `message_id` (which the simulated Feishu places in `chat`).
fn reply_in(message_id: String, chat: String, uuid: String) -> JobSpec {
    JobSpec {
        caller: 0,
        credential: "".into(),
        intake: None,
        on_send: None,
        app: 0,
        app_name: "default".into(),
        app_id: "cli_sim".into(),
        chat_id: chat.into(),
        user_id: None,
        target: Target::Chat,
        lane: Lane::Normal,
        request: Call::Reply(SendRequest {
            message_id,
            content: r#"{"text":"hi"}"#.into(),
            msg_type: "text",
            reply_in_thread: false,
            uuid,
        }),
        caller_uuid: None,
        deadline: None,
        span: tracing::Span::none(),
    }
}

/// A send to chat `oc_s<i>` (no reply shares it).
fn send_job(i: usize) -> JobSpec {
    JobSpec {
        chat_id: format!("oc_s{i}").into(),
        request: Call::Send(NewMessage {
            receive_id_type: "chat_id",
            receive_id: format!("oc_s{i}"),
            msg_type: "text",
            content: r#"{"text":"hi"}"#.into(),
            uuid: format!("send-{i}"),
        }),
        ..job(i)
    }
}

/// Submits `n` replies to distinct chats at once; returns when the last was answered,
/// measured from the submission.
async fn burst(sim: &Arc<SimFeishu>, n: usize) -> Duration {
    burst_of(sim, (0..n).map(job).collect()).await
}

/// Submits `jobs` at once; returns when the last was answered, measured from the submission.
async fn burst_of(sim: &Arc<SimFeishu>, jobs: Vec<JobSpec>) -> Duration {
    let config = SchedulerConfig::from_config(&Config::defaults());
    let s = Scheduler::start(config, sim.clone(), Arc::new(Metrics::new()));
    let start = Instant::now();
    let rxs: Vec<_> = jobs.into_iter().map(|j| s.submit(j)).collect();
    for rx in rxs {
        rx.await.unwrap().expect("delivered");
    }
    start.elapsed()
}

/// `n` replies to distinct chats over the network `opts` describes: asserts that Feishu
/// refused none and posted each once; returns the drain time over `limit`.
async fn clean_burst(opts: SimOptions, n: usize, limit: Duration) -> f64 {
    let sim = Arc::new(SimFeishu::new(opts));
    let drain = burst(&sim, n).await;
    let stats = sim.stats();
    assert_eq!(stats.rate_rejections(), 0, "{stats:?}");
    assert_eq!(stats.posted, n as u64, "{stats:?}");
    drain.as_secs_f64() / limit.as_secs_f64()
}

#[tokio::test(start_paused = true)]
async fn cold_connections_arriving_80ms_late_cause_no_rejection() {
    // The first wave opens 50 connections whose first request arrives 80 ms late; the next
    // wave reuses them and arrives at once. Counting sends by when they left let the second
    // wave land less than a window after the first (44 rejections, 3.2 x the limit).
    let opts = SimOptions {
        cold_connection: Duration::from_millis(80),
        ..SimOptions::default()
    };
    let r = clean_burst(opts, 1000, PHYSICAL_LIMIT_1000).await;
    assert!(r <= 1.10, "drained in {r:.3} x the physical limit");
}

#[tokio::test(start_paused = true)]
async fn random_inbound_delays_up_to_50ms_cause_no_rejection() {
    let opts = SimOptions {
        inbound_jitter: Duration::from_millis(50),
        ..SimOptions::default()
    };
    let r = clean_burst(opts, 1000, PHYSICAL_LIMIT_1000).await;
    assert!(r <= 1.10, "drained in {r:.3} x the physical limit");
}

#[tokio::test(start_paused = true)]
async fn crossing_the_minute_quota_under_jitter_is_clean_for_every_seed() {
    for seed in 1..=10u64 {
        let opts = SimOptions {
            inbound_jitter: Duration::from_millis(50),
            cold_connection: Duration::from_millis(80),
            seed,
            ..SimOptions::default()
        };
        let r = clean_burst(opts, 1030, PHYSICAL_LIMIT_1030).await;
        assert!(r <= 1.10, "seed {seed}: {r:.3} x the limit");
    }
}

#[tokio::test(start_paused = true)]
async fn a_fast_network_drains_within_3_percent_of_the_physical_limit() {
    // 1 ms each way: the bound costs one round trip and the 5 ms margin per window.
    let opts = SimOptions::default();
    let r = clean_burst(opts, 1000, PHYSICAL_LIMIT_1000).await;
    assert!(r <= 1.03, "drained in {r:.3} x the physical limit");
}

#[tokio::test(start_paused = true)]
async fn replies_and_sends_of_one_app_drain_together_in_their_own_app_windows() {
    // Feishu counts 50/s and 1000/min per API: 1000 replies and 1000 sends of one app, to
    // distinct chats, fit in the same 19 s (pooled in one set of windows they would need 39 s).
    let sim = Arc::new(SimFeishu::new(SimOptions::default()));
    let jobs = (0..1000).map(job).chain((0..1000).map(send_job)).collect();
    let drain = burst_of(&sim, jobs).await;
    let stats = sim.stats();
    assert_eq!(stats.rate_rejections(), 0, "{stats:?}");
    assert_eq!(stats.posted, 2000, "{stats:?}");
    assert_eq!(stats.requests_by_operation["send"], 1000, "{stats:?}");
    let r = drain.as_secs_f64() / PHYSICAL_LIMIT_1000.as_secs_f64();
    assert!(r <= 1.05, "drained in {r:.3} x the physical limit");
}

#[tokio::test(start_paused = true)]
async fn a_hundred_updates_of_one_card_in_two_seconds_latest_wins_at_5_per_second() {
    // A card updated every 20 ms: Feishu allows 5 updates per second per message. Each update
    // still waiting when a newer one comes is answered superseded, never sent; what is sent
    // goes in order, at most 5 in any second, and the last content is the last update's.
    let sim = Arc::new(SimFeishu::new(SimOptions::default()));
    let config = SchedulerConfig::from_config(&Config::defaults());
    let s = Scheduler::start(config, sim.clone(), Arc::new(Metrics::new()));
    let update = |n: usize| JobSpec {
        chat_id: message_queue("om_card"),
        target: Target::Message { chat: None },
        request: Call::Update(MessageUpdate {
            message_id: "om_card".into(),
            msg_type: "interactive",
            content: format!(r#"{{"elements":[],"n":{n}}}"#),
        }),
        ..job(n)
    };
    let mut answers = Vec::new();
    for n in 0..100 {
        answers.push(s.submit(update(n)));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut superseded = 0;
    for rx in answers {
        let d = rx.await.unwrap().expect("every update is answered OK");
        superseded += usize::from(d.superseded);
    }
    let sent = sim.arrivals();
    assert_eq!(
        sent.len() + superseded,
        100,
        "each update sent or superseded"
    );
    let numbers: Vec<usize> = sent
        .iter()
        .map(|a| {
            let v: serde_json::Value = serde_json::from_str(&a.content).unwrap();
            v["n"].as_u64().unwrap() as usize
        })
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "in order: {numbers:?}"
    );
    assert_eq!(numbers.last(), Some(&99), "the last content wins");
    let times: Vec<f64> = sent.iter().map(|a| a.at.as_secs_f64() * 1000.0).collect();
    assert!(common::max_in_window(&times, 1000.0) <= 5, "{times:?}");
    assert!(superseded >= 80, "{superseded} superseded");
    assert_eq!(sim.stats().rate_rejections(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_cards_operations_go_in_order_at_10_per_second() {
    // CardKit allows 10 operations per second per card (text and settings together) and
    // wants each one's sequence larger than the last: 40 texts queued 50 a second, then the
    // close, go one card queue, in order, within its 10/s; a text still waiting when a newer
    // one comes is answered superseded, never sent (latest wins).
    let sim = Arc::new(SimFeishu::new(SimOptions::default()));
    let config = SchedulerConfig::from_config(&Config::defaults());
    let s = Scheduler::start(config, sim.clone(), Arc::new(Metrics::new()));
    let card_json = r#"{"schema":"2.0","config":{"streaming_mode":true},"body":{"elements":[{"tag":"markdown","element_id":"md","content":""}]}}"#;
    let create = JobSpec {
        chat_id: "stream:1".into(),
        target: Target::App,
        request: Call::CardCreate {
            card_json: card_json.into(),
        },
        ..job(0)
    };
    let card_id = s.reply(create).await.expect("created").message.card_id;
    let on_card = |n: u32, request: Call| JobSpec {
        chat_id: card_queue(&card_id),
        target: Target::Card,
        request,
        ..job(n as usize)
    };
    let mut answers = Vec::new();
    for n in 1..=40u32 {
        let text = Call::CardText(CardText {
            card_id: card_id.clone(),
            element_id: "md".into(),
            content: "word ".repeat(n as usize),
            sequence: n,
            uuid: format!("t{n}"),
        });
        answers.push(s.submit(on_card(n, text)));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let close = Call::CardStreaming(CardStreaming {
        card_id: card_id.clone(),
        on: false,
        sequence: 41,
        uuid: "close".into(),
    });
    answers.push(s.submit(on_card(41, close)));
    let mut superseded = 0;
    for rx in answers {
        superseded += u32::from(rx.await.unwrap().expect("accepted").superseded);
    }
    let card = sim.card(&card_id).expect("the card");
    assert_eq!(card.texts["md"], "word ".repeat(40));
    assert_eq!((card.sequence, card.streaming), (41, false));
    assert_eq!(card.updates + superseded, 40);
    assert!(superseded >= 15, "{superseded}");
    let times: Vec<f64> = sim
        .arrivals()
        .iter()
        .filter(|a| a.chat_id == card_id)
        .map(|a| a.at.as_secs_f64() * 1000.0)
        .collect();
    assert_eq!(times.len(), card.updates as usize + 1);
    assert!(common::max_in_window(&times, 1000.0) <= 10, "{times:?}");
    let sequences: Vec<u32> = sim
        .arrivals()
        .iter()
        .filter(|a| a.chat_id == card_id)
        .map(|a| a.uuid.strip_prefix('t').map_or(41, |n| n.parse().unwrap()))
        .collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");
    assert!(sim.arrivals().iter().all(|a| a.code == 0));
}

#[tokio::test(start_paused = true)]
async fn an_app_rate_rejection_costs_its_reset_not_a_minute() {
    // Feishu's gateway refuses the first request (99991400, reset 1 s). The refused attempt
    // does not count in the app quotas that refused it, so all 1000 replies still fit in the
    // first minute: ~1 s late, not 60 s (the 1000th would wait for the minute window if the
    // refused attempt kept its slot).
    let sim = Arc::new(SimFeishu::new(SimOptions::default()));
    sim.push_error(UpstreamError::Feishu {
        http: 429,
        code: 99991400,
        msg: "request trigger frequency limit".into(),
        log_id: String::new(),
        retry_after: Some(Duration::from_secs(1)),
    });
    let drain = burst(&sim, 1000).await;
    let stats = sim.stats();
    assert_eq!((stats.posted, stats.faults), (1000, 1), "{stats:?}");
    assert_eq!(stats.rate_rejections(), 0, "{stats:?}");
    assert!(drain < Duration::from_secs(22), "drained in {drain:?}");
}

#[tokio::test(start_paused = true)]
async fn a_chat_rate_rejection_still_counts_in_the_app_quota() {
    // 230020 comes from the messaging service, behind the gateway that counts the app
    // quotas: the refused attempt stays counted there. 1000 replies then need 1001 app
    // slots, so the last one waits for the minute window instead of risking a 99991400.
    let sim = Arc::new(SimFeishu::new(SimOptions::default()));
    sim.push_error(UpstreamError::Feishu {
        http: 400,
        code: 230020,
        msg: "This operation triggers the frequency limit.".into(),
        log_id: String::new(),
        retry_after: None,
    });
    let drain = burst(&sim, 1000).await;
    let stats = sim.stats();
    assert_eq!((stats.posted, stats.faults), (1000, 1), "{stats:?}");
    assert!(drain > Duration::from_secs(60), "drained in {drain:?}");
    let last_minute = sim
        .arrivals()
        .iter()
        .filter(|a| a.at < Duration::from_secs(60))
        .count();
    assert_eq!(last_minute, 1000, "the refused attempt and 999 replies");
}

/// Replies to chat `chat` (ids that the simulated Feishu places in it).
fn job_in(i: usize, chat: &str) -> JobSpec {
    reply_in(
        format!("om_{i}_in_{chat}"),
        format!("oc_{chat}"),
        format!("uuid-{i}"),
    )
}

#[tokio::test(start_paused = true)]
async fn a_busy_chat_among_quiet_ones_gets_enough_of_the_app_windows_to_finish_with_them() {
    // 970 replies to distinct chats and 30 to one chat, one app: the app's 50/s are the
    // bottleneck (19 s), the busy chat needs 6 s at its own 5/s. Served one app slot per
    // window (a chat has one send in flight, and a window's 50 slots went in one instant to
    // the chats waiting for it), its replies ended 5 s after the others (1.273 x). On the
    // drain's critical path it goes first and the app keeps the slots it can use in its own
    // window for it, so it gets its 5/s and ends with the others.
    let sim = Arc::new(SimFeishu::new(SimOptions::default()));
    let config = SchedulerConfig::from_config(&Config::defaults());
    let s = Scheduler::start(config, sim.clone(), Arc::new(Metrics::new()));
    let start = Instant::now();
    let mut quiet = Vec::new();
    let mut busy = Vec::new();
    // The busy chat's replies arrive after the others (its chat is the last to be served in
    // arrival order).
    for i in 0..970 {
        quiet.push(s.submit(job(i)));
    }
    for i in 970..1000 {
        busy.push(s.submit(job_in(i, "busy")));
    }
    assert_eq!((quiet.len(), busy.len()), (970, 30));
    let mut busy_done = Vec::new();
    for rx in busy {
        rx.await.unwrap().expect("delivered");
        busy_done.push(start.elapsed());
    }
    let mut quiet_done = Vec::new();
    for rx in quiet {
        rx.await.unwrap().expect("delivered");
        quiet_done.push(start.elapsed());
    }
    let drain = busy_done.iter().chain(&quiet_done).max().unwrap();
    let stats = sim.stats();
    assert_eq!(stats.rate_rejections(), 0, "{stats:?}");
    assert_eq!(stats.posted, 1000, "{stats:?}");
    let r = drain.as_secs_f64() / PHYSICAL_LIMIT_1000.as_secs_f64();
    let quiet_last = quiet_done.iter().max().unwrap().as_secs_f64();
    assert!(
        r <= 1.05,
        "drained in {r:.3} x the physical limit; the busy chat's replies done at {busy_done:.2?}, the quiet chats' last at {quiet_last:.2} s"
    );
    eprintln!(
        "drained in {r:.3} x; the busy chat's last reply at {:.2?}, the quiet chats' at {quiet_last:.2} s",
        busy_done.last().unwrap()
    );
}
