//! The fake's reply endpoint: parse and validate like Feishu, dedupe by uuid, apply scripted
//! or random faults, then count the quotas at the request's arrival and post.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::window::{Counter, counter_record, counter_retry_after, next_f64};
use super::{
    FakeQuota, Inner, MAX_RECORDS, MessageInfo, NewConnection, Received, Shared, UUID_TTL, arrive,
    authorize, error, feishu, message_info, well_formed_id,
};
use crate::reply::MsgType;

#[derive(Deserialize)]
struct ReplyBody {
    content: Option<String>,
    msg_type: Option<String>,
    #[serde(default)]
    reply_in_thread: bool,
    #[serde(default)]
    uuid: String,
}

pub(super) async fn reply(
    State(s): State<Arc<Shared>>,
    conn: Option<axum::Extension<NewConnection>>,
    Path(message_id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    arrive(&s, conn.as_deref()).await;
    let arrived = Instant::now();
    let latency = s.inner.lock().opts.latency;
    let body: Option<ReplyBody> = serde_json::from_slice(&body).ok();
    let (response, hold) = {
        let mut inner = s.inner.lock();
        handle_reply(&s, &mut inner, arrived, &message_id, &headers, body)
    };
    let wait = match hold {
        Some(Hold::Delay(d)) => latency + d,
        _ => latency,
    };
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    if let Some(Hold::UntilReleased(at)) = hold {
        let _ = s.released.subscribe().wait_for(|g| *g > at).await;
    }
    response
}

fn handle_reply(
    s: &Shared,
    inner: &mut Inner,
    arrived: Instant,
    message_id: &str,
    headers: &HeaderMap,
    body: Option<ReplyBody>,
) -> (Response, Option<Hold>) {
    inner.stats.reply_requests += 1;
    let app_id = match authorize(inner, headers) {
        Ok(a) => a,
        Err((code, msg)) => return (error(s, 400, code, msg), None),
    };
    let info = message_info(inner, message_id);
    let mut record = Received {
        seq: inner.stats.reply_requests,
        at_ms: arrived.duration_since(s.started).as_secs_f64() * 1000.0,
        message_id: message_id.to_owned(),
        chat_id: info.chat_id.clone(),
        app_id: app_id.clone(),
        uuid: String::new(),
        msg_type: String::new(),
        content: String::new(),
        code: 0,
        http: 200,
        deduped: false,
    };
    let (code, http, resp, delay) = reply_outcome(
        s,
        inner,
        arrived,
        message_id,
        &info,
        &app_id,
        body,
        &mut record,
    );
    record.code = code;
    record.http = http;
    if inner.received.len() >= MAX_RECORDS {
        inner.received.pop_front();
    }
    inner.received.push_back(record);
    (resp, delay)
}

#[allow(clippy::too_many_arguments)]
fn reply_outcome(
    s: &Shared,
    inner: &mut Inner,
    arrived: Instant,
    message_id: &str,
    info: &MessageInfo,
    app_id: &str,
    body: Option<ReplyBody>,
    record: &mut Received,
) -> (i64, u16, Response, Option<Hold>) {
    let invalid = |s: &Shared, why: &str| {
        (
            230001,
            400,
            error(
                s,
                400,
                230001,
                &format!("Your request contains an invalid request parameter: {why}"),
            ),
            None,
        )
    };
    let Some(body) = body else {
        return invalid(s, "body is not JSON");
    };
    record.uuid = body.uuid.clone();
    record.msg_type = body.msg_type.clone().unwrap_or_default();
    record.content = body.content.clone().unwrap_or_default();
    if !well_formed_id(message_id) {
        return invalid(s, "message_id");
    }
    let Some(msg_type) = body
        .msg_type
        .as_deref()
        .and_then(|t| t.parse::<MsgType>().ok())
    else {
        return invalid(s, "msg_type");
    };
    let Some(content) = body.content.as_deref() else {
        return invalid(s, "content");
    };
    if body.uuid.chars().count() > 50 {
        return invalid(s, "uuid");
    }
    if let Err(e) = crate::reply::validate_content(msg_type, content) {
        return match e {
            crate::reply::ValidationError::TooLarge { .. } => (
                230025,
                400,
                error(
                    s,
                    400,
                    230025,
                    "The length of the message content reaches its limit.",
                ),
                None,
            ),
            _ => invalid(s, "content"),
        };
    }
    // uuid dedupe: at most one success per uuid within an hour.
    while let Some((at, _)) = inner.uuid_order.front()
        && arrived.saturating_duration_since(*at) >= UUID_TTL
    {
        let (_, uuid) = inner.uuid_order.pop_front().expect("front");
        inner.uuids.remove(&uuid);
    }
    if !body.uuid.is_empty()
        && let Some((data, _)) = inner.uuids.get(&body.uuid)
    {
        let data = data.clone();
        inner.stats.deduped += 1;
        record.deduped = true;
        return (
            0,
            200,
            feishu(s, 200, json!({"code": 0, "msg": "success", "data": data})),
            None,
        );
    }
    // Scripted faults first, then random ones.
    let fault_idx = inner
        .faults
        .iter()
        .position(|f| f.times > 0 && f.message_id.as_deref().is_none_or(|m| m == message_id));
    let mut hold = None;
    let mut data_over = None;
    if let Some(i) = fault_idx {
        let f = &mut inner.faults[i];
        f.times -= 1;
        let f = if f.times == 0 {
            inner.faults.remove(i).expect("index valid")
        } else {
            f.clone()
        };
        inner.stats.faults += 1;
        data_over = f.data.clone();
        match f.post_then_delay_ms {
            Some(ms) => hold = Some(Hold::Delay(Duration::from_millis(ms))),
            None if data_over.is_some() => {}
            None if f.hold => hold = Some(Hold::UntilReleased(*s.released.borrow())),
            None => {
                if f.html {
                    let mut r = (
                        StatusCode::from_u16(f.http).unwrap_or(StatusCode::BAD_GATEWAY),
                        "<html><body>502 Bad Gateway</body></html>",
                    )
                        .into_response();
                    r.headers_mut()
                        .insert("content-type", HeaderValue::from_static("text/html"));
                    return (-1, f.http, r, None);
                }
                let msg = if f.msg.is_empty() {
                    "injected fault".to_owned()
                } else {
                    f.msg.clone()
                };
                let mut r = error(s, f.http, f.code, &msg);
                if let Some(reset) = f.reset_s {
                    let h = r.headers_mut();
                    h.insert("x-ogw-ratelimit-reset", HeaderValue::from(reset));
                    h.insert("x-ogw-ratelimit-limit", HeaderValue::from(50));
                }
                return (f.code, f.http, r, None);
            }
        }
    } else {
        let (p49, p5xx) = (inner.opts.fail_230049, inner.opts.fail_5xx);
        if p49 > 0.0 && next_f64(&mut inner.rng) < p49 {
            inner.stats.faults += 1;
            return (
                230049,
                400,
                error(s, 400, 230049, "The message is being sent."),
                None,
            );
        }
        if p5xx > 0.0 && next_f64(&mut inner.rng) < p5xx {
            inner.stats.faults += 1;
            return (1, 503, error(s, 503, 1, "internal error"), None);
        }
    }
    // Quotas, counted at arrival.
    let opts = inner.opts.clone();
    let mut checks: Vec<((u8, String), FakeQuota)> = Vec::new();
    if opts.enforce_quotas {
        checks.push(((0, info.chat_id.clone()), opts.chat_quota));
        if let Some(u) = &info.user_id {
            checks.push(((1, u.clone()), opts.user_quota));
        }
        for (i, q) in opts.app_quotas.iter().enumerate() {
            checks.push(((2 + i as u8, app_id.to_owned()), *q));
        }
    }
    let refused = checks.iter().find_map(|(key, q)| {
        let c = inner.counters.get(key);
        counter_retry_after(c, *q, opts.window, arrived, s.started).map(|after| (key.0, after))
    });
    if let Some((kind, after)) = refused {
        return if kind < 2 {
            inner.stats.rejected_chat_user += 1;
            (
                230020,
                400,
                error(
                    s,
                    400,
                    230020,
                    "This operation triggers the frequency limit.",
                ),
                None,
            )
        } else {
            inner.stats.rejected_app += 1;
            let mut r = error(s, 429, 99991400, "request trigger frequency limit");
            let h = r.headers_mut();
            h.insert(
                "x-ogw-ratelimit-reset",
                HeaderValue::from(after.as_secs_f64().ceil() as u64),
            );
            (99991400, 429, r, None)
        };
    }
    for (key, q) in checks {
        let c = inner
            .counters
            .entry(key)
            .or_insert_with(|| Counter::new(opts.window, q, arrived));
        counter_record(c, q, arrived, s.started);
    }
    let n = s.next.fetch_add(1, Ordering::Relaxed);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
        .to_string();
    let data = json!({
        "message_id": format!("om_fake{n:024x}"),
        "root_id": message_id,
        "parent_id": message_id,
        "thread_id": if body.reply_in_thread { format!("omt_fake{n:x}") } else { String::new() },
        "msg_type": msg_type.as_str(),
        "create_time": now_ms,
        "update_time": now_ms,
        "deleted": false,
        "updated": false,
        "chat_id": info.chat_id,
        "sender": { "id": app_id, "id_type": "app_id", "sender_type": "app", "tenant_key": "fake_tenant" },
        "body": { "content": content },
    });
    if !body.uuid.is_empty() {
        inner
            .uuids
            .insert(body.uuid.clone(), (data.clone(), arrived));
        inner.uuid_order.push_back((arrived, body.uuid.clone()));
    }
    inner.stats.posted += 1;
    let mut answer = data;
    if let (Some(Value::Object(over)), Some(obj)) = (data_over, answer.as_object_mut()) {
        obj.extend(over);
    }
    (
        0,
        200,
        feishu(s, 200, json!({"code": 0, "msg": "success", "data": answer})),
        hold,
    )
}

/// When a posted reply is answered (scripted faults).
#[derive(Debug, Clone, Copy)]
enum Hold {
    Delay(Duration),
    /// Once the release counter passes this value.
    UntilReleased(u64),
}
