//! The metrics of streaming replies (`stream::run`): streams live, their text updates sent or
//! coalesced (a newer text came before it went out), the time from a text arriving to its card
//! showing it, and the time from a stream's `finish` to its card showing the final text,
//! closed.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::Metrics;
use super::labels::OutcomeLabel;

/// The streams' metrics, registered with the others.
pub(super) struct StreamMetrics {
    live: Gauge,
    updates: Family<OutcomeLabel, Counter>,
    lag: Histogram,
    finish: Histogram,
}

impl StreamMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let live = Gauge::default();
        registry.register(
            "feishu_reply_streams_live",
            "Streaming replies (StreamReply) running now",
            live.clone(),
        );
        let updates = Family::<OutcomeLabel, Counter>::default();
        for outcome in ["sent", "coalesced"] {
            let _ = updates.get_or_create(&OutcomeLabel { outcome });
        }
        registry.register(
            "feishu_reply_stream_updates",
            "Texts of streaming replies: sent to the card, or coalesced (a newer text came before it went out)",
            updates.clone(),
        );
        let lag = Histogram::new(exponential_buckets(0.01, 2.0, 12));
        registry.register(
            "feishu_reply_stream_text_lag_seconds",
            "From a streamed text arriving to Feishu accepting an update that shows it (the oldest text not yet shown, per update)",
            lag.clone(),
        );
        let finish = Histogram::new(exponential_buckets(0.01, 2.0, 12));
        registry.register(
            "feishu_reply_stream_finish_seconds",
            "From a stream's finish (or its caller going away) to its card showing the final text, closed",
            finish.clone(),
        );
        Self {
            live,
            updates,
            lag,
            finish,
        }
    }
}

impl Metrics {
    /// A stream started (`1`) or ended (`-1`).
    pub fn stream_live(&self, delta: i64) {
        self.streams.live.inc_by(delta);
    }

    /// A stream's text was sent to its card (`sent`), or replaced before it went out.
    pub fn stream_update(&self, sent: bool) {
        let outcome = if sent { "sent" } else { "coalesced" };
        self.streams
            .updates
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// From the oldest text an update carried arriving to Feishu accepting the update.
    pub fn stream_text_shown(&self, lag: Duration) {
        self.streams.lag.observe(lag.as_secs_f64());
    }

    /// From a stream's end to its card closed with the final text.
    pub fn stream_finished(&self, d: Duration) {
        self.streams.finish.observe(d.as_secs_f64());
    }
}
