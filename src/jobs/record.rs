//! What is stored of an async reply job (the api layer shows it as a `ReplyJob`).

use serde::{Deserialize, Serialize};

use super::store::StoreError;

/// A job's lifecycle (DESIGN §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Queued,
    Sending,
    Delivered,
    Failed,
    Cancelled,
}

impl State {
    pub fn is_final(self) -> bool {
        matches!(self, State::Delivered | State::Failed | State::Cancelled)
    }
}

/// Where a send goes (`SubmitSend`): Feishu's `receive_id_type` and `receive_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendTo {
    pub receive_id_type: String,
    pub receive_id: String,
}

/// The reply or send a job makes, as validated at submit (chat resolved, uuid fixed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReply {
    pub app: String,
    /// The message replied to (empty for a send).
    pub message_id: String,
    pub msg_type: String,
    pub content: String,
    pub reply_in_thread: bool,
    /// The uuid the caller gave or was given (idempotency, cancel, what it is told).
    pub uuid: String,
    /// The uuid Feishu gets, when it differs: derived from an explicit `uuid` and its caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feishu_uuid: Option<String>,
    /// The queue it waits in: the chat, or for a send to a user `user:<id>`
    /// (`scheduler::user_queue`).
    pub chat_id: String,
    pub user_id: Option<String>,
    /// A send (`SubmitSend`): to whom. None: a reply to `message_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_to: Option<SendTo>,
    /// The submit call's W3C `traceparent`, when traced: the replica that runs the job
    /// continues that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl StoredReply {
    /// The API it calls.
    pub fn api(&self) -> crate::feishu::Api {
        match self.send_to {
            Some(_) => crate::feishu::Api::Send,
            None => crate::feishu::Api::Reply,
        }
    }

    /// The per-target quotas it counts in: a chat's, or a user's for a send to a user.
    pub fn target(&self) -> crate::scheduler::Target {
        match &self.send_to {
            Some(t) if t.receive_id_type != "chat_id" => crate::scheduler::Target::User,
            _ => crate::scheduler::Target::Chat,
        }
    }
}

/// A failed job's status, as `Reply` would have returned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredError {
    pub code: i32,
    pub message: String,
    /// The encoded `google.rpc.Status` with its details (ErrorInfo, RetryInfo…), if any.
    pub details: Vec<u8>,
}

/// One job as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Assigned by the store (order of acceptance).
    pub seq: u64,
    /// The authenticated caller's name (`anonymous` for anonymous calls).
    pub caller: String,
    /// Fingerprint of the credential it was submitted with (`config::credential_fingerprint`;
    /// empty: anonymous, or stored before credentials were recorded). The job is its caller's
    /// while the caller owns that credential (`config::Ownership`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub credential: String,
    pub reply: StoredReply,
    pub state: State,
    pub attempts: u32,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Not sent by then, never sent (created + ttl).
    pub expires_ms: i64,
    /// The encoded `ReplyResponse` once delivered.
    pub result: Option<Vec<u8>>,
    pub error: Option<StoredError>,
    /// 128 random bits (hex) in the job's public id: an id cannot be guessed by counting,
    /// nor name another job after the store was reset. Empty for jobs stored before keys.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl JobRecord {
    pub fn job_id(&self) -> String {
        job_id(self.seq, &self.key)
    }

    /// Whether `key` (from a public id) is this job's, compared in constant time.
    pub fn has_key(&self, key: &str) -> bool {
        let (a, b) = (self.key.as_bytes(), key.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// Jobs are the same job when caller (with its credential), app and uuid are (DESIGN §5).
    pub fn idempotency_key(&self) -> String {
        idempotency_key(
            &self.caller,
            &self.credential,
            &self.reply.app,
            &self.reply.uuid,
        )
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a job record serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        serde_json::from_slice(bytes)
            .map_err(|e| StoreError(format!("a stored job is unreadable: {e}")))
    }
}

/// A new credential of a caller never finds its earlier credentials' jobs by uuid. (Jobs
/// stored before credentials were recorded keep the key they were stored under.)
pub fn idempotency_key(caller: &str, credential: &str, app: &str, uuid: &str) -> String {
    match credential {
        "" => format!("{caller}\u{1f}{app}\u{1f}{uuid}"),
        c => format!("{caller}\u{1f}{c}\u{1f}{app}\u{1f}{uuid}"),
    }
}

/// A new job's key: 128 random bits, hex.
pub fn new_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The public id of job `seq` with `key`: `j`, the seq (16 hex digits), the key.
pub fn job_id(seq: u64, key: &str) -> String {
    format!("j{seq:016x}{key}")
}

/// The seq and key of a public id, if it is one (a job stored before keys has none).
pub fn parse_job_id(id: &str) -> Option<(u64, &str)> {
    let hex = id.strip_prefix('j')?;
    if !(hex.len() == 16 || hex.len() == 48)
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let (seq, key) = hex.split_at(16);
    Some((u64::from_str_radix(seq, 16).ok()?, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_round_trip() {
        let key = new_key();
        assert_eq!(key.len(), 32);
        assert_ne!(key, new_key());
        assert_eq!(parse_job_id(&job_id(42, &key)), Some((42, key.as_str())));
        assert_eq!(parse_job_id(&job_id(42, "")), Some((42, "")));
        assert_eq!(parse_job_id("j12"), None);
        assert_eq!(parse_job_id("x000000000000002a"), None);
        assert_eq!(parse_job_id("j000000000000002A"), None);
    }
}
