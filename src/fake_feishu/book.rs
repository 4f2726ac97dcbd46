//! What both fakes (HTTP and simulated) decide the same way for every message endpoint: which
//! quota counters a call arrives in (its chat, user or message, and its app's windows for its
//! API: Feishu counts "per API, per app"), and each message's history (edits made, recalled),
//! which later calls on it are refused by.

use std::collections::{HashMap, HashSet};

use super::FakeQuota;
use crate::feishu::Api;

/// Feishu allows this many edits (PUT) of one message; the next is refused 230072.
pub const MAX_EDITS: u32 = 20;

/// A counter's key: its kind (below [`APP_KIND`]: refused 230020; from it on: 99991400) and id.
pub(crate) type CounterKey = (u8, String);

const CHAT_KIND: u8 = 0;
const USER_KIND: u8 = 1;
const MESSAGE_KIND: u8 = 2;
/// The first app window's kind (the next windows follow).
pub(crate) const APP_KIND: u8 = 3;

/// Where one call lands, for its quotas.
pub(crate) struct Landing<'a> {
    pub api: Api,
    /// The chat it posts in (a reply, a send to a chat).
    pub chat: Option<&'a str>,
    /// The user it posts to (a send to a user), or the replied user in a p2p chat.
    pub user: Option<&'a str>,
    /// The message it changes (an update, a recall).
    pub message: Option<&'a str>,
    pub app_id: &'a str,
}

/// The quotas of a fake, per target.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TargetQuotas {
    pub chat: FakeQuota,
    pub user: FakeQuota,
    pub message: FakeQuota,
}

/// The counters `at` arrives in, with their quotas: its targets', then its app's windows of
/// its API (`app_scope_api` false: one set of windows for all of the app's APIs).
pub(crate) fn counters(
    at: &Landing<'_>,
    q: TargetQuotas,
    app: &[FakeQuota],
    app_scope_api: bool,
) -> Vec<(CounterKey, FakeQuota)> {
    let mut out = Vec::with_capacity(3 + app.len());
    if let Some(c) = at.chat {
        out.push(((CHAT_KIND, c.to_owned()), q.chat));
    }
    if let Some(u) = at.user {
        out.push(((USER_KIND, u.to_owned()), q.user));
    }
    if let Some(m) = at.message {
        out.push(((MESSAGE_KIND, m.to_owned()), q.message));
    }
    let app_key = if app_scope_api {
        format!("{}/{}", at.app_id, at.api.as_str())
    } else {
        at.app_id.to_owned()
    };
    for (i, w) in app.iter().enumerate() {
        let kind = APP_KIND.saturating_add(u8::try_from(i).unwrap_or(u8::MAX));
        out.push(((kind, app_key.clone()), *w));
    }
    out
}

/// Each message's history as Feishu keeps it.
#[derive(Debug, Default)]
pub(crate) struct Book {
    edits: HashMap<String, u32>,
    recalled: HashSet<String>,
}

impl Book {
    /// Feishu's refusal of `api` on `message_id` given its history: (code, msg).
    pub fn refusal(&self, api: Api, message_id: &str) -> Option<(i64, &'static str)> {
        if message_id.is_empty() {
            return None;
        }
        if self.recalled.contains(message_id) {
            return Some((230011, "The message was recalled."));
        }
        if api == Api::Edit && self.edits.get(message_id).copied().unwrap_or(0) >= MAX_EDITS {
            return Some((
                230072,
                "The message has reached the number of times it can be edited.",
            ));
        }
        None
    }

    /// `api` on `message_id` succeeded.
    pub fn record(&mut self, api: Api, message_id: &str) {
        match api {
            Api::Edit => *self.edits.entry(message_id.to_owned()).or_default() += 1,
            Api::Recall => {
                self.recalled.insert(message_id.to_owned());
            }
            Api::Reply | Api::Send | Api::UpdateCard => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edited_message_takes_twenty_edits_and_a_recalled_one_nothing() {
        let mut b = Book::default();
        for _ in 0..MAX_EDITS {
            assert_eq!(b.refusal(Api::Edit, "om_a"), None);
            b.record(Api::Edit, "om_a");
        }
        assert_eq!(b.refusal(Api::Edit, "om_a").map(|r| r.0), Some(230072));
        // Cards have no edit count.
        assert_eq!(b.refusal(Api::UpdateCard, "om_a"), None);
        b.record(Api::Recall, "om_a");
        for api in Api::ALL {
            assert_eq!(b.refusal(api, "om_a").map(|r| r.0), Some(230011));
        }
        assert_eq!(b.refusal(Api::Reply, "om_b"), None);
    }

    #[test]
    fn each_api_has_its_own_app_windows_unless_pooled() {
        let q = FakeQuota {
            limit: 5,
            window: std::time::Duration::from_secs(1),
        };
        let t = TargetQuotas {
            chat: q,
            user: q,
            message: q,
        };
        let at = |api| Landing {
            api,
            chat: Some("oc_a"),
            user: None,
            message: None,
            app_id: "cli_a",
        };
        let reply = counters(&at(Api::Reply), t, &[q], true);
        let send = counters(&at(Api::Send), t, &[q], true);
        assert_eq!(reply[0].0, send[0].0, "one chat counter");
        assert_ne!(reply[1].0, send[1].0, "app windows per API");
        let pooled = counters(&at(Api::Send), t, &[q], false);
        assert_eq!(pooled[1].0, (APP_KIND, "cli_a".to_owned()));
    }
}
