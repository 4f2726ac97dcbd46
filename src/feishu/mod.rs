//! Feishu, as the scheduler sees it: the [`Upstream`] seam (so tests and benches can stand in a
//! fake), the reqwest client behind it, the tenant_access_token cache and the answer classifier.
//! Nothing here knows about quotas or queues.

pub mod answer;
pub mod client;
pub mod error;
pub mod token;

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

pub use client::FeishuClient;
pub use error::{RetryReason, UpstreamError};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Index of a configured app (position in `Config::apps`).
pub type AppIndex = usize;

/// One POST to the reply endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct SendRequest {
    #[serde(skip)]
    pub message_id: String,
    pub content: String,
    pub msg_type: &'static str,
    pub reply_in_thread: bool,
    pub uuid: String,
}

/// One POST to the send endpoint (`/im/v1/messages?receive_id_type=…`): a new message.
#[derive(Debug, Clone, Serialize)]
pub struct NewMessage {
    /// `chat_id`, `open_id`, `user_id`, `union_id` or `email` (a query parameter).
    #[serde(skip)]
    pub receive_id_type: &'static str,
    pub receive_id: String,
    pub msg_type: &'static str,
    pub content: String,
    pub uuid: String,
}

/// A message's new content: a card (`interactive`, PATCH) or a text or post (PUT, an edit).
#[derive(Debug, Clone, Serialize)]
pub struct MessageUpdate {
    #[serde(skip)]
    pub message_id: String,
    pub msg_type: &'static str,
    pub content: String,
}

/// A CardKit card's element text (`PUT /cardkit/v1/cards/:card_id/elements/:element_id/content`):
/// the whole text so far; the client types out what was added.
#[derive(Debug, Clone, Serialize)]
pub struct CardText {
    #[serde(skip)]
    pub card_id: String,
    #[serde(skip)]
    pub element_id: String,
    pub content: String,
    /// Strictly increasing per card (300317 otherwise); kept by a retry.
    pub sequence: u32,
    /// Kept by a retry of the same update (Feishu dedupes it).
    pub uuid: String,
}

/// A CardKit card's streaming mode turned on or off
/// (`PATCH /cardkit/v1/cards/:card_id/settings`).
#[derive(Debug, Clone)]
pub struct CardStreaming {
    pub card_id: String,
    pub on: bool,
    pub sequence: u32,
    pub uuid: String,
}

/// Feishu's message endpoints, each with its own app quotas ("per API, per app"): the
/// `operation` label of metrics and traces, and the family of an app quota key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// `POST /im/v1/messages/:id/reply`
    Reply,
    /// `POST /im/v1/messages`
    Send,
    /// `PATCH /im/v1/messages/:id` (a card)
    UpdateCard,
    /// `PUT /im/v1/messages/:id` (a text or post, 20 edits per message)
    Edit,
    /// `DELETE /im/v1/messages/:id`
    Recall,
    /// `POST /cardkit/v1/cards` (a card entity)
    CardCreate,
    /// `PUT /cardkit/v1/cards/:card_id/elements/:element_id/content`
    CardContent,
    /// `PATCH /cardkit/v1/cards/:card_id/settings`
    CardSettings,
}

impl Api {
    pub const ALL: [Api; 8] = [
        Api::Reply,
        Api::Send,
        Api::UpdateCard,
        Api::Edit,
        Api::Recall,
        Api::CardCreate,
        Api::CardContent,
        Api::CardSettings,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Api::Reply => "reply",
            Api::Send => "send",
            Api::UpdateCard => "update_card",
            Api::Edit => "edit",
            Api::Recall => "recall",
            Api::CardCreate => "card_create",
            Api::CardContent => "card_content",
            Api::CardSettings => "card_settings",
        }
    }

    /// The API named `s` (as [`Api::as_str`] writes it).
    pub fn parse(s: &str) -> Option<Api> {
        Api::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// One call to a message or card endpoint, as the scheduler hands it to the [`Upstream`].
#[derive(Debug, Clone)]
pub enum Call {
    Reply(SendRequest),
    Send(NewMessage),
    Update(MessageUpdate),
    Recall {
        message_id: String,
    },
    /// A card entity from Card JSON 2.0 (the answer's `card_id` names it).
    CardCreate {
        card_json: String,
    },
    CardText(CardText),
    CardStreaming(CardStreaming),
}

impl Call {
    /// The endpoint it calls.
    pub fn api(&self) -> Api {
        match self {
            Call::Reply(_) => Api::Reply,
            Call::Send(_) => Api::Send,
            Call::Update(u) if u.msg_type == "interactive" => Api::UpdateCard,
            Call::Update(_) => Api::Edit,
            Call::Recall { .. } => Api::Recall,
            Call::CardCreate { .. } => Api::CardCreate,
            Call::CardText(_) => Api::CardContent,
            Call::CardStreaming(_) => Api::CardSettings,
        }
    }

    /// Whether a newer call of the same kind on the same message or card makes this one
    /// pointless while it waits: each carries the whole content (an update of a message, a
    /// card element's text), so only the newest needs to go.
    pub fn latest_wins(&self) -> bool {
        matches!(self, Call::Update(_) | Call::CardText(_))
    }

    /// The card it acts on (empty for the message calls and a card's creation).
    pub fn card_id(&self) -> &str {
        match self {
            Call::CardText(t) => &t.card_id,
            Call::CardStreaming(s) => &s.card_id,
            _ => "",
        }
    }

    /// The message it acts on (replied to, updated, recalled); empty for a send and the card
    /// calls.
    pub fn message_id(&self) -> &str {
        match self {
            Call::Reply(r) => &r.message_id,
            Call::Update(u) => &u.message_id,
            Call::Recall { message_id } => message_id,
            Call::Send(_)
            | Call::CardCreate { .. }
            | Call::CardText(_)
            | Call::CardStreaming(_) => "",
        }
    }

    /// The uuid Feishu dedupes it by (replies, sends, card updates); empty for the others,
    /// which are safe to repeat as they are.
    pub fn uuid(&self) -> &str {
        match self {
            Call::Reply(r) => &r.uuid,
            Call::Send(m) => &m.uuid,
            Call::CardText(t) => &t.uuid,
            Call::CardStreaming(s) => &s.uuid,
            Call::Update(_) | Call::Recall { .. } | Call::CardCreate { .. } => "",
        }
    }

    /// The content it carries (a card's JSON, a card's text; empty for a recall and a card's
    /// settings).
    pub fn content(&self) -> &str {
        match self {
            Call::Reply(r) => &r.content,
            Call::Send(m) => &m.content,
            Call::Update(u) => &u.content,
            Call::CardCreate { card_json } => card_json,
            Call::CardText(t) => &t.content,
            Call::Recall { .. } | Call::CardStreaming(_) => "",
        }
    }

    /// Bytes its fields hold (the queue's byte bound).
    pub fn weight(&self) -> usize {
        let extra = match self {
            Call::Send(m) => m.receive_id.len(),
            Call::CardText(t) => t.card_id.len() + t.element_id.len(),
            Call::CardStreaming(s) => s.card_id.len(),
            _ => 0,
        };
        self.content().len() + self.message_id().len() + self.uuid().len() + extra
    }
}

/// Feishu's `data` of a successful reply (the fields callers get back).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SentMessage {
    pub message_id: String,
    pub root_id: String,
    pub parent_id: String,
    pub thread_id: String,
    pub chat_id: String,
    pub msg_type: String,
    pub create_time: String,
    /// A card entity created (`CardCreate`).
    pub card_id: String,
    /// `X-Tt-Logid` of the successful request.
    #[serde(skip)]
    pub log_id: String,
}

/// Charged before every call the client makes for an app (token, reply, lookup); an error
/// refuses the call before it is made. The domain's call budgets implement it
/// (`budget::Budgets`), so this module knows no budget.
pub trait CallMeter: Send + Sync {
    fn charge(&self, app: AppIndex) -> BoxFuture<'_, Result<(), UpstreamError>>;
}

/// The upstream the scheduler sends through: real Feishu or a stand-in.
pub trait Upstream: Send + Sync + 'static {
    /// Makes one call (token handling included): a reply or a send answers the message
    /// posted; an update or a recall answers an empty [`SentMessage`] (Feishu's `data` is
    /// empty). Errors are classified by [`UpstreamError`].
    fn call<'a>(
        &'a self,
        app: AppIndex,
        call: &'a Call,
    ) -> BoxFuture<'a, Result<SentMessage, UpstreamError>>;

    /// The chat a message belongs to (`GET /open-apis/im/v1/messages/{id}`).
    fn message_chat<'a>(
        &'a self,
        app: AppIndex,
        message_id: &'a str,
    ) -> BoxFuture<'a, Result<String, UpstreamError>>;

    /// A live reload: `apps` replaces the apps, slot for slot (see `config::live`). An app
    /// whose app_id and secret stay keeps its token.
    fn reconfigure(&self, apps: &[crate::config::AppConfig]) {
        let _ = apps;
    }
}

#[cfg(test)]
mod tests {
    use super::Api;

    #[test]
    fn the_metrics_know_every_operation() {
        let names: Vec<&str> = Api::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(names, crate::metrics::OPERATIONS);
        assert_eq!(names, crate::config::APIS);
        for api in Api::ALL {
            assert_eq!(Api::parse(api.as_str()), Some(api));
        }
    }
}
