//! The README's caller examples run against `serve --embedded-fake`, so they cannot rot: the
//! Python StreamReply example (grpcio, stubs generated from `proto/` by grpcio-tools, both
//! installed by `scripts/test`) types standard input into a card and prints the events.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_feishu-reply-gateway");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs `python3 args…`, failing the test with its output when it fails.
fn python(args: &[&str], env: &[(&str, &str)], stdin: &str) -> String {
    let mut child = Command::new("python3")
        .args(args)
        .envs(env.iter().copied())
        .current_dir(ROOT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/test installs what the examples need)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python3 {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A child process stopped when the test ends, however it ends: SIGTERM first, so that it
/// removes its demo job directory, then SIGKILL if it has not exited within 10 s.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < until {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_python_stream_reply_example_types_its_input_into_a_closed_card() {
    let (grpc, metrics) = (common::free_port(), common::free_port());
    let _serve = Killed(
        Command::new(BIN)
            .args(["serve", "--embedded-fake"])
            .env_remove("GATEWAY_DATA_DIR")
            .env_remove("GATEWAY_CONFIG")
            .env_remove("FEISHU_APP_ID")
            .env_remove("FEISHU_APP_SECRET")
            .env("GATEWAY_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
            .env("GATEWAY_METRICS_ADDR", format!("127.0.0.1:{metrics}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stubs = std::env::temp_dir().join(format!("gateway-pystubs-{}", std::process::id()));
    std::fs::create_dir_all(&stubs).unwrap();
    let out = format!("{}", stubs.display());
    python(
        &[
            "-m",
            "grpc_tools.protoc",
            "-I",
            "proto",
            &format!("--python_out={out}"),
            &format!("--grpc_python_out={out}"),
            "proto/feishu/reply/v1/gateway.proto",
            "proto/google/rpc/status.proto",
        ],
        &[],
        "",
    );
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "serve did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let answer = "The gateway types this answer into one card, word by word.";
    let lines = python(
        &[
            "scripts/examples/stream_reply.py",
            "--addr",
            &format!("127.0.0.1:{grpc}"),
            "--message-id",
            "om_py_example",
            "--chat-id",
            "oc_py_example",
            "--title",
            "Example",
            "--delay-ms",
            "10",
        ],
        &[("PYTHONPATH", &out)],
        answer,
    );
    let _ = std::fs::remove_dir_all(&stubs);
    let events: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{lines}");
    let card_id = events[0]["started"]["card_id"].as_str().expect("started");
    let finished = &events[1]["finished"];
    assert_eq!(finished["card_ids"][0], card_id, "{lines}");
    assert_eq!(finished["final_chars"], answer.chars().count(), "{lines}");
    assert!(finished["updates_sent"].as_u64().unwrap() >= 1, "{lines}");
}
