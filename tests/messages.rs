//! Send, UpdateMessage and RecallMessage over real loopback gRPC against the HTTP fake: they
//! share the chat and user quotas with replies, updates of one message are paced and latest
//! wins, a recalled message is gone, Feishu's per-endpoint codes read in their own table.

mod common;

use common::{max_in_window, reason, send_text, spawn_gateway, text};
use feishu_reply_gateway::fake_feishu::FakeOptions;
use feishu_reply_gateway::proto::{RecallMessageRequest, ReplyRequest, UpdateMessageRequest};
use tonic::Code;
use tonic_types::StatusExt;

fn card(message_id: &str, n: usize) -> UpdateMessageRequest {
    UpdateMessageRequest {
        message_id: message_id.into(),
        msg_type: "interactive".into(),
        content: serde_json::json!({ "elements": [], "n": n }).to_string(),
        ..Default::default()
    }
}

#[tokio::test]
async fn sends_and_replies_to_one_chat_share_its_quota_and_a_users_sends_its_user_quota() {
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    // Six replies and six sends to one chat at once: one chat, one 5/s (and its order).
    let mut calls = Vec::new();
    for i in 0..6 {
        let mut c = gw.client.clone();
        let reply = text(&format!("om_r{i}_in_mix"), "oc_mix", "r");
        calls.push(tokio::spawn(
            async move { c.reply(reply).await.map(|_| ()) },
        ));
        let mut c = gw.client.clone();
        let send = send_text("chat_id", "oc_mix", &format!("s{i}"));
        calls.push(tokio::spawn(async move { c.send(send).await.map(|_| ()) }));
    }
    // Four replies naming a user and four sends to that user: one user, one 5/s.
    for i in 0..4 {
        let mut c = gw.client.clone();
        let reply = ReplyRequest {
            user_id: "ou_same".into(),
            ..text(&format!("om_u{i}"), &format!("oc_u{i}"), "r")
        };
        calls.push(tokio::spawn(
            async move { c.reply(reply).await.map(|_| ()) },
        ));
        let mut c = gw.client.clone();
        let send = send_text("open_id", "ou_same", &format!("u{i}"));
        calls.push(tokio::spawn(async move { c.send(send).await.map(|_| ()) }));
    }
    for c in calls {
        c.await.unwrap().expect("answered OK");
    }
    let got = gw.fake.received();
    let chat: Vec<f64> = got
        .iter()
        .filter(|r| r.chat_id == "oc_mix")
        .map(|r| r.at_ms)
        .collect();
    assert_eq!(chat.len(), 12);
    assert!(max_in_window(&chat, 1000.0) <= 5, "{chat:?}");
    let user: Vec<f64> = got
        .iter()
        .filter(|r| r.message_id.starts_with("om_u") || r.content.contains("\"u"))
        .map(|r| r.at_ms)
        .collect();
    assert_eq!(user.len(), 8);
    assert!(max_in_window(&user, 1000.0) <= 5, "{user:?}");
    assert_eq!(gw.fake.stats().rate_rejections(), 0);
    assert_eq!(gw.fake.stats().requests_by_operation["send"], 10);
}

#[tokio::test]
async fn a_send_retried_by_its_caller_is_posted_once_and_bad_receivers_are_refused() {
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    let mut c = gw.client.clone();
    let first = c.send(send_text("chat_id", "oc_once", "hi")).await.unwrap();
    let again = c.send(send_text("chat_id", "oc_once", "hi")).await.unwrap();
    let (first, again) = (first.into_inner(), again.into_inner());
    assert_eq!(
        first.uuid, again.uuid,
        "the same send derives the same uuid"
    );
    assert_eq!(first.message_id, again.message_id);
    assert_eq!(gw.fake.stats().posted, 1);
    assert_eq!(first.chat_id, "oc_once");

    let e = c
        .send(send_text("chat", "oc_once", "hi"))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::InvalidArgument, "INVALID_ID")
    );
    let e = c
        .send(send_text("open_id", "ou_a/../b", "hi"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(gw.fake.stats().requests_by_operation["send"], 2);
}

#[tokio::test]
async fn updates_of_one_card_are_paced_answered_and_the_latest_wins() {
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    let calls: Vec<_> = (0..30)
        .map(|n| {
            let mut c = gw.client.clone();
            tokio::spawn(async move { c.update_message(card("om_card", n)).await })
        })
        .collect();
    let mut superseded = 0;
    for c in calls {
        let r = c.await.unwrap().expect("every update is answered OK");
        superseded += usize::from(r.into_inner().superseded);
    }
    let got: Vec<_> = gw
        .fake
        .received()
        .into_iter()
        .filter(|r| r.operation == "update_card")
        .collect();
    assert_eq!(got.len() + superseded, 30, "each update sent or superseded");
    assert!(superseded > 0, "30 updates at once cannot all go at 5/s");
    let times: Vec<f64> = got.iter().map(|r| r.at_ms).collect();
    assert!(max_in_window(&times, 1000.0) <= 5, "{times:?}");
    assert_eq!(gw.fake.stats().rate_rejections(), 0);
}

#[tokio::test]
async fn a_recalled_message_is_gone_and_an_edit_past_twentieth_reads_the_edit_table() {
    // Updates of one message at 50/s here, so twenty edits take no time.
    let fast = FakeOptions {
        message_quota: feishu_reply_gateway::fake_feishu::FakeQuota {
            limit: 50,
            window: std::time::Duration::from_secs(1),
        },
        ..FakeOptions::default()
    };
    let gw = spawn_gateway(fast, "[quotas]\nmessage = { limit = 50, window_ms = 1000 }").await;
    let mut c = gw.client.clone();
    let sent = c
        .send(send_text("chat_id", "oc_e", "v0"))
        .await
        .unwrap()
        .into_inner();
    let edit = |n: usize| UpdateMessageRequest {
        message_id: sent.message_id.clone(),
        msg_type: "text".into(),
        content: serde_json::json!({ "text": format!("v{n}") }).to_string(),
        ..Default::default()
    };
    for n in 1..=20 {
        let r = c.update_message(edit(n)).await.expect("edit");
        assert!(!r.into_inner().superseded);
    }
    let e = c.update_message(edit(21)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(reason(&e), "FEISHU_230072");
    let meaning = e.get_details_error_info().unwrap().metadata["feishu_meaning"].clone();
    assert!(meaning.contains("edited the most times"), "{meaning}");

    // Recalled: the next update fails MESSAGE_GONE without a call to Feishu.
    let r = c
        .recall_message(RecallMessageRequest {
            message_id: sent.message_id.clone(),
            ..Default::default()
        })
        .await
        .expect("recalled")
        .into_inner();
    assert_eq!(r.attempts, 1);
    let before = gw.fake.received().len();
    let e = c.update_message(edit(22)).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "MESSAGE_GONE")
    );
    assert_eq!(gw.fake.received().len(), before, "no call to Feishu");
    let ops: Vec<String> = gw
        .fake
        .received()
        .iter()
        .map(|r| r.operation.clone())
        .collect();
    assert_eq!(ops.iter().filter(|o| *o == "edit").count(), 21);
    assert_eq!(ops.last().map(String::as_str), Some("recall"));
}

#[tokio::test]
async fn only_cards_texts_and_posts_are_updated() {
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    let e = gw
        .client
        .clone()
        .update_message(UpdateMessageRequest {
            message_id: "om_img".into(),
            msg_type: "image".into(),
            content: r#"{"image_key":"k"}"#.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::InvalidArgument, "INVALID_MSG_TYPE")
    );
    assert!(gw.fake.received().is_empty());
}
