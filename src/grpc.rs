//! The gRPC face: `feishu.reply.v1.ReplyGateway`. Converts proto ↔ domain with small functions,
//! applies per-caller admission control, resolves the chat when the caller gave none, and maps
//! every failure through [`GatewayError::to_status`] (the one error table).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::chat_cache::ChatCache;
use crate::config::{AdmissionConfig, AppConfig};
use crate::error::GatewayError;
use crate::feishu::{SendRequest, Upstream};
use crate::metrics::Metrics;
use crate::proto::reply_gateway_server::ReplyGateway;
use crate::proto::{ReplyRequest, ReplyResponse};
use crate::reply::{RawReply, ValidationError};
use crate::scheduler::{Delivered, JobSpec, Scheduler};

/// gRPC metadata naming the calling service (admission control key).
pub const CALLER_HEADER: &str = "x-caller";
/// gRPC metadata carrying the chat id (also the routing key for ring-hash load balancing).
pub const CHAT_HEADER: &str = "x-chat-id";

/// Everything a Reply call needs; shared by all calls.
pub struct ReplyService {
    apps: Vec<AppConfig>,
    default_app: Option<usize>,
    scheduler: Scheduler,
    upstream: Arc<dyn Upstream>,
    chats: ChatCache,
    admission: DefaultKeyedRateLimiter<String>,
    metrics: Arc<Metrics>,
}

impl ReplyService {
    pub fn new(
        apps: Vec<AppConfig>,
        default_app: Option<&str>,
        admission: &AdmissionConfig,
        chat_cache_size: usize,
        scheduler: Scheduler,
        upstream: Arc<dyn Upstream>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let default_app = default_app.and_then(|d| apps.iter().position(|a| a.name == d));
        let quota =
            Quota::per_second(admission.per_caller_rps).allow_burst(admission.per_caller_burst);
        Self {
            apps,
            default_app,
            scheduler,
            upstream,
            chats: ChatCache::new(chat_cache_size),
            admission: RateLimiter::keyed(quota),
            metrics,
        }
    }

    /// Forget admission state of callers that went quiet (bounded memory).
    pub fn forget_idle_callers(&self) {
        self.admission.retain_recent();
        self.admission.shrink_to_fit();
    }

    fn app_index(&self, name: &str) -> Result<usize, GatewayError> {
        if name.is_empty() {
            return self.default_app.ok_or(GatewayError::NoDefaultApp);
        }
        self.apps
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| GatewayError::UnknownApp(name.chars().take(64).collect()))
    }

    fn admit(&self, caller: &str) -> Result<(), GatewayError> {
        self.admission
            .check_key(&caller.to_owned())
            .map_err(|not_until| {
                self.metrics.admission_rejected();
                GatewayError::CallerRateLimited {
                    caller: caller.to_owned(),
                    retry_after: not_until
                        .wait_time_from(DefaultClock::default().now())
                        .max(Duration::from_millis(1)),
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
                Err(GatewayError::ChatLookup(e))
            }
        }
    }

    async fn reply(&self, req: Request<ReplyRequest>) -> Result<Delivered, GatewayError> {
        let caller = caller_of(&req);
        self.admit(&caller)?;
        let deadline = grpc_deadline(&req);
        let header_chat = req
            .metadata()
            .get(CHAT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
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
        let reply = RawReply {
            message_id: &r.message_id,
            msg_type: &r.msg_type,
            content: &r.content,
            reply_in_thread: r.reply_in_thread,
            uuid: &r.uuid,
            chat_id: chat_hint,
            user_id: &r.user_id,
        }
        .validate()?;
        let app = self.app_index(&r.app)?;
        let chat_id = match reply.chat_id {
            Some(c) => c.into(),
            None => self.chat_of(app, &reply.message_id, deadline).await?,
        };
        let uuid = reply
            .uuid
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        tracing::Span::current()
            .record("chat_id", &*chat_id)
            .record("uuid", &uuid);
        let a = &self.apps[app];
        let spec = JobSpec {
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
                uuid,
            },
            deadline,
        };
        self.scheduler.reply(spec).await
    }

    fn app_label(&self, name: &str) -> String {
        match self.app_index(name) {
            Ok(i) => self.apps[i].name.clone(),
            Err(_) => "unknown".into(),
        }
    }
}

#[tonic::async_trait]
impl ReplyGateway for ReplyService {
    async fn reply(&self, req: Request<ReplyRequest>) -> Result<Response<ReplyResponse>, Status> {
        let r = req.get_ref();
        let app = self.app_label(&r.app);
        let span = tracing::info_span!("reply", app = %app, message_id = %r.message_id.chars().take(64).collect::<String>(), chat_id = tracing::field::Empty, uuid = tracing::field::Empty);
        let result = ReplyService::reply(self, req)
            .instrument(span.clone())
            .await;
        let _enter = span.enter();
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
                Err(e.to_status())
            }
        }
    }
}

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

/// The caller: `x-caller` metadata, else the peer's IP address.
fn caller_of<T>(req: &Request<T>) -> String {
    if let Some(c) = req
        .metadata()
        .get(CALLER_HEADER)
        .and_then(|v| v.to_str().ok())
        && !c.is_empty()
    {
        return c.chars().take(128).collect();
    }
    req.remote_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]))
        .to_string()
}

/// The call's deadline from the `grpc-timeout` header (e.g. `500m`, `3S`).
fn grpc_deadline<T>(req: &Request<T>) -> Option<Instant> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(v).map(|d| Instant::now() + d)
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
