//! A faithful fake of the Feishu endpoints the gateway uses (token, the message endpoints:
//! reply, send, update, edit, recall; get message), for
//! `fake-feishu`, the embedded mode of `serve`, tests and benches. It enforces the documented
//! quotas in a chosen counting mode, dedupes uuid, answers in Feishu's shapes and records
//! everything it received. Control endpoints live under `/_fake/`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::feishu::Api;

pub mod book;
mod cards;
mod messages;
pub mod sim;
mod window;

use window::{Counter, next_f64};

/// How the fake counts its quotas (Feishu does not document its window).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowMode {
    /// At most N in any sliding window W (the strictest reading).
    #[default]
    Sliding,
    /// At most N per aligned window [kW, (k+1)W).
    Fixed,
    /// Token bucket of N refilled at N per W.
    Bucket,
}

/// A quota the fake enforces: `limit` per `window`.
#[derive(Debug, Clone, Copy)]
pub struct FakeQuota {
    pub limit: u32,
    pub window: Duration,
}

/// Settings of a fake. Rates are probabilities in [0, 1].
#[derive(Debug, Clone)]
pub struct FakeOptions {
    pub window: WindowMode,
    pub fail_230049: f64,
    pub fail_5xx: f64,
    /// Delay before answering each request (after it was counted).
    pub latency: Duration,
    /// Each request arrives (is counted) after a random delay in [0, this]: a congested path.
    pub inbound_jitter: Duration,
    /// The first request on each new connection arrives this much later: the TLS handshake a
    /// cold connection to Feishu costs.
    pub cold_connection: Duration,
    pub token_ttl: Duration,
    /// Answer every token request with this raw body (HTTP 200) instead: malformed or
    /// unexpected answers from the token endpoint.
    pub token_body: Option<String>,
    /// Accepted (app_id, app_secret) pairs; empty = accept any.
    pub apps: Vec<(String, String)>,
    pub chat_quota: FakeQuota,
    pub user_quota: FakeQuota,
    /// Per message: its updates and recall (Feishu: 5/s per message).
    pub message_quota: FakeQuota,
    /// Per CardKit card: its text and settings together (Feishu: 10/s per card).
    pub card_quota: FakeQuota,
    /// Feishu turns a card's streaming mode off about 10 minutes after it was turned on
    /// (200850 for a text after that).
    pub card_streaming_limit: Duration,
    /// Per app, for each API on its own unless `app_scope_api` is false.
    pub app_quotas: Vec<FakeQuota>,
    /// Each API has its own app windows ("per API, per app"); false: one set for all.
    pub app_scope_api: bool,
    /// Enforce the quotas (off only for overhead benchmarks).
    pub enforce_quotas: bool,
}

impl Default for FakeOptions {
    fn default() -> Self {
        let q = |limit, ms| FakeQuota {
            limit,
            window: Duration::from_millis(ms),
        };
        Self {
            window: WindowMode::Sliding,
            fail_230049: 0.0,
            fail_5xx: 0.0,
            latency: Duration::ZERO,
            inbound_jitter: Duration::ZERO,
            cold_connection: Duration::ZERO,
            token_ttl: Duration::from_secs(7200),
            token_body: None,
            apps: Vec::new(),
            chat_quota: q(5, 1000),
            user_quota: q(5, 1000),
            message_quota: q(5, 1000),
            card_quota: q(10, 1000),
            card_streaming_limit: Duration::from_secs(600),
            app_quotas: vec![q(50, 1000), q(1000, 60_000)],
            app_scope_api: true,
            enforce_quotas: true,
        }
    }
}

/// A scripted answer for upcoming reply requests (deterministic fault injection).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Fault {
    /// Only for replies to this message (any when None).
    pub message_id: Option<String>,
    /// HTTP status to answer with (e.g. 400, 429, 503).
    pub http: u16,
    /// Feishu code in the body; 0 with `post_then_delay_ms` or `hold` means "post normally".
    pub code: i64,
    pub msg: String,
    /// `x-ogw-ratelimit-reset` header (seconds).
    pub reset_s: Option<u64>,
    /// Post the reply for real, then wait this long before answering (a lost answer, when
    /// longer than the client's timeout).
    pub post_then_delay_ms: Option<u64>,
    /// Post the reply for real, then answer only after [`FakeFeishu::release_held`] (or
    /// `POST /_fake/release`): a slow Feishu whose timing the test controls.
    pub hold: bool,
    /// Answer with a non-JSON body (a proxy's error page).
    pub html: bool,
    /// Post the reply for real, then answer code 0 with this `data` object merged over the
    /// real one (fields Feishu may add, null or drop: `{"thread_id": null}`).
    pub data: Option<serde_json::Value>,
    /// How many requests this applies to.
    pub times: u32,
}

/// One reply request as the fake saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Received {
    pub seq: u64,
    /// Milliseconds since the fake started.
    pub at_ms: f64,
    /// reply, send, update_card, edit or recall.
    #[serde(default)]
    pub operation: String,
    pub message_id: String,
    pub chat_id: String,
    pub app_id: String,
    pub uuid: String,
    pub msg_type: String,
    pub content: String,
    /// Feishu code answered (0 = posted or deduped).
    pub code: i64,
    pub http: u16,
    /// Answered from the uuid cache (no new post).
    pub deduped: bool,
}

/// Counters for tests and benches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeStats {
    pub reply_requests: u64,
    /// Requests to each message endpoint, by operation (`reply`, `send`, `update_card`,
    /// `edit`, `recall`).
    #[serde(default)]
    pub requests_by_operation: std::collections::BTreeMap<String, u64>,
    /// Distinct messages posted.
    pub posted: u64,
    /// 230020 answers from the per-chat/per-user quotas.
    pub rejected_chat_user: u64,
    /// 99991400 answers from the per-app quotas.
    pub rejected_app: u64,
    pub deduped: u64,
    pub faults: u64,
    pub token_requests: u64,
    pub token_rejections: u64,
    pub message_lookups: u64,
}

impl FakeStats {
    pub fn rate_rejections(&self) -> u64 {
        self.rejected_chat_user + self.rejected_app
    }
}

#[derive(Debug, Clone)]
struct MessageInfo {
    chat_id: String,
    user_id: Option<String>,
}

struct Inner {
    opts: FakeOptions,
    tokens: HashMap<String, (String, Instant)>,
    messages: HashMap<String, MessageInfo>,
    counters: HashMap<(u8, String), Counter>,
    uuids: HashMap<String, (Value, Instant)>,
    /// uuids in the order they were stored, for expiry in O(1) per request.
    uuid_order: VecDeque<(Instant, String)>,
    /// The most recent requests (at most [`MAX_RECORDS`]; `stats` counts all of them).
    received: VecDeque<Received>,
    faults: VecDeque<Fault>,
    /// Each message's edits and whether it was recalled.
    book: book::Book,
    stats: FakeStats,
    rng: u64,
}

struct Shared {
    started: Instant,
    /// Bumped by `release_held`: a held answer goes out once this passes its value at arrival.
    released: tokio::sync::watch::Sender<u64>,
    next: AtomicU64,
    inner: Mutex<Inner>,
}

/// A running fake Feishu.
#[derive(Clone)]
pub struct FakeFeishu {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

const UUID_TTL: Duration = Duration::from_secs(3600);
/// Requests kept for inspection: bounds the memory of a long-running fake (benchmarks).
pub const MAX_RECORDS: usize = 200_000;

// === impl FakeFeishu ===

impl FakeFeishu {
    /// Binds `addr` (use port 0 for any) and serves until the runtime stops.
    pub async fn start(addr: SocketAddr, opts: FakeOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self::serve(listener, opts))
    }

    /// Serves on an already bound listener.
    pub fn serve(listener: TcpListener, opts: FakeOptions) -> Self {
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let shared = Arc::new(Shared {
            started: Instant::now(),
            released: tokio::sync::watch::Sender::new(0),
            next: AtomicU64::new(1),
            inner: Mutex::new(Inner {
                opts,
                tokens: HashMap::new(),
                messages: HashMap::new(),
                counters: HashMap::new(),
                uuids: HashMap::new(),
                uuid_order: VecDeque::new(),
                received: VecDeque::new(),
                faults: VecDeque::new(),
                book: book::Book::default(),
                stats: FakeStats::default(),
                rng: 0x9E37_79B9_7F4A_7C15,
            }),
        });
        let app = router(shared.clone());
        tokio::spawn(serve_title_case(listener, app));
        Self { addr, shared }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Time since the fake started (the clock of [`Received::at_ms`]).
    pub fn elapsed(&self) -> Duration {
        self.shared.started.elapsed()
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.inner.lock().received.iter().cloned().collect()
    }

    pub fn stats(&self) -> FakeStats {
        self.shared.inner.lock().stats.clone()
    }

    pub fn push_fault(&self, f: Fault) {
        self.shared.inner.lock().faults.push_back(f);
    }

    /// Declares that `message_id` lives in `chat_id` (and, in a p2p chat, was sent by `user_id`).
    pub fn register_message(&self, message_id: &str, chat_id: &str, user_id: Option<&str>) {
        self.shared.inner.lock().messages.insert(
            message_id.to_owned(),
            MessageInfo {
                chat_id: chat_id.to_owned(),
                user_id: user_id.map(str::to_owned),
            },
        );
    }

    /// Card `card_id` as the fake keeps it (its texts, streaming mode, sequence).
    pub fn card(&self, card_id: &str) -> Option<book::Card> {
        self.shared.inner.lock().book.cards.get(card_id).cloned()
    }

    /// Answers every reply held so far (see [`Fault::hold`]).
    pub fn release_held(&self) {
        self.shared.released.send_modify(|g| *g += 1);
    }

    /// Every issued token becomes invalid (as after a secret rotation).
    pub fn revoke_tokens(&self) {
        self.shared.inner.lock().tokens.clear();
    }

    pub fn set_options(&self, f: impl FnOnce(&mut FakeOptions)) {
        f(&mut self.shared.inner.lock().opts);
    }
}

/// Serves HTTP/1.1 with header names in Feishu's casing (`X-Tt-Logid`): official SDKs copy
/// the headers into a case-sensitive map and look for that exact name.
async fn serve_title_case(listener: TcpListener, app: Router) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "fake Feishu accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = NewConnection(Arc::new(std::sync::atomic::AtomicBool::new(true)));
        let service = TowerToHyperService::new(app.clone().layer(axum::Extension(conn)));
        tokio::spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder.http1().title_case_headers(true);
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Set on each accepted connection until its first request has been read.
#[derive(Clone)]
struct NewConnection(Arc<std::sync::atomic::AtomicBool>);

/// How long a request takes to "arrive" (to be counted) after it was read: the cold-connection
/// delay for the first request of a connection, plus a random inbound delay.
async fn arrive(s: &Shared, conn: Option<&NewConnection>) {
    let first = conn.is_some_and(|c| c.0.swap(false, Ordering::Relaxed));
    let delay = {
        let mut inner = s.inner.lock();
        let (jitter, cold) = (inner.opts.inbound_jitter, inner.opts.cold_connection);
        let mut d = if first { cold } else { Duration::ZERO };
        if !jitter.is_zero() {
            d += jitter.mul_f64(next_f64(&mut inner.rng));
        }
        d
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/open-apis/auth/v3/tenant_access_token/internal",
            post(token),
        )
        .route(
            "/open-apis/im/v1/messages/{message_id}/reply",
            post(messages::reply),
        )
        .route("/open-apis/im/v1/messages", post(messages::send))
        .route("/open-apis/cardkit/v1/cards", post(cards::create))
        .route(
            "/open-apis/cardkit/v1/cards/{card_id}/elements/{element_id}/content",
            axum::routing::put(cards::content),
        )
        .route(
            "/open-apis/cardkit/v1/cards/{card_id}/settings",
            axum::routing::patch(cards::settings),
        )
        .route(
            "/open-apis/im/v1/messages/{message_id}",
            get(messages::get_message)
                .patch(|s, c, p, h, b| messages::change(Api::UpdateCard, s, c, p, h, b))
                .put(|s, c, p, h, b| messages::change(Api::Edit, s, c, p, h, b))
                .delete(|s, c, p, h, b| messages::change(Api::Recall, s, c, p, h, b)),
        )
        .route(
            "/_fake/received",
            get(|State(s): State<Arc<Shared>>| async move {
                Json(s.inner.lock().received.iter().cloned().collect::<Vec<_>>())
            }),
        )
        .route(
            "/_fake/stats",
            get(|State(s): State<Arc<Shared>>| async move { Json(s.inner.lock().stats.clone()) }),
        )
        .route(
            "/_fake/faults",
            post(
                |State(s): State<Arc<Shared>>, Json(f): Json<Fault>| async move {
                    s.inner.lock().faults.push_back(f);
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .route(
            "/_fake/release",
            post(|State(s): State<Arc<Shared>>| async move {
                s.released.send_modify(|g| *g += 1);
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/_fake/tokens/revoke",
            post(|State(s): State<Arc<Shared>>| async move {
                s.inner.lock().tokens.clear();
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/_fake/messages",
            post(
                |State(s): State<Arc<Shared>>, Json(m): Json<RegisterMessage>| async move {
                    s.inner.lock().messages.insert(
                        m.message_id,
                        MessageInfo {
                            chat_id: m.chat_id,
                            user_id: m.user_id,
                        },
                    );
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(shared)
}

#[derive(Deserialize)]
struct RegisterMessage {
    message_id: String,
    chat_id: String,
    user_id: Option<String>,
}

fn feishu(shared: &Shared, http: u16, body: Value) -> Response {
    let log_id = format!("2026{:020X}", shared.next.fetch_add(1, Ordering::Relaxed));
    let mut resp = (
        StatusCode::from_u16(http).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(body),
    )
        .into_response();
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&log_id) {
        h.insert("x-tt-logid", v);
    }
    resp
}

fn error(shared: &Shared, http: u16, code: i64, msg: &str) -> Response {
    feishu(
        shared,
        http,
        json!({ "code": code, "msg": msg, "data": {} }),
    )
}

#[derive(Deserialize)]
struct TokenBody {
    #[serde(default)]
    app_id: String,
    #[serde(default)]
    app_secret: String,
}

async fn token(
    State(s): State<Arc<Shared>>,
    conn: Option<axum::Extension<NewConnection>>,
    body: axum::body::Bytes,
) -> Response {
    arrive(&s, conn.as_deref()).await;
    let latency = s.inner.lock().opts.latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let Ok(b) = serde_json::from_slice::<TokenBody>(&body) else {
        return error(&s, 400, 9499, "Bad Request");
    };
    let mut inner = s.inner.lock();
    inner.stats.token_requests += 1;
    if let Some(raw) = inner.opts.token_body.clone() {
        drop(inner);
        let mut r = (StatusCode::OK, raw).into_response();
        r.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        return r;
    }
    let known = inner.opts.apps.is_empty()
        || inner
            .opts
            .apps
            .iter()
            .any(|(id, secret)| *id == b.app_id && *secret == b.app_secret);
    if b.app_id.is_empty() || !known {
        inner.stats.token_rejections += 1;
        drop(inner);
        return error(&s, 400, 10014, "app secret invalid");
    }
    let ttl = inner.opts.token_ttl;
    let value = format!(
        "t-fake{:016x}",
        s.next.fetch_add(1, Ordering::Relaxed) ^ 0x5eed
    );
    inner
        .tokens
        .insert(value.clone(), (b.app_id, far_or(Instant::now(), ttl)));
    drop(inner);
    feishu(
        &s,
        200,
        json!({ "code": 0, "msg": "ok", "tenant_access_token": value, "expire": ttl.as_secs() }),
    )
}

/// `now + ttl`, or a century from now when that does not fit (tests give absurd TTLs).
fn far_or(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// The app_id behind a valid bearer token, or Feishu's invalid-token (code, msg).
fn authorize(inner: &Inner, headers: &HeaderMap) -> Result<String, (i64, &'static str)> {
    let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return Err((99991661, "Missing access token for authorization."));
    };
    let token = auth.strip_prefix("Bearer ").unwrap_or("");
    match inner.tokens.get(token) {
        Some((app, exp)) if *exp > Instant::now() => Ok(app.clone()),
        _ => Err((99991663, "Invalid access token for authorization.")),
    }
}

/// Messages the fake was not told about live in a chat of their own, except `om_X_in_NAME`,
/// which lives in chat `oc_NAME` (handy for tests that need several messages per chat).
fn message_info(inner: &Inner, message_id: &str) -> MessageInfo {
    match inner.messages.get(message_id) {
        Some(m) => m.clone(),
        None => message_info_unregistered(message_id),
    }
}

/// Where a message the fake was not told about lives (see [`message_info`]).
fn message_info_unregistered(message_id: &str) -> MessageInfo {
    let chat = match message_id.split_once("_in_") {
        Some((_, chat)) => format!("oc_{chat}"),
        None => format!("oc_{}", message_id.trim_start_matches("om_")),
    };
    MessageInfo {
        chat_id: chat,
        user_id: None,
    }
}

fn well_formed_id(id: &str) -> bool {
    id.starts_with("om_")
        && id.len() <= 128
        && id[3..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && id.len() > 3
}
