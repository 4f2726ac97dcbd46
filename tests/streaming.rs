//! Streaming replies in virtual time (issue 20's driver): the real scheduler and
//! `stream::run` against the simulated Feishu on tokio's paused clock, which keeps CardKit's
//! rules (10 operations per second per card, sequences strictly increasing).

mod common;

use std::sync::Arc;
use std::time::Duration;

use feishu_reply_gateway::config::Config;
use feishu_reply_gateway::fake_feishu::sim::{SimFeishu, SimOptions};
use feishu_reply_gateway::feishu::{Api, UpstreamError};
use feishu_reply_gateway::metrics::Metrics;
use feishu_reply_gateway::scheduler::{GatewayError, Scheduler, SchedulerConfig};
use feishu_reply_gateway::stream::{self, Event, Part, StreamError, StreamSpec};
use tokio::sync::mpsc;
use tokio::time::Instant;

fn spec(uuid: &str, max_text_bytes: usize) -> StreamSpec {
    StreamSpec {
        caller: 0,
        credential: "".into(),
        app: 0,
        app_name: "default".into(),
        app_id: "cli_sim".into(),
        chat_id: "oc_stream".into(),
        message_id: "om_q_in_stream".into(),
        reply_in_thread: false,
        uuid: uuid.into(),
        title: "Answer".into(),
        max_text_bytes,
        streaming_limit: Duration::from_secs(600),
        span: tracing::Span::none(),
    }
}

struct Running {
    sim: Arc<SimFeishu>,
    scheduler: Scheduler,
    metrics: Arc<Metrics>,
    parts: mpsc::Sender<Part>,
    events: mpsc::UnboundedReceiver<Event>,
    done: tokio::task::JoinHandle<Result<stream::Finished, StreamError>>,
}

fn start(uuid: &str, max_text_bytes: usize) -> Running {
    start_on(SimOptions::default(), uuid, max_text_bytes)
}

fn start_on(opts: SimOptions, uuid: &str, max_text_bytes: usize) -> Running {
    start_with(opts, spec(uuid, max_text_bytes))
}

fn start_with(opts: SimOptions, spec: StreamSpec) -> Running {
    let sim = Arc::new(SimFeishu::new(opts));
    let config = SchedulerConfig::from_config(&Config::defaults());
    let metrics = Arc::new(Metrics::new());
    let s = Scheduler::start(config, sim.clone(), metrics.clone());
    let (parts, rx) = mpsc::channel(64);
    let (tx, events) = mpsc::unbounded_channel();
    let done = tokio::spawn(stream::run(s.clone(), spec, rx, tx, metrics.clone()));
    Running {
        sim,
        scheduler: s,
        metrics,
        parts,
        events,
        done,
    }
}

/// Appends `n` words, 20 a second (a model's pace); returns the text they make.
async fn type_words(parts: &mpsc::Sender<Part>, n: usize) -> String {
    let mut text = String::new();
    for i in 0..n {
        let word = format!("w{i} ");
        text.push_str(&word);
        parts.send(Part::Append(word)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    text
}

/// The one card a test's stream typed into, as Feishu keeps it.
fn the_card(sim: &SimFeishu) -> feishu_reply_gateway::fake_feishu::book::Card {
    let card_id = sim
        .arrivals()
        .iter()
        .find(|a| a.api == Api::CardContent)
        .map(|a| a.chat_id.clone())
        .expect("a text reached the card");
    sim.card(&card_id).expect("the card")
}

/// The card's operations as Feishu saw them: (since start, sequence).
fn card_ops(sim: &SimFeishu, card_id: &str) -> Vec<(f64, u32)> {
    sim.arrivals()
        .iter()
        .filter(|a| a.chat_id == card_id)
        .map(|a| {
            let seq = a.uuid.rsplit('-').next().unwrap().parse().unwrap();
            (a.at.as_secs_f64() * 1000.0, seq)
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn twenty_appends_a_second_for_twenty_seconds_show_the_exact_text_at_10_operations_a_second()
{
    let mut r = start("st-1", 30_000);
    let want = type_words(&r.parts, 400).await;
    r.parts.send(Part::Finish(None)).await.unwrap();
    let finished = r.done.await.unwrap().expect("finished");
    let Some(Event::Started { card_id, .. }) = r.events.recv().await else {
        panic!("started first")
    };
    assert_eq!(
        r.events.recv().await,
        Some(Event::Finished(finished.clone()))
    );
    let card = r.sim.card(&card_id).expect("the card");
    assert_eq!(card.texts["answer"], want, "the exact final text");
    assert!(!card.streaming, "streaming mode closed");
    let ops = card_ops(&r.sim, &card_id);
    let times: Vec<f64> = ops.iter().map(|o| o.0).collect();
    assert!(common::max_in_window(&times, 1000.0) <= 10, "{times:?}");
    assert!(
        ops.windows(2).all(|w| w[0].1 < w[1].1),
        "sequences increase"
    );
    assert!(r.sim.arrivals().iter().all(|a| a.code == 0));
    let replies = r
        .sim
        .arrivals()
        .iter()
        .filter(|a| a.api == Api::Reply)
        .count();
    assert_eq!(replies, 1, "one reply");
    // About 10 a second for the 20 s and the last text: coalesced, never one per append (400).
    assert!((100..=211).contains(&finished.updates_sent), "{finished:?}");
    assert_eq!(finished.final_chars as usize, want.chars().count());
    // The metrics say the same: every text sent or coalesced, nothing live any more.
    let m = r.metrics.encode();
    let value = |series: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} in {m}"))
    };
    let sent = value(r#"feishu_reply_stream_updates_total{outcome="sent"}"#);
    let coalesced = value(r#"feishu_reply_stream_updates_total{outcome="coalesced"}"#);
    assert_eq!(sent, f64::from(finished.updates_sent));
    assert!(coalesced >= 150.0, "{coalesced}");
    assert_eq!(value("feishu_reply_streams_live"), 0.0);
    assert_eq!(value("feishu_reply_stream_finish_seconds_count"), 1.0);
    // Each update sent says how long its oldest text waited: at a card's 10/s, well under 1 s.
    assert_eq!(value("feishu_reply_stream_text_lag_seconds_count"), sent);
    let lag = value("feishu_reply_stream_text_lag_seconds_sum") / sent;
    assert!(lag < 0.2, "mean lag {lag} s");
}

#[tokio::test(start_paused = true)]
async fn a_stream_longer_than_feishus_streaming_limit_shows_its_whole_text() {
    // Feishu closes streaming mode a while after it was turned on (here 3 s): the driver
    // turns it on again and goes on, 8 s of text shown whole.
    let opts = SimOptions {
        card_streaming_limit: Duration::from_secs(3),
        ..SimOptions::default()
    };
    let mut r = start_on(opts, "st-4", 30_000);
    let want = type_words(&r.parts, 160).await;
    r.parts.send(Part::Finish(None)).await.unwrap();
    let finished = r.done.await.unwrap().expect("finished");
    let card = r.sim.card(&finished.card_ids[0]).unwrap();
    assert_eq!(card.texts["answer"], want);
    assert!(!card.streaming);
    let reopened = r
        .sim
        .arrivals()
        .iter()
        .filter(|a| a.api == Api::CardSettings)
        .count();
    assert!(
        reopened >= 3,
        "turned on again at least twice, then closed: {reopened}"
    );
    assert!(r.events.recv().await.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_stream_renews_streaming_mode_before_feishus_limit_so_nothing_is_refused() {
    // The gateway knows the limit (`[streams] card_streaming_limit_s`, here 3 s): it turns
    // streaming mode off and on again a tenth before, so Feishu never closes it under a text.
    let opts = SimOptions {
        card_streaming_limit: Duration::from_secs(3),
        ..SimOptions::default()
    };
    let mut spec = spec("st-5", 30_000);
    spec.streaming_limit = Duration::from_secs(3);
    let r = start_with(opts, spec);
    let want = type_words(&r.parts, 160).await;
    // A pause longer than the limit with nothing to type: renewed all the same.
    tokio::time::sleep(Duration::from_secs(7)).await;
    r.parts.send(Part::Append("end".into())).await.unwrap();
    r.parts.send(Part::Finish(None)).await.unwrap();
    let finished = r.done.await.unwrap().expect("finished");
    let card = r.sim.card(&finished.card_ids[0]).unwrap();
    assert_eq!(card.texts["answer"], format!("{want}end"));
    assert!(!card.streaming);
    let arrivals = r.sim.arrivals();
    let refused: Vec<_> = arrivals.iter().filter(|a| a.code != 0).collect();
    assert!(refused.is_empty(), "{refused:?}");
    // 15 s of stream: renewed (off, on) at least four times, then closed.
    let settings = arrivals
        .iter()
        .filter(|a| a.api == Api::CardSettings)
        .count();
    assert!(settings >= 9, "{settings}");
}

#[tokio::test(start_paused = true)]
async fn a_caller_gone_mid_stream_leaves_the_text_so_far_in_a_closed_card() {
    let r = start("st-2", 30_000);
    for n in 0..10 {
        r.parts.send(Part::Append(format!("w{n} "))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The text so far counts in the caller's queue share (one job and its bytes) while the
    // stream holds it, and no longer once it ended.
    let (jobs, bytes) = r.scheduler.caller_queued(0).await.unwrap();
    assert!(jobs >= 1 && bytes >= 30, "{jobs} jobs, {bytes} bytes");
    let gone = Instant::now();
    drop(r.parts);
    let finished = r.done.await.unwrap().expect("closed");
    assert_eq!(r.scheduler.caller_queued(0).await, Some((0, 0)));
    assert!(
        gone.elapsed() <= Duration::from_secs(2),
        "{:?}",
        gone.elapsed()
    );
    let card = r.sim.card(&finished.card_ids[0]).unwrap();
    let want: String = (0..10).map(|n| format!("w{n} ")).collect();
    assert_eq!(card.texts["answer"], want);
    assert!(!card.streaming);
}

#[tokio::test(start_paused = true)]
async fn a_gateway_shutting_down_closes_its_streams_cards_with_the_text_so_far() {
    let r = start("st-6", 30_000);
    let before = type_words(&r.parts, 20).await;
    // SIGTERM: the scheduler takes no new typing, but each stream's end still goes in the
    // grace period: the card shows what came and is closed; the caller hears UNAVAILABLE.
    let s = r.scheduler.clone();
    let drain = tokio::spawn(async move { s.shutdown(Duration::from_secs(5)).await });
    let parts = r.parts.clone();
    let typing = tokio::spawn(async move {
        for n in 0..100 {
            if parts.send(Part::Append(format!("late{n} "))).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let e = r.done.await.unwrap().unwrap_err();
    assert!(
        matches!(e, StreamError::Gateway(GatewayError::ShuttingDown { .. })),
        "{e}"
    );
    typing.abort();
    drain.await.unwrap();
    let card = the_card(&r.sim);
    assert!(!card.streaming, "closed");
    assert!(
        card.texts["answer"].starts_with(&before),
        "the text typed before the shutdown is shown: {:?}",
        card.texts["answer"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_text_feishu_refuses_ends_the_stream_with_its_card_closed_on_the_text_so_far() {
    let r = start("st-7", 30_000);
    let before = type_words(&r.parts, 10).await;
    // The next text is refused for good (not a code worth retrying).
    r.sim.push_error(UpstreamError::Feishu {
        http: 400,
        code: 99992402,
        msg: "field validation failed".into(),
        log_id: String::new(),
        retry_after: None,
    });
    r.parts.send(Part::Append("more".into())).await.unwrap();
    let e = r.done.await.unwrap().unwrap_err();
    assert!(e.to_string().contains("99992402"), "{e}");
    let card = the_card(&r.sim);
    assert!(!card.streaming, "closed");
    assert_eq!(card.texts["answer"], format!("{before}more"));
}

#[tokio::test(start_paused = true)]
async fn a_text_past_its_cap_ends_the_stream_and_closes_the_card_with_what_fit() {
    let r = start("st-3", 100);
    r.parts.send(Part::Append("a".repeat(60))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.parts.send(Part::Append("b".repeat(60))).await.unwrap();
    let e = r.done.await.unwrap().unwrap_err();
    assert!(matches!(e, StreamError::TextTooLong { max: 100 }), "{e}");
    let card = the_card(&r.sim);
    assert_eq!(card.texts["answer"], "a".repeat(60));
    assert!(!card.streaming);
}

/// Runs `n` streams of one app at once on one scheduler, each in its own chat, each fed 20
/// appends a second for `secs` seconds then finished. Returns the simulated Feishu, each
/// stream's outcome, its expected text and when its `finish` was sent.
async fn many_streams(
    n: usize,
    secs: usize,
) -> (
    Arc<SimFeishu>,
    Instant,
    Vec<(stream::Finished, String, Instant)>,
) {
    let sim = Arc::new(SimFeishu::new(SimOptions::default()));
    let t0 = Instant::now();
    let config = SchedulerConfig::from_config(&Config::defaults());
    let metrics = Arc::new(Metrics::new());
    let s = Scheduler::start(config, sim.clone(), metrics.clone());
    let mut runs = Vec::new();
    for i in 0..n {
        let (parts, rx) = mpsc::channel(64);
        let (tx, _events) = mpsc::unbounded_channel();
        let mut spec = spec(&format!("many-{i}"), 30_000);
        spec.chat_id = format!("oc_many_{i}").into();
        spec.message_id = format!("om_q_many_{i}");
        let done = tokio::spawn(stream::run(s.clone(), spec, rx, tx, metrics.clone()));
        let feed = tokio::spawn(async move {
            let text = type_words(&parts, secs * 20).await;
            let finish = Instant::now();
            parts.send(Part::Finish(None)).await.unwrap();
            (text, finish)
        });
        runs.push((done, feed));
    }
    let mut out = Vec::new();
    for (done, feed) in runs {
        let (text, finish) = feed.await.unwrap();
        out.push((done.await.unwrap().expect("finished"), text, finish));
    }
    (sim, t0, out)
}

#[tokio::test(start_paused = true)]
async fn thirty_streams_of_one_app_share_its_windows_fairly_and_every_final_text_lands_fast() {
    let (sim, started, runs) = many_streams(30, 20).await;
    let rejected: Vec<_> = sim.arrivals().into_iter().filter(|a| a.code != 0).collect();
    assert!(rejected.is_empty(), "0 rejections: {rejected:?}");
    let mut finish_to_final = Vec::new();
    for (finished, want, finish) in &runs {
        let card_id = &finished.card_ids[0];
        let card = sim.card(card_id).expect("the card");
        assert_eq!(&card.texts["answer"], want, "the exact final text");
        assert!(!card.streaming, "streaming mode closed");
        let last = sim
            .arrivals()
            .iter()
            .filter(|a| a.chat_id == *card_id && a.api == Api::CardContent)
            .map(|a| started + a.at)
            .max()
            .unwrap();
        finish_to_final.push(last.saturating_duration_since(*finish).as_secs_f64());
    }
    let updates: Vec<f64> = runs.iter().map(|r| f64::from(r.0.updates_sent)).collect();
    let mean = updates.iter().sum::<f64>() / updates.len() as f64;
    let least = updates.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        least >= 0.5 * mean,
        "fair: least {least}, mean {mean}: {updates:?}"
    );
    finish_to_final.sort_by(f64::total_cmp);
    let p99 = finish_to_final[(finish_to_final.len() * 99).div_ceil(100) - 1];
    assert!(
        p99 <= 3.0,
        "finish to final text p99 {p99} s: {finish_to_final:?}"
    );
    eprintln!("updates per stream: mean {mean:.1}, least {least}; finish→final p99 {p99:.2} s");
}
