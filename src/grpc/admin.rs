//! The admin service (`ReplyAdmin`): introspection for operators, on the same port, for
//! callers with `admin = true`.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::ReplyService;
use crate::error::GatewayError;
use crate::proto::reply_admin_server::ReplyAdmin;
use crate::proto::{ChatState, InspectChatRequest, QuotaState};
use crate::scheduler::inspect::ChatSnapshot;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl ReplyService {
    async fn inspect_chat(&self, chat_id: &str) -> Result<ChatState, GatewayError> {
        if chat_id.is_empty() || chat_id.len() > 128 {
            return Err(crate::reply::ValidationError::BadId {
                field: "chat_id",
                why: "give the chat id (at most 128 bytes)".into(),
            }
            .into());
        }
        let chat: Arc<str> = chat_id.into();
        let snap: ChatSnapshot =
            self.scheduler
                .inspect_chat(chat)
                .await
                .ok_or(GatewayError::ShuttingDown {
                    attempts: 0,
                    uuid: String::new(),
                })?;
        let mut quotas: Vec<QuotaState> = snap
            .quotas
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
        let mut source = "local";
        // Cluster mode: the shared counts are in Redis (when it answers).
        if let (Some(keys), Some(redis)) = (&snap.shared, &self.redis) {
            match redis.inspect(keys).await {
                Ok(shared) => {
                    for (q, (used, frees_in)) in quotas.iter_mut().zip(shared) {
                        q.used = used;
                        q.frees_in_ms = ms(frees_in);
                    }
                    source = "redis";
                }
                Err(e) => {
                    tracing::debug!(error = %e, "inspect: redis did not answer; local counts")
                }
            }
        }
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
}

#[tonic::async_trait]
impl ReplyAdmin for ReplyService {
    async fn inspect_chat(
        &self,
        req: Request<InspectChatRequest>,
    ) -> Result<Response<ChatState>, Status> {
        let caller = self.caller(&req, "none")?;
        if !self.auth.is_admin(&caller) {
            return Err(GatewayError::NotAdmin(caller.name.to_string()).to_status());
        }
        ReplyService::inspect_chat(self, &req.get_ref().chat_id)
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }
}
