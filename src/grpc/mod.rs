//! The gRPC face: `feishu.reply.v1.ReplyGateway`. Converts proto ↔ domain with small functions,
//! applies per-caller admission control, resolves the chat when the caller gave none, and maps
//! every failure through [`CallError::to_status`] (the one error table, `grpc::status`). The async API
//! (`SubmitReply`, `GetReply`, `WatchReply`, `CancelReply`) is in `grpc::jobs`.

mod admin;
mod jobs;
mod status;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::auth::{Admission, Authenticator, Caller, UNAUTHENTICATED};
use crate::chat_cache::ChatCache;
use crate::config::{AppConfig, Config};
use crate::feishu::{SendRequest, Upstream};
use crate::jobs::{Jobs, StoredReply};
use crate::listen::Intake;
use crate::metrics::Metrics;
use crate::proto::reply_gateway_server::ReplyGateway;
use crate::proto::{GetReplyRequest, ReplyJob, ReplyRequest, ReplyResponse, SubmitReplyResponse};
use crate::reply::{RawReply, Reply as ValidReply, ValidationError};
use crate::scheduler::GatewayError;
use crate::scheduler::{Delivered, JobSpec, Scheduler};
pub use jobs::JobAnswers;
pub use status::{CallError, ERROR_DOMAIN};

/// gRPC metadata naming the calling service: a label for logs when calls are anonymous (never
/// an identity, never a metric or admission key).
pub const CALLER_HEADER: &str = "x-caller";
/// gRPC metadata carrying the chat id (also the routing key for ring-hash load balancing).
pub const CHAT_HEADER: &str = "x-chat-id";

/// Everything a Reply call needs; shared by all calls.
pub struct ReplyService {
    /// The apps and callers running now; a live reload replaces it ([`ReplyService::reload`]).
    door: parking_lot::RwLock<Arc<Door>>,
    scheduler: Scheduler,
    upstream: Arc<dyn Upstream>,
    chats: ChatCache,
    /// The longest a call is held (its deadline is capped at this).
    max_call: Duration,
    metrics: Arc<Metrics>,
    /// Async jobs (`SubmitReply` …), when a job store is configured.
    jobs: Option<Arc<Jobs>>,
    /// Apps' call budgets, checked at the door.
    budgets: Option<Arc<crate::budget::Budgets>>,
    /// Cluster mode: where the shared quota counts are (introspection reads them).
    redis: Option<Arc<crate::cluster::RedisQuota>>,
}

/// What the door checks against, replaced whole by a live reload: the apps (by index, removed
/// ones kept as tombstones), who may call, and their admission buckets.
pub(crate) struct Door {
    pub(crate) apps: Vec<AppConfig>,
    default_app: Option<usize>,
    pub(crate) auth: Authenticator,
    admission: Admission,
}

impl Door {
    fn new(config: &Config, admission: Option<&Admission>) -> Self {
        let apps = config.apps.clone();
        let default_app = config
            .default_app
            .as_deref()
            .and_then(|d| apps.iter().position(|a| a.name == d && !a.removed));
        let auth = Authenticator::new(&config.auth);
        let admission = match admission {
            Some(running) => running.next(auth.limits()),
            None => Admission::new(auth.limits()),
        };
        Self {
            apps,
            default_app,
            auth,
            admission,
        }
    }

    /// App `name`'s configured name for metrics and logs (`unknown` when it has none).
    fn app_label(&self, name: &str) -> String {
        match self.app_index(name) {
            Ok(i) => self.apps[i].name.clone(),
            Err(_) => "unknown".into(),
        }
    }

    /// The index of app `name` (the default app for ""); a removed app is unknown.
    pub(crate) fn app_index(&self, name: &str) -> Result<usize, GatewayError> {
        if name.is_empty() {
            return self.default_app.ok_or(GatewayError::NoDefaultApp);
        }
        self.apps
            .iter()
            .position(|a| a.name == name && !a.removed)
            .ok_or_else(|| GatewayError::UnknownApp(name.chars().take(64).collect()))
    }
}

impl ReplyService {
    /// The service for `config`'s apps, callers and limits.
    pub fn new(
        config: &Config,
        scheduler: Scheduler,
        upstream: Arc<dyn Upstream>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let door = Door::new(config, None);
        for name in door.auth.names() {
            metrics.init_caller(name);
        }
        Self {
            door: parking_lot::RwLock::new(Arc::new(door)),
            scheduler,
            upstream,
            chats: ChatCache::new(config.queue.chat_cache_size),
            max_call: config.limits.max_call,
            metrics,
            jobs: None,
            budgets: None,
            redis: None,
        }
    }

    /// Cluster mode: introspection reads the shared quota counts from this Redis.
    pub fn with_redis(mut self, redis: Arc<crate::cluster::RedisQuota>) -> Self {
        self.redis = Some(redis);
        self
    }

    /// Refuses calls for apps whose call budget is spent, before they are queued.
    pub fn with_budgets(mut self, budgets: Arc<crate::budget::Budgets>) -> Self {
        self.budgets = Some(budgets);
        self
    }

    /// The apps and callers running now.
    pub(crate) fn door(&self) -> Arc<Door> {
        self.door.read().clone()
    }

    /// A live reload: `config` (lined up with the running one, see `config::live`) becomes
    /// the door's apps, callers and buckets.
    pub fn reload(&self, config: &Config) {
        let mut door = self.door.write();
        let next = Door::new(config, Some(&door.admission));
        for name in next.auth.names() {
            self.metrics.init_caller(name);
        }
        *door = Arc::new(next);
    }

    /// What rebuilding a stored job needs (apps, callers by id).
    pub fn job_specs(&self) -> crate::jobs::Specs {
        let door = self.door();
        crate::jobs::Specs::new(&door.apps, door.auth.owners())
    }

    /// Serves the async API from `jobs`.
    pub fn with_jobs(mut self, jobs: Arc<Jobs>) -> Self {
        self.jobs = Some(jobs);
        self
    }

    /// Forget admission state of anonymous peers that went quiet (bounded memory).
    pub fn forget_idle_callers(&self) {
        self.door().admission.forget_idle();
    }

    fn admit(&self, door: &Door, caller: &Caller, peer: IpAddr) -> Result<(), CallError> {
        door.admission.check(caller, peer).map_err(|wait| {
            self.metrics.admission_rejected(&caller.name);
            CallError::CallerRateLimited {
                caller: caller.name.to_string(),
                retry_after: wait.max(Duration::from_millis(1)),
            }
        })
    }

    async fn chat_of(
        &self,
        app: usize,
        message_id: &str,
        deadline: Option<Instant>,
    ) -> Result<Arc<str>, GatewayError> {
        if let Some(chat) = self.chats.get(message_id) {
            self.metrics.chat_lookup("hit");
            return Ok(chat);
        }
        let lookup = self.upstream.message_chat(app, message_id);
        let result = match deadline {
            Some(d) => match tokio::time::timeout_at(d, lookup).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(GatewayError::DeadlineBeforeSend {
                        attempts: 0,
                        uuid: String::new(),
                    });
                }
            },
            None => lookup.await,
        };
        match result {
            Ok(chat) => {
                self.metrics.chat_lookup("miss");
                let chat: Arc<str> = chat.into();
                self.chats.insert(message_id, chat.clone());
                Ok(chat)
            }
            Err(e) => {
                self.metrics.chat_lookup("error");
                if e.code()
                    .is_some_and(|c| crate::scheduler::gone::GONE_CODES.contains(&c))
                {
                    self.scheduler.remember_gone(message_id);
                }
                Err(GatewayError::ChatLookup(e))
            }
        }
    }

    async fn reply(
        &self,
        door: &Door,
        caller: &Caller,
        req: Request<ReplyRequest>,
    ) -> Result<Delivered, CallError> {
        let (spec, _) = self.prepare(door, caller, req, None).await?;
        Ok(self.scheduler.reply(spec).await?)
    }

    /// A request checked and made a scheduler job: admission, validation, authorization,
    /// the chat resolved, the uuid fixed. With `ttl` (async jobs) the job's deadline is
    /// now + ttl; else the call's deadline. `door`: the apps and callers the call is checked
    /// against (one snapshot for the whole call).
    async fn prepare(
        &self,
        door: &Door,
        caller: &Caller,
        req: Request<ReplyRequest>,
        ttl: Option<Duration>,
    ) -> Result<(JobSpec, StoredReply), CallError> {
        let peer = req
            .remote_addr()
            .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        self.admit(door, caller, peer)?;
        let label = caller.anonymous.then(|| caller_label(&req)).flatten();
        let call_deadline = Some(call_deadline(&req, self.max_call));
        let header_chat = req
            .metadata()
            .get(CHAT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let intake = req.extensions().get::<Arc<Intake>>().cloned();
        let r = req.into_inner();
        let chat_hint = match header_chat.as_deref() {
            Some(h) if !h.is_empty() && !r.chat_id.is_empty() && h != r.chat_id => {
                // Routed (ring hash) by one chat, paced by another: a caller bug.
                return Err(ValidationError::BadId {
                    field: "chat_id",
                    why: format!(
                        "the request says {:?} but {CHAT_HEADER} metadata says {h:?}",
                        r.chat_id
                    ),
                }
                .into());
            }
            Some(h) if r.chat_id.is_empty() => h,
            _ => &r.chat_id,
        };
        let mut reply = RawReply {
            message_id: &r.message_id,
            msg_type: &r.msg_type,
            content: &r.content,
            reply_in_thread: r.reply_in_thread,
            uuid: &r.uuid,
            chat_id: chat_hint,
            user_id: &r.user_id,
        }
        .validate()?;
        let app = door.app_index(&r.app)?;
        // The validated copy is what is queued; the request's own must not stay behind it for
        // as long as the reply waits.
        drop(r);
        let a = &door.apps[app];
        if !door.auth.allows(caller, &a.name) {
            return Err(CallError::AppNotAllowed {
                caller: caller.name.to_string(),
                app: a.name.clone(),
            });
        }
        let who = [
            caller.name.as_bytes(),
            label.as_deref().unwrap_or("").as_bytes(),
        ];
        // The caller's uuid (given, or derived from the reply), and the one Feishu gets when
        // that differs: an explicit uuid is made the caller's own, so two callers giving the
        // same one cannot suppress each other's reply.
        let (uuid, feishu_uuid) = match reply.uuid.take() {
            Some(u) => {
                let own = explicit_uuid(&who, &a.name, &u);
                (u, Some(own))
            }
            None => (derived_uuid(&who, &a.name, &reply), None),
        };
        // An app whose call budget is known to be spent: fail now, not after the queue.
        if let Some(b) = &self.budgets {
            b.check(app).map_err(|error| GatewayError::Upstream {
                error,
                attempts: 0,
                uuid: uuid.clone(),
            })?;
        }
        // A message Feishu said is gone: no lookup, no queue, no call.
        if self.scheduler.message_gone(&reply.message_id) {
            return Err(GatewayError::MessageGone {
                message_id: reply.message_id.clone(),
                attempts: 0,
                uuid,
            }
            .into());
        }
        let chat_id = match reply.chat_id {
            Some(c) => c.into(),
            None => self.chat_of(app, &reply.message_id, call_deadline).await?,
        };
        tracing::Span::current()
            .record("chat_id", &*chat_id)
            .record("uuid", &uuid);
        let stored = StoredReply {
            app: a.name.clone(),
            message_id: reply.message_id.clone(),
            msg_type: reply.msg_type.as_str().to_owned(),
            content: String::new(), // filled by the async path only (it stores the job)
            reply_in_thread: reply.reply_in_thread,
            uuid: uuid.clone(),
            feishu_uuid: feishu_uuid.clone(),
            chat_id: chat_id.to_string(),
            user_id: reply.user_id.clone(),
            traceparent: crate::telemetry::traceparent(&tracing::Span::current()),
        };
        let spec = JobSpec {
            caller: caller.id,
            credential: caller.credential.clone(),
            intake: intake.map(|i| i as Arc<dyn std::any::Any + Send + Sync>),
            on_send: None,
            app,
            app_name: a.name.as_str().into(),
            app_id: a.app_id.as_str().into(),
            chat_id,
            user_id: reply.user_id.map(Into::into),
            request: SendRequest {
                message_id: reply.message_id,
                content: reply.content,
                msg_type: reply.msg_type.as_str(),
                reply_in_thread: reply.reply_in_thread,
                uuid: feishu_uuid.clone().unwrap_or_else(|| uuid.clone()),
            },
            caller_uuid: feishu_uuid.map(|_| uuid),
            deadline: match ttl {
                Some(ttl) => Some(Instant::now() + ttl),
                None => call_deadline,
            },
            span: tracing::Span::current(),
        };
        Ok((spec, stored))
    }
}

impl ReplyService {
    /// The caller of `req`, or the UNAUTHENTICATED status (counted and logged).
    fn caller<T>(&self, door: &Door, req: &Request<T>, app: &str) -> Result<Caller, Status> {
        door.auth.authenticate(req).map_err(|e| {
            let e = CallError::from(e);
            self.metrics.request(app, e.outcome(), "none");
            self.metrics.caller_request(UNAUTHENTICATED, e.outcome());
            tracing::info!(app = %app, error = %e, "call refused: not authenticated");
            e.to_status()
        })
    }
}

#[tonic::async_trait]
impl ReplyGateway for ReplyService {
    type WatchReplyStream = jobs::JobStream;

    async fn submit_reply(
        &self,
        req: Request<ReplyRequest>,
    ) -> Result<Response<SubmitReplyResponse>, Status> {
        let door = self.door();
        let app = door.app_label(&req.get_ref().app);
        let caller = self.caller(&door, &req, &app)?;
        let span = tracing::info_span!("SubmitReply", otel.kind = "server", caller = %caller.name, app = %app, chat_id = tracing::field::Empty, uuid = tracing::field::Empty, otel.status_code = tracing::field::Empty);
        crate::telemetry::continue_trace(&span, req.metadata());
        let result = self
            .submit(&door, &caller, req)
            .instrument(span.clone())
            .await;
        let outcome = result.as_ref().map_or_else(|e| e.outcome(), |_| "ok");
        self.metrics.caller_request(&caller.name, outcome);
        if let Err(e) = &result {
            span.record("otel.status_code", "ERROR");
            let _enter = span.enter();
            tracing::info!(error = %e, reason = %e.reason(), "submit refused");
        }
        jobs::answer(result)
    }

    async fn get_reply(&self, req: Request<GetReplyRequest>) -> Result<Response<ReplyJob>, Status> {
        let caller = self.caller(&self.door(), &req, "none")?;
        jobs::answer(self.get(&caller, req.get_ref()).await)
    }

    async fn watch_reply(
        &self,
        req: Request<GetReplyRequest>,
    ) -> Result<Response<Self::WatchReplyStream>, Status> {
        let caller = self.caller(&self.door(), &req, "none")?;
        jobs::answer(self.watch(&caller, req.get_ref()).await)
    }

    async fn cancel_reply(
        &self,
        req: Request<GetReplyRequest>,
    ) -> Result<Response<ReplyJob>, Status> {
        let caller = self.caller(&self.door(), &req, "none")?;
        jobs::answer(self.cancel(&caller, req.get_ref()).await)
    }

    async fn reply(&self, req: Request<ReplyRequest>) -> Result<Response<ReplyResponse>, Status> {
        let r = req.get_ref();
        let door = self.door();
        let app = door.app_label(&r.app);
        let caller = self.caller(&door, &req, &app)?;
        let span = tracing::info_span!("Reply", otel.kind = "server", caller = %caller.name, app = %app, message_id = %r.message_id.chars().take(64).collect::<String>(), chat_id = tracing::field::Empty, uuid = tracing::field::Empty, otel.status_code = tracing::field::Empty, grpc.code = tracing::field::Empty);
        crate::telemetry::continue_trace(&span, req.metadata());
        let result = ReplyService::reply(self, &door, &caller, req)
            .instrument(span.clone())
            .await;
        let _enter = span.enter();
        let outcome = result.as_ref().map_or_else(|e| e.outcome(), |_| "ok");
        self.metrics.caller_request(&caller.name, outcome);
        match result {
            Ok(d) => {
                self.metrics.request(&app, "ok", "0");
                tracing::debug!(attempts = d.attempts, queued_ms = d.queued.as_millis() as u64, log_id = %d.message.log_id, "replied");
                Ok(Response::new(to_response(d)))
            }
            Err(e) => {
                let code = e
                    .feishu_code()
                    .map_or_else(|| "none".to_owned(), |c| c.to_string());
                self.metrics.request(&app, e.outcome(), &code);
                tracing::info!(error = %e, reason = %e.reason(), "reply refused or failed");
                let status = e.to_status();
                span.record("otel.status_code", "ERROR")
                    .record("grpc.code", status.code() as i32);
                Err(status)
            }
        }
    }
}

/// The API's view of a delivered reply.
fn to_response(d: Delivered) -> ReplyResponse {
    let m = d.message;
    ReplyResponse {
        message_id: m.message_id,
        root_id: m.root_id,
        parent_id: m.parent_id,
        thread_id: m.thread_id,
        chat_id: m.chat_id,
        msg_type: m.msg_type,
        create_time: m.create_time,
        uuid: d.uuid,
        attempts: d.attempts,
        queued_ms: u64::try_from(d.queued.as_millis()).unwrap_or(u64::MAX),
    }
}

/// An anonymous caller's `x-caller` label, for logs only: at most 64 characters of
/// `[A-Za-z0-9._-]` (anything else is dropped).
fn caller_label<T>(req: &Request<T>) -> Option<String> {
    let v = req.metadata().get(CALLER_HEADER)?.to_str().ok()?;
    let label: String = v
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    (!label.is_empty()).then_some(label)
}

/// The uuid of a reply whose caller gave none: derived from who sent it (the authenticated
/// caller; an anonymous caller's label), the app and the reply itself, so a call retried by
/// its caller or a mesh reuses it and Feishu posts it once (its dedupe window is 1 h). A
/// caller that means to post the same reply twice gives each its own uuid.
fn derived_uuid(who: &[&[u8]], app: &str, reply: &ValidReply) -> String {
    let thread = [u8::from(reply.reply_in_thread)];
    let mut fields: Vec<&[u8]> = vec![b"feishu-reply-gateway/uuid/v1"];
    fields.extend_from_slice(who);
    fields.extend_from_slice(&[
        app.as_bytes(),
        reply.message_id.as_bytes(),
        reply.msg_type.as_str().as_bytes(),
        reply.content.as_bytes(),
        &thread,
    ]);
    uuid_of(&fields)
}

/// The uuid Feishu gets for a uuid the caller gave: derived from who gave it and for which
/// app, so it is that caller's own (the caller is still told the uuid it gave).
fn explicit_uuid(who: &[&[u8]], app: &str, given: &str) -> String {
    let mut fields: Vec<&[u8]> = vec![b"feishu-reply-gateway/explicit-uuid/v1"];
    fields.extend_from_slice(who);
    fields.extend_from_slice(&[app.as_bytes(), given.as_bytes()]);
    uuid_of(&fields)
}

/// A v8 uuid from the SHA-256 of `fields`, each length-prefixed.
fn uuid_of(fields: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for f in fields {
        ctx.update(&(f.len() as u64).to_be_bytes());
        ctx.update(f);
    }
    let digest = ctx.finish();
    let bytes: [u8; 16] = digest.as_ref()[..16].try_into().expect("32 > 16");
    uuid::Uuid::new_v8(bytes).to_string()
}

/// The call's deadline: its `grpc-timeout` header (e.g. `500m`, `3S`), at most `max_call`
/// from now (also when it has none: no call is held without bound).
fn call_deadline<T>(req: &Request<T>, max_call: Duration) -> Instant {
    let asked = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    Instant::now() + asked.map_or(max_call, |d| d.min(max_call))
}

fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("500m"), Some(Duration::from_millis(500)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }
}
