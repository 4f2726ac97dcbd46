//! CardKit: the real HTTP client creates a card entity, types into it and closes its streaming
//! mode at the fake Feishu, which keeps Feishu's rules (sequence strictly increasing per card,
//! 300317; a retried update's uuid answered once; nothing typed after streaming closes,
//! 300309; 10 operations per second per card); `StreamReply` over real gRPC does it all for a
//! caller.

mod common;

use std::sync::Arc;

use common::{config_for, spawn_fake};
use feishu_reply_gateway::fake_feishu::FakeOptions;
use feishu_reply_gateway::feishu::{
    Call, CardStreaming, CardText, FeishuClient, Upstream, UpstreamError,
};
use feishu_reply_gateway::metrics::Metrics;
use feishu_reply_gateway::proto::stream_reply_event::Event;
use feishu_reply_gateway::proto::stream_reply_request::Part;
use feishu_reply_gateway::proto::{
    StreamFinish, StreamReplyEvent, StreamReplyRequest, StreamStart,
};

const CARD: &str = r#"{"schema":"2.0","config":{"streaming_mode":true,"update_multi":true},"body":{"elements":[{"tag":"markdown","element_id":"answer","content":""}]}}"#;

fn text(card_id: &str, content: &str, sequence: u32) -> Call {
    Call::CardText(CardText {
        card_id: card_id.into(),
        element_id: "answer".into(),
        content: content.into(),
        sequence,
        uuid: format!("u-{sequence}"),
    })
}

fn code(r: Result<impl std::fmt::Debug, UpstreamError>) -> Option<i64> {
    r.expect_err("refused").code()
}

#[tokio::test]
async fn the_client_creates_types_into_and_closes_a_card_by_feishus_rules() {
    let fake = spawn_fake(FakeOptions::default()).await;
    let config = config_for(&fake, "");
    let client = Arc::new(
        FeishuClient::new(&config.feishu, &config.apps, Arc::new(Metrics::new())).unwrap(),
    );
    let created = client
        .call(
            0,
            &Call::CardCreate {
                card_json: CARD.into(),
            },
        )
        .await
        .expect("created");
    let card = created.card_id;
    assert!(!card.is_empty());
    for (n, words) in ["Hel", "Hello, ", "Hello, world"].into_iter().enumerate() {
        client
            .call(0, &text(&card, words, n as u32 + 1))
            .await
            .expect("typed");
    }
    // A retry of the last update (same uuid and sequence) is answered as the first was.
    client
        .call(0, &text(&card, "Hello, world", 3))
        .await
        .expect("deduped");
    // An older sequence is refused.
    let stale = Call::CardText(CardText {
        uuid: "other".into(),
        ..match text(&card, "Hello", 2) {
            Call::CardText(t) => t,
            _ => unreachable!(),
        }
    });
    assert_eq!(code(client.call(0, &stale).await), Some(300317));
    let close = Call::CardStreaming(CardStreaming {
        card_id: card.clone(),
        on: false,
        sequence: 4,
        uuid: "close".into(),
    });
    client.call(0, &close).await.expect("closed");
    assert_eq!(
        code(client.call(0, &text(&card, "late", 5)).await),
        Some(300309)
    );
    let kept = fake.card(&card).expect("the card");
    assert_eq!(kept.texts["answer"], "Hello, world");
    assert!(!kept.streaming);
    assert_eq!((kept.sequence, kept.updates), (4, 3));
    let ops: Vec<String> = fake.received().into_iter().map(|r| r.operation).collect();
    assert_eq!(ops.iter().filter(|o| *o == "card_content").count(), 6);
    assert_eq!(ops.first().map(String::as_str), Some("card_create"));
    // A card JSON Feishu refuses: not 2.0.
    let old = Call::CardCreate {
        card_json: r#"{"elements":[]}"#.into(),
    };
    assert_eq!(code(client.call(0, &old).await), Some(200621));
}

fn part(p: Part) -> StreamReplyRequest {
    StreamReplyRequest { part: Some(p) }
}

fn start_part(message_id: &str) -> StreamReplyRequest {
    part(Part::Start(StreamStart {
        message_id: message_id.into(),
        chat_id: "oc_s".into(),
        title: "Answer".into(),
        ..Default::default()
    }))
}

/// Every event until the response stream ends (an error fails the test).
async fn all_events(events: &mut tonic::Streaming<StreamReplyEvent>) -> Vec<Event> {
    let mut got = Vec::new();
    while let Some(e) = events.message().await.expect("no error") {
        got.push(e.event.expect("an event"));
    }
    got
}

/// A request stream fed through `tx` (ends when `tx` is dropped).
fn fed() -> (
    tokio::sync::mpsc::Sender<StreamReplyRequest>,
    impl futures_util::Stream<Item = StreamReplyRequest>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let s =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    (tx, s)
}

#[tokio::test]
async fn a_stream_reply_types_the_answer_into_one_card_and_closes_it() {
    let gw = common::spawn_gateway(FakeOptions::default(), "").await;
    let mut parts = vec![start_part("om_q_in_s")];
    let mut want = String::new();
    for n in 0..30 {
        let w = format!("w{n} ");
        want.push_str(&w);
        parts.push(part(Part::Append(w)));
    }
    parts.push(part(Part::Finish(StreamFinish {
        text: Some(format!("{want}(done)")),
    })));
    let mut events = gw
        .client
        .clone()
        .stream_reply(futures_util::stream::iter(parts))
        .await
        .expect("accepted")
        .into_inner();
    let got = all_events(&mut events).await;
    let [Event::Started(started), Event::Finished(finished)] = &got[..] else {
        panic!("{got:?}")
    };
    assert_eq!(finished.card_ids, std::slice::from_ref(&started.card_id));
    assert_eq!(finished.message_id, started.message_id);
    let card = gw.fake.card(&started.card_id).expect("the card");
    assert_eq!(card.texts["answer"], format!("{want}(done)"));
    assert!(!card.streaming);
    let received = gw.fake.received();
    let replies: Vec<_> = received.iter().filter(|r| r.operation == "reply").collect();
    assert_eq!(replies.len(), 1);
    assert!(
        replies[0].content.contains(&started.card_id),
        "{:?}",
        replies[0]
    );
    assert_eq!(gw.fake.stats().rate_rejections(), 0);
}

#[tokio::test]
async fn a_stream_must_start_with_start_and_a_caller_gone_leaves_a_closed_card() {
    let gw = common::spawn_gateway(FakeOptions::default(), "").await;
    let e = gw
        .client
        .clone()
        .stream_reply(futures_util::stream::iter(vec![part(Part::Append(
            "x".into(),
        ))]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // Started, two appends, then the caller's stream ends without `finish`: the card keeps
    // what came and is closed.
    let (tx, requests) = fed();
    tx.send(start_part("om_half_in_s")).await.unwrap();
    tx.send(part(Part::Append("so ".into()))).await.unwrap();
    tx.send(part(Part::Append("far".into()))).await.unwrap();
    drop(tx);
    let mut events = gw
        .client
        .clone()
        .stream_reply(requests)
        .await
        .expect("accepted")
        .into_inner();
    let got = all_events(&mut events).await;
    let [Event::Started(started), Event::Finished(_)] = &got[..] else {
        panic!("{got:?}")
    };
    let card = gw.fake.card(&started.card_id).unwrap();
    assert_eq!(
        (card.texts["answer"].as_str(), card.streaming),
        ("so far", false)
    );

    // The caller cancels mid-stream (the call is dropped): the card is closed all the same.
    let (tx, requests) = fed();
    tx.send(start_part("om_cancel_in_s")).await.unwrap();
    let mut events = gw
        .client
        .clone()
        .stream_reply(requests)
        .await
        .expect("accepted")
        .into_inner();
    let Some(StreamReplyEvent {
        event: Some(Event::Started(started)),
    }) = events.message().await.unwrap()
    else {
        panic!("started")
    };
    tx.send(part(Part::Append("typed".into()))).await.unwrap();
    common::eventually("the text typed", async || {
        gw.fake
            .card(&started.card_id)
            .is_some_and(|c| c.texts["answer"] == "typed")
    })
    .await;
    drop(events);
    drop(tx);
    common::eventually("the card closed", async || {
        gw.fake
            .card(&started.card_id)
            .is_some_and(|c| !c.streaming && c.texts["answer"] == "typed")
    })
    .await;
}
