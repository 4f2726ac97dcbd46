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
    /// POST one reply (token handling included). Errors are classified by [`UpstreamError`].
    fn reply<'a>(
        &'a self,
        app: AppIndex,
        req: &'a SendRequest,
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
