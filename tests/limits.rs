//! Slow, idle and too many clients: connections that send nothing are closed, connections
//! beyond a port's cap are closed at once (health keeps answering), and no call is held
//! longer than `max_call`.

mod common;

use std::time::{Duration, Instant};

use common::{
    config_for, eventually, metric, received_ids, spawn_gateway, spawn_gateway_with, text,
};
use feishu_reply_gateway::fake_feishu::{FakeOptions, Fault};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

/// Whether the server closes `conn` within `within` (EOF or reset), without us writing more.
async fn closed_by_server(conn: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let t = Instant::now();
    while t.elapsed() < within {
        match tokio::time::timeout(within - t.elapsed(), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // e.g. the server's HTTP/2 SETTINGS; keep reading
            Err(_) => return false,
        }
    }
    false
}

#[tokio::test]
async fn connections_that_send_too_little_are_closed() {
    let gw = spawn_gateway(
        FakeOptions::default(),
        "[server]\nhandshake_timeout_ms = 300",
    )
    .await;
    // gRPC port: connected, nothing sent; then half an HTTP/2 preface.
    let mut silent = TcpStream::connect(gw.grpc_addr).await.unwrap();
    let mut half = TcpStream::connect(gw.grpc_addr).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    assert!(closed_by_server(&mut silent, Duration::from_secs(20)).await);
    assert!(closed_by_server(&mut half, Duration::from_secs(20)).await);
    // Metrics port: request headers that never end.
    let mut slow = TcpStream::connect(gw.metrics_addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    assert!(closed_by_server(&mut slow, Duration::from_secs(20)).await);
    // Calls are served as before.
    gw.reply(text("om_l1", "oc_l", "x")).await.unwrap();
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_and_health_keeps_answering() {
    let gw = spawn_gateway(
        FakeOptions::default(),
        "[server]\nmax_connections = 3\nmetrics_max_connections = 2\nhandshake_timeout_ms = 60000",
    )
    .await;
    // The test client holds one gRPC connection; two idle ones fill the cap.
    gw.reply(text("om_c0", "oc_c", "x")).await.unwrap();
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(TcpStream::connect(gw.grpc_addr).await.unwrap());
    }
    // Accepted (by the kernel) and closed at once by the gateway.
    let mut extra = TcpStream::connect(gw.grpc_addr).await.unwrap();
    assert!(closed_by_server(&mut extra, Duration::from_secs(20)).await);
    // Health has its own port and slots; the clients already connected are still served.
    let (status, _) = gw.http_get("/healthz").await;
    assert_eq!(status, 200);
    gw.reply(text("om_c1", "oc_c", "x")).await.unwrap();
    let m = gw.http_get("/metrics").await.1;
    let series = r#"feishu_reply_connections_refused_total{port="grpc",reason="too_many"}"#;
    assert!(metric(&m, series).unwrap_or(0.0) >= 1.0, "{m}");
    // A slot freed is a slot available again.
    drop(idle);
    let t = Instant::now();
    loop {
        let mut conn = TcpStream::connect(gw.grpc_addr).await.unwrap();
        if !closed_by_server(&mut conn, Duration::from_millis(300)).await {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "slots never freed");
    }
}

#[tokio::test]
async fn no_call_is_held_longer_than_max_call() {
    // Feishu holds the head for as long as the test says (its timeout is far away).
    let gw = spawn_gateway_with(FakeOptions::default(), |f| {
        let mut c = config_for(f, "[server]\nmax_call_ms = 800");
        c.feishu.request_timeout = Duration::from_secs(60);
        c
    })
    .await;
    gw.fake.push_fault(Fault {
        message_id: Some("om_m0".into()),
        hold: true,
        times: 1,
        ..Fault::default()
    });
    let head = {
        let c = gw.client.clone();
        tokio::spawn(async move { c.clone().reply(text("om_m0", "oc_m", "x")).await })
    };
    eventually("om_m0 never sent", async || !gw.fake.received().is_empty()).await;
    // Behind a reply Feishu holds: without a deadline, and with a far one (99999999H).
    let t = Instant::now();
    let mut far = tonic::Request::new(text("om_m2", "oc_m", "x"));
    far.metadata_mut()
        .insert("grpc-timeout", "99999999H".parse().unwrap());
    let mut client = gw.client.clone();
    let (none, far) = tokio::join!(gw.reply(text("om_m1", "oc_m", "x")), client.reply(far));
    for s in [none.unwrap_err(), far.unwrap_err()] {
        assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    }
    assert!(t.elapsed() < Duration::from_secs(15));
    gw.fake.release_held();
    head.await.unwrap().unwrap();
    let posted = received_ids(&gw.fake);
    assert_eq!(posted, ["om_m0"], "the calls that gave up were never sent");
}

/// Opens an HTTP/2 stream calling Reply and sends `n` bytes of a gRPC message that says it is
/// 200 000 bytes long, without ending it. Returns its response future (and keeps the stream).
async fn half_sent(
    h2: &mut h2::client::SendRequest<bytes::Bytes>,
    n: usize,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let req = http::Request::post("/feishu.reply.v1.ReplyGateway/Reply")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut stream) = h2.send_request(req, false).unwrap();
    let mut data = vec![0u8, 0, 3, 13, 64]; // uncompressed, length 200 000
    data.resize(5 + n, b'x');
    stream.reserve_capacity(data.len());
    stream.send_data(data.into(), false).unwrap();
    (resp, stream)
}

/// The grpc-status a response ends with.
async fn grpc_status(resp: h2::client::ResponseFuture) -> String {
    let resp = resp.await.expect("a response");
    if let Some(s) = resp.headers().get("grpc-status") {
        return s.to_str().unwrap().to_owned();
    }
    let mut body = resp.into_body();
    while body.data().await.is_some() {}
    let trailers = body.trailers().await.unwrap().expect("trailers");
    trailers["grpc-status"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn half_sent_requests_hold_bounded_bytes_for_a_bounded_time() {
    let gw = spawn_gateway(
        FakeOptions::default(),
        "[server]\nhandshake_timeout_ms = 3000\nmax_reading_bytes = 150000",
    )
    .await;
    let tcp = TcpStream::connect(gw.grpc_addr).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    // The first holds 100 kB of the 150 kB budget; the second cannot get its 100 kB.
    let (first, _keep1) = half_sent(&mut h2, 100_000).await;
    let t = Instant::now();
    let reading = "feishu_reply_request_bytes_reading";
    while metric(&gw.http_get("/metrics").await.1, reading) < Some(100_000.0) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the first body never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (second, _keep2) = half_sent(&mut h2, 100_000).await;
    assert_eq!(grpc_status(second).await, "8", "RESOURCE_EXHAUSTED");
    // The first never completes: it fails once the body is late, freeing its bytes.
    assert_eq!(grpc_status(first).await, "4", "DEADLINE_EXCEEDED");
    assert!(t.elapsed() < Duration::from_secs(30));
    let m = gw.http_get("/metrics").await.1;
    assert_eq!(metric(&m, reading), Some(0.0), "{m}");
    for reason in ["budget", "timeout"] {
        let series = format!("feishu_reply_request_bodies_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&m, &series), Some(1.0), "{m}");
    }
    // The budget is whole again: a request as large as the budget allows goes through.
    let big = "y".repeat(120_000);
    gw.reply(text("om_h1", "oc_h", &big)).await.unwrap();
}
