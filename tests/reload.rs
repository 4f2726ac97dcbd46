//! Live configuration (issue 11): a `serve` process reloads its configuration on SIGHUP and
//! when its config file changes (as Kubernetes changes a mounted ConfigMap: a `..data` symlink
//! swap), without dropping a queued reply: a new app serves, a rotated secret is used, a
//! changed app quota paces from then on (counting the sends made under the old one), a
//! removed app fails its queued replies `APP_REMOVED` (and serves again when added back), and
//! a broken file changes nothing.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::{
    ServeProcess, connect, eventually, free_port, max_in_window, metric, metrics_text, spawn_fake,
    text,
};
use feishu_reply_gateway::fake_feishu::{FakeFeishu, FakeOptions};
use feishu_reply_gateway::proto::reply_gateway_client::ReplyGatewayClient;
use feishu_reply_gateway::proto::{JobState, ReplyRequest};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "gw-reload-{tag}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(fake: &FakeFeishu, apps: &str) -> String {
    format!(
        "[feishu]\nbase_url = \"{}\"\nrequest_timeout_ms = 2000\n[server]\nshutdown_grace_ms = 100\n\
         [auth]\nallow_anonymous = true\n[retry]\nbase_delay_ms = 20\nmax_delay_ms = 200\n{apps}",
        fake.base_url()
    )
}

fn app(name: &str, id: &str, secret: &str, extra: &str) -> String {
    format!("[apps.{name}]\napp_id = \"{id}\"\napp_secret = \"{secret}\"\n{extra}\n")
}

fn to_app(app: &str, message_id: &str, chat: &str) -> ReplyRequest {
    ReplyRequest {
        app: app.into(),
        ..text(message_id, chat, "r")
    }
}

async fn counter(port: u16, series: &str) -> f64 {
    metric(&metrics_text(port).await, series).unwrap_or(0.0)
}

fn start(file: &Path) -> (ServeProcess, u16, u16) {
    let (port, mport) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{mport}");
    let p = ServeProcess::start_with(file, port, &[("GATEWAY_METRICS_ADDR", addr.as_str())]);
    (p, port, mport)
}

/// `n` replies of app `app` to `chats` chats, each call in its own task (results in order).
fn send_all(
    client: &ReplyGatewayClient<Channel>,
    app: &str,
    tag: &str,
    n: usize,
    chats: usize,
) -> Vec<tokio::task::JoinHandle<Result<(), tonic::Status>>> {
    (0..n)
        .map(|i| {
            let mut c = client.clone();
            let req = to_app(
                app,
                &format!("om_{tag}{i}_in_{tag}{}", i % chats),
                &format!("oc_{tag}{}", i % chats),
            );
            tokio::spawn(async move { c.reply(req).await.map(|_| ()) })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_under_load_adds_an_app_rotates_a_secret_and_raises_a_quota_dropping_nothing() {
    let fake = spawn_fake(FakeOptions {
        apps: vec![
            ("cli_a".into(), "sa1".into()),
            ("cli_b".into(), "sb".into()),
        ],
        ..FakeOptions::default()
    })
    .await;
    let d = dir("hup");
    let file = d.join("gateway.toml");
    let slow = "quotas = [{ limit = 4, window_ms = 1000 }]";
    std::fs::write(&file, config(&fake, &app("a", "cli_a", "sa1", slow))).unwrap();
    let (gw, port, mport) = start(&file);
    let mut c = connect(port).await;
    // b is not configured yet.
    let e = c.reply(to_app("b", "om_b0", "oc_b0")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // 24 replies of a over 6 chats: 6 s of backlog at 4/s.
    let calls = send_all(&c, "a", "q", 24, 6);
    eventually("a few posted", async || fake.received().len() >= 5).await;
    // Feishu takes both secrets while the operator rotates.
    fake.set_options(|o| o.apps.push(("cli_a".into(), "sa2".into())));
    // Everything the fake saw before this instant was sent under the old quota.
    let reload_at_ms = fake_now_ms(&fake);
    let fast = "quotas = [{ limit = 12, window_ms = 1000 }]";
    std::fs::write(
        &file,
        config(
            &fake,
            &format!(
                "{}{}",
                app("a", "cli_a", "sa2", fast),
                app("b", "cli_b", "sb", "")
            ),
        ),
    )
    .unwrap();
    gw.signal("HUP");
    let t = Instant::now();
    // The new app serves (the door learns it last, after everything it needs).
    eventually("app b serves", async || {
        c.reply(to_app("b", "om_b1", "oc_b1")).await.is_ok()
    })
    .await;
    eprintln!("app b served {:?} after SIGHUP", t.elapsed());
    // The metrics follow once the reload is done.
    eventually("the reload counted", async || {
        counter(mport, "feishu_reply_config_generation").await >= 1.0
            && counter(
                mport,
                "feishu_reply_config_reloads_total{outcome=\"applied\"}",
            )
            .await
                >= 1.0
    })
    .await;

    // Nothing queued was dropped: every reply of a delivered, each posted once.
    for call in calls {
        call.await.unwrap().expect("delivered across the reload");
    }
    let a_posts: Vec<_> = fake
        .received()
        .into_iter()
        .filter(|r| r.app_id == "cli_a")
        .collect();
    assert_eq!(a_posts.len(), 24, "each posted once");
    let mut uuids: Vec<_> = a_posts.iter().map(|r| r.uuid.clone()).collect();
    uuids.sort();
    uuids.dedup();
    assert_eq!(uuids.len(), 24);
    let times: Vec<f64> = a_posts.iter().map(|r| r.at_ms).collect();
    let before: Vec<f64> = times
        .iter()
        .copied()
        .filter(|&t| t < reload_at_ms)
        .collect();
    // The old quota held before the reload, the new one after, and the two together never
    // more than the new one: the sends made under the old quota counted in the new.
    assert!(max_in_window(&before, 1000.0) <= 4, "{before:?}");
    assert!(max_in_window(&times, 1000.0) <= 12, "{times:?}");
    assert!(
        max_in_window(&times, 1000.0) > 4,
        "the raised quota was never used: {times:?}"
    );
    assert_eq!(fake.stats().rate_rejections(), 0);

    // The old secret stops working at Feishu and its token is revoked: the gateway gets a new
    // token with the rotated secret.
    fake.set_options(|o| o.apps.retain(|(id, s)| !(id == "cli_a" && s == "sa1")));
    fake.revoke_tokens();
    c.reply(to_app("a", "om_after", "oc_after"))
        .await
        .expect("a token fetched with the rotated secret");
}

/// Milliseconds since the fake started (its `Received::at_ms` clock).
fn fake_now_ms(fake: &FakeFeishu) -> f64 {
    fake.elapsed().as_secs_f64() * 1000.0
}

/// A Kubernetes ConfigMap volume: `gateway.toml` → `..data/gateway.toml`, `..data` → a
/// versioned directory, swapped atomically on update.
struct ConfigMap {
    dir: PathBuf,
    version: u32,
}

impl ConfigMap {
    fn new(text: &str) -> Self {
        let mut m = Self {
            dir: dir("cm"),
            version: 0,
        };
        m.update(text);
        std::os::unix::fs::symlink("..data/gateway.toml", m.file()).unwrap();
        m
    }

    fn file(&self) -> PathBuf {
        self.dir.join("gateway.toml")
    }

    fn update(&mut self, text: &str) {
        self.version += 1;
        let v = format!("..v{}", self.version);
        std::fs::create_dir_all(self.dir.join(&v)).unwrap();
        std::fs::write(self.dir.join(&v).join("gateway.toml"), text).unwrap();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&v, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_update_removes_an_app_failing_its_queue_and_a_broken_one_changes_nothing() {
    let fake = spawn_fake(FakeOptions::default()).await;
    let a = app("a", "cli_a", "sa", "");
    // c sends 1 a minute: of 3 replies, 2 wait.
    let c_app = app(
        "c",
        "cli_c",
        "sc",
        "quotas = [{ limit = 1, window_ms = 60000 }]",
    );
    let mut cm = ConfigMap::new(&config(&fake, &format!("{a}{c_app}")));
    let (_gw, port, mport) = start(&cm.file());
    let mut c = connect(port).await;
    c.reply(to_app("a", "om_a0", "oc_a0")).await.unwrap();
    let calls = send_all(&c, "c", "rm", 3, 3);
    eventually("c's first posted", async || {
        fake.received().iter().any(|r| r.app_id == "cli_c")
    })
    .await;
    // The two others are queued (not refused at the door) before c goes.
    let mut admin = feishu_reply_gateway::proto::reply_admin_client::ReplyAdminClient::connect(
        format!("http://127.0.0.1:{port}"),
    )
    .await
    .unwrap();
    eventually("two of c queued", async || {
        admin
            .inspect_app(feishu_reply_gateway::proto::InspectAppRequest { app: "c".into() })
            .await
            .is_ok_and(|s| s.into_inner().queued == 2)
    })
    .await;

    // No SIGHUP: the volume update alone reloads.
    cm.update(&config(&fake, &a));
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    for e in results.into_iter().filter_map(Result::err) {
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        let info = e.get_details_error_info().unwrap();
        assert_eq!(info.reason, "APP_REMOVED", "{e:?}");
        assert_eq!(info.metadata["app"], "c");
        assert!(!info.metadata["uuid"].is_empty());
    }
    assert_eq!(
        fake.received()
            .iter()
            .filter(|r| r.app_id == "cli_c")
            .count(),
        1,
        "the removed app's queued replies were not sent"
    );
    // The reload is complete (the door is the last to learn it) when the generation moves;
    // from then on c is unknown. (A call racing the reload may meet APP_REMOVED instead.)
    eventually("the reload complete", async || {
        counter(mport, "feishu_reply_config_generation").await >= 1.0
    })
    .await;
    let generation = counter(mport, "feishu_reply_config_generation").await;
    let e = c.reply(to_app("c", "om_c9", "oc_c9")).await.unwrap_err();
    assert_eq!(
        e.get_details_error_info().unwrap().reason,
        "UNKNOWN_APP",
        "{e:?}"
    );

    // A broken update is refused; the running configuration stays.
    cm.update("[apps.a\napp_id = ");
    eventually("the broken file refused", async || {
        counter(
            mport,
            "feishu_reply_config_reloads_total{outcome=\"invalid\"}",
        )
        .await
            >= 1.0
    })
    .await;
    assert_eq!(
        counter(mport, "feishu_reply_config_generation").await,
        generation
    );
    c.reply(to_app("a", "om_a1", "oc_a1"))
        .await
        .expect("still serving the running configuration");

    // c added back (same app_id, now on the default quotas): it serves again.
    cm.update(&config(
        &fake,
        &format!("{a}{}", app("c", "cli_c", "sc", "")),
    ));
    eventually("c serves again", async || {
        c.reply(to_app("c", "om_c10", "oc_c10")).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn a_config_others_may_write_is_flagged_until_it_is_fixed_and_a_huge_one_is_refused() {
    // Issue 18: the gateway read a world-writable config (anyone who can write it can post as
    // its apps) without a word, and a config file of any size.
    use std::os::unix::fs::PermissionsExt;
    let set = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let fake = spawn_fake(FakeOptions::default()).await;
    let d = dir("perm");
    let file = d.join("gateway.toml");
    let text_ok = config(&fake, &app("a", "cli_a", "sa", ""));
    std::fs::write(&file, &text_ok).unwrap();
    set(&file, 0o644);
    set(&d, 0o777);
    let (gw, port, mport) = start(&file);
    // Serving (both ports are bound before it serves).
    let mut c = connect(port).await;
    let series = "feishu_reply_config_writable_by_others";
    eventually("flagged at start", async || {
        metric(&metrics_text(mport).await, series) == Some(1.0)
    })
    .await;
    set(&d, 0o755);
    gw.signal("HUP");
    eventually("cleared at the next reload", async || {
        metric(&metrics_text(mport).await, series) == Some(0.0)
    })
    .await;
    // A config grown past 1 MiB is refused; the running one keeps serving.
    let generation = counter(mport, "feishu_reply_config_generation").await;
    let mut huge = text_ok.clone();
    huge.push('#');
    huge.push_str(&"x".repeat(1 << 20));
    huge.push('\n');
    std::fs::write(&file, &huge).unwrap();
    let invalid = r#"feishu_reply_config_reloads_total{outcome="invalid"}"#;
    eventually("the huge file refused", async || {
        counter(mport, invalid).await >= 1.0
    })
    .await;
    assert_eq!(
        counter(mport, "feishu_reply_config_generation").await,
        generation
    );
    c.reply(to_app("a", "om_p0", "oc_p0")).await.unwrap();
    let _ = std::fs::remove_dir_all(&d);
}

/// `req` sent with bearer `token`.
fn as_caller<T>(req: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(req);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn job_req(id: &str) -> feishu_reply_gateway::proto::GetReplyRequest {
    feishu_reply_gateway::proto::GetReplyRequest { job_id: id.into() }
}

/// Callers `x` (rotating its token, jobs not inherited), `y` (rotating, `inherits_jobs`; an
/// admin) and,
/// while `with_z`, `z`; two apps that post once a minute, and a job store in `data`.
fn callers_config(fake: &FakeFeishu, data: &Path, x: &str, y: &str, with_z: bool) -> String {
    let caller = |name: &str, token: &str, extra: &str| {
        format!(
            "[callers.{name}]\ntoken_sha256 = \"{}\"\napps = [\"*\"]\n{extra}\n",
            common::token_sha256(token)
        )
    };
    let slow = "quotas = [{ limit = 1, window_ms = 60000 }]";
    format!(
        "[feishu]\nbase_url = \"{}\"\nrequest_timeout_ms = 2000\n[server]\nshutdown_grace_ms = 100\n\
         [jobs]\ndata_dir = \"{}\"\n{}{}{}{}{}",
        fake.base_url(),
        data.display(),
        app("a", "cli_a", "sa", slow),
        app("b", "cli_b", "sb", slow),
        caller("x", x, ""),
        caller("y", y, "inherits_jobs = true\nadmin = true"),
        if with_z {
            caller("z", "z-token-0123456789", "")
        } else {
            String::new()
        }
    )
}

/// The fake Feishu of [`callers_config`]'s two apps.
async fn callers_fake() -> FakeFeishu {
    spawn_fake(FakeOptions {
        apps: vec![("cli_a".into(), "sa".into()), ("cli_b".into(), "sb".into())],
        ..FakeOptions::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_caller_or_a_rotated_token_takes_its_queued_work_with_it_unless_inherited() {
    // Issue 18: a caller removed by reload still had its queued jobs delivered seconds later,
    // and a caller re-added under the same name with a new token could read the old jobs.
    let fake = callers_fake().await;
    let d = dir("revoke");
    let data = d.join("data");
    let file = d.join("gateway.toml");
    let (x1, x2) = ("x-token-one-0123456789", "x-token-two-0123456789");
    let (y1, y2) = ("y-token-one-0123456789", "y-token-two-0123456789");
    let z = "z-token-0123456789";
    std::fs::write(&file, callers_config(&fake, &data, x1, y1, true)).unwrap();
    let (gw, port, mport) = start(&file);
    let c = connect(port).await;

    // Each app posts its first reply now; the others wait a minute.
    let submit = async |app: &str, tag: &str, token: &str| {
        c.clone()
            .submit_reply(as_caller(
                to_app(app, &format!("om_{tag}"), &format!("oc_{tag}")),
                token,
            ))
            .await
            .expect("submitted")
            .into_inner()
            .job_id
    };
    submit("a", "x1", x1).await;
    submit("b", "y1", y1).await;
    eventually("each app's first reply posted", async || {
        fake.received().len() == 2
    })
    .await;
    let x_queued = submit("a", "x2", x1).await;
    let y_queued = submit("b", "y2", y1).await;
    let sync_call = |app: &str, tag: &str, token: &str| {
        let req = to_app(app, &format!("om_{tag}"), &format!("oc_{tag}"));
        let (mut c, req) = (c.clone(), as_caller(req, token));
        tokio::spawn(async move { c.reply(req).await.map(|_| ()) })
    };
    let x_waiting = sync_call("a", "x3", x1);
    let z_waiting = sync_call("b", "z1", z);
    // Both calls wait in the queues (not refused at the door) before the reload.
    let mut admin = feishu_reply_gateway::proto::reply_admin_client::ReplyAdminClient::connect(
        format!("http://127.0.0.1:{port}"),
    )
    .await
    .unwrap();
    for app in ["a", "b"] {
        eventually("two of each app queued", async || {
            let req = feishu_reply_gateway::proto::InspectAppRequest { app: app.into() };
            admin
                .inspect_app(as_caller(req, y1))
                .await
                .is_ok_and(|s| s.into_inner().queued == 2)
        })
        .await;
    }

    // x's token rotates (its jobs are not inherited), y's too (inherited), z is removed.
    std::fs::write(&file, callers_config(&fake, &data, x2, y2, false)).unwrap();
    gw.signal("HUP");
    let removed = async |call: tokio::task::JoinHandle<Result<(), tonic::Status>>, who: &str| {
        let within = std::time::Duration::from_secs(10);
        let r = tokio::time::timeout(within, call).await;
        let e = r
            .expect("answered at the reload, not a minute later")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{who}: {e:?}");
        let info = e.get_details_error_info().unwrap();
        assert_eq!(info.reason, "CALLER_REMOVED", "{who}: {e:?}");
        assert_eq!(info.metadata["caller"], who);
    };
    removed(x_waiting, "x").await;
    removed(z_waiting, "z").await;
    eventually("the reload complete", async || {
        counter(mport, "feishu_reply_config_generation").await >= 1.0
    })
    .await;

    // The old token is refused; the new one does not see the old token's job.
    let e = c
        .clone()
        .get_reply(as_caller(job_req(&x_queued), x1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = c
        .clone()
        .get_reply(as_caller(job_req(&x_queued), x2))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "a new token inherited x's job: {e:?}"
    );
    // y inherits: its job still waits, and its new token may read and cancel it.
    let job = c
        .clone()
        .get_reply(as_caller(job_req(&y_queued), y2))
        .await
        .expect("inherited")
        .into_inner();
    assert_eq!(job.state(), JobState::Queued);
    let job = c
        .clone()
        .cancel_reply(as_caller(job_req(&y_queued), y2))
        .await
        .expect("cancelled")
        .into_inner();
    assert_eq!(job.state(), JobState::Cancelled);

    // x's first token back: the job it submitted failed CALLER_REMOVED at the reload.
    std::fs::write(&file, callers_config(&fake, &data, x1, y2, false)).unwrap();
    gw.signal("HUP");
    eventually("x's first token serves again", async || {
        c.clone()
            .get_reply(as_caller(job_req(&x_queued), x1))
            .await
            .is_ok()
    })
    .await;
    let job = c
        .clone()
        .get_reply(as_caller(job_req(&x_queued), x1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state(), JobState::Failed);
    let status = job.error.expect("its status");
    assert_eq!(status.code, Code::PermissionDenied as i32, "{status:?}");
    assert!(status.message.contains("rotated out"), "{status:?}");
    assert_eq!(
        fake.received().len(),
        2,
        "nothing of the revoked work was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_job_whose_token_was_replaced_across_a_restart_fails_caller_removed() {
    // Issue 18: after a restart, a stored job of a caller no longer configured ran under the
    // anonymous share, and one whose name came back with a new token was that token's.
    let fake = callers_fake().await;
    let d = dir("restart-revoke");
    let (data, file) = (d.join("data"), d.join("gateway.toml"));
    let (x1, x2, y) = (
        "x-token-one-0123456789",
        "x-token-two-0123456789",
        "y-token-one-0123456789",
    );
    let serve = async |x: &str| {
        std::fs::write(&file, callers_config(&fake, &data, x, y, false)).unwrap();
        let (gw, port, _) = start(&file);
        (gw, connect(port).await)
    };
    let (mut gw, c) = serve(x1).await;
    let submit = async |tag: &str| {
        let req = as_caller(to_app("a", &format!("om_{tag}"), &format!("oc_{tag}")), x1);
        c.clone()
            .submit_reply(req)
            .await
            .unwrap()
            .into_inner()
            .job_id
    };
    submit("r1").await;
    eventually("the first posted", async || fake.received().len() == 1).await;
    let queued = submit("r2").await;
    gw.terminate().await;

    // x's token replaced while the gateway was down.
    let (mut gw, c) = serve(x2).await;
    let e = c
        .clone()
        .get_reply(as_caller(job_req(&queued), x2))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "a new token inherited x's job: {e:?}"
    );
    gw.terminate().await;

    let (_gw, c) = serve(x1).await;
    let job = c
        .clone()
        .get_reply(as_caller(job_req(&queued), x1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state(), JobState::Failed, "{job:?}");
    let status = job.error.expect("its status");
    assert_eq!(status.code, Code::PermissionDenied as i32, "{status:?}");
    assert_eq!(fake.received().len(), 1, "the revoked job was not sent");
}
