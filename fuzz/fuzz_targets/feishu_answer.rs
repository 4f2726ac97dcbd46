//! Feishu's answers (reply and token endpoints): any status, rate-limit header and body give a
//! classification, never a panic; an error never quotes the tenant_access_token of the body.
#![no_main]

use feishu_reply_gateway::feishu::answer::{parse_reply_answer, parse_token_answer};
use libfuzzer_sys::fuzz_target;
use reqwest::header::{HeaderMap, HeaderValue};

fuzz_target!(|f: (u16, String, String, Vec<u8>)| {
    let (http, log_id, reset, body) = f;
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&log_id) {
        headers.insert("x-tt-logid", v);
    }
    if let Ok(v) = HeaderValue::from_str(&reset) {
        headers.insert("x-ogw-ratelimit-reset", v);
    }
    let reply = parse_reply_answer(http, &headers, &body);
    let token = parse_token_answer(http, &headers, &body);
    if let Ok(ttl) = &token {
        assert!(ttl.as_secs() <= 7200);
    }
    if let Err(e) = &reply {
        let _ = (e.retry_reason(), e.retry_after(), e.code());
    }
    // A token in the body stays out of every error, unless Feishu's own msg repeats it.
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(&body) else {
        return;
    };
    let Some(serde_json::Value::String(t)) = map.get("tenant_access_token") else {
        return;
    };
    let msg = map.get("msg").map(|m| m.to_string()).unwrap_or_default();
    if t.len() >= 16 && !msg.contains(t.as_str()) {
        for e in [reply.err(), token.err()].into_iter().flatten() {
            assert!(!e.to_string().contains(t.as_str()), "{e}");
        }
    }
});
