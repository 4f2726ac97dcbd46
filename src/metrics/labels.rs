//! The label sets of the gateway's metrics (bounded: never a chat or user id) and the list
//! of metric names exported.

use prometheus_client::encoding::EncodeLabelSet;

/// `reason` values of `feishu_reply_retries_total` (the upstream's retry reasons, each
/// pre-created so it reads 0 before its first retry).
pub const RETRY_REASONS: [&str; 6] = [
    "rate_limited_230020",
    "being_sent_230049",
    "frequency_limit_429",
    "message_service_11232",
    "server_error_5xx",
    "network",
];

/// The retry reasons that are rate rejections (`feishu_reply_upstream_rate_rejections_total`,
/// pre-created per app for the alerts).
pub const RATE_REJECTION_REASONS: [&str; 2] = ["rate_limited_230020", "frequency_limit_429"];

/// `operation` values: Feishu's message and card APIs (`config::APIS`; `feishu::Api::as_str`,
/// checked there).
pub const OPERATIONS: [&str; 8] = crate::config::APIS;

/// The `caller` label of calls whose caller could not be authenticated.
pub const UNAUTHENTICATED_CALLER: &str = "unauthenticated";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The API called: reply, send, update_card, edit, recall (`feishu::Api`).
    pub operation: &'static str,
    pub app: String,
    /// ok, invalid_argument, not_found, resource_exhausted, deadline_exceeded, unavailable, …
    pub outcome: String,
    /// Feishu's code ("0" on success), or "none" when Feishu gave none.
    pub code: String,
}

/// An exemplar's label: the trace of one observation (OpenMetrics exemplars; Grafana links
/// them to the trace). Only set while traces are exported.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceLabel {
    pub trace_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OutcomeLabel {
    pub(super) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OperationLabel {
    pub(super) operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OperationOutcomeLabels {
    pub(super) operation: &'static str,
    pub(super) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ReasonLabel {
    pub(super) reason: &'static str,
}

/// A configured caller's name, `anonymous` or `unauthenticated` (bounded by the config).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CallerLabel {
    pub(super) caller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct AppLabel {
    pub(super) app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CallerOutcomeLabels {
    pub(super) caller: String,
    pub(super) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PortReasonLabels {
    pub(super) port: &'static str,
    pub(super) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RejectionLabels {
    pub(super) app: String,
    pub(super) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RedisCallLabels {
    pub(super) op: &'static str,
    pub(super) outcome: &'static str,
}

/// The metric names exported (without `_total`/`_bucket` suffixes); README and dashboards use these.
pub const METRIC_NAMES: [&str; 44] = [
    "feishu_reply_requests",
    "feishu_reply_streams_live",
    "feishu_reply_stream_updates",
    "feishu_reply_stream_text_lag_seconds",
    "feishu_reply_stream_finish_seconds",
    "feishu_reply_superseded",
    "feishu_reply_upstream_latency_seconds",
    "feishu_reply_queue_wait_seconds",
    "feishu_reply_queued",
    "feishu_reply_queued_bytes",
    "feishu_reply_in_flight",
    "feishu_reply_retries",
    "feishu_reply_token_refreshes",
    "feishu_reply_upstream_rate_rejections",
    "feishu_reply_chat_lookups",
    "feishu_reply_quota_keys",
    "feishu_reply_admission_rejections",
    "feishu_reply_caller_requests",
    "feishu_reply_connections_refused",
    "feishu_reply_request_bodies_refused",
    "feishu_reply_request_bytes_reading",
    "feishu_reply_jobs_stored",
    "feishu_reply_job_store_bytes",
    "feishu_reply_jobs_running",
    "feishu_reply_jobs_awaiting_caller",
    "feishu_reply_app_budget_calls",
    "feishu_reply_app_budget_used",
    "feishu_reply_app_budget_remaining",
    "feishu_reply_app_budget_refusals",
    "feishu_reply_app_month_quota_spent",
    "feishu_reply_job_takeovers",
    "feishu_reply_job_leases_lost",
    "feishu_reply_redis_calls",
    "feishu_reply_redis_up",
    "feishu_reply_redis_fallback",
    "feishu_reply_redis_fallback_switches",
    "feishu_reply_cluster_replicas",
    "feishu_reply_partitions_owned",
    "feishu_reply_partition_moves",
    "feishu_reply_partition_leases_lost",
    "feishu_reply_peer_jobs",
    "feishu_reply_config_generation",
    "feishu_reply_config_writable_by_others",
    "feishu_reply_config_reloads",
];
