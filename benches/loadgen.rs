//! Load generator: drives a real gateway process over gRPC (the project's own tonic client)
//! in front of a real `fake-feishu` process, and prints throughput and latency percentiles
//! (hdrhistogram). Each scenario is one command:
//!
//! ```text
//! cargo bench --bench loadgen -- burst       # 1000 replies to 1000 chats: drain vs physical limit
//!     [--cold-connection-ms 80] [--inbound-jitter-ms 50] [--replicas 3 --redis URL] [--runs 10]
//! cargo bench --bench loadgen -- hot         # 50 chats x 40 replies + background: order, drain
//! cargo bench --bench loadgen -- overhead    # quotas not binding: gateway vs direct HTTP, max replies/s
//!     [--log info] [--otlp]                  # … with the gateway's spans made / exported
//! cargo bench --bench loadgen -- depth       # 100k queued jobs over 10k chats: cost and memory
//! cargo bench --bench loadgen -- streams     # 1, 10, 50 streams of one app: updates/s, finish latency
//! cargo bench --bench loadgen -- cluster-share   # 200 apps over 3 and 6 Redis Cluster masters: busiest master's share
//!     [--peers]                              # … with calls forwarded to their chat's owner
//! cargo bench --bench loadgen -- memory      # memory attacks on the default limits: peak RSS
//! cargo bench --bench loadgen -- submit      # durable SubmitReply: submits/s, latency, bytes/job, recovery
//!     [--redis URL]                          # … with the jobs in Redis (recovery = a takeover)
//! cargo bench --bench loadgen -- drive --gateway http://HOST:50051 --rate 40 --seconds 60
//!                                             # any running gateway: target rate or concurrency
//! ```
//! `-- <scenario> --help` lists the knobs. Processes are the release binary
//! (`feishu-reply-gateway serve` / `fake-feishu`) on loopback ports; `drive` without
//! `--gateway` starts its own pair with quotas that never bind.

use std::collections::HashMap;
use std::net::TcpListener;
use std::num::NonZeroU32;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use feishu_reply_gateway::config::Config;
use feishu_reply_gateway::feishu::{
    AppIndex, BoxFuture, Call, SendRequest, SentMessage, Upstream, UpstreamError,
};
use feishu_reply_gateway::metrics::Metrics;
use feishu_reply_gateway::proto::reply_gateway_client::ReplyGatewayClient;
use feishu_reply_gateway::proto::{ReplyRequest, SendRequest as SendProto};
use feishu_reply_gateway::quota::{Micros, QuotaKey, QuotaSpec, QuotaTable};
use feishu_reply_gateway::scheduler::{JobSpec, Lane, Scheduler, SchedulerConfig, Target};
use hdrhistogram::Histogram;
use tonic::transport::Channel;

#[path = "support/cluster_share.rs"]
mod cluster_share;
#[path = "support/counting_alloc.rs"]
mod counting_alloc;
#[path = "support/memory.rs"]
mod memory;
#[path = "support/streams.rs"]
mod streams;
#[path = "support/submit.rs"]
mod submit;
use counting_alloc::allocated;

const BIN: &str = env!("CARGO_BIN_EXE_feishu-reply-gateway");

#[derive(Parser)]
#[command(about = "feishu-reply-gateway load generator")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// cargo bench passes --bench; accepted and ignored.
    #[arg(long, global = true, hide = true)]
    bench: bool,
}

#[derive(clap::Args)]
struct BurstOpts {
    #[arg(long, default_value_t = 1000)]
    replies: usize,
    /// Sends (to other distinct chats) with the replies, interleaved: each API has its own app
    /// windows, so the drain's limit is the larger family's.
    #[arg(long, default_value_t = 0)]
    sends: usize,
    /// The fake delays the first request on each new connection (a TLS handshake).
    #[arg(long, default_value_t = 0)]
    cold_connection_ms: u64,
    /// The fake delays every request by a random 0..N ms before counting it.
    #[arg(long, default_value_t = 0)]
    inbound_jitter_ms: u64,
    /// Gateway processes; with more than one, pass --redis so they share the quotas.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Redis URL for cluster mode (e.g. redis://127.0.0.1:6379).
    #[arg(long)]
    redis: Option<String>,
    /// Repeat the burst on fresh processes.
    #[arg(long, default_value_t = 1)]
    runs: usize,
}

#[derive(Subcommand)]
enum Scenario {
    /// N replies to N distinct chats at once (fake in sliding mode).
    Burst(BurstOpts),
    /// Hot chats (each many replies, order checked) plus background chats.
    Hot {
        #[arg(long, default_value_t = 50)]
        chats: usize,
        #[arg(long, default_value_t = 40)]
        per_chat: usize,
        #[arg(long, default_value_t = 200)]
        background: usize,
        /// Submit each hot chat's replies 1 ms apart without waiting (order then depends on
        /// which call the gateway accepts first) instead of one after the other.
        #[arg(long)]
        pipelined: bool,
        /// Gateway processes; with more than one, pass --redis so they share the quotas. The
        /// background goes round-robin to them; each hot chat to one (as a ring hash routes).
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        /// Redis URL for cluster mode.
        #[arg(long)]
        redis: Option<String>,
    },
    /// Quotas not binding: latency added by the gateway and maximum sustained replies/s.
    Overhead {
        /// Concurrency levels to run (closed loop).
        #[arg(long, value_delimiter = ',', default_value = "1,32,256")]
        concurrency: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// The gateway's RUST_LOG (`info`, the default in production, makes its spans).
        #[arg(long, default_value = "warn")]
        log: String,
        /// Export the gateway's traces (every call sampled) to an OTLP collector in this
        /// process, and count the spans it receives.
        #[arg(long)]
        otlp: bool,
    },
    /// Drive a gateway at a target rate (open loop) or a fixed concurrency (closed loop).
    ///
    /// With `--gateway` it drives that running gateway (which should be on the fake Feishu:
    /// against real Feishu every reply is posted); without, it starts its own gateway and fake
    /// with quotas that never bind.
    Drive {
        /// gRPC address of a running gateway, e.g. http://127.0.0.1:50051.
        #[arg(long)]
        gateway: Option<String>,
        /// Replies per second, sent on schedule whether or not earlier ones returned; latency is
        /// measured from each reply's scheduled instant (no coordinated omission).
        #[arg(long, conflicts_with = "concurrency")]
        rate: Option<f64>,
        /// Calls kept in flight (closed loop); the default when no --rate is given.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Distinct chats the replies are spread over (round robin).
        #[arg(long, default_value_t = 1000)]
        chats: usize,
        /// Configured app name sent in each request ("" = the gateway's default app).
        #[arg(long, default_value = "")]
        app: String,
        /// `x-caller` metadata (the gateway's admission limit is per caller).
        #[arg(long, default_value = "loadgen")]
        caller: String,
    },
    /// Memory attacks (queue flood, half-sent requests, distinct x-caller values) on a gateway
    /// with the default limits; prints its RSS and peak RSS after each.
    Memory {
        #[arg(long, default_value_t = 3000)]
        floods: usize,
        #[arg(long, default_value_t = 20)]
        connections: usize,
        #[arg(long, default_value_t = 200_000)]
        callers: usize,
    },
    /// Durable SubmitReply on the embedded store: submits/s and latency, bytes per job, and
    /// the restart time with the stored jobs to recover.
    Submit {
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        concurrency: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Jobs stored before the restart is timed.
        #[arg(long, default_value_t = 100_000)]
        recover: usize,
        /// Store the jobs in this Redis (cluster mode) instead of the embedded store.
        #[arg(long)]
        redis: Option<String>,
    },
    /// How the gateway's Redis calls spread over a Redis Cluster's masters (INFO
    /// commandstats of each): calls per send, the busiest master's share.
    ClusterShare {
        #[arg(long, value_delimiter = ',', default_value = "3,6")]
        masters: Vec<usize>,
        #[arg(long, default_value_t = 200)]
        apps: usize,
        #[arg(long, default_value_t = 10)]
        per_app: usize,
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// The replicas forward each call to the owner of its chat's partition
        /// (`[cluster] peer_listen`).
        #[arg(long)]
        peers: bool,
        /// Async jobs (SubmitReply) instead of replies: the job store's calls count too.
        #[arg(long)]
        jobs: bool,
    },
    /// Streaming replies of one app at once (virtual time, simulated Feishu): updates per
    /// stream per second and finish latency at each stream count.
    Streams {
        #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
        counts: Vec<usize>,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// One-way latency to the simulated Feishu (plus up to half of it of jitter).
        #[arg(long, default_value_t = 30)]
        latency_ms: u64,
    },
    /// The scheduler with a no-op upstream: enqueue/dispatch cost and memory at depth.
    Depth {
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
        #[arg(long, default_value_t = 10_000)]
        chats: usize,
    },
}

fn main() {
    let cli = Cli::parse();
    // Virtual time: a paused runtime of its own per run.
    if let Scenario::Streams {
        counts,
        seconds,
        latency_ms,
    } = &cli.scenario
    {
        return streams::run(counts, *seconds, *latency_ms);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "machine: {} cores; {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        chrono_like_now()
    );
    rt.block_on(async {
        match cli.scenario {
            Scenario::Burst(o) => burst(o).await,
            Scenario::Hot {
                chats,
                per_chat,
                background,
                pipelined,
                replicas,
                redis,
            } => hot(chats, per_chat, background, pipelined, replicas, redis).await,
            Scenario::Overhead {
                concurrency,
                seconds,
                log,
                otlp,
            } => {
                let sink = otlp.then(otlp_sink::start);
                {
                    let mut env = GATEWAY_ENV.lock().unwrap();
                    env.push(("RUST_LOG".into(), log));
                    if let Some((endpoint, _)) = &sink {
                        env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone()));
                        env.push(("OTEL_TRACES_SAMPLER".into(), "always_on".into()));
                    }
                }
                overhead(&concurrency, Duration::from_secs(seconds)).await;
                if let Some((_, spans)) = sink {
                    println!(
                        "OTLP collector received {} spans",
                        spans.load(Ordering::Relaxed)
                    );
                }
            }
            Scenario::Depth { jobs, chats } => depth(jobs, chats).await,
            Scenario::Streams { .. } => unreachable!("run before the runtime"),
            Scenario::ClusterShare {
                masters,
                apps,
                per_app,
                replicas,
                peers,
                jobs,
            } => cluster_share::run(&masters, apps, per_app, replicas, peers, jobs).await,
            Scenario::Submit {
                concurrency,
                seconds,
                recover,
                redis: Some(url),
            } => submit_redis(&url, &concurrency, seconds, recover).await,
            Scenario::Submit {
                concurrency,
                seconds,
                recover,
                redis: None,
            } => {
                let data =
                    std::env::temp_dir().join(format!("loadgen-jobs-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&data);
                let extra = format!(
                    "[jobs]\ndata_dir = \"{}\"\nmax_jobs = 10000000\n{HELD}",
                    data.display()
                );
                let mut s = stack(&[], &extra).await;
                let port = s.grpc_ports[0];
                let channel = s.grpc.clone();
                let restart = async |jobs: usize| {
                    let bytes = std::fs::metadata(data.join("jobs.redb")).map_or(0, |m| m.len());
                    println!(
                        "  store: {jobs} jobs, {} bytes on disk = {:.0} bytes per job",
                        bytes,
                        bytes as f64 / jobs as f64
                    );
                    let t = s.restart_first();
                    // Serving = answering a call (the port is bound before recovery).
                    wait_job_api(port).await;
                    println!(
                        "  restart with {jobs} stored jobs to recover: serving after {:.2} s",
                        t.elapsed().as_secs_f64()
                    );
                };
                submit::run(
                    "embedded store (redb, group commit)",
                    channel,
                    &concurrency,
                    seconds,
                    recover,
                    restart,
                )
                .await;
                let _ = std::fs::remove_dir_all(&data);
            }
            Scenario::Memory {
                floods,
                connections,
                callers,
            } => {
                let s = stack(&[], "").await;
                let (pid, port) = (s._gateways[0].0.id(), s.grpc_ports[0]);
                memory::attacks(s.grpc.clone(), port, pid, floods, connections, callers).await;
            }
            Scenario::Drive {
                gateway,
                rate,
                concurrency,
                seconds,
                chats,
                app,
                caller,
            } => {
                let load = match rate {
                    Some(r) if r > 0.0 && r.is_finite() => Load::Rate(r),
                    Some(r) => panic!("--rate must be a positive number, got {r}"),
                    None => Load::Concurrency(concurrency.max(1)),
                };
                let target = DriveTarget {
                    chats: chats.max(1),
                    app,
                    caller,
                };
                drive(gateway, load, Duration::from_secs(seconds), target).await
            }
        }
    });
}

fn chrono_like_now() -> String {
    let out = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

// === processes ===

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "port {port} never opened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process stopped with SIGTERM on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
    }
}

struct Stack {
    fake_port: u16,
    /// The first gateway's channel.
    grpc: Channel,
    /// Every gateway: (channel, metrics port).
    gateways: Vec<(Channel, u16)>,
    /// Every gateway's gRPC port.
    grpc_ports: Vec<u16>,
    http: reqwest::Client,
    _fake: Proc,
    _gateways: Vec<Proc>,
}

/// Starts `fake-feishu` (with `fake_args`) and `serve` with `config_extra` appended.
async fn stack(fake_args: &[&str], config_extra: &str) -> Stack {
    stack_n(fake_args, config_extra, 1).await
}

/// Environment every gateway process of a stack gets (the `overhead` scenario's `--log` and
/// `--otlp`): set before the stack starts.
static GATEWAY_ENV: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

/// Starts `fake-feishu` and `n` gateway processes (each with `config_extra`; give them a
/// `[cluster]` section to share quotas).
async fn stack_n(fake_args: &[&str], config_extra: &str, n: usize) -> Stack {
    let fake_port = free_port();
    let fake = Proc(
        Command::new(BIN)
            .args(["fake-feishu", "--addr", &format!("127.0.0.1:{fake_port}")])
            .args(fake_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start fake-feishu"),
    );
    wait_port(fake_port);
    let dir = std::env::temp_dir().join(format!("loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mut gateways, mut procs, mut grpc_ports) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n.max(1) {
        let (grpc_port, metrics_port) = (free_port(), free_port());
        let config = dir.join(format!("gateway{i}.toml"));
        // A port of its own where the extra config asks for one.
        let config_extra = config_extra.replace("{peer_port}", &free_port().to_string());
        std::fs::write(
            &config,
            format!(
                "[server]\ngrpc_addr = \"127.0.0.1:{grpc_port}\"\nmetrics_addr = \"127.0.0.1:{metrics_port}\"\n\
                 [feishu]\nbase_url = \"http://127.0.0.1:{fake_port}\"\n\
                 [apps.default]\napp_id = \"cli_bench\"\napp_secret = \"secret\"\n\
                 [admission]\nper_caller_rps = 1000000\nper_caller_burst = 1000000\n\
                 [auth]\nallow_anonymous = true\n{config_extra}\n"
            ),
        )
        .unwrap();
        procs.push(Proc(
            Command::new(BIN)
                .args(["serve", "--config"])
                .arg(&config)
                .env("RUST_LOG", "warn")
                .env_remove("FEISHU_APP_ID")
                .env_remove("FEISHU_APP_SECRET")
                .env_remove("GATEWAY_REDIS_URL")
                .env_remove("GATEWAY_ALLOW_ANONYMOUS")
                .envs(GATEWAY_ENV.lock().unwrap().clone())
                .stdout(Stdio::null())
                .spawn()
                .expect("start gateway"),
        ));
        wait_port(grpc_port);
        let grpc = Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))
            .unwrap()
            .connect()
            .await
            .expect("connect gateway");
        gateways.push((grpc, metrics_port));
        grpc_ports.push(grpc_port);
    }
    Stack {
        fake_port,
        grpc: gateways[0].0.clone(),
        gateways,
        grpc_ports,
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .build()
            .unwrap(),
        _fake: fake,
        _gateways: procs,
    }
}

impl Stack {
    /// Kills the first gateway (SIGKILL) and starts it again with its config; when it started.
    fn restart_first(&mut self) -> Instant {
        let _ = self._gateways[0].0.kill();
        let _ = self._gateways[0].0.wait();
        let config = std::env::temp_dir()
            .join(format!("loadgen-{}", std::process::id()))
            .join("gateway0.toml");
        let t = Instant::now();
        let new = Proc(
            Command::new(BIN)
                .args(["serve", "--config"])
                .arg(&config)
                .env("RUST_LOG", "warn")
                .env_remove("GATEWAY_REDIS_URL")
                .stdout(Stdio::null())
                .spawn()
                .expect("restart gateway"),
        );
        // The old one is gone: nothing left for its Drop to stop.
        std::mem::forget(std::mem::replace(&mut self._gateways[0], new));
        t
    }

    /// Sum over every gateway of one metric series (0 when absent). A series ending in `{`
    /// sums every label set of its metric.
    async fn gateway_metric(&self, series: &str) -> f64 {
        let mut sum = 0.0;
        for (_, port) in &self.gateways {
            let text = self
                .http
                .get(format!("http://127.0.0.1:{port}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            sum += text
                .lines()
                .filter_map(|l| {
                    let rest = l.strip_prefix(series)?;
                    // The series itself, not a longer name sharing its start (a prefix
                    // ending in `{` or `,` takes every series with those first labels).
                    (series.ends_with(['{', ',']) || rest.starts_with(' ')).then_some(())?;
                    rest.rsplit(' ').next()?.parse::<f64>().ok()
                })
                .sum::<f64>();
        }
        sum
    }

    async fn fake_json(&self, path: &str) -> serde_json::Value {
        self.http
            .get(format!("http://127.0.0.1:{}{path}", self.fake_port))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn text(message_id: &str, chat_id: &str) -> ReplyRequest {
    ReplyRequest {
        message_id: message_id.into(),
        chat_id: chat_id.into(),
        msg_type: "text".into(),
        content: r#"{"text":"load"}"#.into(),
        ..Default::default()
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).unwrap()
}

fn print_latency(label: &str, h: &Histogram<u64>) {
    let us = |v: u64| v as f64 / 1000.0;
    println!(
        "{label}: n={} p50={:.3} ms p90={:.3} ms p99={:.3} ms max={:.3} ms",
        h.len(),
        us(h.value_at_quantile(0.5)),
        us(h.value_at_quantile(0.9)),
        us(h.value_at_quantile(0.99)),
        us(h.max())
    );
}

/// Drain time of an ideal sender (zero latency, no margin) under Feishu's default quotas
/// for replies to the given chats, all available at t=0: the physical limit. The ideal sender
/// serves the chats with the most replies first (each up to its own 5/s): the deepest chat is
/// the critical path, and serving it last (in arrival order) would add its own drain time to
/// the app's instead of overlapping them.
fn physical_limit(chats: &[usize]) -> Duration {
    let mut depth: HashMap<usize, usize> = HashMap::new();
    for c in chats {
        *depth.entry(*c).or_default() += 1;
    }
    let mut chats = chats.to_vec();
    // Stable: equal depths keep their order.
    chats.sort_by_key(|c| std::cmp::Reverse(depth[c]));
    let spec = |n, ms| QuotaSpec::new(NonZeroU32::new(n).unwrap(), Duration::from_millis(ms));
    let mut t = QuotaTable::new(
        vec![spec(5, 1000), spec(50, 1000), spec(1000, 60_000)],
        Duration::ZERO,
        Duration::from_secs(10),
    );
    let t0: Micros = 24 * 3600 * 1_000_000;
    let mut pending: Vec<Vec<QuotaKey>> = chats
        .iter()
        .map(|c| {
            vec![
                QuotaKey::new(0, format!("c{c}")),
                QuotaKey::new(1, "app"),
                QuotaKey::new(2, "app"),
            ]
        })
        .collect();
    let mut now = t0;
    let mut last = t0;
    while !pending.is_empty() {
        let mut next = Micros::MAX;
        pending.retain(|keys| match t.try_acquire(keys, now) {
            Ok(()) => {
                // Zero latency: answered the instant it left.
                t.settle(keys, now, now);
                last = now;
                false
            }
            Err(ready) => {
                next = next.min(ready);
                true
            }
        });
        now = next;
    }
    Duration::from_micros(last - t0)
}

// === scenarios ===

async fn burst(o: BurstOpts) {
    let (replies, sends) = (o.replies, o.sends);
    let mut fake_args = vec!["--window".to_owned(), "sliding".to_owned()];
    fake_args.push(format!("--cold-connection-ms={}", o.cold_connection_ms));
    fake_args.push(format!("--inbound-jitter-ms={}", o.inbound_jitter_ms));
    let fake_args: Vec<&str> = fake_args.iter().map(String::as_str).collect();
    let limit = physical_limit(&(0..replies.max(sends)).collect::<Vec<_>>());
    println!(
        "burst: {replies} replies and {sends} sends to {} chats, {} gateway process(es){}, fake: first request per connection +{} ms, inbound jitter 0-{} ms",
        replies + sends,
        o.replicas,
        if o.redis.is_some() {
            " sharing one Redis"
        } else {
            ""
        },
        o.cold_connection_ms,
        o.inbound_jitter_ms
    );
    for run in 1..=o.runs.max(1) {
        let extra = match &o.redis {
            Some(url) => format!(
                "[cluster]\nredis_url = \"{url}\"\nkey_prefix = \"bench-{}-{run}\"\nreplicas = {}\n",
                std::process::id(),
                o.replicas
            ),
            None => String::new(),
        };
        let s = stack_n(&fake_args, &extra, o.replicas).await;
        // One warm-up-free burst: each gateway fetches its token on its first send.
        let mut h = hist();
        let start = Instant::now();
        // Replies and sends interleaved (reply i, send i, …).
        let mut order: Vec<(bool, usize)> = Vec::new();
        for i in 0..replies.max(sends) {
            if i < replies {
                order.push((false, i));
            }
            if i < sends {
                order.push((true, i));
            }
        }
        let calls: Vec<_> = order
            .into_iter()
            .enumerate()
            .map(|(n, (send, i))| {
                let mut c = ReplyGatewayClient::new(s.gateways[n % s.gateways.len()].0.clone());
                tokio::spawn(async move {
                    let t = Instant::now();
                    let ok = if send {
                        c.send(SendProto {
                            receive_id_type: "chat_id".into(),
                            receive_id: format!("oc_send{i}"),
                            msg_type: "text".into(),
                            content: r#"{"text":"x"}"#.into(),
                            ..Default::default()
                        })
                        .await
                        .is_ok()
                    } else {
                        c.reply(text(&format!("om_burst{i}"), &format!("oc_burst{i}")))
                            .await
                            .is_ok()
                    };
                    (ok, t.elapsed())
                })
            })
            .collect();
        let mut failed = 0;
        for c in calls {
            let (ok, d) = c.await.unwrap();
            failed += usize::from(!ok);
            h.record(d.as_micros() as u64).unwrap();
        }
        let drain = start.elapsed();
        let stats = s.fake_json("/_fake/stats").await;
        let posted = stats["posted"].as_f64().unwrap_or(0.0).max(1.0);
        let redis = if o.redis.is_some() {
            let calls =
                |op: &str| format!("feishu_reply_redis_calls_total{{op=\"{op}\",outcome=\"ok\"}}");
            let (decide, settle) = (
                s.gateway_metric(&calls("decide")).await,
                s.gateway_metric(&calls("settle")).await,
            );
            format!(
                "; Redis calls per send: {:.2} decide + {:.2} settle",
                decide / posted,
                settle / posted
            )
        } else {
            String::new()
        };
        println!(
            "run {run}: drained in {:.2} s; physical limit {:.2} s; ratio {:.3}; failed calls {failed}; upstream rate rejections {}{redis}",
            drain.as_secs_f64(),
            limit.as_secs_f64(),
            drain.as_secs_f64() / limit.as_secs_f64(),
            stats["rejected_chat_user"].as_u64().unwrap_or(0)
                + stats["rejected_app"].as_u64().unwrap_or(0)
        );
        if run == 1 {
            print_latency("burst call latency", &h);
        }
    }
}

async fn hot(
    chats: usize,
    per_chat: usize,
    background: usize,
    pipelined: bool,
    replicas: usize,
    redis: Option<String>,
) {
    let extra = match &redis {
        Some(url) => format!(
            "[cluster]\nredis_url = \"{url}\"\nkey_prefix = \"bench-hot-{}\"\nreplicas = {replicas}\n",
            std::process::id()
        ),
        None => String::new(),
    };
    let s = stack_n(&["--window", "sliding"], &extra, replicas).await;
    let start = Instant::now();
    let mut calls = Vec::new();
    // Background: distinct chats, all at once.
    for i in 0..background {
        let mut c = ReplyGatewayClient::new(s.gateways[i % s.gateways.len()].0.clone());
        calls.push(tokio::spawn(async move {
            c.reply(text(&format!("om_bg{i}"), &format!("oc_bg{i}")))
                .await
                .is_ok()
        }));
    }
    // Hot chats: one task per chat. Unary calls in flight together have no defined order
    // (the gateway's order is the order it accepts them), so by default each chat's caller
    // sends its next reply when the previous returns; the chat quota (5/s) is binding either
    // way, so this costs no throughput.
    // The hot chats have a connection of their own: on the background's, their calls would
    // wait behind its streams (the gateway caps streams per connection) and reach the gateway
    // only as the background drains.
    let mut hot_channels = Vec::new();
    for port in &s.grpc_ports {
        let ch = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .expect("connect");
        hot_channels.push(ch);
    }
    for chat in 0..chats {
        let grpc = hot_channels[chat % hot_channels.len()].clone();
        calls.push(tokio::spawn(async move {
            let mut inner = Vec::new();
            let mut ok = true;
            for k in 0..per_chat {
                let mut c = ReplyGatewayClient::new(grpc.clone());
                let req = text(
                    &format!("om_h{chat}x{k}_in_hot{chat}"),
                    &format!("oc_hot{chat}"),
                );
                if pipelined {
                    inner.push(tokio::spawn(async move { c.reply(req).await.is_ok() }));
                    tokio::time::sleep(Duration::from_millis(1)).await;
                } else {
                    ok &= c.reply(req).await.is_ok();
                }
            }
            for i in inner {
                ok &= i.await.unwrap();
            }
            ok
        }));
    }
    let mut all_ok = true;
    for c in calls {
        all_ok &= c.await.unwrap();
    }
    let drain = start.elapsed();
    let received = s.fake_json("/_fake/received").await;
    let stats = s.fake_json("/_fake/stats").await;
    // Per hot chat: the posted sequence numbers must increase.
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut out_of_order = 0;
    for r in received.as_array().unwrap() {
        if r["code"].as_i64() != Some(0) {
            continue;
        }
        let id = r["message_id"].as_str().unwrap();
        if let Some(rest) = id.strip_prefix("om_h") {
            let (chat, seq) = rest.split_once('x').unwrap();
            let seq: i64 = seq.split('_').next().unwrap().parse().unwrap();
            let prev = last.insert(chat.to_owned(), seq).unwrap_or(-1);
            out_of_order += usize::from(seq < prev);
        }
    }
    let mut chat_list: Vec<usize> = (0..background).map(|i| 1_000_000 + i).collect();
    for c in 0..chats {
        chat_list.extend(std::iter::repeat_n(c, per_chat));
    }
    let limit = physical_limit(&chat_list);
    println!(
        "hot: {chats} chats x {per_chat} + {background} background = {} replies drained in {:.2} s; physical limit {:.2} s; ratio {:.3}; all ok {all_ok}; out-of-order {out_of_order}; upstream rate rejections {}",
        chats * per_chat + background,
        drain.as_secs_f64(),
        limit.as_secs_f64(),
        drain.as_secs_f64() / limit.as_secs_f64(),
        stats["rejected_chat_user"].as_u64().unwrap_or(0)
            + stats["rejected_app"].as_u64().unwrap_or(0)
    );
}

/// Quotas that never bind (1 ms windows keep rings small).
/// Jobs held in their queues (one send an hour per app) and room for millions: only storing
/// them is measured.
const HELD: &str = "[quotas]\napp = [{ limit = 1, window_ms = 3600000 }]\n\
                    [queue]\nmax_per_chat = 10000000\nmax_total = 10000000\nmax_total_bytes = 4000000000\n";

/// Waits until the gateway on `port` answers the job API (it is bound before it recovers).
async fn wait_job_api(port: u16) {
    loop {
        if let Ok(ch) = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
        {
            let r = ReplyGatewayClient::new(ch)
                .get_reply(feishu_reply_gateway::proto::GetReplyRequest {
                    job_id: "j0000000000000000".into(),
                })
                .await;
            if matches!(&r, Err(st) if st.code() == tonic::Code::NotFound) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `loadgen submit --redis URL`: jobs in Redis; bytes per job from Redis `used_memory`; the
/// recovery is a takeover: the only gateway is killed and a new one (a new replica) takes its
/// jobs once their lease ends.
async fn submit_redis(url: &str, levels: &[usize], seconds: u64, recover: usize) {
    const LEASE_MS: u64 = 1000;
    let prefix = format!("bench-jobs-{}", std::process::id());
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let used_memory = async |conn: &mut redis::aio::MultiplexedConnection| -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(conn)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok())
            .unwrap_or(0)
    };
    let before = used_memory(&mut conn).await;
    let extra = format!(
        "[cluster]\nredis_url = \"{url}\"\nkey_prefix = \"{prefix}\"\njob_lease_ms = {LEASE_MS}\n\
         redis_timeout_ms = 250\n[jobs]\nmax_jobs = 10000000\n{HELD}"
    );
    let mut s = stack(&[], &extra).await;
    let (port, metrics_port) = (s.grpc_ports[0], s.gateways[0].1);
    let channel = s.grpc.clone();
    let restart = async |jobs: usize| {
        let after = used_memory(&mut conn).await;
        println!(
            "  store: {jobs} jobs, Redis used_memory +{} bytes = {:.0} bytes per job",
            after.saturating_sub(before),
            after.saturating_sub(before) as f64 / jobs as f64
        );
        // Taken over = every open job is queued in the new process.
        let running = "feishu_reply_jobs_running ";
        let held: usize = redis::cmd("ZCARD")
            .arg(format!("{{{prefix}:jobs}}:open"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let t = s.restart_first();
        wait_job_api(port).await;
        let serving = t.elapsed();
        loop {
            let text = match s
                .http
                .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
                .send()
                .await
            {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            let n = text
                .lines()
                .find_map(|l| l.strip_prefix(running)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            if n as usize >= held {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "  kill -9 with {held} jobs queued, new replica: serving after {:.2} s; every job taken over and queued after {:.2} s (lease {LEASE_MS} ms)",
            serving.as_secs_f64(),
            t.elapsed().as_secs_f64()
        );
    };
    submit::run(
        "Redis (cluster mode)",
        channel,
        levels,
        seconds,
        recover,
        restart,
    )
    .await;
    drop(s);
    // Leave the shared Redis as it was.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{prefix}:jobs}}*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    for chunk in keys.chunks(1000) {
        let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
    }
}

const UNBOUND: &str = "[quotas]\nchat = { limit = 1000, window_ms = 1 }\nuser = { limit = 1000, window_ms = 1 }\napp = [{ limit = 100000, window_ms = 1 }]\nsafety_margin_ms = 0\n[queue]\nmax_per_chat = 100000\nmax_total = 1000000\n";

async fn overhead(levels: &[usize], seconds: Duration) {
    let s = stack(&["--unlimited"], UNBOUND).await;
    // Direct: our own token, POST straight to the fake (what the gateway does, minus itself).
    let token: serde_json::Value = s
        .http
        .post(format!(
            "http://127.0.0.1:{}/open-apis/auth/v3/tenant_access_token/internal",
            s.fake_port
        ))
        .json(&serde_json::json!({"app_id": "cli_direct", "app_secret": "x"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = Arc::new(token["tenant_access_token"].as_str().unwrap().to_owned());
    for &c in levels {
        let direct = closed_loop(c, seconds, {
            let (http, port, token) = (s.http.clone(), s.fake_port, token.clone());
            move |i| {
                let (http, token) = (http.clone(), token.clone());
                async move {
                    let body = serde_json::json!({"content": "{\"text\":\"load\"}", "msg_type": "text", "uuid": format!("d{i}")});
                    http.post(format!("http://127.0.0.1:{port}/open-apis/im/v1/messages/om_d{}/reply", i % 1000))
                        .bearer_auth(&*token)
                        .json(&body)
                        .send()
                        .await
                        .ok()
                        .filter(|r| r.status().is_success())
                        .map(drop)
                        .ok_or(())
                }
            }
        })
        .await;
        let via = closed_loop(c, seconds, {
            let grpc = s.grpc.clone();
            move |i| {
                let mut client = ReplyGatewayClient::new(grpc.clone());
                async move {
                    client
                        .reply(text(
                            &format!("om_g{}", i % 1000),
                            &format!("oc_g{}", i % 1000),
                        ))
                        .await
                        .map(drop)
                }
            }
        })
        .await;
        println!("-- concurrency {c}, {} s each --", seconds.as_secs());
        println!(
            "direct to fake : {:.0} replies/s, errors {}",
            direct.1,
            direct.2.len()
        );
        print_latency("direct to fake ", &direct.0);
        println!(
            "through gateway: {:.0} replies/s, errors {}",
            via.1,
            via.2.len()
        );
        print_latency("through gateway", &via.0);
        let q = |h: &Histogram<u64>, p| h.value_at_quantile(p) as f64 / 1000.0;
        println!(
            "added by gateway: p50 {:+.3} ms, p99 {:+.3} ms; throughput ratio gateway/direct {:.2}",
            q(&via.0, 0.5) - q(&direct.0, 0.5),
            q(&via.0, 0.99) - q(&direct.0, 0.99),
            via.1 / direct.1
        );
    }
}

/// `c` workers each looping `call(i)` for `dur`: (latency histogram, calls/s, errors).
async fn closed_loop<F, Fut, E>(c: usize, dur: Duration, call: F) -> (Histogram<u64>, f64, Vec<E>)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send,
    E: Send + 'static,
{
    let counter = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..c)
        .map(|_| {
            let (call, counter) = (call.clone(), counter.clone());
            tokio::spawn(async move {
                let mut h = hist();
                let mut errors = Vec::new();
                while start.elapsed() < dur {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    let r = call(i).await;
                    h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
                    errors.extend(r.err());
                }
                (h, errors)
            })
        })
        .collect();
    let mut all = hist();
    let mut errors = Vec::new();
    for w in workers {
        let (h, e) = w.await.unwrap();
        all.add(h).unwrap();
        errors.extend(e);
    }
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    (all, rate, errors)
}

enum Load {
    Rate(f64),
    Concurrency(usize),
}

struct DriveTarget {
    chats: usize,
    app: String,
    caller: String,
}

async fn drive(gateway: Option<String>, load: Load, dur: Duration, target: DriveTarget) {
    // Keeps a self-started stack alive for the run.
    let (channel, _stack) = match gateway {
        Some(url) => {
            let channel = Channel::from_shared(url.clone())
                .unwrap_or_else(|e| panic!("--gateway {url}: {e}"))
                .connect()
                .await
                .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
            println!("driving {url}");
            (channel, None)
        }
        None => {
            let s = stack(&["--unlimited"], UNBOUND).await;
            println!("driving a gateway started here (fake Feishu, quotas not binding)");
            (s.grpc.clone(), Some(s))
        }
    };
    let run = format!("{:x}", std::process::id());
    let target = Arc::new(target);
    let call = move |i: usize| {
        let mut client = ReplyGatewayClient::new(channel.clone());
        let (run, target) = (run.clone(), target.clone());
        async move {
            let chat = i % target.chats;
            let mut req = tonic::Request::new(ReplyRequest {
                app: target.app.clone(),
                ..text(&format!("om_drive{run}x{i}"), &format!("oc_drive{chat}"))
            });
            if let Ok(v) = target.caller.parse() {
                req.metadata_mut().insert("x-caller", v);
            }
            client.reply(req).await.map(drop).map_err(|e| e.code())
        }
    };
    let start = Instant::now();
    let (h, errors) = match load {
        Load::Concurrency(c) => {
            println!("closed loop: {c} in flight for {} s", dur.as_secs());
            let (h, _, errors) = closed_loop(c, dur, call).await;
            (h, errors)
        }
        Load::Rate(r) => {
            println!("open loop: {r} replies/s for {} s", dur.as_secs());
            let total = (r * dur.as_secs_f64()).round() as usize;
            let mut calls = Vec::with_capacity(total);
            let mut i = 0;
            while i < total {
                let due = start + Duration::from_secs_f64(i as f64 / r);
                tokio::time::sleep_until(due.into()).await;
                // Everything due by now goes out (timer granularity is 1 ms).
                let now = Instant::now();
                while i < total && start + Duration::from_secs_f64(i as f64 / r) <= now {
                    let scheduled = start + Duration::from_secs_f64(i as f64 / r);
                    let fut = call(i);
                    calls.push(tokio::spawn(async move {
                        let r = fut.await;
                        (scheduled.elapsed(), r)
                    }));
                    i += 1;
                }
            }
            let mut all = hist();
            let mut errors = Vec::new();
            for c in calls {
                let (d, r) = c.await.unwrap();
                all.record(d.as_micros().max(1) as u64).unwrap();
                errors.extend(r.err());
            }
            (all, errors)
        }
    };
    let elapsed = start.elapsed();
    let mut by_code: HashMap<String, usize> = HashMap::new();
    for code in &errors {
        *by_code.entry(format!("{code:?}")).or_default() += 1;
    }
    let mut by_code: Vec<_> = by_code.into_iter().collect();
    by_code.sort();
    println!(
        "drive: {} calls in {:.2} s = {:.0} completed/s; ok {}; errors {} {:?}",
        h.len(),
        elapsed.as_secs_f64(),
        h.len() as f64 / elapsed.as_secs_f64(),
        h.len() as usize - errors.len(),
        errors.len(),
        by_code
    );
    print_latency("drive call latency", &h);
}

/// Answers every reply at once (scheduler cost only).
struct Instant0;

impl Upstream for Instant0 {
    fn call<'a>(
        &'a self,
        _app: AppIndex,
        _req: &'a Call,
    ) -> BoxFuture<'a, Result<SentMessage, UpstreamError>> {
        Box::pin(async move { Ok(SentMessage::default()) })
    }
    fn message_chat<'a>(
        &'a self,
        _app: AppIndex,
        id: &'a str,
    ) -> BoxFuture<'a, Result<String, UpstreamError>> {
        Box::pin(async move { Ok(id.to_owned()) })
    }
}

fn job(i: usize, chats: usize) -> JobSpec {
    JobSpec {
        caller: 0,
        credential: "".into(),
        intake: None,
        on_send: None,
        app: 0,
        app_name: "default".into(),
        app_id: "cli_depth".into(),
        chat_id: format!("oc_{:032x}", i % chats).into(),
        user_id: None,
        target: Target::Chat,
        lane: Lane::Normal,
        request: Call::Reply(SendRequest {
            message_id: format!("om_{i}"),
            content: r#"{"text":"x"}"#.into(),
            msg_type: "text",
            reply_in_thread: false,
            uuid: format!("u{i}"),
        }),
        caller_uuid: None,
        deadline: None,
        span: tracing::Span::none(),
    }
}

async fn depth(jobs: usize, chats: usize) {
    let scheduler_config = |blocking: bool| {
        let mut c = Config::from_toml(if blocking {
            // Nothing may be sent: every job stays queued.
            "[quotas]\napp = [{ limit = 1, window_ms = 3600000 }]\n[queue]\nmax_per_chat = 1000000\nmax_total = 10000000"
        } else {
            UNBOUND
        })
        .unwrap();
        c.queue.max_per_chat = 1_000_000;
        SchedulerConfig::from_config(&c)
    };
    // Memory and enqueue cost at depth.
    let metrics = Arc::new(Metrics::new());
    let before = allocated();
    let s = Scheduler::start(scheduler_config(true), Arc::new(Instant0), metrics.clone());
    let specs: Vec<JobSpec> = (0..jobs).map(|i| job(i, chats)).collect();
    let specs_bytes = allocated() - before;
    let start = Instant::now();
    let mut receivers = Vec::with_capacity(jobs);
    for spec in specs {
        receivers.push(s.submit(spec));
    }
    let want = format!("feishu_reply_queued {}", jobs - 1);
    while !metrics.encode().contains(&want) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let enqueue = start.elapsed();
    let total = allocated() - before;
    println!(
        "depth: {jobs} queued jobs over {chats} chats: enqueue {:.0} ns/job ({:.0} jobs/s); memory {:.0} bytes/queued job (job data incl. strings; the JobSpecs alone were {:.0} bytes/job)",
        enqueue.as_nanos() as f64 / jobs as f64,
        jobs as f64 / enqueue.as_secs_f64(),
        (total - specs_bytes) as f64 / jobs as f64 + specs_bytes as f64 / jobs as f64,
        specs_bytes as f64 / jobs as f64
    );
    drop(receivers);
    drop(s);

    // Enqueue + dispatch + completion with quotas not binding and an instant upstream.
    let s = Scheduler::start(
        scheduler_config(false),
        Arc::new(Instant0),
        Arc::new(Metrics::new()),
    );
    let specs: Vec<JobSpec> = (0..jobs).map(|i| job(i, chats)).collect();
    let start = Instant::now();
    let receivers: Vec<_> = specs.into_iter().map(|spec| s.submit(spec)).collect();
    let mut ok = 0;
    for r in receivers {
        ok += usize::from(matches!(r.await, Ok(Ok(_))));
    }
    let d = start.elapsed();
    println!(
        "depth: {ok}/{jobs} jobs through enqueue + dispatch + (instant) send + completion in {:.3} s: {:.0} ns/job ({:.0} jobs/s)",
        d.as_secs_f64(),
        d.as_nanos() as f64 / jobs as f64,
        jobs as f64 / d.as_secs_f64()
    );
}

/// An OTLP trace collector that only counts what it receives (`overhead --otlp`).
mod otlp_sink {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };

    struct Count(Arc<AtomicUsize>);

    #[tonic::async_trait]
    impl TraceService for Count {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let n: usize = req
                .get_ref()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.0.fetch_add(n, Ordering::Relaxed);
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    /// Starts the collector on a loopback port: its endpoint and the span count.
    pub fn start() -> (String, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let spans = Arc::new(AtomicUsize::new(0));
        let svc = TraceServiceServer::new(Count(spans.clone()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (format!("http://{addr}"), spans)
    }
}
