//! The gRPC face: `feishu.reply.v1.ReplyGateway`. Converts proto ↔ domain with small functions,
//! applies per-caller admission control, resolves the chat when the caller gave none, and maps
//! every failure through [`CallError::to_status`] (the one error table, `grpc::status`). The async API
//! (`SubmitReply`, `GetReply`, `WatchReply`, `CancelReply`) is in `grpc::jobs`.

mod admin;
mod answer;
mod door;
use door::Door;
mod entry;
use entry::{Entry, call_deadline, caller_label, derived_uuid, explicit_uuid};
mod jobs;
mod message;
pub mod peer;
mod status;
mod stream;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::auth::{Caller, UNAUTHENTICATED};
use crate::chat_cache::ChatCache;
use crate::config::Config;
use crate::feishu::{Api, Call, SendRequest, Upstream};
use crate::jobs::{Jobs, StoredReply};
use crate::listen::Intake;
use crate::metrics::Metrics;
use crate::proto::reply_gateway_server::ReplyGateway;
use crate::proto::{
    GetReplyRequest, RecallMessageRequest, RecallMessageResponse, ReplyJob, ReplyRequest,
    ReplyResponse, SendRequest as SendRequestProto, SubmitReplyResponse, UpdateMessageRequest,
    UpdateMessageResponse,
};
use crate::reply::{RawReply, ValidationError};
use crate::scheduler::GatewayError;
use crate::scheduler::{Delivered, JobSpec, Scheduler, Target};
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

    /// What the door takes of every call before its fields are read: the caller's admission,
    /// an anonymous caller's label, the call's deadline, its intake share, the routing chat.
    fn enter<T>(&self, door: &Door, caller: &Caller, req: &Request<T>) -> Result<Entry, CallError> {
        let peer = req
            .remote_addr()
            .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        self.admit(door, caller, peer)?;
        Ok(Entry {
            label: caller.anonymous.then(|| caller_label(req)).flatten(),
            call_deadline: call_deadline(req, self.max_call),
            header_chat: req
                .metadata()
                .get(CHAT_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            intake: req.extensions().get::<Arc<Intake>>().cloned(),
        })
    }

    /// The app `name` names, if the caller may use it.
    fn app_for(&self, door: &Door, caller: &Caller, name: &str) -> Result<usize, CallError> {
        let app = door.app_index(name)?;
        let a = &door.apps[app];
        if !door.auth.allows(caller, &a.name) {
            return Err(CallError::AppNotAllowed {
                caller: caller.name.to_string(),
                app: a.name.clone(),
            });
        }
        Ok(app)
    }

    /// Fails now what is known to fail: an app whose call budget is spent, a message Feishu
    /// said is gone (no lookup, no queue, no call).
    fn known_to_fail(&self, app: usize, message_id: &str, uuid: &str) -> Result<(), CallError> {
        if let Some(b) = &self.budgets {
            b.check(app).map_err(|error| GatewayError::Upstream {
                error,
                attempts: 0,
                uuid: uuid.to_owned(),
            })?;
        }
        if !message_id.is_empty() && self.scheduler.message_gone(message_id) {
            return Err(GatewayError::MessageGone {
                message_id: message_id.to_owned(),
                attempts: 0,
                uuid: uuid.to_owned(),
            }
            .into());
        }
        Ok(())
    }

    /// The chat of `reply`: the one it names (taken out of it), else looked up (and cached)
    /// within the call's deadline.
    async fn chat_for(
        &self,
        app: usize,
        reply: &mut crate::reply::Reply,
        entry: &Entry,
    ) -> Result<Arc<str>, GatewayError> {
        match reply.chat_id.take() {
            Some(c) => Ok(c.into()),
            None => {
                self.chat_of(app, &reply.message_id, Some(entry.call_deadline))
                    .await
            }
        }
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
        let entry = self.enter(door, caller, &req)?;
        let r = req.into_inner();
        let chat_hint = match entry.header_chat.as_deref() {
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
        let app = self.app_for(door, caller, &r.app)?;
        // The validated copy is what is queued; the request's own must not stay behind it for
        // as long as the reply waits.
        drop(r);
        let a = &door.apps[app];
        // The caller's uuid (given, or derived from the reply), and the one Feishu gets when
        // that differs: an explicit uuid is made the caller's own, so two callers giving the
        // same one cannot suppress each other's reply.
        let (uuid, feishu_uuid) = match reply.uuid.take() {
            Some(u) => {
                let own = explicit_uuid(&entry.who(caller), &a.name, &u);
                (u, Some(own))
            }
            None => (derived_uuid(&entry.who(caller), &a.name, &reply), None),
        };
        self.known_to_fail(app, &reply.message_id, &uuid)?;
        let chat_id = self.chat_for(app, &mut reply, &entry).await?;
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
            send_to: None,
            traceparent: crate::telemetry::traceparent(&tracing::Span::current()),
        };
        let request = Call::Reply(SendRequest {
            message_id: reply.message_id,
            content: reply.content,
            msg_type: reply.msg_type.as_str(),
            reply_in_thread: reply.reply_in_thread,
            uuid: feishu_uuid.clone().unwrap_or_else(|| uuid.clone()),
        });
        let user_id = reply.user_id.map(Into::into);
        let spec = entry.job(
            door,
            caller,
            app,
            ttl,
            (chat_id, user_id, Target::Chat),
            request,
        );
        let spec = JobSpec {
            caller_uuid: feishu_uuid.map(|_| uuid),
            ..spec
        };
        Ok((spec, stored))
    }
}

impl ReplyService {
    /// The caller of `req`, or the UNAUTHENTICATED status (counted and logged).
    fn caller<T>(
        &self,
        door: &Door,
        req: &Request<T>,
        app: &str,
        op: &'static str,
    ) -> Result<Caller, Status> {
        door.auth.authenticate(req).map_err(|e| {
            let e = CallError::from(e);
            self.metrics.request(op, app, e.outcome(), "none");
            self.metrics.caller_request(UNAUTHENTICATED, e.outcome());
            tracing::info!(app = %app, error = %e, "call refused: not authenticated");
            e.to_status()
        })
    }
}

#[tonic::async_trait]
impl ReplyGateway for ReplyService {
    type WatchReplyStream = jobs::JobStream;
    type StreamReplyStream = stream::EventStream;

    async fn stream_reply(
        &self,
        req: Request<tonic::Streaming<crate::proto::StreamReplyRequest>>,
    ) -> Result<Response<Self::StreamReplyStream>, Status> {
        let result = ReplyService::stream_reply(self, req).await;
        if let Err(e) = &result {
            tracing::info!(operation = "stream", error = %e, reason = %e.reason(), "stream refused");
        }
        result.map(Response::new).map_err(|e| e.to_status())
    }

    async fn submit_reply(
        &self,
        req: Request<ReplyRequest>,
    ) -> Result<Response<SubmitReplyResponse>, Status> {
        let door = self.door();
        let app = door.app_label(&req.get_ref().app);
        let caller = self.caller(&door, &req, &app, Api::Reply.as_str())?;
        let span = tracing::info_span!("SubmitReply", otel.kind = "server", caller = %caller.name, app = %app, chat_id = tracing::field::Empty, uuid = tracing::field::Empty, otel.status_code = tracing::field::Empty);
        crate::telemetry::continue_trace(&span, req.metadata());
        let result = self
            .submit(&door, &caller, req)
            .instrument(span.clone())
            .await;
        self.submitted(&caller, &span, result)
    }

    async fn get_reply(&self, req: Request<GetReplyRequest>) -> Result<Response<ReplyJob>, Status> {
        let caller = self.caller(&self.door(), &req, "none", "job")?;
        jobs::answer(self.get(&caller, req.get_ref()).await)
    }

    async fn watch_reply(
        &self,
        req: Request<GetReplyRequest>,
    ) -> Result<Response<Self::WatchReplyStream>, Status> {
        let caller = self.caller(&self.door(), &req, "none", "job")?;
        jobs::answer(self.watch(&caller, req.get_ref()).await)
    }

    async fn cancel_reply(
        &self,
        req: Request<GetReplyRequest>,
    ) -> Result<Response<ReplyJob>, Status> {
        let caller = self.caller(&self.door(), &req, "none", "job")?;
        jobs::answer(self.cancel(&caller, req.get_ref()).await)
    }

    async fn reply(&self, req: Request<ReplyRequest>) -> Result<Response<ReplyResponse>, Status> {
        let r = req.get_ref();
        let door = self.door();
        let app = door.app_label(&r.app);
        let caller = self.caller(&door, &req, &app, Api::Reply.as_str())?;
        let span = tracing::info_span!("Reply", otel.kind = "server", caller = %caller.name, app = %app, message_id = %r.message_id.chars().take(64).collect::<String>(), chat_id = tracing::field::Empty, uuid = tracing::field::Empty, otel.status_code = tracing::field::Empty, grpc.code = tracing::field::Empty);
        crate::telemetry::continue_trace(&span, req.metadata());
        let result = ReplyService::reply(self, &door, &caller, req)
            .instrument(span.clone())
            .await;
        self.finish(Api::Reply, &app, &caller, &span, result, to_response)
    }

    async fn send(
        &self,
        req: Request<SendRequestProto>,
    ) -> Result<Response<ReplyResponse>, Status> {
        let r = req.get_ref();
        let door = self.door();
        let app = door.app_label(&r.app);
        let caller = self.caller(&door, &req, &app, Api::Send.as_str())?;
        let span = tracing::info_span!("Send", otel.kind = "server", operation = "send", caller = %caller.name, app = %app, chat_id = tracing::field::Empty, uuid = tracing::field::Empty, otel.status_code = tracing::field::Empty, grpc.code = tracing::field::Empty);
        crate::telemetry::continue_trace(&span, req.metadata());
        let result = async {
            let (spec, _) = self.prepare_send(&door, &caller, req, None)?;
            Ok(self.scheduler.reply(spec).await?)
        }
        .instrument(span.clone())
        .await;
        self.finish(Api::Send, &app, &caller, &span, result, to_response)
    }

    async fn submit_send(
        &self,
        req: Request<SendRequestProto>,
    ) -> Result<Response<SubmitReplyResponse>, Status> {
        let door = self.door();
        let app = door.app_label(&req.get_ref().app);
        let caller = self.caller(&door, &req, &app, Api::Send.as_str())?;
        let span = tracing::info_span!("SubmitSend", otel.kind = "server", operation = "send", caller = %caller.name, app = %app, chat_id = tracing::field::Empty, uuid = tracing::field::Empty, otel.status_code = tracing::field::Empty);
        crate::telemetry::continue_trace(&span, req.metadata());
        let result = self
            .submit_send_job(&door, &caller, req)
            .instrument(span.clone())
            .await;
        self.submitted(&caller, &span, result)
    }

    async fn update_message(
        &self,
        req: Request<UpdateMessageRequest>,
    ) -> Result<Response<UpdateMessageResponse>, Status> {
        let r = req.get_ref();
        let door = self.door();
        let app = door.app_label(&r.app);
        let op = message::update_api(&r.msg_type);
        let caller = self.caller(&door, &req, &app, op.as_str())?;
        let span = tracing::info_span!("UpdateMessage", otel.kind = "server", operation = op.as_str(), caller = %caller.name, app = %app, message_id = %r.message_id.chars().take(64).collect::<String>(), otel.status_code = tracing::field::Empty, grpc.code = tracing::field::Empty);
        crate::telemetry::continue_trace(&span, req.metadata());
        let result = async {
            let spec = self.prepare_update(&door, &caller, req)?;
            Ok(self.scheduler.reply(spec).await?)
        }
        .instrument(span.clone())
        .await;
        self.finish(op, &app, &caller, &span, result, |d| {
            UpdateMessageResponse {
                superseded: d.superseded,
                attempts: d.attempts,
                queued_ms: u64::try_from(d.queued.as_millis()).unwrap_or(u64::MAX),
            }
        })
    }

    async fn recall_message(
        &self,
        req: Request<RecallMessageRequest>,
    ) -> Result<Response<RecallMessageResponse>, Status> {
        let r = req.get_ref();
        let door = self.door();
        let app = door.app_label(&r.app);
        let caller = self.caller(&door, &req, &app, Api::Recall.as_str())?;
        let span = tracing::info_span!("RecallMessage", otel.kind = "server", operation = "recall", caller = %caller.name, app = %app, message_id = %r.message_id.chars().take(64).collect::<String>(), otel.status_code = tracing::field::Empty, grpc.code = tracing::field::Empty);
        crate::telemetry::continue_trace(&span, req.metadata());
        let result = async {
            let spec = self.prepare_recall(&door, &caller, req)?;
            Ok(self.scheduler.reply(spec).await?)
        }
        .instrument(span.clone())
        .await;
        self.finish(Api::Recall, &app, &caller, &span, result, |d| {
            RecallMessageResponse {
                attempts: d.attempts,
            }
        })
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
