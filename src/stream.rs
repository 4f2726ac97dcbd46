//! Streaming replies (DESIGN §11): a language model's answer typed into one CardKit card. The
//! driver owns the card's life: create the card entity (Card JSON 2.0, streaming mode on), reply
//! with it, push the newest text whenever the card's previous operation has come back (texts
//! that arrive meanwhile are coalesced, never queued: only the newest is ever sent), and at the
//! end (the caller's `finish`, or the caller gone) push the final text and close streaming mode.
//! Every operation goes through the scheduler, so the card's 10/s, the app's per-API windows
//! and the chat's 5/s (for the reply) hold; the card's operations wait in one queue, in order,
//! so each `sequence` is larger than the last, and a retry keeps its sequence and uuid. Feishu
//! closes streaming mode about ten minutes after it was turned on (200850, 300309): the driver
//! turns it on again and goes on, so a longer answer is shown whole.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::feishu::{AppIndex, Call, CardStreaming, CardText, SendRequest};
use crate::metrics::Metrics;
use crate::scheduler::{Delivered, GatewayError, JobSpec, Scheduler, Target, card_queue};

/// The card's one element the text goes into.
pub const ELEMENT_ID: &str = "answer";

/// Who streams, into which reply.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub caller: usize,
    pub credential: Arc<str>,
    pub app: AppIndex,
    pub app_name: Arc<str>,
    pub app_id: Arc<str>,
    /// The chat of the message replied to.
    pub chat_id: Arc<str>,
    /// The message replied to.
    pub message_id: String,
    pub reply_in_thread: bool,
    /// The reply's uuid (Feishu posts it once); the card's updates derive theirs from it.
    pub uuid: String,
    /// The card's header ("" for none).
    pub title: String,
    /// The longest text accepted (bytes); beyond it the stream ends `TextTooLong`.
    pub max_text_bytes: usize,
    /// The span the stream's calls are children of.
    pub span: tracing::Span,
}

/// One part of the caller's stream after `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text added at the end.
    Append(String),
    /// The whole text so far.
    Replace(String),
    /// The end, with an optional final text (replaces).
    Finish(Option<String>),
}

/// What the driver tells the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The reply carrying the card is posted.
    Started { message_id: String, card_id: String },
    /// The final text is shown and streaming mode is closed.
    Finished(Finished),
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub message_id: String,
    pub card_ids: Vec<String>,
    /// Text updates Feishu accepted (the final one included).
    pub updates_sent: u32,
    /// Characters of the final text.
    pub final_chars: u32,
}

/// Why a stream failed (after its card was closed, when it had one).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("the streamed text passed {max} bytes (Feishu's card limit less the card's frame)")]
    TextTooLong { max: usize },
}

/// The Card JSON 2.0 of a streaming card with one markdown element and `title`.
pub fn card_json(title: &str) -> String {
    let mut card = serde_json::json!({
        "schema": "2.0",
        "config": { "streaming_mode": true, "update_multi": true },
        "body": { "elements": [
            { "tag": "markdown", "element_id": ELEMENT_ID, "content": "" }
        ] },
    });
    if !title.is_empty() {
        card["header"] = serde_json::json!({ "title": { "tag": "plain_text", "content": title } });
    }
    card.to_string()
}

type Pending = Pin<Box<dyn Future<Output = Result<Delivered, GatewayError>> + Send>>;

/// One stream's card: its id, the sequence of its operations, what it shows.
struct CardState {
    id: String,
    sequence: u32,
    shown: String,
    updates: u32,
}

/// Runs one stream: `parts` until `Finish` (or until the caller goes away: the sender is
/// dropped), telling `events` what happened. The card is closed whatever ends the stream.
pub async fn run(
    s: Scheduler,
    spec: StreamSpec,
    mut parts: mpsc::Receiver<Part>,
    events: mpsc::UnboundedSender<Event>,
    metrics: Arc<Metrics>,
) -> Result<Finished, StreamError> {
    let _live = Live::new(metrics.clone());
    let created = s
        .reply(job(
            &spec,
            format!("stream:{}", spec.uuid).into(),
            Target::App,
            {
                Call::CardCreate {
                    card_json: card_json(&spec.title),
                }
            },
        ))
        .await?;
    let mut card = CardState {
        id: created.message.card_id,
        sequence: 0,
        shown: String::new(),
        updates: 0,
    };
    let content = serde_json::json!({ "type": "card", "data": { "card_id": card.id } });
    let reply = Call::Reply(SendRequest {
        message_id: spec.message_id.clone(),
        content: content.to_string(),
        msg_type: "interactive",
        reply_in_thread: spec.reply_in_thread,
        uuid: spec.uuid.clone(),
    });
    let replied = s
        .reply(job(&spec, spec.chat_id.clone(), Target::Chat, reply))
        .await?;
    let message_id = replied.message.message_id;
    let _ = events.send(Event::Started {
        message_id: message_id.clone(),
        card_id: card.id.clone(),
    });
    let mut text = String::new();
    let mut pending: Option<(Pending, String)> = None;
    let mut outcome = Ok(());
    loop {
        // The newest text goes out once the card's previous operation came back.
        if pending.is_none() && text != card.shown {
            pending = Some((text_update(&s, &spec, &mut card, &text), text.clone()));
        }
        tokio::select! {
            part = parts.recv() => {
            // A text neither shown nor out is replaced before it went: coalesced.
            let out = pending.as_ref().map(|p| p.1.as_str());
            if part.is_some() && text != card.shown && out != Some(text.as_str()) {
                metrics.stream_update(false);
            }
            match part {
                Some(Part::Append(t)) => text.push_str(&t),
                Some(Part::Replace(t)) => text = t,
                Some(Part::Finish(last)) => {
                    if let Some(t) = last {
                        text = t;
                    }
                    break;
                }
                // The caller went away: the card keeps what came.
                None => break,
            }
            }
            done = async { (&mut pending.as_mut().expect("guarded").0).await }, if pending.is_some() => {
                let (_, sent) = pending.take().expect("guarded");
                match done {
                    Ok(_) => {
                        card.shown = sent;
                        card.updates += 1;
                        metrics.stream_update(true);
                    }
                    // Feishu closed streaming mode (it does ~10 minutes after it was turned
                    // on): on again, and the newest text goes next.
                    Err(e) if streaming_closed(&e) => reopen(&s, &spec, &mut card).await?,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if text.len() > spec.max_text_bytes {
            outcome = Err(StreamError::TextTooLong {
                max: spec.max_text_bytes,
            });
            text = card.shown.clone();
            break;
        }
    }
    // The end: the last text, then streaming mode off.
    let ending = tokio::time::Instant::now();
    if let Some((p, sent)) = pending.take() {
        match p.await {
            Ok(_) => {
                card.shown = sent;
                card.updates += 1;
                metrics.stream_update(true);
            }
            Err(e) if streaming_closed(&e) => reopen(&s, &spec, &mut card).await?,
            Err(e) => return Err(e.into()),
        }
    }
    if text != card.shown {
        match text_update(&s, &spec, &mut card, &text).await {
            Err(e) if streaming_closed(&e) => {
                reopen(&s, &spec, &mut card).await?;
                text_update(&s, &spec, &mut card, &text).await?;
            }
            other => {
                other?;
            }
        }
        card.shown = text.clone();
        card.updates += 1;
        metrics.stream_update(true);
    }
    set_streaming(&s, &spec, &mut card, false).await?;
    metrics.stream_finished(ending.elapsed());
    outcome?;
    let finished = Finished {
        message_id,
        card_ids: vec![card.id],
        updates_sent: card.updates,
        final_chars: u32::try_from(card.shown.chars().count()).unwrap_or(u32::MAX),
    };
    let _ = events.send(Event::Finished(finished.clone()));
    Ok(finished)
}

/// Counts a stream live while it runs.
struct Live(Arc<Metrics>);

impl Live {
    fn new(m: Arc<Metrics>) -> Self {
        m.stream_live(1);
        Self(m)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.stream_live(-1);
    }
}

/// Feishu's "streaming mode timed out" (200850) and "streaming mode is closed" (300309).
const STREAMING_CLOSED: [i64; 2] = [200850, 300309];

fn streaming_closed(e: &GatewayError) -> bool {
    e.feishu_code()
        .is_some_and(|c| STREAMING_CLOSED.contains(&c))
}

/// Turns the card's streaming mode on again (Feishu closed it).
async fn reopen(
    s: &Scheduler,
    spec: &StreamSpec,
    card: &mut CardState,
) -> Result<(), GatewayError> {
    tracing::info!(card_id = %card.id, "Feishu closed the card's streaming mode; turned on again");
    set_streaming(s, spec, card, true).await
}

/// Turns the card's streaming mode `on` or off (the card's next operation).
async fn set_streaming(
    s: &Scheduler,
    spec: &StreamSpec,
    card: &mut CardState,
    on: bool,
) -> Result<(), GatewayError> {
    card.sequence += 1;
    let call = Call::CardStreaming(CardStreaming {
        card_id: card.id.clone(),
        on,
        sequence: card.sequence,
        uuid: format!("{}-{}", spec.uuid, card.sequence),
    });
    s.reply(job(spec, card_queue(&card.id), Target::Card, call))
        .await
        .map(|_| ())
}

/// The card's next text operation (its sequence taken now, so operations stay in order).
fn text_update(s: &Scheduler, spec: &StreamSpec, card: &mut CardState, text: &str) -> Pending {
    card.sequence += 1;
    let call = Call::CardText(CardText {
        card_id: card.id.clone(),
        element_id: ELEMENT_ID.into(),
        content: text.to_owned(),
        sequence: card.sequence,
        uuid: format!("{}-{}", spec.uuid, card.sequence),
    });
    let job = job(spec, card_queue(&card.id), Target::Card, call);
    let s = s.clone();
    Box::pin(async move { s.reply(job).await })
}

/// A scheduler job of the stream's caller and app: `call` in `queue`, counting in `target`.
fn job(spec: &StreamSpec, queue: Arc<str>, target: Target, call: Call) -> JobSpec {
    JobSpec {
        caller: spec.caller,
        credential: spec.credential.clone(),
        intake: None,
        on_send: None,
        app: spec.app,
        app_name: spec.app_name.clone(),
        app_id: spec.app_id.clone(),
        chat_id: queue,
        user_id: None,
        target,
        request: call,
        caller_uuid: None,
        deadline: None,
        span: spec.span.clone(),
    }
}
