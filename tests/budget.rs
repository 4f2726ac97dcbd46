//! Per-app quotas and calendar call budgets (issue 11): an app's own quota list paces it and
//! only it; a budget counts every Feishu call made for the app (token, reply, lookup), shared
//! by the replicas through Redis, and once spent, replies fail fast with RESOURCE_EXHAUSTED
//! `APP_BUDGET_SPENT` and the time until the period resets, without reaching Feishu.

mod common;

use std::time::Duration;

use common::{config_for, max_in_window, metric, shared_redis, spawn_fake, spawn_gateway_on, text};
use feishu_reply_gateway::config::Config;
use feishu_reply_gateway::fake_feishu::{FakeFeishu, FakeOptions};
use tonic::Code;
use tonic_types::StatusExt;

const DAY: Duration = Duration::from_secs(86_400);

/// Feishu calls the fake has seen (one app in these tests).
fn calls(fake: &FakeFeishu) -> u64 {
    let s = fake.stats();
    s.token_requests + s.reply_requests + s.message_lookups
}

/// A refusal for a spent budget: the code, the reason, and a RetryInfo within `period`.
fn assert_budget_spent(e: &tonic::Status, period: Duration) {
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let info = e.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "APP_BUDGET_SPENT", "{e:?}");
    assert_eq!(
        info.metadata.get("app").map(String::as_str),
        Some("default")
    );
    let retry = e.get_details_retry_info().expect("RetryInfo");
    let wait = retry.retry_delay.expect("a delay");
    assert!(wait > Duration::ZERO && wait <= period, "{wait:?}");
}

#[tokio::test]
async fn three_replicas_share_a_daily_budget_and_make_no_call_past_it() {
    let (url, _redis) = shared_redis();
    let fake = spawn_fake(FakeOptions::default()).await;
    let prefix = format!("budget-{}-{:x}", std::process::id(), rand::random::<u32>());
    let config = || -> Config {
        config_for(
            &fake,
            &format!(
                "[apps.default.budget]\ncalls = 100\nperiod = \"day\"\n\
                 {}redis_timeout_ms = 250\n",
                common::cluster_section(&url, &prefix)
            ),
        )
    };
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(spawn_gateway_on(fake.clone(), config()).await);
    }
    let (mut ok, mut refused) = (0, 0);
    for i in 0..130 {
        let gw = &replicas[i % 3];
        match gw
            .reply(text(&format!("om_b{i}"), &format!("oc_b{i}"), "b"))
            .await
        {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_budget_spent(&e, DAY);
                refused += 1;
            }
        }
    }
    let s = fake.stats();
    assert_eq!(calls(&fake), 100, "{s:?}");
    assert_eq!(ok, 100 - s.token_requests, "{s:?}");
    assert_eq!(refused, 130 - ok);
    // Spent: every replica refuses at its door now, and nothing reaches Feishu.
    for gw in &replicas {
        let e = gw
            .reply(text("om_late", "oc_late", "late"))
            .await
            .unwrap_err();
        assert_budget_spent(&e, DAY);
    }
    assert_eq!(calls(&fake), 100);
    let m = replicas[0].http_get("/metrics").await.1;
    assert_eq!(
        metric(&m, "feishu_reply_app_budget_remaining{app=\"default\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "feishu_reply_app_budget_calls{app=\"default\"}"),
        Some(100.0)
    );
}

#[tokio::test]
async fn a_single_gateway_counts_token_replies_and_lookups_against_the_budget() {
    let fake = spawn_fake(FakeOptions::default()).await;
    let config = config_for(
        &fake,
        "[apps.default.budget]\ncalls = 5\nperiod = \"month\"\ntime_zone = \"Asia/Shanghai\"\n",
    );
    let gw = spawn_gateway_on(fake.clone(), config).await;
    // A token, a reply, a lookup (no chat given) and its reply: 5 calls, then none.
    gw.reply(text("om_s1", "oc_s", "1")).await.unwrap();
    gw.reply(text("om_s2", "", "2")).await.unwrap();
    assert_eq!(calls(&gw.fake), 4);
    gw.reply(text("om_s3", "oc_s", "3")).await.unwrap();
    let e = gw.reply(text("om_s4", "oc_s", "4")).await.unwrap_err();
    assert_budget_spent(&e, 31 * DAY);
    assert_eq!(calls(&gw.fake), 5);
    let m = gw.http_get("/metrics").await.1;
    assert_eq!(
        metric(&m, "feishu_reply_app_budget_used{app=\"default\"}"),
        Some(5.0),
        "{m}"
    );
    assert!(
        metric(
            &m,
            "feishu_reply_app_budget_refusals_total{app=\"default\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn an_app_with_its_own_quota_is_paced_by_it_and_the_others_are_not() {
    let fake = spawn_fake(FakeOptions::default()).await;
    let config = config_for(
        &fake,
        "[apps.slow]\napp_id = \"cli_slow\"\napp_secret = \"s\"\n\
         quotas = [{ limit = 2, window_ms = 1000 }]\n",
    );
    let gw = spawn_gateway_on(fake.clone(), config).await;
    let mut calls = Vec::new();
    for i in 0..6 {
        for app in ["slow", "default"] {
            let mut req = text(&format!("om_{app}{i}"), &format!("oc_{app}{i}"), "q");
            req.app = app.into();
            let gw_client = gw.client.clone();
            calls.push(tokio::spawn(async move {
                gw_client.clone().reply(req).await.map(|_| ())
            }));
        }
    }
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let arrivals = |app_id: &str| -> Vec<f64> {
        fake.received()
            .iter()
            .filter(|r| r.app_id == app_id && r.code == 0)
            .map(|r| r.at_ms)
            .collect()
    };
    let slow = arrivals("cli_slow");
    let default = arrivals(common::APP_ID);
    assert_eq!((slow.len(), default.len()), (6, 6));
    // 2 per second for the slow app, in any window of a second (its margin included)…
    assert!(max_in_window(&slow, 1000.0) <= 2, "{slow:?}");
    // …while the other app's six went together, under the default 50/s.
    assert_eq!(max_in_window(&default, 1000.0), 6, "{default:?}");
    assert_eq!(fake.stats().rate_rejections(), 0);
}
