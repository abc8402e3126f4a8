//! Running one prepared command for the exec server: through a runner (`agentvm-sidecar run`,
//! see [`super::runner`]) of its own, which feeds it the request's standard input, captures its
//! output up to the cap, ends everything it started, and reports.
//!
//! The runner starts with an empty environment and gets the command's as arguments, so nothing
//! in a request (`LD_PRELOAD`, ...) reaches the runner itself. If the runner dies without a
//! report (a command may kill it: they run as the same user), what its command started is
//! re-parented to the exec server, which kills it (see [`crate::reaper::kill_orphans`]).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rustix::process::Signal;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::command::Prepared;
use super::report::{self, Outcome, Report};
use super::runner::SUBCOMMAND;
use crate::reaper;

/// How long a runner gets past its command's time limit to end everything and report: more
/// than its own bounds add up to (sweep, reap and drain: 7.5 s).
const RUNNER_GRACE: Duration = Duration::from_secs(10);
/// How much of the runner's own standard error (its failures) is kept.
const RUNNER_STDERR_BYTES: usize = 16 * 1024;

/// Why a command gave no outcome.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The program could not be started (not found, not executable, out of processes...).
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        /// `argv[0]`.
        program: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The runner failed: it could not start, died without a report, or did not report in time.
    #[error("the command's runner failed: {0}")]
    Runner(String),
}

/// Runs `p` through the runner program `runner`, keeping at most `cap` bytes of each output
/// stream.
pub async fn run(runner: &Path, p: Prepared, cap: usize) -> Result<Outcome, RunError> {
    let program = p.argv.first().cloned().unwrap_or_default();
    let mut cmd = Command::new(runner);
    cmd.arg(SUBCOMMAND)
        .arg(format!("--timeout-ms={}", p.timeout.as_millis().max(1)))
        .arg(format!("--max-output-bytes={cap}"))
        .arg("--clear-env");
    for (name, value) in &p.env {
        cmd.arg(format!("--env={name}={value}"));
    }
    cmd.arg("--")
        .args(&p.argv)
        .env_clear()
        .current_dir(&p.cwd)
        .stdin(if p.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = reaper::start(cmd).map_err(|e| match e.kind() {
        // Arguments and environment past the system's limit: the request's doing.
        std::io::ErrorKind::ArgumentListTooLong => RunError::Spawn {
            program: program.clone(),
            source: e,
        },
        _ => RunError::Runner(format!("cannot start it: {e}")),
    })?;
    // From here on the runner is told to stop on every path out, errors included: it then ends
    // everything its command started.
    let guard = StopOnDrop(Some(child.pid));
    let reaper::Pipes {
        stdin,
        stdout,
        stderr,
    } = child
        .pipes()
        .map_err(|e| RunError::Runner(format!("cannot read its pipes: {e}")))?;
    let writer = match (stdin, p.stdin) {
        (Some(mut pipe), Some(bytes)) => Some(tokio::spawn(async move {
            // A command that does not read its input closes the pipe: not an error.
            let _ = pipe.write_all(&bytes).await;
        })),
        _ => None,
    };
    let deadline = Instant::now() + p.timeout + RUNNER_GRACE;
    let out = tokio::spawn(read_capped(stdout, report::max_line_bytes(cap), deadline));
    let err = tokio::spawn(read_capped(stderr, RUNNER_STDERR_BYTES, deadline));

    let exit = tokio::time::timeout_at(deadline, &mut child.exit).await;
    if let Some(w) = writer {
        w.abort();
    }
    let exit = match exit {
        Ok(exit) => exit.ok(),
        Err(_) => {
            // The runner is stuck (or stopped by its command): what it leaves becomes ours.
            reaper::signal(child.pid, Signal::KILL);
            return Err(RunError::Runner(format!(
                "no report within {}s of the time limit",
                RUNNER_GRACE.as_secs()
            )));
        }
    };
    guard.disarm();
    let stdout = out.await.unwrap_or_default();
    let stderr = err.await.unwrap_or_default();
    match Report::find(&stdout) {
        Ok(Report::Ran(outcome)) => Ok(outcome),
        Ok(Report::NotStarted { reason, message }) => Err(RunError::Spawn {
            program,
            source: std::io::Error::new(reason.kind(), message),
        }),
        Err(e) => {
            let how = match exit {
                Some(reaper::Exit {
                    signal: Some(signal),
                    ..
                }) => format!("killed by signal {signal}"),
                Some(reaper::Exit {
                    code: Some(code), ..
                }) => format!("exit status {code}"),
                _ => "ended".to_owned(),
            };
            let said = String::from_utf8_lossy(&stderr);
            Err(RunError::Runner(format!("{how}, {e}: {}", said.trim())))
        }
    }
}

/// Tells the runner to stop (SIGTERM) when the request ends early (client gone, handler
/// dropped); it then ends everything its command started.
struct StopOnDrop(Option<i32>);

impl StopOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            reaper::signal(pid, Signal::TERM);
        }
    }
}

/// Reads `pipe` to its end (or `until`), keeping at most `cap` bytes.
async fn read_capped(pipe: Option<impl AsyncRead + Unpin>, cap: usize, until: Instant) -> Vec<u8> {
    let Some(pipe) = pipe else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let limit = u64::try_from(cap).unwrap_or(u64::MAX);
    let _ = tokio::time::timeout_at(until, pipe.take(limit).read_to_end(&mut kept)).await;
    kept
}
