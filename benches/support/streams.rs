//! `loadgen streams`: N streaming replies of one app at once (StreamReply's driver and the real
//! scheduler against the simulated Feishu, in virtual time), each fed 20 appends a second.
//! Prints the updates each stream got per second against what is physically possible (the
//! card's 10/s, or its share of the app's card_content window less the finals' headroom), the
//! time from `finish` to the final text shown, and Feishu's rejections.

use std::sync::Arc;
use std::time::Duration;

use feishu_reply_gateway::config::Config;
use feishu_reply_gateway::fake_feishu::sim::{SimFeishu, SimOptions};
use feishu_reply_gateway::feishu::Api;
use feishu_reply_gateway::metrics::Metrics;
use feishu_reply_gateway::scheduler::{Scheduler, SchedulerConfig};
use feishu_reply_gateway::stream::{self, Part, StreamSpec};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Appends per second each stream is fed (a model's pace).
const APPENDS_PER_SEC: u64 = 20;

/// Runs each count in `counts` for `seconds` of virtual time, Feishu `latency_ms` away.
pub fn run(counts: &[usize], seconds: u64, latency_ms: u64) {
    println!(
        "streams: each fed {APPENDS_PER_SEC} appends/s for {seconds} s; simulated Feishu {latency_ms} ms away (virtual time)"
    );
    println!(
        "  {:>7} | {:>22} | {:>10} | {:>26} | {:>8}",
        "streams", "updates/stream/s mean", "min", "finish->final p50/p99/max", "rejected"
    );
    for &n in counts {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        let wall = std::time::Instant::now();
        let r = rt.block_on(streams(n, seconds, latency_ms));
        let bound = physical_bound(n, seconds);
        println!(
            "  {:>7} | {:>10.2} ({:>4.0}% of {:>4.2}) | {:>10.2} | {:>8.2} / {:>5.2} / {:>5.2} s | {:>8}   ({:.1} s wall)",
            n,
            r.mean,
            100.0 * r.mean / bound,
            bound,
            r.min,
            r.finish[r.finish.len() / 2],
            r.finish[(r.finish.len() * 99).div_ceil(100) - 1],
            r.finish[r.finish.len() - 1],
            r.rejected,
            wall.elapsed().as_secs_f64()
        );
    }
}

/// Updates per second one of `n` streams can get at most over `seconds`: its card's 10/s, or
/// its share of what the app's card_content windows let typing send in that time (45 a
/// second, 900 a minute by default).
fn physical_bound(n: usize, seconds: u64) -> f64 {
    let config = Config::defaults();
    let headroom = 1.0 - f64::from(config.quotas.final_headroom_percent) / 100.0;
    let app = config
        .quotas
        .app
        .iter()
        .map(|q| {
            let windows = (seconds as f64 / q.window.as_secs_f64()).ceil();
            (f64::from(q.limit.get()) * headroom).floor() * windows / seconds as f64
        })
        .fold(f64::INFINITY, f64::min);
    let card = f64::from(config.quotas.card.limit.get()) / config.quotas.card.window.as_secs_f64();
    card.min(app / n as f64)
}

struct Result {
    mean: f64,
    min: f64,
    /// Seconds from `finish` to the final text's arrival, sorted.
    finish: Vec<f64>,
    rejected: usize,
}

async fn streams(n: usize, seconds: u64, latency_ms: u64) -> Result {
    let sim = Arc::new(SimFeishu::new(SimOptions {
        latency: Duration::from_millis(latency_ms),
        inbound_jitter: Duration::from_millis(latency_ms / 2),
        ..SimOptions::default()
    }));
    let t0 = Instant::now();
    let config = SchedulerConfig::from_config(&Config::defaults());
    let metrics = Arc::new(Metrics::new());
    let s = Scheduler::start(config, sim.clone(), metrics.clone());
    let mut runs = Vec::new();
    for i in 0..n {
        let (parts, rx) = mpsc::channel(64);
        let (events, _) = mpsc::unbounded_channel();
        let spec = StreamSpec {
            caller: 0,
            credential: "".into(),
            app: 0,
            app_name: "default".into(),
            app_id: "cli_bench".into(),
            chat_id: format!("oc_bench_{i}").into(),
            message_id: format!("om_bench_{i}"),
            reply_in_thread: false,
            uuid: format!("bench-{i}"),
            title: String::new(),
            max_text_bytes: 28_000,
            streaming_limit: Duration::from_secs(600),
            span: tracing::Span::none(),
        };
        let done = tokio::spawn(stream::run(s.clone(), spec, rx, events, metrics.clone()));
        let feed = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / APPENDS_PER_SEC));
            for w in 0..seconds * APPENDS_PER_SEC {
                tick.tick().await;
                parts.send(Part::Append(format!("w{w} "))).await.unwrap();
            }
            let finish = Instant::now();
            parts.send(Part::Finish(None)).await.unwrap();
            finish
        });
        runs.push((done, feed));
    }
    let (mut updates, mut finish) = (Vec::new(), Vec::new());
    let arrivals = |sim: &SimFeishu| sim.arrivals();
    let mut ends = Vec::new();
    for (done, feed) in runs {
        let at = feed.await.unwrap();
        let f = done.await.unwrap().expect("stream finished");
        updates.push(f64::from(f.updates_sent) / seconds as f64);
        ends.push((f.card_ids[0].clone(), at));
    }
    let all = arrivals(&sim);
    for (card, at) in ends {
        let last = all
            .iter()
            .filter(|a| a.chat_id == card && a.api == Api::CardContent)
            .map(|a| t0 + a.at)
            .max()
            .unwrap_or(at);
        finish.push(last.saturating_duration_since(at).as_secs_f64());
    }
    finish.sort_by(f64::total_cmp);
    Result {
        mean: updates.iter().sum::<f64>() / n as f64,
        min: updates.iter().copied().fold(f64::INFINITY, f64::min),
        finish,
        rejected: all.iter().filter(|a| a.code != 0).count(),
    }
}
