//! Where each quota lives in the quota table: chat, user, message, the app quotas every app
//! shares (`[quotas] app`), then each list an app has of its own (`[apps.NAME] quotas`); and
//! which of them a job counts in ([`keys_in`]: its target's, and its app's for its API).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use super::{CARD_QUOTA, CHAT_QUOTA, FIRST_APP_QUOTA, MESSAGE_QUOTA, USER_QUOTA};
use crate::config::{AppScope, QuotaConfig};
use crate::feishu::Api;
use crate::quota::{QuotaId, QuotaKey, QuotaSpec};

/// Which per-target quotas a job counts in besides its app's. The queue it waits in is
/// `JobSpec::chat_id` ([`user_queue`], [`message_queue`] for the last two).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A reply, or a send to a chat (`chat_id`): the chat's quota, and the user's when
    /// `user_id` is known.
    Chat,
    /// A send to a user (`user_id`): the user's quota.
    User,
    /// An update or a recall of the call's message: the message's quota, and `chat`'s when
    /// given (`[quotas] updates_count_in_chat`).
    Message { chat: Option<Arc<str>> },
    /// A CardKit card's text or settings (the call's card): the card's quota (10/s, all of
    /// its operations together).
    Card,
    /// No target of its own (a card entity's creation): its app's windows only.
    App,
}

/// How a job competes for its app's windows with the app's other jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lane {
    /// In turn with the others.
    #[default]
    Normal,
    /// A stream's intermediate text: it may wait, so it leaves `[quotas]
    /// final_headroom_percent` of each app window free (it also counts in the window's
    /// typing twin, whose limit is that much lower).
    Typing,
    /// A stream's final text or a card's settings: tried before the app's other jobs whenever
    /// several may go, and may use the headroom typing leaves.
    Final,
}

/// The queue of one card's operations (one FIFO per card).
pub fn card_queue(card_id: &str) -> Arc<str> {
    format!("card:{card_id}").into()
}

/// The queue of sends to user `key` (one FIFO per user).
pub fn user_queue(key: &str) -> Arc<str> {
    format!("user:{key}").into()
}

/// The queue of the updates and recall of message `id` (one FIFO per message).
pub fn message_queue(id: &str) -> Arc<str> {
    format!("message:{id}").into()
}

/// What one job is, for its quota keys.
pub struct KeysOf<'a> {
    pub target: &'a Target,
    /// The queue: the chat for [`Target::Chat`].
    pub chat_id: &'a Arc<str>,
    pub user_id: Option<&'a Arc<str>>,
    /// The message of a [`Target::Message`], the card of a [`Target::Card`].
    pub message_id: &'a str,
    pub app_id: &'a Arc<str>,
    pub api: Api,
    pub lane: Lane,
}

/// A quota a live reload replaced, for one app and API: the sends its key (`app_id`: the
/// app's key for the API, [`QuotaLayout::app_key`]) counted in `from` count in `to` from now
/// on (same kind: same window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Moved {
    pub from: QuotaId,
    pub to: QuotaId,
    pub app_id: Arc<str>,
}

#[derive(Debug, Clone)]
pub(super) struct QuotaLayout {
    /// Whether each API has app windows of its own.
    scope: AppScope,
    /// Every quota, by id.
    pub specs: Vec<QuotaSpec>,
    /// Each quota's kind as shared stores name it (`chat`, `user`, `app:<window>ms`): a key is
    /// (kind, id), and an app_id uses one list, so two lists never share a key.
    pub kinds: Vec<String>,
    default_app: Range<usize>,
    per_app: HashMap<Arc<str>, Range<usize>>,
    /// `[quotas] final_headroom_percent`.
    headroom_percent: u8,
    /// Each app quota's typing twin: the same window, a limit `headroom_percent` lower
    /// ([`Lane::Typing`]; none with no headroom).
    typing: HashMap<usize, usize>,
}

impl QuotaLayout {
    pub fn new(q: &QuotaConfig) -> Self {
        let mut specs = vec![q.chat, q.user, q.message, q.card];
        debug_assert_eq!(
            (
                specs.len(),
                CHAT_QUOTA,
                USER_QUOTA,
                MESSAGE_QUOTA,
                CARD_QUOTA
            ),
            (FIRST_APP_QUOTA, 0, 1, 2, 3)
        );
        let mut push = |list: &[QuotaSpec]| {
            let start = specs.len();
            specs.extend_from_slice(list);
            start..specs.len()
        };
        let default_app = push(&q.app);
        let per_app = q
            .per_app
            .iter()
            .map(|(id, list)| (Arc::from(id.as_str()), push(list)))
            .collect();
        let kinds = specs
            .iter()
            .enumerate()
            .map(|(i, s)| match i {
                CHAT_QUOTA => "chat".to_owned(),
                USER_QUOTA => "user".to_owned(),
                MESSAGE_QUOTA => "message".to_owned(),
                CARD_QUOTA => "card".to_owned(),
                _ => format!("app:{}ms", s.window.as_millis()),
            })
            .collect();
        let mut layout = Self {
            scope: q.app_scope,
            specs,
            kinds,
            default_app,
            per_app,
            headroom_percent: q.final_headroom_percent,
            typing: HashMap::new(),
        };
        layout.add_typing_twins(FIRST_APP_QUOTA);
        layout
    }

    /// Gives each app quota from id `from` on its typing twin (appended).
    fn add_typing_twins(&mut self, from: usize) {
        if self.headroom_percent == 0 {
            return;
        }
        for id in from..self.specs.len() {
            let spec = self.specs[id];
            let limit = spec.limit.get();
            let headroom = (u64::from(limit) * u64::from(self.headroom_percent)).div_ceil(100);
            let twin = u32::try_from(u64::from(limit).saturating_sub(headroom.max(1)))
                .ok()
                .and_then(std::num::NonZeroU32::new);
            // A window of one send has no room to keep: typing counts in it alone.
            let Some(twin) = twin else { continue };
            self.typing.insert(id, self.specs.len());
            self.specs.push(QuotaSpec::new(twin, spec.window));
            self.kinds
                .push(format!("typing:{}ms", spec.window.as_millis()));
        }
    }

    /// The layout after a live reload changed the app quota lists in `q` (the chat and user
    /// quotas only change with a restart). Ids never change meaning: a list that stays keeps
    /// its ids, a changed list gets new ids after the existing ones (sends in flight settle on
    /// the old). Returns it with, for each of `app_ids` whose list changed, which old quota's
    /// sends each new one starts with.
    pub fn next(&self, q: &QuotaConfig, app_ids: &[Arc<str>]) -> (Self, Vec<Moved>) {
        let mut specs = self.specs.clone();
        let mut kinds = self.kinds.clone();
        let mut place = |list: &[QuotaSpec], was: Option<&Range<usize>>| match was {
            Some(r) if specs[r.clone()] == *list => r.clone(),
            _ => {
                let start = specs.len();
                specs.extend_from_slice(list);
                kinds.extend(
                    list.iter()
                        .map(|s| format!("app:{}ms", s.window.as_millis())),
                );
                start..specs.len()
            }
        };
        let default_app = place(&q.app, Some(&self.default_app));
        let per_app: HashMap<Arc<str>, Range<usize>> = q
            .per_app
            .iter()
            .map(|(id, list)| {
                let id: Arc<str> = id.as_str().into();
                let r = place(list, self.per_app.get(&id));
                (id, r)
            })
            .collect();
        let known = self.specs.len();
        let mut next = Self {
            scope: self.scope,
            specs,
            kinds,
            default_app,
            per_app,
            headroom_percent: self.headroom_percent,
            typing: self.typing.clone(),
        };
        next.add_typing_twins(known);
        let mut moved = Vec::new();
        for id in app_ids {
            // Each API's windows (one key for all when they are pooled).
            let mut done = Vec::new();
            for api in Api::ALL {
                let key = next.app_key(id, api);
                if done.contains(&key) {
                    continue;
                }
                let (was, now) = (self.api_quotas(id, api), next.api_quotas(id, api));
                done.push(key.clone());
                if was == now {
                    continue;
                }
                for to in now {
                    if let Some(from) = was.clone().find(|&f| self.kinds[f] == next.kinds[to]) {
                        moved.push(Moved {
                            from,
                            to,
                            app_id: key.clone(),
                        });
                        // Typing keeps its headroom across the reload too.
                        if let (Some(&f), Some(&t)) = (self.typing.get(&from), next.typing.get(&to))
                        {
                            moved.push(Moved {
                                from: f,
                                to: t,
                                app_id: key.clone(),
                            });
                        }
                    }
                }
            }
        }
        (next, moved)
    }

    /// The quota ids an app's sends count in (its own list, else the default one).
    pub fn app_quotas(&self, app_id: &str) -> Range<usize> {
        self.per_app
            .get(app_id)
            .cloned()
            .unwrap_or_else(|| self.default_app.clone())
    }

    /// The quota ids an app's calls of `api` count in: that API's own list
    /// (`[apps.NAME.api_quotas]`), else the app's.
    pub fn api_quotas(&self, app_id: &str, api: Api) -> Range<usize> {
        match self.scope {
            AppScope::Api => self.per_app.get(&*format!("{app_id}/{}", api.as_str())),
            AppScope::App => None,
        }
        .cloned()
        .unwrap_or_else(|| self.app_quotas(app_id))
    }

    /// The id an app's quota keys have for calls of `api`: the app_id for replies (and for
    /// every API when `[quotas] app_scope = "app"`), else `<app_id>/<api>`: each API has its
    /// own windows, as Feishu counts them.
    pub fn app_key(&self, app_id: &Arc<str>, api: Api) -> Arc<str> {
        match (self.scope, api) {
            (AppScope::App, _) | (_, Api::Reply) => app_id.clone(),
            (AppScope::Api, api) => format!("{app_id}/{}", api.as_str()).into(),
        }
    }

    /// The quota keys a job counts in: its target's, then its app's for its API.
    pub fn keys_in(&self, job: KeysOf<'_>) -> Vec<QuotaKey> {
        let app_key = self.app_key(job.app_id, job.api);
        let apps = self.api_quotas(job.app_id, job.api);
        let mut keys = Vec::with_capacity(FIRST_APP_QUOTA + apps.len());
        match job.target {
            Target::Chat => keys.push(QuotaKey::new(CHAT_QUOTA, job.chat_id.clone())),
            Target::User | Target::App => {}
            Target::Card => keys.push(QuotaKey::new(CARD_QUOTA, job.message_id)),
            Target::Message { chat } => {
                keys.push(QuotaKey::new(MESSAGE_QUOTA, job.message_id));
                if let Some(c) = chat {
                    keys.push(QuotaKey::new(CHAT_QUOTA, c.clone()));
                }
            }
        }
        if let Some(u) = job.user_id {
            keys.push(QuotaKey::new(USER_QUOTA, u.clone()));
        }
        for quota in apps.clone() {
            keys.push(QuotaKey::new(quota, app_key.clone()));
        }
        if job.lane == Lane::Typing {
            for quota in apps.filter_map(|q| self.typing.get(&q)) {
                keys.push(QuotaKey::new(*quota, app_key.clone()));
            }
        }
        keys
    }

    /// About how long `app_id`'s quotas need to let `queued` sends go when none has gone
    /// lately: each window passes its limit at once, then waits for the window.
    pub fn app_drain(&self, app_id: &str, queued: usize) -> Duration {
        self.specs[self.app_quotas(app_id)]
            .iter()
            .map(|q| drain(q, queued))
            .max()
            .unwrap_or_default()
    }

    /// The smallest limit among `app_id`'s quotas.
    pub fn app_min_limit(&self, app_id: &str) -> u32 {
        self.specs[self.app_quotas(app_id)]
            .iter()
            .map(|q| q.limit.get())
            .min()
            .unwrap_or(0)
    }

    /// The tightest per-second rate of `app_id`'s quotas.
    pub fn app_rate_per_sec(&self, app_id: &str) -> f64 {
        self.specs[self.app_quotas(app_id)]
            .iter()
            .map(|q| f64::from(q.limit.get()) / q.window.as_secs_f64())
            .fold(f64::INFINITY, f64::min)
    }
}

/// How long quota `q` needs to let `n` sends go from an empty window.
pub fn drain(q: &QuotaSpec, n: usize) -> Duration {
    let rounds = n.saturating_sub(1) / usize::try_from(q.limit.get()).unwrap_or(usize::MAX);
    q.window
        .checked_mul(u32::try_from(rounds).unwrap_or(u32::MAX))
        .unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;
    use std::time::Duration;

    fn spec(limit: u32, ms: u64) -> QuotaSpec {
        QuotaSpec::new(NonZeroU32::new(limit).unwrap(), Duration::from_millis(ms))
    }

    fn quotas(app: Vec<QuotaSpec>, per_app: Vec<(&str, Vec<QuotaSpec>)>) -> QuotaConfig {
        QuotaConfig {
            chat: spec(5, 1000),
            user: spec(5, 1000),
            message: spec(5, 1000),
            card: spec(10, 1000),
            app_scope: AppScope::Api,
            updates_count_in_chat: false,
            app,
            per_app: per_app
                .into_iter()
                .map(|(id, l)| (id.to_owned(), l))
                .collect(),
            final_headroom_percent: 10,
            safety_margin: Duration::ZERO,
        }
    }

    #[test]
    fn a_reload_keeps_unchanged_lists_and_appends_changed_ones_with_their_sends() {
        // Ids as placed without typing twins (`typing_leaves_the_headroom…` has those).
        let quotas = |app, per_app| QuotaConfig {
            final_headroom_percent: 0,
            ..quotas(app, per_app)
        };
        let default = vec![spec(50, 1000), spec(1000, 60_000)];
        let old = QuotaLayout::new(&quotas(
            default.clone(),
            vec![("cli_b", vec![spec(2, 1000)])],
        ));
        let ids: Vec<Arc<str>> = ["cli_a", "cli_b", "cli_c"].map(Arc::from).to_vec();
        // cli_b's list is unchanged; cli_c gets a list of its own (from the default one).
        let same = quotas(
            default.clone(),
            vec![
                ("cli_b", vec![spec(2, 1000)]),
                ("cli_c", vec![spec(10, 1000)]),
            ],
        );
        let (next, moved) = old.next(&same, &ids);
        assert_eq!(next.app_quotas("cli_a"), old.app_quotas("cli_a"));
        assert_eq!(next.app_quotas("cli_b"), old.app_quotas("cli_b"));
        let c = next.app_quotas("cli_c");
        assert_eq!(c, 7..8);
        assert_eq!(next.kinds[7], "app:1000ms");
        // Its 1 s window starts with what it counted in the default 1 s window, for each
        // API's windows.
        let keys: Vec<String> = moved.iter().map(|m| m.app_id.to_string()).collect();
        let want: Vec<String> = Api::ALL
            .iter()
            .map(|&api| next.app_key(&"cli_c".into(), api).to_string())
            .collect();
        assert_eq!(keys, want);
        assert_eq!(want[..2], ["cli_c", "cli_c/send"]);
        assert!(moved.iter().all(|m| (m.from, m.to) == (4, 7)), "{moved:?}");
        // The default list changes: every app on it moves; ids in use keep their meaning.
        let lower = quotas(vec![spec(40, 1000)], vec![("cli_b", vec![spec(2, 1000)])]);
        let (third, moved) = next.next(&lower, &ids);
        assert_eq!(third.specs[..8], next.specs[..]);
        assert_eq!(third.app_quotas("cli_a"), 8..9);
        assert_eq!(third.app_quotas("cli_c"), 8..9);
        let mut from: Vec<_> = moved
            .iter()
            .filter(|m| !m.app_id.contains('/'))
            .map(|m| (m.app_id.to_string(), m.from, m.to))
            .collect();
        from.sort();
        assert_eq!(from, [("cli_a".into(), 4, 8), ("cli_c".into(), 7, 8)]);
        assert_eq!(moved.len(), 2 * Api::ALL.len());
    }

    #[test]
    fn each_api_counts_in_its_own_app_windows_unless_pooled() {
        let default = vec![spec(50, 1000), spec(1000, 60_000)];
        // cli_a's sends have a list of their own.
        let q = quotas(default, vec![("cli_a/send", vec![spec(20, 1000)])]);
        let layout = QuotaLayout::new(&q);
        let app: Arc<str> = "cli_a".into();
        let chat: Arc<str> = "oc_1".into();
        let keys = |layout: &QuotaLayout, api| {
            layout
                .keys_in(KeysOf {
                    target: &Target::Chat,
                    chat_id: &chat,
                    user_id: None,
                    message_id: "",
                    app_id: &app,
                    api,
                    lane: Lane::Normal,
                })
                .into_iter()
                .map(|k| {
                    (
                        layout.kinds[k.quota].clone(),
                        layout.specs[k.quota].limit.get(),
                        k.id.to_string(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let reply = keys(&layout, Api::Reply);
        assert_eq!(reply[0], ("chat".into(), 5, "oc_1".into()));
        assert_eq!(reply[1], ("app:1000ms".into(), 50, "cli_a".into()));
        assert_eq!(
            keys(&layout, Api::Send)[1..],
            [("app:1000ms".into(), 20, "cli_a/send".into())]
        );
        assert_eq!(keys(&layout, Api::Recall)[1].2, "cli_a/recall");
        let pooled = QuotaLayout::new(&QuotaConfig {
            app_scope: AppScope::App,
            ..quotas(vec![spec(50, 1000)], vec![])
        });
        assert_eq!(keys(&pooled, Api::Send)[1].2, "cli_a");
        // An update counts in its message's 5/s, and its chat's when given.
        let update = layout.keys_in(KeysOf {
            target: &Target::Message {
                chat: Some(chat.clone()),
            },
            chat_id: &message_queue("om_1"),
            user_id: None,
            message_id: "om_1",
            app_id: &app,
            api: Api::UpdateCard,
            lane: Lane::Normal,
        });
        let kinds: Vec<&str> = update
            .iter()
            .map(|k| layout.kinds[k.quota].as_str())
            .collect();
        assert_eq!(kinds, ["message", "chat", "app:1000ms", "app:60000ms"]);
    }

    #[test]
    fn typing_leaves_the_headroom_of_each_app_window_and_keeps_it_across_a_reload() {
        let q = quotas(vec![spec(50, 1000), spec(1000, 60_000)], vec![]);
        let layout = QuotaLayout::new(&q);
        let (app, card): (Arc<str>, Arc<str>) = ("cli_a".into(), card_queue("c_1"));
        let keys = |layout: &QuotaLayout, lane| -> Vec<(String, u32)> {
            layout
                .keys_in(KeysOf {
                    target: &Target::Card,
                    chat_id: &card,
                    user_id: None,
                    message_id: "c_1",
                    app_id: &app,
                    api: Api::CardContent,
                    lane,
                })
                .into_iter()
                .map(|k| {
                    (
                        layout.kinds[k.quota].clone(),
                        layout.specs[k.quota].limit.get(),
                    )
                })
                .collect()
        };
        let plain = [("card", 10), ("app:1000ms", 50), ("app:60000ms", 1000)];
        let plain = plain.map(|(k, l)| (k.to_owned(), l));
        assert_eq!(keys(&layout, Lane::Normal), plain);
        assert_eq!(keys(&layout, Lane::Final), plain);
        let mut typing = plain.to_vec();
        typing.extend([("typing:1000ms".into(), 45), ("typing:60000ms".into(), 900)]);
        assert_eq!(keys(&layout, Lane::Typing), typing);
        // A reload that changes the list: typing's sends move with the app's.
        let q2 = quotas(vec![spec(40, 1000), spec(1000, 60_000)], vec![]);
        let (next, moved) = layout.next(&q2, std::slice::from_ref(&app));
        let kinds: Vec<_> = keys(&next, Lane::Typing).into_iter().skip(1).collect();
        let want = [
            ("app:1000ms", 40),
            ("app:60000ms", 1000),
            ("typing:1000ms", 36),
            ("typing:60000ms", 900),
        ];
        assert_eq!(kinds, want.map(|(k, l)| (k.to_owned(), l)));
        let moved_kinds: Vec<_> = moved
            .iter()
            .filter(|m| &*m.app_id == "cli_a/card_content")
            .map(|m| next.kinds[m.to].as_str())
            .collect();
        assert_eq!(
            moved_kinds,
            [
                "app:1000ms",
                "typing:1000ms",
                "app:60000ms",
                "typing:60000ms"
            ]
        );
        // No headroom: no twins.
        let none = QuotaLayout::new(&QuotaConfig {
            final_headroom_percent: 0,
            ..q
        });
        assert_eq!(keys(&none, Lane::Typing), plain);
    }
}
