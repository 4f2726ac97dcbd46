//! Log lines cannot be forged (issue 18): a `serve` process is sent replies whose ids hold a
//! newline, a carriage return, an ANSI escape and braces, in every id field, and its log is
//! read back. Text format: every caller-chosen value stands inside a quoted, escaped string
//! (no line begins with the payload, no raw CR or injected escape). JSON format: every line
//! is one JSON object.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::free_port;
use feishu_reply_gateway::proto::ReplyRequest;
use feishu_reply_gateway::proto::reply_gateway_client::ReplyGatewayClient;

const BIN: &str = env!("CARGO_BIN_EXE_feishu-reply-gateway");

/// What a hostile caller puts in an id: a new line, a carriage return, a colour escape and
/// braces that would close a span's field list.
const PAYLOAD: &str = "a\nFORGED1 ERROR fake line\r\u{1b}[31mFORGED2}{FORGED3";

/// The requests, one per field carrying the payload (the others valid).
fn hostile() -> Vec<(ReplyRequest, Option<(&'static str, &'static str)>)> {
    let ok = ReplyRequest {
        message_id: "om_ok".into(),
        chat_id: "oc_ok".into(),
        msg_type: "text".into(),
        content: r#"{"text":"hi"}"#.into(),
        ..Default::default()
    };
    vec![
        (
            ReplyRequest {
                message_id: PAYLOAD.into(),
                ..ok.clone()
            },
            None,
        ),
        (
            ReplyRequest {
                chat_id: PAYLOAD.into(),
                ..ok.clone()
            },
            None,
        ),
        (
            ReplyRequest {
                uuid: PAYLOAD.into(),
                ..ok.clone()
            },
            None,
        ),
        (
            ReplyRequest {
                app: PAYLOAD.into(),
                ..ok.clone()
            },
            None,
        ),
        (
            ReplyRequest {
                user_id: PAYLOAD.into(),
                ..ok.clone()
            },
            None,
        ),
        // Metadata cannot carry control characters; braces and spaces it can.
        (ok.clone(), Some(("x-caller", "svc} FORGED4{ x=1"))),
        (ok.clone(), Some(("x-chat-id", "oc_x} FORGED5{ y=2"))),
    ]
}

/// Runs `serve --embedded-fake` with `format`, sends the hostile requests, stops it and
/// returns its log.
async fn log_of(format: &str) -> String {
    let (grpc, metrics) = (free_port(), free_port());
    let mut serve = Command::new(BIN)
        .args(["serve", "--embedded-fake", "--log-format", format])
        .env("GATEWAY_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("GATEWAY_METRICS_ADDR", format!("127.0.0.1:{metrics}"))
        .env_remove("FEISHU_APP_ID")
        .env_remove("FEISHU_APP_SECRET")
        .env_remove("GATEWAY_CONFIG")
        .env_remove("GATEWAY_DATA_DIR")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut client = common::connect(grpc).await;
    for (req, meta) in hostile() {
        let mut r = tonic::Request::new(req);
        if let Some((k, v)) = meta {
            r.metadata_mut().insert(k, v.parse().unwrap());
        }
        // Refused or delivered: either way it was logged.
        let _ = ReplyGatewayClient::reply(&mut client, r).await;
    }
    drop(client);
    assert!(
        Command::new("kill")
            .args(["-TERM", &serve.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let t = Instant::now();
    while serve.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(30), "serve did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut log = String::new();
    std::io::Read::read_to_string(serve.stderr.as_mut().unwrap(), &mut log).unwrap();
    log
}

/// Byte offsets of `line` that lie inside a double-quoted string (`\` escapes the next
/// character inside one).
fn quoted(line: &str) -> Vec<bool> {
    let mut inside = vec![false; line.len() + 1];
    let (mut open, mut escaped) = (false, false);
    for (i, c) in line.char_indices() {
        let here = open;
        if open && escaped {
            escaped = false;
        } else if open && c == '\\' {
            escaped = true;
        } else if c == '"' {
            open = !open;
        }
        inside[i..i + c.len_utf8()].fill(here);
    }
    inside
}

#[tokio::test]
async fn the_text_log_quotes_and_escapes_every_value_a_caller_chose() {
    let log = log_of("text").await;
    assert!(log.contains("FORGED1"), "the payload was logged:\n{log}");
    assert!(!log.contains('\r'), "a raw carriage return:\n{log:?}");
    assert!(!log.contains("\u{1b}[31mFORGED2"), "a raw escape:\n{log:?}");
    for line in log.lines() {
        let inside = quoted(line);
        for (at, _) in line.match_indices("FORGED") {
            assert!(
                inside[at],
                "a caller's value outside a quoted string (forged text): {line:?}"
            );
        }
    }
}

#[tokio::test]
async fn the_json_log_is_one_object_per_line() {
    let log = log_of("json").await;
    assert!(log.contains("FORGED1"), "the payload was logged:\n{log}");
    assert!(!log.contains('\r') && !log.contains('\u{1b}'), "{log:?}");
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(v.is_object(), "{line}");
    }
}
