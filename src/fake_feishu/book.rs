//! What both fakes (HTTP and simulated) decide the same way for every message and card
//! endpoint: which quota counters a call arrives in (its chat, user, message or card, and its
//! app's windows for its API: Feishu counts "per API, per app"), each message's history (edits
//! made, recalled) and each CardKit card entity (its elements' texts, sequence, streaming
//! mode), which later calls are refused by.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::FakeQuota;
use crate::feishu::Api;

/// Feishu allows this many edits (PUT) of one message; the next is refused 230072.
pub const MAX_EDITS: u32 = 20;

/// A counter's key: its kind (below [`APP_KIND`]: refused 230020; from it on: 99991400) and id.
pub(crate) type CounterKey = (u8, String);

const CHAT_KIND: u8 = 0;
const USER_KIND: u8 = 1;
const MESSAGE_KIND: u8 = 2;
const CARD_KIND: u8 = 3;
/// The first app window's kind (the next windows follow).
pub(crate) const APP_KIND: u8 = 4;

/// A card entity's largest JSON (Feishu: 30 KB; 200860 beyond).
pub const MAX_CARD_BYTES: usize = 30 * 1024;

/// Where one call lands, for its quotas.
pub(crate) struct Landing<'a> {
    pub api: Api,
    /// The chat it posts in (a reply, a send to a chat).
    pub chat: Option<&'a str>,
    /// The user it posts to (a send to a user), or the replied user in a p2p chat.
    pub user: Option<&'a str>,
    /// The message it changes (an update, a recall).
    pub message: Option<&'a str>,
    /// The card it changes (a card's text or settings).
    pub card: Option<&'a str>,
    pub app_id: &'a str,
}

/// The quotas of a fake, per target.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TargetQuotas {
    pub chat: FakeQuota,
    pub user: FakeQuota,
    pub message: FakeQuota,
    pub card: FakeQuota,
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
    if let Some(c) = at.card {
        out.push(((CARD_KIND, c.to_owned()), q.card));
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

/// A CardKit card entity as Feishu keeps it.
#[derive(Debug, Clone)]
pub struct Card {
    pub app_id: String,
    pub streaming: bool,
    /// When streaming mode was last turned on (Feishu turns it off a while later).
    pub streaming_since: Instant,
    /// The last sequence accepted (each must be larger).
    pub sequence: u32,
    /// Each element's text, by element_id (markdown elements of the card's body).
    pub texts: HashMap<String, String>,
    /// Text updates accepted.
    pub updates: u32,
}

/// One change to a card: its text or its streaming mode.
pub(crate) enum CardChange<'a> {
    Text {
        element_id: &'a str,
        content: &'a str,
    },
    Streaming(bool),
}

/// Each message's history and each card entity as Feishu keeps them.
#[derive(Debug, Default)]
pub(crate) struct Book {
    edits: HashMap<String, u32>,
    recalled: HashSet<String>,
    pub(crate) cards: HashMap<String, Card>,
    next_card: u64,
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
            _ => {}
        }
    }

    /// Creates a card entity from Card JSON 2.0 for `app_id`: its id, or Feishu's refusal.
    pub fn create_card(
        &mut self,
        card_json: &str,
        app_id: &str,
        now: Instant,
    ) -> Result<String, (i64, &'static str)> {
        if card_json.len() > MAX_CARD_BYTES {
            return Err((200860, "The card is larger than 30 KB."));
        }
        let card: Value = serde_json::from_str(card_json)
            .map_err(|_| (200621, "The card content is not valid card JSON."))?;
        if card["schema"] != "2.0" {
            return Err((200621, "Only card JSON 2.0 can be a card entity."));
        }
        let texts = card["body"]["elements"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let id = e["element_id"].as_str()?;
                Some((
                    id.to_owned(),
                    e["content"].as_str().unwrap_or("").to_owned(),
                ))
            })
            .collect();
        self.next_card += 1;
        let id = format!("7{:018}", self.next_card);
        self.cards.insert(
            id.clone(),
            Card {
                app_id: app_id.to_owned(),
                streaming: card["config"]["streaming_mode"] == true,
                streaming_since: now,
                sequence: 0,
                texts,
                updates: 0,
            },
        );
        Ok(id)
    }

    /// Applies `change` with `sequence` to card `card_id` of `app_id`, or Feishu's refusal. A
    /// card streaming longer than `streaming_limit` has its streaming mode closed first.
    pub fn change_card(
        &mut self,
        card_id: &str,
        app_id: &str,
        sequence: u32,
        change: CardChange<'_>,
        now: Instant,
        streaming_limit: Duration,
    ) -> Result<(), (i64, &'static str)> {
        let card = self
            .cards
            .get_mut(card_id)
            .ok_or((200740, "The card entity does not exist or has expired."))?;
        if card.app_id != app_id {
            return Err((300311, "Only the app that created the card can update it."));
        }
        if sequence <= card.sequence {
            return Err((300317, "The sequence must be larger than the last one."));
        }
        if card.streaming && now.saturating_duration_since(card.streaming_since) >= streaming_limit
        {
            card.streaming = false;
            if matches!(change, CardChange::Text { .. }) {
                return Err((200850, "Streaming mode timed out."));
            }
        }
        match change {
            CardChange::Text {
                element_id,
                content,
            } => {
                if !card.streaming {
                    return Err((300309, "Streaming mode is closed."));
                }
                let others: usize = card
                    .texts
                    .iter()
                    .filter(|(k, _)| *k != element_id)
                    .map(|(_, v)| v.len())
                    .sum();
                let Some(text) = card.texts.get_mut(element_id) else {
                    return Err((300313, "The element does not exist."));
                };
                if others + content.len() > MAX_CARD_BYTES {
                    return Err((200860, "The card is larger than 30 KB."));
                }
                *text = content.to_owned();
                card.updates += 1;
            }
            CardChange::Streaming(on) => {
                if on && !card.streaming {
                    card.streaming_since = now;
                }
                card.streaming = on;
            }
        }
        card.sequence = sequence;
        Ok(())
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
    fn a_card_takes_increasing_sequences_while_streaming_and_nothing_after_its_limit() {
        let mut b = Book::default();
        let now = Instant::now();
        let json = r#"{"schema":"2.0","config":{"streaming_mode":true},"body":{"elements":[{"tag":"markdown","element_id":"md","content":""}]}}"#;
        let id = b.create_card(json, "cli_a", now).unwrap();
        let limit = Duration::from_secs(600);
        let text = |content| CardChange::Text {
            element_id: "md",
            content,
        };
        assert_eq!(
            b.change_card(&id, "cli_a", 1, text("a"), now, limit),
            Ok(())
        );
        assert_eq!(
            b.change_card(&id, "cli_a", 1, text("ab"), now, limit)
                .unwrap_err()
                .0,
            300317
        );
        assert_eq!(
            b.change_card(&id, "cli_b", 2, text("ab"), now, limit)
                .unwrap_err()
                .0,
            300311
        );
        let other = CardChange::Text {
            element_id: "x",
            content: "",
        };
        assert_eq!(
            b.change_card(&id, "cli_a", 2, other, now, limit)
                .unwrap_err()
                .0,
            300313
        );
        assert_eq!(b.cards[&id].texts["md"], "a");
        // Past the streaming limit the text is refused and streaming is off; turning it on
        // again starts a new period.
        let later = now + limit;
        assert_eq!(
            b.change_card(&id, "cli_a", 3, text("abc"), later, limit)
                .unwrap_err()
                .0,
            200850
        );
        assert_eq!(
            b.change_card(&id, "cli_a", 4, text("abc"), later, limit)
                .unwrap_err()
                .0,
            300309
        );
        let on = CardChange::Streaming(true);
        assert_eq!(b.change_card(&id, "cli_a", 5, on, later, limit), Ok(()));
        assert_eq!(
            b.change_card(&id, "cli_a", 6, text("abc"), later, limit),
            Ok(())
        );
        assert_eq!(b.create_card("{}", "cli_a", now).unwrap_err().0, 200621);
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
            card: q,
        };
        let at = |api| Landing {
            api,
            chat: Some("oc_a"),
            user: None,
            message: None,
            card: None,
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
