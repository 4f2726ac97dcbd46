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

use super::book::{APP_KIND, Book, Card, CardChange, Landing, TargetQuotas, counters};
use super::window::{Counter, counter_record, counter_retry_after, next_f64};
use super::{FakeQuota, FakeStats, WindowMode, message_info_unregistered};
use crate::feishu::{Api, AppIndex, BoxFuture, Call, SentMessage, Upstream, UpstreamError};

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
    pub user_quota: FakeQuota,
    /// Per message (updates, recall).
    pub message_quota: FakeQuota,
    /// Per CardKit card (its text and settings: 10/s).
    pub card_quota: FakeQuota,
    /// Feishu turns a card's streaming mode off this long after it was turned on.
    pub card_streaming_limit: Duration,
    /// Per app, for each API on its own (see `app_scope_api`).
    pub app_quotas: Vec<FakeQuota>,
    /// Each API has its own app windows (Feishu's documented rule); false: one set for all.
    pub app_scope_api: bool,
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
            user_quota: d.user_quota,
            message_quota: d.message_quota,
            card_quota: d.card_quota,
            card_streaming_limit: d.card_streaming_limit,
            app_quotas: d.app_quotas,
            app_scope_api: d.app_scope_api,
            seed: 0x9E37_79B9_7F4A_7C15,
        }
    }
}

/// One request as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimArrival {
    /// Since the simulation started.
    pub at: Duration,
    pub api: Api,
    /// The message replied to, updated or recalled (empty for a send).
    pub message_id: String,
    /// The chat (or, for a send to a user, the user; for an update, the message) it counts in.
    pub chat_id: String,
    pub uuid: String,
    /// The content sent (empty for a recall).
    pub content: String,
    /// Feishu code answered (0 = posted or deduped).
    pub code: i64,
}

struct State {
    idle_connections: usize,
    rng: u64,
    counters: HashMap<(u8, String), Counter>,
    posted: HashSet<String>,
    book: Book,
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
                book: Book::default(),
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

    /// Card `card_id` as Feishu keeps it now.
    pub fn card(&self, card_id: &str) -> Option<Card> {
        self.state.lock().book.cards.get(card_id).cloned()
    }

    /// The next request that arrives gets `error` instead of the quota check.
    pub fn push_error(&self, error: UpstreamError) {
        self.state.lock().scripted.push_back(error);
    }

    /// Counts a request arriving now; `Err` is Feishu's refusal.
    fn arrive(&self, call: &Call) -> Result<SentMessage, UpstreamError> {
        let now = Instant::now();
        let api = call.api();
        let (chat, user, message) = match call {
            Call::Reply(r) => (
                Some(message_info_unregistered(&r.message_id).chat_id),
                None,
                None,
            ),
            Call::Send(m) if m.receive_id_type == "chat_id" => {
                (Some(m.receive_id.clone()), None, None)
            }
            Call::Send(m) => (None, Some(m.receive_id.clone()), None),
            Call::Update(_) | Call::Recall { .. } => {
                (None, None, Some(call.message_id().to_owned()))
            }
            Call::CardCreate { .. } | Call::CardText(_) | Call::CardStreaming(_) => {
                (None, None, None)
            }
        };
        let card = call.card_id().to_owned();
        let landing = Landing {
            api,
            chat: chat.as_deref(),
            user: user.as_deref(),
            message: message.as_deref(),
            card: (!card.is_empty()).then_some(card.as_str()),
            app_id: "app",
        };
        let mut st = self.state.lock();
        st.stats.reply_requests += u64::from(api == Api::Reply);
        *st.stats
            .requests_by_operation
            .entry(api.as_str().to_owned())
            .or_default() += 1;
        let mut log = SimArrival {
            at: now - self.started,
            api,
            message_id: call.message_id().to_owned(),
            chat_id: chat
                .clone()
                .or(user.clone())
                .or(message.clone())
                .unwrap_or_else(|| card.clone()),
            uuid: call.uuid().to_owned(),
            content: call.content().to_owned(),
            code: 0,
        };
        let result = self.decide(&mut st, call, &landing, &log.chat_id, now);
        if let Err(e) = &result {
            log.code = e.code().unwrap_or(-1);
        }
        st.arrivals.push(log);
        result
    }

    fn decide(
        &self,
        st: &mut State,
        call: &Call,
        landing: &Landing<'_>,
        chat_id: &str,
        now: Instant,
    ) -> Result<SentMessage, UpstreamError> {
        let uuid = call.uuid();
        let sent = match call {
            Call::Reply(_) | Call::Send(_) => SentMessage {
                message_id: format!("om_sim_{uuid}"),
                chat_id: chat_id.to_owned(),
                ..Default::default()
            },
            _ => SentMessage::default(),
        };
        if !uuid.is_empty() && st.posted.contains(uuid) {
            st.stats.deduped += 1;
            return Ok(sent);
        }
        if let Some(e) = st.scripted.pop_front() {
            st.stats.faults += 1;
            return Err(e);
        }
        let feishu = |http, code, msg: &str, retry_after| UpstreamError::Feishu {
            http,
            code,
            msg: msg.into(),
            log_id: String::new(),
            retry_after,
        };
        if let Some((code, msg)) = st.book.refusal(landing.api, call.message_id()) {
            return Err(feishu(400, code, msg, None));
        }
        let o = &self.opts;
        let targets = TargetQuotas {
            chat: o.chat_quota,
            user: o.user_quota,
            message: o.message_quota,
            card: o.card_quota,
        };
        let checks = counters(landing, targets, &o.app_quotas, o.app_scope_api);
        for (key, q) in &checks {
            let after = counter_retry_after(st.counters.get(key), *q, o.window, now, self.started);
            if let Some(after) = after {
                return Err(if key.0 < APP_KIND {
                    st.stats.rejected_chat_user += 1;
                    feishu(400, 230020, "frequency limit", None)
                } else {
                    st.stats.rejected_app += 1;
                    let reset = Duration::from_secs(after.as_secs_f64().ceil() as u64);
                    feishu(429, 99991400, "frequency limit", Some(reset))
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
        st.book.record(landing.api, call.message_id());
        let limit = o.card_streaming_limit;
        let card = match call {
            Call::CardCreate { card_json } => {
                Some(st.book.create_card(card_json, "app", now).map(Some))
            }
            Call::CardText(t) => {
                let change = CardChange::Text {
                    element_id: &t.element_id,
                    content: &t.content,
                };
                Some(
                    st.book
                        .change_card(&t.card_id, "app", t.sequence, change, now, limit)
                        .map(|_| None),
                )
            }
            Call::CardStreaming(c) => {
                let change = CardChange::Streaming(c.on);
                Some(
                    st.book
                        .change_card(&c.card_id, "app", c.sequence, change, now, limit)
                        .map(|_| None),
                )
            }
            _ => None,
        };
        let mut sent = sent;
        match card {
            Some(Err((code, msg))) => return Err(feishu(400, code, msg, None)),
            Some(Ok(Some(id))) => sent.card_id = id,
            _ => {}
        }
        if !uuid.is_empty() {
            st.posted.insert(uuid.to_owned());
        }
        st.stats.posted += u64::from(matches!(call, Call::Reply(_) | Call::Send(_)));
        Ok(sent)
    }
}

impl Upstream for SimFeishu {
    fn call<'a>(
        &'a self,
        _app: AppIndex,
        req: &'a Call,
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
