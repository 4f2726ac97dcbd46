//! The fake's CardKit endpoints: create a card entity, put an element's text, change its
//! settings. They go through the same pipeline as the message endpoints
//! (`fake_feishu::messages`: auth, faults, per-card 10/s and per-API app windows counted at
//! arrival); the card's state (sequence, streaming mode and its limit, texts) is
//! `fake_feishu::book`'s.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::book::CardChange;
use super::messages::{Incoming, MessageBody, serve};
use super::{Inner, NewConnection, Shared};
use crate::feishu::Api;

/// Longest uuid of a card update (Feishu: 1–64 characters).
const MAX_CARD_UUID_CHARS: usize = 64;

/// Whether `api` is a CardKit endpoint.
pub(super) fn is_card(api: Api) -> bool {
    matches!(api, Api::CardCreate | Api::CardContent | Api::CardSettings)
}

/// `POST /cardkit/v1/cards`
pub(super) async fn create(
    State(s): State<Arc<Shared>>,
    conn: Option<axum::Extension<NewConnection>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    serve(s, conn, headers, incoming(Api::CardCreate, "", "", &body)).await
}

/// `PUT /cardkit/v1/cards/:card_id/elements/:element_id/content`
pub(super) async fn content(
    State(s): State<Arc<Shared>>,
    conn: Option<axum::Extension<NewConnection>>,
    Path((card_id, element_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let call = incoming(Api::CardContent, &card_id, &element_id, &body);
    serve(s, conn, headers, call).await
}

/// `PATCH /cardkit/v1/cards/:card_id/settings`
pub(super) async fn settings(
    State(s): State<Arc<Shared>>,
    conn: Option<axum::Extension<NewConnection>>,
    Path(card_id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let call = incoming(Api::CardSettings, &card_id, "", &body);
    serve(s, conn, headers, call).await
}

fn incoming(api: Api, card_id: &str, element_id: &str, body: &[u8]) -> Incoming {
    Incoming {
        card_id: card_id.to_owned(),
        element_id: element_id.to_owned(),
        ..Incoming::new(api, String::new(), serde_json::from_slice(body).ok())
    }
}

/// Checks a card request's shape; returns what it carries (a card's JSON, a text).
pub(super) fn validate(call: &Incoming, body: &MessageBody) -> Result<String, &'static str> {
    if call.api == Api::CardCreate {
        return body.data.clone().ok_or("data");
    }
    if call.card_id.is_empty() {
        return Err("card_id");
    }
    if body.sequence.is_none() {
        return Err("sequence");
    }
    if body.uuid.chars().count() > MAX_CARD_UUID_CHARS {
        return Err("uuid");
    }
    match call.api {
        Api::CardContent => body.content.clone().ok_or("content"),
        _ => Ok(String::new()),
    }
}

/// The streaming mode a settings JSON string asks for.
fn streaming_of(settings: Option<&str>) -> Option<bool> {
    let v: Value = serde_json::from_str(settings?).ok()?;
    v["config"]["streaming_mode"].as_bool()
}

/// Applies a card request (its quotas passed): Feishu's `data`, or its refusal.
pub(super) fn apply(
    inner: &mut Inner,
    call: &Incoming,
    body: &MessageBody,
    content: &str,
    app_id: &str,
    now: Instant,
) -> Result<Value, (i64, &'static str)> {
    let limit = inner.opts.card_streaming_limit;
    let sequence = body.sequence.unwrap_or(0);
    let data = match call.api {
        Api::CardCreate => json!({ "card_id": inner.book.create_card(content, app_id, now)? }),
        Api::CardContent => {
            let change = CardChange::Text {
                element_id: &call.element_id,
                content,
            };
            inner
                .book
                .change_card(&call.card_id, app_id, sequence, change, now, limit)?;
            json!({})
        }
        _ => {
            let on = streaming_of(body.settings.as_deref())
                .ok_or((230001, "settings.config.streaming_mode is missing"))?;
            let change = CardChange::Streaming(on);
            inner
                .book
                .change_card(&call.card_id, app_id, sequence, change, now, limit)?;
            json!({})
        }
    };
    // A retry of the same update (its uuid) is answered as the first was.
    if !body.uuid.is_empty() {
        inner.uuids.insert(body.uuid.clone(), (data.clone(), now));
        inner.uuid_order.push_back((now, body.uuid.clone()));
    }
    Ok(data)
}
