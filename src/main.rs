//! `feishu-reply-gateway`: `serve` the gateway, run a `fake-feishu`, or `send` one reply.
#![forbid(unsafe_code)]

mod client;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use feishu_reply_gateway::config::{Config, ServeArgs};
use feishu_reply_gateway::fake_feishu::{FakeFeishu, FakeOptions, WindowMode};
use feishu_reply_gateway::reload::ReloadSource;
use feishu_reply_gateway::telemetry::{LogFormat, Telemetry};
use tokio::net::TcpListener;

/// mimalloc: the gateway's hot path is allocation-heavy (HTTP/2, JSON, small futures) and
/// glibc malloc showed up as ~20% of a profile at 12k replies/s (BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Paced, retrying gRPC gateway for replying to Feishu (Lark) messages"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        env = "GATEWAY_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (`--embedded-fake`: against an embedded fake Feishu, for a demo).
    Serve(ServeArgs),
    /// Run a fake Feishu (token, message and get-message endpoints) for tests and demos.
    FakeFeishu(FakeArgs),
    /// Send one reply through a running gateway and print the result (`--to chat:oc_…` or
    /// `--to open_id:ou_…`: a new message; `--async`: submit it as a durable job and print its
    /// id).
    Send(client::SendArgs),
    /// Update a message: a card (`--msg-type interactive`), a text or a post.
    Update(client::UpdateArgs),
    /// Recall a message.
    Recall(client::UpdateArgs),
    /// Look at or cancel an async job: `job get|watch|cancel ID`.
    Job(client::JobArgs),
    /// Why is a reply slow: `inspect chat ID` (queue, and the quota that holds it), `inspect app
    /// NAME` (windows, budget), `inspect caller NAME` (rate, queue share).
    Inspect(client::InspectArgs),
    /// Exit 0 when the gateway's health endpoint answers 200 (container HEALTHCHECK; needs
    /// no curl in the image).
    Probe(ProbeArgs),
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// Health endpoint (plain HTTP).
    #[arg(long, default_value = "http://127.0.0.1:9090/healthz")]
    url: String,
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

#[derive(clap::Args)]
struct FakeArgs {
    #[arg(long, default_value = "127.0.0.1:18080")]
    addr: SocketAddr,
    /// How quotas are counted.
    #[arg(long, value_enum, default_value = "sliding")]
    window: WindowMode,
    /// Probability of answering 230049 (message being sent).
    #[arg(long = "fail-230049", default_value_t = 0.0)]
    fail_230049: f64,
    /// Probability of answering HTTP 503.
    #[arg(long = "fail-5xx", default_value_t = 0.0)]
    fail_5xx: f64,
    /// Added latency per request (before answering).
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Each request arrives (is counted) after a random delay in [0, N] ms: a congested path.
    #[arg(long, default_value_t = 0)]
    inbound_jitter_ms: u64,
    /// The first request on each new connection arrives N ms late: a TLS handshake.
    #[arg(long, default_value_t = 0)]
    cold_connection_ms: u64,
    /// Lifetime of issued tokens (expired tokens get 99991663).
    #[arg(long, default_value_t = 7200)]
    token_ttl_s: u64,
    /// Accepted credentials ID:SECRET (repeatable); none = accept any.
    #[arg(long = "app")]
    apps: Vec<String>,
    /// Do not enforce quotas (for overhead benchmarks).
    #[arg(long)]
    unlimited: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        // Only the gateway exports traces; the CLI tools just log.
        let telemetry = Telemetry::init(cli.log_format, matches!(cli.command, Command::Serve(_)));
        let result = match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::FakeFeishu(args) => fake(args).await,
            Command::Send(args) => client::send(args).await,
            Command::Update(args) => client::update(args, false).await,
            Command::Recall(args) => client::update(args, true).await,
            Command::Job(args) => client::job(args).await,
            Command::Inspect(args) => client::inspect(args).await,
            Command::Probe(args) => probe(args),
        };
        telemetry.shutdown();
        result
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn serve(args: ServeArgs) -> Result<ExitCode, BoxError> {
    let config = match Config::load(&args) {
        Ok(c) => c,
        // A configuration the gateway refuses (no app, nobody allowed to call, a bad value)
        // is a usage error: exit 2, the reason on stderr.
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let grpc = TcpListener::bind(config.grpc_addr)
        .await
        .map_err(|e| format!("binding gRPC address {}: {e}", config.grpc_addr))?;
    let metrics = TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|e| format!("binding metrics address {}: {e}", config.metrics_addr))?;
    let reload = ReloadSource {
        file: args.config.clone(),
        load: std::sync::Arc::new(move || Config::load(&args)),
        sighup: true,
    };
    feishu_reply_gateway::app::run(config, Some(reload), grpc, metrics, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the gateway");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn fake(args: FakeArgs) -> Result<ExitCode, BoxError> {
    let mut apps = Vec::new();
    for a in &args.apps {
        let (id, secret) = a
            .split_once(':')
            .ok_or_else(|| format!("--app {a:?}: expected ID:SECRET"))?;
        apps.push((id.to_owned(), secret.to_owned()));
    }
    for (name, p) in [
        ("--fail-230049", args.fail_230049),
        ("--fail-5xx", args.fail_5xx),
    ] {
        if !(0.0..=1.0).contains(&p) {
            return Err(format!("{name} must be a probability between 0 and 1").into());
        }
    }
    let opts = FakeOptions {
        window: args.window,
        fail_230049: args.fail_230049,
        fail_5xx: args.fail_5xx,
        latency: Duration::from_millis(args.latency_ms),
        inbound_jitter: Duration::from_millis(args.inbound_jitter_ms),
        cold_connection: Duration::from_millis(args.cold_connection_ms),
        token_ttl: Duration::from_secs(args.token_ttl_s),
        apps,
        enforce_quotas: !args.unlimited,
        ..FakeOptions::default()
    };
    let fake = FakeFeishu::start(args.addr, opts)
        .await
        .map_err(|e| format!("binding {}: {e}", args.addr))?;
    tracing::info!(addr = %fake.addr(), window = ?args.window, "fake Feishu listening (inspect: GET /_fake/received, /_fake/stats)");
    shutdown_signal().await;
    let stats = fake.stats();
    tracing::info!(?stats, "fake Feishu stopping");
    Ok(ExitCode::SUCCESS)
}

/// A minimal HTTP/1.0 GET: enough for our own `/healthz`, no extra dependency or binary.
fn probe(args: ProbeArgs) -> Result<ExitCode, BoxError> {
    use std::io::{Read, Write};
    let rest = args
        .url
        .strip_prefix("http://")
        .ok_or("--url must start with http://")?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let timeout = Duration::from_millis(args.timeout_ms);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    let mut conn = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    let status = answer.split_whitespace().nth(1).unwrap_or("");
    if status == "200" {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{}: HTTP {status}", args.url);
        Ok(ExitCode::FAILURE)
    }
}
