//! Per-tool rate limits: a token bucket per tool name (as the agent sees it). Only calls that
//! policy allowed and that reach a tool count, so a limit never tells the agent that a hidden
//! tool exists.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::config::RateLimitConfig;

/// The name of the rule that applies to tools without their own.
pub const ANY_TOOL: &str = "*";

#[derive(Debug, Clone, Copy)]
struct Rule {
    per_second: f64,
    burst: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The limits in force and the buckets filled so far.
#[derive(Debug, Default)]
pub struct RateLimiter {
    rules: HashMap<String, Rule>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// Limits from the config file's `rateLimits`.
    pub fn new(config: &[RateLimitConfig]) -> Self {
        let rules = config
            .iter()
            .map(|c| {
                let rule = Rule {
                    per_second: f64::from(c.per_minute) / 60.0,
                    burst: f64::from(c.burst.unwrap_or(c.per_minute)),
                };
                (c.tool.clone(), rule)
            })
            .collect();
        Self {
            rules,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one call's token for `tool`; `Err` holds how long until one is free.
    pub fn check(&self, tool: &str) -> Result<(), Duration> {
        self.check_at(tool, Instant::now())
    }

    fn check_at(&self, tool: &str, now: Instant) -> Result<(), Duration> {
        let Some(rule) = self.rules.get(tool).or_else(|| self.rules.get(ANY_TOOL)) else {
            return Ok(());
        };
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        let bucket = buckets.entry(tool.to_owned()).or_insert(Bucket {
            tokens: rule.burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rule.per_second).min(rule.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / rule.per_second,
            ))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn limit(tool: &str, per_minute: u32, burst: Option<u32>) -> RateLimitConfig {
        RateLimitConfig {
            tool: tool.into(),
            per_minute,
            burst,
        }
    }

    #[test]
    fn buckets_refill_and_refuse_with_a_wait() {
        let r = RateLimiter::new(&[limit("exec", 60, Some(2)), limit(ANY_TOOL, 600, None)]);
        let t0 = Instant::now();
        assert!(r.check_at("exec", t0).is_ok());
        assert!(r.check_at("exec", t0).is_ok());
        let wait = r.check_at("exec", t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(r.check_at("exec", t0 + Duration::from_secs(1)).is_ok());
        // Other tools share the default rule, each with its own bucket.
        for _ in 0..600 {
            assert!(r.check_at("a__b", t0).is_ok());
        }
        assert!(r.check_at("a__b", t0).is_err());
        assert!(r.check_at("a__c", t0).is_ok());
        assert!(RateLimiter::new(&[]).check_at("x", t0).is_ok());
    }
}
