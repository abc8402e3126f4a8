//! The agentvm sidecar: the in-pod tool-call proxy, the exec server, the exec dispatcher and the
//! startup probe of both servers.

pub mod dispatch;
pub mod exec;
pub mod probe;
pub mod proxy;
pub mod reaper;
