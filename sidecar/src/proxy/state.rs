//! What the proxy's handlers share.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentvm_common::reload::Reloadable;

use super::config::ProxyConfig;
use super::policy::{Agent, ToolPolicy};
use super::ratelimit::RateLimiter;
use super::upstream::{self, HttpClient, Limits, Upstream};

/// Default request body limit: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
/// Default largest upstream response: 8 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 8 << 20;
/// Default upstream time limit, in milliseconds.
pub const DEFAULT_UPSTREAM_TIMEOUT_MS: u64 = 30_000;
/// How long a request body may take to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings that do not come from the config file.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// The calling agent, from the downward API.
    pub agent: Agent,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive ([`BODY_TIMEOUT`]).
    pub body_timeout: Duration,
    /// Upstream limits.
    pub limits: Limits,
    /// Origins accepted besides loopback ones (`http://localhost:3000`, ...).
    pub allowed_origins: Vec<String>,
    /// One INFO line per HTTP request, besides the audit records.
    pub access_log: bool,
}

/// Shared state.
#[derive(Debug)]
pub struct ProxyState {
    /// The calling agent (shared with the audit records written after each answer).
    pub agent: Arc<Agent>,
    /// The tool policy in force.
    pub policy: Arc<Reloadable<ToolPolicy>>,
    /// What the config file says, reloaded when it changes.
    pub routes: Arc<Reloadable<Routes>>,
    /// HTTP client for upstreams and the exec backend.
    pub client: HttpClient,
    /// Upstream limits.
    pub limits: Limits,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// Accepted non-loopback origins.
    pub allowed_origins: Vec<String>,
    /// Access log on.
    pub access_log: bool,
    /// Session ids handed out by `initialize`.
    pub sessions: Mutex<Sessions>,
}

impl ProxyState {
    /// State from a checked config, a policy and settings.
    pub fn new(
        config: &ProxyConfig,
        policy: Arc<Reloadable<ToolPolicy>>,
        settings: ProxySettings,
    ) -> Self {
        Self {
            agent: Arc::new(settings.agent),
            policy,
            routes: Arc::new(Reloadable::new(Routes::new(config, None))),
            client: upstream::http_client(),
            limits: settings.limits,
            max_body_bytes: settings.max_body_bytes,
            body_timeout: settings.body_timeout,
            allowed_origins: settings.allowed_origins,
            access_log: settings.access_log,
            sessions: Mutex::new(Sessions::default()),
        }
    }
}

/// How many sessions are kept; opening one more ends the oldest.
pub const MAX_SESSIONS: usize = 1024;

/// Session ids handed out by `initialize`, at most [`MAX_SESSIONS`], oldest first.
#[derive(Debug, Default)]
pub struct Sessions {
    ids: HashSet<String>,
    order: std::collections::VecDeque<String>,
}

impl Sessions {
    /// Keeps `id`, ending the oldest session when there are too many.
    pub fn insert(&mut self, id: String) {
        if self.ids.insert(id.clone()) {
            self.order.push_back(id);
        }
        while self.order.len() > MAX_SESSIONS {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }

    /// Whether `id` is a live session.
    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// Ends session `id`; whether it was live.
    pub fn remove(&mut self, id: &str) -> bool {
        let removed = self.ids.remove(id);
        if removed {
            self.order.retain(|s| s != id);
        }
        removed
    }
}

/// The part of the state that comes from the config file.
#[derive(Debug)]
pub struct Routes {
    /// Upstreams, in config order.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Base URL of the exec backend, when exec is offered.
    pub exec_endpoint: Option<String>,
    /// Per-tool rate limits.
    pub rate_limits: RateLimiter,
}

impl Routes {
    /// Routes for `config`. Upstreams whose entry did not change keep their session (and
    /// their known tools) from `previous`.
    pub fn new(config: &ProxyConfig, previous: Option<&Routes>) -> Self {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                previous
                    .and_then(|p| p.upstreams.iter().find(|old| old.config == *u))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Upstream::new(u.clone())))
            })
            .collect();
        Self {
            upstreams,
            exec_endpoint: config.exec.as_ref().map(|e| e.endpoint.clone()),
            rate_limits: RateLimiter::new(&config.rate_limits),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Sessions, MAX_SESSIONS};

    #[test]
    fn sessions_are_capped_oldest_first() {
        let mut s = Sessions::default();
        for i in 0..=MAX_SESSIONS {
            s.insert(i.to_string());
        }
        assert!(!s.contains("0"), "the oldest went");
        assert!(s.contains("1") && s.contains(&MAX_SESSIONS.to_string()));
        assert!(s.remove("1") && !s.remove("1"));
    }
}
