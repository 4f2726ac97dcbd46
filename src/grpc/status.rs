//! The **one** table that maps every failure to a gRPC status with `google.rpc.ErrorInfo`
//! (reason `FEISHU_<code>` or a gateway reason) and, where waiting helps,
//! `google.rpc.RetryInfo`: the domain's [`GatewayError`] and the door's own failures
//! (authentication, authorization, admission), together a [`CallError`]. DESIGN.md §5 is the
//! contract; one unit test per row below.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::AuthError;
use crate::feishu::{Api, UpstreamError};
use crate::scheduler::GatewayError;

/// `ErrorInfo.domain` of every error this gateway returns.
pub const ERROR_DOMAIN: &str = "feishu-reply-gateway";

const INVALID_ARGUMENT_CODES: [i64; 4] = [230001, 230025, 230055, 230099];
const PERMISSION_DENIED_CODES: [i64; 9] = [
    230002, 230006, 230013, 230017, 230018, 230027, 230035, 230038, 230050,
];
const FAILED_PRECONDITION_CODES: [i64; 11] = [
    230011, 230019, 230022, 230028, 230054, 230071, 230072, 230075, 230111, 231003, 232009,
];

/// Codes that mean something else on each endpoint (Feishu reuses codes across its message
/// APIs): (API, code, meaning, whether retrying as-is can never help). The meaning is added to
/// the status message and as `feishu_meaning` metadata.
const MEANINGS: [(Api, i64, &str, bool); 9] = [
    (
        Api::Reply,
        230071,
        "the group does not support replies in a thread",
        true,
    ),
    (
        Api::Reply,
        230072,
        "aggregated messages do not support replies in a thread",
        true,
    ),
    (
        Api::Reply,
        230075,
        "sending encrypted messages is not supported",
        true,
    ),
    (
        Api::Edit,
        230071,
        "only the message's sender can edit it",
        true,
    ),
    (
        Api::Edit,
        230072,
        "the message was edited the most times Feishu allows (20)",
        true,
    ),
    (
        Api::Edit,
        230075,
        "the time a message can be edited in has passed",
        true,
    ),
    (
        Api::Recall,
        230009,
        "this message cannot be recalled (a batch message, or too old)",
        true,
    ),
    (
        Api::Recall,
        230026,
        "batch messages cannot be recalled",
        true,
    ),
    (
        Api::UpdateCard,
        230031,
        "the card to update was not sent by this app, or is not a card",
        true,
    ),
];

/// What `code` means on `api`'s endpoint, if it means something particular there.
fn meaning(api: Api, code: i64) -> Option<(&'static str, bool)> {
    MEANINGS
        .iter()
        .find(|(a, c, _, _)| *a == api && *c == code)
        .map(|(_, _, m, permanent)| (*m, *permanent))
}

/// Why a call failed: in the domain, or at the door.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("{0}")]
    Unauthenticated(#[from] AuthError),
    #[error("unknown caller {0:?}: not in this gateway's configuration")]
    UnknownCaller(String),
    #[error(
        "caller {0} may not use the admin service (set admin = true in its [callers.*] section)"
    )]
    NotAdmin(String),
    #[error("caller {caller:?} may not send as app {app:?}")]
    AppNotAllowed { caller: String, app: String },
    #[error("caller {caller:?} exceeds its admission rate; retry later")]
    CallerRateLimited {
        caller: String,
        retry_after: Duration,
    },
}

impl From<crate::reply::ValidationError> for CallError {
    fn from(e: crate::reply::ValidationError) -> Self {
        CallError::Gateway(e.into())
    }
}

impl CallError {
    /// Snake-case gRPC code, for the `outcome` metric label.
    pub fn outcome(&self) -> &'static str {
        match self.code() {
            Code::InvalidArgument => "invalid_argument",
            Code::NotFound => "not_found",
            Code::PermissionDenied => "permission_denied",
            Code::Unauthenticated => "unauthenticated",
            Code::Cancelled => "cancelled",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unavailable => "unavailable",
            Code::ResourceExhausted => "resource_exhausted",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::Internal => "internal",
            _ => "unknown",
        }
    }

    /// Feishu's code, if Feishu gave one.
    pub fn feishu_code(&self) -> Option<i64> {
        self.gateway().and_then(GatewayError::feishu_code)
    }

    fn upstream(&self) -> Option<&UpstreamError> {
        self.gateway().and_then(GatewayError::upstream)
    }

    fn gateway(&self) -> Option<&GatewayError> {
        match self {
            CallError::Gateway(e) => Some(e),
            _ => None,
        }
    }

    /// The gRPC code: the table of DESIGN.md §5.
    pub fn code(&self) -> Code {
        let e = match self {
            CallError::Unauthenticated(_) => return Code::Unauthenticated,
            CallError::UnknownCaller(_) => return Code::NotFound,
            CallError::AppNotAllowed { .. } | CallError::NotAdmin(_) => {
                return Code::PermissionDenied;
            }
            CallError::CallerRateLimited { .. } => return Code::ResourceExhausted,
            CallError::Gateway(e) => e,
        };
        match e {
            GatewayError::Invalid(_) | GatewayError::NoDefaultApp => Code::InvalidArgument,
            GatewayError::UnknownApp(_) | GatewayError::AppRemoved { .. } => Code::NotFound,
            GatewayError::CallerRemoved { .. } => Code::PermissionDenied,
            GatewayError::JobNotFound(_) => Code::NotFound,
            GatewayError::NoJobStore
            | GatewayError::NotCancellable(_)
            | GatewayError::MessageGone { .. } => Code::FailedPrecondition,
            GatewayError::JobStore(_) => Code::Unavailable,
            GatewayError::Cancelled => Code::Cancelled,
            GatewayError::QueueFull { .. } | GatewayError::DeadlineUnreachable { .. } => {
                Code::ResourceExhausted
            }
            GatewayError::DeadlineBeforeSend { .. } => Code::DeadlineExceeded,
            GatewayError::ShuttingDown { .. } | GatewayError::SharedQuotasUnavailable { .. } => {
                Code::Unavailable
            }
            GatewayError::Internal { .. } => Code::Internal,
            GatewayError::Upstream { error, .. } | GatewayError::ChatLookup(error) => {
                upstream_code(error)
            }
            GatewayError::Peer(f) => Code::from_i32(f.code),
        }
    }

    /// `ErrorInfo.reason`.
    pub fn reason(&self) -> String {
        let e = match self {
            CallError::Unauthenticated(e) => return e.reason().into(),
            CallError::UnknownCaller(_) => return "UNKNOWN_CALLER".into(),
            CallError::AppNotAllowed { .. } => return "APP_NOT_ALLOWED".into(),
            CallError::NotAdmin(_) => return "NOT_ADMIN".into(),
            CallError::CallerRateLimited { .. } => return "CALLER_RATE_LIMITED".into(),
            CallError::Gateway(e) => e,
        };
        match e {
            GatewayError::Invalid(v) => v.reason().into(),
            GatewayError::UnknownApp(_) => "UNKNOWN_APP".into(),
            GatewayError::AppRemoved { .. } => "APP_REMOVED".into(),
            GatewayError::CallerRemoved { .. } => "CALLER_REMOVED".into(),
            GatewayError::MessageGone { .. } => "MESSAGE_GONE".into(),
            GatewayError::JobNotFound(_) => "JOB_NOT_FOUND".into(),
            GatewayError::NoJobStore => "NO_JOB_STORE".into(),
            GatewayError::JobStore(_) => "JOB_STORE".into(),
            GatewayError::NotCancellable(_) => "JOB_NOT_CANCELLABLE".into(),
            GatewayError::Cancelled => "CANCELLED".into(),
            GatewayError::NoDefaultApp => "NO_DEFAULT_APP".into(),
            GatewayError::QueueFull { .. } => "QUEUE_FULL".into(),
            GatewayError::DeadlineUnreachable { .. } => "DEADLINE_UNREACHABLE".into(),
            GatewayError::DeadlineBeforeSend { .. } => "DEADLINE_BEFORE_SEND".into(),
            GatewayError::ShuttingDown { .. } => "SHUTTING_DOWN".into(),
            GatewayError::SharedQuotasUnavailable { .. } => "QUOTA_STORE_UNAVAILABLE".into(),
            GatewayError::Internal { .. } => "INTERNAL".into(),
            GatewayError::Peer(f) => f.reason.clone(),
            GatewayError::Upstream { error, .. } | GatewayError::ChatLookup(error) => match error {
                UpstreamError::Credentials { .. } => "APP_CREDENTIALS".into(),
                UpstreamError::Feishu { code, .. } => format!("FEISHU_{code}"),
                UpstreamError::Network { .. } => "UPSTREAM_NETWORK".into(),
                UpstreamError::BadResponse { http, .. } if *http >= 500 => "UPSTREAM_5XX".into(),
                UpstreamError::BadResponse { .. } => "UPSTREAM_BAD_RESPONSE".into(),
                UpstreamError::BudgetSpent { .. } | UpstreamError::MonthQuotaSpent { .. } => {
                    "APP_BUDGET_SPENT".into()
                }
            },
        }
    }

    /// When waiting helps, how long (RetryInfo).
    pub fn retry_after(&self) -> Option<Duration> {
        let e = match self {
            CallError::CallerRateLimited { retry_after, .. } => return Some(*retry_after),
            CallError::Gateway(e) => e,
            _ => return None,
        };
        match e {
            GatewayError::QueueFull { retry_after, .. } => Some(*retry_after),
            GatewayError::Peer(f) => f.retry_after_ms.map(Duration::from_millis),
            GatewayError::DeadlineUnreachable { earliest_in, .. } => Some(*earliest_in),
            GatewayError::ShuttingDown { .. }
            | GatewayError::JobStore(_)
            | GatewayError::SharedQuotasUnavailable { .. } => Some(Duration::from_secs(1)),
            GatewayError::Upstream {
                error:
                    UpstreamError::BudgetSpent { reset_in, .. }
                    | UpstreamError::MonthQuotaSpent { reset_in, .. },
                ..
            }
            | GatewayError::ChatLookup(
                UpstreamError::BudgetSpent { reset_in, .. }
                | UpstreamError::MonthQuotaSpent { reset_in, .. },
            ) => Some(*reset_in),
            GatewayError::Upstream { error, .. } | GatewayError::ChatLookup(error)
                if error.retry_reason().is_some() =>
            {
                Some(error.retry_after().unwrap_or(Duration::from_secs(1)))
            }
            _ => None,
        }
    }

    /// The gRPC status with ErrorInfo (+ RetryInfo, + BadRequest for validation errors).
    pub fn to_status(&self) -> Status {
        self.to_status_for(Api::Reply)
    }

    /// The gRPC code of a failure of a call to `api`: [`CallError::code`], except where the
    /// endpoint's own table says a Feishu code is a precondition there.
    pub fn code_for(&self, api: Api) -> Code {
        if let Some(GatewayError::Peer(f)) = self.gateway() {
            // The owner read Feishu's code in the endpoint's table already.
            return Code::from_i32(f.code);
        }
        match self.feishu_code().and_then(|c| meaning(api, c)) {
            Some((_, true)) if self.code() == Code::Unknown => Code::FailedPrecondition,
            _ => self.code(),
        }
    }

    /// [`CallError::to_status`] of a call to `api`: Feishu's code read in that endpoint's
    /// table (its meaning there, and its gRPC code).
    pub fn to_status_for(&self, api: Api) -> Status {
        if let Some(GatewayError::Peer(f)) = self.gateway() {
            // As the owner gave it, details and all.
            return Status::with_details(
                Code::from_i32(f.code),
                f.message.clone(),
                bytes::Bytes::from(f.details.clone()),
            );
        }
        let mut meta = HashMap::new();
        let meant = self.feishu_code().and_then(|c| meaning(api, c));
        if let Some((m, _)) = meant {
            meta.insert("feishu_meaning".to_owned(), m.to_owned());
        }
        if let Some(e) = self.upstream() {
            if let Some(code) = e.code() {
                meta.insert("feishu_code".to_owned(), code.to_string());
            }
            if let UpstreamError::Feishu { msg, .. } | UpstreamError::Credentials { msg, .. } = e {
                meta.insert("feishu_msg".to_owned(), msg.clone());
            }
            if !e.log_id().is_empty() {
                meta.insert("log_id".to_owned(), e.log_id().to_owned());
            }
            if let UpstreamError::BudgetSpent { app, .. }
            | UpstreamError::MonthQuotaSpent { app, .. } = e
            {
                meta.insert("app".to_owned(), app.clone());
            }
        }
        if let Some(e) = self.gateway() {
            // Sending began (or was decided against): how far it got, and the uuid to retry with.
            if let (Some(attempts), Some(uuid)) = (e.attempts(), e.uuid()) {
                meta.insert("attempts".to_owned(), attempts.to_string());
                meta.insert("uuid".to_owned(), uuid.to_owned());
            }
            match e {
                GatewayError::AppRemoved { app, .. } => {
                    meta.insert("app".to_owned(), app.clone());
                }
                GatewayError::MessageGone { message_id, .. } => {
                    meta.insert("message_id".to_owned(), message_id.clone());
                }
                GatewayError::CallerRemoved { caller, .. } => {
                    meta.insert("caller".to_owned(), caller.clone());
                }
                GatewayError::QueueFull { scope, .. } => {
                    meta.insert("scope".to_owned(), (*scope).to_owned());
                }
                _ => {}
            }
        }
        match self {
            CallError::CallerRateLimited { caller, .. } => {
                meta.insert("caller".to_owned(), caller.clone());
            }
            CallError::AppNotAllowed { caller, app } => {
                meta.insert("caller".to_owned(), caller.clone());
                meta.insert("app".to_owned(), app.clone());
            }
            _ => {}
        }
        let mut details = ErrorDetails::new();
        details.set_error_info(self.reason(), ERROR_DOMAIN, meta);
        if let Some(d) = self.retry_after() {
            details.set_retry_info(Some(d));
        }
        if let Some(GatewayError::Invalid(v)) = self.gateway() {
            details.add_bad_request_violation(v.field(), v.to_string());
        }
        let message = match meant {
            Some((m, _)) => format!("{m}: {self}"),
            None => self.to_string(),
        };
        Status::with_error_details(self.code_for(api), message, details)
    }
}

fn upstream_code(e: &UpstreamError) -> Code {
    if e.retry_reason().is_some() {
        return Code::Unavailable;
    }
    match e {
        UpstreamError::Credentials { .. } => Code::FailedPrecondition,
        UpstreamError::Feishu { code, .. } => {
            if INVALID_ARGUMENT_CODES.contains(code) {
                Code::InvalidArgument
            } else if PERMISSION_DENIED_CODES.contains(code) {
                Code::PermissionDenied
            } else if FAILED_PRECONDITION_CODES.contains(code) || e.is_token_invalid() {
                Code::FailedPrecondition
            } else {
                Code::Unknown
            }
        }
        UpstreamError::Network { .. } | UpstreamError::BadResponse { .. } => Code::Unknown,
        UpstreamError::BudgetSpent { .. } | UpstreamError::MonthQuotaSpent { .. } => {
            Code::ResourceExhausted
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::ValidationError;

    fn feishu(http: u16, code: i64) -> UpstreamError {
        UpstreamError::Feishu {
            http,
            code,
            msg: format!("msg {code}"),
            log_id: "LOG1".into(),
            retry_after: None,
        }
    }

    fn upstream(e: UpstreamError) -> CallError {
        CallError::Gateway(GatewayError::Upstream {
            error: e,
            attempts: 3,
            uuid: "u-1".into(),
        })
    }

    fn check(e: impl Into<CallError>, code: Code, reason: &str, retry: bool) {
        let e = e.into();
        let s = e.to_status();
        assert_eq!(s.code(), code, "{e}");
        let info = s.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, reason);
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(
            s.get_details_retry_info().is_some(),
            retry,
            "{e}: RetryInfo"
        );
    }

    #[test]
    fn local_validation_is_invalid_argument() {
        let e = CallError::from(GatewayError::Invalid(ValidationError::NotObject(
            crate::reply::MsgType::Text,
        )));
        check(e.clone(), Code::InvalidArgument, "INVALID_CONTENT", false);
        let bad = e.to_status().get_error_details();
        assert_eq!(
            bad.bad_request().unwrap().field_violations[0].field,
            "content"
        );
    }

    #[test]
    fn feishu_invalid_argument_codes() {
        for c in INVALID_ARGUMENT_CODES {
            check(
                upstream(feishu(400, c)),
                Code::InvalidArgument,
                &format!("FEISHU_{c}"),
                false,
            );
        }
    }

    #[test]
    fn feishu_permission_denied_codes() {
        for c in PERMISSION_DENIED_CODES {
            check(
                upstream(feishu(400, c)),
                Code::PermissionDenied,
                &format!("FEISHU_{c}"),
                false,
            );
        }
    }

    #[test]
    fn feishu_failed_precondition_codes() {
        for c in FAILED_PRECONDITION_CODES {
            check(
                upstream(feishu(400, c)),
                Code::FailedPrecondition,
                &format!("FEISHU_{c}"),
                false,
            );
        }
    }

    #[test]
    fn retryable_after_retries_exhausted_is_unavailable_with_retry_info() {
        check(
            upstream(feishu(400, 230020)),
            Code::Unavailable,
            "FEISHU_230020",
            true,
        );
        check(
            upstream(feishu(400, 230049)),
            Code::Unavailable,
            "FEISHU_230049",
            true,
        );
        let mut f = feishu(429, 99991400);
        if let UpstreamError::Feishu { retry_after, .. } = &mut f {
            *retry_after = Some(Duration::from_secs(7));
        }
        let s = upstream(f).to_status();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            s.get_details_retry_info().unwrap().retry_delay,
            Some(Duration::from_secs(7))
        );
        check(
            upstream(feishu(503, 1)),
            Code::Unavailable,
            "FEISHU_1",
            true,
        );
        let net = UpstreamError::Network {
            kind: "timeout",
            detail: "x".into(),
        };
        check(upstream(net), Code::Unavailable, "UPSTREAM_NETWORK", true);
    }

    #[test]
    fn queue_or_admission_full_is_resource_exhausted_with_retry_info() {
        let q = GatewayError::QueueFull {
            scope: "chat",
            queued: 200,
            retry_after: Duration::from_secs(40),
        };
        check(q, Code::ResourceExhausted, "QUEUE_FULL", true);
        let a = CallError::CallerRateLimited {
            caller: "svc".into(),
            retry_after: Duration::from_millis(5),
        };
        check(a, Code::ResourceExhausted, "CALLER_RATE_LIMITED", true);
        let d = GatewayError::DeadlineUnreachable {
            earliest_in: Duration::from_secs(3),
            deadline_in: Duration::from_secs(1),
        };
        check(d, Code::ResourceExhausted, "DEADLINE_UNREACHABLE", true);
    }

    #[test]
    fn unusable_shared_quotas_under_fail_closed_are_unavailable_with_retry_info() {
        let e = GatewayError::SharedQuotasUnavailable {
            attempts: 0,
            uuid: "u-2".into(),
        };
        check(
            e.clone(),
            Code::Unavailable,
            "QUOTA_STORE_UNAVAILABLE",
            true,
        );
        let info = CallError::from(e)
            .to_status()
            .get_details_error_info()
            .unwrap();
        assert_eq!(info.metadata["uuid"], "u-2");
    }

    #[test]
    fn deadline_before_send_is_deadline_exceeded() {
        let e = GatewayError::DeadlineBeforeSend {
            attempts: 0,
            uuid: "u".into(),
        };
        check(e, Code::DeadlineExceeded, "DEADLINE_BEFORE_SEND", false);
    }

    #[test]
    fn bad_credentials_are_failed_precondition_app_credentials() {
        let e = upstream(UpstreamError::Credentials {
            code: 10014,
            msg: "app secret invalid".into(),
            log_id: String::new(),
        });
        check(e, Code::FailedPrecondition, "APP_CREDENTIALS", false);
    }

    #[test]
    fn unknown_app_is_not_found() {
        check(
            GatewayError::UnknownApp("x".into()),
            Code::NotFound,
            "UNKNOWN_APP",
            false,
        );
    }

    #[test]
    fn a_revoked_caller_is_permission_denied_with_the_uuid_not_sent() {
        let e = CallError::from(GatewayError::CallerRemoved {
            caller: "svc".into(),
            attempts: 0,
            uuid: "u-3".into(),
        });
        check(e.clone(), Code::PermissionDenied, "CALLER_REMOVED", false);
        let info = e.to_status().get_details_error_info().unwrap();
        assert_eq!(info.metadata["caller"], "svc");
        assert_eq!(info.metadata["uuid"], "u-3");
        assert_eq!(info.metadata["attempts"], "0");
    }

    #[test]
    fn a_spent_monthly_quota_is_resource_exhausted_until_the_month_ends() {
        let e = upstream(UpstreamError::MonthQuotaSpent {
            app: "ops".into(),
            reset_in: Duration::from_secs(3600),
            log_id: "L1".into(),
        });
        check(e.clone(), Code::ResourceExhausted, "APP_BUDGET_SPENT", true);
        let s = e.to_status();
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.metadata["app"], "ops");
        assert_eq!(info.metadata["feishu_code"], "99991403");
        assert_eq!(
            s.get_details_retry_info().unwrap().retry_delay,
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn a_gone_message_is_failed_precondition_naming_it() {
        let e = CallError::from(GatewayError::MessageGone {
            message_id: "om_x".into(),
            attempts: 0,
            uuid: "u-4".into(),
        });
        check(e.clone(), Code::FailedPrecondition, "MESSAGE_GONE", false);
        let info = e.to_status().get_details_error_info().unwrap();
        assert_eq!(info.metadata["message_id"], "om_x");
        assert_eq!(info.metadata["uuid"], "u-4");
    }

    #[test]
    fn unknown_caller_is_not_found() {
        check(
            CallError::UnknownCaller("x".into()),
            Code::NotFound,
            "UNKNOWN_CALLER",
            false,
        );
    }

    #[test]
    fn a_panic_while_sending_is_internal_with_the_uuid_to_retry_with() {
        let e = CallError::from(GatewayError::Internal {
            attempts: 1,
            uuid: "u-1".into(),
        });
        check(e.clone(), Code::Internal, "INTERNAL", false);
        let info = e.to_status().get_details_error_info().unwrap();
        assert_eq!(info.metadata.get("uuid").map(String::as_str), Some("u-1"));
        assert_eq!(e.outcome(), "internal");
    }

    #[test]
    fn upstream_metadata_carries_code_msg_and_log_id() {
        let s = upstream(feishu(400, 230002)).to_status();
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.metadata["feishu_code"], "230002");
        assert_eq!(info.metadata["feishu_msg"], "msg 230002");
        assert_eq!(info.metadata["log_id"], "LOG1");
        assert_eq!(info.metadata["uuid"], "u-1");
    }
}
