//! Wiring and lifecycle of `serve`: builds the client, scheduler and services from a
//! [`Config`], serves gRPC (+ health, reflection) and the metrics/health HTTP port on listeners
//! the caller bound, and runs the shutdown sequence when the caller's `shutdown` future ends.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::budget::Budgets;
use crate::cluster::gate::RedisGate;
use crate::cluster::{RedisBudgetCounter, RedisQuota, SharedRedis};
use crate::config::{AppConfig, Config, DEFAULT_APP_NAME};
use crate::fake_feishu::{FakeFeishu, FakeOptions, FakeQuota};
use crate::feishu::{FeishuClient, Upstream};
use crate::grpc::ReplyService;
use crate::jobs::{JobStore, Jobs, RedisJobStore};
use crate::listen::{self, PortLimits};
use crate::metrics::Metrics;
use crate::proto::reply_admin_server::ReplyAdminServer;
use crate::proto::reply_gateway_server::ReplyGatewayServer;
use crate::reload::{Live, ReloadSource};
use crate::scheduler::{QuotaSource, Scheduler, SchedulerConfig};

mod partitions;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("building the Feishu HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("starting the embedded fake Feishu: {0}")]
    Fake(#[source] std::io::Error),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("cluster mode: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("{0}")]
    Jobs(crate::jobs::StoreError),
    #[error("cluster.peer_listen {addr}: {source}")]
    PeerListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Largest gRPC request decoded: the largest valid reply content (150 KB of text) plus room
/// for the other fields. Larger requests are refused by tonic (OUT_OF_RANGE) before they are
/// buffered whole (the 4 MiB default let 300 streams hold 1.35 GB).
const MAX_REQUEST_BYTES: usize = crate::reply::MAX_TEXT_BYTES + 64 * 1024;

/// Largest header block of a gRPC call (metadata is small: a token, a chat id, a deadline).
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// A gRPC connection is asked to go away (GOAWAY; clients reconnect) after this long.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30 * 60);

/// A metrics-port connection (a scrape, a probe) is closed after this long.
const METRICS_CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// State the metrics port serves.
struct Probe {
    metrics: Arc<Metrics>,
    ready: AtomicBool,
    scheduler: Scheduler,
    /// Cluster mode: the shared Redis (quotas and jobs), which must be usable as configured.
    redis: Option<Arc<SharedRedis>>,
}

impl Probe {
    /// Why this replica should not get calls now (None: it should).
    fn not_ready(&self) -> Option<String> {
        if !self.ready.load(Ordering::Acquire) {
            return Some("shutting down".into());
        }
        if !self.scheduler.is_alive() {
            return Some("the dispatcher died".into());
        }
        if let Some(why) = self.redis.as_ref().and_then(|r| r.unusable()) {
            return Some(format!("redis {why}"));
        }
        match self.scheduler.quota_source() {
            QuotaSource::Holding => {
                Some("redis unavailable and on_redis_failure = fail_closed".into())
            }
            _ => None,
        }
    }
}

/// The demo's job store directory (`--embedded-fake` with no data dir): removed at exit.
struct DemoDir(std::path::PathBuf);

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `--embedded-fake`: start a fake Feishu on loopback and point a default app at it. With no
/// job store configured, async jobs are kept in a temporary directory (removed at exit), so
/// `send --async` works in the demo.
async fn embedded_fake(config: &mut Config) -> Result<(FakeFeishu, Option<DemoDir>), AppError> {
    let q = |s: crate::quota::QuotaSpec| FakeQuota {
        limit: s.limit.get(),
        window: s.window,
    };
    let opts = FakeOptions {
        chat_quota: q(config.quotas.chat),
        user_quota: q(config.quotas.user),
        app_quotas: config.quotas.app.iter().copied().map(q).collect(),
        ..FakeOptions::default()
    };
    let fake = FakeFeishu::start(([127, 0, 0, 1], 0).into(), opts)
        .await
        .map_err(AppError::Fake)?;
    config.feishu.base_url = fake.base_url();
    config.apps = vec![AppConfig::new(
        DEFAULT_APP_NAME,
        "cli_fake_embedded",
        "fake-secret",
    )];
    config.default_app = Some(DEFAULT_APP_NAME.into());
    let demo_dir = match (&config.data_dir, &config.cluster) {
        (None, None) => {
            let dir = std::env::temp_dir().join(format!(
                "feishu-reply-gateway-demo-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&dir).map_err(AppError::Fake)?;
            tracing::info!(dir = %dir.display(), "--embedded-fake: async jobs are kept in a temporary directory, removed at exit (set GATEWAY_DATA_DIR to keep them)");
            config.data_dir = Some(dir.clone());
            Some(DemoDir(dir))
        }
        _ => None,
    };
    tracing::warn!(
        fake = %fake.base_url(),
        "--embedded-fake: replies go to an EMBEDDED FAKE Feishu, not to Feishu (a demo). To \
         talk to Feishu, drop --embedded-fake and set FEISHU_APP_ID and FEISHU_APP_SECRET \
         (or [apps.*] in --config)."
    );
    Ok((fake, demo_dir))
}

/// Runs the gateway until `shutdown` resolves, then drains (DESIGN.md: health NOT_SERVING →
/// stop accepting → keep sending for the grace period → fail the rest with UNAVAILABLE).
pub async fn run(
    mut config: Config,
    reload: Option<ReloadSource>,
    grpc_listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AppError> {
    let _fake = match (config.embedded_fake, config.apps.is_empty()) {
        (true, _) => Some(embedded_fake(&mut config).await?),
        // Never a silent fake: no app and no --embedded-fake is a configuration error.
        (false, true) => return Err(AppError::Config(crate::config::ConfigError::NoApp)),
        (false, false) if config.auth.callers.is_empty() && !config.auth.allow_anonymous => {
            return Err(AppError::Config(crate::config::ConfigError::NoCaller));
        }
        (false, false) => None,
    };
    let metrics = Arc::new(Metrics::new());
    let store = match &config.cluster {
        Some(c) => {
            tracing::info!(redis = %crate::config::redact_url(&c.redis_url), policy = ?c.on_failure, "cluster mode: quotas shared through Redis");
            let redis = Arc::new(SharedRedis::new(c.clone(), metrics.clone())?);
            Some(Arc::new(RedisQuota::new(redis, metrics.clone())))
        }
        None => None,
    };
    let counter = store
        .clone()
        .map(|s| Arc::new(RedisBudgetCounter::new(s)) as Arc<dyn crate::budget::SharedCounter>);
    let budgets = Arc::new(Budgets::new(&config.apps, counter, metrics.clone()));
    let upstream: Arc<dyn Upstream> = Arc::new(
        FeishuClient::new(&config.feishu, &config.apps, metrics.clone())?
            .with_meter(budgets.clone()),
    );
    run_with_upstream(
        config,
        Shared {
            upstream,
            metrics,
            store,
            budgets: Some(budgets),
            reload,
        },
        grpc_listener,
        metrics_listener,
        shutdown,
    )
    .await
}

/// What [`run`] builds before serving, given to [`run_with_upstream`] (tests and benches may
/// stand in their own upstream).
pub struct Shared {
    pub upstream: Arc<dyn Upstream>,
    pub metrics: Arc<Metrics>,
    /// The Redis connection in cluster mode (quotas, jobs, budgets).
    pub store: Option<Arc<RedisQuota>>,
    /// The apps' call budgets, when the upstream counts against them.
    pub budgets: Option<Arc<Budgets>>,
    /// Live reload (SIGHUP, file changes); None: the configuration is read once.
    pub reload: Option<ReloadSource>,
}

/// [`run`] with the upstream given (tests and benches may stand in their own).
pub async fn run_with_upstream(
    config: Config,
    shared: Shared,
    grpc_listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AppError> {
    let Shared {
        upstream,
        metrics,
        store,
        budgets,
        reload,
    } = shared;
    for a in &config.apps {
        metrics.init_app(&a.name);
    }
    let parts = partitions::make(&config, store.as_ref(), &metrics);
    let scheduler = Scheduler::start_with(
        SchedulerConfig::from_config(&config),
        upstream.clone(),
        metrics.clone(),
        store
            .clone()
            .map(|s| RedisGate::starter(s, parts.clone(), metrics.clone())),
    );
    let mut service = ReplyService::new(
        &config,
        scheduler.clone(),
        upstream.clone(),
        metrics.clone(),
    );
    // Checked at the door even when no app has a budget yet: a reload may give one one.
    if let Some(b) = &budgets {
        service = service.with_budgets(b.clone());
    }
    if let Some(redis) = &store {
        service = service.with_redis(redis.clone());
    }
    // Async jobs: in the Redis the replicas share (cluster mode), else in the embedded store
    // when a data dir is set.
    let backend = match (&store, &parts, &config.data_dir, &config.cluster) {
        (Some(redis), Some(parts), dir, Some(c)) => {
            if dir.is_some() {
                tracing::warn!("cluster mode keeps jobs in Redis; the data dir is not used");
            }
            Some(Arc::new(RedisJobStore::new(
                redis.shared().clone(),
                c.jobs,
                Arc::new(partitions::JobOwnership(parts.clone())),
            )) as Arc<dyn crate::jobs::Store>)
        }
        (_, _, Some(dir), _) => Some(Arc::new(
            JobStore::open(dir, config.reset_job_store).map_err(AppError::Jobs)?,
        ) as Arc<dyn crate::jobs::Store>),
        _ => None,
    };
    let jobs = backend.map(|b| {
        let specs = service.job_specs();
        Jobs::new(
            b,
            crate::jobs::Limits {
                max_jobs: config.max_jobs,
                per_caller: config.max_jobs_per_caller,
            },
            scheduler.clone(),
            specs,
            metrics.clone(),
            Arc::new(crate::grpc::JobAnswers),
        )
    });
    if let Some(jobs) = &jobs {
        service = service.with_jobs(jobs.clone());
    }
    let service = Arc::new(service);
    // Cluster mode: this replica's share of the target partitions, and forwarding to their
    // owners when peers are configured.
    let partitions = partitions::start(&config, parts, &service, &scheduler, &metrics).await?;
    let jobs_task = match &jobs {
        Some(jobs) => {
            // Jobs a previous process left unfinished go back in line, in their order.
            let hold = SchedulerConfig::from_config(&config).send_timeout;
            let longest = config
                .quotas
                .app
                .iter()
                .map(|q| q.window)
                .max()
                .unwrap_or_default();
            jobs.recover(longest + hold, hold)
                .await
                .map_err(AppError::Jobs)?;
            // In cluster mode the first lease is taken in the background (a Redis that does not
            // answer must not hold up serving); a job submitted before it is taken over by
            // another replica, or run here once the lease is taken.
            Some(tokio::spawn(jobs.clone().run()))
        }
        None => None,
    };
    if let Some(file) = reload.as_ref().and_then(|r| r.file.as_deref()) {
        crate::reload::check_permissions(file, &metrics);
    }
    let reloader = match (reload, config.embedded_fake) {
        (Some(_), true) => {
            tracing::info!("--embedded-fake: the configuration is not reloaded");
            None
        }
        (Some(source), false) => {
            let live = Arc::new(Live::new(
                config.clone(),
                service.clone(),
                scheduler.clone(),
                upstream.clone(),
                budgets.clone(),
                jobs.clone(),
                metrics.clone(),
            ));
            Some(crate::reload::start(live, source))
        }
        (None, _) => None,
    };
    let sweeper = {
        let service = service.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tick.tick().await;
                service.forget_idle_callers();
            }
        })
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ReplyGatewayServer<Arc<ReplyService>>>()
        .await;
    health.set_service_status("", ServingStatus::Serving).await;
    // A dispatcher that died (a bug) sends nothing any more: say so, so the orchestrator
    // restarts the process instead of routing calls that can only fail.
    let watchdog = {
        let (health, scheduler) = (health.clone(), scheduler.clone());
        tokio::spawn(async move {
            scheduler.died().await;
            health
                .set_not_serving::<ReplyGatewayServer<Arc<ReplyService>>>()
                .await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
        })
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let probe = Arc::new(Probe {
        metrics: metrics.clone(),
        ready: AtomicBool::new(true),
        scheduler: scheduler.clone(),
        redis: store.as_ref().map(|s| s.shared().clone()),
    });
    // gRPC health follows readiness (a Redis that refuses the credentials or was never
    // reached takes the replica out of rotation until it answers).
    let health_follower = {
        let (health, probe) = (health.clone(), probe.clone());
        tokio::spawn(async move {
            let mut serving = true;
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let now = probe.not_ready().is_none();
                if now != serving {
                    serving = now;
                    let status = if now {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    health.set_service_status("", status).await;
                    let name = <ReplyGatewayServer<Arc<ReplyService>> as tonic::server::NamedService>::NAME;
                    health.set_service_status(name, status).await;
                }
            }
        })
    };
    let metrics_addr = metrics_listener.local_addr().ok();
    let limits = &config.limits;
    let fds = listen::open_files_limit();
    let metrics_port = PortLimits {
        port: "metrics",
        max_connections: listen::fit_connections(limits.metrics_max_connections, 0.05, fds),
        handshake_timeout: limits.handshake_timeout,
    };
    let metrics_server = tokio::spawn(listen::serve_http(
        metrics_listener,
        probe_router(probe.clone()),
        metrics_port,
        METRICS_CONNECTION_LIFETIME,
        metrics.clone(),
    ));

    let grpc_addr = grpc_listener.local_addr().ok();
    tracing::info!(grpc = ?grpc_addr, metrics = ?metrics_addr, apps = config.apps.len(), feishu = %config.feishu.base_url, "feishu-reply-gateway serving");

    let (stop_grpc_tx, stop_grpc_rx) = tokio::sync::oneshot::channel::<()>();
    let grpc_port = PortLimits {
        port: "grpc",
        max_connections: listen::fit_connections(limits.max_connections, 0.9, fds),
        handshake_timeout: limits.handshake_timeout,
    };
    if grpc_port.max_connections < limits.max_connections {
        tracing::warn!(
            wanted = limits.max_connections,
            allowed = grpc_port.max_connections,
            open_files_limit = ?fds,
            "server.max_connections lowered to fit the open files limit (raise ulimit -n)"
        );
    }
    let incoming = listen::guarded(grpc_listener, grpc_port, metrics.clone());
    let mut server = tonic::transport::Server::builder()
        // Dead or stalled peers: a ping unanswered for 10 s closes the connection.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(limits.max_streams_per_connection))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        // Flow-control windows bound what a half-sent request buffers per stream and connection.
        .initial_stream_window_size(Some(MAX_REQUEST_BYTES as u32))
        .initial_connection_window_size(Some(2 * MAX_REQUEST_BYTES as u32))
        // Every connection ends, idle or not (GOAWAY, then its calls get max_call to finish);
        // and no call is held past max_call (its deadline is capped before that).
        .max_connection_age(MAX_CONNECTION_AGE)
        .max_connection_age_grace(limits.max_call + Duration::from_secs(5))
        .timeout(limits.max_call + Duration::from_secs(5));
    if let Some(tls) = &config.tls {
        let mut t = ServerTlsConfig::new()
            .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
            .timeout(limits.handshake_timeout);
        if let Some(ca) = &tls.client_ca_pem {
            // Optional: token callers need no certificate; one that is sent must verify.
            t = t
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(true);
        }
        server = server.tls_config(t)?;
    }
    let grpc = server
        .add_service(health_service)
        .add_service(reflection)
        .add_service(ReplyAdminServer::from_arc(service.clone()))
        .add_service(listen::Budgeted::new(
            ReplyGatewayServer::from_arc(service).max_decoding_message_size(MAX_REQUEST_BYTES),
            listen::BodyBudget::new(
                limits.max_reading_bytes,
                limits.handshake_timeout,
                metrics.clone(),
            ),
        ))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_grpc_rx.await;
        });
    let mut grpc = std::pin::pin!(grpc);

    tokio::select! {
        r = &mut grpc => {
            sweeper.abort();
            watchdog.abort();
            return r.map_err(Into::into);
        }
        () = shutdown => {}
    }

    // === shutdown sequence ===
    let grace = config.shutdown_grace;
    tracing::info!(
        ?grace,
        "shutdown requested: not serving, draining queued replies"
    );
    probe.ready.store(false, Ordering::Release);
    health_follower.abort();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<ReplyGatewayServer<Arc<ReplyService>>>()
        .await;
    let _ = stop_grpc_tx.send(());
    if let Some(p) = &partitions {
        p.leave().await;
    }
    let drain = scheduler.shutdown(grace);
    // Sends in flight at the end of the grace period finish within one send timeout.
    let send_timeout = SchedulerConfig::from_config(&config).send_timeout;
    let hard_limit = grace + send_timeout + Duration::from_secs(5);
    let finished = tokio::time::timeout(hard_limit, async {
        drain.await;
        // Jobs left queued stay in the store; in cluster mode another replica takes them now.
        if let Some(jobs) = &jobs {
            jobs.stop(send_timeout).await;
        }
        grpc.await
    })
    .await;
    sweeper.abort();
    watchdog.abort();
    metrics_server.abort();
    if let Some(t) = reloader {
        t.abort();
    }
    if let Some(t) = jobs_task {
        t.abort();
    }
    if let Some(p) = partitions {
        p.stop();
    }
    match finished {
        Ok(r) => {
            tracing::info!("drained; bye");
            r.map_err(Into::into)
        }
        Err(_) => {
            tracing::warn!(
                ?hard_limit,
                "shutdown did not finish in time; exiting anyway"
            );
            Ok(())
        }
    }
}

fn probe_router(probe: Arc<Probe>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(p): State<Arc<Probe>>| async move {
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    p.metrics.encode(),
                )
            }),
        )
        .route(
            "/healthz",
            get(|State(p): State<Arc<Probe>>| async move {
                if p.scheduler.is_alive() {
                    (StatusCode::OK, "ok\n")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the dispatcher died: nothing can be sent; restart me\n",
                    )
                }
            }),
        )
        .route(
            "/readyz",
            get(|State(p): State<Arc<Probe>>| async move {
                if let Some(why) = p.not_ready() {
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    );
                }
                let body = match p.scheduler.quota_source() {
                    QuotaSource::Shared => "ready (quotas shared through redis)\n",
                    QuotaSource::Fallback => {
                        "ready, degraded: redis unavailable, local quotas at this replica's share\n"
                    }
                    QuotaSource::Local | QuotaSource::Holding => "ready\n",
                };
                (StatusCode::OK, body.to_owned())
            }),
        )
        .with_state(probe)
}
