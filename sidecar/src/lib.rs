//! The agentvm sidecar: the in-pod tool-call proxy, the exec server and the startup probe of
//! both.

pub mod exec;
pub mod probe;
pub mod proxy;
pub mod reaper;
