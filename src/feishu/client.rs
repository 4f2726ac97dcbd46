//! The real Feishu client (reqwest + rustls): token endpoint, the message endpoints (reply,
//! send, update, edit, recall), get-message.
//! Every answer is classified by its body `code`; `X-Tt-Logid` is kept for the caller.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde_json::Value;
use tracing::Instrument;

use super::answer::{Envelope, parse_envelope, reply_from, token_from};
use super::token::{FetchedToken, TokenCache};
use super::{Api, AppIndex, BoxFuture, Call, CallMeter, SentMessage, Upstream, UpstreamError};
use crate::config::{AppConfig, FeishuConfig};
use crate::metrics::Metrics;

const JSON_UTF8: &str = "application/json; charset=utf-8";

struct App {
    config: AppConfig,
    token: Arc<TokenCache>,
    /// Until when Feishu's monthly call quota of this app_id is spent (99991403): its calls
    /// fail here without a call. Kept across a reload while the app_id stays.
    month_spent: Arc<parking_lot::Mutex<Option<jiff::Timestamp>>>,
}

/// The time zone Feishu's monthly call quota counts in (it resets on the 1st, China time).
const MONTH_QUOTA_TIME_ZONE: &str = crate::config::DEFAULT_BUDGET_TIME_ZONE;

/// The start of the month after `now`'s, in `tz` (Feishu's quota month).
fn next_month_start(now: jiff::Timestamp, tz: &str) -> jiff::Timestamp {
    use jiff::ToSpan;
    let tz = jiff::tz::TimeZone::get(tz).unwrap_or(jiff::tz::TimeZone::UTC);
    let here = now.to_zoned(tz);
    here.first_of_month()
        .and_then(|d| d.start_of_day())
        .and_then(|d| d.checked_add(1.month()))
        .map_or(now, |z| z.timestamp())
}

/// Talks HTTP to Feishu (or to anything at `base_url` that speaks like it).
pub struct FeishuClient {
    http: reqwest::Client,
    base_url: String,
    /// By app index; replaced whole by a live reload (`Upstream::reconfigure`).
    apps: parking_lot::RwLock<Arc<[Arc<App>]>>,
    token_refresh_before: Duration,
    metrics: Arc<Metrics>,
    /// Charged before each call (the apps' budgets, `[apps.NAME.budget]`).
    meter: Option<Arc<dyn CallMeter>>,
}

impl FeishuClient {
    pub fn new(
        cfg: &FeishuConfig,
        apps: &[AppConfig],
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        // rustls with ring; a no-op when the process already chose a provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.request_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .user_agent(concat!("feishu-reply-gateway/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base_url: cfg.base_url.clone(),
            apps: parking_lot::RwLock::new(
                apps.iter()
                    .map(|a| {
                        Arc::new(App {
                            config: a.clone(),
                            token: Arc::new(TokenCache::new(cfg.token_refresh_before)),
                            month_spent: Arc::default(),
                        })
                    })
                    .collect(),
            ),
            token_refresh_before: cfg.token_refresh_before,
            metrics,
            meter: None,
        })
    }

    /// Charges every call to `meter` first (the apps' budgets), refusing those it refuses.
    pub fn with_meter(mut self, meter: Arc<dyn CallMeter>) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Charges one call of `app` (Err: refused, the call is not made).
    async fn spend(&self, app: AppIndex) -> Result<(), UpstreamError> {
        match &self.meter {
            Some(m) => m.charge(app).await,
            None => Ok(()),
        }
    }

    /// App `app` of the configuration running now.
    fn app(&self, app: AppIndex) -> Arc<App> {
        self.apps.read()[app].clone()
    }

    /// A valid token for `app`, fetched once for all concurrent callers when needed.
    async fn token(&self, app: AppIndex) -> Result<Arc<str>, UpstreamError> {
        let a = self.app(app);
        let (token, fetched) = a.token.get(|| self.fetch_token(app)).await?;
        if fetched {
            tracing::info!(app = %a.config.name, app_id = %a.config.app_id, "tenant_access_token refreshed");
        }
        Ok(token)
    }

    async fn fetch_token(&self, index: AppIndex) -> Result<FetchedToken, UpstreamError> {
        self.spend(index).await?;
        let app = &self.app(index).config;
        let url = format!(
            "{}/open-apis/auth/v3/tenant_access_token/internal",
            self.base_url
        );
        let body = serde_json::json!({ "app_id": app.app_id, "app_secret": app.app_secret });
        let span = tracing::info_span!("feishu.token", otel.kind = "client", app = %app.name, outcome = tracing::field::Empty, feishu.code = tracing::field::Empty, feishu.log_id = tracing::field::Empty);
        let result = async {
            let resp = self
                .http
                .post(url)
                .header(CONTENT_TYPE, JSON_UTF8)
                .json(&body)
                .send()
                .await
                .map_err(network_error)?;
            // Any final refusal from the token endpoint means the credentials are bad
            // (10014 app secret invalid, 99991543, …); rate limits and 5xx stay retryable.
            let (env, log_id) = read_envelope(resp).await.map_err(|e| match e {
                UpstreamError::Feishu {
                    code,
                    msg,
                    log_id,
                    http,
                    ..
                } if http != 429 && http < 500 && code != super::error::CODE_FREQUENCY_LIMIT => {
                    UpstreamError::Credentials { code, msg, log_id }
                }
                other => other,
            })?;
            token_from(env, log_id)
        }
        .instrument(span.clone())
        .await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(UpstreamError::Credentials { .. }) => "rejected",
            Err(_) => "error",
        };
        self.metrics.token_refresh(outcome);
        span.record("outcome", outcome);
        if let Err(e) = &result {
            if let Some(code) = e.code() {
                span.record("feishu.code", code);
            }
            span.record("feishu.log_id", e.log_id())
                .record("otel.status_code", "ERROR");
        }
        result
    }

    /// One call to a message endpoint: its method, URL and body by [`Call::api`].
    async fn post_call(
        &self,
        app: AppIndex,
        token: &str,
        call: &Call,
    ) -> Result<SentMessage, UpstreamError> {
        self.spend(app).await?;
        let base = &self.base_url;
        let builder = match call {
            Call::Reply(r) => self
                .http
                .post(format!(
                    "{base}/open-apis/im/v1/messages/{}/reply",
                    r.message_id
                ))
                .json(r),
            Call::Send(m) => self
                .http
                .post(format!(
                    "{base}/open-apis/im/v1/messages?receive_id_type={}",
                    m.receive_id_type
                ))
                .json(m),
            Call::Update(u) => {
                let url = format!("{base}/open-apis/im/v1/messages/{}", u.message_id);
                match call.api() {
                    // A card takes only its content; an edit names its type again.
                    Api::UpdateCard => self
                        .http
                        .patch(url)
                        .json(&serde_json::json!({ "content": u.content })),
                    _ => self.http.put(url).json(u),
                }
            }
            Call::Recall { message_id } => self
                .http
                .delete(format!("{base}/open-apis/im/v1/messages/{message_id}")),
            Call::CardCreate { card_json } => self
                .http
                .post(format!("{base}/open-apis/cardkit/v1/cards"))
                .json(&serde_json::json!({ "type": "card_json", "data": card_json })),
            Call::CardText(t) => self
                .http
                .put(format!(
                    "{base}/open-apis/cardkit/v1/cards/{}/elements/{}/content",
                    t.card_id, t.element_id
                ))
                .json(t),
            Call::CardStreaming(c) => {
                let settings = serde_json::json!({ "config": { "streaming_mode": c.on } });
                self.http
                    .patch(format!(
                        "{base}/open-apis/cardkit/v1/cards/{}/settings",
                        c.card_id
                    ))
                    .json(&serde_json::json!({
                        "settings": settings.to_string(),
                        "sequence": c.sequence,
                        "uuid": c.uuid,
                    }))
            }
        };
        let started = Instant::now();
        let resp = builder
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(CONTENT_TYPE, JSON_UTF8)
            .send()
            .await;
        let result = match resp {
            Err(e) => Err(network_error(e)),
            Ok(resp) => read_envelope(resp)
                .await
                .map(|(env, log_id)| reply_from(env, log_id)),
        };
        self.metrics.upstream_latency(
            call.api().as_str(),
            started.elapsed(),
            outcome_label(&result),
            crate::telemetry::trace_id(&tracing::Span::current()),
        );
        result
    }

    async fn get_message_chat(
        &self,
        app: AppIndex,
        token: &str,
        message_id: &str,
    ) -> Result<String, UpstreamError> {
        self.spend(app).await?;
        let url = format!("{}/open-apis/im/v1/messages/{}", self.base_url, message_id);
        let resp = self
            .http
            .get(url)
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .send()
            .await
            .map_err(network_error)?;
        let (env, log_id) = read_envelope(resp).await?;
        env.data
            .as_ref()
            .and_then(|d| d.get("items"))
            .and_then(|i| i.get(0))
            .and_then(|m| m.get("chat_id"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or(UpstreamError::BadResponse {
                http: 200,
                detail: "message answer without data.items[0].chat_id".into(),
                log_id,
            })
    }

    /// Refuses a call of `app` while Feishu's monthly call quota of it is spent.
    fn month_quota(&self, app: AppIndex) -> Result<(), UpstreamError> {
        let a = self.app(app);
        let mut until = a.month_spent.lock();
        let Some(end) = *until else { return Ok(()) };
        let now = jiff::Timestamp::now();
        if now >= end {
            *until = None;
            self.metrics
                .set_app_month_quota_spent(&a.config.name, false);
            tracing::info!(app = %a.config.name, "a new month: the app's calls go to Feishu again");
            return Ok(());
        }
        Err(UpstreamError::MonthQuotaSpent {
            app: a.config.name.clone(),
            reset_in: end.duration_since(now).try_into().unwrap_or_default(),
            log_id: String::new(),
        })
    }

    /// Feishu answered 99991403 for `app`: its calls stop until the month ends.
    fn month_quota_spent(&self, app: AppIndex, log_id: &str) -> UpstreamError {
        let a = self.app(app);
        let now = jiff::Timestamp::now();
        let end = next_month_start(now, MONTH_QUOTA_TIME_ZONE);
        *a.month_spent.lock() = Some(end);
        self.metrics.set_app_month_quota_spent(&a.config.name, true);
        tracing::error!(app = %a.config.name, app_id = %a.config.app_id, log_id, until = %end, "Feishu says this month's API calls of the app are spent (99991403): its calls fail until the month ends; an admin must raise the tenant's plan");
        UpstreamError::MonthQuotaSpent {
            app: a.config.name.clone(),
            reset_in: end.duration_since(now).try_into().unwrap_or_default(),
            log_id: log_id.to_owned(),
        }
    }

    /// Runs `call` with a token; on an invalid-token answer, drops that token, gets a fresh
    /// one (one refresh for all concurrent callers) and tries exactly once more. Nothing is
    /// called while the app's monthly quota is spent (99991403).
    async fn with_token<'a, T, F, Fut>(&'a self, app: AppIndex, call: F) -> Result<T, UpstreamError>
    where
        F: Fn(Arc<str>) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>> + 'a,
    {
        self.month_quota(app)?;
        let result = self.with_token_once(app, call).await;
        match result {
            Err(UpstreamError::Feishu { code, log_id, .. })
                if code == super::error::CODE_MONTH_QUOTA_SPENT =>
            {
                Err(self.month_quota_spent(app, &log_id))
            }
            other => other,
        }
    }

    async fn with_token_once<'a, T, F, Fut>(
        &'a self,
        app: AppIndex,
        call: F,
    ) -> Result<T, UpstreamError>
    where
        F: Fn(Arc<str>) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>> + 'a,
    {
        let token = self.token(app).await?;
        match call(token.clone()).await {
            Err(e) if e.is_token_invalid() => {
                let a = self.app(app);
                tracing::warn!(app = %a.config.name, log_id = %e.log_id(), error = %e, "token refused; refreshing and retrying once");
                a.token.invalidate(&token);
                let token = self.token(app).await?;
                call(token).await
            }
            other => other,
        }
    }
}

fn outcome_label<T>(r: &Result<T, UpstreamError>) -> &'static str {
    r.as_ref().map_or_else(UpstreamError::outcome, |_| "ok")
}

impl Upstream for FeishuClient {
    fn call<'a>(
        &'a self,
        app: AppIndex,
        call: &'a Call,
    ) -> BoxFuture<'a, Result<SentMessage, UpstreamError>> {
        Box::pin(self.with_token(
            app,
            move |t| async move { self.post_call(app, &t, call).await },
        ))
    }

    fn message_chat<'a>(
        &'a self,
        app: AppIndex,
        message_id: &'a str,
    ) -> BoxFuture<'a, Result<String, UpstreamError>> {
        Box::pin(self.with_token(app, move |t| async move {
            self.get_message_chat(app, &t, message_id).await
        }))
    }

    fn reconfigure(&self, apps: &[AppConfig]) {
        let mut current = self.apps.write();
        let next: Arc<[Arc<App>]> = apps
            .iter()
            .enumerate()
            .map(|(i, a)| {
                // Same credentials: the token is still good. New ones: fetch with them.
                let token = match current.get(i) {
                    Some(old)
                        if old.config.app_id == a.app_id
                            && old.config.app_secret == a.app_secret =>
                    {
                        old.token.clone()
                    }
                    _ => Arc::new(TokenCache::new(self.token_refresh_before)),
                };
                // Feishu's monthly quota is the app_id's, whatever its secret.
                let month_spent = match current.get(i) {
                    Some(old) if old.config.app_id == a.app_id => old.month_spent.clone(),
                    _ => Arc::default(),
                };
                Arc::new(App {
                    config: a.clone(),
                    token,
                    month_spent,
                })
            })
            .collect();
        *current = next;
    }
}

fn network_error(e: reqwest::Error) -> UpstreamError {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "io"
    };
    // reqwest's Display already avoids headers; the URL holds no secret.
    let mut detail = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        src = s.source();
    }
    UpstreamError::Network { kind, detail }
}

/// Largest answer read from Feishu. A reply's answer echoes its content (≤ 150 KB, more once
/// JSON-escaped), so 1 MiB leaves room; anything larger is not read whole.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Why reading an answer's body stopped.
enum ReadError {
    Network(reqwest::Error),
    TooLarge { cap: usize },
}

impl ReadError {
    fn into_error(self, http: u16, log_id: &str) -> UpstreamError {
        match self {
            ReadError::Network(e) => network_error(e),
            ReadError::TooLarge { cap } => UpstreamError::BadResponse {
                http,
                detail: format!("answer larger than the {cap}-byte cap; not read"),
                log_id: log_id.to_owned(),
            },
        }
    }
}

/// The body, read chunk by chunk up to `cap` bytes (refused at once when the declared length
/// is already larger).
async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, ReadError> {
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(ReadError::TooLarge { cap });
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(ReadError::Network)? {
        if body.len() + chunk.len() > cap {
            return Err(ReadError::TooLarge { cap });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reads the answer (at most [`MAX_ANSWER_BYTES`]) and classifies it.
async fn read_envelope(resp: reqwest::Response) -> Result<(Envelope, String), UpstreamError> {
    let http = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = read_capped(resp, MAX_ANSWER_BYTES).await.map_err(|e| {
        let log_id = headers
            .get("x-tt-logid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        e.into_error(http, log_id)
    })?;
    parse_envelope(http, &headers, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monthly_quota_resets_on_the_first_china_time() {
        let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        // 3 December, any hour: 1 January 00:00 +08.
        assert_eq!(
            next_month_start(at("2026-12-03T10:00:00Z"), MONTH_QUOTA_TIME_ZONE),
            at("2026-12-31T16:00:00Z")
        );
        // 31 December 17:00 UTC is 1 January 01:00 in China: the quota month is January.
        assert_eq!(
            next_month_start(at("2026-12-31T17:00:00Z"), MONTH_QUOTA_TIME_ZONE),
            at("2027-01-31T16:00:00Z")
        );
    }
}
