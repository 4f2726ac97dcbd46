//! `Send`, `SubmitSend`, `UpdateMessage` and `RecallMessage`: the other message calls, checked
//! at the same door as replies and queued on the same scheduler. A send to a chat waits in that
//! chat's queue with its replies; a send to a user in the user's; an update or a recall in its
//! message's (where a newer update supersedes a waiting one).

use std::sync::Arc;

use tonic::Request;

use super::entry::{Entry, explicit_uuid, uuid_of};
use super::{CallError, Door, ReplyService};
use crate::auth::Caller;
use crate::feishu::{Api, Call, MessageUpdate, NewMessage};
use crate::jobs::{SendTo, StoredReply};
use crate::proto::{RecallMessageRequest, SendRequest, SubmitReplyResponse, UpdateMessageRequest};
use crate::reply::{RawSend, RawUpdate, Send, Update};
use crate::scheduler::{JobSpec, Target, message_queue, user_queue};

/// The API an update of `msg_type` calls (a card is patched, anything else edited).
pub(super) fn update_api(msg_type: &str) -> Api {
    match msg_type {
        "interactive" => Api::UpdateCard,
        _ => Api::Edit,
    }
}

/// The uuid of a send whose caller gave none (see `derived_uuid`: the same reasoning).
fn derived_send_uuid(who: &[&[u8]], app: &str, send: &Send) -> String {
    let mut fields: Vec<&[u8]> = vec![b"feishu-reply-gateway/send-uuid/v1"];
    fields.extend_from_slice(who);
    fields.extend_from_slice(&[
        app.as_bytes(),
        send.receive_id_type.as_bytes(),
        send.receive_id.as_bytes(),
        send.msg_type.as_str().as_bytes(),
        send.content.as_bytes(),
    ]);
    uuid_of(&fields)
}

impl ReplyService {
    /// A send checked and made a scheduler job (as [`ReplyService::prepare`] for a reply).
    pub(super) fn prepare_send(
        &self,
        door: &Door,
        caller: &Caller,
        req: Request<SendRequest>,
        ttl: Option<std::time::Duration>,
    ) -> Result<(JobSpec, StoredReply), CallError> {
        let entry = self.enter(door, caller, &req)?;
        let r = req.into_inner();
        let mut send = RawSend {
            receive_id_type: &r.receive_id_type,
            receive_id: &r.receive_id,
            msg_type: &r.msg_type,
            content: &r.content,
            uuid: &r.uuid,
        }
        .validate()?;
        let app = self.app_for(door, caller, &r.app)?;
        drop(r);
        let a = &door.apps[app];
        let (uuid, feishu_uuid) = match send.uuid.take() {
            Some(u) => {
                let own = explicit_uuid(&entry.who(caller), &a.name, &u);
                (u, Some(own))
            }
            None => (derived_send_uuid(&entry.who(caller), &a.name, &send), None),
        };
        self.known_to_fail(app, "", &uuid)?;
        // A chat's sends share its queue and quota with the replies to it; a user's their own.
        let (queue, user, target) = if send.receive_id_type == "chat_id" {
            (Arc::from(send.receive_id.as_str()), None, Target::Chat)
        } else {
            let key = user_key(send.receive_id_type, &send.receive_id);
            (user_queue(&key), Some(Arc::from(key)), Target::User)
        };
        tracing::Span::current()
            .record("chat_id", &*queue)
            .record("uuid", &uuid);
        let stored = StoredReply {
            app: a.name.clone(),
            message_id: String::new(),
            msg_type: send.msg_type.as_str().to_owned(),
            content: String::new(), // filled by the async path only
            reply_in_thread: false,
            uuid: uuid.clone(),
            feishu_uuid: feishu_uuid.clone(),
            chat_id: queue.to_string(),
            user_id: user.as_deref().map(str::to_owned),
            send_to: Some(SendTo {
                receive_id_type: send.receive_id_type.to_owned(),
                receive_id: send.receive_id.clone(),
            }),
            traceparent: crate::telemetry::traceparent(&tracing::Span::current()),
        };
        let request = Call::Send(NewMessage {
            receive_id_type: send.receive_id_type,
            receive_id: send.receive_id,
            msg_type: send.msg_type.as_str(),
            content: send.content,
            uuid: feishu_uuid.clone().unwrap_or_else(|| uuid.clone()),
        });
        let spec = entry.job(door, caller, app, ttl, (queue, user, target), request);
        let spec = JobSpec {
            caller_uuid: feishu_uuid.map(|_| uuid),
            ..spec
        };
        Ok((spec, stored))
    }

    /// `SubmitSend`: the send stored as a job.
    pub(super) async fn submit_send_job(
        &self,
        door: &Door,
        caller: &Caller,
        req: Request<SendRequest>,
    ) -> Result<SubmitReplyResponse, CallError> {
        if self.jobs.is_none() {
            return Err(crate::scheduler::GatewayError::NoJobStore.into());
        }
        let ttl = super::jobs::ttl_of(req.get_ref().ttl_s)?;
        let (spec, stored) = self.prepare_send(door, caller, req, Some(ttl))?;
        self.store_job(caller, spec, stored, ttl).await
    }

    /// An update checked and made a scheduler job on its message's queue.
    pub(super) fn prepare_update(
        &self,
        door: &Door,
        caller: &Caller,
        req: Request<UpdateMessageRequest>,
    ) -> Result<JobSpec, CallError> {
        let entry = self.enter(door, caller, &req)?;
        let r = req.into_inner();
        let update = RawUpdate {
            message_id: &r.message_id,
            msg_type: Some(&r.msg_type),
            content: &r.content,
            chat_id: &r.chat_id,
        }
        .validate()?;
        let app = self.app_for(door, caller, &r.app)?;
        drop(r);
        self.message_job(door, caller, entry, app, update)
    }

    /// A recall checked and made a scheduler job on its message's queue.
    pub(super) fn prepare_recall(
        &self,
        door: &Door,
        caller: &Caller,
        req: Request<RecallMessageRequest>,
    ) -> Result<JobSpec, CallError> {
        let entry = self.enter(door, caller, &req)?;
        let r = req.into_inner();
        let recall = RawUpdate {
            message_id: &r.message_id,
            msg_type: None,
            content: "",
            chat_id: &r.chat_id,
        }
        .validate()?;
        let app = self.app_for(door, caller, &r.app)?;
        self.message_job(door, caller, entry, app, recall)
    }

    fn message_job(
        &self,
        door: &Door,
        caller: &Caller,
        entry: Entry,
        app: usize,
        u: Update,
    ) -> Result<JobSpec, CallError> {
        self.known_to_fail(app, &u.message_id, "")?;
        let chat = u
            .chat_id
            .filter(|_| door.updates_count_in_chat)
            .map(Arc::from);
        let queue = message_queue(&u.message_id);
        let request = match u.msg_type {
            Some(t) => Call::Update(MessageUpdate {
                message_id: u.message_id,
                msg_type: t.as_str(),
                content: u.content,
            }),
            None => Call::Recall {
                message_id: u.message_id,
            },
        };
        let target = Target::Message { chat };
        Ok(entry.job(door, caller, app, None, (queue, None, target), request))
    }
}

/// The user quota key of a send to (`receive_id_type`, `id`): the open_id itself (the key a
/// reply naming that user uses), else the id with its type (another id of the same person
/// cannot be told apart).
fn user_key(receive_id_type: &str, id: &str) -> String {
    match receive_id_type {
        "open_id" => id.to_owned(),
        t => format!("{t}:{id}"),
    }
}
