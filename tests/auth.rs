//! Callers (DESIGN.md §8): bearer tokens and mTLS identities, each caller limited to its apps,
//! its rate and its queue share; claims a caller writes itself (`x-caller`) count for nothing;
//! a retried call without a uuid reuses the uuid the gateway derived.

mod common;

use std::time::Duration;

use common::{
    TestPki, config_for, eventually, metric, received_ids, spawn_fake, spawn_gateway,
    spawn_gateway_lazy, text, token_sha256,
};
use feishu_reply_gateway::fake_feishu::{FakeOptions, Fault};
use feishu_reply_gateway::proto::reply_gateway_client::ReplyGatewayClient;
use feishu_reply_gateway::proto::{
    RecallMessageRequest, ReplyRequest, SendRequest, UpdateMessageRequest,
};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_types::StatusExt;

const BILLING_TOKEN: &str = "billing-7f3a9c1e5b2d4f60";
const OPS_TOKEN: &str = "ops-0b8e2a6c4d1f3e57a9";
const NOTIFIER_TOKEN: &str = "notifier-5c2e8a1f7b3d9e40";

fn reason(s: &tonic::Status) -> String {
    s.get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// Two apps and two callers: `billing` (app `default` only, a small rate and queue share)
/// and `ops` (every app).
fn callers(extra: &str) -> String {
    format!(
        r#"
        [apps.ops]
        app_id = "cli_ops"
        app_secret = "ops-secret"
        [callers.billing]
        token_sha256 = "{}"
        apps = ["default"]
        rate = 1
        burst = 3
        max_queued = 2
        [callers.ops]
        token_sha256 = "{}"
        apps = ["*"]
        max_queued_bytes = 4500
        {extra}
        "#,
        token_sha256(BILLING_TOKEN),
        token_sha256(OPS_TOKEN),
    )
}

fn with_token<T>(req: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(req);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn send_to(chat: &str) -> SendRequest {
    common::send_text("chat_id", chat, "x")
}

fn edit(message_id: &str) -> UpdateMessageRequest {
    UpdateMessageRequest {
        message_id: message_id.into(),
        msg_type: "text".into(),
        content: r#"{"text":"y"}"#.into(),
        ..Default::default()
    }
}

fn recall(message_id: &str) -> RecallMessageRequest {
    RecallMessageRequest {
        message_id: message_id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn calls_without_valid_credentials_are_unauthenticated_and_never_sent() {
    let gw = spawn_gateway(FakeOptions::default(), &callers("")).await;
    let mut client = gw.client.clone();
    let s = client.reply(text("om_a1", "oc_a", "x")).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert_eq!(reason(&s), "CREDENTIALS_MISSING");
    // A claimed name is no identity.
    let mut r = tonic::Request::new(text("om_a2", "oc_a", "x"));
    r.metadata_mut().insert("x-caller", "ops".parse().unwrap());
    assert_eq!(
        client.reply(r).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    for (header, case) in [
        ("Bearer not-a-token-of-this-gateway", "unknown token"),
        ("Basic b3BzOm9wcw==", "another scheme"),
        ("Bearer ", "empty token"),
    ] {
        let mut r = tonic::Request::new(text("om_a3", "oc_a", "x"));
        r.metadata_mut()
            .insert("authorization", header.parse().unwrap());
        let s = client.reply(r).await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{case}: {s:?}");
        assert_eq!(reason(&s), "CREDENTIALS_INVALID", "{case}");
        assert!(!s.message().contains("not-a-token"), "{case}: {s:?}");
    }
    // The other message calls are behind the same door.
    let send = client.send(send_to("oc_a")).await.unwrap_err();
    let update = client.update_message(edit("om_a1")).await.unwrap_err();
    let recall = client.recall_message(recall("om_a1")).await.unwrap_err();
    for s in [send, update, recall] {
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    }
    assert!(gw.fake.received().is_empty(), "nothing may reach Feishu");
    let m = gw.http_get("/metrics").await.1;
    let series =
        r#"feishu_reply_caller_requests_total{caller="unauthenticated",outcome="unauthenticated"}"#;
    assert_eq!(metric(&m, series), Some(8.0), "{m}");
}

#[tokio::test]
async fn a_caller_may_send_only_as_its_apps() {
    // `notifier`: app `default` only, at the default rate.
    let notifier = format!(
        "[callers.notifier]\ntoken_sha256 = \"{}\"\napps = [\"default\"]\nrate = 100\n",
        token_sha256(NOTIFIER_TOKEN)
    );
    let gw = spawn_gateway(FakeOptions::default(), &callers(&notifier)).await;
    let mut client = gw.client.clone();
    let as_ops = ReplyRequest {
        app: "ops".into(),
        ..text("om_p1", "oc_p", "x")
    };
    let s = client
        .reply(with_token(as_ops.clone(), BILLING_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert_eq!(reason(&s), "APP_NOT_ALLOWED");
    let info = s.get_details_error_info().unwrap();
    assert_eq!(
        info.metadata.get("caller").map(String::as_str),
        Some("billing")
    );
    // Sends, updates and recalls as an app not its own: refused alike.
    let send = SendRequest {
        app: "ops".into(),
        ..send_to("oc_p")
    };
    let update = UpdateMessageRequest {
        app: "ops".into(),
        ..edit("om_p1")
    };
    let recall = RecallMessageRequest {
        app: "ops".into(),
        ..recall("om_p1")
    };
    let refused = [
        client
            .send(with_token(send, NOTIFIER_TOKEN))
            .await
            .unwrap_err(),
        client
            .update_message(with_token(update, NOTIFIER_TOKEN))
            .await
            .unwrap_err(),
        client
            .recall_message(with_token(recall, NOTIFIER_TOKEN))
            .await
            .unwrap_err(),
    ];
    for s in refused {
        assert_eq!(
            (s.code(), reason(&s).as_str()),
            (Code::PermissionDenied, "APP_NOT_ALLOWED")
        );
    }
    assert!(gw.fake.received().is_empty());
    // Its own app, and the caller given every app.
    client
        .reply(with_token(text("om_p2", "oc_p", "x"), BILLING_TOKEN))
        .await
        .unwrap();
    client.reply(with_token(as_ops, OPS_TOKEN)).await.unwrap();
    let m = gw.http_get("/metrics").await.1;
    let denied =
        r#"feishu_reply_caller_requests_total{caller="billing",outcome="permission_denied"}"#;
    assert_eq!(metric(&m, denied), Some(1.0), "{m}");
    let denied =
        r#"feishu_reply_caller_requests_total{caller="notifier",outcome="permission_denied"}"#;
    assert_eq!(metric(&m, denied), Some(3.0), "{m}");
}

#[tokio::test]
async fn a_caller_over_its_rate_is_refused_while_others_are_served() {
    let gw = spawn_gateway(FakeOptions::default(), &callers("")).await;
    let mut client = gw.client.clone();
    let mut refused = 0;
    for i in 0..6 {
        // Whatever it writes in x-caller, it is the same caller.
        let mut r = with_token(
            text(&format!("om_r{i}"), &format!("oc_r{i}"), "x"),
            BILLING_TOKEN,
        );
        r.metadata_mut()
            .insert("x-caller", format!("someone-else-{i}").parse().unwrap());
        if let Err(s) = client.reply(r).await {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
            assert_eq!(reason(&s), "CALLER_RATE_LIMITED");
            assert!(
                s.get_details_retry_info()
                    .and_then(|r| r.retry_delay)
                    .is_some()
            );
            refused += 1;
        }
    }
    assert_eq!(refused, 3, "burst 3, then 1/s");
    client
        .reply(with_token(text("om_r_ops", "oc_r_ops", "x"), OPS_TOKEN))
        .await
        .unwrap();
    let m = gw.http_get("/metrics").await.1;
    let series = r#"feishu_reply_admission_rejections_total{caller="billing"}"#;
    assert_eq!(metric(&m, series), Some(3.0), "{m}");
}

#[tokio::test]
async fn a_caller_over_its_queue_share_is_refused_while_others_are_served() {
    let gw = spawn_gateway(FakeOptions::default(), &callers("")).await;
    gw.fake.push_fault(Fault {
        message_id: Some("om_q0".into()),
        hold: true,
        times: 1,
        ..Fault::default()
    });
    let submit = |i: usize| {
        let mut c = gw.client.clone();
        tokio::spawn(async move {
            c.reply(with_token(
                text(&format!("om_q{i}"), "oc_q", "x"),
                BILLING_TOKEN,
            ))
            .await
        })
    };
    // om_q0 is in flight (held by Feishu), om_q1 and om_q2 wait behind it: billing's share.
    let mut calls = vec![submit(0)];
    eventually("om_q0 never sent", async || !gw.fake.received().is_empty()).await;
    for i in 1..3 {
        calls.push(submit(i));
        let queued = async || metric(&gw.http_get("/metrics").await.1, "feishu_reply_queued");
        eventually("a reply not queued", async || {
            queued().await == Some(i as f64)
        })
        .await;
    }
    // Billing's rate (burst 3) is spent too; wait for a token so the share is what refuses.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let s = gw
        .client
        .clone()
        .reply(with_token(text("om_q3", "oc_q3", "x"), BILLING_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert_eq!(reason(&s), "QUEUE_FULL");
    let scope = s.get_details_error_info().unwrap().metadata["scope"].clone();
    assert_eq!(scope, "caller");
    // Another caller is served meanwhile.
    gw.client
        .clone()
        .reply(with_token(text("om_q_ops", "oc_q_ops", "x"), OPS_TOKEN))
        .await
        .unwrap();
    gw.fake.release_held();
    for c in calls {
        c.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_caller_over_its_byte_share_is_refused() {
    // ops may have 4500 bytes queued (content + ~1 KiB per job): one 2 KB reply fits, a second
    // does not, a small one still does.
    let gw = spawn_gateway(FakeOptions::default(), &callers("")).await;
    gw.fake.push_fault(Fault {
        message_id: Some("om_b0".into()),
        hold: true,
        times: 1,
        ..Fault::default()
    });
    let submit = |id: &str, words: usize| {
        let mut c = gw.client.clone();
        let req = text(id, "oc_b", &"w".repeat(words));
        tokio::spawn(async move { c.reply(with_token(req, OPS_TOKEN)).await })
    };
    let head = submit("om_b0", 10);
    eventually("om_b0 never sent", async || !gw.fake.received().is_empty()).await;
    let second = submit("om_b1", 2000);
    let queued = async || metric(&gw.http_get("/metrics").await.1, "feishu_reply_queued");
    eventually("om_b1 not queued", async || queued().await == Some(1.0)).await;
    let s = submit("om_b2", 2000).await.unwrap().unwrap_err();
    assert_eq!(reason(&s), "QUEUE_FULL", "{s:?}");
    assert_eq!(
        s.get_details_error_info().unwrap().metadata["scope"],
        "caller_bytes"
    );
    let small = submit("om_b3", 10);
    gw.fake.release_held();
    for c in [head, second, small] {
        c.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn anonymous_callers_share_one_budget_whatever_they_call_themselves() {
    // Anonymous (allowed): x-caller is a label; admission keys on the peer, so made-up names
    // neither bypass the rate nor grow its table.
    let gw = spawn_gateway(
        FakeOptions::default(),
        "[admission]\nper_caller_rps = 1\nper_caller_burst = 3",
    )
    .await;
    let mut refused = 0;
    for i in 0..6 {
        let mut r = tonic::Request::new(text(&format!("om_n{i}"), &format!("oc_n{i}"), "x"));
        r.metadata_mut()
            .insert("x-caller", format!("random-{i}").parse().unwrap());
        if let Err(s) = gw.client.clone().reply(r).await {
            assert_eq!(reason(&s), "CALLER_RATE_LIMITED", "{s:?}");
            refused += 1;
        }
    }
    assert_eq!(refused, 3);
    let m = gw.http_get("/metrics").await.1;
    assert!(
        !m.contains("random-"),
        "labels chosen by callers reach no metric"
    );
    let series = r#"feishu_reply_caller_requests_total{caller="anonymous",outcome="ok"}"#;
    assert_eq!(metric(&m, series), Some(3.0), "{m}");
}

#[tokio::test]
async fn a_retried_call_without_uuid_is_posted_once() {
    let gw = spawn_gateway(FakeOptions::default(), &callers("")).await;
    let mut client = gw.client.clone();
    let req = text("om_u1", "oc_u", "the same words");
    assert!(req.uuid.is_empty());
    let first = client
        .reply(with_token(req.clone(), OPS_TOKEN))
        .await
        .unwrap()
        .into_inner();
    // The caller (or a mesh) retries after losing the answer.
    let again = client
        .reply(with_token(req.clone(), OPS_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.uuid, again.uuid);
    assert_eq!(first.message_id, again.message_id, "posted once");
    assert_eq!(gw.fake.stats().deduped, 1);
    // Another caller, other words, or an explicit uuid are other replies.
    let other_caller = client
        .reply(with_token(req.clone(), BILLING_TOKEN))
        .await
        .unwrap()
        .into_inner();
    let other_words = client
        .reply(with_token(text("om_u1", "oc_u", "other words"), OPS_TOKEN))
        .await
        .unwrap()
        .into_inner();
    let explicit = client
        .reply(with_token(
            ReplyRequest {
                uuid: "caller-chosen-1".into(),
                ..req
            },
            OPS_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(explicit.uuid, "caller-chosen-1");
    let uuids = [
        &first.uuid,
        &other_caller.uuid,
        &other_words.uuid,
        &explicit.uuid,
    ];
    for (i, a) in uuids.iter().enumerate() {
        for b in &uuids[i + 1..] {
            assert_ne!(a, b);
        }
    }
    assert!(uuid::Uuid::parse_str(&first.uuid).is_ok(), "{}", first.uuid);
}

#[tokio::test]
async fn two_callers_giving_the_same_explicit_uuid_each_get_their_reply_posted() {
    // Issue 18: an explicit uuid went to Feishu as given, so a caller could suppress another
    // caller's reply by reusing its uuid (Feishu dedupes a uuid for an hour).
    let gw = spawn_gateway(FakeOptions::default(), &callers("")).await;
    let mut client = gw.client.clone();
    let ask = |words: &str| ReplyRequest {
        uuid: "shared-uuid-1".into(),
        ..text("om_s1", "oc_s", words)
    };
    let ops = client
        .reply(with_token(ask("from ops"), OPS_TOKEN))
        .await
        .unwrap()
        .into_inner();
    let billing = client
        .reply(with_token(ask("from billing"), BILLING_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(ops.message_id, billing.message_id, "both posted");
    assert_eq!(gw.fake.stats().deduped, 0);
    // Each caller is told the uuid it gave, and its own retry is still posted once.
    assert_eq!(ops.uuid, "shared-uuid-1");
    assert_eq!(billing.uuid, "shared-uuid-1");
    let again = client
        .reply(with_token(ask("from ops"), OPS_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.message_id, ops.message_id, "a retry is posted once");
    assert_eq!(gw.fake.stats().deduped, 1);
    let sent: std::collections::HashSet<String> =
        gw.fake.received().into_iter().map(|r| r.uuid).collect();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(!sent.contains("shared-uuid-1"), "{sent:?}");
}

#[tokio::test]
async fn a_caller_at_its_job_share_is_refused_while_another_is_not() {
    // Issue 18: `[jobs] max_jobs` was one bound for all callers (finished jobs counting for
    // their 25 h): one caller's submits made the next caller's SubmitReply fail
    // RESOURCE_EXHAUSTED job_store.
    let fake = common::spawn_fake(FakeOptions::default()).await;
    let dir = std::env::temp_dir().join(format!(
        "gw-auth-jobs-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    // 20 jobs in the store: a caller's share is a quarter of it.
    let mut config = common::config_for(&fake, &callers("[jobs]\nmax_jobs = 20"));
    config.data_dir = Some(dir.clone());
    // ops's first job is held in flight by Feishu; the rest of its chat waits behind it.
    fake.push_fault(Fault {
        message_id: Some("om_js0".into()),
        hold: true,
        times: 1,
        ..Fault::default()
    });
    let gw = common::spawn_gateway_on(fake, config).await;
    let mut c = gw.client.clone();
    let mut ops_ids = Vec::new();
    let refused = loop {
        let i = ops_ids.len();
        let req = text(&format!("om_js{i}"), "oc_js", &format!("job {i}"));
        match c.submit_reply(with_token(req, OPS_TOKEN)).await {
            Ok(r) => ops_ids.push(r.into_inner().job_id),
            Err(s) => break s,
        }
        assert!(ops_ids.len() <= 20, "never refused");
    };
    assert_eq!(ops_ids.len(), 5, "ops's share");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let info = refused.get_details_error_info().unwrap();
    assert_eq!(
        info.metadata.get("scope").map(String::as_str),
        Some("caller_jobs")
    );
    // billing is not refused for ops's jobs.
    c.submit_reply(with_token(text("om_jb0", "oc_jb", "b"), BILLING_TOKEN))
        .await
        .expect("another caller still submits");
    // Finished jobs stop counting: once ops's jobs are delivered, ops submits again.
    gw.fake.release_held();
    for id in &ops_ids {
        common::eventually("ops's job delivered", async || {
            let mut r = tonic::Request::new(feishu_reply_gateway::proto::GetReplyRequest {
                job_id: id.clone(),
            });
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {OPS_TOKEN}").parse().unwrap(),
            );
            c.get_reply(r).await.is_ok_and(|j| {
                j.into_inner().state() == feishu_reply_gateway::proto::JobState::Delivered
            })
        })
        .await;
    }
    c.submit_reply(with_token(text("om_js9", "oc_js", "again"), OPS_TOKEN))
        .await
        .expect("finished jobs no longer count");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TLS channel to `gw` trusting `pki`'s CA, with `client` as its certificate if given.
async fn tls_client(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    client: Option<(std::path::PathBuf, std::path::PathBuf)>,
) -> Result<ReplyGatewayClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("127.0.0.1");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(ReplyGatewayClient::new(channel))
}

#[tokio::test]
async fn mtls_identities_name_callers() {
    let server_pki = TestPki::new("server");
    let (server_cert, server_key) = server_pki.issue("server", "IP:127.0.0.1");
    let client_pki = TestPki::new("clients");
    let billing = client_pki.issue("billing", "URI:spiffe://cluster.local/ns/billing/sa/bot");
    let intruder = client_pki.issue("intruder", "URI:spiffe://cluster.local/ns/x/sa/intruder");
    let stranger_pki = TestPki::new("stranger");
    let stranger = stranger_pki.issue("stranger", "URI:spiffe://cluster.local/ns/billing/sa/bot");
    let fake = spawn_fake(FakeOptions::default()).await;
    let extra = format!(
        r#"
        [server.tls]
        cert_file = "{}"
        key_file = "{}"
        client_ca_file = "{}"
        [callers.billing]
        tls_identities = ["spiffe://cluster.local/ns/billing/sa/bot"]
        apps = ["default"]
        [callers.ops]
        token_sha256 = "{}"
        apps = ["*"]
        "#,
        server_cert.display(),
        server_key.display(),
        client_pki.ca().display(),
        token_sha256(OPS_TOKEN),
    );
    let config = config_for(&fake, &extra);
    let gw = spawn_gateway_lazy(fake, config).await;
    let ca = server_pki.ca();

    let mut c = tls_client(gw.grpc_addr, &ca, Some(billing)).await.unwrap();
    let ok = c
        .reply(text("om_t1", "oc_t", "x"))
        .await
        .unwrap()
        .into_inner();
    assert!(!ok.message_id.is_empty());

    // TLS without a certificate: a token still works, nothing else does.
    let mut c = tls_client(gw.grpc_addr, &ca, None).await.unwrap();
    let s = c.reply(text("om_t2", "oc_t", "x")).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    c.reply(with_token(text("om_t3", "oc_t", "x"), OPS_TOKEN))
        .await
        .unwrap();

    // A certificate from the right CA that names nobody, and a token naming someone else.
    let mut c = tls_client(gw.grpc_addr, &ca, Some(intruder)).await.unwrap();
    let s = c.reply(text("om_t4", "oc_t", "x")).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert_eq!(reason(&s), "CREDENTIALS_INVALID");
    let billing = client_pki.dir.join("billing.pem");
    let billing_key = client_pki.dir.join("billing.key");
    let mut c = tls_client(gw.grpc_addr, &ca, Some((billing, billing_key)))
        .await
        .unwrap();
    let s = c
        .reply(with_token(text("om_t5", "oc_t", "x"), OPS_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(reason(&s), "CREDENTIALS_CONFLICT", "{s:?}");

    // A certificate from another CA is refused in the handshake: no call gets through.
    let refused = match tls_client(gw.grpc_addr, &ca, Some(stranger)).await {
        Err(_) => true,
        Ok(mut c) => c.reply(text("om_t6", "oc_t", "x")).await.is_err(),
    };
    assert!(refused);
    // Plaintext is not served on a TLS port.
    assert!(gw.reply(text("om_t7", "oc_t", "x")).await.is_err());
    let posted = received_ids(&gw.fake);
    assert_eq!(posted, ["om_t1", "om_t3"]);
}
