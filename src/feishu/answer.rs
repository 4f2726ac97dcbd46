//! Feishu's answers, classified without I/O: the `{code, msg, data}` envelope, a reply's
//! `data`, a token answer. Pure functions of (status, headers, body), so they are fuzzed
//! (`fuzz/`) and never quote a secret: a body that is not Feishu's envelope is described by
//! its shape, never its values.

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::Value;

use super::token::FetchedToken;
use super::{SentMessage, UpstreamError};

/// A tenant_access_token lives at most this long (Feishu issues them for 2 h).
const MAX_TOKEN_LIFETIME_S: u64 = 7200;

/// Feishu's answer envelope: `{code, msg, data}` (token endpoint: token fields at top level).
#[derive(Debug, Deserialize)]
pub(super) struct Envelope {
    pub(super) code: i64,
    #[serde(default, deserialize_with = "lenient_string")]
    pub(super) msg: String,
    #[serde(default)]
    pub(super) data: Option<Value>,
    #[serde(default)]
    tenant_access_token: Option<String>,
    #[serde(default)]
    expire: Option<u64>,
    #[serde(default)]
    error: Option<EnvelopeError>,
}

/// A string field that may also come as null (empty) or another JSON type (its text).
fn lenient_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    })
}

/// Feishu's `data` of a code-0 reply, read field by field. Code 0 means the reply was posted,
/// so nothing in `data` may turn it into an error (the caller would retry with a new uuid and
/// post twice): a missing, null or odd-typed field reads as empty, a number as its digits.
fn sent_message(data: &Value) -> SentMessage {
    let field = |name: &str| match data.get(name) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    SentMessage {
        message_id: field("message_id"),
        root_id: field("root_id"),
        parent_id: field("parent_id"),
        thread_id: field("thread_id"),
        chat_id: field("chat_id"),
        msg_type: field("msg_type"),
        create_time: field("create_time"),
        card_id: field("card_id"),
        log_id: String::new(),
    }
}

#[derive(Debug, Default, Deserialize)]
struct EnvelopeError {
    #[serde(default)]
    log_id: String,
}

/// Characters of a non-JSON body quoted in an error (a proxy's error page).
const EXCERPT_CHARS: usize = 120;
/// Runs of this many token-like characters are masked in an excerpt (a tenant_access_token
/// is `t-` + 30 hex digits).
const TOKEN_LIKE_RUN: usize = 16;

/// What an answer that is not Feishu's envelope looked like, safe for a status message and a
/// log line: JSON is described by its shape (keys and value types, never values: the token
/// endpoint's answer holds the token); anything else by a short excerpt with token-like runs
/// masked.
fn describe_body(body: &[u8]) -> String {
    fn shape(v: &Value) -> &'static str {
        match v {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => {
            let fields: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k}: {}", shape(v)))
                .collect();
            format!("JSON {{{}}}", fields.join(", "))
        }
        Ok(other) => format!("JSON {}", shape(&other)),
        Err(_) => {
            let text: String = String::from_utf8_lossy(body)
                .chars()
                .take(EXCERPT_CHARS)
                .collect();
            format!("{} bytes: {:?}", body.len(), mask_token_like(&text))
        }
    }
}

/// `text` with every run of at least [`TOKEN_LIKE_RUN`] letters, digits, `-` or `_` replaced by
/// `…` (tokens, secrets, ids).
fn mask_token_like(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.chars().count() >= TOKEN_LIKE_RUN {
            out.push('…');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Reads `{code, msg, data}` from an answer with status `http`; a non-zero code becomes
/// [`UpstreamError::Feishu`]. Returns the envelope and the request's log id.
pub(super) fn parse_envelope(
    http: u16,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Envelope, String), UpstreamError> {
    let header_log_id = headers
        .get("x-tt-logid")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let env: Envelope = match serde_json::from_slice(body) {
        Ok(env) => env,
        Err(_) => {
            return Err(UpstreamError::BadResponse {
                http,
                detail: format!("not a Feishu answer: {}", describe_body(body)),
                log_id: header_log_id,
            });
        }
    };
    let log_id = if header_log_id.is_empty() {
        env.error
            .as_ref()
            .map(|e| e.log_id.clone())
            .unwrap_or_default()
    } else {
        header_log_id
    };
    if env.code != 0 {
        let retry_after = headers
            .get("x-ogw-ratelimit-reset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(3600.0)));
        return Err(UpstreamError::Feishu {
            http,
            code: env.code,
            msg: env.msg,
            log_id,
            retry_after,
        });
    }
    if !(200..300).contains(&http) {
        return Err(UpstreamError::BadResponse {
            http,
            detail: "code 0 with a non-2xx status".into(),
            log_id,
        });
    }
    Ok((env, log_id))
}

/// A code-0 reply answer: the message posted (never an error, whatever `data` holds).
pub(super) fn reply_from(env: Envelope, log_id: String) -> SentMessage {
    let mut msg = sent_message(env.data.as_ref().unwrap_or(&Value::Null));
    msg.log_id = log_id;
    msg
}

/// A code-0 token answer: the token and how long it lives (capped at 2 h).
pub(super) fn token_from(env: Envelope, log_id: String) -> Result<FetchedToken, UpstreamError> {
    match (env.code, env.tenant_access_token, env.expire) {
        (0, Some(value), Some(expire)) => Ok(FetchedToken {
            value,
            // A tenant_access_token lives at most 2 h; a longer `expire` is not Feishu's.
            expires_in: Duration::from_secs(expire.min(MAX_TOKEN_LIFETIME_S)),
        }),
        (0, _, _) => Err(UpstreamError::BadResponse {
            http: 200,
            detail: "token answer without tenant_access_token/expire".into(),
            log_id,
        }),
        (code, _, _) => Err(UpstreamError::Credentials {
            code,
            msg: env.msg,
            log_id,
        }),
    }
}

/// Classifies a reply endpoint answer (fuzzing and tests): the message posted, or the error.
pub fn parse_reply_answer(
    http: u16,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<SentMessage, UpstreamError> {
    parse_envelope(http, headers, body).map(|(env, log_id)| reply_from(env, log_id))
}

/// Classifies a token endpoint answer (fuzzing and tests): the token's lifetime, or the error.
pub fn parse_token_answer(
    http: u16,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Duration, UpstreamError> {
    let (env, log_id) = parse_envelope(http, headers, body)?;
    token_from(env, log_id).map(|t| t.expires_in)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_described_without_secrets() {
        let json = br#"{"code":0,"tenant_access_token":"t-7f1bcd13fc57d46bac21793a18e560","expire":"7200"}"#;
        assert_eq!(
            describe_body(json),
            "JSON {code: number, expire: string, tenant_access_token: string}"
        );
        // Cut off mid-answer: not JSON, so an excerpt, with the token masked.
        let cut = br#"{"code":0,"tenant_access_token":"t-7f1bcd13fc57d46bac2179"#;
        let d = describe_body(cut);
        assert!(!d.contains("7f1bcd13"), "{d}");
        // A proxy's error page stays readable.
        let html = b"<html><body>502 Bad Gateway</body></html>";
        assert!(describe_body(html).contains("502 Bad Gateway"));
    }
}
