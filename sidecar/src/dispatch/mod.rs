//! The exec dispatcher (`agentvm-sidecar dispatch`): the exec server's API, but each request
//! runs as one Kubernetes Job in a hardened pod that the webhook and the deny-egress policy
//! recognise by its labels. The dispatcher waits for the Job with a watch, answers with the
//! pod's log and exit code, and deletes the Job.
//!
//! What differs from the exec server, by construction:
//! - `stdout` holds the container log, in which Kubernetes merges standard output and standard
//!   error; `stderr` is always empty.
//! - `stdin` is refused (HTTP 400): the command runs as the container's own argv, and
//!   Kubernetes has no way to feed it input without attaching to the pod.
//! - The working directory is an empty scratch volume; the agent's workspace is not there.
//! - The time limit is the Job's `activeDeadlineSeconds`, rounded up to whole seconds and
//!   counted from the Job's start, so scheduling and image pull use it up too.

pub mod job;
pub mod jobs;
pub mod server;

pub use server::{app, DispatchConfig, DispatchState};
