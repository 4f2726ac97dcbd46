//! `loadgen submit`: durable SubmitReply on the embedded store, or on Redis (`--redis URL`).
//! Jobs are held (the app quota allows one send an hour) so only storing is measured:
//! submits/s and latency at a few concurrency levels, bytes per stored job, and the time to
//! recover every job after a `kill -9` (a restart; in Redis, a takeover).

use std::time::{Duration, Instant};

use feishu_reply_gateway::proto::ReplyRequest;
use feishu_reply_gateway::proto::reply_gateway_client::ReplyGatewayClient;
use hdrhistogram::Histogram;
use tonic::transport::Channel;

/// Closed loop: `c` callers submit for `dur`; (latency µs, submits/s).
async fn closed(channel: &Channel, c: usize, dur: Duration, tag: &str) -> (Histogram<u64>, f64) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..c {
        let mut client = ReplyGatewayClient::new(channel.clone());
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).unwrap();
            let mut i = 0u64;
            while start.elapsed() < dur {
                let req = ReplyRequest {
                    message_id: format!("om_{tag}w{w}i{i}"),
                    chat_id: format!("oc_{tag}{}", i % 1000),
                    msg_type: "text".into(),
                    content: r#"{"text":"a durable reply of ordinary length, about a line"}"#
                        .into(),
                    ..ReplyRequest::default()
                };
                let t = Instant::now();
                client.submit_reply(req).await.expect("submit");
                h.record(t.elapsed().as_micros() as u64).unwrap();
                i += 1;
            }
            h
        }));
    }
    let mut all = Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        all.add(t.await.unwrap()).unwrap();
    }
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    (all, rate)
}

/// Runs the measurements through `channel`; `restart(jobs)` kills the gateway, recovers and
/// prints what it measured.
pub async fn run(
    title: &str,
    channel: Channel,
    levels: &[usize],
    seconds: u64,
    recover_jobs: usize,
    restart: impl AsyncFnOnce(usize),
) {
    println!("durable SubmitReply, {title}:");
    let mut total = 0usize;
    for &c in levels {
        let (h, rate) = closed(&channel, c, Duration::from_secs(seconds), &format!("c{c}")).await;
        total += h.len() as usize;
        println!(
            "  {c:>4} in flight: {rate:8.0} submits/s   p50 {:.2} ms   p99 {:.2} ms",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0
        );
    }
    // Fill up to `recover_jobs`, then restart and time it.
    while total < recover_jobs {
        let (h, _) = closed(
            &channel,
            64,
            Duration::from_secs(2),
            &format!("fill{total}"),
        )
        .await;
        total += h.len() as usize;
    }
    restart(total).await;
}
