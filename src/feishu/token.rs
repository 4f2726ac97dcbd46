//! tenant_access_token cache for one app: refreshed early, one refresh in flight at a time
//! (concurrent callers wait for it instead of stampeding the token endpoint), and invalidated
//! when Feishu says the token is bad. Time is tokio's clock, so tests can pause it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio::time::Instant;

use super::UpstreamError;

/// A token as the token endpoint returned it.
#[derive(Debug, Clone)]
pub struct FetchedToken {
    pub value: String,
    /// `expire`: seconds the token has left (can be < 7200).
    pub expires_in: Duration,
}

#[derive(Debug, Clone)]
struct Cached {
    value: Arc<str>,
    expires_at: Instant,
}

/// Token state of one app.
#[derive(Debug)]
pub struct TokenCache {
    current: RwLock<Option<Cached>>,
    refresh: tokio::sync::Mutex<()>,
    /// Refresh this long before expiry (Feishu hands out a new token in the last 30 min).
    refresh_before: Duration,
    /// The last failed fetch: answered to callers for a short while instead of asking the
    /// token endpoint again for each of them (bad credentials would otherwise cost one token
    /// request per reply).
    failed: parking_lot::Mutex<Option<(Instant, UpstreamError)>>,
}

/// How long a failed token fetch is answered from memory: bad credentials stay bad for a
/// while; anything else (network, 5xx) is retried sooner.
fn failure_hold(e: &UpstreamError) -> Duration {
    match e {
        UpstreamError::Credentials { .. } => Duration::from_secs(10),
        _ => Duration::from_secs(1),
    }
}

/// Never use a token with less than this left: a request started now could arrive after expiry.
const MIN_REMAINING: Duration = Duration::from_secs(30);

impl TokenCache {
    pub fn new(refresh_before: Duration) -> Self {
        Self {
            current: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(()),
            refresh_before: refresh_before.max(MIN_REMAINING),
            failed: parking_lot::Mutex::new(None),
        }
    }

    /// A valid token, fetching one with `fetch` when needed. Returns whether a fetch happened.
    ///
    /// * plenty of time left: the cached token, no lock but a read lock;
    /// * inside the early-refresh window: one caller refreshes, the others keep using the
    ///   still-valid token meanwhile;
    /// * expired or missing: every caller waits for the single refresh in flight.
    pub async fn get<F, Fut>(&self, fetch: F) -> Result<(Arc<str>, bool), UpstreamError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<FetchedToken, UpstreamError>>,
    {
        let now = Instant::now();
        let cached = self.current.read().clone();
        if let Some(c) = &cached {
            if c.expires_at > now + self.refresh_before {
                return Ok((c.value.clone(), false));
            }
            if c.expires_at > now + MIN_REMAINING {
                // Early refresh: whoever gets the lock refreshes; others use the current token.
                let Ok(_guard) = self.refresh.try_lock() else {
                    return Ok((c.value.clone(), false));
                };
                if !self.is_current(&c.value) {
                    // Someone refreshed between our read and the lock.
                    return Ok((
                        self.current
                            .read()
                            .clone()
                            .map(|c| c.value)
                            .unwrap_or(c.value.clone()),
                        false,
                    ));
                }
                return match self.fetch_and_store(fetch).await {
                    Ok(v) => Ok((v, true)),
                    // The old token is still valid; use it and try again next time.
                    Err(_) => Ok((c.value.clone(), false)),
                };
            }
        }
        let _guard = self.refresh.lock().await;
        // Another caller may have refreshed while we waited for the lock.
        if let Some(c) = self.current.read().clone()
            && c.expires_at > Instant::now() + MIN_REMAINING
            && cached.as_ref().is_none_or(|old| old.value != c.value)
        {
            return Ok((c.value, false));
        }
        if let Some((at, e)) = &*self.failed.lock()
            && at.elapsed() < failure_hold(e)
        {
            return Err(e.clone());
        }
        self.fetch_and_store(fetch).await.map(|v| (v, true))
    }

    async fn fetch_and_store<F, Fut>(&self, fetch: F) -> Result<Arc<str>, UpstreamError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<FetchedToken, UpstreamError>>,
    {
        let t = match fetch().await {
            Ok(t) => t,
            Err(e) => {
                *self.failed.lock() = Some((Instant::now(), e.clone()));
                return Err(e);
            }
        };
        *self.failed.lock() = None;
        let value: Arc<str> = t.value.into();
        *self.current.write() = Some(Cached {
            value: value.clone(),
            // Checked: the lifetime comes from outside (the client caps it too).
            expires_at: Instant::now()
                .checked_add(t.expires_in)
                .unwrap_or_else(Instant::now),
        });
        Ok(value)
    }

    fn is_current(&self, value: &str) -> bool {
        self.current
            .read()
            .as_ref()
            .is_some_and(|c| &*c.value == value)
    }

    /// Feishu refused `value`: forget it, unless a newer token already replaced it.
    pub fn invalidate(&self, value: &str) {
        let mut cur = self.current.write();
        if cur.as_ref().is_some_and(|c| &*c.value == value) {
            *cur = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    async fn fetcher(n: &AtomicU32, ttl_s: u64) -> Result<FetchedToken, UpstreamError> {
        let i = n.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(FetchedToken {
            value: format!("t-{i}"),
            expires_in: Duration::from_secs(ttl_s),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_refresh() {
        let cache = TokenCache::new(Duration::from_secs(300));
        let fetches = AtomicU32::new(0);
        let results =
            futures_util::future::join_all((0..20).map(|_| cache.get(|| fetcher(&fetches, 7200))))
                .await;
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert!(results.iter().all(|r| &*r.as_ref().unwrap().0 == "t-0"));
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_early_and_invalidates_once() {
        let cache = TokenCache::new(Duration::from_secs(300));
        let fetches = AtomicU32::new(0);
        assert_eq!(
            &*cache.get(|| fetcher(&fetches, 7200)).await.unwrap().0,
            "t-0"
        );
        tokio::time::advance(Duration::from_secs(7200 - 299)).await;
        // Inside the early window: refreshed by this caller.
        assert_eq!(
            &*cache.get(|| fetcher(&fetches, 7200)).await.unwrap().0,
            "t-1"
        );
        // A stale invalidation (old token) does not throw away the new one.
        cache.invalidate("t-0");
        assert_eq!(
            &*cache.get(|| fetcher(&fetches, 7200)).await.unwrap().0,
            "t-1"
        );
        cache.invalidate("t-1");
        assert_eq!(
            &*cache.get(|| fetcher(&fetches, 7200)).await.unwrap().0,
            "t-2"
        );
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_fetch_is_answered_from_memory_for_a_while() {
        let cache = TokenCache::new(Duration::from_secs(300));
        let fetches = AtomicU32::new(0);
        let refuse = || async {
            fetches.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err::<FetchedToken, _>(UpstreamError::Credentials {
                code: 10014,
                msg: "app secret invalid".into(),
                log_id: String::new(),
            })
        };
        let results = futures_util::future::join_all((0..20).map(|_| cache.get(refuse))).await;
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(UpstreamError::Credentials { code: 10014, .. })))
        );
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            1,
            "one fetch for 20 waiting callers"
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(cache.get(refuse).await.is_err());
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            2,
            "asked again after the hold"
        );
        // A success clears the memory of the failure.
        tokio::time::advance(Duration::from_secs(11)).await;
        cache.get(|| fetcher(&fetches, 7200)).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn short_lived_tokens_are_not_used_near_expiry() {
        let cache = TokenCache::new(Duration::from_secs(300));
        let fetches = AtomicU32::new(0);
        cache.get(|| fetcher(&fetches, 20)).await.unwrap();
        // 20 s left < 30 s minimum: the next caller fetches again.
        cache.get(|| fetcher(&fetches, 7200)).await.unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }
}
