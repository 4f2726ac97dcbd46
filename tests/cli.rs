//! The binary as a person uses it: `serve` with no credentials (embedded fake), `send`, SIGTERM.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    let mut serve = Command::new(BIN)
        .arg("serve")
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
}
