//! The admin service (`ReplyAdmin`): introspection for operators, on the same port, for
//! callers with `admin = true`.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::CallError;
use super::ReplyService;
use crate::proto::reply_admin_server::ReplyAdmin;
use crate::proto::{
    AppState, Budget, CallerState, ChatState, InspectAppRequest, InspectCallerRequest,
    InspectChatRequest, QuotaState,
};
use crate::scheduler::GatewayError;
use crate::scheduler::inspect::{self as snapshot, ChatSnapshot};

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The dispatcher went away (shutting down): no answer.
fn gone() -> GatewayError {
    GatewayError::ShuttingDown {
        attempts: 0,
        uuid: String::new(),
    }
}

impl ReplyService {
    /// `quotas` as the API shows them, with Redis's shared counts in cluster mode (when it
    /// answers), and where the counts came from.
    async fn counted(&self, local: &[snapshot::QuotaState]) -> (Vec<QuotaState>, &'static str) {
        let mut quotas: Vec<QuotaState> = local
            .iter()
            .map(|q| QuotaState {
                kind: q.kind.clone(),
                id: q.id.clone(),
                limit: q.limit,
                window_ms: ms(q.window),
                used: q.used,
                frees_in_ms: ms(q.frees_in),
            })
            .collect();
        if let Some(redis) = &self.redis {
            // Partitioned, a chat's (message's, card's) window is its owner's, not Redis's:
            // those stay as this replica counts them.
            let (idx, keys): (Vec<usize>, Vec<_>) = local
                .iter()
                .enumerate()
                .filter(|(_, q)| redis.holds(&q.kind))
                .map(|(i, q)| (i, redis.shared_key(&q.kind, &q.id, q.limit, q.span_us)))
                .unzip();
            match redis.inspect(&keys).await {
                Ok(counts) => {
                    for (i, (used, frees_in)) in idx.into_iter().zip(counts) {
                        quotas[i].used = used;
                        quotas[i].frees_in_ms = ms(frees_in);
                    }
                    return (quotas, "redis");
                }
                Err(e) => {
                    tracing::debug!(error = %e, "inspect: redis did not answer; local counts")
                }
            }
        }
        (quotas, "local")
    }

    async fn inspect_app(&self, name: &str) -> Result<AppState, GatewayError> {
        let unknown = || GatewayError::UnknownApp(name.chars().take(64).collect());
        let door = self.door();
        let app = door.app_index(name).map_err(|_| unknown())?;
        let a = &door.apps[app];
        if a.name != name {
            // app_index maps "" to the default app; an app is named here.
            return Err(unknown());
        }
        let snap = self
            .scheduler
            .inspect_app(app, a.app_id.as_str().into())
            .await
            .ok_or_else(gone)?;
        let (quotas, source) = self.counted(&snap.quotas).await;
        let budget = match &self.budgets {
            Some(b) => b.view(app).await.map(|v| Budget {
                calls: v.calls,
                period: v.period.into(),
                time_zone: v.time_zone,
                used: v.used,
                remaining: v.calls - v.used,
                resets_in_ms: ms(v.resets_in),
            }),
            None => None,
        };
        Ok(AppState {
            app: a.name.clone(),
            app_id: a.app_id.clone(),
            quotas,
            source: source.into(),
            queued: u32::try_from(snap.queued).unwrap_or(u32::MAX),
            queued_bytes: u64::try_from(snap.queued_bytes).unwrap_or(u64::MAX),
            budget,
        })
    }

    async fn inspect_caller(&self, name: &str) -> Result<CallerState, CallError> {
        let c = self
            .door()
            .auth
            .describe(name)
            .ok_or_else(|| CallError::UnknownCaller(name.chars().take(64).collect()))?;
        let (queued, bytes) = self.scheduler.caller_queued(c.id).await.ok_or_else(gone)?;
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        Ok(CallerState {
            caller: name.to_owned(),
            rate: c.limits.rate.get(),
            burst: c.limits.burst.get(),
            max_queued: n(c.limits.max_queued),
            queued: n(queued),
            max_queued_bytes: n(c.limits.max_queued_bytes),
            queued_bytes: n(bytes),
            apps: c.apps.unwrap_or_default(),
            admin: c.admin,
        })
    }

    async fn inspect_chat(&self, chat_id: &str) -> Result<ChatState, CallError> {
        if chat_id.is_empty() || chat_id.len() > 128 {
            return Err(crate::reply::ValidationError::BadId {
                field: "chat_id",
                why: "give the chat id (at most 128 bytes)".into(),
            }
            .into());
        }
        let chat: Arc<str> = chat_id.into();
        let snap: ChatSnapshot = self.scheduler.inspect_chat(chat).await.ok_or_else(gone)?;
        let (quotas, source) = self.counted(&snap.quotas).await;
        let held = quotas
            .iter()
            .filter(|q| q.frees_in_ms > 0)
            .max_by_key(|q| q.frees_in_ms);
        Ok(ChatState {
            chat_id: chat_id.to_owned(),
            queued: u32::try_from(snap.queued).unwrap_or(u32::MAX),
            queued_bytes: u64::try_from(snap.queued_bytes).unwrap_or(u64::MAX),
            busy: snap.busy,
            head_age_ms: snap.head_age.map_or(0, ms),
            next_try_in_ms: snap
                .next_try_in
                .map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            held_by: held.map(|q| q.kind.clone()).unwrap_or_default(),
            frees_in_ms: held.map_or(0, |q| q.frees_in_ms),
            quotas,
            source: source.into(),
        })
    }

    /// The caller of `req` if it may use the admin service, else the status to answer.
    fn admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let door = self.door();
        let caller = self.caller(&door, req, "none", "admin")?;
        if !door.auth.is_admin(&caller) {
            return Err(CallError::NotAdmin(caller.name.to_string()).to_status());
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl ReplyAdmin for ReplyService {
    async fn inspect_chat(
        &self,
        req: Request<InspectChatRequest>,
    ) -> Result<Response<ChatState>, Status> {
        self.admin(&req)?;
        ReplyService::inspect_chat(self, &req.get_ref().chat_id)
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    async fn inspect_app(
        &self,
        req: Request<InspectAppRequest>,
    ) -> Result<Response<AppState>, Status> {
        self.admin(&req)?;
        ReplyService::inspect_app(self, &req.get_ref().app)
            .await
            .map(Response::new)
            .map_err(|e| CallError::from(e).to_status())
    }

    async fn inspect_caller(
        &self,
        req: Request<InspectCallerRequest>,
    ) -> Result<Response<CallerState>, Status> {
        self.admin(&req)?;
        ReplyService::inspect_caller(self, &req.get_ref().caller)
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }
}
