//! The exec dispatcher (`agentvm-sidecar dispatch`): the exec server's API, but each request
//! runs as one Kubernetes Job in a hardened pod that the webhook and the deny-egress policy
//! recognise by its labels. The dispatcher waits for the Job with a watch, answers from the
//! pod's log, and deletes the Job.
//!
//! Each Job's command runs under the runner (`agentvm-sidecar run`), copied into the pod from
//! the sidecar image by an init container: standard output and standard error come back apart,
//! each capped, with the exit code or signal, from the report line the runner writes to the
//! container log. What differs from the exec server, by construction:
//! - Standard input travels in a Secret the dispatcher creates for the Job, owned by it (the
//!   garbage collector deletes it with the Job): at most 1 MiB, readable by whoever may read
//!   Secrets in the namespace until then.
//! - The working directory is an empty scratch volume; the agent's workspace is not there.
//! - The time limit is the Job's `activeDeadlineSeconds`, rounded up to whole seconds and
//!   counted from the Job's start, so scheduling and image pull use it up too; the runner also
//!   stops the command at the exact limit from its own start, whichever comes first. Past the
//!   Job's deadline the pod is deleted, and the command's output with it.
//! - When the log holds no report (the runner could not run), the answer is the plain log and
//!   the container's status, with a `note` saying so.

pub mod job;
pub mod jobs;
pub mod server;

pub use server::{app, DispatchConfig, DispatchState};
