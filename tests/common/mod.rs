//! Test harness: a real gateway (gRPC + metrics ports on loopback) in front of a real fake
//! Feishu HTTP server, talking through the real reqwest client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use feishu_reply_gateway::config::Config;
use feishu_reply_gateway::fake_feishu::{FakeFeishu, FakeOptions};
use feishu_reply_gateway::proto::reply_gateway_client::ReplyGatewayClient;
use feishu_reply_gateway::proto::{
    GetReplyRequest, JobState, ReplyJob, ReplyRequest, ReplyResponse,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub struct TestGateway {
    pub client: ReplyGatewayClient<Channel>,
    pub channel: Channel,
    pub fake: FakeFeishu,
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// The app id of the one app `config_for` configures.
pub const APP_ID: &str = "cli_test";

/// Config text for one app on the fake; `extra` is appended (more sections, overrides).
/// Calls are anonymous unless `extra` configures callers.
pub fn config_for(fake: &FakeFeishu, extra: &str) -> Config {
    let auth = if extra.contains("[callers.") {
        ""
    } else {
        "[auth]\nallow_anonymous = true"
    };
    let text = format!(
        r#"
        [feishu]
        base_url = "{}"
        request_timeout_ms = 2000
        connect_timeout_ms = 500
        [apps.default]
        app_id = "{APP_ID}"
        app_secret = "secret"
        [retry]
        base_delay_ms = 20
        max_delay_ms = 200
        {auth}
        {extra}
        "#,
        fake.base_url()
    );
    Config::from_toml(&text).expect("test config is valid")
}

pub async fn spawn_fake(opts: FakeOptions) -> FakeFeishu {
    FakeFeishu::start(([127, 0, 0, 1], 0).into(), opts)
        .await
        .expect("bind fake Feishu")
}

/// Starts a gateway with the config `make` builds for the fake.
pub async fn spawn_gateway_with(
    opts: FakeOptions,
    make: impl FnOnce(&FakeFeishu) -> Config,
) -> TestGateway {
    let fake = spawn_fake(opts).await;
    let config = make(&fake);
    spawn_gateway_on(fake, config).await
}

pub async fn spawn_gateway(opts: FakeOptions, extra: &str) -> TestGateway {
    spawn_gateway_with(opts, |f| config_for(f, extra)).await
}

pub async fn spawn_gateway_on(fake: FakeFeishu, config: Config) -> TestGateway {
    start_gateway(fake, config, false).await
}

/// Like [`spawn_gateway_on`], but its `client` connects on first use (plaintext): for a
/// gateway that speaks TLS, tests build their own channels to `grpc_addr`.
pub async fn spawn_gateway_lazy(fake: FakeFeishu, config: Config) -> TestGateway {
    start_gateway(fake, config, true).await
}

async fn start_gateway(fake: FakeFeishu, config: Config, lazy: bool) -> TestGateway {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let metrics_addr = metrics.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        feishu_reply_gateway::app::run(config, None, grpc, metrics, async {
            let _ = rx.await;
        })
        .await
        .expect("gateway runs");
    });
    let endpoint = Channel::from_shared(format!("http://{grpc_addr}")).unwrap();
    let channel = if lazy {
        endpoint.connect_lazy()
    } else {
        endpoint.connect().await.expect("connect to gateway")
    };
    TestGateway {
        client: ReplyGatewayClient::new(channel.clone()),
        channel,
        fake,
        grpc_addr,
        metrics_addr,
        shutdown: Some(tx),
        task: Some(task),
    }
}

impl TestGateway {
    /// Triggers the shutdown sequence (like SIGTERM) and returns the gateway task.
    pub fn begin_shutdown(&mut self) -> JoinHandle<()> {
        let _ = self.shutdown.take().expect("not yet shut down").send(());
        self.task.take().expect("task")
    }

    pub async fn reply(&self, req: ReplyRequest) -> Result<ReplyResponse, tonic::Status> {
        self.client.clone().reply(req).await.map(|r| r.into_inner())
    }

    pub async fn reply_with_timeout(
        &self,
        req: ReplyRequest,
        timeout: Duration,
    ) -> Result<ReplyResponse, tonic::Status> {
        let mut r = tonic::Request::new(req);
        r.set_timeout(timeout);
        self.client.clone().reply(r).await.map(|r| r.into_inner())
    }

    /// The gRPC health status of the whole server (`""`), by name (`SERVING`, …).
    pub async fn health(&self) -> String {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        let s = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health answers")
            .into_inner();
        s.status().as_str_name().to_owned()
    }

    pub async fn http_get(&self, path: &str) -> (u16, String) {
        // reqwest is built without a default TLS provider (rustls-no-provider): whoever builds
        // a client installs one first. The gateway does so when it starts its Feishu client,
        // which may not have happened yet when a test asks for /metrics.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let resp = reqwest::get(format!("http://{}{path}", self.metrics_addr))
            .await
            .expect("metrics port answers");
        (resp.status().as_u16(), resp.text().await.unwrap())
    }
}

/// A text reply to `message_id` in `chat_id`.
pub fn text(message_id: &str, chat_id: &str, text: &str) -> ReplyRequest {
    ReplyRequest {
        message_id: message_id.into(),
        chat_id: chat_id.into(),
        msg_type: "text".into(),
        content: serde_json::json!({ "text": text }).to_string(),
        ..Default::default()
    }
}

/// A text message to a chat (`receive_id_type` `chat_id`) or a user (`open_id`, …).
pub fn send_text(
    receive_id_type: &str,
    receive_id: &str,
    text: &str,
) -> feishu_reply_gateway::proto::SendRequest {
    feishu_reply_gateway::proto::SendRequest {
        receive_id_type: receive_id_type.into(),
        receive_id: receive_id.into(),
        msg_type: "text".into(),
        content: serde_json::json!({ "text": text }).to_string(),
        ..Default::default()
    }
}

/// The `ErrorInfo` reason of a status ("" when it has none).
pub fn reason(s: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    s.get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// Largest number of sends within any window `w` in a sorted list of instants (ms).
pub fn max_in_window(times_ms: &[f64], w_ms: f64) -> usize {
    let mut t = times_ms.to_vec();
    t.sort_by(f64::total_cmp);
    let (mut best, mut lo) = (0, 0);
    for hi in 0..t.len() {
        while t[hi] - t[lo] >= w_ms {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// A free loopback port below the kernel's ephemeral range, so that no listener bound to port 0
/// (another test's gateway, fake or client) can take it while this Redis is down between
/// `kill()` and `restart()`. `salt` varies the choice between retries.
fn port_outside_ephemeral_range(salt: u64) -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let base: u16 = 10_000;
    let span = u64::from(low.saturating_sub(base).max(1));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    let seed = u64::from(std::process::id()) * 7919 + nanos + salt * 104_729;
    (0..1000u64)
        .map(|i| base + ((seed + i * 7_919) % span) as u16)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() && reserve_port(p))
        .expect("a free port below the ephemeral range")
}

/// Reserves `p` for this test process: a port is free until its process binds it, and the
/// tests running at the same time (each its own process) must not be handed it meanwhile, nor
/// this one twice. A file per port, created exclusively, is the reservation; one older than
/// 10 minutes (its test is long over) is taken back.
fn reserve_port(p: u16) -> bool {
    let dir = std::env::temp_dir().join("feishu-gateway-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(p.to_string());
    let take = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file)
            .is_ok()
    };
    if take() {
        return true;
    }
    let stale = std::fs::metadata(&file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > Duration::from_secs(600));
    stale && std::fs::remove_file(&file).is_ok() && take()
}

/// A real redis-server on a loopback port, owned by the test (killed on drop).
pub struct RedisServer {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
    /// Serving TLS only, with a certificate for 127.0.0.1 signed by `ca.pem` in `dir`.
    tls: bool,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// TLS only (`rediss://`): a fresh private CA (`ca_file`) signs the server's certificate.
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        // Another test process may pick the same free port at the same moment: then one of the
        // two redis-servers cannot bind it; that one tries another port.
        for attempt in 0..5 {
            let port = port_outside_ephemeral_range(attempt);
            let dir = std::env::temp_dir().join(format!("frg-redis-{port}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut r = Self {
                port,
                dir,
                child: None,
                tls,
            };
            if tls {
                r.make_certificates();
            }
            if r.try_restart().is_ok() {
                return r;
            }
        }
        panic!("could not start a redis-server on a free port");
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The CA that signed a TLS server's certificate.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.join("ca.pem")
    }

    fn make_certificates(&self) {
        make_ca(&self.dir, "feishu-reply-gateway");
        issue_cert(&self.dir, "server", "IP:127.0.0.1");
    }

    /// Starts (again) on the same port and waits until it accepts connections.
    /// Starts redis-server again on the same port (after [`Self::kill`]).
    pub fn restart(&mut self) {
        if let Err(e) = self.try_restart() {
            panic!("{e}");
        }
    }

    fn try_restart(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let mut cmd = std::process::Command::new("redis-server");
        if self.tls {
            cmd.args(["--port", "0", "--tls-port", &port])
                .args(["--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(self.dir.join("server.pem"))
                .arg("--tls-key-file")
                .arg(self.dir.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(self.ca_file());
        } else {
            cmd.args(["--port", &port]);
        }
        let child = cmd
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH (apt-get install redis-server; .ci/run does)");
        self.child = Some(child);
        // Ready when *this* redis-server answers: something else listening on the port (it
        // was free when chosen) must not pass for it.
        let t = std::time::Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited: {status}",
                    self.port
                ));
            }
            if self.answers() {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(10) {
                self.kill();
                return Err(format!("redis-server on port {} did not start", self.port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether this server is up: a PING answered PONG (plain), or its port accepts while the
    /// process lives (TLS, checked by the caller).
    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        if self.tls {
            return true;
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// SIGSTOP / SIGCONT: a stall (connections stay open, commands wait in the socket).
    pub fn pause(&self, stop: bool) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let sig = if stop { "-STOP" } else { "-CONT" };
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    }

    /// SIGKILL: an outage, not a clean shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A Redis Cluster of `n` primaries (no replicas) on loopback ports, slots spread by
/// `redis-cli --cluster create`.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    dir: std::path::PathBuf,
    children: Vec<std::process::Child>,
}

impl RedisCluster {
    pub fn start(n: usize) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "frg-cluster-{}-{}",
            std::process::id(),
            port_outside_ephemeral_range(0)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Self {
            ports: Vec::new(),
            dir,
            children: Vec::new(),
        };
        for i in 0..n {
            let (port, child) = c.start_node(i as u64);
            c.ports.push(port);
            c.children.push(child);
        }
        let nodes: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli on PATH");
        assert!(out.status.success(), "redis-cli --cluster create: {out:?}");
        // Every node must agree before the test starts.
        for p in &c.ports {
            let t = std::time::Instant::now();
            loop {
                let info = std::process::Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "cluster never became ok"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        c
    }
}

impl RedisCluster {
    /// Starts one node on a port below the ephemeral range. Another test process may take
    /// the same port between our check and redis-server's bind: a node that exits without
    /// listening is started again on another port (its log says why).
    fn start_node(&self, i: u64) -> (u16, std::process::Child) {
        for attempt in 0..5u64 {
            let p = port_outside_ephemeral_range(1 + i + attempt * 1000);
            let log = self.dir.join(format!("node-{p}.log"));
            let mut child = std::process::Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &p.to_string()])
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(format!("nodes-{p}.conf"))
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(&self.dir)
                .arg("--logfile")
                .arg(&log)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("redis-server on PATH");
            let t = std::time::Instant::now();
            loop {
                // Ours answering, not another test's server on the same port.
                if redis_pid_on(p) == Some(child.id()) {
                    return (p, child);
                }
                if child.try_wait().unwrap().is_some() {
                    eprintln!(
                        "redis-server on {p} exited (attempt {attempt}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "redis-server on {p} did not start: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("redis-server did not start on any of 5 ports");
    }
}

/// The process id of the redis-server answering on `port` (`INFO server`), if one does.
fn redis_pid_on(port: u16) -> Option<u32> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.write_all(b"INFO server\r\n").ok()?;
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.contains("process_id:") || !text[text.find("process_id:")?..].contains('\n') {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let rest = &text[text.find("process_id:")? + "process_id:".len()..];
    rest.lines().next()?.trim().parse().ok()
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The value of one series (`name{labels}` exactly as exported) in a Prometheus text page;
/// comment lines (HELP/TYPE) never match.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        if name == series {
            value.parse().ok()
        } else {
            None
        }
    })
}

/// The metrics text of a gateway process whose metrics port is `port`.
pub async fn metrics_text(port: u16) -> String {
    // reqwest is built without a default TLS provider (the gateway picks ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .and_then(|r| r.error_for_status())
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls `/metrics` until `series` has value `want` (bounded): waiting for a state, not
/// timing it.
pub async fn wait_for_metric(gw: &TestGateway, series: &str, want: f64, within: Duration) -> bool {
    let t = std::time::Instant::now();
    loop {
        if metric(&gw.http_get("/metrics").await.1, series) == Some(want) {
            return true;
        }
        if t.elapsed() > within {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `openssl` in `dir` (scripts/test installs it).
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl on PATH (scripts/test installs it)");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// A throwaway certificate authority in a temporary directory.
pub struct TestPki {
    pub dir: std::path::PathBuf,
}

impl TestPki {
    /// A new CA (`ca.pem`, `ca.key`) named `name`.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "gw-pki-{name}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        make_ca(&dir, name);
        Self { dir }
    }

    /// Issues `<stem>.pem` / `<stem>.key` with subjectAltName `san` (e.g. `URI:spiffe://x`).
    pub fn issue(&self, stem: &str, san: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        issue_cert(&self.dir, stem, san)
    }

    pub fn ca(&self) -> std::path::PathBuf {
        self.dir.join("ca.pem")
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA in `dir`: `ca.pem`, `ca.key`.
fn make_ca(dir: &std::path::Path, name: &str) {
    let subject = format!("/CN={name} test CA");
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", &subject,
        ],
    );
}

/// `<stem>.pem` / `<stem>.key` in `dir`, signed by its CA, with subjectAltName `san`.
fn issue_cert(
    dir: &std::path::Path,
    stem: &str,
    san: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let ext = format!("{stem}.cnf");
    std::fs::write(dir.join(&ext), format!("subjectAltName={san}\n")).unwrap();
    let (key, csr, pem) = (
        format!("{stem}.key"),
        format!("{stem}.csr"),
        format!("{stem}.pem"),
    );
    let subject = format!("/CN={stem}");
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
            &subject,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
    (dir.join(pem), dir.join(key))
}

/// Polls `cond` every 5 ms until it holds; panics naming `what` after 10 s.
pub async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let t = std::time::Instant::now();
    while !cond().await {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The message ids of every reply request `fake` received, in arrival order.
pub fn received_ids(fake: &FakeFeishu) -> Vec<String> {
    fake.received().into_iter().map(|r| r.message_id).collect()
}

/// `token_sha256` for a caller's token, as the config file wants it (hex).
pub fn token_sha256(token: &str) -> String {
    feishu_reply_gateway::config::token_hash(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A free loopback port for a process that binds it itself: below the ephemeral range, so
/// no outgoing connection takes it meanwhile, and reserved, so no other test is given it.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(100);
    port_outside_ephemeral_range(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// A `serve` process (killed with SIGKILL when dropped).
pub struct ServeProcess(std::process::Child);

impl ServeProcess {
    /// `serve --config config` with gRPC on `port`.
    pub fn start(config: &std::path::Path, port: u16) -> Self {
        Self::start_with(config, port, &[])
    }

    /// [`ServeProcess::start`] with `env` set on top (an `OTEL_*` from the test's own
    /// environment is never inherited). To debug one: `GATEWAY_TEST_SERVE_LOG` is its
    /// `RUST_LOG` (default `warn`), and with `GATEWAY_TEST_SERVE_LOGDIR` each process logs to
    /// its own file there (`serve-<port>-<start ms>.log`) instead of the test's stderr.
    pub fn start_with(config: &std::path::Path, port: u16, env: &[(&str, &str)]) -> Self {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_feishu-reply-gateway"));
        for (k, _) in std::env::vars_os().filter(|(k, _)| k.to_string_lossy().starts_with("OTEL_"))
        {
            cmd.env_remove(k);
        }
        let child = cmd
            .args(["serve", "--config"])
            .arg(config)
            .env("GATEWAY_GRPC_ADDR", format!("127.0.0.1:{port}"))
            .env("GATEWAY_METRICS_ADDR", "127.0.0.1:0")
            .env(
                "RUST_LOG",
                std::env::var("GATEWAY_TEST_SERVE_LOG").unwrap_or("warn".into()),
            )
            .env_remove("FEISHU_APP_ID")
            .env_remove("FEISHU_APP_SECRET")
            .env_remove("GATEWAY_DATA_DIR")
            .env_remove("GATEWAY_REDIS_URL")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(match std::env::var("GATEWAY_TEST_SERVE_LOGDIR") {
                Ok(d) => std::process::Stdio::from(
                    std::fs::File::create(format!(
                        "{d}/serve-{port}-{}.log",
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap()
                            .as_millis()
                    ))
                    .unwrap(),
                ),
                Err(_) => std::process::Stdio::inherit(),
            })
            .spawn()
            .expect("start serve");
        Self(child)
    }

    /// Sends `signal` (`TERM`, `STOP`, `CONT`…).
    pub fn signal(&self, signal: &str) {
        let pid = self.0.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args([&format!("-{signal}"), &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// SIGTERM, then waits (at most 30 s) for the process to exit.
    pub async fn terminate(&mut self) {
        self.signal("TERM");
        let t = std::time::Instant::now();
        while self.0.try_wait().unwrap().is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "SIGTERM did not stop it"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client of the gateway on `port`, once it listens (at most 30 s).
pub async fn connect(port: u16) -> ReplyGatewayClient<Channel> {
    let t = std::time::Instant::now();
    loop {
        if let Ok(ch) = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
        {
            return ReplyGatewayClient::new(ch);
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the gateway never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The start of a `[cluster]` section on Redis `url` under `prefix`: `redis_mode = "cluster"`
/// when `url` lists several seeds (`scripts/test` runs the cluster tests a second time on a
/// 3-master Redis Cluster, `GATEWAY_TEST_REDIS_URL=redis://a,redis://b,…`).
pub fn cluster_section(url: &str, prefix: &str) -> String {
    let mode = if is_redis_cluster(url) {
        "redis_mode = \"cluster\"\n"
    } else {
        ""
    };
    format!("[cluster]\nredis_url = \"{url}\"\nkey_prefix = \"{prefix}\"\n{mode}")
}

/// `extra` goes into `[cluster]` (or starts later sections). Held replies are failed 200 ms
/// before the caller's deadline (default 20): on a loaded machine the gateway's
/// DEADLINE_EXCEEDED must beat the client's own timer, which would answer CANCELLED.
pub fn cluster_config(fake: &FakeFeishu, redis_url: &str, prefix: &str, extra: &str) -> Config {
    let mut config = config_for(
        fake,
        &format!(
            "{}replicas = 3\n{extra}",
            cluster_section(redis_url, prefix)
        ),
    );
    config.queue.min_send_budget = Duration::from_millis(200);
    config
}

/// Three replicas in cluster mode on the shared Redis (keys under a fresh prefix named after
/// `name`) and their fake, where every request arrives up to 30 ms late and the first on each
/// connection 50 ms later still: shared windows must hold by arrival bounds, not by send
/// instants.
pub async fn three_late_arriving_replicas(
    name: &str,
) -> (Option<RedisServer>, FakeFeishu, Vec<TestGateway>) {
    let (url, redis) = shared_redis();
    let fake = spawn_fake(FakeOptions {
        inbound_jitter: Duration::from_millis(30),
        cold_connection: Duration::from_millis(50),
        ..FakeOptions::default()
    })
    .await;
    let prefix = format!("test-{name}-{}", uuid::Uuid::new_v4().simple());
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let config = cluster_config(&fake, &url, &prefix, "");
        replicas.push(spawn_gateway_on(fake.clone(), config).await);
    }
    (redis, fake, replicas)
}

/// A client of Redis `url` (keys under `prefix`) as a replica of its own would have, with a
/// job and partition lease of `lease`.
pub fn redis_client(
    url: &str,
    prefix: &str,
    lease: Duration,
) -> std::sync::Arc<feishu_reply_gateway::redis_conn::SharedRedis> {
    use feishu_reply_gateway::config::{ClusterConfig, RedisFailurePolicy, RedisMode};
    use feishu_reply_gateway::jobs::RedisJobsConfig;
    let config = ClusterConfig {
        redis_url: url.into(),
        redis_mode: if is_redis_cluster(url) {
            RedisMode::Cluster
        } else {
            RedisMode::Standalone
        },
        redis_ca_pem: None,
        key_prefix: prefix.into(),
        redis_timeout: Duration::from_secs(2),
        on_failure: RedisFailurePolicy::Local,
        replicas: 2,
        jobs: RedisJobsConfig {
            lease,
            wait_replicas: 0,
        },
        peers: None,
    };
    let metrics = std::sync::Arc::new(feishu_reply_gateway::metrics::Metrics::new());
    std::sync::Arc::new(
        feishu_reply_gateway::redis_conn::SharedRedis::new(config, metrics).unwrap(),
    )
}

/// Whether `url` names a Redis Cluster (several seeds).
pub fn is_redis_cluster(url: &str) -> bool {
    url.contains(',')
}

/// Redis for a test: the one `scripts/test` started (GATEWAY_TEST_REDIS_URL) or a private one.
pub fn shared_redis() -> (String, Option<RedisServer>) {
    match std::env::var("GATEWAY_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => (url, None),
        _ => {
            let r = RedisServer::start();
            (r.url(), Some(r))
        }
    }
}

/// A standalone Redis for a test: the shared one unless it is a Redis Cluster, else a
/// private redis-server (for what only a standalone Redis offers, e.g. WAIT).
pub fn standalone_redis() -> (String, Option<RedisServer>) {
    match shared_redis() {
        (url, _) if is_redis_cluster(&url) => {
            let r = RedisServer::start();
            (r.url(), Some(r))
        }
        shared => shared,
    }
}

/// Jobs for the backlog tests: 45 (3 s at 5/s over 3 chats), or `GATEWAY_TEST_JOBS` (300 is
/// the issue's size: 20 s).
pub fn backlog_jobs() -> usize {
    std::env::var("GATEWAY_TEST_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(45)
}

/// Submits `n` jobs round-robin to 3 chats `oc_<tag>0..2`, messages `om_<tag><i>_in_<tag><c>`
/// (the fake puts them in those chats, numbered in submit order); their ids.
pub async fn submit_backlog(
    c: &mut ReplyGatewayClient<Channel>,
    tag: &str,
    n: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let chat = i % 3;
        // Every fourth job is a send to the chat (its text names it in `posts`): sends and
        // replies share one queue per chat, and its order.
        let r = if i % 4 == 3 {
            c.submit_send(send_text(
                "chat_id",
                &format!("oc_{tag}{chat}"),
                &format!("{tag}{i:04}"),
            ))
            .await
        } else {
            c.submit_reply(text(
                &format!("om_{tag}{i:04}_in_{tag}{chat}"),
                &format!("oc_{tag}{chat}"),
                &format!("{tag} {i}"),
            ))
            .await
        };
        ids.push(r.expect("submit").into_inner().job_id);
    }
    ids
}

/// Posts at the fake: successes (not deduped) per uuid, and message ids per chat in the order
/// posted (a send, which replies to no message, as `om_<its text>`).
pub fn posts(
    fake: &FakeFeishu,
) -> (
    std::collections::HashMap<String, usize>,
    std::collections::HashMap<String, Vec<String>>,
) {
    let mut by_uuid = std::collections::HashMap::<String, usize>::new();
    let mut per_chat = std::collections::HashMap::<String, Vec<String>>::new();
    for r in fake.received().iter().filter(|r| r.code == 0 && !r.deduped) {
        *by_uuid.entry(r.uuid.clone()).or_default() += 1;
        let key = match r.operation.as_str() {
            "send" => serde_json::from_str::<serde_json::Value>(&r.content)
                .ok()
                .and_then(|v| v["text"].as_str().map(|t| format!("om_{t}")))
                .unwrap_or_default(),
            _ => r.message_id.clone(),
        };
        per_chat.entry(r.chat_id.clone()).or_default().push(key);
    }
    (by_uuid, per_chat)
}

/// How many times replies to `message_id` were posted (deduped retries not counted).
pub fn posts_to(fake: &FakeFeishu, message_id: &str) -> usize {
    fake.received()
        .iter()
        .filter(|r| r.code == 0 && !r.deduped && r.message_id == message_id)
        .count()
}

/// Message ids (numbered in submit order) posted in each of `chats` chats in order.
pub fn assert_in_order(per_chat: &std::collections::HashMap<String, Vec<String>>, chats: usize) {
    assert_eq!(per_chat.len(), chats, "{per_chat:?}");
    for (chat, ids) in per_chat {
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, &sorted, "order in {chat}");
    }
}

/// Job `job_id` as `GetReply` shows it.
pub async fn get_job(c: &mut ReplyGatewayClient<Channel>, job_id: &str) -> ReplyJob {
    c.get_reply(GetReplyRequest {
        job_id: job_id.into(),
    })
    .await
    .expect("GetReply")
    .into_inner()
}

/// Opens `WatchReply` on job `job_id`.
pub async fn watch_job(
    c: &mut ReplyGatewayClient<Channel>,
    job_id: &str,
) -> tonic::Streaming<ReplyJob> {
    c.watch_reply(GetReplyRequest {
        job_id: job_id.into(),
    })
    .await
    .expect("WatchReply")
    .into_inner()
}

/// The states a watch streams until it ends.
pub async fn watched_states(watch: &mut tonic::Streaming<ReplyJob>) -> Vec<JobState> {
    let mut seen = Vec::new();
    while let Some(job) = watch.message().await.expect("a state") {
        seen.push(job.state());
    }
    seen
}

/// `serve` with the given extra args and env, no app in the environment; its exit code and
/// stderr (it must exit on its own, before binding anything). `GATEWAY_*` job store settings
/// and apps come only from `args` and `env`.
pub fn serve_refusal(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_feishu-reply-gateway"));
    cmd.arg("serve")
        .args(args)
        .env("GATEWAY_GRPC_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("GATEWAY_METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .env_remove("FEISHU_APP_ID")
        .env_remove("FEISHU_APP_SECRET")
        .env_remove("GATEWAY_CONFIG")
        .env_remove("GATEWAY_EMBEDDED_FAKE")
        .env_remove("GATEWAY_ALLOW_ANONYMOUS")
        .env_remove("GATEWAY_DATA_DIR")
        .env_remove("GATEWAY_RESET_JOB_STORE")
        .env_remove("GATEWAY_OWNER_WINDOWS")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("serve kept running: it must refuse to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status.code(), err)
}
