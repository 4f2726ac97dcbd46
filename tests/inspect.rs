//! Introspection (issue 11): `InspectChat` (and `inspect chat` on the command line) names the
//! quota that holds a waiting chat and when it frees, from this process's counts on a single
//! node and from Redis's shared counts in cluster mode; `InspectApp` shows an app's windows,
//! budget and queue, `InspectCaller` a caller's rate and queue share; only admin callers may
//! ask.

mod common;

use common::{
    TestGateway, config_for, eventually, shared_redis, spawn_fake, spawn_gateway_on, text,
    token_sha256,
};
use feishu_reply_gateway::fake_feishu::FakeOptions;
use feishu_reply_gateway::proto::ReplyRequest;
use feishu_reply_gateway::proto::reply_admin_client::ReplyAdminClient;
use feishu_reply_gateway::proto::{
    AppState, ChatState, InspectAppRequest, InspectCallerRequest, InspectChatRequest,
};
use tonic::Code;
use tonic_types::StatusExt;

/// A chat quota of 5 a minute: the 6th reply of a chat waits ~a minute, long enough to look.
const SLOW_CHAT: &str = "[quotas]\nchat = { limit = 5, window_ms = 60000 }\n";

/// Sends 7 replies to `chat` (calls left running), waits until 5 are posted, and returns the
/// calls (aborted by the caller when done: they leave the queue).
async fn fill(gw: &TestGateway, chat: &str) -> Vec<tokio::task::JoinHandle<()>> {
    let mut calls = Vec::new();
    for i in 0..7 {
        let mut c = gw.client.clone();
        let req = text(
            &format!("om_{chat}{i}_in_{chat}"),
            &format!("oc_{chat}"),
            "w",
        );
        calls.push(tokio::spawn(async move {
            let _ = c.reply(req).await;
        }));
    }
    eventually("five posted", async || gw.fake.received().len() >= 5).await;
    // …and the other two queued (their calls may reach the gateway after the first five went).
    let chat = format!("oc_{chat}");
    eventually("two waiting", async || {
        inspect(gw, &chat).await.is_ok_and(|s| s.queued == 2)
    })
    .await;
    calls
}

async fn inspect(gw: &TestGateway, chat: &str) -> Result<ChatState, tonic::Status> {
    ReplyAdminClient::new(gw.channel.clone())
        .inspect_chat(InspectChatRequest {
            chat_id: chat.into(),
        })
        .await
        .map(|r| r.into_inner())
}

fn assert_held_by_the_chat(s: &ChatState, chat: &str, source: &str) {
    assert_eq!(s.source, source, "{s:?}");
    assert_eq!(s.held_by, "chat", "{s:?}");
    assert!(s.frees_in_ms > 0 && s.frees_in_ms <= 60_005, "{s:?}");
    let q = s
        .quotas
        .iter()
        .find(|q| q.kind == "chat")
        .expect("the chat quota");
    assert_eq!((q.id.as_str(), q.limit, q.used), (chat, 5, 5), "{s:?}");
    assert!(s.quotas.iter().any(|q| q.kind == "app:1000ms"), "{s:?}");
    // The two waiting: one at the head, timed to the chat's window.
    assert_eq!(s.queued, 2, "{s:?}");
    assert!(s.head_age_ms > 0, "{s:?}");
    assert!(s.next_try_in_ms >= 0 || source == "redis", "{s:?}");
}

#[tokio::test]
async fn a_waiting_chat_names_its_quota_on_a_single_node_and_on_the_command_line() {
    let fake = spawn_fake(FakeOptions::default()).await;
    let gw = spawn_gateway_on(fake.clone(), config_for(&fake, SLOW_CHAT)).await;
    let calls = fill(&gw, "wait").await;
    let s = inspect(&gw, "oc_wait").await.unwrap();
    assert_held_by_the_chat(&s, "oc_wait", "local");
    // The same through the CLI.
    // (On a blocking thread: the gateway runs on this test's runtime and must answer.)
    let addr = format!("http://{}", gw.grpc_addr);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_feishu-reply-gateway"))
            .args(["inspect", "chat", "oc_wait", "--addr", &addr])
            .env_remove("GATEWAY_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["held_by"], "chat", "{stdout}");
    // A chat nobody wrote to: nothing queued, nothing holds it.
    let idle = inspect(&gw, "oc_idle").await.unwrap();
    assert_eq!((idle.queued, idle.held_by.as_str()), (0, ""), "{idle:?}");
    for c in calls {
        c.abort();
    }
}

/// A gateway with `extra` in cluster mode on the Redis at `url` (keys of its own).
async fn clustered(extra: &str, url: &str) -> TestGateway {
    let fake = spawn_fake(FakeOptions::default()).await;
    let prefix = format!("inspect-{}-{:x}", std::process::id(), rand::random::<u32>());
    let config = config_for(
        &fake,
        &format!("{extra}{}", common::cluster_section(url, &prefix)),
    );
    spawn_gateway_on(fake, config).await
}

#[tokio::test]
async fn in_cluster_mode_the_counts_come_from_redis() {
    let (url, _redis) = shared_redis();
    let gw = clustered(SLOW_CHAT, &url).await;
    let calls = fill(&gw, "shared").await;
    let s = inspect(&gw, "oc_shared").await.unwrap();
    assert_held_by_the_chat(&s, "oc_shared", "redis");
    for c in calls {
        c.abort();
    }
}

#[tokio::test]
async fn only_admin_callers_may_inspect() {
    let fake = spawn_fake(FakeOptions::default()).await;
    let (ops, bot) = ("ops-token-0123456789abcdef", "bot-token-0123456789abcdef");
    let config = config_for(
        &fake,
        &format!(
            "[callers.ops]\ntoken_sha256 = \"{}\"\napps = [\"*\"]\nadmin = true\n\
             [callers.bot]\ntoken_sha256 = \"{}\"\napps = [\"*\"]\n",
            token_sha256(ops),
            token_sha256(bot)
        ),
    );
    let gw = spawn_gateway_on(fake.clone(), config).await;
    let ask = async |token: Option<&str>| {
        let mut req = tonic::Request::new(InspectChatRequest {
            chat_id: "oc_x".into(),
        });
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        ReplyAdminClient::new(gw.channel.clone())
            .inspect_chat(req)
            .await
    };
    ask(Some(ops)).await.unwrap();
    let e = ask(Some(bot)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(e.get_details_error_info().unwrap().reason, "NOT_ADMIN");
    let e = ask(None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
}

/// An app of its own: 3 replies a minute, a budget of 50 calls a day.
const METERED: &str = "[apps.metered]\napp_id = \"cli_metered\"\napp_secret = \"s\"\n\
                       quotas = [{ limit = 3, window_ms = 60000 }]\n\
                       [apps.metered.budget]\ncalls = 50\nperiod = \"day\"\n";

/// 5 replies of the metered app to 5 chats (calls left running) sent with `token`: 3 go, 2
/// wait for the app's minute window.
async fn fill_app(gw: &TestGateway, token: Option<&str>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut calls = Vec::new();
    for i in 0..5 {
        let mut c = gw.client.clone();
        let mut req = tonic::Request::new(ReplyRequest {
            app: "metered".into(),
            ..text(&format!("om_m{i}"), &format!("oc_m{i}"), "m")
        });
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        calls.push(tokio::spawn(async move {
            let _ = c.reply(req).await;
        }));
    }
    eventually("three posted", async || gw.fake.received().len() >= 3).await;
    calls
}

async fn inspect_app(
    gw: &TestGateway,
    app: &str,
    token: Option<&str>,
) -> Result<AppState, tonic::Status> {
    let mut req = tonic::Request::new(InspectAppRequest { app: app.into() });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    ReplyAdminClient::new(gw.channel.clone())
        .inspect_app(req)
        .await
        .map(|r| r.into_inner())
}

/// The metered app after [`fill_app`]: its window full and holding two, 4 calls of its budget
/// spent (a token and 3 replies).
async fn assert_metered(gw: &TestGateway, source: &str, token: Option<&str>) {
    let mut a = AppState::default();
    eventually("two waiting for the app", async || {
        a = inspect_app(gw, "metered", token).await.unwrap();
        a.queued == 2
    })
    .await;
    assert_eq!(
        (a.app.as_str(), a.app_id.as_str()),
        ("metered", "cli_metered")
    );
    assert_eq!(a.source, source, "{a:?}");
    // Its own list, once per API (each API has its own windows): the replies' are full.
    let ids: Vec<&str> = a.quotas.iter().map(|q| q.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "cli_metered",
            "cli_metered/send",
            "cli_metered/update_card",
            "cli_metered/edit",
            "cli_metered/recall",
            "cli_metered/card_create",
            "cli_metered/card_content",
            "cli_metered/card_settings"
        ],
        "{a:?}"
    );
    assert!(a.quotas.iter().all(|q| q.kind == "app:60000ms"), "{a:?}");
    assert!(a.quotas[1..].iter().all(|q| q.used == 0), "{a:?}");
    let q = &a.quotas[0];
    assert_eq!((q.used, q.limit), (3, 3), "{a:?}");
    assert!(q.frees_in_ms > 0 && q.frees_in_ms <= 60_005, "{a:?}");
    let b = a.budget.expect("a budget");
    assert_eq!((b.calls, b.used, b.remaining), (50, 4, 46), "{b:?}");
    assert_eq!(
        (b.period.as_str(), b.time_zone.as_str()),
        ("day", "Asia/Shanghai")
    );
    assert!(b.resets_in_ms > 0 && b.resets_in_ms <= 86_400_000, "{b:?}");
}

#[tokio::test]
async fn an_app_shows_its_windows_budget_and_queue() {
    let fake = spawn_fake(FakeOptions::default()).await;
    let gw = spawn_gateway_on(fake.clone(), config_for(&fake, METERED)).await;
    let calls = fill_app(&gw, None).await;
    assert_metered(&gw, "local", None).await;
    // The default app has no budget and nothing queued.
    let d = inspect_app(&gw, "default", None).await.unwrap();
    assert_eq!((d.queued, &d.budget), (0, &None), "{d:?}");
    for name in ["nope", ""] {
        let e = inspect_app(&gw, name, None).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{name:?}: {e:?}");
        assert_eq!(e.get_details_error_info().unwrap().reason, "UNKNOWN_APP");
    }
    for c in calls {
        c.abort();
    }
}

#[tokio::test]
async fn in_cluster_mode_an_app_s_counts_and_budget_come_from_redis() {
    let (url, _redis) = shared_redis();
    let gw = clustered(METERED, &url).await;
    let calls = fill_app(&gw, None).await;
    assert_metered(&gw, "redis", None).await;
    for c in calls {
        c.abort();
    }
}

#[tokio::test]
async fn a_caller_shows_its_rate_and_queue_share() {
    let fake = spawn_fake(FakeOptions::default()).await;
    let (ops, bot) = ("ops-token-0123456789abcdef", "bot-token-0123456789abcdef");
    let config = config_for(
        &fake,
        &format!(
            "{METERED}[callers.ops]\ntoken_sha256 = \"{}\"\napps = [\"*\"]\nadmin = true\n\
             [callers.bot]\ntoken_sha256 = \"{}\"\napps = [\"metered\"]\nrate = 40\n\
             burst = 60\nmax_queued = 7\n",
            token_sha256(ops),
            token_sha256(bot)
        ),
    );
    let gw = spawn_gateway_on(fake.clone(), config).await;
    let calls = fill_app(&gw, Some(bot)).await;
    assert_metered(&gw, "local", Some(ops)).await;
    let ask = async |name: &str| {
        let mut req = tonic::Request::new(InspectCallerRequest {
            caller: name.into(),
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {ops}").parse().unwrap());
        ReplyAdminClient::new(gw.channel.clone())
            .inspect_caller(req)
            .await
            .map(|r| r.into_inner())
    };
    let c = ask("bot").await.unwrap();
    assert_eq!(
        (c.rate, c.burst, c.max_queued, c.queued),
        (40, 60, 7, 2),
        "{c:?}"
    );
    assert!(
        c.queued_bytes > 0 && c.queued_bytes <= c.max_queued_bytes,
        "{c:?}"
    );
    assert_eq!((c.apps, c.admin), (vec!["metered".to_owned()], false));
    let o = ask("ops").await.unwrap();
    assert_eq!((o.queued, o.apps.len(), o.admin), (0, 0, true), "{o:?}");
    let e = ask("nobody").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(e.get_details_error_info().unwrap().reason, "UNKNOWN_CALLER");
    // The CLI's `inspect caller`.
    let addr = format!("http://{}", gw.grpc_addr);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_feishu-reply-gateway"))
            .args(["inspect", "caller", "bot", "--addr", &addr, "--token", ops])
            .env_remove("GATEWAY_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (v["queued"].as_u64(), v["max_queued"].as_u64()),
        (Some(2), Some(7)),
        "{stdout}"
    );
    for c in calls {
        c.abort();
    }
}
