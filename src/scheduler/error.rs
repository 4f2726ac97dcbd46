//! Why a call failed, in the domain's terms: validation, apps, queues, deadlines, Feishu's
//! answer, the job store. The api layer adds the door's own failures and maps every one to a
//! gRPC status (`grpc::status`, the one table).

use std::time::Duration;

use crate::feishu::UpstreamError;
use crate::reply::ValidationError;

/// Why a reply call failed (the door's own failures, authentication and admission, are the
/// api layer's).
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    #[error("unknown app {0:?}: not in this gateway's configuration")]
    UnknownApp(String),
    #[error(
        "app {app:?} was removed from the gateway's configuration while this reply waited; it was not sent (uuid {uuid})"
    )]
    AppRemoved {
        app: String,
        attempts: u32,
        uuid: String,
    },
    #[error(
        "caller {caller:?} was removed from the gateway's configuration, or the credential this reply came with was rotated out, while it waited; it was not sent (uuid {uuid})"
    )]
    CallerRemoved {
        caller: String,
        attempts: u32,
        uuid: String,
    },
    #[error(
        "message {message_id:?} was recalled or deleted (Feishu said so in the last 30 minutes); not sent (uuid {uuid})"
    )]
    MessageGone {
        message_id: String,
        attempts: u32,
        uuid: String,
    },
    #[error("no job {0:?} (unknown, expired, or another caller's)")]
    JobNotFound(String),
    #[error("async jobs need a job store: set GATEWAY_DATA_DIR (or [jobs] data_dir)")]
    NoJobStore,
    #[error("the job store failed: {0}; retry")]
    JobStore(String),
    #[error("the job cannot be cancelled: it is {0}")]
    NotCancellable(&'static str),
    /// The job was cancelled (CancelReply) before it was sent.
    #[error("cancelled before it was sent")]
    Cancelled,
    #[error("no app named and this gateway has no default app; set `app` in the request")]
    NoDefaultApp,
    #[error("queue full ({scope}: {queued} replies waiting); retry later")]
    QueueFull {
        scope: &'static str,
        queued: usize,
        retry_after: Duration,
    },
    #[error(
        "cannot be sent before its deadline: the earliest send is in {earliest_in:?}, the deadline in {deadline_in:?}"
    )]
    DeadlineUnreachable {
        earliest_in: Duration,
        deadline_in: Duration,
    },
    #[error(
        "deadline reached before the reply was sent (attempts so far: {attempts}); it will not be sent"
    )]
    DeadlineBeforeSend { attempts: u32, uuid: String },
    #[error("{error} (after {attempts} attempts, uuid {uuid})")]
    Upstream {
        error: UpstreamError,
        attempts: u32,
        uuid: String,
    },
    #[error("looking up the chat of the message failed: {0}")]
    ChatLookup(UpstreamError),
    #[error(
        "the quotas shared across replicas cannot be used (their store refuses the credentials, or, under on_redis_failure = fail_closed, has not answered since start); not sent"
    )]
    SharedQuotasUnavailable { attempts: u32, uuid: String },
    #[error("the gateway is shutting down; not sent")]
    ShuttingDown { attempts: u32, uuid: String },
    /// A bug in the gateway while sending (a panic). The attempt may or may not have been
    /// posted; retrying with the same uuid is safe (Feishu dedupes it for an hour).
    #[error(
        "internal error while sending (after {attempts} attempts); it may have been posted: retry with uuid {uuid}"
    )]
    Internal { attempts: u32, uuid: String },
    /// The replica that owns the job's queue failed it (cluster mode, the job was forwarded
    /// there): its answer, as it would have given it.
    #[error("{}", .0.message)]
    Peer(Box<PeerFailure>),
}

/// A failure another replica answered for a job forwarded to it: the gRPC status it would
/// have given the caller (code, message, encoded details), and what the details say.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerFailure {
    /// gRPC code (`tonic::Code` as a number).
    pub code: i32,
    pub message: String,
    /// The status details (`google.rpc.Status` details, encoded).
    pub details: Vec<u8>,
    /// `ErrorInfo.reason`.
    pub reason: String,
    pub retry_after_ms: Option<u64>,
    pub feishu_code: Option<i64>,
    pub uuid: Option<String>,
    pub attempts: Option<u32>,
    /// A replica that did not own the job's chat: where it sees the owner (its peer address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_hint: Option<String>,
}

impl GatewayError {
    /// Feishu's code, if Feishu gave one.
    pub fn feishu_code(&self) -> Option<i64> {
        match self {
            GatewayError::Peer(f) => f.feishu_code,
            _ => self.upstream().and_then(UpstreamError::code),
        }
    }

    /// Feishu's (or the network's) failure, if that is what it was.
    pub fn upstream(&self) -> Option<&UpstreamError> {
        match self {
            GatewayError::Upstream { error, .. } | GatewayError::ChatLookup(error) => Some(error),
            _ => None,
        }
    }

    /// The uuid of the reply, for the failures [`Self::attempts`] knows.
    pub fn uuid(&self) -> Option<&str> {
        match self {
            GatewayError::Upstream { uuid, .. }
            | GatewayError::DeadlineBeforeSend { uuid, .. }
            | GatewayError::ShuttingDown { uuid, .. }
            | GatewayError::Internal { uuid, .. }
            | GatewayError::SharedQuotasUnavailable { uuid, .. }
            | GatewayError::AppRemoved { uuid, .. }
            | GatewayError::CallerRemoved { uuid, .. }
            | GatewayError::MessageGone { uuid, .. } => Some(uuid),
            GatewayError::Peer(f) => f.uuid.as_deref(),
            _ => None,
        }
    }

    /// The attempts made, for failures after sending began (see also [`Self::uuid`]).
    pub fn attempts(&self) -> Option<u32> {
        match self {
            GatewayError::Upstream { attempts, .. }
            | GatewayError::DeadlineBeforeSend { attempts, .. }
            | GatewayError::ShuttingDown { attempts, .. }
            | GatewayError::Internal { attempts, .. }
            | GatewayError::SharedQuotasUnavailable { attempts, .. }
            | GatewayError::AppRemoved { attempts, .. }
            | GatewayError::CallerRemoved { attempts, .. }
            | GatewayError::MessageGone { attempts, .. } => Some(*attempts),
            GatewayError::Peer(f) => f.attempts,
            _ => None,
        }
    }
}
