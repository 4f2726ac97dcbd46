//! What the door takes of every call before its fields are read ([`Entry`]: an anonymous
//! caller's label, the deadline, the intake share, the routing chat) and makes of it: the
//! scheduler job, the uuids derived for the caller.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Request;

use super::{CALLER_HEADER, Door};
use crate::auth::Caller;
use crate::feishu::Call;
use crate::listen::Intake;
use crate::reply::Reply as ValidReply;
use crate::scheduler::{JobSpec, Lane, Target};

/// What the door took of a call before reading its fields ([`ReplyService::enter`]).
pub(super) struct Entry {
    /// An anonymous caller's `x-caller` label (logs, and its uuids).
    pub(super) label: Option<String>,
    pub(super) call_deadline: Instant,
    /// The `x-chat-id` routing metadata.
    pub(super) header_chat: Option<String>,
    pub(super) intake: Option<Arc<Intake>>,
}

impl Entry {
    /// Who the call's uuids are derived for: the caller and an anonymous caller's label.
    pub(super) fn who<'a>(&'a self, caller: &'a Caller) -> [&'a [u8]; 2] {
        [
            caller.name.as_bytes(),
            self.label.as_deref().unwrap_or("").as_bytes(),
        ]
    }

    /// The scheduler job of a call of `caller` with app `app` to `to` (its queue, user quota
    /// and target). With `ttl` (async jobs) its deadline is now + ttl, else the call's.
    pub(super) fn job(
        self,
        door: &Door,
        caller: &Caller,
        app: usize,
        ttl: Option<Duration>,
        to: (Arc<str>, Option<Arc<str>>, Target),
        request: Call,
    ) -> JobSpec {
        let a = &door.apps[app];
        let (chat_id, user_id, target) = to;
        JobSpec {
            caller: caller.id,
            credential: caller.credential.clone(),
            intake: self
                .intake
                .map(|i| i as Arc<dyn std::any::Any + Send + Sync>),
            on_send: None,
            app,
            app_name: a.name.as_str().into(),
            app_id: a.app_id.as_str().into(),
            chat_id,
            lane: Lane::Normal,
            user_id,
            target,
            request,
            caller_uuid: None,
            deadline: Some(match ttl {
                Some(ttl) => Instant::now() + ttl,
                None => self.call_deadline,
            }),
            span: tracing::Span::current(),
        }
    }
}

/// An anonymous caller's `x-caller` label, for logs only: at most 64 characters of
/// `[A-Za-z0-9._-]` (anything else is dropped).
pub(super) fn caller_label<T>(req: &Request<T>) -> Option<String> {
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
pub(super) fn derived_uuid(who: &[&[u8]], app: &str, reply: &ValidReply) -> String {
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
pub(super) fn explicit_uuid(who: &[&[u8]], app: &str, given: &str) -> String {
    let mut fields: Vec<&[u8]> = vec![b"feishu-reply-gateway/explicit-uuid/v1"];
    fields.extend_from_slice(who);
    fields.extend_from_slice(&[app.as_bytes(), given.as_bytes()]);
    uuid_of(&fields)
}

/// A v8 uuid from the SHA-256 of `fields`, each length-prefixed.
pub(super) fn uuid_of(fields: &[&[u8]]) -> String {
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
pub(super) fn call_deadline<T>(req: &Request<T>, max_call: Duration) -> Instant {
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
