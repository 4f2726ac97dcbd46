//! Budgets in the shared Redis: [`RedisBudgetCounter`], the budgets' [`SharedCounter`]
//! (one counter per app_id and period, under the quota keys' hash tag).

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{Lane, RedisQuota};
use crate::budget::SharedCounter;

/// Takes one call if the count is below the limit. KEYS[1] = the app's counter for the period;
/// ARGV[1] = limit, ARGV[2] = when the key may go (ms since the epoch). Returns {1, used} when
/// taken, {0, used} when spent.
const SPEND_LUA: &str = r#"
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used >= tonumber(ARGV[1]) then return {0, used} end
used = redis.call('INCR', KEYS[1])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return {1, used}
"#;

/// The budgets' counters in Redis (on the quota lane).
pub struct RedisBudgetCounter {
    redis: Arc<RedisQuota>,
    spend: redis::Script,
}

impl RedisBudgetCounter {
    pub fn new(redis: Arc<RedisQuota>) -> Self {
        Self {
            redis,
            spend: redis::Script::new(SPEND_LUA),
        }
    }

    fn key(&self, app_id: &str, period_start_s: i64) -> String {
        self.redis.app_key_name("budget", app_id, period_start_s)
    }
}

impl SharedCounter for RedisBudgetCounter {
    fn spend<'a>(
        &'a self,
        app_id: &'a str,
        period_start_s: i64,
        limit: u64,
        expire_at_ms: i64,
    ) -> BoxFuture<'a, Option<(bool, u64)>> {
        Box::pin(async move {
            let mut inv = self.spend.prepare_invoke();
            inv.key(self.key(app_id, period_start_s))
                .arg(limit)
                .arg(expire_at_ms);
            let answer: Result<Vec<u64>, _> = self
                .redis
                .shared()
                .call_on(Lane::Quota, "budget", inv)
                .await;
            match answer.as_deref() {
                Ok([taken, used]) => Some((*taken == 1, *used)),
                _ => None,
            }
        })
    }

    fn used<'a>(
        &'a self,
        app_id: &'a str,
        period_start_s: i64,
    ) -> BoxFuture<'a, Result<Option<u64>, ()>> {
        Box::pin(async move {
            let key = self.key(app_id, period_start_s);
            self.redis
                .shared()
                .command_on::<Option<u64>>(Lane::Quota, "budget", redis::cmd("GET").arg(&key))
                .await
                .map_err(|_| ())
        })
    }

    fn replicas(&self) -> usize {
        self.redis.replicas()
    }
}
