//! No secret leaves the process: the fault scenarios that touch secrets are run with every log
//! line captured (trace level) and every status message and error detail collected, and none
//! may contain an app secret, a tenant_access_token, a caller's token or the Redis password.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config_for, spawn_fake, spawn_gateway_on, text};
use feishu_reply_gateway::config::Config;
use feishu_reply_gateway::fake_feishu::FakeOptions;
use tonic_types::StatusExt;

const APP_SECRET: &str = "appsecret-Zq81mVx0";
const WRONG_SECRET: &str = "wrongsecret-Pk27aQ";
const CALLER_TOKEN: &str = "callertoken-Hy63nWb5e";
const GUESSED_TOKEN: &str = "guessedtoken-Ux90rTc";
const REDIS_PASSWORD: &str = "redispw-Lm44sDe";
const LEAKED_TENANT_TOKEN: &str = "t-LEAKME-Qw55";

/// Everything the process logs, at every level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn status_text(s: &tonic::Status) -> String {
    let mut out = format!("{:?} {}", s.code(), s.message());
    let d = s.get_error_details();
    if let Some(info) = d.error_info() {
        out.push_str(&format!(" {} {:?}", info.reason, info.metadata));
    }
    if let Some(b) = d.bad_request() {
        out.push_str(&format!(" {:?}", b.field_violations));
    }
    out
}

#[tokio::test]
async fn no_secret_reaches_a_log_line_or_a_status() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let mut seen = Vec::new();

    // 1. Normal traffic, a caller's token, a guessed token, an app whose secret is refused.
    let fake = spawn_fake(FakeOptions {
        apps: vec![("cli_test".into(), APP_SECRET.into())],
        ..FakeOptions::default()
    })
    .await;
    let mut config = config_for(
        &fake,
        &format!(
            r#"
            [apps.wrong]
            app_id = "cli_wrong"
            app_secret = "{WRONG_SECRET}"
            [callers.bot]
            token_sha256 = "{}"
            apps = ["*"]
            "#,
            common::token_sha256(CALLER_TOKEN)
        ),
    );
    config.apps[0].app_secret = APP_SECRET.into();
    seen.push(format!("{config:?}"));
    let gw = spawn_gateway_on(fake, config).await;
    let call = |req, token: &str| {
        let mut r = tonic::Request::new(req);
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let mut c = gw.client.clone();
        async move { c.reply(r).await }
    };
    call(text("om_s1", "oc_s", "x"), CALLER_TOKEN)
        .await
        .unwrap();
    let s = call(text("om_s2", "oc_s", "x"), GUESSED_TOKEN)
        .await
        .unwrap_err();
    seen.push(status_text(&s));
    let wrong = feishu_reply_gateway::proto::ReplyRequest {
        app: "wrong".into(),
        ..text("om_s3", "oc_s", "x")
    };
    let s = call(wrong, CALLER_TOKEN).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    seen.push(status_text(&s));

    // 2. The token endpoint answers with a body of an unexpected shape holding a token.
    gw.fake.set_options(|o| {
        o.token_body = Some(format!(
            r#"{{"code":0,"msg":"ok","tenant_access_token":"{LEAKED_TENANT_TOKEN}","expire":"soon"}}"#
        ))
    });
    gw.fake.revoke_tokens();
    let s = call(text("om_s4", "oc_s", "x"), CALLER_TOKEN)
        .await
        .unwrap_err();
    seen.push(status_text(&s));
    // ... and with an absurd lifetime (it used to panic).
    gw.fake.set_options(|o| {
        o.token_body = Some(format!(
            r#"{{"code":0,"msg":"ok","tenant_access_token":"{LEAKED_TENANT_TOKEN}","expire":18446744073709551615}}"#
        ))
    });
    gw.fake.revoke_tokens();
    let _ = call(text("om_s5", "oc_s", "x"), CALLER_TOKEN).await;

    // 3. A config file with a syntax error on a secret's line.
    let bad = format!("[apps.a]\napp_id = \"cli_a\"\napp_secret = \"{APP_SECRET}\" oops\n");
    seen.push(Config::from_toml(&bad).unwrap_err().to_string());
    let bad = format!("[apps.a]\napp_id = \"cli_a\"\napp_secret = {{ x = \"{APP_SECRET}\" }}\n");
    seen.push(Config::from_toml(&bad).unwrap_err().to_string());

    seen.push(gw.http_get("/metrics").await.1);

    // 4. Cluster mode with a Redis that cannot be reached: its errors are logged.
    let fake = spawn_fake(FakeOptions::default()).await;
    let config = config_for(
        &fake,
        &format!(
            "[cluster]\nredis_url = \"redis://:{REDIS_PASSWORD}@127.0.0.1:1\"\nredis_timeout_ms = 50"
        ),
    );
    seen.push(format!("{config:?}"));
    let redis_gw = spawn_gateway_on(fake, config).await;
    let down = "feishu_reply_redis_fallback";
    assert!(
        common::wait_for_metric(&redis_gw, down, 1.0, Duration::from_secs(20)).await,
        "the replica notices Redis is down"
    );
    tokio::time::sleep(Duration::from_millis(600)).await; // a few more failed heartbeats
    seen.push(redis_gw.http_get("/metrics").await.1);

    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(logs.contains("om_s1"), "the capture works: {logs:.2000}");
    let tenant_tokens_issued = "t-fake";
    for secret in [
        APP_SECRET,
        WRONG_SECRET,
        CALLER_TOKEN,
        GUESSED_TOKEN,
        REDIS_PASSWORD,
        LEAKED_TENANT_TOKEN,
        tenant_tokens_issued,
    ] {
        for line in logs.lines() {
            assert!(!line.contains(secret), "log line holds {secret:?}: {line}");
        }
        for s in &seen {
            assert!(!s.contains(secret), "status/error holds {secret:?}: {s}");
        }
    }
}
