//! What the proxy's handlers share.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

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

/// Settings that do not come from the config file.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// The calling agent, from the downward API.
    pub agent: Agent,
    /// Request body limit.
    pub max_body_bytes: usize,
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
    /// The calling agent.
    pub agent: Agent,
    /// The tool policy in force.
    pub policy: Arc<Reloadable<ToolPolicy>>,
    /// Upstreams, in config order.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Base URL of the exec backend, when exec is offered.
    pub exec_endpoint: Option<String>,
    /// HTTP client for upstreams and the exec backend.
    pub client: HttpClient,
    /// Upstream limits.
    pub limits: Limits,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Accepted non-loopback origins.
    pub allowed_origins: Vec<String>,
    /// Access log on.
    pub access_log: bool,
    /// Per-tool rate limits.
    pub rate_limits: RateLimiter,
    /// Session ids handed out by `initialize`.
    pub sessions: Mutex<HashSet<String>>,
}

impl ProxyState {
    /// State from a checked config, a policy and settings.
    pub fn new(
        config: &ProxyConfig,
        policy: Arc<Reloadable<ToolPolicy>>,
        settings: ProxySettings,
    ) -> Self {
        Self {
            agent: settings.agent,
            policy,
            upstreams: config
                .upstreams
                .iter()
                .map(|u| Arc::new(Upstream::new(u.clone())))
                .collect(),
            exec_endpoint: config.exec.as_ref().map(|e| e.endpoint.clone()),
            client: upstream::http_client(),
            limits: settings.limits,
            max_body_bytes: settings.max_body_bytes,
            allowed_origins: settings.allowed_origins,
            access_log: settings.access_log,
            rate_limits: RateLimiter::new(&config.rate_limits),
            sessions: Mutex::new(HashSet::new()),
        }
    }
}
