//! Streaming replies (DESIGN §11): a language model's answer typed into one CardKit card. The
//! driver owns the card's life: create the card entity (Card JSON 2.0, streaming mode on), reply
//! with it, push the newest text whenever the card's previous operation has come back (texts
//! that arrive meanwhile are coalesced, never queued: only the newest is ever sent), and at the
//! end (the caller's `finish`, the caller gone, a refusal, the gateway shutting down) push the
//! final text and close streaming mode.
//!
//! Every operation goes through the scheduler, so the card's 10/s, the app's per-API windows
//! and the chat's 5/s (for the reply) hold. The card's operations wait in one queue, in order,
//! so each `sequence` is larger than the last, and a retry keeps its sequence and uuid. Typing
//! goes in `Lane::Typing` (it leaves headroom in the app's windows and waits its turn among the
//! app's streams: fair shares); the final text and the settings go in `Lane::Final` (first,
//! in the headroom; a final text takes the place of a typing text still waiting).
//!
//! Feishu closes streaming mode about ten minutes after it was turned on (200850, 300309): the
//! driver turns it off and on again a margin before `StreamSpec::streaming_limit`, and if Feishu
//! closed it anyway turns it on again and goes on, so a longer answer is shown whole.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::feishu::{AppIndex, Call, CardStreaming, CardText, SendRequest};
use crate::metrics::Metrics;
use crate::scheduler::{Delivered, GatewayError, JobSpec, Lane, Scheduler, Target, card_queue};

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
    /// Feishu closes a card's streaming mode this long after it was turned on
    /// (`[streams] card_streaming_limit_s`): the driver renews it a margin before.
    pub streaming_limit: Duration,
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

/// One text update out (queued or in flight): its answer, the text it carries, and when the
/// oldest text it shows arrived.
struct Out {
    answer: Pending,
    text: String,
    arrived: Option<Instant>,
}

/// One stream's card: its id, the sequence of its operations, what it shows, when its
/// streaming mode was last turned on.
struct CardState {
    id: String,
    sequence: u32,
    shown: String,
    updates: u32,
    streaming_on: Instant,
}

impl CardState {
    /// Feishu accepted an update showing `text`, whose oldest part arrived at `arrived`.
    fn shown(&mut self, text: String, arrived: Option<Instant>, metrics: &Metrics) {
        if let Some(at) = arrived {
            metrics.stream_text_shown(at.elapsed());
        }
        self.shown = text;
        self.updates += 1;
        metrics.stream_update(true);
    }
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
    let (mut card, message_id) = open(&s, &spec).await?;
    let _ = events.send(Event::Started {
        message_id: message_id.clone(),
        card_id: card.id.clone(),
    });
    // The text counts in the caller's queue share while the stream holds it.
    let mut held = s.hold(spec.caller);
    let mut text = String::new();
    // When the oldest text not yet out arrived.
    let mut arrived: Option<Instant> = None;
    let mut pending: Option<Out> = None;
    let mut outcome = Ok(());
    let renew_every = renew_after(spec.streaming_limit);
    loop {
        if pending.is_none() {
            // A margin before Feishu's streaming limit: off and on again, so it restarts.
            if card.streaming_on.elapsed() >= renew_every
                && let Err(e) = renew(&s, &spec, &mut card).await
            {
                outcome = Err(e.into());
                break;
            }
            // The newest text goes out once the card's previous operation came back.
            if text != card.shown {
                pending = Some(Out {
                    answer: text_update(&s, &spec, &mut card, &text, Lane::Typing),
                    text: text.clone(),
                    arrived: arrived.take(),
                });
            }
        }
        let renew_at = card.streaming_on + renew_every;
        tokio::select! {
            part = parts.recv() => {
                // A text neither shown nor out is replaced before it went: coalesced.
                let out = pending.as_ref().map(|p| p.text.as_str());
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
                arrived.get_or_insert_with(Instant::now);
                held.set(text.len());
            }
            done = async { (&mut pending.as_mut().expect("guarded").answer).await }, if pending.is_some() => {
                let out = pending.take().expect("guarded");
                match done {
                    Ok(_) => card.shown(out.text, out.arrived, &metrics),
                    // Feishu closed streaming mode (it does ~10 minutes after it was turned
                    // on): on again, and the newest text goes next.
                    Err(e) if streaming_closed(&e) => {
                        arrived = earliest(arrived, out.arrived);
                        if let Err(e) = reopen(&s, &spec, &mut card).await {
                            outcome = Err(e.into());
                            break;
                        }
                    }
                    // Anything else (the gateway shutting down, a refusal): the card gets the
                    // text so far and is closed (a stream's end is still taken while
                    // draining), then the caller hears why.
                    Err(e) => {
                        outcome = Err(e.into());
                        break;
                    }
                }
            }
            () = tokio::time::sleep_until(renew_at), if pending.is_none() => {}
        }
        if text.len() > spec.max_text_bytes {
            outcome = Err(StreamError::TextTooLong {
                max: spec.max_text_bytes,
            });
            text = pending.as_ref().map_or(&card.shown, |p| &p.text).clone();
            break;
        }
    }
    // The end, whatever ended the stream: the final text, then streaming mode off.
    let ending = Instant::now();
    let shown = show_final(
        &s,
        &spec,
        &mut card,
        pending.take(),
        &text,
        arrived,
        &metrics,
    )
    .await;
    drop(held);
    let closed = set_streaming(&s, &spec, &mut card, false).await;
    metrics.stream_finished(ending.elapsed());
    outcome?;
    shown?;
    closed?;
    let finished = Finished {
        message_id,
        card_ids: vec![card.id],
        updates_sent: card.updates,
        final_chars: u32::try_from(card.shown.chars().count()).unwrap_or(u32::MAX),
    };
    spec.span.record("updates_sent", finished.updates_sent);
    let _ = events.send(Event::Finished(finished.clone()));
    Ok(finished)
}

/// Shows `text` on the card: it takes the place of the typing text still waiting (`pending`,
/// if it has not gone yet) and goes before the app's typing (`Lane::Final`).
async fn show_final(
    s: &Scheduler,
    spec: &StreamSpec,
    card: &mut CardState,
    pending: Option<Out>,
    text: &str,
    arrived: Option<Instant>,
    metrics: &Metrics,
) -> Result<(), GatewayError> {
    let last = (text != card.shown).then(|| Out {
        answer: text_update(s, spec, card, text, Lane::Final),
        text: text.to_owned(),
        arrived,
    });
    if let Some(out) = pending {
        match out.answer.await {
            Ok(d) if d.superseded => metrics.stream_update(false),
            Ok(_) => card.shown(out.text, out.arrived, metrics),
            // The final text meets the closed mode too, and turns it on again.
            Err(e) if streaming_closed(&e) => {}
            Err(e) => return Err(e),
        }
    }
    let Some(out) = last else { return Ok(()) };
    if let Err(e) = out.answer.await {
        if !streaming_closed(&e) {
            return Err(e);
        }
        reopen(s, spec, card).await?;
        text_update(s, spec, card, text, Lane::Final).await?;
    }
    card.shown(out.text, out.arrived, metrics);
    Ok(())
}

/// Creates the stream's card (streaming mode on) and replies with it: the card, and the
/// reply's message_id.
async fn open(s: &Scheduler, spec: &StreamSpec) -> Result<(CardState, String), GatewayError> {
    let create = Call::CardCreate {
        card_json: card_json(&spec.title),
    };
    let queue = format!("stream:{}", spec.uuid).into();
    let created = s
        .reply(job(spec, queue, Target::App, Lane::Normal, create))
        .await?;
    let card = CardState {
        id: created.message.card_id,
        sequence: 0,
        shown: String::new(),
        updates: 0,
        streaming_on: Instant::now(),
    };
    let content = serde_json::json!({ "type": "card", "data": { "card_id": card.id } });
    let reply = Call::Reply(SendRequest {
        message_id: spec.message_id.clone(),
        content: content.to_string(),
        msg_type: "interactive",
        reply_in_thread: spec.reply_in_thread,
        uuid: spec.uuid.clone(),
    });
    let chat = spec.chat_id.clone();
    let replied = s
        .reply(job(spec, chat, Target::Chat, Lane::Normal, reply))
        .await?;
    let message_id = replied.message.message_id;
    spec.span.record("card_id", card.id.as_str());
    spec.span.record("message_id", message_id.as_str());
    Ok((card, message_id))
}

/// The earlier of two instants either may lack.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// How long after streaming mode was turned on the driver renews it: a tenth of Feishu's
/// limit before it (`[streams] card_streaming_limit_s`), and at least 2 s (the card's 10/s
/// window and the app's may hold the renewal back that long), but never before half of it.
fn renew_after(limit: Duration) -> Duration {
    let margin = (limit / 10).max(Duration::from_secs(2)).min(limit / 2);
    limit.saturating_sub(margin)
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

/// Turns the card's streaming mode off and on again before Feishu's limit closes it (turning
/// it on while it is on may not restart Feishu's clock).
async fn renew(s: &Scheduler, spec: &StreamSpec, card: &mut CardState) -> Result<(), GatewayError> {
    tracing::info!(card_id = %card.id, "the card's streaming mode nears Feishu's limit; turned off and on again");
    set_streaming(s, spec, card, false).await?;
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
    s.reply(job(
        spec,
        card_queue(&card.id),
        Target::Card,
        Lane::Final,
        call,
    ))
    .await?;
    if on {
        card.streaming_on = Instant::now();
    }
    Ok(())
}

/// The card's next text operation (its sequence taken now, so operations stay in order):
/// `Lane::Typing` while the stream runs, `Lane::Final` for its last text.
fn text_update(
    s: &Scheduler,
    spec: &StreamSpec,
    card: &mut CardState,
    text: &str,
    lane: Lane,
) -> Pending {
    card.sequence += 1;
    let call = Call::CardText(CardText {
        card_id: card.id.clone(),
        element_id: ELEMENT_ID.into(),
        content: text.to_owned(),
        sequence: card.sequence,
        uuid: format!("{}-{}", spec.uuid, card.sequence),
    });
    // Queued now: a final text takes the place of a typing text still waiting.
    Box::pin(s.queue(job(spec, card_queue(&card.id), Target::Card, lane, call)))
}

/// A scheduler job of the stream's caller and app: `call` in `queue`, counting in `target`,
/// in `lane` (typing yields to the app's finishing streams, which go first).
fn job(spec: &StreamSpec, queue: Arc<str>, target: Target, lane: Lane, call: Call) -> JobSpec {
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
        lane,
        request: call,
        caller_uuid: None,
        deadline: None,
        span: spec.span.clone(),
    }
}
