//! The agentvm admission webhook: turns every pod labelled as an agent into a locked-down pod,
//! from Rego policies that platform teams write and test.
//!
//! Policy decides (the effective profile, denials, warnings, settings); Rust applies (the patch,
//! the conformance check). [`admission::Reviewer`] is the whole decision for one request;
//! [`server`] puts it behind HTTPS, [`offline`] behind the `agentvm review` command.

pub mod admission;
pub mod certs;
pub mod cluster;
pub mod conformance;
pub mod existing;
pub mod keys;
pub mod metrics;
pub mod mutate;
pub mod network;
pub mod offline;
pub mod patch;
pub mod podspec;
pub mod policies;
pub mod profile_name;
pub mod proxy_mounts;
pub mod review;
pub mod server;
pub mod settings;
pub mod workload;
