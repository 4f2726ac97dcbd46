//! Async jobs (issue 10, single node): SubmitReply answers once the job is stored, the job is
//! delivered once, GetReply/WatchReply show it, CancelReply stops it before its send, and a
//! gateway killed with SIGKILL delivers every stored job exactly once after its restart.

mod common;

use std::time::{Duration, Instant};

use common::{
    ServeProcess, config_for, connect, eventually, free_port, get_job, received_ids, spawn_fake,
    spawn_gateway_on, text,
};
use feishu_reply_gateway::fake_feishu::{FakeOptions, Fault};
use feishu_reply_gateway::proto::{GetReplyRequest, JobState, ReplyRequest};
use tonic::Code;

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "gw-jobs-{name}-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A config file in `dir` for `serve`: app `app_id` on `fake`, anonymous callers, the job
/// store in `dir/data`.
fn serve_config(
    fake: &feishu_reply_gateway::fake_feishu::FakeFeishu,
    dir: &std::path::Path,
    app_id: &str,
) -> std::path::PathBuf {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[feishu]\nbase_url = \"{}\"\n[apps.default]\napp_id = \"{app_id}\"\napp_secret = \"s\"\n\
             [server]\nshutdown_grace_ms = 100\n\
             [auth]\nallow_anonymous = true\n[jobs]\ndata_dir = \"{}\"\n",
            fake.base_url(),
            dir.join("data").display()
        ),
    )
    .unwrap();
    config
}

#[tokio::test]
async fn submitted_jobs_are_delivered_once_and_readable() {
    let fake = spawn_fake(FakeOptions::default()).await;
    let dir = temp_dir("basic");
    let mut config = config_for(&fake, "");
    config.data_dir = Some(dir.clone());
    let gw = spawn_gateway_on(fake, config).await;
    let mut c = gw.client.clone();
    let mut ids = Vec::new();
    for i in 0..8 {
        let r = c
            .submit_reply(text(&format!("om_j{i}"), "oc_j", &format!("job {i}")))
            .await
            .unwrap()
            .into_inner();
        assert!(!r.duplicate);
        ids.push(r.job_id);
    }
    // The same reply again (its uuid derived from the same caller and words): the same job.
    let again = c
        .submit_reply(text("om_j0", "oc_j", "job 0"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(again.job_id, ids[0]);
    // Watch the last one to its end.
    let states = common::watched_states(&mut common::watch_job(&mut c, &ids[7]).await).await;
    assert_eq!(states.last(), Some(&JobState::Delivered), "{states:?}");
    for id in &ids {
        let job = get_job(&mut c, id).await;
        assert_eq!(job.state(), JobState::Delivered, "{job:?}");
        assert!(!job.result.unwrap().message_id.is_empty());
    }
    let posted: Vec<String> = gw
        .fake
        .received()
        .into_iter()
        .filter(|r| !r.deduped)
        .map(|r| r.message_id)
        .collect();
    let want: Vec<String> = (0..8).map(|i| format!("om_j{i}")).collect();
    assert_eq!(posted, want, "once each, in order");
    // Unknown and malformed ids.
    let s = c
        .get_reply(GetReplyRequest {
            job_id: "j00000000000fffff".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let bad_ttl = ReplyRequest {
        ttl_s: 4000,
        ..text("om_jt", "oc_j", "x")
    };
    assert_eq!(
        c.submit_reply(bad_ttl).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_full_job_store_refuses_new_jobs() {
    let fake = spawn_fake(FakeOptions::default()).await;
    let dir = temp_dir("full");
    let mut config = config_for(&fake, "");
    config.data_dir = Some(dir.clone());
    config.max_jobs = 3;
    // All three stay open (the first is held by Feishu, the others wait behind it): a finished
    // job would make room (issue 18).
    fake.push_fault(Fault {
        message_id: Some("om_f0".into()),
        hold: true,
        times: 1,
        ..Fault::default()
    });
    let gw = spawn_gateway_on(fake, config).await;
    let mut c = gw.client.clone();
    for i in 0..3 {
        c.submit_reply(text(&format!("om_f{i}"), "oc_f", "x"))
            .await
            .unwrap();
    }
    let s = c
        .submit_reply(text("om_f3", "oc_f", "x"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    let info = tonic_types::StatusExt::get_details_error_info(&s).unwrap();
    assert_eq!(info.metadata["scope"], "job_store");
    let m = gw.http_get("/metrics").await.1;
    assert_eq!(
        common::metric(&m, "feishu_reply_jobs_stored"),
        Some(3.0),
        "{m}"
    );
    gw.fake.release_held();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_job_is_cancelled_only_before_its_send() {
    let fake = spawn_fake(FakeOptions::default()).await;
    let dir = temp_dir("cancel");
    let mut config = config_for(&fake, "");
    config.data_dir = Some(dir.clone());
    let gw = spawn_gateway_on(fake, config).await;
    gw.fake.push_fault(Fault {
        message_id: Some("om_c0".into()),
        hold: true,
        times: 1,
        ..Fault::default()
    });
    let mut c = gw.client.clone();
    let first = c
        .submit_reply(text("om_c0", "oc_c", "a"))
        .await
        .unwrap()
        .into_inner();
    eventually("om_c0 sent", async || !gw.fake.received().is_empty()).await;
    let second = c
        .submit_reply(text("om_c1", "oc_c", "b"))
        .await
        .unwrap()
        .into_inner();
    let req = |id: &str| GetReplyRequest { job_id: id.into() };
    let sending =
        async || get_job(&mut c.clone(), &first.job_id).await.state() == JobState::Sending;
    eventually("the held job shows SENDING", sending).await;
    let s = c.cancel_reply(req(&first.job_id)).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "in flight: {s:?}");
    let cancelled = c
        .cancel_reply(req(&second.job_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    gw.fake.release_held();
    let mut stream = c
        .watch_reply(req(&first.job_id))
        .await
        .unwrap()
        .into_inner();
    while stream.message().await.unwrap().is_some() {}
    assert_eq!(
        get_job(&mut c, &first.job_id).await.state(),
        JobState::Delivered
    );
    assert_eq!(
        get_job(&mut c, &second.job_id).await.state(),
        JobState::Cancelled
    );
    let posted = received_ids(&gw.fake);
    assert_eq!(posted, ["om_c0"], "the cancelled job is never sent");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_killed_gateway_delivers_every_stored_job_exactly_once_after_restart() {
    stop_mid_backlog_then_restart(false).await;
}

#[tokio::test]
async fn a_gateway_stopped_by_sigterm_leaves_its_jobs_to_the_next_one() {
    // A rolling deploy: the grace period ends before the backlog does; the rest stays queued
    // in the store (not failed) and the next process delivers it.
    stop_mid_backlog_then_restart(true).await;
}

async fn stop_mid_backlog_then_restart(sigterm: bool) {
    let fake = spawn_fake(FakeOptions::default()).await;
    let dir = temp_dir("kill");
    let config = serve_config(&fake, &dir, "cli_k");
    let port = free_port();
    let gw = ServeProcess::start(&config, port);
    let mut c = connect(port).await;
    // 45 jobs to 3 chats: 15 per chat at 5/s is 3 s of backlog.
    let n = common::backlog_jobs();
    let ids = common::submit_backlog(&mut c, "k", n).await;
    // Mid-backlog: some posted, most not.
    eventually("some jobs posted", async || fake.received().len() >= 6).await;
    let mut gw = gw;
    if sigterm {
        gw.terminate().await;
    }
    drop(gw); // SIGKILL (when still running)
    let posted_before = fake.received().len();
    assert!(posted_before < n, "killed after the backlog drained");
    let _gw = ServeProcess::start(&config, port);
    let mut c = connect(port).await;
    let t = Instant::now();
    for id in &ids {
        loop {
            let job = get_job(&mut c, id).await;
            if job.state() == JobState::Delivered {
                break;
            }
            assert!(
                !matches!(job.state(), JobState::Failed | JobState::Cancelled),
                "{job:?}"
            );
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{id} never delivered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Exactly once: one post per uuid; per chat in the order submitted.
    let (posts, per_chat) = common::posts(&fake);
    assert_eq!(posts.len(), n, "every job posted");
    assert!(posts.values().all(|&n| n == 1), "{posts:?}");
    common::assert_in_order(&per_chat, 3);
    eprintln!(
        "posted before the kill: {posted_before}; rate rejections: {}",
        fake.stats().rate_rejections()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_job_is_visible_to_its_caller_only() {
    let (a, b) = ("caller-a-token-0123456789", "caller-b-token-0123456789");
    let fake = spawn_fake(FakeOptions::default()).await;
    let dir = temp_dir("owner");
    let extra = format!(
        "[callers.a]\ntoken_sha256 = \"{}\"\napps = [\"*\"]\n[callers.b]\ntoken_sha256 = \"{}\"\napps = [\"*\"]\n",
        common::token_sha256(a),
        common::token_sha256(b)
    );
    let mut config = config_for(&fake, &extra);
    config.data_dir = Some(dir.clone());
    let gw = spawn_gateway_on(fake, config).await;
    let with = |token: &str, job_id: &str| {
        let mut r = tonic::Request::new(GetReplyRequest {
            job_id: job_id.into(),
        });
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    };
    let mut submit = tonic::Request::new(text("om_o1", "oc_o", "mine"));
    submit
        .metadata_mut()
        .insert("authorization", format!("Bearer {a}").parse().unwrap());
    let mut c = gw.client.clone();
    let id = c.submit_reply(submit).await.unwrap().into_inner().job_id;
    c.get_reply(with(a, &id)).await.unwrap();
    for s in [
        c.get_reply(with(b, &id)).await.unwrap_err(),
        c.cancel_reply(with(b, &id)).await.unwrap_err(),
        c.watch_reply(with(b, &id)).await.unwrap_err(),
    ] {
        assert_eq!(s.code(), Code::NotFound, "{s:?}");
    }
    let s = c
        .get_reply(GetReplyRequest { job_id: id })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_job_id_cannot_be_guessed_by_counting() {
    // Issue 18: ids were a global counter (`j` + 16 hex digits): with anonymous calls
    // allowed, any client could read or cancel any job by counting.
    let fake = spawn_fake(FakeOptions::default()).await;
    let dir = temp_dir("guess");
    let mut config = config_for(&fake, "");
    config.data_dir = Some(dir.clone());
    let gw = spawn_gateway_on(fake, config).await;
    let mut c = gw.client.clone();
    let id = c
        .submit_reply(text("om_g1", "oc_g", "g"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    assert_eq!(id.len(), 1 + 16 + 32, "{id}: the seq and 128 random bits");
    get_job(&mut c, &id).await;
    for guess in [
        id[..17].to_owned(),
        format!("{}{}", &id[..17], "0".repeat(32)),
    ] {
        let s = c
            .get_reply(GetReplyRequest { job_id: guess })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::NotFound, "{s:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_emptied_job_store_is_refused_and_a_reset_one_never_reuses_an_id() {
    // Issue 18: a `jobs.redb` truncated to zero bytes was taken for a new store: the gateway
    // started without a word, its unfinished jobs were gone, and ids restarted at 1, so an id
    // a client held named another job.
    let fake = spawn_fake(FakeOptions::default()).await;
    let dir = temp_dir("reset");
    let config = serve_config(&fake, &dir, "cli_r");
    let port = free_port();
    let mut gw = ServeProcess::start(&config, port);
    let mut c = connect(port).await;
    let first = c
        .submit_reply(text("om_r1", "oc_r", "first"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    eventually("the first job delivered", async || {
        get_job(&mut c, &first).await.state() == JobState::Delivered
    })
    .await;
    gw.terminate().await;
    drop(gw);
    std::fs::write(dir.join("data").join("jobs.redb"), b"").unwrap();
    // Refused, saying why and what to do.
    let config_arg = config.display().to_string();
    let (code, err) = common::serve_refusal(&["--config", &config_arg], &[]);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("is empty") && err.contains("--reset-job-store"),
        "{err}"
    );
    // Reset on purpose: a new store, whose ids never name the old jobs.
    let _gw = ServeProcess::start_with(&config, port, &[("GATEWAY_RESET_JOB_STORE", "1")]);
    let mut c = connect(port).await;
    let second = c
        .submit_reply(text("om_r2", "oc_r", "second"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    assert_ne!(second, first);
    let s = c
        .get_reply(GetReplyRequest { job_id: first })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
