//! `StreamReply`: the caller's parts become `stream::Part`s, `stream::run` types them into a
//! card, its events and its end become the response stream. The first part must be `start`,
//! checked at the same door as a reply (admission, app permission, validation, the chat).

use std::pin::Pin;

use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Status, Streaming};
use tracing::Instrument;

use super::entry::explicit_uuid;
use super::{CallError, ReplyService};
use crate::feishu::Api;
use crate::proto::stream_reply_event::Event as WireEvent;
use crate::proto::stream_reply_request::Part as WirePart;
use crate::proto::{StreamFinished, StreamReplyEvent, StreamReplyRequest, StreamStarted};
use crate::reply::{MAX_RICH_BYTES, RawReply};
use crate::stream::{self, Event, Part, StreamError, StreamSpec};

/// The stream `StreamReply` answers with.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<StreamReplyEvent, Status>> + Send>>;

/// Parts read ahead of the driver (each the newest text or an addition to it).
const PARTS_BUFFER: usize = 64;

impl ReplyService {
    pub(super) async fn stream_reply(
        &self,
        req: Request<Streaming<StreamReplyRequest>>,
    ) -> Result<EventStream, CallError> {
        let door = self.door();
        let caller = door.auth.authenticate(&req)?;
        let entry = self.enter(&door, &caller, &req)?;
        let mut inbound = req.into_inner();
        let not_started = || {
            CallError::from(crate::reply::ValidationError::BadId {
                field: "start",
                why: "the first part of a stream must be `start`".into(),
            })
        };
        let start = match inbound.message().await {
            Ok(Some(StreamReplyRequest {
                part: Some(WirePart::Start(s)),
            })) => s,
            Ok(_) => return Err(not_started()),
            Err(status) => {
                tracing::debug!(%status, "the stream broke before its start");
                return Err(crate::scheduler::GatewayError::Cancelled.into());
            }
        };
        // A start is a reply's head: the same checks (its content is the card's, below).
        let mut reply = RawReply {
            message_id: &start.message_id,
            msg_type: "interactive",
            content: r#"{"type":"card","data":{"card_id":"-"}}"#,
            reply_in_thread: start.reply_in_thread,
            uuid: &start.uuid,
            chat_id: &start.chat_id,
            user_id: "",
        }
        .validate()?;
        let app = self.app_for(&door, &caller, &start.app)?;
        let a = &door.apps[app];
        // A retried stream is a new answer: without a uuid of its own it gets a fresh one.
        let uuid = match &reply.uuid {
            Some(u) => explicit_uuid(&entry.who(&caller), &a.name, u),
            None => uuid::Uuid::new_v4().to_string(),
        };
        self.known_to_fail(app, &reply.message_id, &uuid)?;
        let chat_id = self.chat_for(app, &mut reply, &entry).await?;
        let frame = stream::card_json(&start.title).len();
        let spec = StreamSpec {
            caller: caller.id,
            credential: caller.credential.clone(),
            app,
            app_name: a.name.as_str().into(),
            app_id: a.app_id.as_str().into(),
            chat_id,
            message_id: reply.message_id,
            reply_in_thread: reply.reply_in_thread,
            uuid,
            title: start.title,
            max_text_bytes: MAX_RICH_BYTES.saturating_sub(frame),
            streaming_limit: door.card_streaming_limit,
            // One trace per stream: its card's create, reply, texts and close are its
            // children; the driver records what the card became.
            span: tracing::info_span!(
                "StreamReply",
                otel.kind = "server",
                operation = "stream",
                caller = %caller.name,
                app = %a.name,
                card_id = tracing::field::Empty,
                message_id = tracing::field::Empty,
                updates_sent = tracing::field::Empty,
            ),
        };
        let (parts_tx, parts) = mpsc::channel(PARTS_BUFFER);
        let (events_tx, events) = mpsc::unbounded_channel();
        // The caller's parts, until `finish`, the end of its stream or its failure (the
        // driver then closes the card with what came).
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let part = match m.part {
                    Some(WirePart::Append(t)) => Part::Append(t),
                    Some(WirePart::Replace(t)) => Part::Replace(t),
                    Some(WirePart::Finish(f)) => Part::Finish(f.text),
                    // A second start, or an empty part: nothing to type.
                    Some(WirePart::Start(_)) | None => continue,
                };
                let finish = matches!(part, Part::Finish(_));
                if parts_tx.send(part).await.is_err() || finish {
                    break;
                }
            }
        });
        let span = spec.span.clone();
        let driver = tokio::spawn(
            stream::run(
                self.scheduler.clone(),
                spec,
                parts,
                events_tx,
                self.metrics.clone(),
            )
            .instrument(span),
        );
        Ok(Box::pin(futures_util::stream::unfold(
            (events, Some(driver)),
            |(mut events, driver)| async move {
                if let Some(e) = events.recv().await {
                    return Some((Ok(wire(e)), (events, driver)));
                }
                // The driver ended: its failure, if any, ends the response stream.
                let result = driver?.await;
                match result {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some((Err(status_of(&e)), (events, None))),
                    Err(_) => Some((
                        Err(Status::internal("the stream's driver failed")),
                        (events, None),
                    )),
                }
            },
        )))
    }
}

fn wire(e: Event) -> StreamReplyEvent {
    let event = match e {
        Event::Started {
            message_id,
            card_id,
        } => WireEvent::Started(StreamStarted {
            message_id,
            card_id,
        }),
        Event::Finished(f) => WireEvent::Finished(StreamFinished {
            message_id: f.message_id,
            card_ids: f.card_ids,
            updates_sent: f.updates_sent,
            final_chars: f.final_chars,
        }),
    };
    StreamReplyEvent { event: Some(event) }
}

fn status_of(e: &StreamError) -> Status {
    match e {
        StreamError::Gateway(g) => CallError::Gateway(g.clone()).to_status_for(Api::CardContent),
        StreamError::TextTooLong { .. } => {
            let mut details = tonic_types::ErrorDetails::new();
            details.set_error_info(
                "TEXT_TOO_LONG",
                super::ERROR_DOMAIN,
                std::collections::HashMap::<String, String>::new(),
            );
            use tonic_types::StatusExt;
            Status::with_error_details(tonic::Code::OutOfRange, e.to_string(), details)
        }
    }
}
