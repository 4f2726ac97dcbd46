//! CardKit (issue 20's groundwork): the real HTTP client creates a card entity, types into it
//! and closes its streaming mode at the fake Feishu, which keeps Feishu's rules (sequence
//! strictly increasing per card, 300317; a retried update's uuid answered once; nothing typed
//! after streaming closes, 300309; 10 operations per second per card).

mod common;

use std::sync::Arc;

use common::{config_for, spawn_fake};
use feishu_reply_gateway::fake_feishu::FakeOptions;
use feishu_reply_gateway::feishu::{
    Call, CardStreaming, CardText, FeishuClient, Upstream, UpstreamError,
};
use feishu_reply_gateway::metrics::Metrics;

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
