//! The gRPC API over real loopback gRPC against the fake Feishu: validation, errors, chat
//! resolution, uuid dedupe, token refresh, health, reflection and metrics.

mod common;

use std::time::Duration;

use common::{metric, spawn_gateway, text};
use feishu_reply_gateway::fake_feishu::{FakeOptions, Fault};
use feishu_reply_gateway::proto::ReplyRequest;
use tonic::Code;
use tonic_types::StatusExt;

fn reason(s: &tonic::Status) -> String {
    s.get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

#[tokio::test]
async fn a_reply_goes_through_and_reports_what_feishu_returned() {
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    let r = gw.reply(text("om_hello", "oc_1", "hi")).await.unwrap();
    assert!(r.message_id.starts_with("om_fake"));
    assert_eq!(
        (r.root_id.as_str(), r.msg_type.as_str(), r.attempts),
        ("om_hello", "text", 1)
    );
    assert_eq!(r.uuid.len(), 36, "a uuid is generated when none is given");
    let got = gw.fake.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].uuid, r.uuid);
    assert_eq!(got[0].content, r#"{"text":"hi"}"#);
}

#[tokio::test]
async fn invalid_requests_are_refused_before_any_quota_or_upstream_call() {
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    let ok = text("om_1", "oc_1", "x");
    let cases: Vec<(ReplyRequest, Code, &str)> = vec![
        (
            ReplyRequest {
                message_id: String::new(),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "INVALID_ID",
        ),
        (
            ReplyRequest {
                message_id: "om_../../x".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "INVALID_ID",
        ),
        (
            ReplyRequest {
                msg_type: "markdown".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "INVALID_MSG_TYPE",
        ),
        (
            ReplyRequest {
                content: "not json".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "INVALID_CONTENT",
        ),
        (
            ReplyRequest {
                content: r#"{"txt":"a"}"#.into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "INVALID_CONTENT",
        ),
        (
            ReplyRequest {
                msg_type: "image".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "INVALID_CONTENT",
        ),
        (
            ReplyRequest {
                msg_type: "post".into(),
                content: format!(
                    r#"{{"zh_cn":{{"content":[[{{"tag":"text","text":"{}"}}]]}}}}"#,
                    "a".repeat(31 * 1024)
                ),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "CONTENT_TOO_LARGE",
        ),
        (
            ReplyRequest {
                uuid: "u".repeat(51),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "INVALID_UUID",
        ),
        (
            ReplyRequest {
                app: "nope".into(),
                ..ok.clone()
            },
            Code::NotFound,
            "UNKNOWN_APP",
        ),
    ];
    for (req, code, want) in cases {
        let s = gw.reply(req).await.expect_err(want);
        assert_eq!(s.code(), code, "{want}: {}", s.message());
        assert_eq!(reason(&s), want, "{}", s.message());
        assert!(!s.message().is_empty());
    }
    assert_eq!(gw.fake.stats().reply_requests, 0, "nothing reached Feishu");
}

#[tokio::test]
async fn feishu_final_errors_map_to_the_table_with_code_msg_and_log_id() {
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    for (code, grpc) in [
        (230002, Code::PermissionDenied),
        (230011, Code::FailedPrecondition),
        (230099, Code::InvalidArgument),
    ] {
        gw.fake.push_fault(Fault {
            http: 400,
            code,
            msg: format!("scripted {code}"),
            times: 1,
            ..Default::default()
        });
        let s = gw
            .reply(text(&format!("om_e{code}"), "oc_e", "x"))
            .await
            .unwrap_err();
        assert_eq!(s.code(), grpc);
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.reason, format!("FEISHU_{code}"));
        assert_eq!(info.metadata["feishu_code"], code.to_string());
        assert_eq!(info.metadata["feishu_msg"], format!("scripted {code}"));
        assert!(!info.metadata["log_id"].is_empty(), "X-Tt-Logid is kept");
        assert_eq!(
            info.metadata["attempts"], "1",
            "final errors are not retried"
        );
    }
}

#[tokio::test]
async fn bad_app_credentials_are_failed_precondition() {
    let opts = FakeOptions {
        apps: vec![("cli_test".into(), "other-secret".into())],
        ..FakeOptions::default()
    };
    let gw = spawn_gateway(opts, "").await;
    let s = gw.reply(text("om_1", "oc_1", "x")).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert_eq!(reason(&s), "APP_CREDENTIALS");
    assert_eq!(
        s.get_details_error_info().unwrap().metadata["feishu_code"],
        "10014"
    );
}

#[tokio::test]
async fn missing_chat_id_is_resolved_once_and_cached() {
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    gw.fake.register_message("om_q", "oc_real", None);
    for _ in 0..3 {
        gw.reply(text("om_q", "", "x")).await.unwrap();
    }
    assert_eq!(gw.fake.stats().message_lookups, 1);
    // The resolved chat's quota applies: 7 replies to one chat span more than one window.
    let rs: Vec<_> = (0..7)
        .map(|i| {
            gw.fake
                .register_message(&format!("om_q{i}"), "oc_real", None);
            gw.reply(text(&format!("om_q{i}"), "", "x"))
        })
        .collect();
    for r in futures_util::future::join_all(rs).await {
        r.unwrap();
    }
    let times: Vec<f64> = gw.fake.received().iter().map(|r| r.at_ms).collect();
    assert!(common::max_in_window(&times, 1000.0) <= 5);
    assert_eq!(gw.fake.stats().rate_rejections(), 0);
}

#[tokio::test]
async fn the_x_chat_id_metadata_names_the_chat_and_must_agree_with_the_body() {
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    let with_header = |req: ReplyRequest, chat: &str| {
        let mut r = tonic::Request::new(req);
        r.metadata_mut().insert("x-chat-id", chat.parse().unwrap());
        let mut c = gw.client.clone();
        async move { c.reply(r).await }
    };
    // No chat_id in the body: the metadata names the chat, so no lookup, and that chat's
    // quota paces the replies (7 to one chat span more than one window; the fake would
    // refuse a sixth within one).
    let calls: Vec<_> = (0..7)
        .map(|i| {
            let id = format!("om_x{i}");
            gw.fake.register_message(&id, "oc_real", None);
            with_header(text(&id, "", "x"), "oc_real")
        })
        .collect();
    for r in futures_util::future::join_all(calls).await {
        r.unwrap();
    }
    assert_eq!(gw.fake.stats().message_lookups, 0);
    assert_eq!(gw.fake.stats().rate_rejections(), 0);
    let times: Vec<f64> = gw.fake.received().iter().map(|r| r.at_ms).collect();
    assert!(common::max_in_window(&times, 1000.0) <= 5);

    // Both given and equal: fine. Different: the call would be routed by one chat and paced
    // by another, so it is refused before any quota or upstream call.
    with_header(text("om_same", "oc_same", "x"), "oc_same")
        .await
        .unwrap();
    let s = with_header(text("om_diff", "oc_body", "x"), "oc_header")
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
    assert_eq!(reason(&s), "INVALID_ID");
    assert!(
        s.message().contains("x-chat-id") && s.message().contains("oc_header"),
        "{}",
        s.message()
    );
    assert!(gw.fake.received().iter().all(|r| r.message_id != "om_diff"));
}

#[tokio::test]
async fn reply_in_thread_is_passed_on_and_user_id_adds_the_user_quota() {
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    let r = gw
        .reply(ReplyRequest {
            reply_in_thread: true,
            ..text("om_thread", "oc_t", "x")
        })
        .await
        .unwrap();
    assert!(r.thread_id.starts_with("omt_"), "{r:?}");
    let plain = gw.reply(text("om_plain", "oc_t", "x")).await.unwrap();
    assert!(plain.thread_id.is_empty(), "{plain:?}");

    // Seven replies in seven chats, all naming one user: the user's 5/s quota paces them.
    let calls: Vec<_> = (0..7)
        .map(|i| {
            gw.reply(ReplyRequest {
                user_id: "ou_same".into(),
                ..text(&format!("om_u{i}"), &format!("oc_u{i}"), "x")
            })
        })
        .collect();
    for r in futures_util::future::join_all(calls).await {
        r.unwrap();
    }
    let times: Vec<f64> = gw
        .fake
        .received()
        .iter()
        .filter(|r| r.message_id.starts_with("om_u"))
        .map(|r| r.at_ms)
        .collect();
    assert_eq!(times.len(), 7);
    assert!(common::max_in_window(&times, 1000.0) <= 5);
}

#[tokio::test]
async fn a_lost_answer_is_retried_with_the_same_uuid_and_posted_once() {
    // Feishu posts the reply but the answer arrives after our 300 ms request timeout.
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    let gw = {
        let mut cfg = common::config_for(&gw.fake, "");
        cfg.feishu.request_timeout = Duration::from_millis(300);
        common::spawn_gateway_on(gw.fake.clone(), cfg).await
    };
    gw.fake.push_fault(Fault {
        post_then_delay_ms: Some(1000),
        times: 1,
        ..Default::default()
    });
    let r = gw
        .reply(ReplyRequest {
            uuid: "caller-uuid-1".into(),
            ..text("om_lost", "oc_1", "once")
        })
        .await
        .unwrap();
    assert_eq!(r.uuid, "caller-uuid-1");
    assert_eq!(r.attempts, 2);
    let stats = gw.fake.stats();
    assert_eq!(stats.posted, 1, "posted exactly once");
    assert_eq!(
        stats.deduped, 1,
        "the retry was answered from Feishu's uuid dedupe"
    );
    let (_, metrics) = gw.http_get("/metrics").await;
    assert_eq!(
        metric(&metrics, "feishu_reply_retries_total{reason=\"network\"}"),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_refused_token_is_refreshed_once_and_the_reply_retried() {
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    gw.reply(text("om_1", "oc_1", "x")).await.unwrap();
    gw.fake.revoke_tokens();
    let r = gw.reply(text("om_2", "oc_2", "x")).await.unwrap();
    assert_eq!(r.attempts, 1, "the token retry is not a reply retry");
    let s = gw.fake.stats();
    assert_eq!(s.token_requests, 2);
    let codes: Vec<i64> = gw.fake.received().iter().map(|r| r.code).collect();
    assert_eq!(
        codes,
        [0, 0],
        "the refused attempt is rejected before it is recorded as a reply"
    );
    let (_, metrics) = gw.http_get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "feishu_reply_token_refreshes_total{outcome=\"ok\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn concurrent_first_calls_share_one_token_fetch() {
    let gw = spawn_gateway(
        FakeOptions {
            latency: Duration::from_millis(50),
            ..FakeOptions::default()
        },
        "",
    )
    .await;
    let calls: Vec<_> = (0..20)
        .map(|i| gw.reply(text(&format!("om_{i}"), &format!("oc_{i}"), "x")))
        .collect();
    for r in futures_util::future::join_all(calls).await {
        r.unwrap();
    }
    assert_eq!(gw.fake.stats().token_requests, 1);
}

#[tokio::test]
async fn health_reflection_and_probes_are_served() {
    // With a budget, so that the budget metrics (per app with one) are among those exported.
    let gw = spawn_gateway(
        FakeOptions::default(),
        "[apps.default.budget]\ncalls = 1000000\nperiod = \"month\"\n",
    )
    .await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(gw.channel.clone());
    let s = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "feishu.reply.v1.ReplyGateway".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            gw.channel.clone(),
        );
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse,
    };
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("reflection answered something else");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"feishu.reply.v1.ReplyGateway".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    assert_eq!(gw.http_get("/healthz").await.0, 200);
    assert_eq!(gw.http_get("/readyz").await.0, 200);
    gw.reply(text("om_m", "oc_m", "x")).await.unwrap();
    let (code, metrics) = gw.http_get("/metrics").await;
    assert_eq!(code, 200);
    for name in feishu_reply_gateway::metrics::METRIC_NAMES {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "{name} missing"
        );
    }
    assert_eq!(
        metric(
            &metrics,
            "feishu_reply_requests_total{operation=\"reply\",app=\"default\",outcome=\"ok\",code=\"0\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn the_fake_answers_with_feishus_header_casing() {
    // Official SDKs (lark-oapi) copy headers into a case-sensitive dict and read "X-Tt-Logid".
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = common::spawn_fake(FakeOptions::default()).await;
    let body = r#"{"app_id":"cli_a","app_secret":"s"}"#;
    let mut conn = tokio::net::TcpStream::connect(fake.addr()).await.unwrap();
    let req = format!(
        "POST /open-apis/auth/v3/tenant_access_token/internal HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).await.unwrap();
    assert!(raw.contains("\r\nX-Tt-Logid: "), "{raw}");
    assert!(raw.contains("\"tenant_access_token\":\"t-"), "{raw}");
    assert!(raw.contains("\"expire\":7200"), "{raw}");
}

#[tokio::test]
async fn a_code_0_answer_is_a_success_whatever_else_its_data_holds() {
    // Feishu posted the reply and said code 0, with fields the gateway did not expect: null,
    // of another type, added, missing. Anything but success here makes the caller retry with
    // a fresh uuid, i.e. post twice.
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    gw.fake.push_fault(Fault {
        data: Some(serde_json::json!({
            "thread_id": null,
            "create_time": 1764147600000u64,
            "parent_id": {"unexpected": "object"},
            "new_field": [1, 2, 3],
        })),
        times: 1,
        ..Default::default()
    });
    let r = gw.reply(text("om_odd", "oc_odd", "hi")).await.unwrap();
    assert!(r.message_id.starts_with("om_fake"), "{r:?}");
    assert_eq!((r.thread_id.as_str(), r.parent_id.as_str()), ("", ""));
    assert_eq!(
        r.create_time, "1764147600000",
        "a number is kept as its digits"
    );
    assert_eq!(r.attempts, 1);
    assert_eq!(gw.fake.stats().posted, 1);
}

#[tokio::test]
async fn an_absurd_token_lifetime_neither_panics_nor_wedges_a_chat() {
    // Feishu (or a proxy) answers "expire": u64::MAX seconds. Adding that to the clock used to
    // panic inside the send task: the chat stayed busy and every later reply to it timed out.
    let gw = spawn_gateway(
        FakeOptions {
            token_ttl: Duration::from_secs(u64::MAX),
            ..FakeOptions::default()
        },
        "",
    )
    .await;
    for i in 0..3 {
        let r = gw
            .reply_with_timeout(
                text(&format!("om_ttl{i}"), "oc_ttl", "hi"),
                Duration::from_secs(5),
            )
            .await;
        assert!(r.is_ok(), "reply {i}: {r:?}");
    }
    assert_eq!(gw.fake.stats().token_requests, 1);
}

#[tokio::test]
async fn an_unexpected_token_answer_is_described_without_its_token() {
    // `expire` as a string: the answer does not parse, and used to be quoted (200 bytes, the
    // token included) into the caller's status message and the log.
    let gw = spawn_gateway(
        FakeOptions {
            token_body: Some(
                r#"{"code":0,"msg":"ok","tenant_access_token":"t-leakme0123456789abcdef","expire":"7200"}"#
                    .into(),
            ),
            ..FakeOptions::default()
        },
        "",
    )
    .await;
    let s = gw.reply(text("om_tok", "oc_tok", "hi")).await.unwrap_err();
    let shown = format!("{} {:?}", s.message(), s.details());
    assert!(!shown.contains("leakme"), "{shown}");
    assert!(
        shown.contains("tenant_access_token"),
        "says what was there: {shown}"
    );
    let (_, metrics) = gw.http_get("/metrics").await;
    assert!(!metrics.contains("leakme"));
}

#[tokio::test]
async fn a_request_larger_than_any_valid_reply_is_refused_before_it_is_read_whole() {
    // Every valid reply fits in 150 KB of content; a 2 MiB request used to be decoded whole
    // (tonic's 4 MiB default) before validation said no: 300 such streams held 1.35 GB.
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    let huge = format!(r#"{{"text":"{}"}}"#, "a".repeat(2 * 1024 * 1024));
    let s = gw
        .reply(ReplyRequest {
            content: huge,
            ..text("om_huge", "oc_1", "")
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    assert!(s.message().contains("limit"), "{}", s.message());
    // The largest valid text still goes through.
    let max = format!(
        r#"{{"text":"{}"}}"#,
        "a".repeat(feishu_reply_gateway::reply::MAX_TEXT_BYTES - 20)
    );
    gw.reply(ReplyRequest {
        content: max,
        ..text("om_max", "oc_2", "")
    })
    .await
    .expect("a maximal valid reply fits");
    assert_eq!(gw.fake.stats().posted, 1);
}

#[tokio::test]
async fn an_oversized_feishu_answer_is_cut_off_not_read_whole() {
    // An answer of 4 MiB (a misbehaving proxy, a bug upstream) used to be read whole into
    // memory, however large. It is refused at the cap, with the uuid to retry with.
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    gw.fake.push_fault(Fault {
        data: Some(serde_json::json!({ "pad": "x".repeat(4 * 1024 * 1024) })),
        times: 1,
        ..Default::default()
    });
    let s = gw.reply(text("om_big", "oc_big", "hi")).await.unwrap_err();
    assert_eq!(reason(&s), "UPSTREAM_BAD_RESPONSE", "{s:?}");
    assert!(s.message().contains("cap"), "{}", s.message());
    let info = s.get_details_error_info().unwrap();
    assert!(info.metadata.contains_key("uuid"), "the uuid to retry with");
}
