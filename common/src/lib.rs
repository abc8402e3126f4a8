//! What the agentvm webhook and the sidecar share, kept in one place so that neither depends on
//! the other: Rego policy sets (loading, testing, hot-reloading), TLS serving with certificate
//! reload, graceful HTTP serving, and telemetry set-up.

pub mod policy;
pub mod reload;
pub mod serve;
pub mod telemetry;
pub mod tls;
