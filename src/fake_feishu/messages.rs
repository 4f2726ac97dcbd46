//! The fake's message endpoints (reply, send, update a card, edit, recall): parse and
//! validate like Feishu, dedupe by uuid, refuse what the message's history forbids (recalled,
//! edited 20 times), apply scripted or random faults, then count the quotas at the request's
//! arrival (its chat, user or message, and its app's windows for its API) and act.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::book::{APP_KIND, Landing, TargetQuotas, counters};
use super::window::{Counter, counter_record, counter_retry_after, next_f64};
use super::{
    Inner, MAX_RECORDS, MessageInfo, NewConnection, Received, Shared, UUID_TTL, arrive, authorize,
    error, feishu, message_info, well_formed_id,
};
use crate::feishu::Api;
use crate::reply::MsgType;

#[derive(Deserialize, Default)]
pub(super) struct MessageBody {
    pub(super) content: Option<String>,
    msg_type: Option<String>,
    #[serde(default)]
    reply_in_thread: bool,
    #[serde(default)]
    pub(super) uuid: String,
    /// A send's receiver.
    receive_id: Option<String>,
    /// A card's: strictly increasing per card.
    pub(super) sequence: Option<u32>,
    /// A card's settings (a JSON string).
    pub(super) settings: Option<String>,
    /// A card entity's JSON (`{"type": "card_json", "data": …}`).
    pub(super) data: Option<String>,
}

/// One request to a message or card endpoint.
pub(super) struct Incoming {
    pub(super) api: Api,
    /// The message in the path (replied to, updated, recalled); empty for a send and a card.
    pub(super) message_id: String,
    /// A send's `receive_id_type` query parameter.
    pub(super) receive_id_type: Option<String>,
    /// A card's id and element in the path.
    pub(super) card_id: String,
    pub(super) element_id: String,
    /// None: not JSON.
    pub(super) body: Option<MessageBody>,
}

impl Incoming {
    /// A request to `api`'s endpoint about `message_id` (empty for a send or a card).
    pub(super) fn new(api: Api, message_id: String, body: Option<MessageBody>) -> Self {
        Self {
            api,
            message_id,
            receive_id_type: None,
            card_id: String::new(),
            element_id: String::new(),
            body,
        }
    }
}

#[derive(Deserialize)]
pub(super) struct SendQuery {
    receive_id_type: Option<String>,
}

/// `POST /im/v1/messages/:id/reply`
pub(super) async fn reply(
    State(s): State<Arc<Shared>>,
    conn: Option<axum::Extension<NewConnection>>,
    Path(message_id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let body = serde_json::from_slice(&body).ok();
    let call = Incoming::new(Api::Reply, message_id, body);
    serve(s, conn, headers, call).await
}

/// `POST /im/v1/messages?receive_id_type=…`
pub(super) async fn send(
    State(s): State<Arc<Shared>>,
    conn: Option<axum::Extension<NewConnection>>,
    Query(q): Query<SendQuery>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let body = serde_json::from_slice(&body).ok();
    let call = Incoming {
        receive_id_type: q.receive_id_type,
        ..Incoming::new(Api::Send, String::new(), body)
    };
    serve(s, conn, headers, call).await
}

/// `PATCH` (a card), `PUT` (an edit) or `DELETE` (a recall) `/im/v1/messages/:id`.
pub(super) async fn change(
    api: Api,
    State(s): State<Arc<Shared>>,
    conn: Option<axum::Extension<NewConnection>>,
    Path(message_id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let body = match api {
        Api::Recall => Some(MessageBody::default()),
        _ => serde_json::from_slice(&body).ok(),
    };
    let call = Incoming::new(api, message_id, body);
    serve(s, conn, headers, call).await
}

pub(super) async fn serve(
    s: Arc<Shared>,
    conn: Option<axum::Extension<NewConnection>>,
    headers: HeaderMap,
    call: Incoming,
) -> Response {
    arrive(&s, conn.as_deref()).await;
    let arrived = Instant::now();
    let latency = s.inner.lock().opts.latency;
    let (response, hold) = {
        let mut inner = s.inner.lock();
        handle(&s, &mut inner, arrived, &headers, call)
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

fn handle(
    s: &Shared,
    inner: &mut Inner,
    arrived: Instant,
    headers: &HeaderMap,
    call: Incoming,
) -> (Response, Option<Hold>) {
    inner.stats.reply_requests += u64::from(call.api == Api::Reply);
    *inner
        .stats
        .requests_by_operation
        .entry(call.api.as_str().to_owned())
        .or_default() += 1;
    let seq = inner.stats.requests_by_operation.values().sum();
    let app_id = match authorize(inner, headers) {
        Ok(a) => a,
        Err((code, msg)) => return (error(s, 400, code, msg), None),
    };
    // Where it lands: a reply in its message's chat, a send in its receiver's, a change on
    // its message (which lives in a chat too, for the record).
    let receive_id = call.body.as_ref().and_then(|b| b.receive_id.clone());
    let info = match (call.api, &call.receive_id_type, &receive_id) {
        (Api::Send, Some(t), Some(id)) if t == "chat_id" => MessageInfo {
            chat_id: id.clone(),
            user_id: None,
        },
        (Api::Send, _, id) => MessageInfo {
            chat_id: String::new(),
            user_id: id.clone(),
        },
        // A card's requests are recorded under the card.
        (api, _, _) if super::cards::is_card(api) => MessageInfo {
            chat_id: call.card_id.clone(),
            user_id: None,
        },
        _ => message_info(inner, &call.message_id),
    };
    let mut record = Received {
        seq,
        at_ms: arrived.duration_since(s.started).as_secs_f64() * 1000.0,
        operation: call.api.as_str().to_owned(),
        message_id: call.message_id.clone(),
        chat_id: info.chat_id.clone(),
        app_id: app_id.clone(),
        uuid: String::new(),
        msg_type: String::new(),
        content: String::new(),
        code: 0,
        http: 200,
        deduped: false,
    };
    let (code, http, resp, delay) = outcome(s, inner, arrived, &call, &info, &app_id, &mut record);
    record.code = code;
    record.http = http;
    if inner.received.len() >= MAX_RECORDS {
        inner.received.pop_front();
    }
    inner.received.push_back(record);
    (resp, delay)
}

/// Feishu's parameter error.
fn invalid(s: &Shared, why: &str) -> (i64, u16, Response, Option<Hold>) {
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
}

/// Checks the request's shape as `call.api`'s endpoint does; returns its type and content.
fn validate(call: &Incoming) -> Result<(Option<MsgType>, String), &'static str> {
    let Some(body) = &call.body else {
        return Err("body is not JSON");
    };
    if super::cards::is_card(call.api) {
        return super::cards::validate(call, body).map(|c| (None, c));
    }
    if call.api != Api::Send && !well_formed_id(&call.message_id) {
        return Err("message_id");
    }
    if call.api == Api::Recall {
        return Ok((None, String::new()));
    }
    if call.api == Api::Send {
        let known = call
            .receive_id_type
            .as_deref()
            .is_some_and(|t| crate::reply::receive_id_type(t).is_some());
        if !known || body.receive_id.as_deref().is_none_or(str::is_empty) {
            return Err("receive_id");
        }
    }
    let msg_type = match call.api {
        Api::UpdateCard => MsgType::Interactive,
        _ => body
            .msg_type
            .as_deref()
            .and_then(|t| t.parse::<MsgType>().ok())
            .ok_or("msg_type")?,
    };
    if call.api == Api::Edit && !matches!(msg_type, MsgType::Text | MsgType::Post) {
        return Err("msg_type");
    }
    let content = body.content.clone().ok_or("content")?;
    if body.uuid.chars().count() > 50 {
        return Err("uuid");
    }
    Ok((Some(msg_type), content))
}

fn outcome(
    s: &Shared,
    inner: &mut Inner,
    arrived: Instant,
    call: &Incoming,
    info: &MessageInfo,
    app_id: &str,
    record: &mut Received,
) -> (i64, u16, Response, Option<Hold>) {
    let empty = MessageBody::default();
    let body = call.body.as_ref().unwrap_or(&empty);
    record.uuid = body.uuid.clone();
    record.msg_type = body.msg_type.clone().unwrap_or_default();
    record.content = body.content.clone().unwrap_or_default();
    let (msg_type, content) = match validate(call) {
        Ok(v) => v,
        Err(why) => return invalid(s, why),
    };
    if let Some(t) = msg_type
        && let Err(e) = crate::reply::validate_content(t, &content)
    {
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
    if let Some((code, msg)) = inner.book.refusal(call.api, &call.message_id) {
        return (code, 400, error(s, 400, code, msg), None);
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
        .position(|f| f.times > 0 && f.message_id.as_deref().is_none_or(|m| m == call.message_id));
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
    let landing = Landing {
        api: call.api,
        chat: (!info.chat_id.is_empty() && matches!(call.api, Api::Reply | Api::Send))
            .then_some(info.chat_id.as_str()),
        user: info
            .user_id
            .as_deref()
            .filter(|_| matches!(call.api, Api::Reply | Api::Send)),
        message: (!call.message_id.is_empty() && call.api != Api::Reply)
            .then_some(call.message_id.as_str()),
        card: (!call.card_id.is_empty()).then_some(call.card_id.as_str()),
        app_id,
    };
    let targets = TargetQuotas {
        chat: opts.chat_quota,
        user: opts.user_quota,
        message: opts.message_quota,
        card: opts.card_quota,
    };
    let checks = if opts.enforce_quotas {
        counters(&landing, targets, &opts.app_quotas, opts.app_scope_api)
    } else {
        Vec::new()
    };
    let refused = checks.iter().find_map(|(key, q)| {
        let c = inner.counters.get(key);
        counter_retry_after(c, *q, opts.window, arrived, s.started).map(|after| (key.0, after))
    });
    if let Some((kind, after)) = refused {
        return if kind < APP_KIND {
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
    inner.book.record(call.api, &call.message_id);
    let mut answer = match msg_type {
        Some(t) if matches!(call.api, Api::Reply | Api::Send) => {
            post(s, inner, arrived, call, body, t, &content, info, app_id)
        }
        _ if super::cards::is_card(call.api) => {
            match super::cards::apply(inner, call, body, &content, app_id, arrived) {
                Ok(data) => data,
                Err((code, msg)) => return (code, 400, error(s, 400, code, msg), None),
            }
        }
        // An update, an edit, a recall: Feishu answers an empty `data`.
        _ => json!({}),
    };
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

/// Posts a reply or a send: the new message (kept for its uuid, and registered in its chat).
#[allow(clippy::too_many_arguments)]
fn post(
    s: &Shared,
    inner: &mut Inner,
    arrived: Instant,
    call: &Incoming,
    body: &MessageBody,
    msg_type: MsgType,
    content: &str,
    info: &MessageInfo,
    app_id: &str,
) -> Value {
    let n = s.next.fetch_add(1, Ordering::Relaxed);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
        .to_string();
    let id = format!("om_fake{n:024x}");
    let (root, thread) = match call.api {
        Api::Reply if body.reply_in_thread => (call.message_id.clone(), format!("omt_fake{n:x}")),
        Api::Reply => (call.message_id.clone(), String::new()),
        _ => (String::new(), String::new()),
    };
    let data = json!({
        "message_id": id,
        "root_id": root,
        "parent_id": root,
        "thread_id": thread,
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
    inner.messages.insert(
        id,
        MessageInfo {
            chat_id: info.chat_id.clone(),
            user_id: None,
        },
    );
    inner.stats.posted += 1;
    data
}

/// `GET /im/v1/messages/:id`: where a message lives.
pub(super) async fn get_message(
    State(s): State<Arc<Shared>>,
    conn: Option<axum::Extension<NewConnection>>,
    Path(message_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    arrive(&s, conn.as_deref()).await;
    let mut inner = s.inner.lock();
    inner.stats.message_lookups += 1;
    if let Err((code, msg)) = authorize(&inner, &headers) {
        drop(inner);
        return error(&s, 400, code, msg);
    }
    if !well_formed_id(&message_id) {
        drop(inner);
        return error(
            &s,
            400,
            230001,
            "Your request contains an invalid request parameter.",
        );
    }
    let info = message_info(&inner, &message_id);
    drop(inner);
    feishu(
        &s,
        200,
        json!({"code": 0, "msg": "success", "data": {"items": [{
            "message_id": message_id,
            "msg_type": "text",
            "chat_id": info.chat_id,
            "sender": { "id": info.user_id.unwrap_or_default(), "id_type": "open_id", "sender_type": "user" },
            "body": { "content": "{\"text\":\"hello\"}" },
            "deleted": false,
            "updated": false,
        }]}}),
    )
}

/// When a posted reply is answered (scripted faults).
#[derive(Debug, Clone, Copy)]
enum Hold {
    Delay(Duration),
    /// Once the release counter passes this value.
    UntilReleased(u64),
}
