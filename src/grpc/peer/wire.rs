//! The wire forms of a forwarded job and of its result (JSON inside the peer RPCs), and their
//! conversions to and from the scheduler's types. Caller and app travel by name: each replica
//! maps them to its own configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::super::ReplyService;
use super::super::status::CallError;
use crate::feishu::{
    Call, CardStreaming, CardText, MessageUpdate, NewMessage, SendRequest, SentMessage,
};
use crate::reply::{MsgType, RECEIVE_ID_TYPES};
use crate::scheduler::{Delivered, GatewayError, JobResult, JobSpec, Lane, PeerFailure, Target};

/// A job on the wire between replicas.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireJob {
    caller: String,
    credential: String,
    app: String,
    queue: String,
    user_id: Option<String>,
    target: WireTarget,
    lane: WireLane,
    call: WireCall,
    caller_uuid: Option<String>,
    /// Milliseconds left until the caller's deadline.
    deadline_in_ms: Option<u64>,
    traceparent: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
enum WireTarget {
    Chat,
    User,
    Message { chat: Option<String> },
    Card,
    App,
}

#[derive(Debug, Serialize, Deserialize)]
enum WireLane {
    Normal,
    Typing,
    Final,
}

#[derive(Debug, Serialize, Deserialize)]
enum WireCall {
    Reply {
        message_id: String,
        content: String,
        msg_type: String,
        reply_in_thread: bool,
        uuid: String,
    },
    Send {
        receive_id_type: String,
        receive_id: String,
        msg_type: String,
        content: String,
        uuid: String,
    },
    Update {
        message_id: String,
        msg_type: String,
        content: String,
    },
    Recall {
        message_id: String,
    },
    CardCreate {
        card_json: String,
    },
    CardText {
        card_id: String,
        element_id: String,
        content: String,
        sequence: u32,
        uuid: String,
    },
    CardStreaming {
        card_id: String,
        on: bool,
        sequence: u32,
        uuid: String,
    },
}

/// A job's result on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum WireResult {
    Delivered {
        message: SentMessage,
        uuid: String,
        attempts: u32,
        queued_ms: u64,
        superseded: bool,
    },
    Failed(PeerFailure),
}

fn msg_type(s: &str) -> Result<&'static str, String> {
    s.parse::<MsgType>()
        .map(MsgType::as_str)
        .map_err(|_| format!("unknown msg_type {s:?}"))
}

fn receive_id_type(s: &str) -> Result<&'static str, String> {
    RECEIVE_ID_TYPES
        .iter()
        .find(|t| **t == s)
        .copied()
        .ok_or_else(|| format!("unknown receive_id_type {s:?}"))
}

fn to_wire_call(call: &Call) -> WireCall {
    match call.clone() {
        Call::Reply(r) => WireCall::Reply {
            message_id: r.message_id,
            content: r.content,
            msg_type: r.msg_type.into(),
            reply_in_thread: r.reply_in_thread,
            uuid: r.uuid,
        },
        Call::Send(m) => WireCall::Send {
            receive_id_type: m.receive_id_type.into(),
            receive_id: m.receive_id,
            msg_type: m.msg_type.into(),
            content: m.content,
            uuid: m.uuid,
        },
        Call::Update(u) => WireCall::Update {
            message_id: u.message_id,
            msg_type: u.msg_type.into(),
            content: u.content,
        },
        Call::Recall { message_id } => WireCall::Recall { message_id },
        Call::CardCreate { card_json } => WireCall::CardCreate { card_json },
        Call::CardText(t) => WireCall::CardText {
            card_id: t.card_id,
            element_id: t.element_id,
            content: t.content,
            sequence: t.sequence,
            uuid: t.uuid,
        },
        Call::CardStreaming(s) => WireCall::CardStreaming {
            card_id: s.card_id,
            on: s.on,
            sequence: s.sequence,
            uuid: s.uuid,
        },
    }
}

fn from_wire_call(call: WireCall) -> Result<Call, String> {
    Ok(match call {
        WireCall::Reply {
            message_id,
            content,
            msg_type: t,
            reply_in_thread,
            uuid,
        } => Call::Reply(SendRequest {
            message_id,
            content,
            msg_type: msg_type(&t)?,
            reply_in_thread,
            uuid,
        }),
        WireCall::Send {
            receive_id_type: r,
            receive_id,
            msg_type: t,
            content,
            uuid,
        } => Call::Send(NewMessage {
            receive_id_type: receive_id_type(&r)?,
            receive_id,
            msg_type: msg_type(&t)?,
            content,
            uuid,
        }),
        WireCall::Update {
            message_id,
            msg_type: t,
            content,
        } => Call::Update(MessageUpdate {
            message_id,
            msg_type: msg_type(&t)?,
            content,
        }),
        WireCall::Recall { message_id } => Call::Recall { message_id },
        WireCall::CardCreate { card_json } => Call::CardCreate { card_json },
        WireCall::CardText {
            card_id,
            element_id,
            content,
            sequence,
            uuid,
        } => Call::CardText(CardText {
            card_id,
            element_id,
            content,
            sequence,
            uuid,
        }),
        WireCall::CardStreaming {
            card_id,
            on,
            sequence,
            uuid,
        } => Call::CardStreaming(CardStreaming {
            card_id,
            on,
            sequence,
            uuid,
        }),
    })
}

/// `spec` on the wire, its caller and app named as `service`'s configuration names them.
pub(super) fn to_wire(spec: &JobSpec, service: &ReplyService) -> WireJob {
    let door = service.door();
    let caller = door
        .auth
        .names()
        .get(spec.caller)
        .map(|n| n.to_string())
        .unwrap_or_default();
    WireJob {
        caller,
        credential: spec.credential.to_string(),
        app: spec.app_name.to_string(),
        queue: spec.chat_id.to_string(),
        user_id: spec.user_id.as_deref().map(str::to_owned),
        target: match &spec.target {
            Target::Chat => WireTarget::Chat,
            Target::User => WireTarget::User,
            Target::Message { chat } => WireTarget::Message {
                chat: chat.as_deref().map(str::to_owned),
            },
            Target::Card => WireTarget::Card,
            Target::App => WireTarget::App,
        },
        lane: match spec.lane {
            Lane::Normal => WireLane::Normal,
            Lane::Typing => WireLane::Typing,
            Lane::Final => WireLane::Final,
        },
        call: to_wire_call(&spec.request),
        caller_uuid: spec.caller_uuid.clone(),
        deadline_in_ms: spec.deadline.map(|d| {
            u64::try_from(d.saturating_duration_since(Instant::now()).as_millis())
                .unwrap_or(u64::MAX)
        }),
        traceparent: crate::telemetry::traceparent(&spec.span),
    }
}

/// The job `w` names, as this replica's configuration has its caller and app.
pub(super) fn from_wire(w: WireJob, service: &ReplyService) -> Result<JobSpec, String> {
    let door = service.door();
    let caller = door
        .auth
        .names()
        .iter()
        .position(|n| **n == *w.caller)
        .ok_or_else(|| format!("caller {:?} is not configured here", w.caller))?;
    let app = door.app_index(&w.app).map_err(|e| e.to_string())?;
    let a = &door.apps[app];
    let span = tracing::info_span!("peer.job", chat_id = %w.queue);
    if let Some(tp) = &w.traceparent {
        crate::telemetry::continue_from(&span, tp);
    }
    Ok(JobSpec {
        caller,
        credential: w.credential.into(),
        intake: None,
        on_send: None,
        app,
        app_name: a.name.as_str().into(),
        app_id: a.app_id.as_str().into(),
        chat_id: w.queue.into(),
        user_id: w.user_id.map(Into::into),
        target: match w.target {
            WireTarget::Chat => Target::Chat,
            WireTarget::User => Target::User,
            WireTarget::Message { chat } => Target::Message {
                chat: chat.map(Into::into),
            },
            WireTarget::Card => Target::Card,
            WireTarget::App => Target::App,
        },
        lane: match w.lane {
            WireLane::Normal => Lane::Normal,
            WireLane::Typing => Lane::Typing,
            WireLane::Final => Lane::Final,
        },
        request: from_wire_call(w.call)?,
        caller_uuid: w.caller_uuid,
        deadline: w
            .deadline_in_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms)),
        span,
    })
}

pub(super) fn to_wire_result(result: JobResult, api: crate::feishu::Api) -> WireResult {
    match result {
        Ok(d) => WireResult::Delivered {
            message: d.message,
            uuid: d.uuid,
            attempts: d.attempts,
            queued_ms: u64::try_from(d.queued.as_millis()).unwrap_or(u64::MAX),
            superseded: d.superseded,
        },
        // Forwarded once only: a failure that came from further on stays as it came.
        Err(GatewayError::Peer(f)) => WireResult::Failed(*f),
        Err(e) => {
            let (uuid, attempts, feishu_code) =
                (e.uuid().map(str::to_owned), e.attempts(), e.feishu_code());
            let call = CallError::Gateway(e);
            let status = call.to_status_for(api);
            WireResult::Failed(PeerFailure {
                code: status.code() as i32,
                message: status.message().to_owned(),
                details: status.details().to_vec(),
                reason: call.reason(),
                retry_after_ms: call
                    .retry_after()
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                feishu_code,
                uuid,
                attempts,
                owner_hint: None,
            })
        }
    }
}

/// `ErrorInfo.reason` of [`moved`]: never given to a caller (the sender routes the job again).
pub(super) const MOVED: &str = "PEER_MOVED";

/// The answer of a replica that does not own the job's partition (or no longer): the job was
/// not sent, and its sender routes it again (to `owner`, where this replica sees the owner:
/// the sender's own view may be older, e.g. a stopping replica no longer follows the members).
pub(super) fn moved(owner: Option<String>) -> WireResult {
    WireResult::Failed(PeerFailure {
        code: tonic::Code::Unavailable as i32,
        message: "this replica does not own the job's chat".into(),
        details: Vec::new(),
        reason: MOVED.into(),
        retry_after_ms: None,
        feishu_code: None,
        uuid: None,
        attempts: None,
        owner_hint: owner,
    })
}

pub(super) fn from_wire_result(r: WireResult) -> JobResult {
    match r {
        WireResult::Delivered {
            message,
            uuid,
            attempts,
            queued_ms,
            superseded,
        } => Ok(Delivered {
            message,
            uuid,
            attempts,
            queued: Duration::from_millis(queued_ms),
            superseded,
        }),
        // Taken out of the owner's queue (asked by its caller, or by this replica's job
        // runner as it stops): the same to every caller here, and never a job's verdict.
        WireResult::Failed(f) if f.reason == "CANCELLED" => Err(GatewayError::Cancelled),
        WireResult::Failed(f) => Err(GatewayError::Peer(Box::new(f))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_crosses_the_wire_unchanged() {
        let calls = vec![
            Call::Reply(SendRequest {
                message_id: "om_1".into(),
                content: r#"{"text":"hi"}"#.into(),
                msg_type: "text",
                reply_in_thread: true,
                uuid: "u1".into(),
            }),
            Call::Send(NewMessage {
                receive_id_type: "open_id",
                receive_id: "ou_1".into(),
                msg_type: "interactive",
                content: "{}".into(),
                uuid: "u2".into(),
            }),
            Call::Update(MessageUpdate {
                message_id: "om_2".into(),
                msg_type: "post",
                content: "{}".into(),
            }),
            Call::Recall {
                message_id: "om_3".into(),
            },
            Call::CardCreate {
                card_json: "{}".into(),
            },
            Call::CardText(CardText {
                card_id: "c1".into(),
                element_id: "e1".into(),
                content: "so far".into(),
                sequence: 7,
                uuid: "u3".into(),
            }),
            Call::CardStreaming(CardStreaming {
                card_id: "c1".into(),
                on: false,
                sequence: 8,
                uuid: "u4".into(),
            }),
        ];
        for call in calls {
            let json = serde_json::to_vec(&to_wire_call(&call)).unwrap();
            let back = from_wire_call(serde_json::from_slice(&json).unwrap()).unwrap();
            assert_eq!(format!("{back:?}"), format!("{call:?}"));
        }
    }

    #[test]
    fn a_wire_call_with_an_unknown_type_is_refused() {
        let call = WireCall::Reply {
            message_id: "om".into(),
            content: "{}".into(),
            msg_type: "shout".into(),
            reply_in_thread: false,
            uuid: "u".into(),
        };
        assert!(from_wire_call(call).unwrap_err().contains("shout"));
    }

    #[test]
    fn a_failure_comes_back_as_the_status_the_owner_gave() {
        let e = GatewayError::QueueFull {
            scope: "chat",
            queued: 200,
            retry_after: Duration::from_millis(1500),
        };
        let want = CallError::Gateway(e.clone()).to_status();
        let wire = to_wire_result(Err(e), crate::feishu::Api::Reply);
        let json = serde_json::to_vec(&wire).unwrap();
        let back = from_wire_result(serde_json::from_slice(&json).unwrap()).unwrap_err();
        let call = CallError::Gateway(back);
        let got = call.to_status();
        assert_eq!(got.code(), want.code());
        assert_eq!(got.message(), want.message());
        assert_eq!(got.details(), want.details());
        assert_eq!(call.reason(), "QUEUE_FULL");
        assert_eq!(call.retry_after(), Some(Duration::from_millis(1500)));
        assert_eq!(call.outcome(), "resource_exhausted");
    }
}
