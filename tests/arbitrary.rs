//! Any `ReplyRequest` gets a reply or a documented status over real gRPC: never a panic, never
//! INTERNAL or UNKNOWN from the gateway itself, always `ErrorInfo` (proptest).

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::{TestGateway, spawn_gateway};
use feishu_reply_gateway::fake_feishu::FakeOptions;
use feishu_reply_gateway::grpc::ERROR_DOMAIN;
use feishu_reply_gateway::proto::ReplyRequest;
use proptest::prelude::*;
use tonic::Code;
use tonic_types::StatusExt;

fn gateway() -> &'static (tokio::runtime::Runtime, TestGateway) {
    static GW: OnceLock<(tokio::runtime::Runtime, TestGateway)> = OnceLock::new();
    GW.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let gw = rt.block_on(spawn_gateway(
            FakeOptions::default(),
            "[apps.other]\napp_id = \"cli_other\"\napp_secret = \"s2\"",
        ));
        (rt, gw)
    })
}

/// Mostly plausible values, some hostile, some anything.
fn field(plausible: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(plausible).prop_map(str::to_owned),
        2 => "[a-z_]{0,3}[A-Za-z0-9_-]{0,40}",
        1 => any::<String>(),
        1 => (0usize..70).prop_map(|n| "x".repeat(n)),
    ]
}

fn content() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(&[
            r#"{"text":"hello"}"#,
            r#"{"text":""}"#,
            r#"{"image_key":"img_v2_x"}"#,
            r#"{"zh_cn":{"title":"t","content":[[{"tag":"text","text":"x"}]]}}"#,
            r#"{"type":"template","data":{"template_id":"ctp_x"}}"#,
            r#"{"elements":[]}"#,
            r#"{"chat_id":"oc_x"}"#,
            r#"{"text":null}"#,
            "[]",
            "",
        ][..]).prop_map(str::to_owned),
        2 => any::<String>(),
        1 => "\\{\"text\":\"[^\"\\\\]{0,64}\"\\}",
        1 => (150_000usize..160_000).prop_map(|n| format!(r#"{{"text":"{}"}}"#, "x".repeat(n))),
    ]
}

fn request() -> impl Strategy<Value = ReplyRequest> {
    (
        field(&["", "default", "other", "nope"]),
        field(&["om_a1", "om_b2", "", "oc_wrong_kind"]),
        field(&[
            "text",
            "post",
            "image",
            "file",
            "audio",
            "media",
            "sticker",
            "interactive",
            "share_chat",
            "share_user",
            "TEXT",
            "",
        ]),
        content(),
        any::<bool>(),
        field(&["", "u-1", "6f1c2e5a-0000-4000-8000-000000000000"]),
        field(&["oc_c1", "oc_c2", "", "om_not_a_chat"]),
        field(&["", "ou_u1"]),
    )
        .prop_map(
            |(app, message_id, msg_type, content, reply_in_thread, uuid, chat_id, user_id)| {
                ReplyRequest {
                    app,
                    message_id,
                    msg_type,
                    content,
                    reply_in_thread,
                    uuid,
                    chat_id,
                    user_id,
                    ttl_s: 0,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_request_gets_a_reply_or_a_documented_status(req in request()) {
        let (rt, gw) = gateway();
        let result = rt.block_on(gw.reply_with_timeout(req.clone(), Duration::from_secs(5)));
        match result {
            Ok(r) => {
                prop_assert!(!r.message_id.is_empty());
                prop_assert!(!r.uuid.is_empty() && r.uuid.chars().count() <= 50);
            }
            Err(s) => {
                // tonic refuses an oversized message before the gateway sees it.
                if s.code() == Code::OutOfRange {
                    return Ok(());
                }
                prop_assert!(
                    matches!(
                        s.code(),
                        Code::InvalidArgument
                            | Code::NotFound
                            | Code::PermissionDenied
                            | Code::FailedPrecondition
                            | Code::ResourceExhausted
                            | Code::DeadlineExceeded
                            | Code::Unavailable
                    ),
                    "{:?} for {:?}", s, req
                );
                let info = s.get_error_details().error_info().cloned();
                prop_assert!(info.as_ref().is_some_and(|i| i.domain == ERROR_DOMAIN), "{:?}", s);
                prop_assert!(s.message().len() < 4096, "{:?}", s);
            }
        }
    }
}
