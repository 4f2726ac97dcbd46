//! What went wrong talking to Feishu, classified by the body's `code` (never the HTTP status
//! alone): retryable (and why), token-invalid, bad credentials, or final.

use std::time::Duration;

/// Feishu: "This operation triggers the frequency limit" (5 QPS per user / per chat).
pub const CODE_RATE_LIMITED: i64 = 230020;
/// Feishu: "The message is being sent".
pub const CODE_BEING_SENT: i64 = 230049;
/// Feishu gateway frequency control ("request trigger frequency limit"), usually HTTP 429.
pub const CODE_FREQUENCY_LIMIT: i64 = 99991400;
/// Feishu's message service is under pressure ("create message service / chat trigger rate
/// limit", "internal send message trigger rate limit"): a limit of Feishu's own, not one of
/// the quotas the gateway keeps.
pub const MESSAGE_SERVICE_CODES: [i64; 3] = [11232, 11233, 11247];
/// Feishu: "This month's API call quota has been exceeded" (sometimes with HTTP 429): not a
/// rate limit; nothing the app calls goes through until the month ends.
pub const CODE_MONTH_QUOTA_SPENT: i64 = 99991403;
/// Token missing / invalid / app token invalid / format / user token codes.
pub const TOKEN_INVALID_CODES: [i64; 6] =
    [99991661, 99991663, 99991664, 99991671, 99991668, 99991677];
/// The app's credentials were refused.
pub const CODE_BAD_CREDENTIALS: i64 = 99991543;

/// Why an attempt may be retried (also the `reason` label of the retries metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryReason {
    /// 230020: per chat/user frequency limit.
    RateLimited,
    /// 230049: the message is being sent.
    BeingSent,
    /// 99991400 / HTTP 429: app-level frequency control.
    Frequency,
    /// 11232 / 11233 / 11247: Feishu's message service limits (see [`MESSAGE_SERVICE_CODES`]).
    MessageService,
    /// HTTP 5xx.
    ServerError,
    /// Connect error, timeout, broken connection.
    Network,
}

impl RetryReason {
    pub const ALL: [RetryReason; 6] = [
        RetryReason::RateLimited,
        RetryReason::BeingSent,
        RetryReason::Frequency,
        RetryReason::MessageService,
        RetryReason::ServerError,
        RetryReason::Network,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::RateLimited => "rate_limited_230020",
            RetryReason::BeingSent => "being_sent_230049",
            RetryReason::Frequency => "frequency_limit_429",
            RetryReason::MessageService => "message_service_11232",
            RetryReason::ServerError => "server_error_5xx",
            RetryReason::Network => "network",
        }
    }

    /// Feishu refused for rate although the gateway kept its quotas (someone else spends them,
    /// or Feishu counts differently).
    pub fn is_rate_rejection(self) -> bool {
        matches!(self, RetryReason::RateLimited | RetryReason::Frequency)
    }
}

/// A failed call to Feishu.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// Feishu answered with a non-zero `code`.
    #[error("Feishu code {code} (HTTP {http}): {msg}")]
    Feishu {
        http: u16,
        code: i64,
        msg: String,
        log_id: String,
        /// `x-ogw-ratelimit-reset` (seconds until the limit recovers), when present.
        retry_after: Option<Duration>,
    },
    /// The token endpoint refused the app's credentials.
    #[error("Feishu refused the app credentials (code {code}): {msg}")]
    Credentials {
        code: i64,
        msg: String,
        log_id: String,
    },
    /// No usable answer: connect error, timeout, connection reset.
    #[error("network error talking to Feishu ({kind}): {detail}")]
    Network { kind: &'static str, detail: String },
    /// The app's call budget for this period is spent: the call was not made.
    #[error("the Feishu call budget of app {app} is spent ({calls} calls per {period}); it resets in {} s", reset_in.as_secs())]
    BudgetSpent {
        app: String,
        calls: u64,
        period: &'static str,
        reset_in: Duration,
    },
    /// Feishu said the month's API calls are spent (99991403) for the app: its calls fail here,
    /// without a call, until the month ends (China time: Feishu counts from the 1st).
    #[error("Feishu says this month's API calls of app {app} are spent (code 99991403); its calls fail until the month ends, in {} s", reset_in.as_secs())]
    MonthQuotaSpent {
        app: String,
        reset_in: Duration,
        /// The answer's log id (empty when refused here without a call).
        log_id: String,
    },
    /// An answer that is not Feishu's JSON envelope (e.g. a proxy's HTML 502).
    #[error("unexpected answer from Feishu (HTTP {http}): {detail}")]
    BadResponse {
        http: u16,
        detail: String,
        log_id: String,
    },
}

impl UpstreamError {
    /// Retryable with the same uuid (Feishu dedupes by uuid, so no double post)?
    pub fn retry_reason(&self) -> Option<RetryReason> {
        match self {
            UpstreamError::Feishu { code, http, .. } => match *code {
                CODE_RATE_LIMITED => Some(RetryReason::RateLimited),
                CODE_BEING_SENT => Some(RetryReason::BeingSent),
                CODE_FREQUENCY_LIMIT => Some(RetryReason::Frequency),
                c if MESSAGE_SERVICE_CODES.contains(&c) => Some(RetryReason::MessageService),
                // The month's calls are spent: waiting seconds does not help (even at 429).
                CODE_MONTH_QUOTA_SPENT => None,
                _ if *http == 429 => Some(RetryReason::Frequency),
                _ if *http >= 500 => Some(RetryReason::ServerError),
                _ => None,
            },
            UpstreamError::Network { .. } => Some(RetryReason::Network),
            UpstreamError::BadResponse { http, .. } if *http == 429 => Some(RetryReason::Frequency),
            UpstreamError::BadResponse { http, .. } if *http >= 500 => {
                Some(RetryReason::ServerError)
            }
            UpstreamError::BadResponse { .. }
            | UpstreamError::Credentials { .. }
            | UpstreamError::BudgetSpent { .. }
            | UpstreamError::MonthQuotaSpent { .. } => None,
        }
    }

    /// The tenant_access_token was refused: refresh it and retry once.
    pub fn is_token_invalid(&self) -> bool {
        matches!(self, UpstreamError::Feishu { code, .. } if TOKEN_INVALID_CODES.contains(code))
    }

    /// How long Feishu asked us to wait (`x-ogw-ratelimit-reset`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::Feishu { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn log_id(&self) -> &str {
        match self {
            UpstreamError::Feishu { log_id, .. }
            | UpstreamError::Credentials { log_id, .. }
            | UpstreamError::BadResponse { log_id, .. }
            | UpstreamError::MonthQuotaSpent { log_id, .. } => log_id,
            UpstreamError::Network { .. } | UpstreamError::BudgetSpent { .. } => "",
        }
    }

    /// Feishu's code, when there is one.
    pub fn code(&self) -> Option<i64> {
        match self {
            UpstreamError::Feishu { code, .. } | UpstreamError::Credentials { code, .. } => {
                Some(*code)
            }
            UpstreamError::MonthQuotaSpent { .. } => Some(CODE_MONTH_QUOTA_SPENT),
            _ => None,
        }
    }

    /// How a failed call ended, for metrics and spans: `network`, `retryable` or `error`.
    pub fn outcome(&self) -> &'static str {
        match self {
            UpstreamError::Network { .. } => "network",
            e if e.retry_reason().is_some() => "retryable",
            _ => "error",
        }
    }

    /// The HTTP status Feishu answered with, when it answered.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            UpstreamError::Feishu { http, .. } | UpstreamError::BadResponse { http, .. } => {
                Some(*http)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_reasons_are_the_labels_the_metrics_pre_create() {
        let all: Vec<&str> = RetryReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(all, crate::metrics::RETRY_REASONS);
        let rate: Vec<&str> = RetryReason::ALL
            .iter()
            .filter(|r| r.is_rate_rejection())
            .map(|r| r.as_str())
            .collect();
        assert_eq!(rate, crate::metrics::RATE_REJECTION_REASONS);
    }

    fn feishu(http: u16, code: i64) -> UpstreamError {
        UpstreamError::Feishu {
            http,
            code,
            msg: String::new(),
            log_id: String::new(),
            retry_after: None,
        }
    }

    #[test]
    fn classifies_by_body_code_first() {
        assert_eq!(
            feishu(400, 230020).retry_reason(),
            Some(RetryReason::RateLimited)
        );
        assert_eq!(
            feishu(400, 230049).retry_reason(),
            Some(RetryReason::BeingSent)
        );
        assert_eq!(
            feishu(429, 99991400).retry_reason(),
            Some(RetryReason::Frequency)
        );
        assert_eq!(
            feishu(400, 99991400).retry_reason(),
            Some(RetryReason::Frequency)
        );
        assert_eq!(
            feishu(503, 1).retry_reason(),
            Some(RetryReason::ServerError)
        );
        for code in [11232, 11233, 11247] {
            assert_eq!(
                feishu(400, code).retry_reason(),
                Some(RetryReason::MessageService),
                "{code}"
            );
        }
        assert!(!RetryReason::MessageService.is_rate_rejection());
        // The month's quota: final, also when it comes as a 429.
        assert_eq!(feishu(429, 99991403).retry_reason(), None);
        assert_eq!(feishu(400, 99991403).retry_reason(), None);
        assert_eq!(feishu(400, 230002).retry_reason(), None);
        assert_eq!(feishu(200, 230011).retry_reason(), None);
        assert!(feishu(200, 99991663).is_token_invalid());
        assert!(feishu(400, 99991661).is_token_invalid());
        assert!(!feishu(400, 230020).is_token_invalid());
        let net = UpstreamError::Network {
            kind: "timeout",
            detail: String::new(),
        };
        assert_eq!(net.retry_reason(), Some(RetryReason::Network));
        let html = UpstreamError::BadResponse {
            http: 502,
            detail: String::new(),
            log_id: String::new(),
        };
        assert_eq!(html.retry_reason(), Some(RetryReason::ServerError));
    }
}
