//! Telling the other replicas that the members changed (this one joined, or is leaving), so
//! that they renew their partition ownership at once instead of at their next beat (a quarter
//! lease later): a leaving replica's partitions are claimed, and a newcomer's share released
//! to it, within a few milliseconds. Best effort: a replica not told learns it at its beat.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Endpoint;

use super::peer_request;
use crate::proto::peer::RebalanceRequest;
use crate::proto::peer::peer_service_client::PeerServiceClient;

/// How long one replica has to take the call.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);

/// Asks every replica at `addrs` to renew its partition ownership now.
pub(super) async fn rebalance_others(addrs: Vec<String>, secret: Arc<str>) {
    let calls = addrs.into_iter().map(|addr| {
        let secret = secret.clone();
        async move {
            let called = async {
                let channel = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| e.to_string())?
                    .connect_timeout(CALL_TIMEOUT)
                    .timeout(CALL_TIMEOUT)
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
                PeerServiceClient::new(channel)
                    .rebalance(peer_request(&secret, RebalanceRequest {}))
                    .await
                    .map_err(|s| s.to_string())
            };
            if let Err(error) = called.await {
                tracing::debug!(peer = %addr, %error, "telling a replica the members changed failed; it sees it at its next beat");
            }
        }
    });
    futures_util::future::join_all(calls).await;
}
