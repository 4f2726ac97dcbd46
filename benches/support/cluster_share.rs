//! `loadgen cluster-share`: how the gateway's Redis calls spread over a Redis Cluster's
//! masters. Starts a Redis Cluster of M masters, `fake-feishu` and gateway replicas in
//! cluster mode with many apps, sends replies for every app, and reads `INFO commandstats` of
//! each master: Redis calls per send, and the share of all calls the busiest master carried
//! (issue 21's measure: 100 % while every key shares one hash tag).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use feishu_reply_gateway::proto::ReplyRequest;
use feishu_reply_gateway::proto::reply_gateway_client::ReplyGatewayClient;

/// A Redis Cluster of loopback masters (no replicas), stopped when dropped.
struct Cluster {
    ports: Vec<u16>,
    dir: PathBuf,
    nodes: Vec<Child>,
}

impl Cluster {
    fn start(masters: usize) -> Self {
        let dir = std::env::temp_dir().join(format!("loadgen-rc-{}-{masters}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Self {
            ports: Vec::new(),
            dir,
            nodes: Vec::new(),
        };
        for _ in 0..masters {
            let port = cluster_port(&c.ports);
            c.nodes.push(
                Command::new("redis-server")
                    .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                    .arg(format!("nodes-{port}.conf"))
                    .args(["--save", "", "--appendonly", "no", "--dir"])
                    .arg(&c.dir)
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("redis-server on PATH"),
            );
            super::wait_port(port);
            c.ports.push(port);
        }
        let nodes: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli on PATH");
        assert!(out.status.success(), "redis-cli --cluster create: {out:?}");
        for p in &c.ports {
            let t = Instant::now();
            while !cli(*p, &["cluster", "info"]).contains("cluster_state:ok") {
                assert!(t.elapsed() < Duration::from_secs(30), "cluster never ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        c
    }

    fn seeds(&self) -> String {
        let seeds: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect();
        seeds.join(",")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.kill();
            let _ = n.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port for a cluster node whose bus port (+10000) is free too, outside the ephemeral range.
fn cluster_port(taken: &[u16]) -> u16 {
    for p in (23_000..25_000u16).step_by(7) {
        let free = |q: u16| std::net::TcpListener::bind(("127.0.0.1", q)).is_ok();
        if !taken.contains(&p) && free(p) && free(p + 10_000) {
            return p;
        }
    }
    panic!("no free port pair for a cluster node")
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Scripts a node ran for clients since its stats were reset: the gateway's Redis work is
/// scripts (decide, settle, heartbeat, jobs); the commands a script runs are counted apart
/// by Redis and left out here.
fn calls_served(port: u16) -> u64 {
    cli(port, &["info", "commandstats"])
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            if !["eval", "evalsha", "eval_ro", "evalsha_ro", "fcall"].contains(&name) {
                return None;
            }
            rest.split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Runs the measure for each master count.
pub async fn run(
    masters: &[usize],
    apps: usize,
    per_app: usize,
    replicas: usize,
    peers: bool,
    jobs: bool,
) {
    println!(
        "cluster-share: {apps} apps x {per_app} {} to distinct chats, {replicas} gateway replicas in cluster mode{}",
        if jobs {
            "async jobs (SubmitReply)"
        } else {
            "replies"
        },
        if peers {
            ", calls forwarded to their chat's owner"
        } else {
            ""
        }
    );
    for &m in masters {
        let cluster = Cluster::start(m);
        let mut extra = format!(
            "[cluster]\nredis_url = \"{}\"\nredis_mode = \"cluster\"\nkey_prefix = \"share-{m}\"\nreplicas = {replicas}\n",
            cluster.seeds()
        );
        if peers {
            extra.push_str("peer_listen = \"127.0.0.1:{peer_port}\"\n");
        }
        for a in 0..apps {
            extra.push_str(&format!(
                "[apps.a{a}]\napp_id = \"cli_share_{a}\"\napp_secret = \"s\"\n"
            ));
        }
        let stack = super::stack_n(&[], &extra, replicas).await;
        // The replicas share the partitions (so calls go to their owners) before counting.
        let t = Instant::now();
        while stack.gateway_metric("feishu_reply_partitions_owned").await < 256.0 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "partitions never shared"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A beat more (a quarter of the default 10 s lease), so every replica sees all.
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Warm every replica (Redis connections, slot maps), then count from zero.
        for (ch, _) in &stack.gateways {
            let mut c = ReplyGatewayClient::new(ch.clone());
            c.reply(request("a0", "om_warm", "oc_warm"))
                .await
                .expect("warm");
        }
        for p in &cluster.ports {
            cli(*p, &["config", "resetstat"]);
        }
        let trips_before = redis_round_trips(&stack).await;
        let ops_before = calls_by_op(&stack).await;
        let forwarded_before = stack
            .gateway_metric("feishu_reply_peer_jobs_total{direction=\"out\",outcome=\"ok\"}")
            .await;
        let sent_before = stack.gateway_metric(SENT).await;
        let t = Instant::now();
        let mut calls = Vec::new();
        for i in 0..apps * per_app {
            let (app, n) = (i % apps, i / apps);
            let mut c = ReplyGatewayClient::new(stack.gateways[i % replicas].0.clone());
            let req = request(
                &format!("a{app}"),
                &format!("om_{app}_{n}"),
                &format!("oc_{app}_{n}"),
            );
            calls.push(tokio::spawn(async move {
                if jobs {
                    c.submit_reply(req).await.is_ok()
                } else {
                    c.reply(req).await.is_ok()
                }
            }));
        }
        let mut ok = 0u64;
        for c in calls {
            ok += u64::from(c.await.unwrap());
        }
        if jobs {
            // Every job sent, and its end written (no job left running).
            let t = Instant::now();
            while stack.gateway_metric(SENT).await - sent_before < ok as f64
                || stack.gateway_metric("feishu_reply_jobs_running").await > 0.0
            {
                if t.elapsed() > Duration::from_secs(120) {
                    panic!(
                        "jobs never all sent: {ok} submitted, {} sent, {} running",
                        stack.gateway_metric(SENT).await - sent_before,
                        stack.gateway_metric("feishu_reply_jobs_running").await
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let elapsed = t.elapsed();
        // The answers still waiting to be written back (a quiet slot's wait a decision to
        // carry them for 100 ms) are part of the cost: counted once they are written.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let served: Vec<u64> = cluster.ports.iter().map(|p| calls_served(*p)).collect();
        let total: u64 = served.iter().sum();
        // Round trips as the gateways count them (every op: decide, settle, heartbeat, …).
        let round_trips = redis_round_trips(&stack).await - trips_before;
        let forwarded = stack
            .gateway_metric("feishu_reply_peer_jobs_total{direction=\"out\",outcome=\"ok\"}")
            .await
            - forwarded_before;
        let busiest = served.iter().copied().max().unwrap_or(0);
        let by_op: Vec<String> = calls_by_op(&stack)
            .await
            .into_iter()
            .zip(ops_before)
            .filter(|((_, after), (_, before))| after > before)
            .map(|((op, after), (_, before))| {
                format!("{op} {:.2}", (after - before) / ok.max(1) as f64)
            })
            .collect();
        if std::env::var_os("LOADGEN_COMMANDSTATS").is_some() {
            for p in &cluster.ports {
                println!("{}", cli(*p, &["info", "commandstats"]));
            }
        }
        println!(
            "  {m} masters: {ok} replies in {:.1} s; Redis calls per send {:.2} (gateways' count, all ops); scripts per master {served:?}; busiest master {:.0} % of all; forwarded to the owner {:.0} %",
            elapsed.as_secs_f64(),
            round_trips / ok.max(1) as f64,
            100.0 * busiest as f64 / total.max(1) as f64,
            100.0 * forwarded / ok.max(1) as f64
        );
        println!("    per send by op: {}", by_op.join(", "));
    }
}

/// HTTP calls made to Feishu's reply endpoint, summed over outcomes.
const SENT: &str = "feishu_reply_upstream_latency_seconds_count{operation=\"reply\",";

/// The gateway's Redis ops, as `feishu_reply_redis_calls_total` names them.
const OPS: [&str; 21] = [
    "decide",
    "settle",
    "release",
    "heartbeat",
    "partitions",
    "block",
    "replay",
    "budget",
    "job_reserve",
    "job_submit",
    "job_announce",
    "job_news",
    "job_fence",
    "job_poll",
    "job_update",
    "job_release",
    "job_get",
    "job_expire",
    "job_adopt",
    "job_cancel",
    "job_wait",
];

/// Each op's calls, summed over outcomes and gateways.
async fn calls_by_op(stack: &super::Stack) -> Vec<(&'static str, f64)> {
    let mut out = Vec::new();
    for op in OPS {
        let series = format!("feishu_reply_redis_calls_total{{op=\"{op}\",");
        out.push((op, stack.gateway_metric(&series).await));
    }
    out
}

/// `feishu_reply_redis_calls_total` summed over every op, outcome and gateway.
async fn redis_round_trips(stack: &super::Stack) -> f64 {
    stack
        .gateway_metric("feishu_reply_redis_calls_total{")
        .await
}

fn request(app: &str, message_id: &str, chat_id: &str) -> ReplyRequest {
    ReplyRequest {
        app: app.into(),
        message_id: message_id.into(),
        chat_id: chat_id.into(),
        msg_type: "text".into(),
        content: r#"{"text":"share"}"#.into(),
        ..Default::default()
    }
}
