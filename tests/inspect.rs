//! Introspection (issue 11): `InspectChat` (and `inspect chat` on the command line) names the
//! quota that holds a waiting chat and when it frees, from this process's counts on a single
//! node and from Redis's shared counts in cluster mode; only admin callers may ask.

mod common;

use common::{
    TestGateway, config_for, eventually, shared_redis, spawn_fake, spawn_gateway_on, text,
    token_sha256,
};
use feishu_reply_gateway::fake_feishu::FakeOptions;
use feishu_reply_gateway::proto::reply_admin_client::ReplyAdminClient;
use feishu_reply_gateway::proto::{ChatState, InspectChatRequest};
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

#[tokio::test]
async fn in_cluster_mode_the_counts_come_from_redis() {
    let (url, _redis) = shared_redis();
    let fake = spawn_fake(FakeOptions::default()).await;
    let prefix = format!("inspect-{}-{:x}", std::process::id(), rand::random::<u32>());
    let config = config_for(
        &fake,
        &format!("{SLOW_CHAT}[cluster]\nredis_url = \"{url}\"\nkey_prefix = \"{prefix}\"\n"),
    );
    let gw = spawn_gateway_on(fake.clone(), config).await;
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
