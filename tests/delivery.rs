//! Delivery over real gRPC and HTTP against the fake Feishu in `sliding` mode: pacing, order,
//! fairness, each retry class, deadlines and the shutdown drain. These run in real time, so
//! they are few and assert on what the fake recorded, never on wall-clock durations.

mod common;

use std::time::{Duration, Instant};

use common::{max_in_window, metric, spawn_gateway, spawn_gateway_with, text};
use feishu_reply_gateway::fake_feishu::{FakeOptions, Fault};
use tonic::Code;
use tonic_types::StatusExt;

fn fault(message_id: &str, http: u16, code: i64, times: u32) -> Fault {
    Fault {
        message_id: Some(message_id.into()),
        http,
        code,
        times,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_cold_and_jittery_connections_gets_no_rejection() {
    // Three windows of the app's 50/s over the real HTTP client: each connection's first
    // request arrives 80 ms late (a TLS handshake), every request up to 20 ms late. The
    // 1000-reply drain and its ratio to the physical limit are proven in virtual time
    // (tests/pacing.rs) and measured in BENCHMARKS.md.
    let gw = spawn_gateway(
        FakeOptions {
            cold_connection: Duration::from_millis(80),
            inbound_jitter: Duration::from_millis(20),
            ..FakeOptions::default()
        },
        "",
    )
    .await;
    // From cold: the concurrent callers share one token fetch.
    let calls: Vec<_> = (0..150)
        .map(|i| {
            let mut c = gw.client.clone();
            tokio::spawn(async move {
                c.reply(text(&format!("om_b{i}"), &format!("oc_b{i}"), "burst"))
                    .await
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap().expect("every reply delivered");
    }
    let stats = gw.fake.stats();
    assert_eq!(stats.rate_rejections(), 0, "{stats:?}");
    assert_eq!(stats.posted, 150);
    assert_eq!(stats.token_requests, 1);
    let times: Vec<f64> = gw.fake.received().iter().map(|r| r.at_ms).collect();
    assert!(max_in_window(&times, 1000.0) <= 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_within_a_chat_is_kept_through_retries() {
    // o0 is posted at once but answered only when the test says so: its chat stays busy, so
    // every later reply queues behind it and the queued gauge says exactly when each call has
    // been accepted. Concurrent calls have no order of their own (README); this makes the
    // acceptance order the loop order however loaded the machine is. (The request timeout is
    // long so that o0 is not retried while held.)
    let gw = spawn_gateway_with(FakeOptions::default(), |f| {
        let mut c = common::config_for(f, "");
        c.feishu.request_timeout = Duration::from_secs(60);
        c
    })
    .await;
    gw.fake.push_fault(Fault {
        message_id: Some("om_o0".into()),
        http: 200,
        hold: true,
        times: 1,
        ..Default::default()
    });
    gw.fake.push_fault(fault("om_o2", 400, 230049, 2));
    gw.fake.push_fault(fault("om_o4", 503, 1, 1));
    let submit = |i: usize| {
        let mut c = gw.client.clone();
        tokio::spawn(async move { c.reply(text(&format!("om_o{i}"), "oc_order", "x")).await })
    };
    let mut calls = vec![submit(0)];
    let t = Instant::now();
    while !gw.fake.received().iter().any(|r| r.message_id == "om_o0") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "om_o0 never reached the fake"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for i in 1..9 {
        calls.push(submit(i));
        let t = Instant::now();
        while metric(&gw.http_get("/metrics").await.1, "feishu_reply_queued") != Some(i as f64) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "call {i} was not queued behind om_o0"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert!(
        gw.fake.received().iter().all(|r| r.message_id == "om_o0"),
        "nothing may overtake the reply in flight"
    );
    gw.fake.release_held();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let posted: Vec<String> = gw
        .fake
        .received()
        .into_iter()
        .filter(|r| r.code == 0 && !r.deduped)
        .map(|r| r.message_id)
        .collect();
    let want: Vec<String> = (0..9).map(|i| format!("om_o{i}")).collect();
    assert_eq!(posted, want);
    let o2 = gw
        .fake
        .received()
        .iter()
        .filter(|r| r.message_id == "om_o2")
        .count();
    assert_eq!(o2, 3, "om_o2 is retried twice after 230049");
    assert_eq!(gw.fake.stats().rate_rejections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_chat_does_not_delay_other_chats() {
    // A 3 s chat window (the fake counts 5/s, which this satisfies): the cold replies have
    // ~2.9 s to get through before the hot chat could send again, not ~0.9 s, so a loaded
    // machine cannot turn this into a race.
    let gw = spawn_gateway(
        FakeOptions::default(),
        "[quotas]\nchat = { limit = 5, window_ms = 3000 }",
    )
    .await;
    let hot: Vec<_> = (0..10)
        .map(|i| {
            let mut c = gw.client.clone();
            tokio::spawn(async move {
                c.reply(text(&format!("om_h{i}_in_hot"), "oc_hot", "x"))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cold: Vec<_> = (0..10)
        .map(|i| gw.reply(text(&format!("om_c{i}"), &format!("oc_c{i}"), "x")))
        .collect();
    for r in futures_util::future::join_all(cold).await {
        r.unwrap();
    }
    // All cold replies reached Feishu before the hot chat's second window opened.
    let hot_seen = gw
        .fake
        .received()
        .iter()
        .filter(|r| r.chat_id == "oc_hot")
        .count();
    assert!(
        hot_seen <= 5,
        "cold chats waited for the hot one ({hot_seen} hot sends first)"
    );
    for h in hot {
        h.await.unwrap().unwrap();
    }
    let times: Vec<f64> = gw
        .fake
        .received()
        .iter()
        .filter(|r| r.chat_id == "oc_hot")
        .map(|r| r.at_ms)
        .collect();
    assert_eq!(times.len(), 10);
    assert!(max_in_window(&times, 3000.0) <= 5);
    assert_eq!(gw.fake.stats().rate_rejections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_retry_class_is_retried_with_the_same_uuid() {
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    let cases = [
        (
            "om_r230020",
            Fault {
                ..fault("om_r230020", 400, 230020, 1)
            },
            "rate_limited_230020",
        ),
        (
            "om_r230049",
            fault("om_r230049", 400, 230049, 1),
            "being_sent_230049",
        ),
        (
            "om_r429",
            Fault {
                reset_s: Some(1),
                ..fault("om_r429", 429, 99991400, 1)
            },
            "frequency_limit_429",
        ),
        ("om_r503", fault("om_r503", 503, 1, 1), "server_error_5xx"),
        (
            "om_r11232",
            fault("om_r11232", 400, 11232, 1),
            "message_service_11232",
        ),
        (
            "om_r11233",
            fault("om_r11233", 400, 11233, 1),
            "message_service_11232",
        ),
        (
            "om_r11247",
            fault("om_r11247", 400, 11247, 1),
            "message_service_11232",
        ),
        (
            "om_r502html",
            Fault {
                html: true,
                ..fault("om_r502html", 502, 0, 1)
            },
            "server_error_5xx",
        ),
    ];
    for (id, f, _) in &cases {
        gw.fake.push_fault(f.clone());
        let r = gw.reply(text(id, &format!("oc_{id}"), "x")).await.unwrap();
        assert_eq!(r.attempts, 2, "{id}");
        let seen: Vec<_> = gw
            .fake
            .received()
            .into_iter()
            .filter(|x| x.message_id == *id)
            .collect();
        assert_eq!(seen.len(), 2, "{id}");
        assert!(
            seen.iter().all(|x| x.uuid == r.uuid),
            "{id}: one uuid across attempts"
        );
        if *id == "om_r429" {
            assert!(
                seen[1].at_ms - seen[0].at_ms >= 1000.0,
                "x-ogw-ratelimit-reset honoured"
            );
        }
    }
    let (_, metrics) = gw.http_get("/metrics").await;
    for (reason, n) in [
        ("rate_limited_230020", 1),
        ("being_sent_230049", 1),
        ("frequency_limit_429", 1),
        ("server_error_5xx", 2),
        ("message_service_11232", 3),
    ] {
        let series = format!("feishu_reply_retries_total{{reason=\"{reason}\"}}");
        assert_eq!(
            metric(&metrics, &series),
            Some(n as f64),
            "{series} in\n{metrics}"
        );
    }
    for reason in ["rate_limited_230020", "frequency_limit_429"] {
        let series = format!(
            "feishu_reply_upstream_rate_rejections_total{{app=\"default\",reason=\"{reason}\"}}"
        );
        assert_eq!(
            metric(&metrics, &series),
            Some(1.0),
            "{series} in\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_exhausted_is_unavailable_with_retry_info() {
    let gw = spawn_gateway_with(FakeOptions::default(), |f| {
        let mut c = common::config_for(f, "");
        c.retry.max_attempts = 3;
        c
    })
    .await;
    gw.fake.push_fault(fault("om_x", 400, 230049, 10));
    let s = gw.reply(text("om_x", "oc_x", "x")).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    let info = s.get_details_error_info().unwrap();
    assert_eq!(info.reason, "FEISHU_230049");
    assert_eq!(info.metadata["attempts"], "3");
    assert!(s.get_details_retry_info().is_some());
    assert_eq!(gw.fake.stats().posted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_whose_deadline_passes_in_the_queue_is_never_sent() {
    // Fail queued replies 200 ms before their deadline (default 20 ms), so that on a loaded
    // machine the gateway's answer beats the client's own timer (CANCELLED).
    let gw = spawn_gateway(FakeOptions::default(), "[queue]\nmin_send_budget_ms = 200").await;
    // The head of the chat meets a 503 asking to wait 2 s: the chat waits behind it.
    gw.fake.push_fault(Fault {
        reset_s: Some(2),
        ..fault("om_head", 503, 1, 1)
    });
    let head = {
        let mut c = gw.client.clone();
        tokio::spawn(async move { c.reply(text("om_head", "oc_d", "x")).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = gw
        .reply_with_timeout(text("om_late", "oc_d", "x"), Duration::from_millis(800))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::DeadlineExceeded, "{}", s.message());
    assert_eq!(
        s.get_details_error_info().unwrap().reason,
        "DEADLINE_BEFORE_SEND"
    );
    assert_eq!(head.await.unwrap().unwrap().into_inner().attempts, 2);
    // The chat moved on after the head; om_late never went out.
    gw.reply(text("om_after", "oc_d", "x")).await.unwrap();
    assert!(gw.fake.received().iter().all(|r| r.message_id != "om_late"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_for_the_grace_period_then_fails_the_rest() {
    let mut gw = spawn_gateway(FakeOptions::default(), "[server]\nshutdown_grace_ms = 1500").await;
    gw.reply(text("om_warm", "oc_warm", "x")).await.unwrap();
    // 20 replies to one chat need ~4 s at 5/s; the grace period is 1.5 s.
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let mut c = gw.client.clone();
            tokio::spawn(async move { c.reply(text(&format!("om_s{i}_in_s"), "oc_s", "x")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let task = gw.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gw.http_get("/readyz").await.0, 503);
    let (mut ok, mut unavailable) = (0, 0);
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
                assert_eq!(s.get_details_error_info().unwrap().reason, "SHUTTING_DOWN");
                unavailable += 1;
            }
        }
    }
    assert_eq!(ok + unavailable, 20);
    assert!(
        (5..20).contains(&ok),
        "{ok} delivered during the grace period"
    );
    let posted = gw
        .fake
        .received()
        .iter()
        .filter(|r| r.chat_id == "oc_s" && r.code == 0)
        .count();
    assert_eq!(
        posted, ok,
        "OK only for what Feishu accepted; nothing else sent"
    );
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("gateway exits")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_monthly_quota_stops_the_app_s_calls_until_the_month_ends() {
    // 99991403 ("this month's API call quota has been exceeded") can come as HTTP 429: it
    // was retried as a frequency limit. It is final, and the app's next calls fail at once.
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    gw.fake.push_fault(fault("om_q1", 429, 99991403, 1));
    let e = gw.reply(text("om_q1", "oc_q1", "x")).await.unwrap_err();
    let spent = |e: &tonic::Status| {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        let info = e.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "APP_BUDGET_SPENT", "{e:?}");
        assert_eq!(info.metadata["app"], "default");
        assert_eq!(info.metadata["feishu_code"], "99991403");
        let wait = e.get_details_retry_info().expect("RetryInfo").retry_delay;
        // Until the 1st of the next month, China time: at most 31 days.
        let wait = wait.expect("a delay");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(31 * 86_400),
            "{wait:?}"
        );
        info
    };
    let info = spent(&e);
    assert_eq!(info.metadata["attempts"], "1", "not retried");
    assert_eq!(gw.fake.received().len(), 1);
    // The next reply of the app fails without a Feishu call.
    let e = gw.reply(text("om_q2", "oc_q2", "y")).await.unwrap_err();
    spent(&e);
    assert_eq!(
        gw.fake.received().len(),
        1,
        "no call while the quota is spent"
    );
    let (_, metrics) = gw.http_get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "feishu_reply_app_month_quota_spent{app=\"default\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recalled_message_is_remembered_and_later_replies_to_it_fail_without_a_call() {
    let gw = spawn_gateway(FakeOptions::default(), "").await;
    let calls_to = |id: &str| {
        gw.fake
            .received()
            .iter()
            .filter(|r| r.message_id == id)
            .count()
    };
    let reason = |e: &tonic::Status| {
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        e.get_details_error_info().expect("ErrorInfo").reason
    };
    // Recalled (230011): Feishu's answer first, then the gateway's memory.
    gw.fake.push_fault(fault("om_gone", 400, 230011, 100));
    let e = gw.reply(text("om_gone", "oc_g", "a")).await.unwrap_err();
    assert_eq!(reason(&e), "FEISHU_230011");
    let e = gw.reply(text("om_gone", "oc_g", "b")).await.unwrap_err();
    assert_eq!(reason(&e), "MESSAGE_GONE");
    let info = e.get_details_error_info().unwrap();
    assert_eq!(info.metadata["message_id"], "om_gone");
    assert_eq!(
        calls_to("om_gone"),
        1,
        "the second reply asked Feishu again"
    );

    // Deleted (231003) while more replies to it wait in the chat: one call in all.
    gw.fake.push_fault(fault("om_gone2", 400, 231003, 100));
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let mut c = gw.client.clone();
            let req = text("om_gone2", "oc_g2", &format!("r{i}"));
            tokio::spawn(async move { c.reply(req).await })
        })
        .collect();
    let mut reasons = Vec::new();
    for c in calls {
        reasons.push(reason(&c.await.unwrap().unwrap_err()));
    }
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "FEISHU_231003",
            "MESSAGE_GONE",
            "MESSAGE_GONE",
            "MESSAGE_GONE"
        ]
    );
    assert_eq!(calls_to("om_gone2"), 1);
}
