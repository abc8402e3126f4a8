//! The exec server (`agentvm-sidecar exec`): runs one command per request in the workspace it
//! shares with the agent, with no shell unless argv names one, a clean environment, capped
//! output, a time limit, and a concurrency limit. Each command runs under a runner of its own
//! that ends everything the command started, in its process group or not.

pub mod command;
pub mod report;
pub mod run;
pub mod runner;
pub mod server;
pub mod tree;

pub use server::{app, ExecConfig, ExecState};
