//! `loadgen memory`: the memory attacks of issue 9 against one gateway process with the
//! default limits, and its resident memory (VmRSS, peak VmHWM from /proc) after each.

use std::time::{Duration, Instant};

use feishu_reply_gateway::proto::ReplyRequest;
use feishu_reply_gateway::proto::reply_gateway_client::ReplyGatewayClient;
use tonic::transport::Channel;

/// (VmRSS, VmHWM) of `pid` in MiB.
fn rss(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

fn report(pid: u32, what: &str) {
    let (now, peak) = rss(pid);
    println!("  {what:<58} RSS {now:7.1} MiB   peak {peak:7.1} MiB");
}

/// Runs the attacks; `grpc_port` and `pid` are the gateway's.
pub async fn attacks(
    channel: Channel,
    grpc_port: u16,
    pid: u32,
    floods: usize,
    connections: usize,
    callers: usize,
) {
    println!("memory attacks on one gateway, default limits (pod limit 256 MiB):");
    report(pid, "idle");

    // 1. x-caller values (anonymous): one value, then as many distinct ones. The difference
    //    is what distinct values cost (the first round warms buffers and the allocator).
    let calls = |distinct: bool| {
        let channel = channel.clone();
        async move {
            let per = callers.div_ceil(64);
            let mut tasks = Vec::new();
            for w in 0..64 {
                let mut c = ReplyGatewayClient::new(channel.clone());
                tasks.push(tokio::spawn(async move {
                    for i in w * per..((w + 1) * per).min(callers) {
                        let mut r = tonic::Request::new(ReplyRequest {
                            message_id: "om_x".into(),
                            msg_type: "not-a-type".into(),
                            ..ReplyRequest::default()
                        });
                        let name = if distinct {
                            format!("caller-{i:08}")
                        } else {
                            "same".into()
                        };
                        r.metadata_mut().insert("x-caller", name.parse().unwrap());
                        let _ = c.reply(r).await;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    calls(false).await;
    let (before, _) = rss(pid);
    report(pid, &format!("1. {callers} calls with one x-caller value"));
    calls(true).await;
    let (after, _) = rss(pid);
    report(
        pid,
        &format!("   {callers} calls with distinct x-caller values"),
    );
    println!(
        "     RSS growth from distinct values: {:+.2} MiB",
        after - before
    );

    // 2. Queue flood: 150 KB replies to a few chats (they wait: 5/s per chat), all at once
    //    over as many connections as the caller likes.
    let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(149_000));
    let t = Instant::now();
    let mut calls = Vec::with_capacity(floods);
    let mut channels = Vec::new();
    for _ in 0..floods.div_ceil(90) {
        let ch = Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        channels.push(ch);
    }
    for i in 0..floods {
        let ch = channels[i % channels.len()].clone();
        let mut c = ReplyGatewayClient::new(ch).max_encoding_message_size(1 << 20);
        let req = ReplyRequest {
            message_id: format!("om_flood{i}"),
            chat_id: format!("oc_flood{}", i % 30),
            msg_type: "text".into(),
            content: big.clone(),
            ..ReplyRequest::default()
        };
        calls.push(tokio::spawn(async move {
            let mut r = tonic::Request::new(req);
            r.set_timeout(Duration::from_secs(30));
            c.reply(r).await.map(|_| ()).map_err(|s| s.code())
        }));
    }
    let mut by_code = std::collections::BTreeMap::new();
    for c in calls {
        let k = match c.await.unwrap() {
            Ok(()) => "Ok".to_owned(),
            Err(code) => format!("{code:?}"),
        };
        *by_code.entry(k).or_insert(0usize) += 1;
    }
    report(
        pid,
        &format!(
            "2. {floods} x 150 KB replies to 30 chats ({:.0} s)",
            t.elapsed().as_secs_f64()
        ),
    );
    println!("     outcomes: {by_code:?}");

    // 3. Half-sent requests: each stream sends 200 kB of a 210 kB message and stops.
    let mut held = Vec::new();
    let mut refused = 0usize;
    for _ in 0..connections {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", grpc_port))
            .await
            .unwrap();
        let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        for _ in 0..100 {
            let Ok(mut h2r) = h2.clone().ready().await else {
                break;
            };
            let req = http::Request::post("/feishu.reply.v1.ReplyGateway/Reply")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let Ok((resp, mut stream)) = h2r.send_request(req, false) else {
                break;
            };
            let mut data = vec![0u8, 0, 3, 52, 80]; // length 210 000
            data.resize(5 + 200_000, b'x');
            stream.reserve_capacity(data.len());
            let _ = stream.send_data(data.into(), false);
            held.push((resp, stream));
        }
        h2 = h2.clone();
        drop(h2);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    report(
        pid,
        &format!(
            "3. {} half-sent 200 kB requests on {connections} connections",
            held.len()
        ),
    );
    for (resp, _) in held.drain(..) {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(15), resp).await
            && r.headers().get("grpc-status").is_some_and(|s| s == "8")
        {
            refused += 1;
        }
    }
    println!("     refused at once for the read budget (RESOURCE_EXHAUSTED): {refused}");
    report(pid, "   after they failed (handshake timeout)");
}
