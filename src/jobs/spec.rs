//! A stored job back into a scheduler job: after a restart, a takeover, or a job another
//! replica stored for a chat this one runs.

use std::sync::Arc;
use std::time::Duration;

use super::record::{JobRecord, now_ms};
use crate::config::Ownership;
use crate::feishu::{Call, NewMessage, SendRequest};
use crate::reply::{MsgType, ValidationError};
use crate::scheduler::GatewayError;
use crate::scheduler::JobSpec;

/// The span an async job's queue waits and attempts belong to, while it runs on this replica:
/// a child of the submit call's span when that was traced (whichever replica took it).
pub fn job_span(rec: &JobRecord) -> tracing::Span {
    let r = &rec.reply;
    let span = tracing::info_span!(parent: None, "reply_job", otel.kind = "consumer", job_seq = rec.seq, caller = %rec.caller, app = %r.app, chat_id = %r.chat_id, uuid = %r.uuid);
    if let Some(tp) = &r.traceparent {
        crate::telemetry::continue_from(&span, tp);
    }
    span
}

/// What rebuilding a job needs of the configuration: the apps and the callers by id.
#[derive(Debug, Clone)]
pub struct Specs {
    /// (name, app_id) of each app, by index (None: removed by a live reload).
    apps: Vec<Option<(Arc<str>, Arc<str>)>>,
    /// What each caller owns, by id, anonymous first.
    owners: Vec<Ownership>,
    /// When this configuration was loaded (ms since the epoch): a job stored before it whose
    /// caller it does not know is revoked; one stored after may come from a caller this
    /// replica has not learned of yet (see [`Specs::knows_of`]).
    pub since_ms: i64,
}

impl Specs {
    pub fn new(apps: &[crate::config::AppConfig], owners: &[Ownership]) -> Self {
        Self {
            apps: apps
                .iter()
                .map(|a| (!a.removed).then(|| (a.name.as_str().into(), a.app_id.as_str().into())))
                .collect(),
            owners: owners.to_vec(),
            since_ms: now_ms(),
        }
    }

    /// Whether this configuration can judge `rec`'s owner: it was stored before this
    /// configuration was loaded. A job stored since, by a caller (or credential) this
    /// configuration does not know, may come from a replica that reloaded first.
    pub fn knows_of(&self, rec: &JobRecord) -> bool {
        rec.created_ms < self.since_ms
    }

    /// The Feishu app_id of app `name`.
    pub fn app_id(&self, name: &str) -> Option<Arc<str>> {
        self.apps
            .iter()
            .flatten()
            .find(|(n, _)| **n == *name)
            .map(|(_, id)| id.clone())
    }

    /// The scheduler job of `rec`; an app no longer configured, a caller that no longer owns
    /// it (removed, or its credential rotated out), or a ttl already over, is an error (the
    /// job fails with it).
    pub fn of(&self, rec: &JobRecord) -> Result<JobSpec, GatewayError> {
        let r = &rec.reply;
        let (app, (app_name, app_id)) = self
            .apps
            .iter()
            .enumerate()
            .find_map(|(i, a)| {
                a.as_ref()
                    .filter(|(n, _)| **n == *r.app)
                    .map(|a| (i, a.clone()))
            })
            .ok_or_else(|| GatewayError::UnknownApp(r.app.clone()))?;
        let msg_type = MsgType::ALL
            .into_iter()
            .find(|m| m.as_str() == r.msg_type)
            .ok_or_else(|| ValidationError::MsgType(r.msg_type.clone()))?;
        let caller = self
            .owners
            .iter()
            .position(|o| *o.name == *rec.caller)
            .filter(|&id| self.owners[id].holds(&rec.credential))
            .ok_or_else(|| GatewayError::CallerRemoved {
                caller: rec.caller.clone(),
                attempts: rec.attempts,
                uuid: r.uuid.clone(),
            })?;
        let left = rec.expires_ms - now_ms();
        if left <= 0 {
            return Err(GatewayError::DeadlineBeforeSend {
                attempts: rec.attempts,
                uuid: r.uuid.clone(),
            });
        }
        Ok(JobSpec {
            caller,
            credential: rec.credential.as_str().into(),
            intake: None,
            on_send: None,
            app,
            app_name,
            app_id,
            chat_id: r.chat_id.as_str().into(),
            user_id: r.user_id.as_deref().map(Into::into),
            target: r.target(),
            lane: crate::scheduler::Lane::Normal,
            request: {
                let uuid = r.feishu_uuid.clone().unwrap_or_else(|| r.uuid.clone());
                match &r.send_to {
                    None => Call::Reply(SendRequest {
                        message_id: r.message_id.clone(),
                        content: r.content.clone(),
                        msg_type: msg_type.as_str(),
                        reply_in_thread: r.reply_in_thread,
                        uuid,
                    }),
                    Some(to) => Call::Send(NewMessage {
                        receive_id_type: crate::reply::receive_id_type(&to.receive_id_type)
                            .ok_or_else(|| ValidationError::BadId {
                                field: "receive_id_type",
                                why: "not one Feishu knows".into(),
                            })?,
                        receive_id: to.receive_id.clone(),
                        msg_type: msg_type.as_str(),
                        content: r.content.clone(),
                        uuid,
                    }),
                }
            },
            caller_uuid: r.feishu_uuid.as_ref().map(|_| r.uuid.clone()),
            deadline: Some(
                tokio::time::Instant::now() + Duration::from_millis(left.unsigned_abs()),
            ),
            // Set when the job starts (`Jobs::start`).
            span: tracing::Span::none(),
        })
    }
}
