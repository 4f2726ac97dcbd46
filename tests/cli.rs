//! The binary as a person uses it: `serve --embedded-fake`, `send`, SIGTERM; `serve` refusing
//! to start with no app (never a silent fake).

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::serve_refusal;

const BIN: &str = env!("CARGO_BIN_EXE_feishu-reply-gateway");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn serve_on_the_embedded_fake_then_send_then_sigterm() {
    let (grpc, metrics) = (free_port(), free_port());
    // No GATEWAY_DATA_DIR: the demo keeps its jobs in a temporary directory of its own.
    let mut serve = Command::new(BIN)
        .args(["serve", "--embedded-fake"])
        .env_remove("GATEWAY_DATA_DIR")
        .env("GATEWAY_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("GATEWAY_METRICS_ADDR", format!("127.0.0.1:{metrics}"))
        .env_remove("FEISHU_APP_ID")
        .env_remove("FEISHU_APP_SECRET")
        .env_remove("GATEWAY_CONFIG")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the gRPC port accepts connections (bounded).
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "gateway did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ok = Command::new(BIN)
        .args([
            "send",
            "--addr",
            &format!("http://127.0.0.1:{grpc}"),
            "--message-id",
            "om_cli",
            "--chat-id",
            "oc_cli",
            "--text",
            "hello",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        stdout.contains("\"attempts\": 1") && stdout.contains("om_fake"),
        "{stdout}"
    );
    // Edit the reply just posted.
    let posted: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let edited = Command::new(BIN)
        .args(["update", "--addr", &format!("http://127.0.0.1:{grpc}")])
        .args(["--message-id", posted["message_id"].as_str().unwrap()])
        .args(["--text", "hello again"])
        .output()
        .unwrap();
    let out: serde_json::Value = serde_json::from_slice(&edited.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&edited.stderr)));
    assert_eq!(
        (out["superseded"].as_bool(), out["attempts"].as_u64()),
        (Some(false), Some(1))
    );

    // A new message to the chat as a durable job: submit, then watch it to its end.
    let submitted = Command::new(BIN)
        .args([
            "send",
            "--async",
            "--addr",
            &format!("http://127.0.0.1:{grpc}"),
        ])
        .args(["--to", "chat:oc_cli", "--text", "later"])
        .output()
        .unwrap();
    let out: serde_json::Value = serde_json::from_slice(&submitted.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&submitted.stderr)));
    let job_id = out["job_id"].as_str().expect("a job id").to_owned();
    let watched = Command::new(BIN)
        .args([
            "job",
            "watch",
            &job_id,
            "--addr",
            &format!("http://127.0.0.1:{grpc}"),
        ])
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&watched.stdout);
    let last: serde_json::Value =
        serde_json::from_str(lines.lines().last().unwrap_or("{}")).unwrap();
    assert_eq!(last["state"], "JOB_STATE_DELIVERED", "{lines}");
    assert!(
        last["result"]["message_id"]
            .as_str()
            .is_some_and(|m| m.starts_with("om_fake"))
    );

    // Standard input typed into a card, word by word.
    let mut streamed = Command::new(BIN)
        .args([
            "send",
            "--stream",
            "--addr",
            &format!("http://127.0.0.1:{grpc}"),
        ])
        .args([
            "--message-id",
            "om_cli",
            "--chat-id",
            "oc_cli",
            "--title",
            "Demo",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = streamed.stdin.take().unwrap();
        stdin.write_all(b"one two three").unwrap();
    }
    let streamed = streamed.wait_with_output().unwrap();
    let lines = String::from_utf8_lossy(&streamed.stdout);
    assert!(
        streamed.status.success(),
        "{lines} {}",
        String::from_utf8_lossy(&streamed.stderr)
    );
    let last: serde_json::Value =
        serde_json::from_str(lines.lines().last().unwrap_or("{}")).unwrap();
    assert_eq!(last["finished"]["final_chars"], 13, "{lines}");
    assert!(
        lines.lines().next().unwrap_or("").contains("started"),
        "{lines}"
    );

    let bad = Command::new(BIN)
        .args([
            "send",
            "--addr",
            &format!("http://127.0.0.1:{grpc}"),
            "--message-id",
            "om_cli",
            "--msg-type",
            "image",
            "--content",
            "{}",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("InvalidArgument") && stderr.contains("reason: INVALID_CONTENT"),
        "{stderr}"
    );

    let probe = Command::new(BIN)
        .args([
            "probe",
            "--url",
            &format!("http://127.0.0.1:{metrics}/healthz"),
        ])
        .status()
        .unwrap();
    assert!(probe.success(), "probe sees a healthy gateway");
    let probe_ready = Command::new(BIN)
        .args([
            "probe",
            "--url",
            &format!("http://127.0.0.1:{metrics}/nope"),
        ])
        .status()
        .unwrap();
    assert!(!probe_ready.success(), "probe fails on a non-200 answer");

    let kill = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = serve.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "gateway did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    let mut log = String::new();
    std::io::Read::read_to_string(serve.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(
        log.contains("EMBEDDED FAKE"),
        "says loudly it runs on the fake:\n{log}"
    );
    assert!(log.contains("drained"), "{log}");
    // The demo's job directory (the one this process logged: another process that had the
    // same pid earlier may have left its own) is gone with the process.
    let demo = log
        .split_whitespace()
        .find_map(|w| w.strip_prefix("dir="))
        .map(|d| d.trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("the demo's job directory is logged:\n{log}"));
    assert!(
        demo.contains("feishu-reply-gateway-demo-"),
        "a demo directory: {demo}"
    );
    assert!(!std::path::Path::new(&demo).exists(), "left behind: {demo}");
    assert!(
        log.contains("async jobs are kept in a temporary directory"),
        "{log}"
    );
}

#[test]
fn serve_without_an_app_refuses_to_start_and_names_the_demo_flag() {
    // A secret that went missing must not turn into replies that "succeed" into a fake.
    let (code, err) = serve_refusal(&[], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--embedded-fake"), "{err}");
    assert!(err.contains("FEISHU_APP_ID"), "{err}");
    // The app id alone (its secret missing) is no app either.
    let (code, err) = serve_refusal(&[], &[("FEISHU_APP_ID", "cli_x")]);
    assert_ne!(code, Some(0), "{err}");
}

#[test]
fn the_embedded_fake_cannot_be_combined_with_a_real_app() {
    let real = [("FEISHU_APP_ID", "cli_real"), ("FEISHU_APP_SECRET", "s")];
    let (code, err) = serve_refusal(&["--embedded-fake"], &real);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("cannot be combined"), "{err}");
    // The same through the environment.
    let mut env = real.to_vec();
    env.push(("GATEWAY_EMBEDDED_FAKE", "1"));
    let (code, err) = serve_refusal(&[], &env);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("cannot be combined"), "{err}");
}

#[test]
fn serve_with_apps_but_no_caller_refuses_to_start_unless_anonymous_is_allowed() {
    // Anyone reaching the port could post as the bot: say so and stop.
    let real = [
        ("FEISHU_APP_ID", "cli_real"),
        ("FEISHU_APP_SECRET", "s3cr3t-value"),
    ];
    let (code, err) = serve_refusal(&[], &real);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("[callers.") && err.contains("GATEWAY_ALLOW_ANONYMOUS"),
        "{err}"
    );
    assert!(!err.contains("s3cr3t-value"), "{err}");
    // Callers and anonymous access together are a contradiction, refused as well.
    let dir = std::env::temp_dir().join(format!("gw-cli-callers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gateway.toml");
    std::fs::write(
        &file,
        "[callers.bot]\ntoken_sha256 = \"".to_owned() + &"0".repeat(64) + "\"\napps = [\"*\"]\n",
    )
    .unwrap();
    let mut env = real.to_vec();
    env.push(("GATEWAY_CONFIG", file.to_str().unwrap()));
    env.push(("GATEWAY_ALLOW_ANONYMOUS", "1"));
    let (code, err) = serve_refusal(&[], &env);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be combined"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
