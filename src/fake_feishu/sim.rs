//! A simulated Feishu inside the process, on tokio's clock: an [`Upstream`] for tests and
//! benches that run in virtual time (`tokio::time::pause`). It models the network between the
//! gateway and Feishu (one-way latency, a random inbound delay, the handshake of each new
//! connection) and counts Feishu's quotas where Feishu does: when a request *arrives*. Like
//! the HTTP fake it refuses with Feishu's codes, dedupes uuid and records every arrival; it
//! does not model tokens (the real client's token cache is tested over HTTP).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::window::{Counter, counter_record, counter_retry_after, next_f64};
use super::{FakeQuota, FakeStats, WindowMode, message_info_unregistered};
use crate::feishu::{AppIndex, BoxFuture, SendRequest, SentMessage, Upstream, UpstreamError};

/// The network and quotas of a [`SimFeishu`].
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// One-way latency, each way.
    pub latency: Duration,
    /// Each request arrives after a further random delay in [0, this].
    pub inbound_jitter: Duration,
    /// The first request on a new connection arrives this much later (TLS handshake). A
    /// request opens a new connection when no idle one is left, as an HTTP client pool does.
    pub cold_connection: Duration,
    pub window: WindowMode,
    pub chat_quota: FakeQuota,
    pub app_quotas: Vec<FakeQuota>,
    /// Seed of the random delays (runs are reproducible).
    pub seed: u64,
}

impl Default for SimOptions {
    fn default() -> Self {
        let d = super::FakeOptions::default();
        Self {
            latency: Duration::from_millis(1),
            inbound_jitter: Duration::ZERO,
            cold_connection: Duration::ZERO,
            window: WindowMode::Sliding,
            chat_quota: d.chat_quota,
            app_quotas: d.app_quotas,
            seed: 0x9E37_79B9_7F4A_7C15,
        }
    }
}

/// One request as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimArrival {
    /// Since the simulation started.
    pub at: Duration,
    pub message_id: String,
    pub chat_id: String,
    pub uuid: String,
    /// Feishu code answered (0 = posted or deduped).
    pub code: i64,
}

struct State {
    idle_connections: usize,
    rng: u64,
    counters: HashMap<(u8, String), Counter>,
    posted: HashSet<String>,
    arrivals: Vec<SimArrival>,
    /// Answers forced on the next requests (instead of the quota check).
    scripted: VecDeque<UpstreamError>,
    stats: FakeStats,
}

/// The simulated Feishu (see the module doc).
pub struct SimFeishu {
    opts: SimOptions,
    started: Instant,
    state: Mutex<State>,
}

impl SimFeishu {
    pub fn new(opts: SimOptions) -> Self {
        Self {
            started: Instant::now(),
            state: Mutex::new(State {
                idle_connections: 0,
                rng: opts.seed.max(1),
                counters: HashMap::new(),
                posted: HashSet::new(),
                arrivals: Vec::new(),
                scripted: VecDeque::new(),
                stats: FakeStats::default(),
            }),
            opts,
        }
    }

    /// Every request in arrival order.
    pub fn arrivals(&self) -> Vec<SimArrival> {
        self.state.lock().arrivals.clone()
    }

    pub fn stats(&self) -> FakeStats {
        self.state.lock().stats.clone()
    }

    /// The next request that arrives gets `error` instead of the quota check.
    pub fn push_error(&self, error: UpstreamError) {
        self.state.lock().scripted.push_back(error);
    }

    /// Counts a request arriving now; `Err` is Feishu's refusal.
    fn arrive(&self, req: &SendRequest) -> Result<SentMessage, UpstreamError> {
        let now = Instant::now();
        let chat_id = message_info_unregistered(&req.message_id).chat_id;
        let mut st = self.state.lock();
        st.stats.reply_requests += 1;
        let mut log = SimArrival {
            at: now - self.started,
            message_id: req.message_id.clone(),
            chat_id: chat_id.clone(),
            uuid: req.uuid.clone(),
            code: 0,
        };
        let result = self.decide(&mut st, req, &chat_id, now);
        if let Err(e) = &result {
            log.code = e.code().unwrap_or(-1);
        }
        st.arrivals.push(log);
        result
    }

    fn decide(
        &self,
        st: &mut State,
        req: &SendRequest,
        chat_id: &str,
        now: Instant,
    ) -> Result<SentMessage, UpstreamError> {
        let sent = SentMessage {
            message_id: format!("om_sim_{}", req.uuid),
            chat_id: chat_id.to_owned(),
            msg_type: req.msg_type.to_owned(),
            ..Default::default()
        };
        if st.posted.contains(&req.uuid) {
            st.stats.deduped += 1;
            return Ok(sent);
        }
        if let Some(e) = st.scripted.pop_front() {
            st.stats.faults += 1;
            return Err(e);
        }
        let o = &self.opts;
        let mut checks = vec![((0u8, chat_id.to_owned()), o.chat_quota)];
        for (i, q) in o.app_quotas.iter().enumerate() {
            checks.push(((2 + i as u8, "app".to_owned()), *q));
        }
        for (key, q) in &checks {
            let after = counter_retry_after(st.counters.get(key), *q, o.window, now, self.started);
            if let Some(after) = after {
                let (http, code, retry_after) = if key.0 < 2 {
                    st.stats.rejected_chat_user += 1;
                    (400, 230020, None)
                } else {
                    st.stats.rejected_app += 1;
                    (
                        429,
                        99991400,
                        Some(Duration::from_secs(after.as_secs_f64().ceil() as u64)),
                    )
                };
                return Err(UpstreamError::Feishu {
                    http,
                    code,
                    msg: "frequency limit".into(),
                    log_id: String::new(),
                    retry_after,
                });
            }
        }
        for (key, q) in checks {
            let c = st
                .counters
                .entry(key)
                .or_insert_with(|| Counter::new(o.window, q, now));
            counter_record(c, q, now, self.started);
        }
        st.posted.insert(req.uuid.clone());
        st.stats.posted += 1;
        Ok(sent)
    }
}

impl Upstream for SimFeishu {
    fn reply<'a>(
        &'a self,
        _app: AppIndex,
        req: &'a SendRequest,
    ) -> BoxFuture<'a, Result<SentMessage, UpstreamError>> {
        Box::pin(async move {
            let inbound = {
                let mut st = self.state.lock();
                let cold = if st.idle_connections > 0 {
                    st.idle_connections -= 1;
                    Duration::ZERO
                } else {
                    self.opts.cold_connection
                };
                let jitter = self.opts.inbound_jitter.mul_f64(next_f64(&mut st.rng));
                self.opts.latency + cold + jitter
            };
            tokio::time::sleep(inbound).await;
            let result = self.arrive(req);
            tokio::time::sleep(self.opts.latency).await;
            self.state.lock().idle_connections += 1;
            result
        })
    }

    fn message_chat<'a>(
        &'a self,
        _app: AppIndex,
        message_id: &'a str,
    ) -> BoxFuture<'a, Result<String, UpstreamError>> {
        Box::pin(async move { Ok(message_info_unregistered(message_id).chat_id) })
    }
}
