//! The exec server (`agentvm-sidecar exec`): runs one command per request in the workspace it
//! shares with the agent, with no shell unless argv names one, a clean environment, capped
//! output, a time limit that kills the whole process group, and a concurrency limit.

pub mod command;
pub mod run;
pub mod server;

pub use server::{app, ExecConfig, ExecState};
