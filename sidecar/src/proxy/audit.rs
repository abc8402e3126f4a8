//! One audit record per request that reaches (or is refused before) an upstream: tool calls,
//! prompts, resource reads and subscriptions, completions. A tracing event with target
//! `agentvm::audit` (a JSON line with `--log-format json`). Argument values never appear: only
//! their SHA-256.

use std::time::Instant;

use serde_json::Value;

use super::policy::Agent;

/// The facts of one call.
#[derive(Debug)]
pub struct Record<'a> {
    /// The caller.
    pub agent: &'a Agent,
    /// The MCP method (`tools/call`, `prompts/get`, `resources/read`, ...).
    pub method: &'a str,
    /// Tool or prompt name as the agent sent it; empty for resources.
    pub tool: &'a str,
    /// Resource URI (or the template a completion refers to); empty otherwise.
    pub uri: &'a str,
    /// Upstream name (`agentvm` for exec), empty for a name that resolves to nothing.
    pub upstream: &'a str,
    /// `allow`, `deny`, `error` (policy failed), `unknown` or `rate_limited`.
    pub decision: &'static str,
    /// Deny messages, or the failure.
    pub reason: String,
    /// SHA-256 of the canonical JSON of the arguments.
    pub args_digest: &'a str,
    /// When the call arrived.
    pub started: Instant,
    /// Time spent waiting for the upstream or exec backend, in microseconds.
    pub upstream_us: u64,
    /// Size of the result in bytes.
    pub result_bytes: usize,
    /// The result's `isError`, when there is a result or an error.
    pub is_error: Option<bool>,
}

impl<'a> Record<'a> {
    /// Writes the record.
    pub fn emit(&self) {
        tracing::info!(
            target: "agentvm::audit",
            decision = self.decision,
            method = self.method,
            agent.pod = %self.agent.pod,
            agent.namespace = %self.agent.namespace,
            agent.service_account = %self.agent.service_account,
            agent.profile = %self.agent.profile,
            upstream = self.upstream,
            tool = self.tool,
            uri = self.uri,
            reason = self.reason.as_str(),
            latency_us = self.started.elapsed().as_micros() as u64,
            upstream_us = self.upstream_us,
            args_sha256 = self.args_digest,
            result_bytes = self.result_bytes,
            is_error = self.is_error,
            "tool call"
        );
    }

    /// A record for `method` on `tool` (or `uri`), not yet decided.
    pub fn new(agent: &'a Agent, method: &'a str, args_digest: &'a str, started: Instant) -> Self {
        Self {
            agent,
            method,
            tool: "",
            uri: "",
            upstream: "",
            decision: "unknown",
            reason: String::new(),
            args_digest,
            started,
            upstream_us: 0,
            result_bytes: 0,
            is_error: None,
        }
    }
}

/// Hex SHA-256 of the arguments as JSON text.
pub fn digest(arguments: &Value) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, arguments.to_string().as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
