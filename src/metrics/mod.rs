//! One [`Metrics`] value holding every Prometheus metric the gateway exports (names
//! `feishu_reply_*`), passed explicitly to whoever records. Labels are bounded: app, outcome,
//! Feishu code, retry reason — never chat or user ids.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

mod backends;
mod labels;
mod partitions;
mod streams;

use labels::{
    AppLabel, CallerLabel, CallerOutcomeLabels, OperationLabel, OperationOutcomeLabels,
    OutcomeLabel, PortReasonLabels, ReasonLabel, RedisCallLabels, RejectionLabels,
};
pub use labels::{
    METRIC_NAMES, OPERATIONS, RATE_REJECTION_REASONS, RETRY_REASONS, RequestLabels, TraceLabel,
    UNAUTHENTICATED_CALLER,
};

/// Every metric, registered once.
pub struct Metrics {
    registry: Registry,
    streams: streams::StreamMetrics,
    partitions: partitions::PartitionMetrics,
    requests: Family<RequestLabels, Counter>,
    upstream_latency: Family<OperationOutcomeLabels, HistogramWithExemplars<TraceLabel>>,
    queue_wait: Family<OperationLabel, HistogramWithExemplars<TraceLabel>>,
    queued: Gauge,
    queued_bytes: Gauge,
    in_flight: Gauge,
    retries: Family<ReasonLabel, Counter>,
    superseded: Family<OperationLabel, Counter>,
    token_refreshes: Family<OutcomeLabel, Counter>,
    rate_rejections: Family<RejectionLabels, Counter>,
    chat_lookups: Family<OutcomeLabel, Counter>,
    quota_keys: Gauge,
    admission_rejections: Family<CallerLabel, Counter>,
    caller_requests: Family<CallerOutcomeLabels, Counter>,
    connections_refused: Family<PortReasonLabels, Counter>,
    request_bodies_refused: Family<ReasonLabel, Counter>,
    request_bytes_reading: Gauge,
    jobs_stored: Gauge,
    job_store_bytes: Gauge,
    jobs_running: Gauge,
    jobs_awaiting_caller: Gauge,
    app_budget_calls: Family<AppLabel, Gauge>,
    app_budget_used: Family<AppLabel, Gauge>,
    app_budget_remaining: Family<AppLabel, Gauge>,
    app_budget_refusals: Family<AppLabel, Counter>,
    app_month_quota_spent: Family<AppLabel, Gauge>,
    job_takeovers: Counter,
    job_leases_lost: Counter,
    redis_calls: Family<RedisCallLabels, Counter>,
    redis_up: Gauge,
    redis_fallback: Gauge,
    redis_fallback_switches: Counter,
    replicas: Gauge,
    config_generation: Gauge,
    config_reloads: Family<OutcomeLabel, Counter>,
    config_writable_by_others: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "feishu_reply_requests",
            "Calls finished, by operation (reply, send, update_card, edit, recall), app, outcome (gRPC code in snake case or ok) and Feishu code",
            requests.clone(),
        );
        let upstream_latency =
            Family::<OperationOutcomeLabels, HistogramWithExemplars<TraceLabel>>::new_with_constructor(
                || HistogramWithExemplars::new(exponential_buckets(0.005, 2.0, 12)),
            );
        registry.register(
            "feishu_reply_upstream_latency_seconds",
            "Duration of one HTTP call to a Feishu message endpoint, by operation and outcome",
            upstream_latency.clone(),
        );
        let queue_wait =
            Family::<OperationLabel, HistogramWithExemplars<TraceLabel>>::new_with_constructor(
                || HistogramWithExemplars::new(exponential_buckets(0.001, 2.5, 14)),
            );
        for operation in OPERATIONS {
            let _ = queue_wait.get_or_create(&OperationLabel { operation });
        }
        registry.register(
            "feishu_reply_queue_wait_seconds",
            "Time a call waited in the gateway before its first send, by operation",
            queue_wait.clone(),
        );
        let queued = Gauge::default();
        registry.register(
            "feishu_reply_queued",
            "Replies queued (waiting for quota, backoff or their turn in the chat)",
            queued.clone(),
        );
        let queued_bytes = Gauge::default();
        registry.register(
            "feishu_reply_queued_bytes",
            "Bytes held by queued replies (content + per-job overhead); bounded by [queue] max_total_bytes",
            queued_bytes.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "feishu_reply_in_flight",
            "HTTP calls to Feishu's reply endpoint in progress",
            in_flight.clone(),
        );
        let retries = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "feishu_reply_retries",
            "Attempts retried, by reason",
            retries.clone(),
        );
        let superseded = Family::<OperationLabel, Counter>::default();
        // Only updates and card texts are superseded: each reads 0 before its first.
        for operation in ["update_card", "edit", "card_content"] {
            let _ = superseded.get_or_create(&OperationLabel { operation });
        }
        registry.register(
            "feishu_reply_superseded",
            "Updates and card texts answered superseded (a newer one of the message or card came while they waited), never sent",
            superseded.clone(),
        );
        let token_refreshes = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "feishu_reply_token_refreshes",
            "tenant_access_token fetches, by outcome (ok, rejected, error)",
            token_refreshes.clone(),
        );
        let rate_rejections = Family::<RejectionLabels, Counter>::default();
        registry.register(
            "feishu_reply_upstream_rate_rejections",
            "Rate rejections from Feishu despite the gateway's quotas (should stay 0), by app and reason",
            rate_rejections.clone(),
        );
        let chat_lookups = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "feishu_reply_chat_lookups",
            "message_id -> chat_id resolutions for requests without chat_id (hit, miss, error)",
            chat_lookups.clone(),
        );
        let quota_keys = Gauge::default();
        registry.register(
            "feishu_reply_quota_keys",
            "Quota keys (chats, users, apps) with sends inside their window",
            quota_keys.clone(),
        );
        let admission_rejections = Family::<CallerLabel, Counter>::default();
        registry.register(
            "feishu_reply_admission_rejections",
            "Calls refused by per-caller admission control (its rate), by caller",
            admission_rejections.clone(),
        );
        let caller_requests = Family::<CallerOutcomeLabels, Counter>::default();
        registry.register(
            "feishu_reply_caller_requests",
            "Reply calls finished, by authenticated caller (configured name, anonymous, or unauthenticated) and outcome",
            caller_requests.clone(),
        );
        let connections_refused = Family::<PortReasonLabels, Counter>::default();
        registry.register(
            "feishu_reply_connections_refused",
            "Connections closed at accept, by port (grpc, metrics) and reason (too_many, accept_error)",
            connections_refused.clone(),
        );
        let request_bodies_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "feishu_reply_request_bodies_refused",
            "gRPC requests failed while their body was read, by reason (budget: too many bytes being read at once; timeout: not complete within the handshake timeout)",
            request_bodies_refused.clone(),
        );
        let request_bytes_reading = Gauge::default();
        registry.register(
            "feishu_reply_request_bytes_reading",
            "Bytes of gRPC requests received and not yet queued or refused (bounded by max_reading_bytes)",
            request_bytes_reading.clone(),
        );
        let jobs_stored = Gauge::default();
        registry.register(
            "feishu_reply_jobs_stored",
            "Async jobs in the job store, all states (bounded by [jobs] max_jobs)",
            jobs_stored.clone(),
        );
        let job_store_bytes = Gauge::default();
        registry.register(
            "feishu_reply_job_store_bytes",
            "Size of the job store's file",
            job_store_bytes.clone(),
        );
        let jobs_running = Gauge::default();
        registry.register(
            "feishu_reply_jobs_running",
            "Async jobs this process runs (queued here or being sent)",
            jobs_running.clone(),
        );
        let jobs_awaiting_caller = Gauge::default();
        registry.register(
            "feishu_reply_jobs_awaiting_caller",
            "Async jobs of ours whose caller or credential this replica's configuration does not name yet (waiting for a reload, then failed CALLER_REMOVED)",
            jobs_awaiting_caller.clone(),
        );
        let app_budget_calls = Family::<AppLabel, Gauge>::default();
        registry.register(
            "feishu_reply_app_budget_calls",
            "Feishu calls an app may make per budget period ([apps.NAME.budget] calls)",
            app_budget_calls.clone(),
        );
        let app_budget_used = Family::<AppLabel, Gauge>::default();
        registry.register(
            "feishu_reply_app_budget_used",
            "Feishu calls an app made this budget period (shared count in cluster mode, as last seen)",
            app_budget_used.clone(),
        );
        let app_budget_remaining = Family::<AppLabel, Gauge>::default();
        registry.register(
            "feishu_reply_app_budget_remaining",
            "Feishu calls an app may still make this budget period",
            app_budget_remaining.clone(),
        );
        let app_month_quota_spent = Family::<AppLabel, Gauge>::default();
        registry.register(
            "feishu_reply_app_month_quota_spent",
            "1 while Feishu says the app's API calls for this month are spent (code 99991403): its calls fail APP_BUDGET_SPENT here until the month ends",
            app_month_quota_spent.clone(),
        );
        let app_budget_refusals = Family::<AppLabel, Counter>::default();
        registry.register(
            "feishu_reply_app_budget_refusals",
            "Feishu calls not made because the app's budget was spent (APP_BUDGET_SPENT)",
            app_budget_refusals.clone(),
        );
        let job_takeovers = Counter::default();
        registry.register(
            "feishu_reply_job_takeovers",
            "Open async jobs this replica found in the partitions it took over, left by their last owner (cluster mode)",
            job_takeovers.clone(),
        );
        let job_leases_lost = Counter::default();
        registry.register(
            "feishu_reply_job_leases_lost",
            "Times this replica found a partition's jobs taken by a later owner while it still counted the partition as its own (it was stalled or cut off from Redis longer than job_lease_ms)",
            job_leases_lost.clone(),
        );
        let config_generation = Gauge::default();
        registry.register(
            "feishu_reply_config_generation",
            "Configuration running: 0 as started, +1 per reload applied",
            config_generation.clone(),
        );
        let config_writable_by_others = Gauge::default();
        registry.register(
            "feishu_reply_config_writable_by_others",
            "1 while the config file or its directory is writable by users other than its owner and group (whoever can write it can make the gateway post as its apps)",
            config_writable_by_others.clone(),
        );
        let config_reloads = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "feishu_reply_config_reloads",
            "Configuration reloads by outcome: applied, needs_restart (applied, but some changed settings wait for a restart), invalid (refused; the running configuration stays)",
            config_reloads.clone(),
        );
        let redis_calls = Family::<RedisCallLabels, Counter>::default();
        registry.register(
            "feishu_reply_redis_calls",
            "Redis round trips (cluster mode), by op (decide, settle, release, block, replay, heartbeat) and outcome",
            redis_calls.clone(),
        );
        let redis_up = Gauge::default();
        registry.register(
            "feishu_reply_redis_up",
            "1 when the shared quota store answers (cluster mode), else 0",
            redis_up.clone(),
        );
        let redis_fallback = Gauge::default();
        registry.register(
            "feishu_reply_redis_fallback",
            "1 while Redis is down and the failure policy is in effect (local share or fail-closed)",
            redis_fallback.clone(),
        );
        let redis_fallback_switches = Counter::default();
        registry.register(
            "feishu_reply_redis_fallback_switches",
            "Times the replica switched to the Redis failure policy (a blip shorter than a scrape shows here, not in the gauge)",
            redis_fallback_switches.clone(),
        );
        let replicas = Gauge::default();
        registry.register(
            "feishu_reply_cluster_replicas",
            "Gateway replicas seen by the Redis heartbeat in the last 5 s",
            replicas.clone(),
        );
        let streams = streams::StreamMetrics::register(&mut registry);
        let partitions = partitions::PartitionMetrics::register(&mut registry);
        let m = Self {
            streams,
            partitions,
            registry,
            requests,
            upstream_latency,
            queue_wait,
            queued,
            queued_bytes,
            in_flight,
            retries,
            superseded,
            token_refreshes,
            rate_rejections,
            chat_lookups,
            quota_keys,
            admission_rejections,
            caller_requests,
            connections_refused,
            request_bodies_refused,
            request_bytes_reading,
            jobs_stored,
            job_store_bytes,
            jobs_running,
            jobs_awaiting_caller,
            app_budget_calls,
            app_budget_used,
            app_budget_remaining,
            app_budget_refusals,
            app_month_quota_spent,
            job_takeovers,
            job_leases_lost,
            redis_calls,
            redis_up,
            redis_fallback,
            redis_fallback_switches,
            replicas,
            config_generation,
            config_reloads,
            config_writable_by_others,
        };
        for outcome in ["applied", "needs_restart", "invalid"] {
            let _ = m.config_reloads.get_or_create(&OutcomeLabel { outcome });
        }
        // Pre-create the series operators alert on, so they read 0 rather than "no data".
        for port in ["grpc", "metrics"] {
            for reason in ["too_many", "accept_error"] {
                let _ = m
                    .connections_refused
                    .get_or_create(&PortReasonLabels { port, reason });
            }
        }
        for reason in ["budget", "timeout"] {
            let _ = m
                .request_bodies_refused
                .get_or_create(&ReasonLabel { reason });
        }
        let _ = m.caller_requests.get_or_create(&CallerOutcomeLabels {
            caller: UNAUTHENTICATED_CALLER.to_owned(),
            outcome: "unauthenticated",
        });
        for reason in RETRY_REASONS {
            let _ = m.retries.get_or_create(&ReasonLabel { reason });
        }
        for op in [
            "decide",
            "settle",
            "release",
            "block",
            "replay",
            "heartbeat",
        ] {
            for outcome in ["ok", "error"] {
                let _ = m
                    .redis_calls
                    .get_or_create(&RedisCallLabels { op, outcome });
            }
        }
        for outcome in ["hit", "miss", "error"] {
            let _ = m.chat_lookups.get_or_create(&OutcomeLabel { outcome });
        }
        m
    }

    /// Pre-creates an app's alerting series (rate rejections read 0, not "no data").
    /// Feishu's monthly call quota of `app` is spent (99991403), or no longer.
    pub fn set_app_month_quota_spent(&self, app: &str, spent: bool) {
        self.app_month_quota_spent
            .get_or_create(&AppLabel {
                app: app.to_owned(),
            })
            .set(i64::from(spent));
    }

    pub fn init_app(&self, app: &str) {
        let _ = self.app_month_quota_spent.get_or_create(&AppLabel {
            app: app.to_owned(),
        });
        for reason in RATE_REJECTION_REASONS {
            let _ = self.rate_rejections.get_or_create(&RejectionLabels {
                app: app.to_owned(),
                reason,
            });
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn request(&self, operation: &'static str, app: &str, outcome: &str, code: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                operation,
                app: app.to_owned(),
                outcome: outcome.to_owned(),
                code: code.to_owned(),
            })
            .inc();
    }

    /// One reply attempt's latency; `trace_id` (when traced) becomes its bucket's exemplar.
    pub fn upstream_latency(
        &self,
        operation: &'static str,
        d: Duration,
        outcome: &'static str,
        trace_id: Option<String>,
    ) {
        self.upstream_latency
            .get_or_create(&OperationOutcomeLabels { operation, outcome })
            .observe(
                d.as_secs_f64(),
                trace_id.map(|trace_id| TraceLabel { trace_id }),
                None,
            );
    }

    /// One call's wait before its first send; `trace_id` as for [`Self::upstream_latency`].
    pub fn queue_wait(&self, operation: &'static str, d: Duration, trace_id: Option<String>) {
        self.queue_wait
            .get_or_create(&OperationLabel { operation })
            .observe(
                d.as_secs_f64(),
                trace_id.map(|trace_id| TraceLabel { trace_id }),
                None,
            );
    }

    pub fn set_queued(&self, n: usize) {
        self.queued.set(n as i64);
    }

    pub fn set_queued_bytes(&self, n: usize) {
        self.queued_bytes.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn in_flight(&self, delta: i64) {
        self.in_flight.inc_by(delta);
    }

    /// One retry, by its reason (one of [`RETRY_REASONS`]).
    pub fn retry(&self, reason: &'static str) {
        self.retries.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// An update superseded by a newer one before it was sent.
    pub fn superseded(&self, operation: &'static str) {
        self.superseded
            .get_or_create(&OperationLabel { operation })
            .inc();
    }

    pub fn token_refresh(&self, outcome: &'static str) {
        self.token_refreshes
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Feishu refused one of `app`'s sends for rate (`reason`: one of
    /// [`RATE_REJECTION_REASONS`]).
    pub fn rate_rejection(&self, app: &str, reason: &'static str) {
        self.rate_rejections
            .get_or_create(&RejectionLabels {
                app: app.to_owned(),
                reason,
            })
            .inc();
    }

    pub fn chat_lookup(&self, outcome: &'static str) {
        self.chat_lookups
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    pub fn set_quota_keys(&self, n: usize) {
        self.quota_keys.set(n as i64);
    }

    /// Pre-creates a caller's series (0 rather than "no data").
    /// A reload ended with `outcome` (`applied`, `needs_restart`, `invalid`); `generation`
    /// is the configuration running after it.
    pub fn config_reloaded(&self, outcome: &'static str, generation: u64) {
        self.config_reloads
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        self.config_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    pub fn set_config_writable_by_others(&self, open: bool) {
        self.config_writable_by_others.set(i64::from(open));
    }

    pub fn init_caller(&self, caller: &str) {
        let _ = self.admission_rejections.get_or_create(&CallerLabel {
            caller: caller.to_owned(),
        });
    }

    pub fn admission_rejected(&self, caller: &str) {
        self.admission_rejections
            .get_or_create(&CallerLabel {
                caller: caller.to_owned(),
            })
            .inc();
    }

    pub fn connection_refused(&self, port: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&PortReasonLabels { port, reason })
            .inc();
    }

    pub fn request_bytes_reading(&self, delta: i64) {
        self.request_bytes_reading.inc_by(delta);
    }

    pub fn request_body_refused(&self, reason: &'static str) {
        self.request_bodies_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn caller_request(&self, caller: &str, outcome: &'static str) {
        self.caller_requests
            .get_or_create(&CallerOutcomeLabels {
                caller: caller.to_owned(),
                outcome,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_declared_name_is_exported() {
        let m = Metrics::new();
        m.init_caller("anonymous");
        m.request("reply", "default", "ok", "0");
        m.superseded("update_card");
        m.upstream_latency("reply", Duration::from_millis(3), "ok", None);
        m.upstream_latency(
            "reply",
            Duration::from_millis(3),
            "ok",
            Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        );
        m.token_refresh("ok");
        m.rate_rejection("default", "rate_limited_230020");
        m.chat_lookup("hit");
        m.set_app_budget("default", 10, 1);
        m.init_app("default");
        let text = m.encode();
        for name in METRIC_NAMES {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing:\n{text}"
            );
        }
        assert!(
            text.contains(
                "feishu_reply_requests_total{operation=\"reply\",app=\"default\",outcome=\"ok\",code=\"0\"} 1"
            )
        );
        // An observation with a trace is its bucket's exemplar (OpenMetrics).
        assert!(
            text.contains("# {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"} 0.003"),
            "{text}"
        );
    }
}
