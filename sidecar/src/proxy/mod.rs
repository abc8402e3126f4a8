//! The tool-call proxy (`agentvm-sidecar proxy`): MCP over Streamable HTTP for the agent, in
//! front of upstream MCP servers and the built-in exec tool, every call decided by Rego and
//! written to the audit log.
//!
//! Tool names: an upstream's tool `t` is `<upstream>__<t>` to the agent (upstream names hold no
//! `_`, so the first `__` ends them); the built-in tool is `exec`, decided under the upstream
//! name `agentvm`.

pub mod audit;
pub mod config;
pub mod exec_tool;
pub mod features;
pub mod mcp;
pub mod policy;
pub mod ratelimit;
pub mod server;
pub mod state;
pub mod upstream;

pub use server::app;
pub use state::{ProxySettings, ProxyState};

#[cfg(test)]
mod tests;
